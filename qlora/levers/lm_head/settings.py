"""The output head in NF4 (quant.quantize_lm_head): the recipe field and its rules."""

from __future__ import annotations

from dataclasses import dataclass

from qlora.errors import ConfigError
from qlora.levers.lever import Lever, LeverFields, RunConfig


@dataclass
class LMHeadFields(LeverFields):
    quantize_lm_head: bool = False
    """Store the (frozen) output head in NF4 as well: saves ~3/4 of vocab x hidden x 2 bytes (0.75 GiB for 8B,
    1.5 GiB for 70B) at the cost of quantisation error in the logits; it is dequantised 256 MiB at a time to compute
    (qlora/levers/lm_head/head.py). qlora only; needs untied embeddings."""


def check(cfg: RunConfig) -> None:
    if cfg.quant.quantize_lm_head and cfg.quant.method != "qlora":
        raise ConfigError(f"quant.quantize_lm_head needs quant.method=qlora (got {cfg.quant.method!r}): "
                          "set --quant.quantize_lm_head=false")


LM_HEAD = Lever(
    name="quant.quantize_lm_head", kind="memory",
    active=lambda cfg, method, device: cfg.quant.quantize_lm_head and method == "qlora",
    effect=lambda cfg, method: "quantize_lm_head: lm_head in NF4",
    check=check)

LEVERS = (LM_HEAD,)
