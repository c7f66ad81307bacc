"""Causal-LM loss as a sum over target tokens, with logits made only where a label is.

The loop divides the sum by the number of target tokens in the whole accumulated batch, so 4 micro-batches of 1 give
the same loss and gradients as 1 batch of 4 (a mean of micro-batch means does not: transformers PR 34191).

Only positions with a label reach `lm_head`: prompt tokens never pay for the vocabulary projection. With
`chunk_size` > 0 the projection and cross-entropy run that many tokens at a time under activation checkpointing, so
the fp32 logits of the whole batch (seq x vocab x 4 bytes: 1 GiB at 2048 x 128K) never exist at once. On CUDA,
train.liger_ce hands head and cross-entropy to liger-kernel's fused kernel instead (an optional package).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora.config import ConfigError
from qlora.data import IGNORE


def target_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Hidden states at positions that predict a label, those labels, and the row each came from."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "position_ids" in batch:
        # Packed rows (qlora.pack): transformers reads document boundaries from position_ids only when no 2D mask is
        # given, and right padding needs none under causal attention, as no real token comes after it.
        kwargs.pop("attention_mask", None)
    hidden = model.get_decoder()(**kwargs, use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]  # position t predicts token t+1
    mask = labels != IGNORE
    rows = mask.nonzero()[:, 0]
    return hidden[:, :-1][mask], labels[mask], rows


def _chunk_ce(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


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


def _liger_ce(head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    out = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden.contiguous(), labels, head.bias)
    return out[0] if isinstance(out, tuple) else out  # (loss, z_loss) in releases that can return the z-loss


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 0) -> torch.Tensor:
    """Sum of token cross-entropies over the batch's labels (fp32)."""
    hidden, labels, _ = target_hidden(model, batch)
    head = model.get_output_embeddings()
    if getattr(head, "liger_ce", False) and hidden.is_cuda:
        return _liger_ce(head, hidden, labels).float()
    if chunk_size <= 0 or hidden.shape[0] <= chunk_size:
        return _chunk_ce(head, hidden, labels)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        # Recomputed in the backward: only one chunk's logits are alive at a time.
        total = total + checkpoint(_chunk_ce, head, hidden[part], labels[part], use_reentrant=False)
    return total


@torch.no_grad()
def eval_stats(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int, int, int]:
    """(loss sum, target tokens, rows whose every target token is the argmax, rows) for one held-out batch.

    A row counts as exactly right when greedy decoding would reproduce its whole answer and end-of-turn token:
    with teacher forcing, argmax == label at every target position is the same condition.
    """
    hidden, labels, rows = target_hidden(model, batch)
    logits = model.get_output_embeddings()(hidden).float()
    loss = F.cross_entropy(logits, labels, reduction="sum")
    wrong = (logits.argmax(-1) != labels).float()
    n_rows = batch["input_ids"].shape[0]
    wrong_per_row = torch.zeros(n_rows, device=wrong.device).index_add_(0, rows, wrong)
    has_target = torch.zeros(n_rows, device=wrong.device).index_add_(0, rows, torch.ones_like(wrong)) > 0
    exact = int(((wrong_per_row == 0) & has_target).sum())
    return float(loss), labels.numel(), exact, int(has_target.sum())
