"""Where a run stands, and how it is shown: the progress a checkpoint carries over to the process that resumes it
(`resume_progress` reads it back; `same_rows` refuses rows other than the run's), and the loop's progress bar, which
shows each step on a terminal, or in a log a line per tenth of the run.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from qlora.adapters.lora import ADAPTER_CONFIG
from qlora.config import Config
from qlora.console import announce, draws_bars, terminal_columns, widest_meter
from qlora.errors import OVERWRITE_ON_RESUME, ConfigError
from qlora.training import checkpoint, distributed, restore, rundir
from qlora.training.metrics import last_row
from qlora.training.optimizer import restart_from_weights, retarget
from qlora.training.runconfig import CONFIG, MOVABLE, MOVED_DATA, flat


@dataclass
class Progress:
    """Where the run stands: what a checkpoint carries over to the process that resumes it."""

    step: int = 0
    first_eval: dict = field(default_factory=dict)
    """The held-out scores before training, for the closing "before -> after" line."""
    bad_steps: int = 0
    state: dict = field(default_factory=dict)
    """The resumed checkpoint's trainer state (data position, metrics length, RNG), or empty."""

    @property
    def ran(self) -> dict:
        """The train settings the resumed checkpoint was written under ({} for one written before they were recorded):
        its step ran under them, whatever a resume changes from there."""
        return self.state.get("config", {}).get("train", {})

    @property
    def ended(self) -> bool:
        """Whether the resumed checkpoint was written at the last step of its run's train.steps: the evaluation there
        was that run's final one, written after the checkpoint, and its training line was logged for being the last."""
        return self.step > 0 and self.ran.get("steps") == self.step


def resume_progress(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LambdaLR,
                    ranks: distributed.Ranks) -> tuple[Progress, list[Path]]:
    """Load the newest intact checkpoint into the model, optimizer and scheduler (damaged newer ones are named and,
    once the run starts writing, set aside); the progress it carries and the damaged checkpoints."""
    run_dir = Path(cfg.output.dir)
    resumed, state, damaged = restore.resume_latest(run_dir, model, cfg, optimizer, scheduler)
    for path, why in damaged if ranks.main else ():
        print(f"{path} is damaged ({why}): it is set aside as {rundir.aside_name(path).name} for inspection",
              file=sys.stderr)
    if resumed is None:
        print(f"no checkpoint in {run_dir} yet: starting at step 0")
        return Progress(state=state), [p for p, _ in damaged]
    progress = Progress(state["step"], state.get("first_eval", {}), state.get("bad_steps", 0), state)
    if progress.step > cfg.train.steps:
        raise ConfigError(f"train.steps={cfg.train.steps} is below step {progress.step}, where {resumed} stands: "
                          f"set --train.steps={progress.step} or more to continue")
    ranks.restore_rng(state, cfg.lora.dropout > 0)
    print(f"resumed from {resumed} at step {progress.step}" + (" (the newest usable checkpoint)" if damaged else ""))
    if "optimizer_restarted" in state:  # cfg's optimizer, fresh; its fp32 masters from the resumed weights
        restart_from_weights(optimizer)
        print(f"train.optimizer {state['optimizer_restarted']} -> {cfg.train.optimizer}: its state starts afresh")
    retarget(optimizer, scheduler, cfg)
    return progress, [p for p, _ in damaged]


def finished(cfg: Config) -> tuple[bool, list[str]]:
    """Whether `--resume` has nothing left to do in the run (`said_done` says it), and what its command line changes
    from the newest checkpoint's settings, which no step is left to act on (`said_done` refuses them). Its end writes,
    after the last checkpoint: the final evaluation's row in metrics.jsonl, the weights file (of that step, in its
    header), then memory.json. A run killed before memory.json, or extended past that step and stopped before it ended
    again, is not finished; nor is one whose run_config.json alone differs from what this resume would write (a resume
    to more steps cut short before its first checkpoint, now resumed to its own steps: the resume writes its end
    again), or that is given a moved file (run_config.json then records where it is). A run copied without its files'
    times (memory.json then perhaps older than the weights) is taken for unfinished, and its end written again."""
    run_dir, steps = Path(cfg.output.dir), cfg.train.steps
    kept, weights = checkpoint.list_checkpoints(run_dir), run_dir / checkpoint.weights_file(cfg)
    if not kept or kept[-1] != checkpoint.checkpoint_dirs(run_dir)[-1] or kept[-1].name != f"checkpoint-{steps}":
        return False, []
    row, state = last_row(run_dir / checkpoint.METRICS), restore.trainer_state(kept[-1])
    try:  # memory.json gone, a file unreadable: not finished, and the resume rewrites or names it
        done = row is not None and row["step"] == steps and "eval_loss" in row and state is not None \
            and checkpoint.weights_step(weights) == steps \
            and (cfg.quant.method == "full" or (run_dir / ADAPTER_CONFIG).is_file()) \
            and (run_dir / rundir.MEMORY).stat().st_mtime_ns >= weights.stat().st_mtime_ns
        same = done and _same_run_config(run_dir / checkpoint.RUN_CONFIG, cfg)
    except (OSError, ValueError):
        return False, []
    asked = _asked(cfg, state.get("config", {})) if done else []
    return done and (same or bool(asked)), asked


# Where a file lies, and how long the run is (train.steps at the checkpoint's step, checked by `finished`), are no
# change a finished run refuses: a resume that gives them writes run_config.json anew.
PLACES = ("output.dir", "train.steps", *MOVABLE, *MOVED_DATA, CONFIG)


def _asked(cfg: Config, ran: dict) -> list[str]:
    """What `cfg` changes from `ran`, the settings the newest checkpoint was written under, said as resume_config
    says it (`train.lr 0.003 -> 1e-05`); none for a checkpoint written before they were recorded."""
    ours, theirs = flat(cfg.to_dict()), flat(ran)
    return [f"{k} {theirs[k]!r} -> {ours[k]!r}" for k in ours if k in theirs and ours[k] != theirs[k]
            and k not in PLACES]


def said_done(cfg: Config, ranks: distributed.Ranks, done: tuple[bool, list[str]]) -> bool:
    """Whether every process of the run found it finished (`done`: this one's `finished`; several, joined), said once
    if so; refused (ConfigError) where every one is given the same change of settings, which no step is left to act
    on (measured on the tiny recipe: --resume --train.lr=1e-5 of a finished 4-step run loaded the base, trained
    nothing, rewrote its adapter, memory.json and a run_config.json that said lr 1e-05, and ended 0). Each deciding
    alone, before joining, one that found it finished ended 0 and the others waited train.dist_timeout for it, then
    ended 6 with pages of c10d's traces (tried: rank 1 given --train.lr=1e-3, which joined is refused in one line
    naming it). Where one does not, or they differ in what they change, all go on, as the resume of a run not
    finished (and another machine's output.dir is refused by check_same_checkpoints)."""
    every = ranks.gathered(done) if ranks.several else [done]
    if not all(ended for ended, _ in every) or any(asked != every[0][1] for _, asked in every):
        return False
    run_dir, steps, asked = Path(cfg.output.dir), cfg.train.steps, every[0][1]
    what = "adapter is" if cfg.quant.method != "full" else "trained weights are"
    where = f"{run_dir} has finished, at step {steps} of {steps}"
    further = f"to train it further: --resume --train.steps=N, N > {steps}"
    if asked:
        raise ConfigError(f"{where}, so no step is left for the command line's {', '.join(asked)} to act on; nothing "
                          f"was loaded or written ({further}, with {'it' if len(asked) == 1 else 'them'})")
    print(f"{where}: its {what} {run_dir / checkpoint.weights_file(cfg)}; nothing was loaded or written ({further})")
    return True  # printed once: the other ranks print nothing of their own (launch.quiet)


def _same_run_config(path: Path, cfg: Config) -> bool:
    """Whether the run_config.json at `path` holds `cfg`: what a resume would write there, but output.dir (a run moved
    since it was written is resumed where it is now)."""
    recorded, ours = json.loads(path.read_text(encoding="utf-8")), json.loads(rundir.config_text(cfg))
    recorded.get("output", {}).pop("dir", None)
    ours["output"].pop("dir")
    return recorded == ours


def same_rows(cfg: Config, state: dict, n_train: int, n_eval: int, sha256: list) -> None:
    """Refuse to resume on other rows than the checkpoint's: the batch order and the held-out split are functions of
    the row count (data.batches.batch_rows), so a row more or less reorders the rest of the epoch and changes what the
    losses before and after compare. A shorter data.max_seq_len drops the rows whose learned part it cuts off. The
    rows' fingerprints (`sha256`, of data.train's and data.eval's rows as read) tell a data file moved since
    (runconfig.resume_config) from another of as many rows; a checkpoint written before them has the counts alone."""
    ran, recorded = state.get("config", {}).get("data", {}), state.get("rows_sha256")
    moved = [k for k in ("train", "eval") if ran.get(k, getattr(cfg.data, k)) != getattr(cfg.data, k)]
    for key, was, now in zip(("train", "eval"), recorded or [], sha256, strict=False):
        if was != now:
            old, new = ran.get(key), getattr(cfg.data, key)
            than, fix = (f"{old}, which the run trained on", f"resume with --data.{key} at the file {old} moved to") \
                if key in moved else ("when the run trained on it", "restore the file to resume")
            raise ConfigError(f"data.{key}={new} holds other rows than {than} (their sha256 differs): {fix}, or start "
                              f"a new run with {OVERWRITE_ON_RESUME} or another output.dir")
    if "rows" in state and not recorded and moved:
        print(f"the checkpoint holds no fingerprint of its rows (written before they were recorded): data.{moved[0]}="
              f"{getattr(cfg.data, moved[0])} is taken for the run's file, moved, by its row counts alone")
    rows = state.get("rows")
    if rows is None or rows == [n_train, n_eval]:  # a fresh run, or a checkpoint written before rows were recorded
        return
    raise ConfigError(f"the data now gives {n_train} training and {n_eval} held-out rows, the run trained on "
                      f"{rows[0]} and held out {rows[1]}: a data file changed, or data.max_seq_len="
                      f"{cfg.data.max_seq_len} keeps other rows than the run's length did (a row whose learned part "
                      "lies beyond it is dropped), which would reorder the rest of the epoch and the held-out set; "
                      "resume with the run's data and a data.max_seq_len that keeps the same rows (its "
                      "run_config.json has the one it trained with), or start a new run")


def progress_bar(cfg: Config, step: int, ranks: distributed.Ranks) -> tqdm:
    """Rank 0's bar, or in a log a line per tenth of the run (the bar's frames would be noise there); loss and
    tokens/s are the global batch's. A terminal narrower than the bar's own figures gets the lines too: tqdm cuts its
    line at the edge, and on 20 columns `10/300` read `10/30`."""
    t = cfg.train
    desc = "train" if not ranks.several else f"train ({ranks.size} processes)"
    bar = tqdm(total=t.steps, initial=step, desc=desc, dynamic_ncols=True,
               disable=not (ranks.main and draws_bars(sys.stderr, widest_meter(t.steps, desc))))
    if bar.disable and step < t.steps:  # resumed after its last step (stopped in the final evaluation): none
        left, rows = t.steps - step, t.batch_size * t.grad_accum * ranks.size
        announce(f"training {left} step{'s' * (left != 1)} of {rows} row{'s' * (rows != 1)}")
    return bar


def show_step(bar: tqdm, last: dict, steps: int, began: tuple[int, float]) -> None:
    """The step on the bar, or every tenth of the run a line with the same figures. Its time left, as the bar's, is
    from this process's steps so far (`began`: the first and when; evaluations and checkpoints count, loading not):
    the lines had none, and a run in a log said nothing of when it would end."""
    if not bar.disable:  # shown with the step's count: set_postfix's own redraw paired it with the step before
        fields = [f"loss={last['loss']:.4f}", f"lr={last['lr']:.2e}", f"tok_s={last['tokens_per_s']:.0f}",
                  f"mem={last['peak_gib']:.2f}G"]
        bar.set_postfix_str(_fitting(bar, fields, terminal_columns(sys.stderr)), refresh=False)
    bar.update(1)
    step = last["step"]
    if bar.disable and (step % max(1, steps // 10) == 0 or step == steps):
        first, started = began
        left = (time.perf_counter() - started) / (step - first) * (steps - step)
        print(f"step {step}/{steps}: loss {last['loss']:.4f}, lr {last['lr']:.2e}, "
              f"{last['tokens_per_s']:.0f} tokens/s, peak {last['peak_gib']:.2f} GiB, {tqdm.format_interval(left)} "
              "left", flush=True)


def _fitting(bar: tqdm, fields: list[str], columns: int) -> str:
    """The leading `fields` that fit whole beside the bar's own figures (after its next update) on a terminal `columns`
    wide. tqdm cuts its line at the edge, mid-number: on 80 columns `mem=0.09G` read `mem=0.0` and tokens/s was gone,
    on 90 `tok_s=` had no number."""
    meter = {**bar.format_dict, "n": bar.n + 1, "ncols": None, "bar_format": "{l_bar}{r_bar}"}
    for k in range(len(fields), 0, -1):
        postfix = ", ".join(fields[:k])
        if len(tqdm.format_meter(**{**meter, "postfix": postfix})) < columns:  # and a column of bar
            return postfix
    return ""
