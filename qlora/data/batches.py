"""Batches: tokenised rows padded into micro-batches. Their order is a pure function of the seed and the micro-batch
index, so a resumed run sees exactly the batches an uninterrupted one would. Before the first step the rows are
checked against the batch shape (a step within the training rows) and the base (rows within its learned positions)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from qlora.data.labels import IGNORE
from qlora.data.tokens import as_tensor
from qlora.errors import ConfigError


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row in the batch (right padding, masked out of attention and loss)."""
    width = max(len(ex["input_ids"]) for ex in examples)
    batch = {"input_ids": torch.full((len(examples), width), pad_id),
             "labels": torch.full((len(examples), width), IGNORE),
             "attention_mask": torch.zeros(len(examples), width, dtype=torch.long)}
    packed = "position_ids" in examples[0]  # rows from qlora.data.pack: documents keep apart by restarting positions
    if packed:
        batch["position_ids"] = torch.zeros(len(examples), width, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        batch["input_ids"][i, :n] = as_tensor(ex["input_ids"])
        batch["labels"][i, :n] = as_tensor(ex["labels"])
        batch["attention_mask"][i, :n] = 1
        if packed:
            # The padding tail restarts at 0 too, so it forms its own segment that no document attends to.
            batch["position_ids"][i, :n] = as_tensor(ex["position_ids"])
            batch["position_ids"][i, n:] = torch.arange(width - n)
    return batch


def micro_batches(examples: list[dict], batch_size: int, seed: int, pad_id: int, start: int = 0, rank: int = 0,
                  world: int = 1) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Endless (index, batch) pairs from micro-batch `start` on; each epoch is a fresh permutation by seed.

    The batch at index i depends only on (seed, i), which is what makes resume exact. With `world` processes, micro-
    batch i of the run holds the rows one process with batch `world * batch_size` would take, and process `rank`
    takes its rank-th `batch_size` of them: N processes x batch b see exactly the rows of 1 process x batch N b.
    """
    index = start
    while True:
        rows = batch_rows(len(examples), batch_size * world, seed, index)[rank * batch_size:(rank + 1) * batch_size]
        yield index, collate([examples[i] for i in rows], pad_id)
        index += 1


def target_tokens(examples: list[dict], batch_size: int, seed: int, index: int) -> int:
    """Target tokens of micro-batch `index` (labels after the one-token shift that are not IGNORE), from the rows
    alone: what a process divides its summed loss by when it collates only its share of the batch."""
    return sum(sum(label != IGNORE for label in examples[i]["labels"][1:])
               for i in batch_rows(len(examples), batch_size, seed, index))


def batch_rows(n_examples: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Positions in the training split of the rows in micro-batch `index`."""
    per_epoch = max(1, n_examples // batch_size)  # a ragged last batch would change the token count per step
    epoch, offset = divmod(index, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[offset * batch_size:(offset + 1) * batch_size].tolist()


def check_step_rows(batch_size: int, grad_accum: int, n_rows: int, processes: int = 1, packed: bool = False) -> None:
    """A step within the training rows. batch_rows carries a step past the last row into the next epoch's order, so a
    step of more rows than there are sees rows twice (measured: grad_accum=100 on the tiny recipe's 600 rows, 800 rows
    a step; grad_accum=1000000 planned 8,000,000 and never ended a step); a micro-batch past them is one such step."""
    step = batch_size * grad_accum * processes
    if step <= n_rows:
        return
    if n_rows < processes:  # no shape gives each process a row
        fix = f"launch at most {n_rows} process(es), or add rows"
    else:
        shape = f"--train.grad_accum={n_rows // (batch_size * processes)}" if batch_size * processes <= n_rows else \
            f"--train.batch_size={n_rows // processes} --train.grad_accum=1"
        fix = f"make train.batch_size x train.grad_accum at most {n_rows // processes} ({shape}), or add rows"
    after = " (after packing)" if packed else ""
    raise ConfigError(f"{batch_size} rows x {grad_accum} accum{f' x {processes} processes' if processes > 1 else ''} "
                      f"= {step:,} rows a step exceed the {n_rows} training rows{after}, so a step would see rows "
                      f"twice: {fix}")


def resume_position(state: dict, batch_size: int, n_examples: int, default: int) -> int:
    """The micro-batch a resumed run starts at: the one after the checkpoint's last (`state["micro_batch"]`), or,
    when train.batch_size changed on --resume, the first of the new size that starts at or after the same row of the
    same epoch, so no row is seen twice or skipped in that epoch. `default` serves checkpoints that do not record it."""
    index, old_size = state.get("micro_batch", default), state.get("batch_size", batch_size)
    if old_size == batch_size:
        return index
    epoch, offset = divmod(index, max(1, n_examples // old_size))
    per_epoch = max(1, n_examples // batch_size)
    return epoch * per_epoch + min(-(-offset * old_size // batch_size), per_epoch)


def eval_rows(examples: list[dict], batch_size: int, max_batches: int = 0) -> list[dict]:
    """The held-out rows an evaluation scores (the first `max_batches` batches' worth when > 0), shortest first: a
    batch of similar lengths pads little (8% fewer tokens on the demo), and a row's score does not depend on its
    neighbours."""
    rows = examples[:max_batches * batch_size] if max_batches else examples
    return sorted(rows, key=lambda ex: len(ex["input_ids"]))


def eval_batches(examples: list[dict], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_id)


def check_positions(config: object, rows: list[dict]) -> None:
    """Refuse rows longer than a base with learned position embeddings has positions (config.json's
    max_position_embeddings or n_positions: OPT, GPT-2): the first such batch ended in an IndexError mid-run on the
    CPU (measured on a tiny OPT with 32 positions, rows of ~60 tokens), a device-side assert on CUDA. A rotary base
    computes any position, and a run past its context is how a longer one is learned: it is said, not refused."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    longest = max((len(r["input_ids"]) for r in rows), default=0)
    if not isinstance(context, int) or longest <= context:
        return
    if getattr(c, "rope_parameters", None) or getattr(c, "rope_theta", None):
        print(f"rows of up to {longest:,} tokens run past the base's max_position_embeddings={context:,}: its rotary "
              "positions beyond that were never trained, and this run trains them")
        return
    raise ConfigError(f"rows of up to {longest:,} tokens run past the {context:,} positions of the base's learned "
                      f"position embeddings (config.json max_position_embeddings): set --data.max_seq_len={context} "
                      "or less")
