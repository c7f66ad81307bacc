"""SDPA as the trainer runs it: a packed row one document at a time, with no T x T mask; and which CUDA kernel.

transformers reads packed documents' boundaries from restarting position ids and, for `sdpa`, builds a boolean mask of
the whole row (masking_utils.sdpa_mask: batch x T x T bytes, 4.3 GB at 65,536 tokens, 90 GB at 300,000). A mask then
keeps SDPA off its flash and cuDNN kernels (torch's check_for_attn_mask) and transformers off grouped-query attention
(integrations/sdpa_attention.use_gqa_in_sdpa: K and V repeated to every query head). Documents in a packed row never
see each other, so here each is one causal SDPA call on its own slice of the row, what flash-attention's varlen kernel
does, on torch's kernels and in memory that grows with T, not T squared.

`model.attn_implementation=sdpa` loads as SDPA_BY_DOCUMENT, registered with transformers' two interfaces:
- its mask function makes no mask unless the caller passed a 2D mask with padding in it (the trainer's rows are
  right-padded, qlora.data.batches.collate, and under causal attention no real token sees the padding, so it passes
  none), or the layer attends within a sliding window shorter than the keys and the attention function cannot keep
  it (a KV cache, a pattern added to the mask, a model type not checked: sliding_window.left_to_blocks). Then
  transformers' own `sdpa_mask`, packing and window included, and the stock path below take over, a batch x T x T
  mask;
- its attention function splits each row where the position ids do not grow by one, as transformers does
  (masking_utils.find_packed_sequence_indices), attends within a layer's sliding window block by block
  (qlora/base/sliding_window.py), and gives a row of one document without a window, a mask or a KV cache to
  transformers' `sdpa_attention_forward` unchanged.

What autograd keeps beyond the stock path (qlora/memory/activations.py counts it): the documents' outputs, which SDPA
saves, are concatenated into o_proj's input, a second T x q copy; in the backward the documents' q, k and v gradients
are concatenated as well, one at a time, so one more T x q at most while the pieces are alive. SDPA's own buffers are
a document's.

On CUDA, SDPA runs cuDNN's attention or FlashAttention-2 (`model.sdpa_backend`; auto is torch's choice), and their
backward allocates differently for grouped-query attention: FlashAttention-2 writes dk and dv at every query head
before summing them (flash_api.cpp mha_bwd), cuDNN sums in the kernel and takes only an fp32 dq accumulator and row
sums as workspace (cudnn-frontend CompositeSDPABackwardNode, through the caching allocator: MHA.cpp). The estimate
counts the one `cuda_kernel` names; a packed row's documents run through FlashAttention-2 (BY_DOCUMENT).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import weakref

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qlora.base.sliding_window import binding, left_to_blocks, within_window
from qlora.config import Config
from qlora.errors import ConfigError

SDPA_BY_DOCUMENT = "qlora_sdpa"
# The position ids last split, and their document lengths: every layer of a forward (and a checkpointed layer's
# recompute) gets the same tensor, and reading it costs a device-to-host copy.
_last: tuple[weakref.ref, list[list[int]] | None] | None = None
# Documents come in every length, and cuDNN's attention builds an execution graph for each new one, tens of ms of host
# apiece (MHA.cpp: the graph cache's key holds s_q and s_kv); FlashAttention-2 takes any length as it comes.
BY_DOCUMENT = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def by_document(cfg: Config) -> bool:
    """Whether a packed row attends one document at a time: packed rows through `sdpa`."""
    return cfg.data.pack and cfg.model.attn_implementation == "sdpa"


def document_lengths(position_ids: torch.Tensor | None) -> list[list[int]] | None:
    """Per row, its documents' lengths: a new document wherever the position does not grow by one. None when no row
    holds more than one."""
    global _last
    if position_ids is None:
        return None
    if _last is not None and _last[0]() is position_ids:
        return _last[1]
    # Only the boundaries come to the host, not a row of 300,000 positions.
    b, t = position_ids.shape
    found = (position_ids[:, 1:] != position_ids[:, :-1] + 1).nonzero().tolist()
    starts: list[list[int]] = [[0] for _ in range(b)]
    for row, at in found:
        starts[row].append(at + 1)
    rows = [[end - start for start, end in zip(s, [*s[1:], t], strict=True)] for s in starts]
    lengths = rows if found else None
    _last = (weakref.ref(position_ids), lengths)
    return lengths


def sdpa_by_document(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (b, nh, T, hd), key and value (b, nkv, T, hd); returns the
    output as (b, T, nh, hd)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    b, t, heads, d = query.shape[0], query.shape[2], query.shape[1], value.shape[3]
    whole = attention_mask is None and causal and t == key.shape[2] > 1  # not a decoding step
    window = binding(module, kwargs, t) if whole else None
    lengths = document_lengths(kwargs.get("position_ids")) if whole else None
    if lengths is not None and len(lengths) == 1 < b:  # one row's position ids for all, as transformers reads them
        lengths = lengths * b
    if lengths is not None and (len(lengths) != b or any(sum(r) != t for r in lengths)):
        lengths = None
        if window is not None:  # its mask was left to the blocks (mask_unless_padded): no stock path keeps the window
            raise ValueError(f"position_ids of shape {tuple(kwargs['position_ids'].shape)} for {b} rows of {t} tokens")
    if lengths is None and window is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # The rows end to end, each document a slice, in (b, T, heads, hd) order: the layout the projections wrote, so
    # that this is a view, and that the documents' gradients concatenate into the one the projections' backward reads.
    docs = [n for row in (lengths or [[t]] * b) for n in row]
    q, k, v = (x.transpose(1, 2).reshape(1, b * t, x.shape[1], x.shape[3]).split(docs, 1) for x in (query, key, value))
    with sdpa_kernel(BY_DOCUMENT):
        if window is not None:
            out = [o for qd, kd, vd in zip(q, k, v, strict=True)
                   for o in within_window(qd, kd, vd, window, dropout, scaling)]
        else:
            out = [F.scaled_dot_product_attention(qd.transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2),
                                                  dropout_p=dropout, is_causal=True, scale=scaling,
                                                  enable_gqa=heads != key.shape[1]).transpose(1, 2)
                   for qd, kd, vd in zip(q, k, v, strict=True)]
    return torch.cat(out, dim=1).view(b, t, heads, d), None


def mask_unless_padded(attention_mask: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor | None:
    """transformers' mask-function signature: no mask, unless a 2D mask with padding in it came with the inputs, or
    the layer attends within a sliding window (Mistral's sliding_window, Gemma 2/3's sliding layers: local_size)
    shorter than the keys that the attention function cannot keep block by block (left_to_blocks: a KV cache, an
    added pattern, a model type not checked), where plain causal attention would let every query see past it."""
    window = kwargs.get("local_size")
    windowed = window is not None and kwargs.get("kv_length", 0) > window
    if (attention_mask is None or bool(attention_mask.all())) and (not windowed or left_to_blocks(kwargs)):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def implementation(name: str) -> str:
    """The name transformers loads for `model.attn_implementation`: sdpa runs by document (registered here, at load:
    transformers' masking code imports torch._dynamo, which the trainer's start-up leaves for later); the others as
    they are."""
    if name != "sdpa":
        return name
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SDPA_BY_DOCUMENT, sdpa_by_document)
    AttentionMaskInterface.register(SDPA_BY_DOCUMENT, mask_unless_padded)
    return SDPA_BY_DOCUMENT


def cudnn_first(capability: tuple[int, int]) -> bool:
    """Whether torch tries cuDNN's attention before FlashAttention-2 on a card of this compute capability. torch
    2.11's rule (sdp_utils.cpp, check_prefer_cudnn_attention): cuDNN newer than 9.15.0 on an sm90 or sm100 card (H100,
    H200, B200; a CUDA 12 build only minor 0 or 3), unless TORCH_CUDNN_SDPA_DEPRIORITIZED=1. The GPU image's torch
    2.11 (CUDA 13) carries cuDNN 9.19."""
    if os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED") == "1" or not torch.backends.cuda.cudnn_sdp_enabled():
        return False
    major, minor = capability
    cuda_major = int((torch.version.cuda or "0").split(".")[0])
    return (torch.backends.cudnn.version() or 0) > 91500 and major in (9, 10) and (cuda_major >= 13 or minor in (0, 3))


@functools.cache
def visible_capability() -> tuple[int, int] | None:
    """The cards' compute capability from nvidia-smi, without setting CUDA up in this process (a parent that measures
    in children, as the benchmarks do, must not hold a CUDA context of its own); None without nvidia-smi or where the
    cards differ."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    caps = {(int(m[1]), int(m[2])) for m in map(re.compile(r"(\d+)\.(\d+)").fullmatch, out) if m}
    return caps.pop() if len(caps) == 1 else None


def cuda_kernel(cfg: Config, masked: bool = False) -> str:
    """The SDPA kernel a CUDA step of `cfg` runs, flash, cudnn or efficient: flash for a packed row's documents
    (BY_DOCUMENT); else auto asks the card this process uses, or the machine's cards; with none to ask, flash, whose
    backward holds more: an upper bound. `masked`, where a layer attends within a sliding window shorter than the row:
    its blocks (qlora/base/sliding_window.py) each carry a mask, which FlashAttention-2 does not take (torch's
    can_use_flash_attention, check_for_attn_mask), and run under BY_DOCUMENT, cuDNN's kept off as for documents (a
    graph for every new shape): efficient, the memory-efficient kernel, whatever model.sdpa_backend says. Not
    measured on a GPU."""
    if masked:
        return "efficient"
    if by_document(cfg):
        return "flash"
    chosen = cfg.model.sdpa_backend
    if chosen == "auto":
        capability = torch.cuda.get_device_capability() if torch.cuda.is_initialized() else visible_capability()
        chosen = "cudnn" if capability is not None and cudnn_first(capability) else "flash"
    return chosen


def use_kernel(cfg: Config, device: torch.device) -> None:
    """Hold torch to `model.sdpa_backend` on a CUDA device, before anything runs."""
    chosen = cfg.model.sdpa_backend
    if device.type != "cuda" or cfg.model.attn_implementation != "sdpa" or chosen == "auto":
        return
    if chosen == "flash":
        torch.backends.cuda.enable_cudnn_sdp(False)  # process-wide: the next in torch's order is flash
        return
    major, minor = torch.cuda.get_device_capability(device)
    if not cudnn_first((major, minor)):
        raise ConfigError(f"model.sdpa_backend=cudnn: torch runs cuDNN's attention first only on sm90/sm100 cards "
                          f"with cuDNN newer than 9.15 (this is sm{major}{minor} with cuDNN "
                          f"{torch.backends.cudnn.version()}, or TORCH_CUDNN_SDPA_DEPRIORITIZED=1 is set): use "
                          "--model.sdpa_backend=auto or flash")
