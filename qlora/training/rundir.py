"""The output directory: whose run it holds, what `--resume` may change, the lock, and the first write of a run.

Everything here but `start_run` only reads, so a refused command leaves the directory as it was.

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

One trainer at a time: `start_run` takes an exclusive lock (flock on `.qlora.lock`, released when the run or its
process ends), and `check_run_dir` refuses a directory whose lock another process holds (on a file system without
flock, the run goes on unguarded). Of the hidden files a run leaves, only
those this code writes (LEFTOVER) are ever removed.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from qlora.adapters.loftq import SHIFTS
from qlora.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from qlora.config import Config, apply_overrides, override_key, read_config_json, resolve_paths
from qlora.errors import DISK_FULL, ConfigError, check_writable
from qlora.training.checkpoint import FULL_WEIGHTS, METRICS, RUN_CONFIG, checkpoint_dirs, recorded, remove_checkpoint

MEMORY = "memory.json"
LOCK = ".qlora.lock"
RUN_FILES = (RUN_CONFIG, METRICS, ADAPTER_WEIGHTS, ADAPTER_CONFIG, FULL_WEIGHTS, MEMORY, SHIFTS)  # a run's own files
# What a killed run may leave half-written (checkpoint.py, metrics.MetricsLog, start_run): never read, so only
# in the way. Nothing else is removed, whatever its name.
LEFTOVER = re.compile(r"^\.(tmp|trash)-(checkpoint-\d+(\.damaged(-\d+)?)?|final|run_config\.json|metrics\.jsonl"
                      r"|loftq_shifts\.safetensors)$")
RUN_DIRS = re.compile(r"^checkpoint-\d+(\.damaged(-\d+)?)?$")  # a run's checkpoints, damaged ones set aside included

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

NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # a file system without flock (some network mounts)
_held: dict[Path, int] = {}  # run dir -> the file descriptor holding its lock


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _same_path(a: object, b: object) -> bool:
    norm = [os.path.abspath(os.path.expanduser(p)) if isinstance(p, str) and os.path.exists(p) else p for p in (a, b)]
    return norm[0] == norm[1]


def _check_identity(saved: Config, cfg: Config, run_dir: Path) -> None:
    theirs, ours = _flat(saved.to_dict()), _flat(cfg.to_dict())
    keys = [k for k in IDENTITY if not (k.startswith("lora.") and cfg.quant.method == "full")]
    differ = [f"{k}={theirs[k]!r}, this recipe {ours[k]!r}" for k in keys
              if not (_same_path(theirs[k], ours[k]) if k == "model.path" else theirs[k] == ours[k])]
    if differ:
        raise ConfigError(f"output.dir={run_dir} holds another run ({'; '.join(differ)}): use another "
                          "output.dir, or --overwrite to replace that run")


def _lock_holder(run_dir: Path) -> str | None:
    """The pid written by the process that holds the directory's lock, or None if no process holds it."""
    path = run_dir / LOCK
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken and, by the close below, released: a probe
        return None
    except BlockingIOError:
        return path.read_text().strip() or "unknown"
    except OSError as err:
        if err.errno in NO_LOCKS:
            return None
        raise
    finally:
        os.close(fd)


def _in_use(run_dir: Path, pid: str) -> ConfigError:
    return ConfigError(f"output.dir={run_dir} is in use by another trainer (pid {pid}): wait for it to end, or use "
                       "another output.dir")


def _check_paths(run_dir: Path) -> None:
    """The directory can be created or written, and every name the run writes is free or of the kind it writes."""
    check_writable(run_dir, "output.dir", directory=True)
    if not run_dir.is_dir():
        return
    for name in RUN_FILES:
        path = run_dir / name
        if (path.exists() or path.is_symlink()) and not path.is_file():
            raise ConfigError(f"{path} is not a file, yet the run writes that file there: move it away, or use "
                              "another output.dir")
    lock = run_dir / LOCK
    if lock.is_symlink() or (lock.exists() and not lock.is_file()):  # the lock file is written: never through a link
        raise ConfigError(f"{lock} is not a plain file (a trainer's lock is written there): remove it, or use "
                          "another output.dir")
    for path in run_dir.iterdir():
        if RUN_DIRS.match(path.name) and not path.is_dir():
            raise ConfigError(f"{path} is not a checkpoint directory, yet the run writes one under that name: move "
                              "it away, or use another output.dir")


def contents(run_dir: Path) -> tuple:
    """What of a run the directory holds, to tell whether another trainer wrote to it: each checkpoint's name, and
    each of a run's files with its size and modification time."""
    if not run_dir.is_dir():
        return ()
    files = tuple((name, s.st_size, s.st_mtime_ns) for name in RUN_FILES
                  if (s := _stat(run_dir / name)) is not None)
    return files + tuple(p.name for p in checkpoint_dirs(run_dir))


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def check_run_dir(run_dir: Path, cfg: Config, resume: bool, overwrite: bool) -> tuple:
    """Refuse an output dir that holds another run, one in use, one the run cannot write, or a run that would be
    started over by mistake. Reads only; returns what it found (`contents`), for `start_run` to check again under the
    lock."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output.dir and --overwrite discards it: pass one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output.dir={run_dir} is a file: point output.dir at a directory")
    base = Path(cfg.model.path).expanduser() if cfg.model.path else None
    if base is not None and base.is_dir() and run_dir.is_dir() and os.path.samefile(base, run_dir):
        raise ConfigError(f"output.dir={run_dir} is the base model's directory (model.path): transformers would load "
                          "the adapter written there with the base from then on; choose another output.dir")
    _check_paths(run_dir)
    if not run_dir.is_dir():
        return ()
    if (pid := _lock_holder(run_dir)) is not None:
        raise _in_use(run_dir, pid)
    seen = contents(run_dir)
    if overwrite:
        return seen
    if (run_dir / RUN_CONFIG).is_file():
        _check_identity(read_config_json(run_dir / RUN_CONFIG), cfg, run_dir)
    latest = checkpoint_dirs(run_dir)
    if latest and not resume:
        raise ConfigError(f"output.dir={run_dir} already holds a run (up to {latest[-1].name}): pass --resume to "
                          "continue it, or --overwrite to start over")
    finished = next((name for name in (ADAPTER_WEIGHTS, FULL_WEIGHTS) if (run_dir / name).exists()), None)
    if finished and not latest:  # its checkpoints deleted to save space, or a checkpoint's own folder
        raise ConfigError(f"output.dir={run_dir} holds a trained {finished} and no checkpoint to continue from: use "
                          "another output.dir, or --overwrite to replace it")
    return seen


# Where a file lies is no setting a checkpoint fixes: a base or a data file moved is pointed at in run_config.json.
MOVABLE = ("model.path",)


def check_recorded(saved: Config, path: Path, run_dir: Path | None = None, movable: tuple = MOVABLE) -> None:
    """Refuse a run_config.json (`path`, read as `saved`) edited since the newest checkpoint of `run_dir` (its own
    directory; or a checkpoint-N) was written: a key removed (its default would stand in), or a value the checkpoints
    fix changed (measured on the tiny recipe: train.seed edited from 0 to 7, or train.lr removed, resumed without a
    word at another data order, or at lr 2e-4 instead of 3e-3; quant.double_quant edited to false, qlora.eval scored
    the adapter on another base, 4.0106 for 4.0087). Each checkpoint records the settings it was written under; one
    written before that is not checked. The keys in `movable` may differ (a resume holds data.train and data.eval to
    the run's; the weights and the row counts are checked on their own)."""
    ckpt, record = recorded(run_dir or path.parent, "config")
    if not isinstance(record, dict):
        return
    ours, theirs, raw = _flat(saved.to_dict()), _flat(record), _flat(json.loads(path.read_text()))
    missing = [k for k in theirs if k not in raw and k in ours]
    if missing:
        k = missing[0]
        raise ConfigError(f"{path} lacks {k}, which {ckpt.name} was written with ({theirs[k]!r}): the default would "
                          f"stand in; restore {k} in {RUN_CONFIG} to use the run, or start a new run with "
                          "--overwrite")
    fixed = [*IDENTITY, *FIXED_ON_RESUME, *(["data.max_seq_len"] if theirs.get("data.pack") else [])]
    for k in fixed:
        if k in theirs and k in ours and k not in movable and theirs[k] != ours[k]:
            raise ConfigError(f"{path} has {k}={ours[k]!r}, but {ckpt.name} was written with {theirs[k]!r}, which the "
                              f"checkpoints fix: restore {k} in {RUN_CONFIG} (or, if {ckpt.name} came from another "
                              "run, move it away) to use the run, or start a new run with --overwrite")


def resume_config(cfg: Config, overrides: list[str]) -> Config:
    """The config `--resume` continues with: the run's run_config.json, changed by the command line's overrides where
    the rules above allow (said in one line); `cfg` (recipe and overrides) if the directory holds no run yet."""
    run_dir = Path(cfg.output.dir)
    path = run_dir / RUN_CONFIG
    if not path.is_file():  # one that is no file is check_run_dir's to name
        if not (path.exists() or path.is_symlink()) and checkpoint_dirs(run_dir):  # a cut-short --overwrite?
            raise ConfigError(f"{run_dir} holds checkpoints but no {RUN_CONFIG}, so which run they continue cannot be "
                              f"checked: restore {RUN_CONFIG}, or start over with --overwrite")
        return cfg
    saved = resolve_paths(read_config_json(path))  # a run written before its paths were absolute: from here
    check_recorded(saved, path)
    _check_identity(saved, cfg, run_dir)
    resumed = copy.deepcopy(saved)
    if saved.train.plan == "fastest" and [item.split("=", 1)[1] for item in overrides
                                          if override_key(item) == "train.plan"][-1:] == ["recipe"]:
        # plan_keep (which the first command line filled) and plan_batch steer a plan, and are refused without one:
        # they go with it, and the run goes on with the levers the plan chose, as its run_config.json records them.
        resumed.train.plan_keep, resumed.train.plan_batch = [], False
    resumed = resolve_paths(apply_overrides(resumed, overrides))
    resumed.output.dir = cfg.output.dir  # the directory being resumed, wherever it was first written
    before, after, recipe = _flat(saved.to_dict()), _flat(resumed.to_dict()), _flat(cfg.to_dict())
    changed = [k for k in after if after[k] != before[k] and k != "output.dir"]
    fixed = [k for k in changed if k in FIXED_ON_RESUME or (k == "data.max_seq_len" and after["data.pack"])]
    if fixed and checkpoint_dirs(run_dir):
        k = fixed[0]
        raise ConfigError(f"--resume cannot change {k} ({before[k]!r} -> {after[k]!r}): it fixes "
                          f"{FIXED_ON_RESUME.get(k, PACKED)}; drop --{k} to continue the run, or start a new run with "
                          "--overwrite or another output.dir")
    # What the plan chose is the run's, and planned again from the recipe's values (qlora/memory/plan.py, unplanned).
    planned = {"train.plan_chose", "train.plan_from"} | ({override_key(item) for item in saved.train.plan_from}
                                                         if resumed.train.plan == "fastest" else set())
    ignored = [f"{k}={recipe[k]!r} (the run has {after[k]!r})" for k in recipe
               if recipe[k] != after[k] and k != "output.dir" and k not in planned]
    line = f"resuming {run_dir} with the settings in its {RUN_CONFIG}"
    if changed:
        line += "; changed on the command line: " + ", ".join(f"{k} {before[k]!r} -> {after[k]!r}" for k in changed)
    if ignored:
        line += "; the recipe's own values are not used: " + ", ".join(ignored)
    print(line)
    return resumed


def _lock(run_dir: Path) -> None:
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = (run_dir / LOCK).read_text().strip() or "unknown"
        os.close(fd)
        raise _in_use(run_dir, pid) from None
    except OSError as err:
        os.close(fd)
        if err.errno in NO_LOCKS:
            return  # the run goes on unguarded rather than not at all
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[run_dir.resolve()] = fd


def unlock(run_dir: Path) -> None:
    """Release the lock `start_run` took (a process that ends releases it anyway)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def aside_name(path: Path) -> Path:
    """A free name beside `path` for a damaged checkpoint kept for inspection: checkpoint-8.damaged(-2, ...)."""
    target, n = path.with_name(f"{path.name}.damaged"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    return target


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back until the block ends, then delivered as they would have been."""
    heard: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: heard.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in heard[:1]:
            signal.raise_signal(sig)


def start_run(run_dir: Path, cfg: Config, overwrite: bool, seen: tuple, damaged: list[Path] | tuple = ()) -> None:
    """The first write of a run, once every input is validated: take the lock, check that the directory still holds
    what `check_run_dir` saw (`seen`), clear a replaced run, set damaged checkpoints aside, remove this code's own
    leftovers, record the config."""
    try:
        # Ctrl-C or SIGTERM in here would leave half of a replaced run: they wait for the new run_config.json.
        with deferred_signals():
            run_dir.mkdir(parents=True, exist_ok=True)
            _lock(run_dir)
            # The lock is taken only now, the base and data loaded: a trainer started meanwhile on the same directory
            # may have written to it, and what was checked (its run, its checkpoints) no longer holds.
            if contents(run_dir) != seen:
                raise ConfigError(f"output.dir={run_dir} changed while this run loaded: another trainer wrote to it. "
                                  "Nothing was written: check what it holds, then run the command again")
            if overwrite:  # run_config.json last: until it goes, what is left is the old run, resumable as it was
                for path in sorted(run_dir.iterdir(), key=lambda p: p.name == RUN_CONFIG):
                    if RUN_DIRS.match(path.name):
                        remove_checkpoint(path)
                    elif path.name in RUN_FILES:
                        path.unlink()
            for path in damaged:
                os.replace(path, aside_name(path))  # out of the checkpoint names: never resumed, pruned or overwritten
            for path in run_dir.iterdir():
                if LEFTOVER.match(path.name):  # a link is removed, never what it points at
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            tmp = run_dir / f".tmp-{RUN_CONFIG}"
            tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            os.replace(tmp, run_dir / RUN_CONFIG)
    except OSError as err:
        unlock(run_dir)
        if err.errno in DISK_FULL:
            raise  # not the user's choice of directory: reported as a full disk, exit 5
        raise ConfigError(f"output.dir={run_dir} cannot be written ({err.strerror or err}): choose another "
                          "output.dir") from err
    except BaseException:
        unlock(run_dir)
        raise

