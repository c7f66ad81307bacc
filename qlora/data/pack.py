"""Sequence packing without cross-contamination: several documents per `max_seq_len` row, each seeing only itself.

Padding every row to the longest in its batch wastes compute on pad tokens; packing fills rows with whole documents
instead. Done naively, packed documents attend to each other and the last token of one is trained to predict the
first token of the next (trl issues 805, 1230). Here neither happens:

- Position ids restart at 0 for every document, and attention reads the boundaries from them (a new document
  wherever the position does not grow by one). With sdpa each document is one SDPA call on its slice of the row
  (qlora/base/attention.py), as flash-attention-2 reads the same boundaries as variable-length sequences, but only
  for a batch of one row (`modeling_flash_attention_utils._is_packed_sequence`), so `check_packing` asks for
  batch_size 1 there. Eager attention gets transformers' block-diagonal causal mask (>= 4.55, PR 39194), a
  row x row tensor.
- The first label of every document is masked: position t predicts token t+1, and across a boundary that would
  be the next document's first token.

Documents are placed by best-fit decreasing, which fills rows to within a few tokens of `max_seq_len` on mixed
lengths, and deterministically, so a resumed run packs exactly the same rows.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Sequence

from qlora.config import Config
from qlora.data.labels import IGNORE
from qlora.data.tokens import INT32
from qlora.errors import ConfigError


def pack_examples(examples: list[dict[str, Sequence[int]]], max_seq_len: int) -> list[dict[str, array]]:
    """Pack tokenised examples into rows of at most `max_seq_len` tokens, each with restarting `position_ids`."""
    too_long = [len(ex["input_ids"]) for ex in examples if len(ex["input_ids"]) > max_seq_len]
    if too_long:
        raise ConfigError(f"{len(too_long)} examples are longer than data.max_seq_len={max_seq_len} "
                          f"(longest {max(too_long)}): truncate them first (data.labels.tokenize_rows does)")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []  # example indices per packed row
    free: list[tuple[int, int]] = []  # (tokens still free, row index), sorted: best fit is the first that fits
    for i in order:
        n = len(examples[i]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (max_seq_len - n, len(rows) - 1))
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (room - n, row))
    return [join_documents([examples[i] for i in row]) for row in rows]


def join_documents(docs: list[dict[str, Sequence[int]]]) -> dict[str, array]:
    """One packed row from whole documents: ids and labels concatenated, positions restarting per document; each an
    int32 array, as tokenize_rows holds a row (qlora/data/tokens.py)."""
    input_ids, labels, position_ids = array(INT32), array(INT32), array(INT32)
    for doc in docs:
        n = len(doc["input_ids"])
        input_ids.extend(doc["input_ids"])
        # Mask the first label: the previous document's last position would otherwise learn to predict it. Unpacked,
        # a label at position 0 is never learned either, so this changes no document's loss.
        labels.append(IGNORE)
        labels.extend(doc["labels"][1:])
        position_ids.extend(range(n))
    # A slice is an exact-size copy: extend leaves up to 1/16 spare room (13.1 bytes a token packed, not 12.4).
    return {"input_ids": input_ids[:], "labels": labels[:], "position_ids": position_ids[:]}


def check_packing(cfg: Config) -> None:
    """Refuse a packed setup whose attention would see across documents."""
    if cfg.data.pack and cfg.model.attn_implementation.startswith("flash") and cfg.train.batch_size > 1:
        raise ConfigError(f"data.pack with model.attn_implementation={cfg.model.attn_implementation} keeps documents "
                          "apart only in a batch of one row: set --train.batch_size=1 (raise data.max_seq_len or "
                          "train.grad_accum instead), or use --model.attn_implementation=sdpa")


def packing_summary(examples: list[dict], packed: list[dict], max_seq_len: int) -> str:
    tokens = sum(len(ex["input_ids"]) for ex in examples)
    fill = tokens / (len(packed) * max_seq_len)
    return (f"packed {len(examples)} documents ({tokens:,} tokens) into {len(packed)} rows of {max_seq_len}: "
            f"{100 * fill:.1f}% filled")
