"""What ends a run early, and how: SIGINT/SIGTERM, non-finite steps, weights or held-out losses, out of memory.

Each ends in a `qlora.errors.Stop` carrying its exit status (listed in qlora/errors.py) and the message to print
(docs/failures.md). SIGINT and SIGTERM in the loop let the step in flight finish and save a checkpoint. What an
out-of-memory stop says (the phase, the memory, what would fit) is qlora/training/oom.py's.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from qlora.adapters.lora import lora_layers
from qlora.config import Config
from qlora.data.batches import batch_rows
from qlora.errors import EXIT_NONFINITE, EXIT_OOM, EXIT_PEER, Session, Stop, stopping_signals
from qlora.training.checkpoint import list_checkpoints
from qlora.training.loss import eval_stats
from qlora.training.oom import latest_checkpoint, oom_report, out_of_host_memory
from qlora.training.rundir import aside_name

# The run's last phase, after its final evaluation: the adapter and memory.json are written, and nothing is left to
# stop (the last step's checkpoint is written too). A signal then lets the run end, done; a second stops it at once.
FINAL_SAVE = "saving the adapter"


class RunGuard:
    """One run's watch: turns SIGINT/SIGTERM into a flag the loop checks between steps, and an out-of-memory error
    anywhere in the run into a `Stop` carrying the memory profile of the phase in flight and what would fit."""

    def __init__(self, cfg: Config, main: bool = True, replacing: bool = False, several: bool = False) -> None:
        self.cfg = cfg
        self.main = main  # the process that speaks for the run (rank 0 of several)
        self.several = several  # one of several processes: a collective another broke ends it exit 6 (launch.joined)
        self.replacing = replacing  # --overwrite, until start_run clears the old run: its checkpoints aren't this run's
        self.signal: int | None = None
        self.phase, self.step, self.batch_shape = "loading the model", 0, None
        self.device, self.profiler = torch.device("cpu"), None
        self.rows = None  # the run's training and held-out rows, once loaded: which data.max_seq_len keeps them
        self.bar = None  # the loop's progress bar: closed (its line ended) before any line that ends the run
        self._previous: dict[int, object] = {}
        self._stdout = None  # sys.stdout before catch_signals watched it

    def __enter__(self) -> RunGuard:
        return self

    def __exit__(self, kind: type | None, err: BaseException | None, tb: object) -> None:
        if self.several and err is not None and broken_collective(err):
            # Its ending is decided (launch.joined says which: exit 6, or what the rank that ended posted). torchrun
            # stops what is left of a run whose process died with SIGTERM, which may come once the handlers are
            # handed back and before joined's line: it took the ending's place ("stopped by SIGTERM; checkpoint-2 is
            # intact", exit 143: a fresh clone's CI, and 1 of 7 tries here). Ignored from here (qlora/cli.py).
            Session.ended = EXIT_PEER
        self.release_signals()
        if self._stdout is not None:
            sys.stdout, self._stdout = self._stdout, None
        if self.bar is not None:
            self.bar.close()
        if isinstance(err, torch.OutOfMemoryError) or out_of_host_memory(err):
            raise Stop(EXIT_OOM, oom_report(err, self.cfg, self.device, self.phase, self.step, self.batch_shape,
                                            self.profiler, self.rows, self.replacing)) from err

    def catch_signals(self) -> None:
        """From here on, SIGINT and SIGTERM ask the loop to stop after the step in flight; so do SIGHUP (the terminal
        closed: an ssh session lost) unless it is ignored (`nohup`), and stdout's reader leaving (SIGPIPE: `| head`,
        a `tee` that was killed)."""
        # One that came while a library was loading, and that the library caught and went on from, is not lost.
        self.signal = self.signal or Session.signal
        if self._stdout is None:
            self._stdout, sys.stdout = sys.stdout, WatchedStdout(sys.stdout, self)
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for sig in stopping_signals():
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def release_signals(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signal = signum
        self.release_signals()  # a second Ctrl-C or SIGTERM acts at once; checkpoints are atomic, so that is safe
        if self.main:  # said once for the run, not by every process
            # A step of a large model takes minutes: say at once that the signal was heard. os.write, not print: the
            # handler runs between two bytecodes of the main thread, perhaps inside a print to the same stream.
            name = signal.Signals(signum).name
            said = f"stopping after the step in flight, with a checkpoint ({name} again stops at once)"
            if self.phase == FINAL_SAVE:  # it said that, then ended 0 with the adapter written
                said = (f"the run is done but for writing its adapter and memory.json: it ends when they are written, "
                        f"exit 0 ({name} again stops at once, and --resume then writes them)")
            with contextlib.suppress(OSError):  # after SIGHUP the terminal is gone: EIO
                os.write(2, f"\n{name}: {said}\n".encode())

    def stopped_by_signal(self, step: int, saved: Path | None) -> Stop:
        """The stop for the signal heard. Its ending is decided: a signal met as it unwinds is ignored (qlora/cli.py),
        not raised in its place (kill -9 of torchrun: rank 0 stopped for the SIGTERM another rank passed on, its own
        launcher watch's came as it unwound, and the line became "stopped by SIGTERM; checkpoint-5 is intact")."""
        Session.ended = 128 + self.signal
        name = signal.Signals(self.signal).name
        if saved is None:
            return Stop(128 + self.signal, f"stopped by {name} before the first step; no checkpoint was written: "
                                           "run the command again to start")
        return Stop(128 + self.signal, f"stopped by {name} after step {step}; {saved} holds it: continue with "
                                       "--resume")

    def at(self, phase: str, step: int, micro: list[dict[str, torch.Tensor]] | None = None) -> None:
        """Name the phase in flight, for the report if it runs out of memory."""
        self.phase, self.step = phase, step
        # the step's longest micro-batch: the one its memory and the report's suggestions scale with
        self.batch_shape = max((tuple(b["input_ids"].shape) for b in micro), key=lambda s: s[1]) if micro else None


class WatchedStdout:
    """sys.stdout while the loop runs. A write or flush that finds its reader gone (BrokenPipeError) ends a command at
    once elsewhere (qlora/cli.py); a run would lose every step since its last checkpoint (measured: killed at step 5 of
    12 with save_every=4, exit 141, no line said what was kept). Here it asks the loop to stop after the step in
    flight, with a checkpoint, as a SIGPIPE (exit 141); stdout is /dev/null from then, so no later line fails. A
    terminal that was closed (EIO after a SIGHUP) is gone the same way."""

    def __init__(self, stream: object, watch: RunGuard) -> None:
        self.stream, self.watch = stream, watch

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as err:
            self._reader_gone(err)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as err:
            self._reader_gone(err)

    def _reader_gone(self, err: OSError) -> None:
        if err.errno not in (errno.EPIPE, errno.EIO):
            raise err
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self.stream.fileno())  # what the stream still holds is flushed there, at exit too
        os.close(null)
        self.watch.signal = self.watch.signal or (signal.SIGPIPE if err.errno == errno.EPIPE else signal.SIGHUP)

    def __getattr__(self, name: str) -> object:  # fileno, isatty, encoding, ...: the stream's own
        return getattr(self.stream, name)


def broken_collective(err: BaseException) -> bool:
    """Whether `err` is a collective that another process broke, by dying or hanging (of a process of several)."""
    return isinstance(err, dist.DistError) or "gloo/" in str(err)  # gloo raises plain RuntimeErrors; NCCL, DistError


def finite(loss: float, grad_norm: torch.Tensor) -> bool:
    """Whether a step may be applied: its loss and its gradients' total norm (inf/nan if any gradient is) finite."""
    return math.isfinite(loss) and bool(torch.isfinite(grad_norm))


def all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every trainable weight is finite: checked after each update, so no checkpoint or adapter holds nan."""
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


@torch.no_grad()
def finite_held_out(model: torch.nn.Module, batch: dict[str, torch.Tensor], adapters: bool = True,
                    chunk_size: int = 0) -> bool:
    """Whether the model as it stands gives a finite loss on a held-out batch: after a run of non-finite steps, tells
    an adapter that diverged (every batch fails) from rows that did. `adapters=False`: the base alone (each LoRA
    layer's scaling 0 for the call; its weights are finite, checked after every update), which tells a base that gives
    nan (with train.eval_before=false nothing else would have) from an adapter that does."""
    was_training = model.training
    layers = [] if adapters else list(lora_layers(model).values())
    scalings = [layer.scaling for layer in layers]
    model.eval()
    try:
        for layer in layers:
            layer.scaling = 0.0
        return math.isfinite(eval_stats(model, batch, chunk_size)[0])
    finally:
        for layer, scaling in zip(layers, scalings, strict=True):
            layer.scaling = scaling
        model.train(was_training)


def _newest(cfg: Config, then: str) -> str:
    """Where a run stopped for its numbers stands: the newest checkpoint and how to go on from it. If that one has
    diverged too, an earlier one (train.save_every, train.keep_checkpoints > 1) is resumed once the newest is set aside
    (_after_last_step); --overwrite, which the line offered for that case alone, deletes it with the rest."""
    found = list_checkpoints(Path(cfg.output.dir))
    if not found:
        return "No checkpoint was written: start again with a lower train.lr (--overwrite)"
    line = f"{found[-1]} is the newest checkpoint: {then} with --resume and a lower train.lr"
    if len(found) < 2:
        return line + ", or start again with --overwrite if that one has diverged too"
    return (line + f"; if it has diverged too, set it aside ({_move_aside(found[-1])}) and continue from "
            f"{found[-2].name} the same way, or start again (--overwrite, which deletes every checkpoint)")


def _move_aside(newest: Path) -> str:
    """The command that renames `newest` out of the checkpoint names, as a damaged one is (never resumed or pruned)."""
    return f"mv {shlex.quote(str(newest))} {shlex.quote(str(aside_name(newest)))}"


def _after_last_step(cfg: Config) -> str:
    """How to go on from an adapter that fails the final evaluation. The last step's checkpoint holds that very adapter:
    resuming it would only evaluate it again. An earlier one (train.save_every, train.keep_checkpoints > 1) is resumed
    once the newest is renamed out of the checkpoint names, as a damaged one is (rundir.aside_name); --overwrite would
    delete it with the rest (measured on the tiny recipe: checkpoint-4 renamed checkpoint-4.damaged, --resume
    --train.lr=1e-3 resumed from checkpoint-2 and wrote the adapter)."""
    found = list_checkpoints(Path(cfg.output.dir))
    if len(found) < 2:
        return "Start again with a lower train.lr (--overwrite)"
    return (f"{found[-1]} holds this adapter, {found[-2]} an earlier one: set the newest aside "
            f"({_move_aside(found[-1])}) and continue from {found[-2].name} with --resume and a lower train.lr, or "
            "start again with a lower train.lr (--overwrite, which deletes every checkpoint)")


def _base_fix(cfg: Config, saved: str = "") -> str:
    """How to go on from a base that gives non-finite logits: another model.path is another run (--overwrite, `saved`
    saying why where there is something to say); fp32 compute, where the overflow was the compute dtype's, continues
    the newest checkpoint with --resume where there is one, which --overwrite would delete."""
    latest = latest_checkpoint(cfg)
    if latest is None:
        return "check model.path, or try --quant.compute_dtype=fp32, then start again with --overwrite" + saved
    return (f"try --quant.compute_dtype=fp32 and continue from {latest} with --resume, or check model.path and start "
            "again with --overwrite" + saved)


def non_finite_weights(cfg: Config, step: int) -> Stop:
    return Stop(EXIT_NONFINITE, f"stopped at step {step}: its update left trainable weights nan or inf (train.lr="
                                f"{cfg.train.lr:g} is too high for them), and nothing of it was saved. "
                                + _newest(cfg, "continue from it"))


def non_finite_eval(cfg: Config, step: int, loss: float, base_fails: bool = False) -> Stop:
    """`base_fails`: the held-out loss is non-finite with the adapters switched off too."""
    if base_fails:
        return Stop(EXIT_NONFINITE, f"stopped at step {step}: the held-out loss is {loss}, and it stays so with the "
                                    "adapters switched off: the base model gives non-finite logits (nan or inf in its "
                                    f"weights, or an overflow in quant.compute_dtype={cfg.quant.compute_dtype}): "
                                    + _base_fix(cfg))
    if step == 0:
        return Stop(EXIT_NONFINITE, f"the held-out loss before training is {loss}: the base model gives non-finite "
                                    f"logits on the held-out data (nan or inf in its weights, or an overflow in "
                                    f"quant.compute_dtype={cfg.quant.compute_dtype}): check model.path, or try "
                                    "--quant.compute_dtype=fp32")
    # Each sentence begins capitalised where it is written: one that begins with a relative output.dir is a path
    # (upper-casing its first letter named 'Runs/tiny/checkpoint-2', a folder that is not there).
    then = _after_last_step(cfg) if step >= cfg.train.steps else _newest(cfg, "continue from it")
    return Stop(EXIT_NONFINITE, f"stopped at step {step}: the held-out loss is {loss} although every trainable weight "
                                "is finite: the adapter has diverged (or the forward overflows in quant.compute_dtype="
                                f"{cfg.quant.compute_dtype}); it is not written as the result. " + then)


def diverged(cfg: Config, step: int, bad_steps: int, where: str, base_fails: bool = False) -> Stop:
    if base_fails:
        return Stop(EXIT_NONFINITE, f"stopped at step {step}: {bad_steps} steps with a non-finite loss or gradient, "
                                    f"the last in {where}, and a held-out batch fails even with the adapters switched "
                                    "off: the base model gives non-finite logits (nan or inf in its weights, or an "
                                    f"overflow in quant.compute_dtype={cfg.quant.compute_dtype}): "
                                    + _base_fix(cfg, " (what this run saved trained on that base)"))
    return Stop(EXIT_NONFINITE, f"stopped at step {step}: {bad_steps} steps with a non-finite loss or gradient, the "
                                f"last in {where}, and a held-out batch fails too: the adapter itself has diverged "
                                f"(train.lr={cfg.train.lr:g} is too high), so no checkpoint was written of it. "
                                + _newest(cfg, "continue from it"))


def too_many_bad_steps(step: int, bad_steps: int, limit: int, where: str, saved: Path) -> Stop:
    return Stop(EXIT_NONFINITE, f"stopped at step {step}: {bad_steps} steps with a non-finite loss or gradient, "
                                f"more than train.max_bad_steps={limit}; the last in {where}. {saved} holds the run "
                                "without their updates: check those rows, lower train.lr or raise "
                                "train.max_bad_steps, then continue with --resume")


def nothing_trained(steps: int) -> Stop:
    """Every step of the run was skipped: it ended within train.max_bad_steps with the adapter it started with, which
    a run reported as done (measured: --lora.alpha=1e30 --train.steps=2, both steps non-finite, exit 0)."""
    return Stop(EXIT_NONFINITE, f"all {steps} steps had a non-finite loss or gradient and were skipped (the lines "
                                "above name their rows): the adapter never changed and none is written. Check those "
                                "rows, lower train.lr or lora.alpha, and start again with --overwrite")


def data_position(first_index: int, count: int, n_examples: int, batch_size: int, seed: int) -> str:
    """Micro-batches first_index .. first_index+count-1, and the training-split rows in them."""
    indices = range(first_index, first_index + count)
    rows = sorted(r for i in indices for r in batch_rows(n_examples, batch_size, seed, i))
    span = f"micro-batch {first_index}" if count == 1 else f"micro-batches {first_index}-{indices[-1]}"
    return f"{span} (rows {', '.join(map(str, rows))} of the training split)"
