"""What streaming the 4-bit base from host memory keeps on the device, pins on the host and moves per step.

Per decoder layer, the tensors that travel are each 4-bit weight's packed bytes (two weights a byte), its absmax (a
byte a block of 64 with double quantisation, else fp32) and, with double quantisation, the fp32 absmax of every 256
blocks; they lie one after another in the layer's slice of one host buffer, each at a 64-byte offset
(qlora/levers/pinned.py), pinned at its exact size. The code tables and the nested offset (1.1 KB a weight) stay on
the device. Two device slots of one layer each: the layer computing and the next one arriving.

Checked on CPU, where the slots come on top of the base (host and device are one memory there): a synthetic Llama of
2 layers of hidden 1024, intermediate 4096 and 8 heads, 64 tokens, `python -m qlora.report.measure recipes/tiny.py
--model.synthetic=true --model.config_json=CONFIG --data.max_seq_len=64 --train.batch_size=1 --steps=1
--train.stream_base=true|false` measured a peak resident set 16.54 MiB higher with the lever (51.85 -> 68.39 MiB)
where the estimate's two slots are 16.51 MiB (2026-12-04; too slow for the test suite, whose test compares the
streamer's own tensors and copies with these terms instead).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

SLOTS = 2  # layers on the device at once: the one computing, the one being copied in
ALIGN = 64  # bytes: each tensor's offset in a layer's buffer (pinned.typed_views)
NESTED_BLOCK = 256  # blocks of absmax quantised together by double quantisation (QLoRA paper, sec. 3)
# Host to device from pinned memory over PCIe 4.0 x16: ~25 GB/s is what such a link sustains (issue 25 puts PCIe
# at 25-50 GB/s; 5.0 x16 reaches ~50). The transfer time below is at this speed, stated beside it.
LINK_GB_S = 25.0


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def weight_parts(n: int, double_quant: bool, blocksize: int) -> list[int]:
    """Bytes of the tensors of one 4-bit weight of `n` elements that travel: packed weight, absmax, nested absmax."""
    blocks = math.ceil(n / blocksize)
    if double_quant:
        return [(n + 1) // 2, blocks, 4 * math.ceil(blocks / NESTED_BLOCK)]
    return [(n + 1) // 2, 4 * blocks]


def weight_bytes(n: int, double_quant: bool, blocksize: int) -> int:
    """One 4-bit weight's share of its layer's buffer."""
    return sum(aligned(b) for b in weight_parts(n, double_quant, blocksize))


@dataclass(frozen=True)
class StreamPlan:
    """The streamed base of a model: one layer's buffer, the host's, the device's, and what crosses per step."""

    layers: int
    layer_bytes: int
    """One decoder layer's buffer (the largest: a device slot's size)."""
    kept_bytes: int = 0
    """Buffers of the linear layers kept in 16-bit (quant.keep_16bit), which stay on the device and never travel."""
    link_gb_s: float = LINK_GB_S

    @property
    def host_bytes(self) -> int:
        """Pinned host memory: every layer's buffer, at its exact size."""
        return self.layers * self.layer_bytes - self.kept_bytes

    @property
    def card_bytes(self) -> int:
        """The device's slots."""
        return min(SLOTS, self.layers) * self.layer_bytes

    @property
    def moved_bytes(self) -> int:
        """Host to device per micro-batch (forward and backward) once training runs: the forward starts with the two
        layers the last backward ended on, the backward with the two the forward ended on, so each copies L - 2."""
        return 2 * max(self.layers - SLOTS, 0) * self.layer_bytes

    @property
    def transfer_s(self) -> float:
        """Seconds `moved_bytes` take at `link_gb_s`: hidden when each layer computes longer than its copy takes."""
        return self.moved_bytes / (self.link_gb_s * 1e9)

    def describe(self) -> str:
        return (f"{self.layers} layers of {self.layer_bytes / 2**20:,.1f} MiB in pinned host memory "
                f"({self.host_bytes / 2**30:.2f} GiB), {min(SLOTS, self.layers)} on the device; "
                f"{self.moved_bytes / 1e9:,.1f} GB copied per micro-batch, {self.transfer_s:.2f} s at "
                f"{self.link_gb_s:g} GB/s")


def stream_plan(layers: int, shapes: Iterable[tuple[int, int]], double_quant: bool, blocksize: int,
                kept: Iterable[tuple[int, int]] = ()) -> StreamPlan:
    """The plan for `layers` decoder layers of 4-bit linear layers of (in, out) `shapes`, less those `kept` in 16-bit
    (quant.keep_16bit, any layer)."""
    return StreamPlan(layers, sum(weight_bytes(a * o, double_quant, blocksize) for a, o in shapes),
                      sum(weight_bytes(a * o, double_quant, blocksize) for a, o in kept))
