"""The levers train.plan=fastest chooses among (plan.py picks the fastest that fits): each lever's value on and off,
a combination's settings as the levers' rules take them, the micro-batch sizes, where the layer inputs wait, and what
each adds to the step by the cost table (qlora/memory/costs.py).

The batch shape, where the recipe leaves it to the plan (train.plan_batch): the step's rows R = batch_size x
grad_accum stay, and every micro-batch size b dividing R is a choice (grad_accum = R / b). A micro-batch costs a fixed
part (every weight dequantised, every kernel launched) and a part that grows with its tokens, so b rows cost
(b0 / b - 1) f / (f + b0 (1 - f) s / s_ref) of the recipe's step of b0 rows (batch_cost; f: the table's batch-shape
figure, measured at s_ref tokens a row; s: data.max_seq_len). The loss of a step is its summed loss over its target
tokens divided by their count (qlora/training/step.py) and the schedule counts optimizer steps, so neither changes.
Micro-batch i of b k rows holds the rows of micro-batches i k ... i k + k - 1 of b rows (qlora/data/batches.py), so a
step trains the same rows in the first epoch, and in every epoch where the training rows are a multiple of both
micro-batch sizes (an epoch ends at its last whole micro-batch); with lora.dropout > 0 the masks are drawn in another
order. The estimate counts every row at data.max_seq_len, so the shape chosen fits whatever the rows' lengths.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Iterator

from qlora.config import Config
from qlora.errors import ConfigError
from qlora.levers.stream_base.settings import STREAM_BASE
from qlora.levers.tiling.settings import tiled
from qlora.memory.arch import Arch
from qlora.memory.context import planned, plans
from qlora.memory.costs import COSTS, MEASURED_TOKENS, TABLE, LeverCost
from qlora.memory.estimate import Estimate, estimate
from qlora.memory.preflight import divisors
from qlora.memory.terms import HOST_RUNTIME

EVERY = COSTS["train.checkpoint_every"]
OFFLOAD = COSTS["train.offload_activations"]
BATCH = COSTS["train.batch_size"]
SHAPE = ("train.batch_size", "train.grad_accum")
TILE_SWITCHES = ("train.tile_size", "train.tile_projections", "train.tile_norms")
BUDGET = "train.offload_budget_gib"  # chosen with the checkpoint plan, unless train.plan_keep keeps it as set


def get(cfg: Config, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def off(key: str) -> object:
    """The value of a lever switched off: its default, but checkpointing is on by default."""
    return False if key == "train.gradient_checkpointing" else default(key)


def default(key: str) -> object:
    """The value a lever has when a recipe leaves it alone."""
    section, name = key.split(".")
    f = next(f for f in dataclasses.fields(typing.get_type_hints(Config)[section]) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def with_settings(cfg: Config, settings: dict[str, object]) -> Config | None:
    """`cfg` with `settings`, section by section (a shallow copy), or None where the levers' rules refuse it."""
    out = copy.copy(cfg)
    for section in {key.split(".")[0] for key in settings}:
        setattr(out, section, copy.copy(getattr(cfg, section)))
    for key, value in settings.items():
        section, name = key.split(".")
        setattr(getattr(out, section), name, value)
    try:
        for section in {key.split(".")[0] for key in settings}:
            getattr(out, section).__post_init__()
        out.__post_init__()
    except ConfigError:
        return None
    return out


def choices(cfg: Config, device: str, gpus: int = 1) -> tuple[list[tuple[LeverCost, object]], dict[str, str]]:
    """The levers the plan chooses among, each with its "on" value; and those it leaves as set, with why."""
    keep = set(cfg.train.plan_keep)
    out, left = [], {}
    for row in TABLE:
        if row.lever in (EVERY.lever, BATCH.lever):
            continue  # searched with the checkpoint plan, and with the batch shape (sizes)
        figure = row.figure(device)
        if device == "cpu" and row.cpu is None:
            continue  # a CUDA-only lever: it does nothing on a CPU device, whatever it is set to
        if gpus > 1 and row.lever == STREAM_BASE.name:
            continue  # one process's lever (refused with several): as the recipe sets it
        if row.lever in keep:
            left[row.lever] = "train.plan_keep"
        elif figure is None:
            if get(cfg, row.lever) != default(row.lever):  # a lever at its default is simply off: nothing to say
                left[row.lever] = f"no {device} figure in the cost table yet"
        elif row.kind == "kernels" and figure >= 0 and get(cfg, row.lever) == default(row.lever):
            continue  # costs time and saves no memory: never chosen
        else:
            out.append((row, on_value(cfg, row)))
    if BUDGET in keep:
        left[BUDGET] = "train.plan_keep"
    return out, left


def on_value(cfg: Config, row: LeverCost) -> object:
    """A lever's value switched on: the recipe's, or the table's where the recipe leaves it off."""
    recipe = get(cfg, row.lever)
    return recipe if recipe != off(row.lever) else row.setting


def sizes(cfg: Config, device: str) -> tuple[list[int], str | None]:
    """The micro-batch sizes the plan may run the step's rows in; where only the recipe's, why (None: not asked)."""
    t = cfg.train
    if not t.plan_batch:
        return [t.batch_size], None
    if set(SHAPE) & set(t.plan_keep):
        return [t.batch_size], "train.plan_keep"
    if BATCH.figure(device) is None:
        return [t.batch_size], f"no {device} figure in the cost table yet"
    return divisors(t.batch_size * t.grad_accum), None


def shaped(cfg: Config, b: int) -> dict[str, int]:
    """The settings that run the step's rows in micro-batches of `b` rows (none for the recipe's own)."""
    t = cfg.train
    return {} if b == t.batch_size else {"train.batch_size": b, "train.grad_accum": t.batch_size * t.grad_accum // b}


def batch_cost(cfg: Config, b: int, device: str) -> float:
    """Step time with micro-batches of `b` rows against the recipe's, as a share of its step (the module docstring)."""
    b0 = cfg.train.batch_size
    if b == b0:
        return 0.0
    f = BATCH.figure(device)
    per_row = (1 - f) * cfg.data.max_seq_len / MEASURED_TOKENS[device]
    return (b0 / b - 1) * f / (f + b0 * per_row)


def step_cost(cfg: Config, device: str, on: list[tuple[LeverCost, object]]) -> float:
    """The levers' figures, each counted only where it acts at this row length."""
    tokens = cfg.train.batch_size * cfg.data.max_seq_len
    total = 0.0
    for row, value in on:
        if row.lever in TILE_SWITCHES and not tiled(cfg, cfg.quant.method, tokens):
            continue  # rows no longer than a tile run untiled
        if row.lever == "train.loss_chunk_size" and value >= tokens:
            continue
        if row.lever == OFFLOAD.lever:
            continue  # by the share it offloads: checkpoint_plans
        total += row.figure(device)
    return total


def checkpoint_plans(cfg: Config, arch: Arch, device: str, host_bytes: int | None, gpus: int
                     ) -> Iterator[tuple[Config, Estimate, float]]:
    """Where the layer inputs wait, fewest replayed layers first: (config, estimate, its added cost)."""
    tokens = cfg.data.max_seq_len
    if device == "cuda" and gpus == 1 and not {EVERY.lever, BUDGET} & set(cfg.train.plan_keep):
        candidates = ((p, e) for p, e in plans(cfg, arch, tokens, None if host_bytes is None
                                               else host_bytes + HOST_RUNTIME))
    else:  # a CPU device offloads nothing; several processes keep the recipe's placement, a budget kept its own
        kept = gpus > 1 or EVERY.lever in cfg.train.plan_keep
        # A streamed base keeps every layer input (its rules refuse checkpoint_every > 1), as context.plans has it.
        streamed = STREAM_BASE.active(cfg, cfg.quant.method, device)
        everies = [cfg.train.checkpoint_every] if kept else range(1, 2 if streamed else arch.layers + 1)
        candidates = ((p, estimate(p, arch, cfg.quant.method, device, gpus))
                      for p in (planned(cfg, tokens, k, None) for k in everies))
    for plan, est in candidates:
        yield plan, est, checkpoint_cost(plan, est, device)


def checkpoint_cost(cfg: Config, est: Estimate, device: str) -> float:
    """What where the layer inputs wait adds to the step: the layers replayed and the kept inputs offloaded."""
    cp = est.checkpoints
    if cp is None:
        return 0.0
    cost = EVERY.figure(device) * (cp.every - 1) / cp.every
    if cfg.train.offload_activations and device == "cuda" and cp.kept:
        cost += OFFLOAD.figure(device) * cp.host / cp.kept
    return cost
