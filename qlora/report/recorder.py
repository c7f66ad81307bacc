"""A CPU stand-in for `torch.cuda.memory._record_memory_history`: record every tensor storage a run creates and frees,
with the Python stack that created it, and write it as the CUDA allocator's snapshot pickle, so that the snapshot
reader (qlora/report/snapshot.py) can be tested, and CPU runs examined, without a GPU.

    python -m qlora.report.recorder RECIPE.py OUT.pickle.gz [--steps=1] [--section.key=value ...]

How: a `TorchDispatchMode` sees the outputs of every ATen op (autograd's backward included: the engine carries the
mode into the backward); a storage seen for the first time is an allocation, and a storage whose last reference went
(polled before each op, `StorageWeakRef.expired`) a free. What the dispatcher does not see is not recorded: memory a
kernel allocates for itself and frees before returning (the CPU flash attention's per-thread blocks), and tensors made
outside ATen ops (a safetensors mmap: record synthetic weights instead, as the recipes for 8B and 70B do).

The schema is the allocator's (torch/cuda/_memory_viz.py reads the same keys): `device_traces[0]` a list of events
with action alloc / free_requested / free_completed / segment_alloc / segment_free, addr, size (rounded up to the CUDA
allocator's 512 bytes), stream, time_us and frames (innermost first, each {filename, line, name}); `segments` the
blocks alive when the snapshot is taken. A CPU has no cache: each block is a segment of its own, so reserved equals
allocated. Equal frames are one object, so the pickle stores each once.
"""

from __future__ import annotations

import gzip
import pickle
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

if TYPE_CHECKING:  # the hints only: this module imports qlora's modules where they are used
    from qlora.config import Config

ROUND = 512  # the CUDA caching allocator's block granularity (kMinBlockSize)
SKIPPED = (__file__, "torch/utils/_python_dispatch.py", "torch/_ops.py")
MAX_FRAMES = 48


def rounded(nbytes: int) -> int:
    return -(-nbytes // ROUND) * ROUND


class AllocationRecorder(TorchDispatchMode):
    """Record allocations and frees of tensor storages while active; `snapshot()` returns the allocator's format.

    `roots` shortens file names: a frame's file under one of these folders is written relative to it (a snapshot
    committed to the repository names no machine's paths); `peak_bytes` is the live total's maximum, kept as the
    events happen, against which a replay of the trace can be checked."""

    def __init__(self, roots: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.roots = tuple(str(Path(r).resolve()) + "/" for r in roots)
        self.live: dict[int, tuple[StorageWeakRef, int, int, list[dict]]] = {}
        self.events: list[dict] = []
        self._frames: dict[tuple[str, int, str], dict] = {}
        self.allocated = self.peak_bytes = 0
        self._start = time.perf_counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        self._collect_frees()
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._seen(t, func)
        return out

    def _now(self) -> int:
        return int((time.perf_counter() - self._start) * 1e6)

    def _frame(self, filename: str, line: int, name: str) -> dict:
        key = (filename, line, name)
        return self._frames.setdefault(key, {"filename": filename, "line": line, "name": name})

    def _stack(self, func: object) -> list[dict]:
        """The op and, in a backward, the autograd node (as a CUDA snapshot's C++ frames name them, innermost
        first), then the Python frames."""
        frames = [self._frame("", 0, f"aten::{getattr(func, '__name__', func)}")]
        node = torch._C._current_autograd_node()
        if node is not None:
            frames.append(self._frame("", 0, f"torch::autograd::generated::{node.name()}::apply"))
        f = sys._getframe(1)
        while f is not None and len(frames) < MAX_FRAMES:
            name = f.f_code.co_filename
            if not name.endswith(SKIPPED):
                for root in self.roots:
                    if name.startswith(root):
                        name = name[len(root):]
                        break
                frames.append(self._frame(name, f.f_lineno, f.f_code.co_name))
            f = f.f_back
        return frames

    def _seen(self, t: torch.Tensor, func: object) -> None:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in self.live or not nbytes:
            return
        size, frames = rounded(nbytes), self._stack(func)
        self.live[ptr] = (StorageWeakRef(storage), size, nbytes, frames)
        self.allocated += size
        self.peak_bytes = max(self.peak_bytes, self.allocated)
        at = self._now()
        for action in ("segment_alloc", "alloc"):
            self.events.append({"action": action, "addr": ptr, "size": size, "stream": 0, "time_us": at,
                                "frames": frames})

    def _collect_frees(self) -> None:
        gone = [ptr for ptr, (ref, *_) in self.live.items() if ref.expired()]
        at = self._now()
        for ptr in gone:
            _, size, _, _ = self.live.pop(ptr)
            self.allocated -= size
            for action in ("free_requested", "free_completed", "segment_free"):
                self.events.append({"action": action, "addr": ptr, "size": size, "stream": 0, "time_us": at,
                                    "frames": []})

    def snapshot(self) -> dict:
        """The allocator's snapshot: the trace so far and the blocks alive now."""
        self._collect_frees()
        segments = []
        for ptr, (_, size, nbytes, frames) in sorted(self.live.items()):
            block = {"address": ptr, "size": size, "requested_size": nbytes, "state": "active_allocated",
                     "frames": frames}
            segments.append({"device": 0, "address": ptr, "total_size": size, "allocated_size": size,
                             "active_size": size, "requested_size": nbytes, "stream": 0,
                             "segment_type": "large" if size > 2**20 else "small", "segment_pool_id": (0, 0),
                             "is_expandable": False, "frames": frames, "blocks": [block]})
        return {"segments": segments, "device_traces": [list(self.events)]}


def write_snapshot(snapshot: dict, path: Path) -> None:
    """Pickle `snapshot` to `path`, gzip-compressed when the name ends in .gz (replay.load reads either)."""
    data = pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL)
    Path(path).write_bytes(gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)


def record_steps(cfg: Config, steps: int, roots: tuple[str, ...] = ()) -> tuple[dict, int]:
    """Load `cfg`'s model and run `steps` training steps on random tokens (the measurement's own path) under the
    recorder; return the snapshot and the recorder's live peak."""
    from qlora.report.measure import train_steps

    with AllocationRecorder(roots) as recorder:
        train_steps(cfg, steps, None)
        snapshot = recorder.snapshot()
    return snapshot, recorder.peak_bytes


USAGE = "python -m qlora.report.recorder RECIPE.py OUT.pickle.gz [--steps=1] [--section.key=value ...]"


def main(argv: list[str] | None = None) -> int:
    from qlora.cli import run

    return run(_main, argv)


def _main(argv: list[str]) -> int:
    from qlora.commands import wants_help
    from qlora.config import parse_args
    from qlora.errors import ConfigError

    if wants_help(argv):  # memory_reports/README.md sends a user here; `--help` was refused as 'no output file'
        print(__doc__, end="")
        return 0
    steps = int(next((a.split("=", 1)[1] for a in argv if a.startswith("--steps=")), 1))
    rest = [a for a in argv if not a.startswith("--steps=")]
    out = next((a for a in rest[1:] if not a.startswith("--")), None)
    if out is None:
        raise ConfigError(f"no output file: {USAGE}")
    rest.remove(out)
    cfg, flags = parse_args(rest, USAGE)
    if flags:
        raise ConfigError(f"unknown flag {flags[0]}: {USAGE}")
    cfg.train.device = "cpu"  # on CUDA the allocator records itself: torch.cuda.memory._record_memory_history
    snapshot, peak = record_steps(cfg, steps, (str(Path.cwd()), *site_roots()))
    write_snapshot(snapshot, Path(out))
    print(f"recorded {len(snapshot['device_traces'][0]):,} events, peak {peak / 2**20:.1f} MiB allocated: {out}")
    return 0


def site_roots() -> list[str]:
    """The folders installed packages and the standard library live in, so that a frame names `transformers/...` or
    `contextlib.py`, not a machine's path."""
    import site
    import sysconfig

    found = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["stdlib"]]
    return [p for p in found if Path(p).is_dir()]


if __name__ == "__main__":
    sys.exit(main())
