"""A sliding window attended block by block: memory and work that grow with T x W, not T^2.

A layer that attends within a window of W tokens (Mistral's sliding_window, Gemma 3's sliding layers, Phi-3's, Qwen2's
with use_sliding_window) lets each query see the W keys that end at it. transformers gives SDPA that as a boolean
batch x T x T mask (masking_utils.sdpa_mask), which SDPA turns into an additive copy in every layer, with K and V
repeated to every query head: 324 MiB more than no window at 8,192 tokens on tiny-mistral, growing as T^2.

Here each document of a row (qlora/base/attention.py splits packed rows) is cut into blocks of B queries. A block
attends only the keys its window can reach, the R before it (W - 1, rounded up to 8) and its own, through one
B x (R + B) additive mask that is the same for every block (the first and the last take a slice of it), made once per
window, dtype and device. K and V are sliced, not copied; what SDPA saves is a block's own (its output and logsumexp),
T x q in all, as for documents. A document no longer than W attends causally, as any document does.

Grouped-query attention runs with enable_gqa where the kernel takes it beside a mask: torch's CPU flash kernel; on
CUDA the memory-efficient kernel (FlashAttention-2 takes no mask), which takes grouped heads only from pytorch#191085
on. Before that SDPA would fall back to its math kernel, saving B x (R + B) scores at every head for each block: the
block's K and V are repeated to every query head instead (transformers' repeat_kv, a block at a time).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# The model types whose attention modules pass the layer's window to the attention function (sliding_window=, as
# FlashAttention-2 needs it; transformers 5.17 and 5.25 alike): their mask can be left to the blocks. Any other keeps
# transformers' dense mask and its stock path.
BY_BLOCKS = ("mistral", "gemma3_text", "phi3", "qwen2", "qwen3")
# A block of B queries computes all B x (R + B) scores, masked or not (the kernels take the mask as a bias), of which
# B x W count: (W + B) / W the window's work. Smaller blocks waste less, but each is an SDPA call forward, in the
# recompute and backward, and in the backward a slice of the document's K and V gradient, written into a zero-filled
# gradient of the whole document: T / B of them, T^2 / B in all. B = W does twice the window's work, and its fills
# are a few % of attention's time by arithmetic (at 128K tokens Mistral's W = 4,096 is 32 blocks; not measured on a
# GPU); its mask is 2 W^2 elements, 64 MiB in bf16 at 4,096. Below 256 queries a block is a few kernel tiles and the
# calls' own cost dominates.
MIN_BLOCK = 256


def block_size(window: int) -> int:
    """Queries per block: the window rounded up to 64 (a multiple of 8, which the memory-efficient kernel's mask needs
    of its rows and where a slice of it starts), at least MIN_BLOCK."""
    return max(-(-window // 64) * 64, MIN_BLOCK)


def reach(window: int) -> int:
    """Keys before a block that its queries may see: W - 1, rounded up to 8 (the extra ones masked)."""
    return -(-(window - 1) // 8) * 8


def binding(module: torch.nn.Module, kwargs: dict, tokens: int) -> int | None:
    """The layer's window where it is shorter than the row's `tokens` (the keys): passed as sliding_window (Mistral,
    Phi-3 from the config; Gemma 3 and Qwen2 their layer's, None for a full-attention layer), else the module's."""
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    return window if window is not None and tokens > window else None


def configured_window(config: object) -> int | None:
    """The window a model's sliding layers attend within, from its transformers config, where the blocks take it
    (BY_BLOCKS): sliding_window, which Qwen's configs leave None without use_sliding_window, where layer_types (if
    given) hold a sliding layer."""
    config = config.get_text_config()
    window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if config.model_type not in BY_BLOCKS or window is None or (types is not None and "sliding_attention" not in types):
        return None
    return window


def left_to_blocks(kwargs: dict) -> bool:
    """transformers' mask-function arguments: whether a windowed layer's mask is the plain causal window of a whole
    row (no cache: the keys are the queries; no patterns added: use_vmap; not bidirectional), of a model type whose
    layers pass the window to the attention function, which then attends block by block."""
    config = kwargs.get("config")
    offsets = kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)
    return getattr(config, "model_type", None) in BY_BLOCKS and kwargs.get("q_length") == kwargs.get("kv_length") \
        and all(isinstance(o, int) and o == 0 for o in offsets) and not kwargs.get("use_vmap") \
        and "allow_is_bidirectional_skip" not in kwargs


@functools.lru_cache(maxsize=8)
def window_mask(window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A full block's additive mask, (B, R + B): query i sees key column c where i + R - W < c <= i + R. Made outside
    inference mode, which a first call in generate might be in, so that training can save it."""
    block, before = block_size(window), reach(window)
    with torch.inference_mode(False):
        query = torch.arange(block, device=device)[:, None] + before
        key = torch.arange(before + block, device=device)[None, :]
        seen = (key <= query) & (key > query - window)
        return torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))


def grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, dropout: float) -> bool:
    """Whether SDPA takes a block's K and V at their own heads (enable_gqa) with a mask, without its math kernel."""
    if query.device.type != "cuda":
        return True
    params = torch.backends.cuda.SDPAParams(query, key, value, mask, dropout, False, True)
    return torch.backends.cuda.can_use_efficient_attention(params, False)


def within_window(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int, dropout: float,
                  scaling: float | None) -> list[torch.Tensor]:
    """One document's attention within its window: query (1, n, heads, hd), key and value (1, n, kv heads, hd), views
    of the row; the output as pieces (1, m, heads, hd), in order."""
    n, groups = query.shape[1], query.shape[2] // key.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    if n <= window:
        return [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                               enable_gqa=groups > 1).transpose(1, 2)]
    block, before = block_size(window), reach(window)
    mask, gqa, out = window_mask(window, query.dtype, query.device), None, []
    for start, qb in zip(range(0, n, block), q.split(block, 2), strict=True):
        m, first = qb.shape[2], max(start - before, 0)
        kb, vb = k[:, :, first:start + m], v[:, :, first:start + m]
        bias = mask[:m, before - (start - first):before + m]  # key columns from `first`
        gqa = grouped(qb, kb, vb, bias, dropout) if gqa is None else gqa
        if not gqa and groups > 1:
            kb, vb = kb.repeat_interleave(groups, 1), vb.repeat_interleave(groups, 1)
        out.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, dropout_p=dropout, scale=scaling,
                                                  enable_gqa=gqa and groups > 1).transpose(1, 2))
    return out
