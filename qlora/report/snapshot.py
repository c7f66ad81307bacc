"""Read a CUDA allocator snapshot and say what the peak held: every block over a few MiB alive at the peak of allocated
memory, each put to a term of the estimator (qlora/memory/estimate.py, activations.py) by its stack and its size, what
no term explains, and what the allocator held beyond it (reserved but not allocated).

    python -m qlora.report.snapshot SNAPSHOT [--recipe R --tokens N] [--device cuda|cpu] [--min-mib 2] [--compact OUT]

SNAPSHOT is the pickle `torch.cuda.memory._dump_snapshot` writes after `_record_memory_history` (gzip or not), or
one of qlora/report/recorder.py's from a CPU run. With --recipe and --tokens (one row of N tokens, the recipe's batch)
each block's size is also read in the model's widths ("T h e": tokens x hidden x bytes per element), which names the
blocks autograd's engine allocates on CUDA, where no Python frame is on the stack, and the estimate for the same
shape stands beside the measured figures. --compact writes the snapshot back with only what this tool reads (Python
frames and the frames of autograd's nodes and ATen's kernels), gzip-compressed: what a GPU run brings back.

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
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from qlora.errors import ConfigError

T = TypeVar("T")

MIB, GIB = 2**20, 2**30
ROUND = 512  # the CUDA caching allocator rounds every block up to this (kMinBlockSize)
ALIGN_TOKENS = (1, 128, 256)  # FlashAttention pads the query length of its fp32 buffers to a multiple of 128
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


# --- what each block is ---

@dataclass(frozen=True)
class Shape:
    """The widths a block's size is read in: one micro-batch of `tokens` (T) rows' tokens of the recipe's model."""

    tokens: int
    targets: int
    """N: the positions that predict a label (T less one per row)."""
    widths: dict[str, int]
    """h, i, q, kv, nh, hd, r, V: hidden, intermediate, query and key/value widths, heads, head size, rank, vocab."""
    e: int
    tile: int
    chunk: int
    trained: frozenset[int]
    """Byte sizes of one trained tensor's gradient (and fp32 master)."""

    def read(self, size: int) -> list[str]:
        """Every way to write `size` as tokens x width x bytes (e.g. "T h e", "t i 4"), the likeliest first."""
        counts = {"T": self.tokens, "N": self.targets, "t": self.tile, "c": self.chunk}
        elems = {"e": self.e, "4": 4, "1": 1, "8": 8}
        out = []
        for tok, n in counts.items():
            for w, width in self.widths.items():
                for b, nbytes in elems.items():
                    if not n or (b == "4" and self.e == 4):
                        continue
                    aligns = ALIGN_TOKENS if tok == "T" else (1,)
                    if any(size == -(-(-(-n // a) * a) * width * nbytes // ROUND) * ROUND for a in aligns):
                        out.append(f"{tok} {w} {b}")
        return out


def shape_for(cfg, tokens: int, device: str) -> Shape:  # noqa: ANN001 (Config: imported lazily, the CLI is fast)
    from qlora.memory.arch import load_arch
    from qlora.memory.estimate import compute_bytes
    from qlora.memory.terms import trainable_tensors

    arch, (_, e) = load_arch(cfg), compute_bytes(cfg, device)
    b = cfg.train.batch_size
    widths = {"h": arch.hidden, "i": arch.intermediate, "q": arch.heads * arch.head_dim,
              "kv": arch.kv_heads * arch.head_dim, "nh": arch.heads, "hd": arch.head_dim, "r": cfg.lora.r,
              "V": arch.vocab, "1": 1}
    sizes = trainable_tensors(arch, cfg.quant.method, cfg)
    trained = frozenset(-(-n * g // ROUND) * ROUND for n in sizes for g in {e, 4})
    return Shape(b * tokens, b * (tokens - 1), widths, e, min(cfg.train.tile_size, b * tokens),
                 cfg.train.loss_chunk_size, trained)


def _files(frames: list[dict]) -> list[tuple[str, str]]:
    return [(f["filename"].replace("\\", "/"), f["name"]) for f in frames]


def _has(frames: list[tuple[str, str]], path: str, *names: str) -> bool:
    return any(file.endswith(path) and (not names or name in names) for file, name in frames)


def in_torch(file: str) -> bool:
    """A frame of torch itself: its installed package (not any path with a torch folder in it, such as the GPU
    image's /opt/torch/.venv, where every library lives)."""
    return file.startswith("torch/") or "-packages/torch/" in file


PROJECT = ("qlora/", "transformers/", "bitsandbytes/", "peft/")
# Frames that say where in the step a block was made, innermost first wins: a layer recomputed for its backward runs
# inside the tile whose saved input asked for it, and a tile's forward runs inside a recompute.
MARKERS: list[tuple[str, tuple[str, ...], str]] = [
    ("qlora/levers/checkpoints/layer_inputs.py", ("_fetch", "_start_tensor", "_replayed"), "input"),
    ("qlora/training/loss.py", ("_chunk_ce",), "loss"),
    ("qlora/levers/tiling/tiles.py", ("backward",), "tile"),
    ("qlora/levers/tiling/tiles.py", ("forward",), "tile forward"),
    ("torch/utils/checkpoint.py", ("unpack_hook", "recompute_fn"), "recompute"),
    ("qlora/adapters/master.py", ("accumulate_fp32",), "gradients"),
    ("qlora/adapters/master.py", (), "optimizer"),
    ("qlora/levers/host_optimizer/optimizer.py", ("__init__", "step"), "optimizer"),
    ("torch/optim/", (), "optimizer"),
    ("bitsandbytes/optim/", (), "optimizer"),
    ("qlora/adapters/lora.py", ("attach_lora",), "lora"),
    ("qlora/base/synthetic.py", (), "load"),
    ("qlora/base/load.py", ("load_base",), "load"),
    ("transformers/modeling_utils.py", ("from_pretrained",), "load"),
    ("torch/autograd/graph.py", ("_engine_run_backward",), "backward"),
    ("torch/autograd/__init__.py", ("backward", "grad"), "backward"),
]


NORM_NODES = ("MulBackward0", "MeanBackward1", "PowBackward0", "RsqrtBackward0", "ToCopyBackward0", "AddBackward0")


NODE = re.compile(r"([A-Z][A-Za-z]*Backward\d)")  # PowBackward0, in a demangled name or a mangled one (12PowBackward05)


def autograd_node(frames: list[dict]) -> str:
    """The autograd node whose backward made the block ("PowBackward0"), from the C++ frames of a CUDA snapshot
    recorded with stacks="all" (named by addr2line, or mangled by dladdr) or the recorder's; "" when there is none."""
    for f in frames:
        if "autograd" in f["name"] and (found := NODE.search(f["name"])):
            return found.group(1)
    return ""


def phase(frames: list[dict]) -> str:
    """Where in the step a block was made, from its stack: load, lora, optimizer, gradients, forward, recompute (a
    checkpointed layer run again in the backward), tile forward (a tiled module's forward; its full-length output
    when the tile's own frame made it: "tile output"), tile (a tile's recompute and gradients, in the backward),
    input (a layer input fetched back or replayed), loss, or backward (autograd's engine: on CUDA no Python frame)."""
    f = _files(frames)
    py = [x for x in f if x[0].endswith(".py")]
    if not py:
        return "backward"
    own = next((x for x in py if not in_torch(x[0])), None)
    first = next((x for x in py if any(p in x[0] for p in PROJECT)), None)
    if first is not None and first[0].endswith("qlora/training/loss.py"):
        return "loss"  # the loss's own tensors: the targets' hidden states, labels
    engine = False  # autograd's engine run from inside a tile's or the loss's backward belongs to them
    for file, name in py:
        for path, names, where in MARKERS:
            if file.endswith(path) and (not names or name in names):
                if where == "backward":
                    engine = True
                    break
                if engine and where not in ("tile", "loss"):
                    return "backward"
                if where == "tile forward" and (file, name) == own:
                    return "tile output"
                return where
    return "backward" if engine else "forward"


def term(block: Block, shape: Shape | None) -> str | None:
    """The estimator's term for `block`, or None when none explains it."""
    where, files, node = phase(block.frames), _files(block.frames), autograd_node(block.frames)
    sizes = shape.read(block.size) if shape is not None else []

    def reads(*classes: str) -> bool:
        return any(c in classes for c in sizes)

    if where == "load":
        quantized = any("bitsandbytes/" in file for file, _ in files) or _has(files, "qlora/base/quantize.py")
        return "quantized_weights" if quantized else "unquantized_weights"
    if where in ("lora", "optimizer", "gradients"):
        return {"lora": "adapters", "optimizer": "optimizer_state", "gradients": "gradients"}[where]
    if node == "AccumulateGrad" or (where == "backward" and shape is not None and block.size in shape.trained):
        return "gradients"
    if any("dequantize" in name for _, name in files):
        return "dequantised weight"
    if where == "input":
        return "layer inputs (checkpoint plan: fetched back or replayed)"
    if where == "loss" or (where == "backward" and any(s.startswith(("c V", "N h", "N 1", "N 8")) for s in sizes)):
        return "loss (final norm, labels, logits)"
    if where == "forward":
        if reads("T h e"):
            return "layer inputs (checkpoint plan: kept on the device)"
        if reads("T hd e", "T hd 4"):
            return "rotary tables"
        return None
    if where == "recompute":
        if reads("T h 4", "T 1 4"):
            return "saved: norms (fp32 input, rsqrt)"
        if reads("T h e", "T q e", "T kv e", "T nh 4"):
            return "saved: attention and the linear layers' inputs (q, k, v, output, logsumexp, normed inputs)"
        if reads("T i e"):
            return "saved: MLP (gate, up, act) and down's input"
        if reads("T r e", "T h 1", "T i 1", "T q 1"):
            return "saved: adapters (A x, dropout)"
        return None
    if where == "tile output":  # v_proj's output is what SDPA saves as v; the others' feed the next op and go
        return "saved: attention and the linear layers' inputs (q, k, v, output, logsumexp, normed inputs)" \
            if reads("T kv e", "T q e") else None
    if where == "tile":
        if any(s.startswith("T ") for s in sizes):
            return "backward: hidden-state gradients (layer output, MLP and attention inputs)"
        return "tiles: one tile's working set"
    if where == "backward":
        if "ScaledDotProduct" in node or any(k in name for _, name in files for k in ("flash", "attention_backward")):
            return "backward: SDPA's gradients and buffers"
        if reads("T h 4") and (node in NORM_NODES or not node):
            # Without C++ frames an fp32 T x q block (q = h in Llama) may also be FlashAttention's dq accumulator.
            return "backward: RMSNorm's fp32 temporaries" + ("" if node else " (or SDPA's fp32 dq accumulator)")
        if reads("T h e", "T q e"):
            return "backward: hidden-state gradients (layer output, MLP and attention inputs)"
        if reads("T i e"):
            return "backward: MLP intermediate gradients"
        if reads("T q 4", "T kv e", "T nh 4"):
            return "backward: SDPA's gradients and buffers"
    return None


# --- the report ---

def attribute(snap: Peak, shape: Shape | None, min_bytes: int) -> tuple[dict[str, list[Block]], list[Block], int]:
    """Blocks of `min_bytes` or more alive at the peak, grouped by term; those no term explains; the bytes of the
    smaller blocks."""
    terms: dict[str, list[Block]] = defaultdict(list)
    unexplained, small = [], 0
    for b in snap.blocks:
        if b.size < min_bytes:
            small += b.size
            continue
        name = term(b, shape)
        (terms[name] if name else unexplained).append(b)
    return dict(terms), unexplained, small


def where_text(block: Block, width: int = 4) -> str:
    """The innermost Python frames (else the innermost of any kind), innermost first."""
    py = [f for f in block.frames if f["filename"].endswith(".py") and "torch/nn/modules/module.py" not in
          f["filename"]] or block.frames
    return " < ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in py[:width]) or \
        "no frames (autograd's engine, or before the recording)"


def report(snapshot: dict, shape: Shape | None = None, min_bytes: int = 2 * MIB,
           estimate: object | None = None) -> str:
    found = peak(snapshot)
    terms, unexplained, small = attribute(found, shape, min_bytes)
    unit, scale = ("GiB", GIB) if found.allocated >= GIB else ("MiB", MIB)
    per_token = shape.tokens if shape is not None else 0
    hidden_copy = shape.tokens * shape.widths["h"] * shape.e if shape is not None else 0
    gap = found.reserved_then - found.allocated
    lines = [f"peak allocated {found.allocated / scale:.3f} {unit} after event {found.index:,} of {found.events:,}; "
             f"reserved then {found.reserved_then / scale:.3f} {unit}, {gap / scale:.3f} {unit} of it not allocated "
             f"(the allocator's reserve and fragmentation); peak reserved {found.peak_reserved / scale:.3f} {unit}",
             f"{sum(len(v) for v in terms.values()) + len(unexplained)} blocks of {min_bytes / MIB:g} MiB or more "
             f"alive at the peak; smaller blocks {small / scale:.3f} {unit}", "",
             f"| term | blocks | {unit} | bytes per token | T h e copies |", "|---|---:|---:|---:|---:|"]

    def row(name: str, blocks: list[Block]) -> str:
        total = sum(b.size for b in blocks)
        tok = f"{total / per_token:,.0f}" if per_token else ""
        copies = f"{total / hidden_copy:.2f}" if hidden_copy else ""
        return f"| {name} | {len(blocks)} | {total / scale:.3f} | {tok} | {copies} |"

    lines += [row(name, blocks) for name, blocks in sorted(terms.items(), key=lambda kv: -sum(b.size for b in kv[1]))]
    lines.append(row("**unexplained**", unexplained))
    if estimate is not None:
        comp = estimate.components
        lines += ["", f"the estimate for this shape: {estimate.peak_bytes / scale:.3f} {unit} at "
                  f"{estimate.peak_phase} (" + ", ".join(f"{k} {v / scale:.3f}" for k, v in comp.items() if v) +
                  f" {unit})"]
    lines += ["", "unexplained blocks (size, read in the model's widths, where made):"]
    for b in unexplained:
        reading = ", ".join(shape.read(b.size)[:3]) if shape is not None else ""
        lines.append(f"  {b.size / MIB:10.1f} MiB  {reading or '-':16s} {phase(b.frames):10s} {where_text(b)}")
    if not unexplained:
        lines.append("  none")
    return "\n".join(lines)


def compact(snapshot: dict, frames_from: int = 0) -> dict:
    """The snapshot with only what `report` reads: per event action, addr, size, stream, time and the frames that
    name something (Python files, autograd's nodes, ATen's kernels), each distinct frame stored once; blocks smaller
    than `frames_from` bytes lose their frames (the attribution names only larger ones)."""
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


def main(argv: list[str] | None = None) -> int:
    from qlora.cli import ArgumentParser, run

    def _main(args: list[str]) -> int:
        parser = ArgumentParser(prog="python -m qlora.report.snapshot", description=__doc__.split("\n\n")[0])
        parser.add_argument("snapshot", help="the allocator's snapshot pickle (.gz or not)")
        parser.add_argument("--recipe", help="the recipe the snapshot's run trained: sizes read in its widths")
        parser.add_argument("--tokens", type=int, help="the run's data.max_seq_len (one row's tokens)")
        parser.add_argument("--override", action="append", default=[], help="a recipe override the run used")
        parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where the run computed")
        parser.add_argument("--min-mib", type=float, default=2.0, help="blocks this large or more are listed")
        parser.add_argument("--compact", help="write the compacted snapshot here (gzip) and stop")
        a = parser.parse_args(args)
        if not 0 <= a.min_mib < float("inf"):  # nan fails too
            parser.error(f"--min-mib={a.min_mib} must be a finite number of MiB >= 0, e.g. 2")
        snapshot = load(a.snapshot)
        if a.compact:
            from qlora.report.recorder import write_snapshot

            write_snapshot(shaped(a.snapshot, compact, snapshot), Path(a.compact))
            print(f"wrote {a.compact} ({Path(a.compact).stat().st_size / MIB:.1f} MiB)")
            return 0
        shape = est = None
        if a.recipe:
            from qlora.config import apply_overrides, load_recipe
            from qlora.memory.arch import load_arch
            from qlora.memory.estimate import estimate

            if not a.tokens:
                raise ConfigError("--recipe needs --tokens: the length of the run's rows")
            cfg = apply_overrides(load_recipe(a.recipe), [*a.override, f"--data.max_seq_len={a.tokens}"])
            shape = shape_for(cfg, a.tokens, a.device)
            est = estimate(cfg, load_arch(cfg), cfg.quant.method, a.device)
        print(shaped(a.snapshot, report, snapshot, shape, int(a.min_mib * MIB), est))
        return 0

    return run(_main, argv)


def shaped(path: str, work: Callable[..., T], snapshot: dict, *args: object) -> T:
    """`work(snapshot, *args)`, with a snapshot whose entries lack what the allocator writes (a segment without
    blocks, an event without an address) named in one line as the file it came from."""
    try:
        return work(snapshot, *args)
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise ConfigError(f"{path} is not an allocator snapshot (its entries lack what torch writes: "
                          f"{type(err).__name__}: {err}): give the file torch.cuda.memory._dump_snapshot wrote") \
            from None


if __name__ == "__main__":
    sys.exit(main())
