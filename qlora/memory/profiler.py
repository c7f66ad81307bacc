"""The memory profiler: peak bytes per named phase of a run, broken down by what holds them (`memory.json`).

Phases: loaded, lora_attached, first_forward, backward, optimizer_step, steady (and evaluate). Each mark records the
peak since the previous mark, then resets it.

CUDA: PyTorch's allocator counters (allocated, reserved, active). bitsandbytes' paged optimizer keeps its larger
state buffers in CUDA managed memory, outside that allocator, so torch's counters miss them: they are counted from the
optimizer's state. The figure to compare with the card is reserved + outside the allocator + the CUDA context, and
NVML's device-wide use is recorded beside it at each mark as a cross-check.

CPU: the process's peak resident set (VmHWM, which Linux resets when 5 is written to /proc/self/clear_refs) minus the
resident set before the model was loaded, less resident pages of memory-mapped checkpoint files that no tensor uses
(clean file pages the kernel may drop at any time; safetensors maps the file to load it). A training run keeps
glibc's own allocator settings, so a tensor may reuse pages an earlier one freed without the resident set rising:
its figure is the process's, not the step's. `qlora.memory --measure` (measure.py) calls `glibc_returns_freed_memory`
first for the exact figure; a training run does not, because that setting costs ~1.7x CPU time per step (every
block of MEASURE_MMAP_THRESHOLD bytes or more becomes a fresh mmap, its pages faulted in again on every step).
"""

from __future__ import annotations

import copy
import ctypes
import json
import re
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from qlora.config import Config
from qlora.errors import ConfigError

PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
GIB = 2**30


def resident_bytes(name: str) -> int:
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def meminfo_bytes(field: str) -> int:
    """One field of /proc/meminfo (MemTotal, MemAvailable, ...) in bytes; 0 where there is none (not Linux)."""
    path = Path("/proc/meminfo")
    for line in path.read_text().splitlines() if path.exists() else ():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def available_bytes() -> int:
    """Host memory the kernel can still hand out without swapping (MemAvailable)."""
    return meminfo_bytes("MemAvailable")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
# Blocks of this size or more are mmapped in measurement runs. At 64 KiB the smaller blocks left holes in malloc's heap,
# resident though free, whose extent varied from run to run: the same 64-layer tiny step measured 215.6, 244.4 and
# 253.4 MiB (heap free space 15 to 56 MiB at the forward's end). At 8 KiB three runs measured 203.3 to 203.5 MiB.
MEASURE_MMAP_THRESHOLD = 8 * 1024


def glibc_returns_freed_memory() -> None:
    """Make the resident set follow the live tensors rather than malloc's free lists: for measurement runs only.

    Otherwise a long-lived process serves new tensors from freed pages that are still resident, and its peak RSS no
    longer rises with them: in a full test session the measured step peak came out 0. The price is speed: every
    block of MEASURE_MMAP_THRESHOLD or more is a fresh mmap whose pages fault in on first touch (~1.7x CPU time per
    training step on SmolLM2-135M at 64 KiB; +26% on the tiny Llama at 4,096 tokens at 1 MiB, the highest that still
    bounds the free lists there), so ordinary training keeps glibc's defaults and the check before loading counts
    the free lists instead (preflight.process_margin).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the resident set may then include malloc's cache
        return
    # A fixed threshold also turns off glibc's dynamic one, which would otherwise rise to the largest block freed.
    libc.mallopt(M_MMAP_THRESHOLD, MEASURE_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
    libc.malloc_trim(0)


def peak_bytes(device: torch.device) -> int:
    """Peak since the last reset: reserved bytes on CUDA, resident bytes on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    return resident_bytes("VmHWM")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            CLEAR_REFS.write_text("5")
        except OSError:  # not Linux, or not permitted: the peak then spans the whole process
            pass


def _local(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of a tensor: the local shard of one FSDP sharded (train.shard_base), else itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _storages(tensors: list[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the tensors' storages, each storage counted once across calls sharing `seen`."""
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        t = _local(t)
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _quant_tensors(param: torch.Tensor, qs: object) -> list[torch.Tensor]:
    """A 4-bit weight's storage and its quant state (absmax, codes, and the nested state of double quant)."""
    out = [param, qs.absmax, qs.code, getattr(qs, "offset", None)]
    if getattr(qs, "state2", None) is not None:
        out += [qs.state2.absmax, qs.state2.code]
    return [t for t in out if isinstance(t, torch.Tensor)]


def tensor_categories(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                      device: torch.device | None = None) -> dict[str, int]:
    """Bytes of the model's and optimizer's tensors by category (each storage once), plus `outside_allocator`:
    the optimizer state bitsandbytes paged into CUDA managed memory. On a CUDA `device`, tensors kept in host memory
    (train.optimizer_on_cpu's state, model.embeddings_on_cpu's table) are not the card's and are left out; a paged
    tensor says `cpu` too (bitsandbytes wraps the managed pointer with torch.frombuffer) but is the card's."""
    # Storages already counted; host tensors are marked seen up front so that no category counts them.
    seen: set[int] = set()
    if device is not None and device.type == "cuda":
        host = [p for p in model.parameters() if p.device.type == "cpu"] + [
            v for state in (optimizer.state.values() if optimizer is not None else ()) for v in state.values()
            if isinstance(v, torch.Tensor) and v.device.type == "cpu" and not getattr(v, "is_paged", False)]
        _storages(host, seen)
    out = dict.fromkeys(("quantized_weights", "unquantized_weights", "adapters", "gradients", "optimizer_state",
                         "outside_allocator"), 0)
    adapters = [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    ids = {id(p) for p in adapters}
    # Sharded by FSDP, a 4-bit weight is a DTensor, its quant state left on the module (qlora/training/distributed.py).
    quantized = {id(p): (p, p.quant_state) for p in model.parameters() if getattr(p, "quant_state", None) is not None}
    quantized.update({id(m.weight): (m.weight, m.quant_state) for m in model.modules()
                      if isinstance(getattr(m, "weight", None), DTensor)
                      and getattr(m, "quant_state", None) is not None})
    for p, qs in quantized.values():
        out["quantized_weights"] += _storages(_quant_tensors(p, qs), seen)
    out["adapters"] = _storages(adapters, seen)
    out["unquantized_weights"] = _storages([p for p in model.parameters() if id(p) not in ids], seen) + \
        _storages(list(model.buffers()), seen)
    out["gradients"] = _storages([p.grad for p in model.parameters()], seen)
    if optimizer is not None:  # its own copies of the weights (adapters/master.py's fp32 masters) and their gradients
        own = [p for group in optimizer.param_groups for p in group["params"]]
        out["gradients"] += _storages([p.grad for p in own], seen)
        out["optimizer_state"] += _storages(own, seen)
    for state in (optimizer.state.values() if optimizer is not None else ()):
        for v in state.values():
            if isinstance(v, torch.Tensor):
                size = _storages([v], seen)
                out["optimizer_state"] += size
                if getattr(v, "is_paged", False):
                    out["outside_allocator"] += size
    return out


def unused_file_pages(model: torch.nn.Module | None) -> int:
    """Resident bytes of memory-mapped checkpoint files that no parameter or buffer of `model` lies in."""
    smaps = Path("/proc/self/smaps")
    if model is None or not smaps.exists():
        return 0
    maps = []
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", smaps.read_text()):
        head = block.split("\n", 1)[0]
        if head.endswith((".safetensors", ".bin", ".gguf")):
            start, end = (int(x, 16) for x in head.split()[0].split("-"))
            rss = re.search(r"^Rss:\s+(\d+) kB", block, re.M)
            maps.append((start, end, int(rss.group(1)) * 1024 if rss else 0))
    if not maps:
        return 0
    used = 0
    tensors = [_local(t) for t in [*model.parameters(), *model.buffers()]]
    for t in {t.untyped_storage().data_ptr(): t for t in tensors if t.device.type == "cpu"}.values():
        ptr = t.untyped_storage().data_ptr()
        if any(start <= ptr < end for start, end, _ in maps):
            used += t.untyped_storage().nbytes()
    return max(0, sum(rss for _, _, rss in maps) - used)


class PhaseTracker:
    """Records the peak of each named phase; a phase ends when the next is marked. A repeated name keeps the larger.

    `phases` maps each phase to its peak in bytes (CUDA: reserved; CPU: resident above the baseline); `records` holds
    every figure of the phase's peak mark, with the tensors by category at that mark.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phases: dict[str, int] = {}
        self.records: dict[str, dict] = {}
        self._high: dict[str, int] = {}  # CPU: the raw high-water mark above the baseline at each phase's record
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.context = 0
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)  # creates the context if nothing has yet
            # Device-wide: on a shared GPU other processes' memory lands here too.
            self.context = total - free - torch.cuda.memory_reserved(device)
            self.baseline = 0
        else:
            self.baseline = resident_bytes("VmRSS")
        reset_peak(device)

    def watch(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Break later marks down by category over these."""
        self.model = model if model is not None else self.model
        self.optimizer = optimizer if optimizer is not None else self.optimizer

    def mark(self, phase: str) -> dict:
        """Ends the phase: its peak since the last mark, kept if it is the phase's largest; returns the phase's record.
        On CPU a step that did not raise the resident set's high-water mark above the phase's record ends there: the
        walk of /proc/self/smaps and the census of tensors (some 25 ms a step, a third of the tiny recipe's time)
        would find no higher peak, give or take file pages the kernel evicted in between."""
        if self.device.type != "cuda":
            high = resident_bytes("VmHWM") - self.baseline
            if phase in self.phases and high <= self._high[phase]:
                reset_peak(self.device)
                return self.records[phase]
        cats = tensor_categories(self.model, self.optimizer, self.device) if self.model is not None else {}
        outside = cats.pop("outside_allocator", 0)
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
            record = {"allocated": torch.cuda.max_memory_allocated(self.device), "reserved": reserved,
                      "active": stats.get("active_bytes.all.peak", 0), "outside_allocator": outside,
                      "cuda_context": self.context, "card_total": reserved + outside + self.context,
                      "card_total_now": torch.cuda.memory_reserved(self.device) + outside + self.context,
                      "nvml_used_now": _nvml_used(self.device)}
            peak = record["allocated"] + outside
        else:
            peak = max(0, high - unused_file_pages(self.model))
            record = {"allocated": peak, "reserved": peak, "active": peak, "outside_allocator": 0}
        record["categories"] = cats
        # Everything the categories do not name: activations, temporaries, allocator slack, (CPU) Python objects.
        record["activations"] = max(0, peak - sum(cats.values()))
        key = record["card_total"] if self.device.type == "cuda" else peak
        if phase not in self.phases or key > self.phases[phase]:
            self.phases[phase], self.records[phase] = key, record
            if self.device.type != "cuda":
                self._high[phase] = high
        reset_peak(self.device)
        return record

    def carried(self) -> dict:
        """The training phases' peaks and records so far, for a checkpoint: a resumed run's memory.json, closing line
        and `peak_gib` report the whole run's peak, not only what the process that resumed it met."""
        skip = ("loaded", "lora_attached")
        return {"phases": {p: v for p, v in self.phases.items() if p not in skip},
                "records": {p: v for p, v in self.records.items() if p not in skip}}

    def restore(self, carried: object) -> None:
        """Take back `carried()` of the run's earlier processes (anything malformed is ignored: it only reports)."""
        if not isinstance(carried, dict):
            return
        phases, records = carried.get("phases"), carried.get("records")
        if not isinstance(phases, dict) or not isinstance(records, dict):
            return
        for phase, value in phases.items():
            if isinstance(value, int) and isinstance(records.get(phase), dict) and phase not in self.phases:
                self.phases[phase], self.records[phase] = value, records[phase]
                if self.device.type != "cuda":
                    self._high[phase] = value  # a later mark of this phase is measured only above it

    def peak(self, skip: tuple[str, ...] = ("loaded", "lora_attached", "evaluate")) -> tuple[str, dict] | None:
        """The training phase with the highest peak (loading and evaluation are reported, not counted)."""
        phases = [p for p in self.phases if p not in skip]
        if not phases:
            return None
        name = max(phases, key=self.phases.get)
        return name, self.records[name]

    def highest(self) -> int:
        """The training peak so far, as memory.json will report it (DEFINITION): what the progress bar shows."""
        found = self.peak()
        return self.phases[found[0]] if found else 0

    def summary(self, estimate: int | None = None, shape: tuple[int, int] | None = None) -> dict:
        """memory.json: every phase, the training peak by category, and the estimate (for batches of `shape`, rows x
        tokens) when one is given."""
        found = self.peak()
        out = {"device": str(self.device), "unit": "bytes", "definition": DEFINITION[self.device.type],
               "phases": self.records, "peak_phase": found[0] if found else None,
               "peak_bytes": self.phases[found[0]] if found else None, "estimated_peak_bytes": estimate,
               "estimated_for": {"batch_size": shape[0], "seq_len": shape[1]} if shape else None}
        if found:
            rec = found[1]
            out["peak_by_category"] = {**rec["categories"], "activations": rec["activations"],
                                       "cuda_context": rec.get("cuda_context", 0)}
        return out

    def write(self, path: Path, cfg: Config | None = None, seq_len: int | None = None) -> str:
        """Write memory.json and return the one-line summary. With `cfg`, the estimator's figure beside the measured
        one, for the shape the run met: `cfg.train.batch_size` rows of `seq_len` tokens (the longest micro-batch
        it padded to; the estimator's worst case is data.max_seq_len, which a run with shorter rows never reaches)."""
        estimate, shape = None, None
        if cfg is not None:
            shape = (cfg.train.batch_size, seq_len or cfg.data.max_seq_len)
            estimate = estimated_peak(cfg, self.device, shape[1])
        summary = self.summary(estimate, shape)
        Path(path).write_text(json.dumps(summary, indent=2) + "\n")
        return one_line(summary)


DEFINITION = {
    "cuda": "peak = PyTorch reserved + outside its allocator (paged optimizer state) + CUDA context",
    "cpu": "peak = peak RSS minus RSS before the model was loaded, less unused pages of mapped checkpoint files "
           "(in a training run this includes code imported while loading; python -m qlora.memory --measure warms up "
           "first)",
}


def estimated_peak(cfg: Config, device: torch.device, seq_len: int | None = None) -> int | None:
    """The estimator's peak for this run (at `seq_len` tokens per row if given, else data.max_seq_len), or None
    where it cannot tell (an architecture it does not know)."""
    from qlora.memory.arch import load_arch
    from qlora.memory.estimate import estimate

    if seq_len is not None:
        cfg = copy.deepcopy(cfg)
        cfg.data.max_seq_len = seq_len
    try:
        return estimate(cfg, load_arch(cfg), cfg.quant.method, device.type).peak_bytes
    except (ConfigError, OSError, ValueError, KeyError) as err:
        print(f"memory: no estimate for this model ({err})", file=sys.stderr)
        return None


def human(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def one_line(summary: dict) -> str:
    """The run's closing memory line: the measured peak, by category, and the estimate for the same batch shape.

    On CUDA both count the same things (PyTorch's memory, paged optimizer state, the CUDA context), so the line gives
    the estimate's error. On CPU the measured figure is the process's resident set above its start, which includes
    libraries loaded with the model and malloc's free lists, and the estimate counts tensors only: the line says so
    instead of a percentage (`python -m qlora.memory RECIPE --measure` compares the two like with like; docs/memory.md
    says how the run's figures relate).
    """
    if summary.get("peak_bytes") is None:
        return "memory: no training step was recorded"
    if not summary["peak_bytes"]:  # a CPU process that freed more before the run than the run then took
        return ("memory: the resident set never rose above its level before loading (memory this process had freed "
                "was reused): python -m qlora.memory RECIPE --measure measures the steps in a fresh process")
    peak, est, shape = summary["peak_bytes"], summary.get("estimated_peak_bytes"), summary.get("estimated_for")
    cpu = not summary["device"].startswith("cuda")
    # On CPU what the categories do not name is more than activations: libraries, Python objects, malloc slack.
    names = {"activations": "activations and the rest" if cpu else "activations"}
    parts = ", ".join(f"{names.get(k, k.replace('_', ' '))} {human(v)}"
                      for k, v in summary["peak_by_category"].items() if v >= peak / 100)
    batch = f"batches of {shape['batch_size']} x {shape['seq_len']} tokens" if shape else "the recipe's batches"
    if not cpu:
        vs = f"; estimated {human(est)} for {batch} ({100 * (est / peak - 1):+.0f}%)" if est else ""
        return f"memory: peak {human(peak)} in {summary['peak_phase']} on {summary['device']} ({parts}){vs}"
    vs = f"; the estimate, {human(est)} for {batch}, counts tensors only" if est else ""
    return f"memory: peak resident set {human(peak)} above the start, in {summary['peak_phase']} ({parts}){vs}"


def _nvml_used(device: torch.device) -> int | None:
    """Device-wide memory in use per NVML, as nvidia-smi shows it (torch >= 2.6 with nvidia-ml-py), else None."""
    try:
        return int(torch.cuda.device_memory_used(device))
    except Exception:  # no nvidia-ml-py, an old torch, or any pynvml error class: the cross-check is optional
        return None
