"""The out-of-memory report: where a run ran out (the phase, the step, the micro-batch), the memory then, the peaks of
the phases before, and which changes to the recipe would fit, each alone.

`qlora.training.guard.RunGuard` turns an out-of-memory error anywhere in a run into a `Stop` (exit 4, qlora/errors.py)
carrying this report (docs/failures.md).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import torch

from qlora.config import Config
from qlora.data.labels import shortest_keeping
from qlora.memory.preflight import divisors, needs, process_margin
from qlora.memory.profiler import PhaseTracker
from qlora.memory.readings import available_bytes, resident_bytes, total_bytes
from qlora.training.checkpoint import intact_line, list_checkpoints

HEADROOM = 0.95  # suggestions aim under 95% of the device: the allocator fragments, and estimates are estimates
GIB = 2**30


def out_of_host_memory(err: BaseException | None) -> bool:
    """CPU memory exhausted: Python's MemoryError, or PyTorch's CPU allocator refusing ("can't allocate memory")."""
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def device_total(device: torch.device) -> int:
    """The device's memory: the card's, or on CPU the host's, or its memory cgroup's limit where that is less (tests
    replace it with a smaller device's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return total_bytes()


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


def oom_report(err: BaseException, cfg: Config, device: torch.device, phase: str, step: int,
               batch_shape: tuple[int, ...] | None, profiler: PhaseTracker | None,
               rows: tuple[list, list] | None = None, replacing: bool = False) -> str:
    """What ran out and where (`phase`, after or during `step`, on a micro-batch of `batch_shape`), the memory then and
    in the phases `profiler` marked before, what would fit instead, and where to go on from. `rows`: the run's
    training and held-out rows, once loaded (which data.max_seq_len a resume keeps them at). `replacing`: --overwrite,
    the old run not yet cleared: its checkpoints are not this run's to continue (checkpoint.intact_line)."""
    total = device_total(device)
    now, peak = _in_use(device)
    where = f"in {phase}"
    if phase in ("the forward and backward", "the optimizer step"):
        where += f" of step {step + 1}"
    elif step:
        where += f" after step {step}"
    longest = " (the step's longest)" if cfg.train.grad_accum > 1 else ""
    shape = f", micro-batch {batch_shape[0]} rows x {batch_shape[1]} tokens{longest}" if batch_shape else ""
    said = str(err).strip().splitlines() or [type(err).__name__]  # Python's own MemoryError has no words
    lines = [f"out of memory {where}{shape}: {said[0]}",
             f"memory when it failed: {_size(now)} in use, peak {_size(peak)} in this phase, {_size(total)} on "
             f"{device}"]
    phases = getattr(profiler, "phases", {})
    if phases:
        lines.append("peaks of the phases before: " + ", ".join(f"{k} {_size(v)}" for k, v in phases.items()))
    needed, width = peak + _requested(err), (batch_shape or (0, 0))[1]
    found = latest_checkpoint(cfg)
    latest = None if replacing else found  # replacing: the old run's, not this run's to continue
    note = (lambda seq: _seq_on_resume(cfg, seq, rows)) if latest else None
    try:
        lines += suggestions(cfg, device, total, needed, note)
    except Exception:  # an architecture the estimator does not model: scale the measurement instead
        lines += _scaled_suggestions(cfg, HEADROOM * total, needed, width, note)
    if phase == "the optimizer step" and cfg.train.optimizer == "paged_adamw_32bit":
        lines.append("  --train.optimizer=paged_adamw_8bit: 8-bit moments, a quarter of the optimizer state (on "
                     "--resume the optimizer state starts afresh)")
    lines.append(f"{latest} is kept: apply one of these, then continue with --resume" if latest else
                 f"{intact_line(Path(cfg.output.dir), True)}: apply one of these, then run the command again" if found
                 else "no checkpoint was written yet: apply one of these and start again")
    return "\n".join(lines)


def _seq_on_resume(cfg: Config, seq: int, rows: tuple[list, list] | None) -> str:
    """What a suggested data.max_seq_len=`seq` says where a checkpoint would be resumed with it: nothing where --resume
    takes it, else why it refuses it and that it starts a new run (runconfig.FIXED_ON_RESUME, progress.same_rows). The
    line said 'continue with --resume' below a length that resume refuses: any with data.pack, or one that drops rows
    of the run's (`rows`; before they are loaded that cannot be told, and is said so)."""
    new_run = "start a new run with it (--overwrite or another output.dir)"
    if cfg.data.pack:
        return f"; data.pack fixes data.max_seq_len on --resume (another length packs other rows): {new_run}"
    if rows is None:
        return (f"; --resume refuses it if it drops rows of the run (a row whose learned part starts past it): then "
                f"{new_run}")
    least = shortest_keeping([*rows[0], *rows[1]])
    if seq >= least:
        return ""
    return (f"; it drops rows of the run (their learned part starts past {seq} tokens; {least} keeps every row), which "
            f"--resume refuses: {new_run}")


def latest_checkpoint(cfg: Config) -> Path | None:
    """The run's newest checkpoint, or None: where a stop for memory or for non-finite numbers says to go on from."""
    found = list_checkpoints(Path(cfg.output.dir))
    return found[-1] if found else None


def suggestions(cfg: Config, device: torch.device, total: int, needed: int,
                note: Callable[[int], str] | None = None) -> list[str]:
    """Changes that would fit under HEADROOM x `total`, each alone, from qlora.memory.estimate where it knows the model
    (calibrated on CUDA by what the failed step really needed), else from scaling the measured peak. Each is weighed
    as the check before loading weighs it (preflight.needs: the allocator's margin, on a CPU device the process's
    libraries and malloc's free lists): by the bare peak, llama8b on a 24 GiB CPU host was offered
    --data.max_seq_len=8128 (14.53 GiB), which that check refuses at 34.98 GiB, naming 3328. `note`: what a
    suggested data.max_seq_len adds, where a checkpoint would be resumed with it (`_seq_on_resume`)."""
    from qlora.memory.arch import load_arch
    from qlora.memory.estimate import estimate

    budget, arch = HEADROOM * total, load_arch(cfg)
    # On CUDA the rerun's check weighs the host too (what the plan keeps there: the optimizer on the CPU, offloaded
    # layer inputs), against what is available then: at most what is now, and what this process holds, freed by then.
    host = available_bytes() + resident_bytes("VmRSS") if device.type == "cuda" else None

    def peak(**changes: object) -> float:
        """The card's figure with `changes`, or inf where the host would not hold what the plan keeps there."""
        c = copy.deepcopy(cfg)
        for key, value in changes.items():
            section, name = key.split("__")
            setattr(getattr(c, section), name, value)
        card, kept = needs(estimate(c, arch, c.quant.method, device.type))
        return card * scale if host is None or kept <= host else float("inf")

    scale = 1.0
    est = estimate(cfg, arch, cfg.quant.method, device.type)
    if device.type == "cuda" and needed > est.peak_bytes:  # the estimate was short by this much: trust it only so far
        scale = needed / est.peak_bytes  # allocated against allocated: the margin is scaled with the rest
    counted = "the allocator's margin" if est.margin else \
        "the process's libraries and malloc's free lists" if process_margin(est) else ""
    t, out = cfg.train, []

    def offer(flag: str, why: str, **changes: object) -> None:
        if (p := peak(**changes)) <= budget:
            out.append(f"  {flag}: {why} (estimated peak {_size(p)})")

    seq = max((s for s in range(64, cfg.data.max_seq_len, 64) if peak(data__max_seq_len=s) <= budget), default=0)
    if seq:
        offer(f"--data.max_seq_len={seq}", "the longest that fits; longer rows are cut" + (note(seq) if note else ""),
              data__max_seq_len=seq)
    rows = t.batch_size * t.grad_accum
    # micro-batches that divide the step's rows: the loss and the schedule stay the run's
    bs = max((b for b in divisors(rows, t.batch_size - 1) if peak(train__batch_size=b) <= budget), default=0)
    if bs:
        offer(f"--train.batch_size={bs} --train.grad_accum={rows // bs}",
              f"the largest micro-batch that fits, the same {rows} rows per step", train__batch_size=bs)
    if not t.gradient_checkpointing:
        offer("--train.gradient_checkpointing=true", "keep one layer's activations, not all",
              train__gradient_checkpointing=True)
    elif device.type == "cuda" and not t.offload_activations:
        saved = arch.layers * t.batch_size * cfg.data.max_seq_len * arch.hidden * 2
        # Weighed like the rest: offered unweighed, llama8b at 65,536 tokens on 12 GiB got it, a step of 13.94 GiB.
        offer("--train.offload_activations=true", f"the layer inputs ({_size(saved)}) wait in CPU memory",
              train__offload_activations=True)
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
    head = [f"estimated peak of this recipe {_size(needs(est)[0] * scale)} (qlora.memory.estimate"
            + (f", with {counted}, as the check before loading counts it" if counted else "")
            + (f", scaled x{scale:.2f} to what the failed step needed" if scale > 1 else "")
            + f"); each of these alone fits under {_size(budget)}:"]
    return head + (out or ["  nothing this recipe can change fits: the model needs a larger device"])


def _scaled_suggestions(cfg: Config, budget: float, needed: int, width: int,
                        note: Callable[[int], str] | None = None) -> list[str]:
    """Without an estimate: activations grow about linearly with the tokens of a micro-batch, so shrink those by
    budget / needed. A rough guide: the fixed memory (weights, optimizer) does not shrink with them."""
    f, t, out = budget / max(needed, 1), cfg.train, []
    if f >= 1:
        return ["the failed step needed no more than the device holds: the allocator is fragmented; set "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"]
    if (seq := int(min(width or cfg.data.max_seq_len, cfg.data.max_seq_len) * f) // 64 * 64) >= 64:
        said = note(seq) if note else ""  # once: it reads every row of the run
        out.append(f"  --data.max_seq_len={seq}" + (f": {said[2:]}" if said else ""))
    rows = t.batch_size * t.grad_accum
    if (most := int(t.batch_size * f)) >= 1 and most < t.batch_size:  # a divisor of the rows: the same rows per step
        bs = divisors(rows, most)[-1]
        out.append(f"  --train.batch_size={bs} --train.grad_accum={rows // bs}")
    if not t.gradient_checkpointing:
        out.append("  --train.gradient_checkpointing=true")
    if not t.loss_chunk_size:
        out.append("  --train.loss_chunk_size=1024")
    return [f"the step needed at least {_size(needed)} of {_size(budget)}; scaling the tokens per "
            "micro-batch by that ratio (qlora.memory.estimate does not know this model), each of these alone:"] + out
