"""The head and cross-entropy without all logits at once (train.loss_chunk_size, train.liger_ce): the recipe fields and
their rules."""

from __future__ import annotations

from dataclasses import dataclass

from qlora.errors import ConfigError
from qlora.levers.lever import Lever, LeverFields, RunConfig


@dataclass
class LossFields(LeverFields):
    loss_chunk_size: int = 0
    """Compute lm_head + cross-entropy this many tokens at a time, never materialising all logits; 0 = all at once."""
    liger_ce: bool = False
    """CUDA: compute lm_head + cross-entropy with liger-kernel's fused linear cross-entropy (pip install liger-kernel)
    instead of the PyTorch chunks; needs a 16-bit lm_head. Falls back to PyTorch on CPU."""

    def check_fields(self) -> None:
        if self.loss_chunk_size < 0:
            raise ConfigError(f"train.loss_chunk_size={self.loss_chunk_size} must not be negative, e.g. "
                              "--train.loss_chunk_size=0")


def check(cfg: RunConfig) -> None:
    if cfg.train.liger_ce and cfg.train.shard_base:
        raise ConfigError("train.shard_base with train.liger_ce: not supported together (the head's weight is "
                          "sharded): turn one of them off")


CHUNKS = Lever(
    name="train.loss_chunk_size", kind="memory",
    active=lambda cfg, method, device: cfg.train.loss_chunk_size > 0,
    effect=lambda cfg, method: f"loss_chunk_size={cfg.train.loss_chunk_size}: logits {cfg.train.loss_chunk_size} "
    "positions at a time",
    check=check)

LIGER = Lever(
    name="train.liger_ce", kind="memory",
    active=lambda cfg, method, device: cfg.train.liger_ce and device == "cuda",
    effect=lambda cfg, method: "liger_ce: fused head and cross-entropy")

LEVERS = (CHUNKS, LIGER)
