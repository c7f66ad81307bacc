"""What the memory profiler (profiler.py) reads at each mark: the card's or the process's peak since the last reset,
the host's memory, and the bytes of the model's and optimizer's tensors by category.

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

import ctypes
import re
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from qlora.memory.cgroup import ROOT, memory_limit

PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def resident_bytes(name: str) -> int:
    for line in PROC_STATUS.read_text(encoding="utf-8").splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def meminfo_bytes(field: str, root: Path = ROOT) -> int:
    """One field of /proc/meminfo (MemTotal, MemAvailable, ...) in bytes; 0 where there is none (not Linux)."""
    path = root / "proc/meminfo"
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else ():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def available_bytes(root: Path = ROOT) -> int:
    """Host memory the kernel can still hand out without swapping (MemAvailable), or less where the process's memory
    cgroup leaves less (cgroup.py: a container's or a cluster job's limit, which /proc/meminfo does not show)."""
    limit = memory_limit(root)
    available = meminfo_bytes("MemAvailable", root)
    return available if limit is None else min(available, limit.room)


def total_bytes(root: Path = ROOT) -> int:
    """The host's memory (MemTotal), or the process's memory cgroup's limit where that is less."""
    limit = memory_limit(root)
    total = meminfo_bytes("MemTotal", root)
    return total if limit is None else min(total, limit.limit)


def container_limit(root: Path = ROOT) -> int | None:
    """The process's memory cgroup's limit where it is below the host's memory (MemTotal), else None."""
    limit = memory_limit(root)
    return limit.limit if limit is not None and limit.limit < meminfo_bytes("MemTotal", root) else None


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
            CLEAR_REFS.write_text("5", encoding="utf-8")
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
    (train.optimizer_on_cpu's state and gradients, model.embeddings_on_cpu's table) are not the card's and are left
    out; a paged tensor says `cpu` too (bitsandbytes wraps the managed pointer with torch.frombuffer) but is the
    card's."""
    # Storages already counted; host tensors are marked seen up front so that no category counts them.
    seen: set[int] = set()
    if device is not None and device.type == "cuda":
        own = [t for group in (optimizer.param_groups if optimizer is not None else ()) for p in group["params"]
               for t in (p, p.grad)]  # the host optimizer's stand-ins and the fp32 gradients they hold there
        host = [p for p in model.parameters() if p.device.type == "cpu"] + [
            t for t in own if t is not None and t.device.type == "cpu"] + [
            v for state in (optimizer.state.values() if optimizer is not None else ()) for v in state.values()
            if isinstance(v, torch.Tensor) and v.device.type == "cpu" and not getattr(v, "is_paged", False)]
        _storages(host, seen)
    out = dict.fromkeys(("quantized_weights", "unquantized_weights", "adapters", "gradients", "optimizer_state",
                         "outside_allocator"), 0)
    adapters = [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    ids = {id(p) for p in adapters}
    # Sharded by FSDP, a 4-bit weight is a DTensor, its quant state left on the module (qlora/base/shard.py).
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
    # errors="replace": the kernel lists each mapped file's path as its bytes, which need not be UTF-8
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", smaps.read_text(encoding="utf-8", errors="replace")):
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


def nvml_used(device: torch.device) -> int | None:
    """Device-wide memory in use per NVML, as nvidia-smi shows it (torch >= 2.6 with nvidia-ml-py), else None."""
    try:
        return int(torch.cuda.device_memory_used(device))
    except Exception:  # no nvidia-ml-py, an old torch, or any pynvml error class: the cross-check is optional
        return None
