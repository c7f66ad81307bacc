"""Speed levers (train.reuse_dequant, train.dequant_once, train.fuse_lora_add, train.fuse_lora, train.compile): the
recipe fields and their rules."""

from __future__ import annotations

from dataclasses import dataclass

from qlora.errors import ConfigError
from qlora.levers.lever import Lever, LeverFields, RunConfig

COMPILE_TARGETS = ("none", "lora", "layers")


@dataclass
class SpeedFields(LeverFields):
    reuse_dequant: bool = False
    """Keep each NF4 weight dequantised in the recompute for its backward instead of dequantising it again: one
    dequantisation fewer per weight and step, one layer of 16-bit weights more at peak. Needs gradient_checkpointing."""
    fuse_lora_add: bool = False
    """Add the LoRA update into the base output in place (one addmm) instead of as a separate tensor and add."""
    compile: str = "none"
    """torch.compile: none, lora (each adapter's update) or layers (each decoder layer)."""
    dequant_once: bool = False
    """Dequantise each NF4 weight the first time it is used and keep the 16-bit weight: every later micro-batch and
    step (forward, recompute, backward) uses it, none dequantises again. Costs a 16-bit copy of every 4-bit linear
    layer beside the NF4 one (15 GB for Llama-3.1-8B in bf16): for cards with room to spare."""
    fuse_lora: bool = False
    """Each adapted layer's base output, LoRA's two thin matmuls and their backward as one autograd node
    (qlora/levers/speed/fused.py): the update added into the base output in place, the adapter's input gradient
    added into the base's in place; nothing of tokens x out_features but the output exists."""

    def check_fields(self) -> None:
        if self.compile not in COMPILE_TARGETS:
            raise ConfigError(f"train.compile={self.compile!r}: use none, lora or layers")


def check(cfg: RunConfig) -> None:
    t = cfg.train
    if t.reuse_dequant and not t.gradient_checkpointing:
        raise ConfigError("train.reuse_dequant keeps dequantised weights until the backward, which without "
                          "checkpointing is every layer's: set --train.gradient_checkpointing=true or "
                          "--train.reuse_dequant=false")
    if t.dequant_once and t.reuse_dequant:
        raise ConfigError("train.dequant_once keeps every dequantised weight, so train.reuse_dequant has nothing "
                          "left to save: set --train.reuse_dequant=false")
    if t.dequant_once and t.shard_base:
        raise ConfigError("train.shard_base with train.dequant_once: not supported together (each process would "
                          "keep whole dequantised layers it holds a shard of): turn one of them off")
    if t.fuse_lora and t.fuse_lora_add:
        raise ConfigError("train.fuse_lora adds the update in place already: set --train.fuse_lora_add=false")
    if t.fuse_lora and t.compile == "lora":
        raise ConfigError("train.fuse_lora with train.compile=lora: torch.compile cannot trace the fused node's "
                          "custom backward: set --train.compile=none or --train.fuse_lora=false")
    if t.compile != "none" and t.shard_base:
        raise ConfigError("train.shard_base with train.compile: not supported together (compile is untested under "
                          "FSDP): turn one of them off")


REUSE_DEQUANT = Lever(
    name="train.reuse_dequant", kind="speed",
    active=lambda cfg, method, device: cfg.train.reuse_dequant and method == "qlora",
    effect=lambda cfg, method: "reuse_dequant: each NF4 weight dequantised once per layer recompute and backward",
    check=check, holds_memory=True)

FUSE_LORA_ADD = Lever(
    name="train.fuse_lora_add", kind="speed",
    active=lambda cfg, method, device: cfg.train.fuse_lora_add and method != "full",
    effect=lambda cfg, method: "fuse_lora_add: the LoRA update added into the base output in place")

COMPILE = Lever(
    name="train.compile", kind="speed",
    active=lambda cfg, method, device: cfg.train.compile != "none",
    effect=lambda cfg, method: f"compile={cfg.train.compile}: torch.compile of each "
    f"{'adapter' if cfg.train.compile == 'lora' else 'decoder layer'}")

DEQUANT_ONCE = Lever(
    name="train.dequant_once", kind="speed",
    active=lambda cfg, method, device: cfg.train.dequant_once and method == "qlora",
    effect=lambda cfg, method: "dequant_once: each NF4 weight dequantised once, its 16-bit copy kept",
    holds_memory=True)

FUSE_LORA = Lever(
    name="train.fuse_lora", kind="speed",
    active=lambda cfg, method, device: cfg.train.fuse_lora and method != "full",
    effect=lambda cfg, method: "fuse_lora: base output and LoRA update as one node, forward and backward")

LEVERS = (REUSE_DEQUANT, FUSE_LORA_ADD, COMPILE, DEQUANT_ONCE, FUSE_LORA)
