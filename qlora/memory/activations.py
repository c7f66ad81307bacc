"""What a training step keeps beyond the weights, per token: a decoder layer's saved tensors (with or without sequence
tiles), the working set of its backward, the loss; and where the checkpointed layer inputs wait (the checkpoint plan).

Symbols as in estimate.py: h hidden, i intermediate, q = nh*hd and kv = nkv*hd attention widths, nh heads, V
vocabulary, r LoRA rank, e bytes per element of the compute dtype, T tokens of the micro-batch, t tokens per tile.

What autograd saves in one Llama decoder layer (pre-norm RMSNorm, GQA attention through an SDPA flash kernel, gated
MLP), checked tensor by tensor against torch's saved-tensor hooks on the tiny Llama (tests/test_memory.py):

    norms       8h + 8          each RMSNorm's fp32 input and rsqrt (at fp32 the first one is the layer input itself)
    attention   e(2q + 2kv) + 4nh   SDPA's query, key, value, output and logsumexp (the output is o_proj's input)
    MLP         3ie             gate, up and act(gate)
    inputs      e(h + h + i)    the normed inputs of q/k/v and of gate/up, and act(gate)*up for down: each kept once,
                                by an adapter without dropout (a frozen weight needs no input for its backward)
    adapters    r e             each adapter's A x, for B's gradient
    dropout     in (e + m)      each adapter's dropped input and its mask: m = 1 byte on CUDA (a bool from the fused
                                kernel), e on CPU (the mask is a tensor of the compute dtype there)

Eager attention (model.attn_implementation=eager, transformers' eager_attention_forward) keeps the scores: per row
and head an s x s softmax output in fp32 and, below fp32, its cast for the matmul with V, e; its backward holds
two more fp32 score tensors (recorded on the narrow Llama at 2,048 tokens: three of 4 bytes at the peak); it keeps
q, K and V repeated to every head and its output's copy, 4 q e, and the model one s x s mask in the compute dtype.

Packed rows (data.pack) through sdpa attend one document at a time (qlora/base/attention.py): no T x T mask, but
o_proj's input is then a copy of the documents' outputs, which SDPA keeps too, q e more. A sliding window shorter than
the row is attended block by block, packed or not: o_proj's input is the blocks' outputs joined, as for documents; the
rest of its terms are window.py's.

Phi-3 (Arch.fused) computes q, k and v in one qkv_proj and gate and up in one gate_up_proj, each adapted whole; checked
tensor by tensor on tiny-phi3 as on the Llama. Its V is a view of qkv_proj's output, so SDPA keeps that output whole,
e(q + kv) more than its V; its rotary embedding writes q in the heads' layout, SDPA its output alike, and transformers
copies that for o_proj, q e more (kept by o_proj's adapter, as for documents). gate and up are halves of one output,
which the activation keeps whole (gate is a view of it) and the product up: with act(gate), 3ie, as for a Llama.

A tiled module (qlora/levers/tiling/) keeps only its input at full length; the rest exists for one tile at a time.
Tiled norms (train.tile_norms) keep their bf16 inputs: the first is the layer's input itself (which the checkpoint plan
counts), the second the residual stream after attention, h e. Each is folded into the tiles it feeds (the input norm
into q/k/v's when they are tiled, the post-attention norm into the MLP's), which then keep that input instead of a
normalised copy: no "(tile input)" h e for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora.base.attention import by_document, cuda_kernel
from qlora.config import Config
from qlora.errors import ConfigError
from qlora.levers.lm_head.memory import FORMULA as HEAD_FORMULA
from qlora.levers.lm_head.memory import dequantised_bytes
from qlora.levers.lm_head.settings import LM_HEAD
from qlora.levers.loss.memory import logits_bytes
from qlora.levers.loss.settings import LIGER
from qlora.levers.tiling import settings as tiling
from qlora.levers.tiling.memory import mlp_tile_bytes, norm_tile_bytes, projection_tile_bytes
from qlora.memory import window
from qlora.memory.arch import Arch

# The linear layers by the input they read: the input norm's output (q/k/v, Phi-3's fused qkv_proj), the
# post-attention norm's (gate/up, Phi-3's gate_up_proj), act(gate) * up (down).
QKV, GATE_UP = ("q_proj", "k_proj", "v_proj", "qkv_proj"), ("gate_proj", "up_proj", "gate_up_proj")
MLP = (*GATE_UP, "down_proj")
PROJECTIONS = (*QKV, "o_proj")
COPY = "SDPA's output copied: the documents' or blocks' joined, Phi-3's from its heads' layout"  # o_proj's input
# fp32 tensors of one hidden state's width that an RMSNorm's backward holds at once (transformers' LlamaRMSNorm upcasts
# to fp32; torch's autograd formulas, FunctionsManual.cpp): MulBackward0's gradient of the fp32 input, waiting to be
# summed; MeanBackward1's mean gradient, expanded and divided; PowBackward0's x^1, 2 x^1 and grad * 2 x. Found at the
# peak of a bf16 step, tensor by tensor, by qlora/report/recorder.py (tests/test_snapshot.py).
NORM_BACKWARD_FP32 = 5


def adapted_layers(arch: Arch, targets: list[str]) -> dict[str, tuple[int, int]]:
    shapes = arch.linear_shapes
    if targets == ["all-linear"]:
        return shapes
    chosen = {name: shape for name, shape in shapes.items() if name in targets}
    if not chosen:
        raise ConfigError(f"lora.targets={','.join(targets)}: the estimator knows all-linear and {', '.join(shapes)}")
    return chosen


def mask_bytes(e: int, device: str) -> int:
    """Bytes per element of LoRA dropout's saved mask."""
    return 1 if device == "cuda" else e


@dataclass(frozen=True)
class Layer:
    """Bytes per token of one decoder layer's activations, split by who keeps them."""

    norms: int
    attention: int
    mlp: int
    inputs: dict[str, int]
    """Saved inputs of the linear layers, by the group that reads them: qkv, mlp (gate/up), down, and o when it is not
    SDPA's output itself (attention by document)."""
    adapters: dict[str, int]
    """Each adapted layer's A x and (with dropout) its dropped input and mask."""
    full_norm_outputs: int = 0
    """full fine-tuning: the norms' weights train, and each keeps its normalised input."""

    @property
    def saved(self) -> int:
        return self.norms + self.attention + self.mlp + sum(self.inputs.values()) + sum(self.adapters.values()) + \
            self.full_norm_outputs


def eager(cfg: Config) -> bool:
    """Whether attention is transformers' eager path, which stores s x s scores (the module docstring)."""
    return cfg.model.attn_implementation == "eager"


def score_bytes(e: int) -> tuple[int, int]:
    """Eager attention's s x s terms of one layer, per score (b nh s^2 of them): (saved, its backward's beyond)."""
    cast = e if e != 4 else 0  # the softmax output's cast to the compute dtype, the same tensor at fp32
    return 4 + cast, 8 - cast


def whole_qkv(arch: Arch, cfg: Config, device: str) -> bool:
    """Whether attention keeps Phi-3's whole qkv_proj output: its V is a view of it, which SDPA saves as it came,
    unless a window's blocks repeat V to every query head first, a copy (CUDA, window.saved_kv). Eager attention's
    matmul saves copies of its own (measured on CPU: with grouped heads and without)."""
    if not arch.fused or eager(cfg):
        return False
    return not window.windowed(cfg, arch) or window.saved_kv(arch, device) == arch.kv_heads * arch.head_dim


def layer_terms(arch: Arch, method: str, cfg: Config, e: int, device: str, tiled: bool = False,
                tiled_projections: bool = False, tiled_norms: bool = False) -> Layer:
    """What one recomputed layer keeps at full length; with `tiled`, the MLP (and with `tiled_projections`, the
    q/k/v/o projections, with `tiled_norms` the two norms) keep only their input."""
    h, i, q, kv = arch.hidden, arch.intermediate, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    norms = h * e if tiled_norms else 8 * h + 8
    masked = window.windowed(cfg, arch)
    saved_kv = window.saved_kv(arch, device) if masked else kv  # on CUDA, a window's blocks may repeat K and V
    attention, mlp = e * (2 * q + 2 * saved_kv) + 4 * arch.heads, 0 if tiled else 3 * i * e
    if eager(cfg):  # q, K and V at every head, and the output's copy (o_proj's input); the scores apart
        attention = 4 * q * e
    if whole_qkv(arch, cfg, device):
        attention += e * (q + kv)
    # o_proj's input is SDPA's output, which SDPA keeps anyway; by document or block it is their concatenation, a copy.
    # Phi-3's rotary embedding writes q as (b, nh, s, hd) (its cat with the part left unrotated), and SDPA its output
    # alike, which transformers copies into (b, s, q) for o_proj (measured on CPU; flash and cuDNN allocate it as q).
    copy = q * e if by_document(cfg) or masked or (arch.fused and not eager(cfg)) else 0
    if method == "full":  # every linear layer trains: each keeps its input; the norms' weights keep theirs
        return Layer(norms, attention, 3 * i * e, {"qkv": h * e, "mlp": h * e, "down": i * e, "o": copy}, {},
                     2 * h * e)
    adapted = adapted_layers(arch, cfg.lora.targets)
    drop, m = cfg.lora.dropout > 0, mask_bytes(e, device)
    in_tile = set(MLP if tiled else ()) | set(PROJECTIONS if tiled_projections else ())
    adapters = {n: cfg.lora.r * e + (a * (e + m) if drop else 0) for n, (a, _) in adapted.items() if n not in in_tile}
    # An input is kept once if an adapter reads it undropped, or if a tiled module keeps it for its recompute; a norm
    # folded into the tiles it feeds (qlora/levers/tiling/tiles.py) leaves them its own input, counted with the norms.
    fold_qkv, fold_mlp = tiled_norms and tiled_projections, tiled_norms
    inputs = {"qkv": h * e if ((not drop and any(n in adapted for n in QKV)) or tiled_projections) and not fold_qkv
              else 0,
              "mlp": h * e if ((not drop and any(n in adapted for n in GATE_UP)) or tiled) and not fold_mlp else 0,
              "down": i * e if not drop and "down_proj" in adapted and not tiled else 0,
              "o": copy if (not drop and "o_proj" in adapted) or tiled_projections else 0}
    return Layer(norms, attention, mlp, inputs, adapters)


def layer_formula(layer: Layer, tiled: bool, tiled_projections: bool, tiled_norms: bool = False,
                  kv: str = "2kv", eager_scores: bool = False, whole: bool = False) -> str:
    """`layer`'s terms in symbols; `kv`: what SDPA saves of K and V per token, their own width or (a sliding window's
    blocks on CUDA) window.REPEATED_KV_FORMULA; `eager_scores`: eager attention, which saves q, K and V at every
    head and its output instead (its scores counted apart); `whole`: Phi-3's qkv_proj output kept whole (whole_qkv)."""
    repeated = "" if kv == "2kv" else " (K and V repeated to every query head: R + B keys for each block of B queries)"
    attention = "4 q e (eager: q, K and V at every head, the output)" if eager_scores else \
        f"e(2q + {kv}) + 4nh{repeated}" + (" + e(q + kv) (V a view of qkv_proj's output, kept whole)" if whole else "")
    parts = ["he (tiled norms' input)" if tiled_norms else "8h + 8", attention]
    if not tiled:
        parts.append("3ie")
    if layer.full_norm_outputs:
        return " + ".join(parts + ["e(2h + i)" + (f" + qe (o_proj's, {COPY})" if layer.inputs["o"] else ""), "2he"])
    parts += [{"qkv": "he", "mlp": "he", "down": "ie", "o": f"qe ({COPY})"}[k] +
              (" (tile input)" if (k == "mlp" and tiled) or (k in ("qkv", "o") and tiled_projections) else "")
              for k, v in layer.inputs.items() if v]
    if layer.adapters:
        parts.append(f"r e + dropout's in (e + m), for {len(layer.adapters)} untiled adapters")
    return " + ".join(parts)


def sdpa_backward_bytes(arch: Arch, e: int, kernel: str, documents: bool = False) -> int:
    """Per token, what SDPA's backward allocates: dq, dk, dv and the kernel's buffers. `kernel`: flash
    (FlashAttention-2 on CUDA, flash_api.cpp mha_bwd: with grouped-query attention dk and dv first at every query head,
    an fp32 dq accumulator, fp32 softmax row sums), cudnn (cuDNN's, cudnn-frontend's CompositeSDPABackwardNode: the
    fp32 dq accumulator and row sums; dk and dv summed over the group in the kernel), efficient (the memory-efficient
    kernel, which runs a sliding window's blocks only: its buffers a block's, not counted) or cpu (torch's flash kernel,
    measured on torch 2.13: dk and dv at every query head, plus a few MiB of per-thread blocks that do not grow with
    the sequence, not counted). By `documents` (qlora/base/attention.py; a window's blocks too): the buffers are one
    document's (at most the row's), and once every document is done its dq, dk and dv pieces are concatenated, dq the
    largest, q e more while the pieces are alive."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    expanded = q * e if arch.kv_heads != arch.heads else 0  # dk or dv at every query head
    buffers = {"flash": 2 * expanded + 4 * q + 4 * arch.heads, "cudnn": 4 * q + 4 * arch.heads, "efficient": 0,
               "cpu": expanded}[kernel]
    return e * (q + 2 * kv) + (max(buffers, q * e) if documents else buffers)


def mlp_saved(arch: Arch, method: str, cfg: Config, e: int, device: str) -> int:
    """Per token, what the untiled MLP saves: gate, up, act(gate), down's input and its adapters' saved tensors."""
    full = layer_terms(arch, method, cfg, e, device)
    return full.mlp + full.inputs["down"] + sum(full.adapters.get(n, 0) for n in MLP)


def projection_saved(arch: Arch, method: str, cfg: Config, e: int, device: str) -> dict[str, tuple[int, int, int]]:
    """Per token and projection: its adapter's saved bytes, in features, out features."""
    full = layer_terms(arch, method, cfg, e, device)
    return {n: (full.adapters.get(n, 0), a, o) for n, (a, o) in arch.linear_shapes.items() if n in PROJECTIONS}


def layer_backward(arch: Arch, method: str, cfg: Config, e: int, device: str, T: int) -> tuple[int, int, str]:
    """(saved, working set, formula) of one layer's backward: what the layer saved, and beyond it the largest of three
    moments, the MLP's backward, the post-attention norm's and SDPA's."""
    t = cfg.train
    tiled = tiling.tiled(cfg, method, T)
    proj, norms_tiled = tiled and t.tile_projections, tiling.norms_tiled(cfg, method, T)
    layer = layer_terms(arch, method, cfg, e, device, tiled, proj, norms_tiled)
    h, i, q = arch.hidden, arch.intermediate, arch.heads * arch.head_dim
    saved = T * layer.saved
    tile = min(t.tile_size, T) if tiled else 0
    # The MLP's backward: the layer output's gradient and the MLP input's, and the MLP's two intermediate gradients
    # at full length, or one tile's working set.
    # A norm folded into the tiles runs its backward after the tile's own is done with: the larger of the two.
    mlp = 2 * T * h * e + (tile * max(mlp_tile_bytes(mlp_saved(arch, method, cfg, e, device), h, i, e),
                                      norm_tile_bytes(h) if norms_tiled else 0) if tiled else 2 * T * i * e)
    mlp_side = layer.mlp + layer.inputs["mlp"] + layer.inputs["down"] + sum(layer.adapters.get(n, 0) for n in MLP)
    # The post-attention norm's backward: the MLP side is done with, the layer output's gradient and the norm's fp32
    # temporaries are alive beside everything attention saved. Folded into the MLP's tiles (tile_norms), its backward
    # is theirs.
    norm = 0 if norms_tiled else T * (h * e + NORM_BACKWARD_FP32 * 4 * h - mlp_side)
    # SDPA's backward: the MLP side and the second norm are done with; the residual stream's gradient, the attention
    # output's and SDPA's own buffers are alive (o_proj's tiles are done, q/k/v's not begun).
    second_norm = h * e if norms_tiled else 4 * h + 4  # its saved input (and rsqrt)
    done = mlp_side + second_norm + layer.adapters.get("o_proj", 0) + layer.inputs["o"]
    masked = window.windowed(cfg, arch)
    repeated = masked and window.saved_kv(arch, device) != arch.kv_heads * arch.head_dim
    kernel = cuda_kernel(cfg, masked) if device == "cuda" else "cpu"
    grads = sdpa_backward_bytes(arch, e, kernel, by_document(cfg) or masked)
    if masked and arch.windowed_layers < arch.layers:  # Gemma 3's full-attention layers, through the row's kernel
        row_kernel = cuda_kernel(cfg) if device == "cuda" else "cpu"
        if (row := sdpa_backward_bytes(arch, e, row_kernel, by_document(cfg))) > grads:  # the formula names it
            grads, kernel = row, row_kernel
    sdpa = -T * done + T * (h * e + q * e + grads)
    scores_fx = ""
    if eager(cfg):
        scores = t.batch_size * arch.heads * cfg.data.max_seq_len ** 2
        kept, held = score_bytes(e)
        saved, sdpa, scores_fx = saved + kept * scores, sdpa + held * scores, \
            f" + b nh s^2 x {kept} (eager attention's scores)"
    moments = {"MLP backward": mlp, "post-attention norm's backward": norm, "SDPA backward": sdpa}
    if proj:  # q/k/v's tiles, after SDPA's backward: what attention saved is freed; dq, dk and dv wait beside the
        # residual stream's gradient and one tile's working set (the input norm's, folded in, after the projection's)
        kv = arch.kv_heads * arch.head_dim
        moments["q/k/v tiles' backward"] = -T * (done + layer.attention) + T * (h * e + e * (q + 2 * kv)) + \
            tile * max(projection_tile_bytes(projection_saved(arch, method, cfg, e, device), e),
                       norm_tile_bytes(h) if norms_tiled else 0)
    phase = max(moments, key=moments.get)
    at = {"MLP backward": "2 T h e + " + (f"t x one MLP tile's working set (t={tile}"
                                          f"{', the norm folded in' if norms_tiled else ''})" if tiled else "2 T i e"),
          "post-attention norm's backward": f"T (h e + {NORM_BACKWARD_FP32} x 4h) (the layer output's gradient and "
                                            "the norm's fp32 temporaries), less the MLP side",
          "q/k/v tiles' backward": f"T (h e + e (q + 2 kv)) + t x one projection tile's working set (t={tile}), less "
                                   "what attention saved and the MLP side",
          "SDPA backward": f"T (h e + q e) + SDPA's gradients and buffers ({kernel})" +
                           (f" + b nh s^2 x {score_bytes(e)[1]} (the scores' fp32 gradients)"
                            if eager(cfg) else "") + ", less the MLP side"}[phase]
    terms = layer_formula(layer, tiled, proj, norms_tiled, window.REPEATED_KV_FORMULA if repeated else "2kv",
                          eager(cfg), whole_qkv(arch, cfg, device))
    return saved, moments[phase], f"T [{terms}]{scores_fx} + at the {phase}: {at}"


def loss_bytes(arch: Arch, method: str, cfg: Config, e: int, device: str) -> tuple[int, str]:
    """Bytes alive beyond the layers in the loss's backward (final norm, labels, logits), and the formula."""
    b, s = cfg.train.batch_size, cfg.data.max_seq_len
    T, N, h, V = b * s, b * (s - 1), arch.hidden, arch.vocab
    # The final norm's fp32 input and rsqrt (tiled: its bf16 input); the labels (int64) and their mask.
    logits, logits_fx = logits_bytes(cfg, method, device, N, V, h, e)
    norm, norm_fx = (h * e, "T h e") if tiling.norms_tiled(cfg, method, T) else (4 * h + 4, "T(4h + 4)")
    total, formula = T * norm + 9 * N + logits, f"{norm_fx} + 9N + {logits_fx}"
    if LIGER.active(cfg, method, device):  # the fused kernel takes the head's weight as it is
        return total, formula
    if method == "full":
        total, formula = total + T * h * e, formula + " + T h e"
    if LM_HEAD.active(cfg, method, device):  # the NF4 head, dequantised to compute
        total, formula = total + dequantised_bytes(V, h, e, cfg.quant.blocksize), f"{formula} + {HEAD_FORMULA}"
    return total, formula
