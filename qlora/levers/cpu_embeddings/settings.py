"""The input embedding table in CPU memory (model.embeddings_on_cpu): the recipe field and its rules."""

from __future__ import annotations

from dataclasses import dataclass

from qlora.errors import ConfigError
from qlora.levers.lever import Lever, LeverFields, RunConfig


@dataclass
class CPUEmbeddingFields(LeverFields):
    embeddings_on_cpu: bool = False
    """Keep the input embedding table in CPU memory; look tokens up there and send only their vectors to the device
    (saves vocab x hidden x 2 bytes: 1.0 GiB for Llama-3.1-8B, 2.1 GiB for 70B). Frozen methods only."""


def check(cfg: RunConfig) -> None:
    if cfg.model.embeddings_on_cpu and cfg.train.shard_base:
        raise ConfigError("train.shard_base shards the embeddings across the processes' devices; "
                          "model.embeddings_on_cpu keeps them in CPU memory: turn one of them off")
    if cfg.model.embeddings_on_cpu and cfg.quant.method == "full":
        raise ConfigError("model.embeddings_on_cpu keeps a frozen table, but quant.method=full trains every "
                          "weight: set --model.embeddings_on_cpu=false or use qlora/lora")


CPU_EMBEDDINGS = Lever(
    name="model.embeddings_on_cpu", kind="memory",
    active=lambda cfg, method, device: cfg.model.embeddings_on_cpu and method != "full" and device == "cuda",
    effect=lambda cfg, method: "embeddings_on_cpu: the input embeddings in host memory",
    check=check)

LEVERS = (CPU_EMBEDDINGS,)
