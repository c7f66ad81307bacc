"""The optimizer in host memory (train.optimizer_on_cpu): the recipe field."""

from __future__ import annotations

from dataclasses import dataclass

from qlora.levers.lever import Lever, LeverFields


@dataclass
class HostOptimizerFields(LeverFields):
    optimizer_on_cpu: bool = False
    """Keep the optimizer state in CPU memory from the start and run the update there (parameters and gradients are
    copied over and back each step): the state never takes device memory. Changes nothing on a CPU device."""


HOST_OPTIMIZER = Lever(
    name="train.optimizer_on_cpu", kind="memory",
    active=lambda cfg, method, device: cfg.train.optimizer_on_cpu and device == "cuda",
    effect=lambda cfg, method: "optimizer_on_cpu: the optimizer state in host memory")

LEVERS = (HOST_OPTIMIZER,)
