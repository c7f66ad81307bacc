"""Which rows each micro-batch holds (qlora/data/batches.py): every row once an epoch, a fresh order each epoch and
seed; the targets a step divides its loss by."""

from __future__ import annotations

from qlora.data.batches import batch_rows, collate, target_tokens
from qlora.data.labels import IGNORE


def test_each_epoch_takes_every_whole_batch_once_in_its_own_order() -> None:
    """10 rows in batches of 3: 3 batches an epoch, the row left over another each epoch. One order for every epoch
    (the seed without the epoch) left the same row out of every epoch, never trained."""
    epochs = [[batch_rows(10, 3, 0, epoch * 3 + i) for i in range(3)] for epoch in range(6)]
    for batches in epochs:
        rows = [row for batch in batches for row in batch]
        assert len(rows) == len(set(rows)) == 9
    assert len({tuple(row for batch in batches for row in batch) for batches in epochs}) == 6
    assert {row for batches in epochs for batch in batches for row in batch} == set(range(10))
    assert batch_rows(10, 3, 1, 0) != batch_rows(10, 3, 0, 0)  # the seed orders the rows too


def test_the_target_count_is_the_labels_a_batch_scores() -> None:
    """What the ranks of a step divide their summed loss by (one process counts its own batches): labels after the
    one-token shift. Counting a label at position 0 too passed every test, whose ranks train on chat rows (position 0
    masked); on text rows, which learn it, ranks would divide by one more target a row than one process does."""
    examples = [{"input_ids": [i] * (i % 4 + 2), "labels": [i] * (i % 4 + 2)} for i in range(10)]
    for index in range(6):
        batch = collate([examples[i] for i in batch_rows(10, 4, 3, index)], pad_id=0)
        assert target_tokens(examples, 4, 3, index) == (batch["labels"][:, 1:] != IGNORE).sum().item()

