"""Tokenised rows as held in host memory: every sequence (input_ids, labels, position_ids) an int32 array.

A Python list of ints costs an 8-byte slot a token and, for every id past 256 (CPython caches only -5..256), a 28-byte
int object: measured 48 bytes a token of input_ids and labels on SmolLM2's tokenizer, 2.2 GiB for 50M tokens, which
no host allowance of the estimate counts. `array('i')` holds 4 bytes a token and reads like the list (len, slicing,
iteration, ==), and torch reads its buffer without a copy; batches are widened to int64 when collated.
"""

from __future__ import annotations

import sys
from array import array

import torch

from qlora.errors import ConfigError

INT32 = "i"  # a C int: 4 bytes on every platform torch builds for
INT32_MAX = 2**31 - 1


def int32(values: list[int], where: str) -> array:
    """`values` as an int32 array; an id past int32 is refused, not wrapped (`where` names the row)."""
    try:
        return array(INT32, values)
    except OverflowError:
        largest = max(values, key=abs)
        raise ConfigError(f"{where}: token id {largest:,} does not fit the int32 that tokenised rows are held in "
                          f"(ids up to {INT32_MAX:,}): use a tokenizer whose vocabulary is smaller") from None


def as_tensor(values: array | list[int]) -> torch.Tensor:
    """A row's sequence as a tensor, without a copy for an int32 array (a list: int64, as before)."""
    if isinstance(values, array) and values.typecode == INT32 and len(values):
        return torch.frombuffer(values, dtype=torch.int32)
    return torch.tensor(list(values), dtype=torch.long)


def held_bytes(examples: list[dict]) -> int:
    """Host bytes of tokenised rows: the list, each row's dict, and each sequence with its buffer."""
    return sys.getsizeof(examples) + sum(sys.getsizeof(ex) + sum(map(sys.getsizeof, ex.values())) for ex in examples)


def held_line(train: list[dict], held: list[dict]) -> str:
    """'train N tokens held in X MiB, held out ...': each split's tokens (input_ids') and its bytes (every sequence)."""
    return ", ".join(f"{name} {sum(len(ex['input_ids']) for ex in rows):,} tokens held in "
                     f"{held_bytes(rows) / 2**20:,.1f} MiB" for name, rows in (("train", train), ("held out", held)))
