"""What an NF4 output head changes: its storage (the estimate counts it with the other 4-bit layers, at NF4's bytes per
weight), and a moment in the loss's backward when it is dequantised whole to compute the input gradient."""

from __future__ import annotations


def dequantised_bytes(vocab: int, hidden: int, e: int) -> int:
    """The head dequantised to the compute dtype, alive in the loss's backward: V h e."""
    return vocab * hidden * e
