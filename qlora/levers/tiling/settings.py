"""Sequence tiles (train.tile_size): the recipe fields and their rules."""

from __future__ import annotations

from dataclasses import dataclass

from qlora.errors import ConfigError
from qlora.levers.lever import Lever, LeverFields, RunConfig

# The smallest tile allowed. Each tile runs its module once more (dequantising its NF4 weights again), so the step's
# time grows with the count of tiles: the tiny recipe's step (8 rows, 480 tokens, one thread) took 5.0x the untiled
# one at 16 tokens, 9.2x at 8, 20x at 4, 24x at 3 and 81x at 1 (commit 3e1fb18), while a 16-token tile's
# intermediates are under 3 MB even for Llama-70B (gate, up and act: 3 x 16 x 28,672 x 2 bytes in bf16), so a
# smaller tile saves almost nothing more.
MIN_TILE = 16


@dataclass
class TilingFields(LeverFields):
    tile_size: int = 0
    """Run each decoder layer's MLP this many tokens at a time, forward and backward (recomputing each tile), so none
    of its seq x intermediate tensors exists at full length; one more MLP forward per step. 0 = off."""
    tile_projections: bool = False
    """With tile_size: tile the attention's q/k/v/o projections too (Phi-3's qkv_proj and o_proj), which keeps LoRA
    dropout's dropped inputs and masks (seq x hidden each) out of memory; pays only with lora.dropout > 0."""
    tile_norms: bool = False
    """With tile_size: run the RMSNorms (each decoder layer's and the final one) in tiles too. transformers' RMSNorm
    computes in fp32: autograd keeps an fp32 copy of each norm's input, and its backward holds five more fp32 tensors
    of the input's size at once, 4 x 5 = 20 bytes per token and hidden unit (the peak of a long row's step); tiled,
    a norm keeps its bf16 input and the fp32 tensors exist for one tile."""

    def check_fields(self) -> None:
        if self.tile_size < 0:
            raise ConfigError(f"train.tile_size={self.tile_size} must not be negative, e.g. --train.tile_size=0")
        if 0 < self.tile_size < MIN_TILE:
            raise ConfigError(f"train.tile_size={self.tile_size}: a tile under {MIN_TILE} tokens multiplies a step's "
                              f"time (81x at 1 token on the tiny recipe) for almost no memory: set "
                              f"--train.tile_size={MIN_TILE} or more (the recipes use 4096), or 0 for no tiles")
        switches = [name for name in ("tile_projections", "tile_norms") if getattr(self, name)]
        if switches and not self.tile_size:  # both named at once: --train.tile_size=0 on a recipe with both on
            raise ConfigError(f"{' and '.join(f'train.{n}' for n in switches)} tile{'s' if len(switches) == 1 else ''}"
                              " by train.tile_size, which is 0: set --train.tile_size=4096, or "
                              + " ".join(f"--train.{n}=false" for n in switches))


def check(cfg: RunConfig) -> None:
    t = cfg.train
    if t.tile_size and t.shard_base:
        raise ConfigError("train.shard_base with train.tile_size: not supported together (the tiles' recompute runs "
                          "outside the decoder layers' FSDP hooks; untested): turn one of them off")
    if t.tile_size and t.compile == "layers":
        raise ConfigError("train.tile_size: torch.compile cannot trace the tiles inside a compiled layer: set "
                          "--train.compile=none or --train.tile_size=0")
    if t.tile_projections and t.compile == "lora":  # the MLP's tiles hold no adapter's compiled update; q/k/v/o's do
        raise ConfigError("train.tile_projections: torch.compile cannot trace the tiles inside a compiled adapter: "
                          "set --train.compile=none or --train.tile_projections=false")
    if t.tile_size and cfg.quant.method == "full":
        raise ConfigError("train.tile_size is for adapters on a frozen base: with quant.method=full each tile "
                          "would add up full-size weight gradients: set --train.tile_size=0 or use qlora/lora")


def tiled(cfg: RunConfig, method: str, tokens: int) -> bool:
    """Whether a micro-batch of `tokens` runs in tiles: one tile or fewer runs the modules as they are."""
    return 0 < cfg.train.tile_size < tokens and method != "full"


def untiled_up_to(cfg: RunConfig, method: str, per: int) -> int:
    """The most rows of `per` tokens (or tokens in each of `per` rows) a micro-batch holds and still runs untiled, 0
    where tiles never act: past it the tiles begin and a step's estimate falls (a tile's working set replaces the
    whole length's), so a search for the longest row that fits treats the two sides apart."""
    return cfg.train.tile_size // per if cfg.train.tile_size and method != "full" else 0


def norms_tiled(cfg: RunConfig, method: str, tokens: int) -> bool:
    """Whether the RMSNorms of a micro-batch of `tokens` run in tiles (train.tile_norms, where tiles act)."""
    return tiled(cfg, method, tokens) and cfg.train.tile_norms


def effect(t: TilingFields) -> str:
    """tile_size=4096 with tile_projections: the MLP and q/k/v/o in sequence tiles (and so on)."""
    switches = [name for name, on in (("tile_projections", t.tile_projections), ("tile_norms", t.tile_norms)) if on]
    modules = ["the MLP"] + [what for what, on in (("q/k/v/o", t.tile_projections), ("the norms", t.tile_norms)) if on]
    return f"tile_size={t.tile_size}" + (f" with {' and '.join(switches)}" if switches else "") + \
        f": {', '.join(modules[:-1]) + ' and ' if len(modules) > 1 else ''}{modules[-1]} in sequence tiles"


TILES = Lever(
    name="train.tile_size", kind="memory",
    active=lambda cfg, method, device: bool(cfg.train.tile_size) and method != "full",
    effect=lambda cfg, method: effect(cfg.train),
    check=check)

LEVERS = (TILES,)
