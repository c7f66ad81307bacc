"""What ends a run early, and how: SIGINT/SIGTERM, non-finite steps, weights or held-out losses, out of memory.

Each ends in a `qlora.errors.Stop` carrying its exit status (listed in qlora/errors.py) and the message to print
(docs/failures.md). SIGINT and SIGTERM in the loop let the step in flight finish and save a checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path

import torch

from qlora.adapters.lora import lora_layers
from qlora.config import Config
from qlora.data.batches import batch_rows
from qlora.errors import EXIT_NONFINITE, EXIT_OOM, Session, Stop
from qlora.memory.preflight import divisors
from qlora.memory.profiler import meminfo_bytes, resident_bytes
from qlora.training.checkpoint import list_checkpoints
from qlora.training.loss import eval_stats

HEADROOM = 0.95  # suggestions aim under 95% of the device: the allocator fragments, and estimates are estimates
GIB = 2**30


class RunGuard:
    """One run's watch: turns SIGINT/SIGTERM into a flag the loop checks between steps, and an out-of-memory error
    anywhere in the run into a `Stop` carrying the memory profile of the phase in flight and what would fit."""

    def __init__(self, cfg: Config, main: bool = True) -> None:
        self.cfg = cfg
        self.main = main  # the process that speaks for the run (rank 0 of several)
        self.signal: int | None = None
        self.phase, self.step, self.batch_shape = "loading the model", 0, None
        self.device, self.profiler = torch.device("cpu"), None
        self.bar = None  # the loop's progress bar: closed (its line ended) before any line that ends the run
        self._previous: dict[int, object] = {}
        self._stdout = None  # sys.stdout before catch_signals watched it

    def __enter__(self) -> RunGuard:
        return self

    def __exit__(self, kind: type | None, err: BaseException | None, tb: object) -> None:
        self.release_signals()
        if self._stdout is not None:
            sys.stdout, self._stdout = self._stdout, None
        if self.bar is not None:
            self.bar.close()
        if isinstance(err, torch.OutOfMemoryError) or out_of_host_memory(err):
            raise Stop(EXIT_OOM, oom_report(self, err)) from err

    def catch_signals(self) -> None:
        """From here on, SIGINT and SIGTERM ask the loop to stop after the step in flight; so do SIGHUP (the terminal
        closed: an ssh session lost) unless it is ignored (`nohup`), and stdout's reader leaving (SIGPIPE: `| head`,
        a `tee` that was killed)."""
        # One that came while a library was loading, and that the library caught and went on from, is not lost.
        self.signal = self.signal or Session.signal
        if self._stdout is None:
            self._stdout, sys.stdout = sys.stdout, WatchedStdout(sys.stdout, self)
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN:
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
            with contextlib.suppress(OSError):  # after SIGHUP the terminal is gone: EIO
                os.write(2, f"\n{name}: stopping after the step in flight, with a checkpoint ({name} again stops at "
                            "once)\n".encode())

    def stopped_by_signal(self, step: int, saved: Path | None) -> Stop:
        name = signal.Signals(self.signal).name
        if saved is None:
            return Stop(128 + self.signal, f"stopped by {name} before the first step; no checkpoint was written: "
                                           "run the command again to start")
        return Stop(128 + self.signal, f"stopped by {name} after step {step}; {saved} holds it: continue with "
                                       "--resume")

    def at(self, phase: str, step: int, micro: list[dict[str, torch.Tensor]] | None = None) -> None:
        """Name the phase in flight, for the report if it runs out of memory."""
        self.phase, self.step = phase, step
        self.batch_shape = tuple(micro[0]["input_ids"].shape) if micro else None


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


def out_of_host_memory(err: BaseException | None) -> bool:
    """CPU memory exhausted: Python's MemoryError, or PyTorch's CPU allocator refusing ("can't allocate memory")."""
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


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
    """Where a run stopped for its numbers stands: the newest checkpoint and how to go on from it."""
    latest = _latest(cfg)
    if latest is None:
        return "No checkpoint was written: start again with a lower train.lr (--overwrite)"
    return (f"{latest} is the newest checkpoint: {then} with --resume and a lower train.lr, or start again with "
            "--overwrite if that one has diverged too")


def non_finite_weights(cfg: Config, step: int) -> Stop:
    return Stop(EXIT_NONFINITE, f"stopped at step {step}: its update left trainable weights nan or inf (train.lr="
                                f"{cfg.train.lr:g} is too high for them), and nothing of it was saved. "
                                + _newest(cfg, "continue from it"))


def non_finite_eval(cfg: Config, step: int, loss: float, base_fails: bool = False) -> Stop:
    """`base_fails`: the held-out loss is non-finite with the adapters switched off too."""
    if base_fails:
        return Stop(EXIT_NONFINITE, f"stopped at step {step}: the held-out loss is {loss}, and it stays so with the "
                                    "adapters switched off: the base model gives non-finite logits (nan or inf in its "
                                    f"weights, or an overflow in quant.compute_dtype={cfg.quant.compute_dtype}): check "
                                    "model.path, or try --quant.compute_dtype=fp32, then start again with --overwrite")
    if step == 0:
        return Stop(EXIT_NONFINITE, f"the held-out loss before training is {loss}: the base model gives non-finite "
                                    f"logits on the held-out data (nan or inf in its weights, or an overflow in "
                                    f"quant.compute_dtype={cfg.quant.compute_dtype}): check model.path, or try "
                                    "--quant.compute_dtype=fp32")
    # After the last step, its checkpoint holds the very adapter that failed: resuming it would only evaluate it again.
    then = ("start again with a lower train.lr (--overwrite)" if step >= cfg.train.steps else
            _newest(cfg, "continue from it"))
    return Stop(EXIT_NONFINITE, f"stopped at step {step}: the held-out loss is {loss} although every trainable weight "
                                "is finite: the adapter has diverged (or the forward overflows in quant.compute_dtype="
                                f"{cfg.quant.compute_dtype}); it is not written as the result. " + then[0].upper()
                                + then[1:])


def diverged(cfg: Config, step: int, bad_steps: int, where: str, base_fails: bool = False) -> Stop:
    if base_fails:
        return Stop(EXIT_NONFINITE, f"stopped at step {step}: {bad_steps} steps with a non-finite loss or gradient, "
                                    f"the last in {where}, and a held-out batch fails even with the adapters switched "
                                    "off: the base model gives non-finite logits (nan or inf in its weights, or an "
                                    f"overflow in quant.compute_dtype={cfg.quant.compute_dtype}): check model.path, or "
                                    "try --quant.compute_dtype=fp32, then start again with --overwrite (what this run "
                                    "saved trained on that base)")
    return Stop(EXIT_NONFINITE, f"stopped at step {step}: {bad_steps} steps with a non-finite loss or gradient, the "
                                f"last in {where}, and a held-out batch fails too: the adapter itself has diverged "
                                f"(train.lr={cfg.train.lr:g} is too high), so no checkpoint was written of it. "
                                + _newest(cfg, "continue from it"))


def too_many_bad_steps(step: int, bad_steps: int, limit: int, where: str, saved: Path) -> Stop:
    return Stop(EXIT_NONFINITE, f"stopped at step {step}: {bad_steps} steps with a non-finite loss or gradient, "
                                f"more than train.max_bad_steps={limit}; the last in {where}. {saved} holds the run "
                                "without their updates: check those rows, lower train.lr or raise "
                                "train.max_bad_steps, then continue with --resume")


def data_position(first_index: int, count: int, n_examples: int, batch_size: int, seed: int) -> str:
    """Micro-batches first_index .. first_index+count-1, and the training-split rows in them."""
    indices = range(first_index, first_index + count)
    rows = sorted(r for i in indices for r in batch_rows(n_examples, batch_size, seed, i))
    span = f"micro-batch {first_index}" if count == 1 else f"micro-batches {first_index}-{indices[-1]}"
    return f"{span} (rows {', '.join(map(str, rows))} of the training split)"


def _device_total(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return meminfo_bytes("MemTotal")


def _in_use(device: torch.device) -> tuple[int, int]:
    """(bytes allocated now, peak since the last phase mark): PyTorch's allocator on CUDA, the process RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    return resident_bytes("VmRSS"), resident_bytes("VmHWM")


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _requested(err: BaseException) -> int:
    """The allocation that failed, from PyTorch's message ("Tried to allocate 1.96 GiB")."""
    m = re.search(r"[Tt]ried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB|bytes)", str(err))  # CUDA's, then the CPU's
    units = {"B": 1, "bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    return int(float(m.group(1)) * units[m.group(2)]) if m else 0


def oom_report(guard: RunGuard, err: BaseException) -> str:
    cfg, device = guard.cfg, guard.device
    total = _device_total(device)
    now, peak = _in_use(device)
    where = f"in {guard.phase}"
    if guard.phase in ("the forward and backward", "the optimizer step"):
        where += f" of step {guard.step + 1}"
    elif guard.step:
        where += f" after step {guard.step}"
    shape = f", micro-batch {guard.batch_shape[0]} rows x {guard.batch_shape[1]} tokens" if guard.batch_shape else ""
    lines = [f"out of memory {where}{shape}: {str(err).strip().splitlines()[0]}",
             f"memory when it failed: {_size(now)} in use, peak {_size(peak)} in this phase, {_size(total)} on "
             f"{device}"]
    phases = getattr(guard.profiler, "phases", {})
    if phases:
        lines.append("peaks of the phases before: " + ", ".join(f"{k} {_size(v)}" for k, v in phases.items()))
    needed, width = peak + _requested(err), (guard.batch_shape or (0, 0))[1]
    try:
        lines += suggestions(cfg, device, total, needed, width)
    except Exception:  # an architecture the estimator does not model: scale the measurement instead
        lines += _scaled_suggestions(cfg, HEADROOM * total, needed, width)
    if guard.phase == "the optimizer step" and cfg.train.optimizer == "paged_adamw_32bit":
        lines.append("  --train.optimizer=paged_adamw_8bit: 8-bit moments, a quarter of the optimizer state (on "
                     "--resume the optimizer state starts afresh)")
    latest = _latest(cfg)
    lines.append(f"{latest} is kept: apply one of these, then continue with --resume" if latest else
                 "no checkpoint was written yet: apply one of these and start again")
    return "\n".join(lines)


def _latest(cfg: Config) -> Path | None:
    found = list_checkpoints(Path(cfg.output.dir))
    return found[-1] if found else None


def suggestions(cfg: Config, device: torch.device, total: int, needed: int, width: int) -> list[str]:
    """Changes that would fit under HEADROOM x `total`, each alone, from qlora.estimate where it knows the model
    (calibrated on CUDA by what the failed step really needed), else from scaling the measured peak."""
    from qlora.memory.arch import load_arch
    from qlora.memory.estimate import estimate

    budget, arch = HEADROOM * total, load_arch(cfg)

    def peak(**changes: object) -> float:
        c = copy.deepcopy(cfg)
        for key, value in changes.items():
            section, name = key.split("__")
            setattr(getattr(c, section), name, value)
        return estimate(c, arch, c.quant.method, device.type).peak_bytes * scale

    scale = 1.0
    base = estimate(cfg, arch, cfg.quant.method, device.type).peak_bytes
    if device.type == "cuda" and needed > base:  # the estimate was short by this much: trust it only so far
        scale = needed / base
    t, out = cfg.train, []

    def offer(flag: str, why: str, **changes: object) -> None:
        if (p := peak(**changes)) <= budget:
            out.append(f"  {flag}: {why} (estimated peak {_size(p)})")

    seq = max((s for s in range(64, cfg.data.max_seq_len, 64) if peak(data__max_seq_len=s) <= budget), default=0)
    if seq:
        offer(f"--data.max_seq_len={seq}", "the longest that fits; longer rows are cut", data__max_seq_len=seq)
    rows = t.batch_size * t.grad_accum
    # micro-batches that divide the step's rows: the loss and the schedule stay the run's
    bs = max((b for b in divisors(rows) if b < t.batch_size and peak(train__batch_size=b) <= budget), default=0)
    if bs:
        offer(f"--train.batch_size={bs} --train.grad_accum={rows // bs}",
              f"the largest micro-batch that fits, the same {rows} rows per step", train__batch_size=bs)
    if not t.gradient_checkpointing:
        offer("--train.gradient_checkpointing=true", "keep one layer's activations, not all",
              train__gradient_checkpointing=True)
    elif device.type == "cuda" and not t.offload_activations:
        saved = arch.layers * t.batch_size * cfg.data.max_seq_len * arch.hidden * 2
        out.append(f"  --train.offload_activations=true: the layer inputs ({_size(saved)}) wait in CPU memory")
    if not t.loss_chunk_size:
        offer("--train.loss_chunk_size=1024", "never all logits at once", train__loss_chunk_size=1024)
    if not t.tile_size and cfg.quant.method != "full":
        offer("--train.tile_size=4096 --train.tile_projections=true --train.tile_norms=true",
              "the MLP, projections and norms 4096 tokens at a time", train__tile_size=4096,
              train__tile_projections=True, train__tile_norms=True)
    elif not t.tile_norms and cfg.quant.method != "full":
        offer("--train.tile_norms=true", "the norms in tiles too: no full-length fp32 copies",
              train__tile_norms=True)
    if device.type == "cuda" and not t.optimizer_on_cpu:
        offer("--train.optimizer_on_cpu=true", "the optimizer state in host memory", train__optimizer_on_cpu=True)
    if cfg.quant.method != "full" and cfg.lora.r > 1:
        offer(f"--lora.r={cfg.lora.r // 2}", "half the adapter, gradient and optimizer memory; a rank cannot change "
              "on --resume: start a new run with it (--overwrite or another output.dir)", lora__r=cfg.lora.r // 2)
    head = [f"estimated peak of this recipe {_size(peak())} (qlora.estimate"
            + (f", scaled x{scale:.2f} to what the failed step needed" if scale > 1 else "")
            + f"); each of these alone fits under {_size(budget)}:"]
    return head + (out or ["  nothing this recipe can change fits: the model needs a larger device"])


def _scaled_suggestions(cfg: Config, budget: float, needed: int, width: int) -> list[str]:
    """Without an estimate: activations grow about linearly with the tokens of a micro-batch, so shrink those by
    budget / needed. A rough guide: the fixed memory (weights, optimizer) does not shrink with them."""
    f, t, out = budget / max(needed, 1), cfg.train, []
    if f >= 1:
        return ["the failed step needed no more than the device holds: the allocator is fragmented; set "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"]
    if (seq := int(min(width or cfg.data.max_seq_len, cfg.data.max_seq_len) * f) // 64 * 64) >= 64:
        out.append(f"  --data.max_seq_len={seq}")
    rows = t.batch_size * t.grad_accum
    if (most := int(t.batch_size * f)) >= 1 and most < t.batch_size:  # a divisor of the rows: the same rows per step
        bs = max(b for b in divisors(rows) if b <= most)
        out.append(f"  --train.batch_size={bs} --train.grad_accum={rows // bs}")
    if not t.gradient_checkpointing:
        out.append("  --train.gradient_checkpointing=true")
    if not t.loss_chunk_size:
        out.append("  --train.loss_chunk_size=1024")
    return [f"the step needed at least {_size(needed)} of {_size(budget)}; scaling the tokens per "
            "micro-batch by that ratio (qlora.estimate does not know this model), each of these alone:"] + out
