"""A sliding window shorter than the row: the mask it costs, and what SDPA does differently when it is given one.

Where a layer attends within a window (Arch.window: Mistral's sliding_window, Gemma 3's sliding layers) and the row
is longer, `sdpa` attention takes a mask (qlora/base/attention.py, mask_unless_padded: transformers' sdpa_mask, packing
included) and the stock path, packed rows too. Symbols as in estimate.py (b rows of s tokens, T = b s).

    mask        b s^2           the boolean mask, (b, 1, s, s): the model makes one per forward for its windowed
                                layers (create_sliding_window_causal_mask; a full-attention layer gets none unless
                                the row is padded) and every layer takes it as an input, so the checkpointed layers
                                keep it until the backward is done
    additive    b s^2 e         per windowed layer: SDPA turns the boolean mask into an additive one in the query's
                                dtype (torch's convert_boolean_attn_mask, at::where) on every call, and the kernel
                                saves it for its backward; checkpointed, only the layer being recomputed holds one
    K and V     2 (q - kv) e    per token: with a mask transformers gives SDPA no enable_gqa (use_gqa_in_sdpa) but K
                                and V repeated to every query head (repeat_kv), the copies SDPA saves
    backward    3 q e + buffers dq, dK and dV at every query head, before repeat_kv's backward sums dK and dV

On the CPU torch's flash kernel takes the mask (no math path, no s x s scores): measured on tiny-mistral (window 16,
batch 1, fp32, checkpointed; qlora.report.measure) against the same model without a window, the peak was 5.5, 82
and 324 MiB higher at 1,024, 4,096 and 8,192 tokens: 5 b s^2 + 2 (q - kv) e T to the MiB, its buffers none that grow.
On CUDA, unmeasured: FlashAttention-2 takes no mask, so the kernel is cuDNN's where torch puts it first, else the
memory-efficient one (attention.cuda_kernel, masked); both take the additive mask as a bias and save it, and their
buffers are assumed cuDNN's as counted unmasked, an fp32 dq accumulator and row sums, 4 q + 4 nh.
"""

from __future__ import annotations

from qlora.config import Config
from qlora.memory.arch import Arch

MASK_FORMULA = "b s^2 (the window's boolean mask)"
ADDITIVE_FORMULA = "b s^2 e (the window's additive mask, SDPA's; K and V kept at every query head, 2q e for 2kv e)"


def windowed(cfg: Config, arch: Arch) -> bool:
    """Whether a layer of `arch` attends within a window shorter than the row, through a mask: `sdpa` only (eager
    attention counts its own mask; flash_attention_2 takes the window as a number)."""
    return cfg.model.attn_implementation == "sdpa" and arch.window is not None and \
        cfg.data.max_seq_len > arch.window


def mask_bytes(cfg: Config) -> int:
    """The boolean mask every layer takes as input: b s^2."""
    return cfg.train.batch_size * cfg.data.max_seq_len ** 2


def additive_bytes(cfg: Config, e: int) -> int:
    """What one windowed layer's SDPA saves of the mask: b s^2 e."""
    return mask_bytes(cfg) * e


def repeated_kv(arch: Arch) -> int:
    """Width of the K and V that SDPA saves when given a mask: every query head's (repeat_kv), kv without grouping."""
    return arch.heads * arch.head_dim


def layer_bytes(cfg: Config, arch: Arch, e: int) -> int:
    """What a windowed layer saves beyond a layer attending to the whole row: the additive mask, K and V repeated."""
    T, kv = cfg.train.batch_size * cfg.data.max_seq_len, arch.kv_heads * arch.head_dim
    return additive_bytes(cfg, e) + 2 * T * (repeated_kv(arch) - kv) * e


def backward_bytes(arch: Arch, e: int, kernel: str) -> int:
    """Per token, what a masked SDPA's backward allocates: dq, dK and dV at every query head, and the kernel's buffers
    (cpu: none that grow with the row, measured; cudnn and efficient: assumed 4 q + 4 nh, unmeasured)."""
    q = arch.heads * arch.head_dim
    return 3 * q * e + (0 if kernel == "cpu" else 4 * q + 4 * arch.heads)


def note(cfg: Config, arch: Arch, device: str) -> str:
    """The assumption in words, for the estimate's list."""
    share = "every layer" if arch.windowed_layers == arch.layers else \
        f"{arch.windowed_layers} of {arch.layers} layers"
    kept = "the layer being recomputed keeps" if cfg.train.gradient_checkpointing else "each windowed layer keeps"
    return (f"sliding window of {arch.window} tokens ({share}) shorter than the row: one boolean b x s x s mask per "
            f"forward, held to the backward's end, and {kept} its additive copy in the compute dtype, with K and V "
            "repeated to every query head (qlora/memory/window.py)" +
            ("; on CUDA the kernel is not FlashAttention-2 (no mask), its buffers assumed, not measured on a GPU"
             if device == "cuda" else ""))
