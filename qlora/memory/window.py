"""A sliding window shorter than the row: what attending within it block by block keeps.

Where a layer attends within a window (Arch.window: Mistral's sliding_window, Gemma 3's sliding layers, Phi-3's,
Qwen's with use_sliding_window) and the row is longer, `sdpa` attention cuts each document into blocks of B queries,
each with the R keys before it and one B x (R + B) mask (qlora/base/sliding_window.py): no b x s x s mask. Symbols
as in estimate.py (b rows of s tokens, T = b s); B and R from the window W (block_size, reach: W and W - 1 rounded
up).

    mask        B (R + B) e     the blocks' additive mask, made once per run and kept (about 2 W^2 e)
    copy        q e             per token and windowed layer: the blocks' outputs, which SDPA saves, concatenated into
                                o_proj's input (as for packed documents, which a packed row's blocks are part of)
    K and V     2 q e (1 + R/B) on CUDA with grouped-query attention, in place of 2 kv e: the memory-efficient kernel
                                takes no grouped heads before pytorch#191085 (torch 2.11's does not), so each block's
                                K and V are repeated to every query head and saved; on the CPU (enable_gqa) none
    backward    as documents    dq, dK and dV, and dq's pieces while they are concatenated (activations.py,
                                sdpa_backward_bytes); the kernel's buffers are a block's, not counted

Measured on CPU (tiny-mistral, window 16, batch 1, fp32, checkpointed; qlora.report.measure) against the same model
without a window: 0.5, 2.1 and 4.1 MiB more at 1,024, 4,096 and 8,192 tokens, the copy, T q e (with the dense mask
that this replaced: 5.4, 82 and 324 MiB). On CUDA, unmeasured: the masked blocks run the memory-efficient kernel
(attention.cuda_kernel, masked; FlashAttention-2 takes no mask, cuDNN's is kept off as for documents).
"""

from __future__ import annotations

from qlora.base.sliding_window import block_size, reach
from qlora.config import Config
from qlora.memory.arch import Arch

MASK_FORMULA = "B (R + B) e (the window's block mask)"
# saved_kv's width where K and V are repeated, in the layer formula's symbols (activations.layer_formula)
REPEATED_KV_FORMULA = "2q (1 + R/B)"


def windowed(cfg: Config, arch: Arch) -> bool:
    """Whether a layer of `arch` attends within a window shorter than the row, block by block: `sdpa` only (eager
    attention counts its own mask; flash_attention_2 takes the window as a number)."""
    return cfg.model.attn_implementation == "sdpa" and arch.window is not None and \
        cfg.data.max_seq_len > arch.window


def mask_bytes(arch: Arch, e: int) -> int:
    """The blocks' additive mask, B x (R + B) in the compute dtype, one for the run."""
    block = block_size(arch.window)
    return block * (reach(arch.window) + block) * e


def saved_kv(arch: Arch, device: str) -> int:
    """Width of the K (and of the V) that SDPA saves per token in a windowed layer: their own heads', or on CUDA
    with grouped-query attention every query head's for the R + B keys of each block of B."""
    kv = arch.kv_heads * arch.head_dim
    if device != "cuda" or arch.kv_heads == arch.heads:
        return kv
    block = block_size(arch.window)
    return -(-arch.heads * arch.head_dim * (reach(arch.window) + block) // block)


def layer_bytes(cfg: Config, arch: Arch, e: int, device: str, documents: bool) -> int:
    """What a windowed layer saves beyond a layer attending to the whole row: the blocks' outputs joined (which a
    layer attending by `documents` keeps too), K and V repeated on CUDA."""
    T, kv = cfg.train.batch_size * cfg.data.max_seq_len, arch.kv_heads * arch.head_dim
    copy = 0 if documents else arch.heads * arch.head_dim * e
    return T * (copy + 2 * (saved_kv(arch, device) - kv) * e)


def note(cfg: Config, arch: Arch, device: str) -> str:
    """The assumption in words, for the estimate's list."""
    share = "every layer" if arch.windowed_layers == arch.layers else \
        f"{arch.windowed_layers} of {arch.layers} layers"
    repeated = device == "cuda" and arch.kv_heads != arch.heads
    return (f"sliding window of {arch.window} tokens ({share}) shorter than the row: attended in blocks of "
            f"{block_size(arch.window)} queries with one mask, no s x s mask; the blocks' outputs joined into "
            "o_proj's input (qlora/memory/window.py)" +
            ("; on CUDA the memory-efficient kernel, with K and V repeated to every query head a block at a time "
             "(torch before pytorch#191085), not measured on a GPU" if repeated else
             "; on CUDA the memory-efficient kernel, not measured on a GPU" if device == "cuda" else ""))
