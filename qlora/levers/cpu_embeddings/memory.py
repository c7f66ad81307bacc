"""What keeping the input embeddings in CPU memory moves from the device to the host."""

from __future__ import annotations


def table_bytes(vocab: int, hidden: int, e: int) -> int:
    """The input embedding table, V h e: off the device, onto the host. Each step's looked-up vectors (T h e) cross
    over and are the ordinary first layer input on the device."""
    return vocab * hidden * e
