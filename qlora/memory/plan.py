"""train.plan=fastest: the levers for the card and host the trainer finds, chosen before the base is loaded.

The rule: of every combination of the levers in the cost table (qlora/memory/costs.py), each off or on, take the one
whose added step time (the sum of its levers' figures) is least among those whose estimate fits: the step with the
allocator's margin within the card (on a CPU device, within the host's available memory) and what it keeps in host
memory within the host's. With checkpointing on, where the layer inputs wait is searched as `python -m qlora.memory
--max-context` searches it (context.py): as many offloaded as the host holds, and only every k-th kept (k-1 of k
layers replayed) when the card needs it, each at its cost. Ties go to fewer levers on. So on a card with room to spare
every memory lever is off, checkpointing too, and the speed levers that save time on this device are on; on a small
card the cheapest savings come first.

What the plan may choose, and what it leaves alone:
- a lever "on" is the recipe's setting (loss_chunk_size=256, say), or the table's where the recipe leaves the lever
  at its default; a lever "off" is its default (gradient_checkpointing: false). So a recipe lists the memory levers
  its smallest card needs (the memory tools read them as they stand) and the trainer drops those this card does not;
- a lever in train.plan_keep stays as set (qlora.train adds every lever set on its command line, and
  train.offload_budget_gib, which the checkpoint plan sets otherwise), and so does one the table has no figure for on
  this device (no speed lever is chosen on CUDA before a GPU measured it);
- levers that change the numbers (quant.quantize_lm_head, the 8-bit optimizer) are the recipe's: not in the table.

The batch shape, where the recipe leaves it to the plan (train.plan_batch), is chosen beside the levers: candidates.py
says which micro-batch sizes are choices and what each costs.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora.config import Config, apply_overrides, override_key
from qlora.errors import ConfigError
from qlora.levers.stream_base.settings import STREAM_BASE
from qlora.memory.arch import BadConfigValue, load_arch
from qlora.memory.candidates import (
    BATCH,
    BUDGET,
    OFFLOAD,
    SHAPE,
    batch_cost,
    checkpoint_cost,
    checkpoint_plans,
    choices,
    get,
    off,
    on_value,
    shaped,
    sizes,
    step_cost,
    with_settings,
)
from qlora.memory.context import budget_text
from qlora.memory.costs import COSTS, LeverCost
from qlora.memory.estimate import Estimate, estimate
from qlora.memory.preflight import fits, needs, room, this_host

GIB = 2**30
MADE = "--train.plan=fastest"  # train.plan_chose of a plan that kept the recipe's levers as they are


@dataclass
class Plan:
    """The levers chosen, what they cost and what the step then needs."""

    settings: dict[str, object]
    """Every lever the plan chose, at the value chosen (the checkpoint plan's fields included)."""
    cost: float
    """Added step time over the plain step, by the cost table."""
    estimate: Estimate
    considered: list[LeverCost] = field(default_factory=list)
    """The levers it chose among."""
    left: dict[str, str] = field(default_factory=dict)
    """The levers it left as set, and why."""

    def overrides(self, cfg: Config) -> list[str]:
        """The overrides that turn `cfg` into this plan (those settings that differ from it)."""
        return [override(key, value) for key, value in self.settings.items() if get(cfg, key) != value]

    def undo(self, cfg: Config) -> list[str]:
        """The overrides that turn this plan back into `cfg`: the values it changed, as `cfg` has them."""
        return [override(key, get(cfg, key)) for key, value in self.settings.items() if get(cfg, key) != value]


def override(key: str, value: object) -> str:
    """`--key=value` as the command line writes it and reads it back."""
    shown = str(value).lower() if isinstance(value, bool) else budget_text(value) if isinstance(value, float) else value
    return f"--{key}={shown}"


def choose(cfg: Config, device: str, card_bytes: int, host_bytes: int | None, gpus: int = 1) -> Plan | None:
    """The fastest plan whose estimate fits `card_bytes` (and the host's `host_bytes`, None: unbounded); None if none
    does. `device`: "cuda" or "cpu", whose column of the cost table counts."""
    arch = load_arch(cfg)
    options, left = choices(cfg, device, gpus)
    shapes, why = sizes(cfg, device)
    if why is not None:
        left[BATCH.lever] = why
    # Where even every memory lever on, the smallest micro-batch and the fewest layer inputs kept do not fit, nothing
    # does: said at once. A streamed base keeps every layer input (its rules refuse checkpoint_every > 1), so with it
    # on the fewest inputs kept are not the fewest: the same without it is the other bound (the 70B recipe at 177,152
    # tokens on 80 GiB was "no combination fits", where checkpoint_every=2 without streaming fits).
    memory = {row.lever: value for row, value in options if row.kind != "kernels"}
    bounds = [memory] + ([{**memory, STREAM_BASE.name: False}] if memory.get(STREAM_BASE.name) else [])
    frugal = [f for f in (with_settings(cfg, {**m, **shaped(cfg, min(shapes))}) for m in bounds) if f is not None]
    if frugal and all(f.train.gradient_checkpointing for f in frugal):
        least = min((e for f in frugal for _, e, _ in checkpoint_plans(f, arch, device, host_bytes, gpus)),
                    key=lambda e: e.card_bytes, default=None)
        if least is not None and needs(least)[0] > card_bytes:
            return None
    combos = []
    for switches in itertools.product((False, True), repeat=len(options)):
        on = [option for option, s in zip(options, switches, strict=True) if s]
        settings = {row.lever: value if s else off(row.lever)
                    for (row, value), s in zip(options, switches, strict=True)}
        if settings.get(OFFLOAD.lever) is False and BUDGET not in cfg.train.plan_keep:
            settings[BUDGET] = 0.0  # a budget limits offloading: none without it
        combos.append((settings, on))
    scored = []
    for (settings, on), b in itertools.product(combos, shapes):
        settings = {**settings, **shaped(cfg, b)}
        candidate = with_settings(cfg, settings)
        if candidate is not None:
            cost = step_cost(candidate, device, on) + batch_cost(cfg, b, device)
            scored.append((cost, len(on) + (b != cfg.train.batch_size), settings, candidate))
    scored.sort(key=lambda x: (round(x[0], 9), x[1]))
    best: Plan | None = None
    for cost, _, settings, candidate in scored:
        if best is not None and cost >= best.cost:
            break  # every later combination costs at least this much before its checkpoint plan
        if candidate.train.gradient_checkpointing:
            found = ((p, e, c) for p, e, c in checkpoint_plans(candidate, arch, device, host_bytes, gpus)
                     if fits(e, card_bytes, host_bytes))
        else:
            est = estimate(candidate, arch, candidate.quant.method, device, gpus)
            found = iter([(candidate, est, 0.0)] if fits(est, card_bytes, host_bytes) else [])
        hit = next(found, None)
        if hit is not None and (best is None or cost + hit[2] < best.cost):
            plan, est, extra = hit
            cp = est.checkpoints
            chosen = {**settings, "train.checkpoint_every": plan.train.checkpoint_every}
            if BUDGET not in cfg.train.plan_keep:  # one kept bounded the estimate as set (checkpoint_plans)
                # A budget only where the host cannot take every kept input (as `--max-context` says it): otherwise
                # none, as the estimate had it (a recipe's, kept, put inputs on the card the estimate had offloaded).
                chosen[BUDGET] = plan.train.offload_budget_gib if cp is not None and cp.offload and cp.on_device \
                    else 0.0
            best = Plan(chosen, cost + extra, est, [row for row, _ in options], left)
    return best


def explain(cfg: Config, plan: Plan, device: str, where: str) -> list[str]:
    """What start-up prints: what was chosen and why, lever by lever."""
    est = plan.estimate
    lines = [f"train.plan=fastest ({where}): the step estimated at {est.card_bytes / GIB:.2f} GiB"
             + (" with the allocator's margin" if est.margin else "")
             + (f", {est.host_bytes / GIB:.2f} GiB in host memory" if est.host else "")
             + f"; {100 * plan.cost:+.0f}% of a plain step by the cost table (qlora/memory/costs.py)"]
    for row in plan.considered:
        value, figure = plan.settings[row.lever], row.figure(device)
        if value != off(row.lever):
            shown = str(value).lower() if isinstance(value, bool) else value
            lines.append(f"  on:  {row.lever}={shown} ({row.kind}, {100 * figure:+.0f}%)")
        else:
            lines.append(f"  off: {row.lever} ({row.kind}, {100 * figure:+.0f}%): {why_off(cfg, plan, row, figure)}")
    cp = est.checkpoints
    if cp is not None and (cp.every > 1 or cp.host):
        lines.append(f"  checkpoints: {cp.describe()}")
    if cfg.train.plan_batch and BATCH.lever not in plan.left:
        b, g = plan.settings.get("train.batch_size", cfg.train.batch_size), plan.settings.get(
            "train.grad_accum", cfg.train.grad_accum)
        recipe = "as the recipe" if b == cfg.train.batch_size else \
            f"the recipe: {cfg.train.batch_size} x {cfg.train.grad_accum}"
        lines.append(f"  batch: {b} row{'s' if b != 1 else ''} x {g} micro-batch{'es' if g != 1 else ''} a step "
                     f"({recipe}; {100 * batch_cost(cfg, b, device):+.0f}% by the cost table)")
    lines += [f"  as set: {lever}={get(cfg, lever)} ({why})" for lever, why in plan.left.items()]
    return lines


def why_off(cfg: Config, plan: Plan, row: LeverCost, figure: float) -> str:
    """Why the plan left a lever off: it costs time, or (one that saves time) the rules or the card keep it out."""
    if figure >= 0:
        return "saves no time here" if row.kind == "kernels" else "not needed here"
    if with_settings(cfg, {**plan.settings, row.lever: on_value(cfg, row)}) is None:
        return "not allowed beside the levers on"
    return "does not fit beside the levers on"


def unplanned(cfg: Config, overrides: list[str], run_config: Path | None = None) -> None:
    """A resumed run's levers as they were before its plan (train.plan_from), but those set on this command line: the
    plan starts again from the recipe, on whatever card the run now has. What it chose before stays in
    train.plan_chose for plan_for to keep where it still fits, unless this command line sets a lever or the plan's own
    keys (a new plan asked for). `run_config`: a resumed run's run_config.json, where train.plan_from was read."""
    keys = {override_key(item) for item in overrides}
    try:
        apply_overrides(cfg, [item for item in cfg.train.plan_from if override_key(item) not in keys])
    except ConfigError as err:
        if run_config is None or not run_config.is_file():  # the recipe's or the command line's: they name it
            raise
        # A lever renamed since the run began, or an edited file; with the plan off, the levers stay as it chose them
        raise ConfigError(f"{run_config}'s train.plan_from (the recipe's values of the levers the run's plan "
                          f"changed) no longer applies ({err}): continue with --resume --train.plan=recipe to keep "
                          "the levers the plan chose, or correct train.plan_from there") from None
    asked = any(planned_lever(key) or key.startswith("train.plan") for key in keys)
    cfg.train.plan_chose, cfg.train.plan_from = [] if asked else cfg.train.plan_chose, []


def kept_plan(cfg: Config, device: str, card_bytes: int, host_bytes: int | None,
              gpus: int = 1) -> tuple[Plan | None, str]:
    """A resumed run's own plan (train.plan_chose, over the recipe's levers) where it still fits this card and host,
    else None. Planning again where it fits would follow the card's free memory, not the run: on a CPU device the
    host's available memory moves between runs, and a plan that then turns on tiles or the chunked loss draws other
    dropout masks or sums the loss otherwise, so the resumed run is no longer the one it continues (measured on the
    tiny recipe: tiles switched on at a resume moved the adapter by 1.1e-2 from a straight run's; the same levers
    keep it bitwise). Beside it, why it is not kept, for the line that says the run planned again."""
    if not cfg.train.plan_chose:
        return None, ""
    try:
        ran = apply_overrides(copy.deepcopy(cfg), cfg.train.plan_chose)
        est = estimate(ran, load_arch(ran), ran.quant.method, device, gpus)
    except (ConfigError, OSError, ValueError, KeyError) as err:
        # A lever renamed since the run began, or a value this version reads otherwise: plan again (a model the
        # estimator does not know fails choose too, and is said there).
        return None, f"no longer applies ({err})"
    if not fits(est, card_bytes, host_bytes):
        return None, "does not fit here"
    options, left = choices(cfg, device, gpus)
    on = [(row, value) for row, value in options if get(ran, row.lever) != off(row.lever)]
    chosen = [*(row.lever for row, _ in options), "train.checkpoint_every", BUDGET, *SHAPE]
    settings = {key: get(ran, key) for key in chosen}
    cost = step_cost(ran, device, on) + batch_cost(cfg, ran.train.batch_size, device) + \
        checkpoint_cost(ran, est, device)  # the layers replayed and the inputs offloaded, as choose counts them
    return Plan(settings, cost, est, [row for row, _ in options], left), ""


def planned_lever(key: str) -> bool:
    """Whether the plan sets `key`: a lever of the cost table, the batch shape or the offload budget."""
    return key in COSTS or key in SHAPE or key == BUDGET


def keep_overridden(cfg: Config, overrides: list[str]) -> None:
    """A lever set on the command line stays as set: add it to train.plan_keep."""
    keys = [override_key(item) for item in overrides]
    ours = [key for key in keys if planned_lever(key)]
    cfg.train.plan_keep += [key for key in dict.fromkeys(ours) if key not in cfg.train.plan_keep]


def use_plan(cfg: Config, device: torch.device, gpus: int = 1, processes: int = 1,
             least: Callable[[tuple[int, str]], tuple[int, str]] = lambda room: room) -> Plan | None:
    """Choose the plan for `device` and the host, set its levers on `cfg` (train.plan_chose records the overrides)
    and print what was chosen and why. Each of the run's `processes` on this host counts its share of the host
    (preflight.this_host), as its check before loading does; `least` (Ranks.least: the least over every process of
    the card or the share) makes every process choose alike."""
    card, where = least(room(device, processes))
    host = least(this_host(processes)) if device.type == "cuda" else None
    plan, lines = plan_for(cfg, device.type, card, where, host, gpus)
    print("\n".join(lines))
    return plan


def plan_for(cfg: Config, device: str, card: int, where: str, host: tuple[int, str] | None,
             gpus: int = 1) -> tuple[Plan | None, list[str]]:
    """The plan for a card of `card` bytes (`where` says which) and the host memory `host` (its bytes and what they
    are, as host_share gives them; None: not counted), its levers set on `cfg`, and the lines that say what was chosen
    and why: qlora.train's choice on the card it finds, and `python -m qlora.memory RECIPE --gpu-gib N`'s for a card
    named."""
    whole, host_bytes = card, host[0] if host is not None else None
    if cfg.train.plan_gib:  # the recipe's own ceiling, below the card's
        card, where = min(card, int(cfg.train.plan_gib * GIB)), f"{where}, train.plan_gib={cfg.train.plan_gib:g}"
    try:
        kept, why = kept_plan(cfg, device, card, host_bytes, gpus)
        plan = kept or choose(cfg, device, card, host_bytes, gpus)
    except BadConfigValue:  # a value no decoder has: refused, as by the check before loading
        raise
    except (ConfigError, OSError, ValueError, KeyError) as err:  # a model the estimator does not know
        return None, [f"train.plan=fastest: no estimate for this model ({err}): the recipe's levers as set"]
    if plan is None and card < whole:  # the user's ceiling: not to be passed over
        raise ConfigError(f"train.plan=fastest: no combination of levers fits train.plan_gib={cfg.train.plan_gib:g} "
                          f"({where}): raise train.plan_gib (0 = the whole card), or shorten data.max_seq_len")
    if plan is None:
        return None, [f"train.plan=fastest: no combination of levers fits ({where}): the recipe's levers as set"]
    if host is not None:
        where += ", " + host[1]
    lines = explain(cfg, plan, device, where)
    if kept is not None:
        lines.insert(1, "  the run's own plan, as it chose at its start (train.plan_chose), which still fits: kept")
    elif cfg.train.plan_chose and sorted(plan.overrides(cfg)) != sorted(cfg.train.plan_chose):
        ran = "the recipe's levers" if cfg.train.plan_chose == [MADE] else " ".join(cfg.train.plan_chose)
        lines.insert(1, f"  the run's own plan ({ran}) {why}: planned again "
                        "(levers that change the numbers, tiles or the loss's chunks, make it another run than a "
                        "straight one)")
    # A plan that changes nothing is recorded as made (a resume keeps it where it fits: kept_plan), not as none.
    cfg.train.plan_chose, cfg.train.plan_from = plan.overrides(cfg) or [MADE], plan.undo(cfg)
    for key, value in plan.settings.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return plan, lines
