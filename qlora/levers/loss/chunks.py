"""The head and cross-entropy without all logits at once: `chunk_size` positions at a time under activation
checkpointing (train.loss_chunk_size), so the fp32 logits of the whole batch (seq x vocab x 4 bytes: 1 GiB at
2048 x 128K) never exist at once; or on CUDA liger-kernel's fused linear cross-entropy (train.liger_ce, an optional
package), which chunks internally and computes the input gradient in the forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora.errors import ConfigError
from qlora.levers.lever import RunConfig


def _chunk_ce(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def chunked_ce_sum(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Sum of the cross-entropies of `head(hidden)` against `labels`, `chunk_size` positions at a time (0: at once)."""
    if chunk_size <= 0 or hidden.shape[0] <= chunk_size:
        return _chunk_ce(head, hidden, labels)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        # Recomputed in the backward: only one chunk's logits are alive at a time.
        total = total + checkpoint(_chunk_ce, head, hidden[part], labels[part], use_reentrant=False)
    return total


def use_liger_ce(model: torch.nn.Module) -> bool:
    """Route `loss_sum` on CUDA through liger-kernel's fused linear cross-entropy (train.liger_ce); False if it
    cannot apply here. It chunks internally and computes the input gradient in the forward, so no logits are kept."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("liger-kernel").split(".")[:2])
    except PackageNotFoundError:
        raise ConfigError("train.liger_ce needs liger-kernel: pip install 'liger-kernel>=0.5', "
                          "or set --train.liger_ce=false") from None
    if (major, minor) < (0, 5):  # older releases ignore reduction="sum" and return the mean
        raise ConfigError(f"train.liger_ce needs liger-kernel >= 0.5 (found {major}.{minor}): "
                          "pip install -U liger-kernel")
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # a 4-bit head has no weight matrix to hand to the kernel
        print("train.liger_ce: lm_head is not a 16-bit nn.Linear (quant.quantize_lm_head?); using PyTorch chunks")
        return False
    head.liger_ce = True  # read by loss_sum; on a module so every caller of loss_sum gets the same path
    return True


def liger_ce_sum(head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    out = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden.contiguous(), labels, head.bias)
    return out[0] if isinstance(out, tuple) else out  # (loss, z_loss) in releases that can return the z-loss


def apply(model: torch.nn.Module, cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> None:
    """The trainer's hook: put liger-kernel's loss on the head (train.liger_ce), on CUDA only."""
    if not cfg.train.liger_ce:
        return
    if device.type != "cuda":
        print("train.liger_ce: liger-kernel runs on CUDA only; using the PyTorch loss on this device")
    else:
        use_liger_ce(model)
