"""What the speed levers cost in memory: with train.reuse_dequant, a whole decoder layer of dequantised 16-bit
weights is kept from its recompute to its backward, instead of one weight at a time; with train.dequant_once, every
4-bit linear layer's dequantised weight is kept for the run, and none is dequantised in the step."""

from __future__ import annotations


def dequantised_bytes(linear_shapes: dict[str, tuple[int, int]], reuse: bool, e: int) -> int:
    """The dequantised weights alive through a layer's backward: the largest one, or with reuse_dequant all of the
    layer's (`linear_shapes`: in and out features of each linear layer of a decoder layer)."""
    sizes = [a * o for a, o in linear_shapes.values()]
    return (sum(sizes) if reuse else max(sizes)) * e


def kept_dequantised_bytes(linear_shapes: dict[str, tuple[int, int]], layers: int, e: int) -> int:
    """train.dequant_once: every decoder layer's linear weights in the compute dtype, kept beside the NF4 ones."""
    return layers * sum(a * o for a, o in linear_shapes.values()) * e
