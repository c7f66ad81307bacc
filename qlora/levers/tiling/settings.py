"""Sequence tiles (train.tile_size): the recipe fields and their rules."""

from __future__ import annotations

from dataclasses import dataclass

from qlora.errors import ConfigError
from qlora.levers.lever import Lever, LeverFields, RunConfig


@dataclass
class TilingFields(LeverFields):
    tile_size: int = 0
    """Run each decoder layer's MLP this many tokens at a time, forward and backward (recomputing each tile), so none
    of its seq x intermediate tensors exists at full length; one more MLP forward per step. 0 = off."""
    tile_projections: bool = False
    """With tile_size: tile the attention's q/k/v/o projections too, which keeps LoRA dropout's dropped inputs and
    masks (seq x hidden each) out of memory; pays only with lora.dropout > 0."""

    def check_fields(self) -> None:
        if self.tile_size < 0:
            raise ConfigError(f"train.tile_size={self.tile_size} must not be negative, e.g. --train.tile_size=0")
        if self.tile_projections and not self.tile_size:
            raise ConfigError("train.tile_projections tiles by train.tile_size, which is 0: set "
                              "--train.tile_size=4096 or --train.tile_projections=false")


def check(cfg: RunConfig) -> None:
    t = cfg.train
    if t.tile_size and t.shard_base:
        raise ConfigError("train.shard_base with train.tile_size: not supported together (the tiles' recompute runs "
                          "outside the decoder layers' FSDP hooks; untested): turn one of them off")
    if t.tile_size and t.compile == "layers" or t.tile_projections and t.compile == "lora":
        raise ConfigError(f"train.tile_size: torch.compile cannot trace the tiles inside a compiled "
                          f"{'layer' if t.compile == 'layers' else 'adapter'}: set --train.compile=none or "
                          "--train.tile_size=0")
    if t.tile_size and cfg.quant.method == "full":
        raise ConfigError("train.tile_size is for adapters on a frozen base: with quant.method=full each tile "
                          "would add up full-size weight gradients: set --train.tile_size=0 or use qlora/lora")


def tiled(cfg: RunConfig, method: str, tokens: int) -> bool:
    """Whether a micro-batch of `tokens` runs in tiles: one tile or fewer runs the modules as they are."""
    return 0 < cfg.train.tile_size < tokens and method != "full"


TILES = Lever(
    name="train.tile_size", kind="memory",
    active=lambda cfg, method, device: bool(cfg.train.tile_size) and method != "full",
    effect=lambda cfg, method: f"tile_size={cfg.train.tile_size}" + (
        " with tile_projections" if cfg.train.tile_projections else "") + ": the MLP" + (
        " and q/k/v/o" if cfg.train.tile_projections else "") + " in sequence tiles",
    check=check)

LEVERS = (TILES,)
