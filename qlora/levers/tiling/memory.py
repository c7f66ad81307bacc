"""What sequence tiles leave in memory: a tiled module keeps only its input at full length (qlora/memory/activations.py
counts that in the layer's saved tensors); beyond it, one tile's working set at a time, counted here per tile token."""

from __future__ import annotations


def mlp_tile_bytes(mlp_saved: int, hidden: int, intermediate: int, e: int) -> int:
    """Per tile token, one MLP tile's recompute and backward: what the untiled MLP saves per token (`mlp_saved`: gate,
    up, act(gate), down's input and the adapters' saved tensors), its two intermediate gradients, the tile's output and
    its input's gradient."""
    return mlp_saved + 2 * intermediate * e + 2 * hidden * e


def projection_tile_bytes(projections: dict[str, tuple[int, int, int]], e: int) -> int:
    """Per tile token, the largest projection tile's working set: for each projection (adapter's saved bytes per
    token, in features, out features), its adapter's saved tensors, output and input gradient."""
    return max(saved + (a + o) * e for saved, a, o in projections.values())


# Bytes per tile token and hidden unit of one RMSNorm tile's recompute and backward, in bf16: transformers' norm
# computes in fp32, so the tile's fp32 input, its normalised copy and the backward's fp32 temporaries, 6.5 fp32
# tensors of the tile's size at once (measured with qlora/report/recorder.py, tests/test_snapshot.py).
NORM_TILE_BYTES_PER_HIDDEN = 26


def norm_tile_bytes(hidden: int) -> int:
    """Per tile token, one norm tile's working set (train.tile_norms)."""
    return NORM_TILE_BYTES_PER_HIDDEN * hidden
