"""The 4-bit base streamed from host memory (train.stream_base): the recipe field and its rules."""

from __future__ import annotations

from dataclasses import dataclass

from qlora.errors import ConfigError
from qlora.levers.lever import Lever, LeverFields, RunConfig


@dataclass
class StreamFields(LeverFields):
    stream_base: bool = False
    """Keep the 4-bit decoder layers (packed weights and absmax) in pinned host memory and bring each to the device
    just before it runs, the next one copied on a side stream while the current one computes, in the forward and
    again in the backward: two layers on the device instead of all of them (Llama-3.1-70B: 0.8 GiB instead of 33
    GiB) for 2 (L-2) layer copies per micro-batch (70B: 69 GB, 2.8 s at 25 GB/s). qlora only, one process."""


def check(cfg: RunConfig) -> None:
    t = cfg.train
    if not t.stream_base:
        return
    if cfg.quant.method != "qlora":
        raise ConfigError(f"train.stream_base streams a 4-bit base, but quant.method={cfg.quant.method} loads a "
                          "16-bit one: set --quant.method=qlora or --train.stream_base=false")
    if t.shard_base:
        raise ConfigError("train.shard_base and train.stream_base both place the base (sharded over the processes' "
                          "devices, or streamed from host memory): turn one of them off")
    if t.dequant_once:
        raise ConfigError("train.dequant_once keeps a 16-bit copy of every layer's weights on the device, which "
                          "train.stream_base keeps in host memory to save: set --train.dequant_once=false")
    if t.checkpoint_every > 1:
        raise ConfigError("train.stream_base with train.checkpoint_every: not supported together (a group's replay "
                          "runs earlier layers inside a later layer's backward, while the streamer holds two layers "
                          "in the order of the backward): set --train.checkpoint_every=1")


def check_processes(cfg: RunConfig, processes: int) -> None:
    """One process streams its base: with several (torchrun), refused before anything loads, for each process would
    otherwise load the whole base into host memory first."""
    if cfg.train.stream_base and processes > 1:
        refuse_several(processes)


def refuse_several(processes: int) -> None:
    """The refusal of a streamed base in a run of several `processes`. Its fix turns the streaming off too: with
    --train.shard_base=true alone the config refused the pair ("turn one of them off")."""
    raise ConfigError(f"train.stream_base streams one process's base, and this run has {processes} processes: run "
                      "one, or shard the base over them with --train.stream_base=false --train.shard_base=true")


STREAM_BASE = Lever(
    name="train.stream_base", kind="memory",
    # On a CPU device too: host and device are the same memory there, so it saves nothing, but it runs the same
    # bookkeeping (the tests' path) and costs its two resident layers, which the estimate counts.
    active=lambda cfg, method, device: cfg.train.stream_base and method == "qlora",
    effect=lambda cfg, method: "stream_base: the 4-bit decoder layers in pinned host memory, two on the device",
    check=check)

LEVERS = (STREAM_BASE,)
