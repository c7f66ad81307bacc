"""One optimizer step's forward and backward over its micro-batches, and the held-out evaluation.

The loss of a micro-batch is summed over its target tokens and divided by the target tokens of the whole accumulated
batch (qlora/training/loss.py computes it), so accumulation gives the gradients of one large batch.
"""

from __future__ import annotations

import math

import torch

from qlora.config import Config
from qlora.console import announce, progress
from qlora.data.batches import eval_batches, eval_rows
from qlora.memory.profiler import PhaseTracker
from qlora.training import distributed
from qlora.training.loss import eval_stats, loss_sum


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_backward(model: torch.nn.Module, micro: list[dict[str, torch.Tensor]], chunk_size: int = 0,
                     profiler: PhaseTracker | None = None, n_targets: int | None = None) -> float:
    """Forward and backward over one optimizer step's micro-batches; return the step's mean loss per target token.

    Each micro-batch's summed loss is divided by the target tokens of the whole accumulated batch, not its own
    (transformers PR 34191), so 4 micro-batches of 1 give the loss and gradients of 1 batch of 4. With several
    processes, `n_targets` is the target tokens of the global batch, of which `micro` is this process's share.
    """
    if n_targets is None:
        n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    total = 0.0
    for batch in micro:
        loss = loss_sum(model, batch, chunk_size) / n_targets
        if profiler is not None:  # the run's first forward: marked once, apart from its backward
            profiler.mark("first_forward")
            profiler = None
        loss.backward()  # gradients accumulate in the trainable parameters
        total += float(loss.detach())
    return total


def evaluate(model: torch.nn.Module, examples: list[dict], cfg: Config, pad_id: int, device: torch.device,
             ranks: distributed.Ranks | None = None) -> dict:
    """Held-out loss per target token, perplexity and exact-match accuracy of the answers (the batches shared
    among the processes of a run that has several)."""
    ranks = ranks or distributed.Ranks()
    was_training = model.training
    model.eval()
    loss = tokens = exact = rows = 0
    scored, size = eval_rows(examples, cfg.train.batch_size, cfg.train.eval_batches), cfg.train.batch_size
    n = -(-len(scored) // size)
    shared = ranks.share(eval_batches(scored, size, pad_id), n)
    for batch, counted in progress(shared, -(-n // ranks.size), "evaluate", "batch", show=ranks.main):
        b_loss, b_tokens, b_exact, b_rows = eval_stats(model, to_device(batch, device), cfg.train.loss_chunk_size)
        if counted:
            loss, tokens, exact, rows = loss + b_loss, tokens + b_tokens, exact + b_exact, rows + b_rows
    loss, tokens, exact, rows = ranks.sum_values(loss, tokens, exact, rows)
    model.train(was_training)
    mean = loss / max(tokens, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50)), "eval_exact_match": exact / max(rows, 1),
            "eval_rows": int(rows)}


def announce_evaluation(examples: list[dict], cfg: Config, when: str, note: str = "") -> float:
    """The line before an evaluation: when, how many rows and batches; returns its start (console.announce)."""
    n, size = len(eval_rows(examples, cfg.train.batch_size, cfg.train.eval_batches)), cfg.train.batch_size
    batches = -(-n // size)
    return announce(f"evaluating {n} held-out rows {when} ({batches} batch{'es' if batches != 1 else ''} of "
                    f"{size}{note})")
