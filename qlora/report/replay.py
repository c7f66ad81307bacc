"""An allocator snapshot as data: loaded (plain data only), its trace replayed to the peak of allocated memory with the
blocks alive then, and compacted to what the attribution reads (attribution.py; the command is snapshot.py).

How the peak is found: the trace (`device_traces`) may have lost its oldest events (`max_entries`), so the blocks
alive before it began are rebuilt from the end state (`segments`) and the frees of blocks the trace never saw
allocated; the trace is then replayed forward: allocated memory rises at `alloc` and falls at `free_requested` (as
torch.cuda.memory_allocated does), reserved memory follows segment_alloc/segment_free and, with expandable segments,
segment_map/segment_unmap.
"""

from __future__ import annotations

import gzip
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from qlora.errors import ConfigError

RESERVE_UP = ("segment_alloc", "segment_map")
RESERVE_DOWN = ("segment_free", "segment_unmap")


@dataclass
class Block:
    addr: int
    size: int
    frames: list[dict] = field(default_factory=list)
    index: int = -1
    """The trace event that allocated it; -1: allocated before the trace began."""


@dataclass
class Peak:
    allocated: int
    index: int
    """The event right after which allocated memory peaked (-1: before the trace, or no trace)."""
    reserved_then: int
    peak_reserved: int
    blocks: list[Block]
    events: int
    allocated_end: int
    reserved_end: int


class PlainData(pickle.Unpickler):
    """A pickle of plain data only (dicts, lists, strings, numbers: all an allocator snapshot holds). One that names a
    class or a function would run its code as it loads, and snapshots come back from another machine."""

    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(f"it names {module}.{name}, and a snapshot is plain data")


def load(path: str | Path) -> dict:
    """The snapshot in `path` (gzip-compressed or not); ConfigError, naming the file, for anything that is not one."""
    try:
        data = Path(path).read_bytes()
        snapshot = PlainData(io.BytesIO(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)).load()
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as err:  # gzip's BadGzipFile is an OSError
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__
        raise ConfigError(f"{path} is not an allocator snapshot ({why}): give the .pickle or .pickle.gz that "
                          "torch.cuda.memory._dump_snapshot (or the GPU battery) wrote") from None
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("segments", []), list) or \
            not isinstance(snapshot.get("device_traces", []), list):
        raise ConfigError(f"{path} is not an allocator snapshot (a {type(snapshot).__name__} without a list of "
                          "segments and device traces): give the file torch.cuda.memory._dump_snapshot wrote")
    return snapshot


def device_of(snapshot: dict) -> int:
    """The device whose trace has the most events (a one-GPU run: 0)."""
    traces = snapshot.get("device_traces") or [[]]
    return max(range(len(traces)), key=lambda d: len(traces[d]))


def end_blocks(snapshot: dict, device: int) -> dict[int, Block]:
    """The blocks allocated when the snapshot was taken (a block whose free is pending is no longer allocated)."""
    out = {}
    for seg in snapshot.get("segments", []):
        if seg.get("device", 0) != device:
            continue
        addr = seg["address"]
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                out[b.get("address", addr)] = Block(b.get("address", addr), b["size"], b.get("frames", []))
            addr += b["size"]  # older snapshots give blocks no address: they lie one after another
    return out


def peak(snapshot: dict, device: int | None = None) -> Peak:
    """Replay the trace: the peak of allocated memory, the blocks alive at it, and reserved memory then and at most."""
    device = device_of(snapshot) if device is None else device
    traces = snapshot.get("device_traces") or [[]]
    events = traces[device] if device < len(traces) else []
    at_end = end_blocks(snapshot, device)
    reserved_end = sum(s["total_size"] for s in snapshot.get("segments", []) if s.get("device", 0) == device)
    # Blocks alive before the trace: freed in it without being allocated in it, or alive at the end unseen.
    seen: dict[int, Block] = {}
    before: dict[int, Block] = {}
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            seen[e["addr"]] = Block(e["addr"], e["size"], e.get("frames", []), i)
        elif e["action"] == "free_requested" and seen.pop(e["addr"], None) is None:
            before.setdefault(e["addr"], Block(e["addr"], e["size"]))
    before.update({a: b for a, b in at_end.items() if a not in seen and a not in before})
    reserved = reserved_end - sum(e["size"] if e["action"] in RESERVE_UP else -e["size"]
                                  for e in events if e["action"] in RESERVE_UP + RESERVE_DOWN)
    allocated = sum(b.size for b in before.values())
    best, best_at, reserved_then, top_reserved = allocated, -1, reserved, reserved
    for i, e in enumerate(events):
        action = e["action"]
        if action == "alloc":
            allocated += e["size"]
        elif action == "free_requested":
            allocated -= e["size"]
        elif action in RESERVE_UP:
            reserved += e["size"]
        elif action in RESERVE_DOWN:
            reserved -= e["size"]
        top_reserved = max(top_reserved, reserved)
        if allocated > best:
            best, best_at, reserved_then = allocated, i, reserved
    live = dict(before)
    for i, e in enumerate(events[:best_at + 1]):
        if e["action"] == "alloc":
            live[e["addr"]] = Block(e["addr"], e["size"], e.get("frames", []), i)
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    return Peak(best, best_at, reserved_then, top_reserved, sorted(live.values(), key=lambda b: -b.size),
                len(events), allocated, reserved)


def compact(snapshot: dict, frames_from: int = 0) -> dict:
    """The snapshot with only what `snapshot.report` reads: per event action, addr, size, stream, time and the frames
    that name something (Python files, autograd's nodes, ATen's kernels), each distinct frame stored once; blocks
    smaller than `frames_from` bytes lose their frames (the attribution names only larger ones)."""
    kept: dict[tuple, dict] = {}

    def frames(fs: list[dict], size: int) -> list[dict]:
        out = []
        if size < frames_from:
            return out
        for f in fs:
            name, file = f.get("name", ""), f.get("filename", "")
            if file.endswith(".py") or "autograd" in name or "at::native" in name or "at::_ops" in name or \
                    "c10d" in name or "flash" in name or "cudnn" in name:
                key = (file, f.get("line", 0), name)
                out.append(kept.setdefault(key, {"filename": key[0], "line": key[1], "name": key[2]}))
        return out

    traces = [[{"action": e["action"], "addr": e.get("addr", 0), "size": e.get("size", 0),
                "stream": e.get("stream", 0), "time_us": e.get("time_us", 0),
                "frames": frames(e.get("frames", []), e.get("size", 0))}
               for e in trace] for trace in snapshot.get("device_traces", [])]
    segments = [{**{k: v for k, v in s.items() if k not in ("blocks", "frames")},
                 "blocks": [{**{k: v for k, v in b.items() if k not in ("frames", "history")},
                             "frames": frames(b.get("frames", []), b["size"])} for b in s["blocks"]]}
                for s in snapshot.get("segments", [])]
    return {"segments": segments, "device_traces": traces}
