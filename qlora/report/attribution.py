"""What each block alive at a snapshot's peak is: the estimator's term it belongs to (qlora/memory/terms.py,
activations.py), read from where in the step its stack says it was made (load, forward, recompute, tile, loss,
backward, optimizer) and from its size in the model's widths ("T h e": tokens x hidden x bytes per element).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qlora.report.replay import Block, Peak

if TYPE_CHECKING:  # the hints only: the command imports the recipe's modules only when given --recipe
    from qlora.config import Config

ROUND = 512  # the CUDA caching allocator rounds every block up to this (kMinBlockSize)
ALIGN_TOKENS = (1, 128, 256)  # FlashAttention pads the query length of its fp32 buffers to a multiple of 128


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


def shape_for(cfg: Config, tokens: int, device: str) -> Shape:
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
