"""Causal-LM loss as a sum over target tokens, with logits made only where a label is.

The loop divides the sum by the number of target tokens in the whole accumulated batch, so 4 micro-batches of 1 give
the same loss and gradients as 1 batch of 4 (a mean of micro-batch means does not: transformers PR 34191).

Only positions with a label reach `lm_head`: prompt tokens never pay for the vocabulary projection. How the head and
cross-entropy run (all at once, in chunks, fused) is the loss lever's (qlora/levers/loss/).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qlora.data.labels import IGNORE
from qlora.levers.loss.chunks import chunked_ce_sum, liger_ce_sum


def target_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Hidden states at positions that predict a label, those labels, and the row each came from."""
    # No attention mask: the rows are right-padded (qlora.data.batches.collate), and under causal attention no real
    # token sees the padding after it. A 2D mask with padding in it (rows of other lengths, unpacked) made
    # transformers build a batch x T x T mask for every layer (qlora/base/attention.py), which the estimate does not
    # count and which keeps SDPA off FlashAttention-2 on CUDA; without it the real tokens' values are the same to
    # rounding (the tiny recipe, 8 rows a batch: losses within 4.8e-7 over 20 steps). Packed rows' documents keep
    # apart by their position_ids, which attention reads only when no mask is given.
    kwargs = {k: batch[k] for k in ("input_ids", "position_ids") if k in batch}
    hidden = model.get_decoder()(**kwargs, use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]  # position t predicts token t+1
    mask = labels != IGNORE
    rows = mask.nonzero()[:, 0]
    return hidden[:, :-1][mask], labels[mask], rows


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 0) -> torch.Tensor:
    """Sum of token cross-entropies over the batch's labels (fp32): all positions at once, `chunk_size` at a time, or
    through liger-kernel's fused kernel where train.liger_ce put it on the head (qlora/levers/loss/)."""
    hidden, labels, _ = target_hidden(model, batch)
    head = model.get_output_embeddings()
    if getattr(head, "liger_ce", False) and hidden.is_cuda:
        return liger_ce_sum(head, hidden, labels).float()
    return chunked_ce_sum(head, hidden, labels, chunk_size)


@torch.no_grad()
def eval_stats(model: torch.nn.Module, batch: dict[str, torch.Tensor],
               chunk_size: int = 0) -> tuple[float, int, int, int]:
    """(loss sum, target tokens, rows whose every target token is the argmax, rows) for one held-out batch, the
    logits `chunk_size` target positions at a time as in training (train.loss_chunk_size; 0: all at once): a row of
    100K targets would otherwise hold 100K x vocabulary fp32 logits, 51 GB for Llama-3's 128,256 tokens.

    A row counts as exactly right when greedy decoding would reproduce its whole answer and end-of-turn token:
    with teacher forcing, argmax == label at every target position is the same condition.
    """
    hidden, labels, rows = target_hidden(model, batch)
    head = model.get_output_embeddings()
    size = chunk_size if chunk_size > 0 else max(labels.numel(), 1)
    loss, wrong = torch.zeros((), device=hidden.device), torch.zeros(labels.numel(), device=hidden.device)
    for start in range(0, labels.numel(), size):
        logits = head(hidden[start:start + size]).float()
        target = labels[start:start + size]
        loss += F.cross_entropy(logits, target, reduction="sum")
        wrong[start:start + size] = (logits.argmax(-1) != target).float()
    n_rows = batch["input_ids"].shape[0]
    wrong_per_row = torch.zeros(n_rows, device=wrong.device).index_add_(0, rows, wrong)
    has_target = torch.zeros(n_rows, device=wrong.device).index_add_(0, rows, torch.ones_like(wrong)) > 0
    exact = int(((wrong_per_row == 0) & has_target).sum())
    return float(loss), labels.numel(), exact, int(has_target.sum())
