"""Speed levers (train.reuse_dequant, train.fuse_lora_add, train.compile): the recipe fields and their rules."""

from __future__ import annotations

from dataclasses import dataclass

from qlora.errors import ConfigError
from qlora.levers.lever import Lever, RunConfig

COMPILE_TARGETS = ("none", "lora", "layers")


@dataclass
class SpeedFields:
    reuse_dequant: bool = False
    """Keep each NF4 weight dequantised in the recompute for its backward instead of dequantising it again: one
    dequantisation fewer per weight and step, one layer of 16-bit weights more at peak. Needs gradient_checkpointing."""
    fuse_lora_add: bool = False
    """Add the LoRA update into the base output in place (one addmm) instead of as a separate tensor and add."""
    compile: str = "none"
    """torch.compile: none, lora (each adapter's update) or layers (each decoder layer)."""

    def check_fields(self) -> None:
        if self.compile not in COMPILE_TARGETS:
            raise ConfigError(f"train.compile={self.compile!r}: use none, lora or layers")


def check(cfg: RunConfig) -> None:
    t = cfg.train
    if t.reuse_dequant and not t.gradient_checkpointing:
        raise ConfigError("train.reuse_dequant keeps dequantised weights until the backward, which without "
                          "checkpointing is every layer's: set --train.gradient_checkpointing=true or "
                          "--train.reuse_dequant=false")
    if t.compile != "none" and t.shard_base:
        raise ConfigError("train.shard_base with train.compile: not supported together (compile is untested under "
                          "FSDP): turn one of them off")


REUSE_DEQUANT = Lever(
    name="train.reuse_dequant", kind="speed",
    active=lambda cfg, method, device: cfg.train.reuse_dequant and method == "qlora",
    effect=lambda cfg, method: "reuse_dequant: each NF4 weight dequantised once per layer recompute and backward",
    check=check)

FUSE_LORA_ADD = Lever(
    name="train.fuse_lora_add", kind="speed",
    active=lambda cfg, method, device: cfg.train.fuse_lora_add and method != "full",
    effect=lambda cfg, method: "fuse_lora_add: the LoRA update added into the base output in place")

COMPILE = Lever(
    name="train.compile", kind="speed",
    active=lambda cfg, method, device: cfg.train.compile != "none",
    effect=lambda cfg, method: f"compile={cfg.train.compile}: torch.compile of each "
    f"{'adapter' if cfg.train.compile == 'lora' else 'decoder layer'}")

LEVERS = (REUSE_DEQUANT, FUSE_LORA_ADD, COMPILE)
