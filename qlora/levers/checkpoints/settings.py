"""Where checkpointed layer inputs wait for the backward: the recipe fields and their rules."""

from __future__ import annotations

from dataclasses import dataclass

from qlora.errors import ConfigError
from qlora.levers.lever import Lever, LeverFields, RunConfig


@dataclass
class CheckpointFields(LeverFields):
    offload_activations: bool = False
    """Keep each checkpointed layer input in pinned CPU memory until the backward needs it (CUDA only)."""
    offload_budget_gib: float = 0.0
    """Pinned CPU memory the offloaded layer inputs may take; the inputs beyond it stay on the device. 0 = no limit.
    `python -m qlora.memory RECIPE --max-context` says what a host's memory allows."""
    checkpoint_every: int = 1
    """Keep the input of every k-th decoder layer only; the backward replays each group of k layers from its first
    input to get the others back: L/k + k layer inputs instead of L, for one more forward of k-1 layers in k."""

    def check_fields(self) -> None:
        if not self.offload_budget_gib >= 0:
            raise ConfigError(f"train.offload_budget_gib={self.offload_budget_gib} must be >= 0 (0 = no limit)")
        if self.offload_budget_gib and not self.offload_activations:
            raise ConfigError("train.offload_budget_gib limits train.offload_activations: set "
                              "--train.offload_activations=true or --train.offload_budget_gib=0")
        if self.checkpoint_every < 1:
            raise ConfigError(f"train.checkpoint_every={self.checkpoint_every} must be at least 1 (every layer), "
                              "e.g. --train.checkpoint_every=2")


def check(cfg: RunConfig) -> None:
    t = cfg.train
    if t.offload_activations and not t.gradient_checkpointing:
        raise ConfigError("train.offload_activations offloads the checkpointed layer inputs: set "
                          "--train.gradient_checkpointing=true or --train.offload_activations=false")
    if t.checkpoint_every > 1 and not t.gradient_checkpointing:
        raise ConfigError("train.checkpoint_every chooses which checkpointed layers keep their input: set "
                          "--train.gradient_checkpointing=true or --train.checkpoint_every=1")
    if t.shard_base and t.checkpoint_every > 1:
        raise ConfigError("train.shard_base with train.checkpoint_every: not supported together (the replayed layers "
                          "run outside the decoder layers' FSDP hooks; untested): turn one of them off")


OFFLOAD = Lever(
    name="train.offload_activations", kind="memory",
    active=lambda cfg, method, device: cfg.train.offload_activations and cfg.train.gradient_checkpointing
    and device == "cuda",
    effect=lambda cfg, method: "offload_activations: layer inputs in pinned host memory" + (
        f", up to {cfg.train.offload_budget_gib:g} GiB" if cfg.train.offload_budget_gib else ""),
    check=check)

EVERY = Lever(
    name="train.checkpoint_every", kind="memory",
    active=lambda cfg, method, device: cfg.train.checkpoint_every > 1 and cfg.train.gradient_checkpointing,
    effect=lambda cfg, method: f"checkpoint_every={cfg.train.checkpoint_every}: every {cfg.train.checkpoint_every}th "
    "layer input kept, the others replayed")

LEVERS = (OFFLOAD, EVERY)
