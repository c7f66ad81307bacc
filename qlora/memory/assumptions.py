"""How the estimate takes the step, in words: the method's dtypes and optimizer, the batch, checkpointing, the loss
and attention, the device's own rules, and the memory levers in effect. The estimate carries them beside its figures
(`Estimate.assumptions`, `Estimate.levers`), and the report prints them.
"""

from __future__ import annotations

from qlora.base.attention import by_document, cuda_kernel
from qlora.config import Config
from qlora.levers import counted
from qlora.memory.activations import eager
from qlora.memory.terms import HOST_RUNTIME, OUTSIDE_BEYOND_CONTEXT, RESERVE_HIDDEN_STATES

ALLOCATOR = (f"PyTorch's caching allocator reserves more than the tensors, and memory outside it grows beyond the "
             f"context: the allocator's margin, {RESERVE_HIDDEN_STATES} T h e + {OUTSIDE_BEYOND_CONTEXT / 2**30:.1f} "
             "GiB, fitted to the 70B recipe on an H200 at 30K-58K tokens with expandable segments (which qlora sets "
             "unless PYTORCH_CUDA_ALLOC_CONF says otherwise) and the norms untiled (their fp32 blocks, which "
             "train.tile_norms removes, may have made part of it), is counted beside the peak: a card must hold both")


def levers(cfg: Config, method: str, device: str) -> list[str]:
    """The memory levers this estimate counts and the speed levers that hold memory it counts (train.dequant_once's
    copies, train.reuse_dequant's layer), each as its lever says what it does (where the layer inputs wait is the
    checkpoint plan's to say: `Estimate.checkpoints`), and the 8-bit optimizer's moments."""
    out = counted(cfg, method, device)
    if cfg.train.optimizer == "paged_adamw_8bit":
        out.append("paged_adamw_8bit: 8-bit moments")
    return out


def attention_text(cfg: Config, device: str) -> str:
    """How the estimate takes attention: which kernel and what it stores."""
    if eager(cfg):
        return "eager attention: every head's s x s scores stored, in fp32"
    kernel = {"flash": "FlashAttention-2's, which writes dk and dv at every query head first",
              "cudnn": "cuDNN's, which sums dk and dv over the group in the kernel"}
    if by_document(cfg):
        return "attention through SDPA, packed rows one document at a time, no T x T mask (qlora/base/attention.py)" + \
            ("; its backward's buffers FlashAttention-2's, which runs the documents" if device == "cuda" else "")
    chosen = cuda_kernel(cfg)
    why = f"model.sdpa_backend={chosen}" if cfg.model.sdpa_backend != "auto" else \
        "torch's choice on this machine's card" if chosen == "cudnn" else "torch's on a card other than an " \
        "H100/H200/B200, and the larger of the two where no card is at hand"
    return f"attention through SDPA, no s x s matrix stored; its backward's buffers {kernel[chosen]} ({why})" \
        if device == "cuda" else "attention through SDPA's flash kernel, no s x s matrix stored"


def assumptions(cfg: Config, method: str, dname: str, device: str) -> list[str]:
    t, cuda = cfg.train, device == "cuda"
    optimizer = {"adamw": "torch AdamW (moments in the parameter dtype)",
                 "paged_adamw_8bit": "bitsandbytes paged AdamW with 8-bit moments",
                 "paged_adamw_32bit": "bitsandbytes paged AdamW with fp32 moments"}[t.optimizer]
    adapters = f"adapters and their gradients in {dname}" if dname == "fp32" else \
        f"adapters in {dname}, with fp32 master copies and fp32 gradients (qlora/adapters/master.py)"
    # The host optimizer steps fp32 masters of every 16-bit weight, full fine-tuning's too (count_trained).
    masters = "fp32 master copies in host memory (train.optimizer_on_cpu)" if cuda and t.optimizer_on_cpu and \
        dname != "fp32" else "no fp32 master copy (as qlora.train runs it: mixed-precision trainers that keep one " \
        "add 4 bytes per parameter)"
    out = [{"full": f"every weight and its gradient in {dname}; {optimizer}; {masters}",
            "lora": f"frozen base in {dname}; {adapters}; {optimizer} over the adapters",
            "qlora": f"linear layers in {cfg.quant.quant_type.upper()}"
                     f"{' with double quant' if cfg.quant.double_quant else ''} in blocks of {cfg.quant.blocksize}"
                     f"{', 4.127 bits per parameter (QLoRA paper, sec. 3)' if cfg.quant.blocksize == 64 else ''}"
                     f"{kept_text(cfg, dname)}; embeddings, lm_head, norms in {dname}; {adapters}; {optimizer} "
                     "over the adapters"}[method],
           f"batch {t.batch_size} x {cfg.data.max_seq_len} tokens, every position a target (the worst case: chat "
           "data trains on assistant tokens only)",
           "gradient checkpointing: each layer is recomputed in the backward from its input, kept or replayed "
           "(where the inputs wait: the checkpoint plan)" if t.gradient_checkpointing
           else "no gradient checkpointing: every layer keeps its activations",
           f"loss over {f'chunks of {t.loss_chunk_size}' if t.loss_chunk_size else 'all'} positions, fp32 logits; "
           + attention_text(cfg, device)]
    if t.tile_size and method != "full":
        out.append(f"sequence tiles of {t.tile_size} tokens: one tile's intermediates at a time, the module's input "
                   "at full length (qlora/levers/tiling/tiles.py)")
    if device == "cpu":
        out.append("CPU: weights and compute in fp32 unless quant.compute_dtype says otherwise (checked against "
                   "measurements in fp32; bf16 kernels' own fp32 buffers are not modelled); bitsandbytes pages "
                   "optimizer state only on CUDA; the CUDA-only levers (offload_activations, optimizer_on_cpu, "
                   "embeddings_on_cpu) change nothing here")
    elif t.optimizer_on_cpu:
        out.append("CUDA: the optimizer state, the fp32 masters and the update in host memory, each 16-bit gradient "
                   "copied there as the backward sums it and summed in fp32 there (train.optimizer_on_cpu; several "
                   f"processes sum theirs in fp32 on the card); {ALLOCATOR}")
    else:
        out.append("CUDA: paged optimizer state counted as resident on the GPU (it moves to CPU memory only under "
                   f"pressure); {ALLOCATOR}")
    if cuda:
        out.append(f"host: {HOST_RUNTIME / 2**30:.0f} GiB allowed for the process itself and the OS, beside what the "
                   "levers keep there (offloaded layer inputs pinned at their exact size, the optimizer, the "
                   "embedding table)")
    return out


def kept_text(cfg: Config, dname: str) -> str:
    """The assumption about layers kept in 16-bit, if any."""
    if cfg.quant.keep_16bit:
        return f", but {len(cfg.quant.keep_16bit)} kept in {dname} (quant.keep_16bit)"
    if cfg.quant.keep_16bit_budget:
        return (f", but those chosen by quant.keep_16bit_budget={cfg.quant.keep_16bit_budget:g} in {dname}, counted "
                "at the full budget")
    return ""
