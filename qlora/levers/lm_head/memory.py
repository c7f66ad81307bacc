"""What an NF4 output head changes: its storage (the estimate counts it with the other 4-bit layers, at NF4's bytes per
weight), and what of it is dequantised at once in the loss (qlora/levers/lm_head/head.py: a slice at a time)."""

from __future__ import annotations

SLICE_BYTES = 256 * 2**20  # the most of the head dequantised at once, in the compute dtype


def slice_steps(vocab: int, hidden: int, e: int, blocksize: int) -> tuple[int, int]:
    """(rows, columns) of the head per slice: the logits' rows (vocabulary) and the input gradient's columns (hidden,
    whole blocks of `blocksize`), each at most SLICE_BYTES in the compute dtype (or one row, one block column)."""
    rows = max(1, SLICE_BYTES // (hidden * e))
    cols = max(blocksize, SLICE_BYTES // (vocab * e) // blocksize * blocksize)
    return min(rows, vocab), min(cols, hidden)


def dequantised_bytes(vocab: int, hidden: int, e: int, blocksize: int) -> int:
    """The most of the head alive at once in the loss: the larger slice, a column slice with its packed bytes and
    absmax cut out beside it, and every block's absmax in fp32 (double quant's, dequantised)."""
    rows, cols = slice_steps(vocab, hidden, e, blocksize)
    column = vocab * cols * e + vocab * cols // 2 + vocab * (cols // blocksize) * 4
    return max(rows * hidden * e, column) + vocab * hidden // blocksize * 4


FORMULA = "max(a row slice, a column slice with its bytes and absmax) of the NF4 head dequantised + V h / 16 B " \
          "(its absmax in fp32)"
