"""Which rows each micro-batch holds (qlora/data/batches.py): every row once an epoch, a fresh order each epoch and
seed."""

from __future__ import annotations

from qlora.data.batches import batch_rows


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

