"""A run's run_config.json: whose run it records, what its checkpoints fix in it, and what `--resume` may change.

`--resume` continues the run on disk as its `run_config.json` records it: the recipe is read only for `output.dir`
and to check that the directory holds this recipe's run. A setting given on the command line with `--resume`
  - may never differ (the directory holds another run; --overwrite replaces it): IDENTITY;
  - may not change once a checkpoint exists, since the run would no longer be the one its checkpoints continue (the
    base the adapter trains against, how the adapter started, the data, its order and held-out split):
    FIXED_ON_RESUME;
  - changes anything else from the resumed step on, and is said: how long (train.steps), how it learns (lr,
    schedule, warmup, weight decay, clipping, optimizer: its state then starts afresh, dropout), in how much memory
    and how fast (data.max_seq_len, batch_size and grad_accum: the data continues from the same row, the levers;
    a data.max_seq_len that drops rows, or any other with data.pack, is refused: the rows would be others),
    and how it reports (eval, eval_before: only at step 0, log, save, keep, max_bad_steps, device).
Each checkpoint records the settings it was written under, and run_config.json is checked against the newest one's: a
value there that differs from it is refused (`check_recorded`, `resume_config`), unless this command line gives it.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
from pathlib import Path

from qlora.base.build import config_sha256
from qlora.config import Config, apply_overrides, check_all, override_key, read_config_json, resolve_paths
from qlora.errors import OVERWRITE_ON_RESUME, ConfigError, start_over
from qlora.training.checkpoint import RUN_CONFIG, check_ours, checkpoint_dirs
from qlora.training.restore import recorded, restorable

# What makes two runs the same run: the base and its quantisation, and the adapters' shape.
IDENTITY = ("model.path", "quant.method", "quant.quant_type", "lora.r", "lora.alpha", "lora.targets")
BASE, DATA, HELD_OUT = ("the base the adapter trains against", "the data the run trains on",
                        "the held-out split its losses compare")
FIXED_ON_RESUME = {
    "model.synthetic": BASE, "model.config_json": BASE, "quant.double_quant": BASE, "quant.quantize_lm_head": BASE,
    # The layers kept in 16-bit are chosen once, when the run starts, and recorded in quant.keep_16bit.
    "quant.blocksize": BASE, "quant.keep_16bit": BASE, "quant.keep_16bit_budget": BASE, "quant.calibration_rows": BASE,
    "lora.init": "how the adapter started", "lora.loftq_iters": "how the adapter started (and the base LoftQ made)",
    "data.train": DATA, "data.format": DATA, "data.pack": DATA,
    "data.eval": HELD_OUT, "data.eval_fraction": HELD_OUT, "train.seed": "the data order and the held-out split",
}

# Packed rows are filled to data.max_seq_len: another length packs other rows (qlora/data/pack.py).
PACKED = "the rows the documents are packed into (data.pack)"
CONFIG = "model.config_json"


def _fixes(key: str, run: dict) -> bool:
    """Whether the checkpoints of a run with the settings `run` (flat) fix `key`: model.config_json for a synthetic
    base alone (a base loaded from its weights plays no part in it: it is read by the memory estimate only),
    data.max_seq_len for packed rows alone."""
    if key == CONFIG:
        return bool(run.get("model.synthetic"))
    return key in FIXED_ON_RESUME or (key == "data.max_seq_len" and bool(run.get("data.pack")))


def _same_config(was: str | None, now: str | None, run_dir: Path, fix: str) -> bool:
    """Whether `now`, the config.json a synthetic base is drawn from, holds the run's (`was` where the newest checkpoint
    of `run_dir` was written), by content: the sha256 that checkpoint recorded, or, one written before it did, `was`'s
    file's. A moved copy is the same; False where `now` is no file. Refused, with `fix`, where it holds another, or
    where the run's cannot be known."""
    ours = config_sha256(now)
    if ours is None:
        return False
    ckpt, theirs = recorded(run_dir, "config_json_sha256")
    theirs = theirs or config_sha256(was)
    if theirs is None:
        raise ConfigError(f"{CONFIG}={now} cannot be checked against the run's {was}: that file is gone, and "
                          f"{ckpt.name if ckpt else 'its checkpoint'} was written before checkpoints recorded its "
                          f"sha256; put the file back at {was}, or {fix}")
    if ours != theirs:
        than = "the run's, edited since (its sha256 differs)" if now == was else \
            f"the run's {was} (their sha256 differ)"
        raise ConfigError(f"{CONFIG}={now} holds another config.json than {than}: the base would be drawn from "
                          f"another architecture; point it at the run's file (or a copy of it), or {fix}")
    return True


def flat(d: dict, prefix: str = "") -> dict:
    """A config's dict as `section.key: value`, the keys a command line names."""
    out = {}
    for key, value in d.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _same_path(a: object, b: object) -> bool:
    norm = [os.path.abspath(os.path.expanduser(p)) if isinstance(p, str) and os.path.exists(p) else p for p in (a, b)]
    return norm[0] == norm[1]


def _gone(path: object) -> bool:
    """A local file or folder the run recorded (recorded paths are absolute; a hub id is not), no longer there."""
    return isinstance(path, str) and Path(path).is_absolute() and not Path(path).exists()


def check_identity(saved: Config, cfg: Config, run_dir: Path, moved: bool = False, resume: bool = False) -> None:
    """Refuse a recipe (`cfg`) whose IDENTITY differs from the run in `run_dir` (`saved`): another run. With `moved`
    (a resume given --model.path), a base whose recorded folder is gone may be the one at cfg's model.path. `resume`:
    the command has --resume, which --overwrite then replaces."""
    theirs, ours = flat(saved.to_dict()), flat(cfg.to_dict())
    keys = [k for k in IDENTITY if not (k.startswith("lora.") and cfg.quant.method == "full")]
    gone = _gone(theirs["model.path"])  # a hub id is never gone: another one is another base
    differ = [f"{k}={theirs[k]!r}, this recipe {ours[k]!r}" for k in keys
              if not ((_same_path(theirs[k], ours[k]) or (moved and gone)) if k == "model.path" else
                      theirs[k] == ours[k])]
    if differ:
        # A base folder moved since the run began reads as another base; the advice to --overwrite would lose the run.
        hint = (f"; if the base moved from {theirs['model.path']}, continue with --resume --model.path=NEW_FOLDER"
                if gone and theirs["model.path"] != ours["model.path"] else "")
        raise ConfigError(f"output.dir={run_dir} holds another run ({'; '.join(differ)}{hint}): use another "
                          f"output.dir, or {start_over(resume)} to replace that run")


# Where a file lies is no setting a checkpoint fixes: a base or a data file moved is pointed at in run_config.json.
MOVABLE = ("model.path",)


# A data file moved since the run began (its recorded path gone) may be given anew on the command line with --resume;
# progress.same_rows checks that it holds the run's rows.
MOVED_DATA = ("data.train", "data.eval")


def check_recorded(saved: Config, path: Path, run_dir: Path | None = None, movable: tuple = MOVABLE,
                   resume: bool = False) -> tuple[Path | None, dict]:
    """Refuse a run_config.json (`path`, read as `saved`) edited since the newest checkpoint of `run_dir` (its own
    directory; or a checkpoint-N) was written: a key removed (its default would stand in), or a value the checkpoints
    fix changed (measured on the tiny recipe: train.seed edited from 0 to 7, or train.lr removed, resumed without a
    word at another data order, or at lr 2e-4 instead of 3e-3; quant.double_quant edited to false, qlora.eval scored
    the adapter on another base, 4.0106 for 4.0087). Each checkpoint records the settings it was written under; one
    written before that is not checked. The keys in `movable` may differ (a resume holds data.train and data.eval to
    the run's unless it gives a moved one; the weights and the rows are checked on their own). Returns that checkpoint
    and its settings, flat ({} where none), for `resume_config` to compare the values a resume may change. `resume`:
    the command has --resume, which --overwrite then replaces."""
    ckpt, record = recorded(run_dir or path.parent, "config")
    if not isinstance(record, dict):
        return None, {}
    restart = start_over(resume)
    ours, theirs, raw = flat(saved.to_dict()), flat(record), flat(json.loads(path.read_text(encoding="utf-8")))
    # Each refusal names every key it is for: named one at a time, each fix met the next refusal.
    missing = [k for k in theirs if k not in raw and k in ours]
    if missing:
        keys, then = ", ".join(missing), _values(missing, theirs)
        raise ConfigError(f"{path} lacks {keys}, which {ckpt.name} was written with ({then}): the default would "
                          f"stand in; restore {keys} in {RUN_CONFIG} to use the run, or start a new run with "
                          f"{restart}")
    fixed = [*IDENTITY, *(k for k in (*FIXED_ON_RESUME, "data.max_seq_len") if _fixes(k, theirs))]
    changed = [k for k in fixed if k in theirs and k in ours and k not in movable and theirs[k] != ours[k]
               and not (k == CONFIG and _same_config(theirs[k], ours[k], run_dir or path.parent,
                                                     f"start a new run with {restart}"))]  # moved
    if changed:
        raise ConfigError(f"{path} has {_values(changed, ours, named=True)}, but {ckpt.name} was written with "
                          f"{_values(changed, theirs)}, which the checkpoints fix: restore {', '.join(changed)} in "
                          f"{RUN_CONFIG} (or, if {ckpt.name} came from another run, move it away) to use the run, or "
                          f"start a new run with {restart}")
    if _fixes(CONFIG, theirs) and CONFIG not in movable and theirs.get(CONFIG) == ours.get(CONFIG):
        # The file edited where it lies: measured on the tiny recipe, qlora.eval drew the base from the edited
        # config.json (initializer_range 0.1 -> 0.5) and scored the adapter on it, held-out loss 16.81 for 6.02.
        _same_config(ours[CONFIG], ours[CONFIG], run_dir or path.parent, f"start a new run with {restart}")
    return ckpt, theirs


def _values(keys: list[str], values: dict, named: bool = False) -> str:
    """`keys`' values as a refusal names them: `k=v, ...`, or the value alone for one key not `named`."""
    return ", ".join(f"{k}={values[k]!r}" if named or len(keys) > 1 else repr(values[k]) for k in keys)


def _flag(key: str, value: object) -> str:
    """`--key=value` as the command line reads it back (a float whole, as repr writes it), the value quoted for a
    shell where it needs it (`--model.build='tiny llama'`: unquoted, the shell passed two words)."""
    if isinstance(value, list):
        value = ",".join(value)
    text = str(value).lower() if isinstance(value, bool) or value is None else str(value)
    return f"--{key}={shlex.quote(text) if text else ''}"


def resume_config(cfg: Config, overrides: list[str]) -> Config:
    """The config `--resume` continues with: the run's run_config.json, changed by the command line's overrides where
    the rules above allow (said in one line); `cfg` (recipe and overrides, checked here: a resume reads it unchecked)
    if the directory holds no run yet."""
    run_dir = Path(cfg.output.dir)
    path = run_dir / RUN_CONFIG
    if not path.is_file():  # one that is no file is check_run_dir's to name
        found = checkpoint_dirs(run_dir)
        for ckpt in found:  # another tool's is named as such, not as a run to restore
            check_ours(ckpt)
        if not (path.exists() or path.is_symlink()) and found:  # a cut-short --overwrite?
            raise ConfigError(f"{run_dir} holds checkpoints but no {RUN_CONFIG}, so which run they continue cannot be "
                              f"checked: restore {RUN_CONFIG}, or start over with {OVERWRITE_ON_RESUME}")
        return check_all(cfg)
    saved = resolve_paths(read_config_json(path, resume=True))  # one written before paths were absolute: from here
    given = {override_key(item) for item in overrides}
    # A moved data file given may be in run_config.json already, left by the same command cut short before its first
    # checkpoint: it is checked against the checkpoint's below, as a change.
    ckpt, theirs = check_recorded(saved, path, movable=(*MOVABLE, *given.intersection((*MOVED_DATA, CONFIG))),
                                  resume=True)
    resumed = copy.deepcopy(saved)
    if saved.train.plan == "fastest" and [item.split("=", 1)[1] for item in overrides
                                          if override_key(item) == "train.plan"][-1:] == ["recipe"]:
        # plan_keep (which the first command line filled) and plan_batch steer a plan, and are refused without one:
        # they go with it, and the run goes on with the levers the plan chose, as its run_config.json records them.
        resumed.train.plan_keep, resumed.train.plan_batch = [], False
    resumed = resolve_paths(apply_overrides(resumed, overrides))  # each override checked against the run's values
    check_identity(saved, cfg, run_dir, moved="model.path" in given, resume=True)
    resumed.output.dir = cfg.output.dir  # the directory being resumed, wherever it was first written
    before, after, recipe = flat(saved.to_dict()), flat(resumed.to_dict()), flat(cfg.to_dict())
    # What the command line changes, it changes from the newest checkpoint's value: run_config.json may hold its own
    # already, left by the same command cut short before its first checkpoint.
    was = {k: theirs.get(k, value) if k in given else value for k, value in before.items()}
    lost = [k for k in (*MOVED_DATA, CONFIG) if k not in given and _gone(before[k]) and _fixes(k, before)]
    if lost and checkpoint_dirs(run_dir):  # read_rows' "not found" would send the user to edit run_config.json
        held = "the run's rows" if lost[0] in MOVED_DATA else "the same content"
        raise ConfigError(f"{lost[0]}={before[lost[0]]} is gone since the run began: if the file moved, continue with "
                          f"--resume --{lost[0]}=NEW_FILE (checked to hold {held})")
    changed = [k for k in after if after[k] != was[k] and k != "output.dir"]
    fixed = [k for k in changed if (_fixes(k, was) or _fixes(k, after))
             and not (k in MOVED_DATA and k in given and _gone(was[k]) and isinstance(after[k], str))]
    if _fixes(CONFIG, was) and _fixes(CONFIG, after) and checkpoint_dirs(run_dir) and _same_config(
            was[CONFIG], after[CONFIG], run_dir, f"start a new run with {OVERWRITE_ON_RESUME} or another output.dir"):
        fixed = [k for k in fixed if k != CONFIG]  # the run's config.json, moved: a change said below
    if fixed and checkpoint_dirs(run_dir):  # every one, as check_recorded names them
        what = ", ".join(f"{k} ({was[k]!r} -> {after[k]!r})" for k in fixed)
        why = " and ".join(dict.fromkeys(FIXED_ON_RESUME.get(k, PACKED) for k in fixed))
        raise ConfigError(f"--resume cannot change {what}: {'it fixes' if len(fixed) == 1 else 'they fix'} {why}; "
                          f"drop {' '.join(f'--{k}' for k in fixed)} to continue the run, or start a new run with "
                          f"{OVERWRITE_ON_RESUME} or another output.dir")
    # What the plan chose is the run's, and planned again from the recipe's values (qlora/memory/plan.py, unplanned).
    planned = {"train.plan_chose", "train.plan_from"} | ({override_key(item) for item in saved.train.plan_from}
                                                         if resumed.train.plan == "fastest" else set())
    # A value a resume may change that run_config.json changed since the newest checkpoint, by an edit (or a resume cut
    # short before its first checkpoint), would change the run unsaid (measured on the tiny recipe: train.lr edited
    # 0.003 -> 0.001 resumed at 1e-3 without a word); the command line changes it, and says so.
    # A synthetic base's config.json moved (its content checked by check_recorded) is one more place a file lies.
    kept = {*MOVABLE, "output.dir", *given, *planned, *([CONFIG] if _fixes(CONFIG, theirs) else []),
            *(override_key(item) for item in theirs.get("train.plan_from", []) if resumed.train.plan == "fastest")}
    edited = [k for k in theirs if k in before and theirs[k] != before[k] and k not in kept]
    if edited:  # every one, as check_recorded names them
        raise ConfigError(f"{path} has {_values(edited, before, named=True)}, but {ckpt.name} was written with "
                          f"{_values(edited, theirs)}: restore {', '.join(edited)} in {RUN_CONFIG} (or, if {ckpt.name} "
                          "came from another run, move it away) to continue the run as it was, or pass "
                          f"{' '.join(_flag(k, before[k]) for k in edited)} to resume with "
                          f"{'it' if len(edited) == 1 else 'them'}")
    # The run's train.plan_keep holds the levers its first command line set (keep_overridden), each said as itself.
    ignored = [f"{k}={recipe[k]!r} (the run has {after[k]!r})" for k in recipe
               if recipe[k] != after[k] and k != "output.dir" and k not in planned
               and not (k == "train.plan_keep" and set(recipe[k]) <= set(after[k]))]
    # Before loading (minutes for 70B): resume_progress refused it only once the base was loaded and the rows read.
    newest, state = restorable(run_dir, resumed)  # the one the restore uses, past a newer damaged one
    if newest is not None and state["step"] > resumed.train.steps:
        raise ConfigError(f"train.steps={resumed.train.steps} is below step {state['step']}, where {newest} stands: "
                          f"set --train.steps={state['step']} or more to continue")
    line = f"resuming {run_dir} with the settings in its {RUN_CONFIG}"
    if changed:
        line += "; changed on the command line: " + ", ".join(f"{k} {was[k]!r} -> {after[k]!r}" for k in changed)
    if ignored:
        line += "; the recipe's own values are not used: " + ", ".join(ignored)
    print(line)
    return resumed

