"""train.plan=fastest (qlora/memory/plan.py) on fake card and host sizes: it never picks a plan whose estimate exceeds
the card or the host, no cheaper combination of the levers fits, on a big card the memory levers that cost time are
off, and what the recipe keeps stays; the trainer prints the choice and records it in run_config.json."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest

from qlora.config import Config, apply_overrides, load_recipe
from qlora.memory.arch import load_arch
from qlora.memory.costs import COSTS, TABLE
from qlora.memory.estimate import estimate
from qlora.memory.plan import choices, choose, off, with_settings

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
HOST = 120 * GIB  # available host memory (the process's own allowance excluded)


def recipe(name: str, *overrides: str) -> Config:
    return apply_overrides(load_recipe(ROOT / "recipes" / f"{name}.py"), ["--train.plan=fastest", *overrides])


def as_user_runs_it(cfg: Config, overrides: list[str]) -> tuple[Config, object]:
    """The plan's overrides on the recipe, estimated the ordinary way (as preflight will)."""
    planned = apply_overrides(copy.deepcopy(cfg), overrides)
    return planned, estimate(planned, load_arch(planned), planned.quant.method, "cuda")


@pytest.mark.parametrize(("name", "seq", "card_gib"), [("llama8b", 2048, 16), ("llama8b", 2048, 24),
                                                      ("llama8b", 65_536, 24), ("llama8b", 65_536, 79.6),
                                                      ("llama70b", 2048, 45), ("llama70b", 32_768, 79.6)])
def test_the_plan_fits_card_and_host_and_nothing_cheaper_does(name: str, seq: int, card_gib: float) -> None:
    cfg = recipe(name, f"--data.max_seq_len={seq}")
    card = int(card_gib * GIB)
    plan = choose(cfg, "cuda", card, HOST)
    assert plan is not None
    planned, est = as_user_runs_it(cfg, plan.overrides(cfg))
    assert est.card_bytes == plan.estimate.card_bytes <= card
    assert est.host_bytes - est.host["runtime"] <= HOST
    # Every combination the table's levers allow that costs less (with no lever replayed: checkpoint_every=1) does
    # not fit: the plan is the fastest by the table, not merely one that fits.
    options, _ = choices(cfg, "cuda")
    arch = load_arch(cfg)
    for switches in itertools.product((False, True), repeat=len(options)):
        on = [row for (row, _), s in zip(options, switches, strict=True) if s]
        settings = {row.lever: value if s else off(row.lever) for (row, value), s in zip(options, switches,
                                                                                          strict=True)}
        cheaper = sum(row.cuda for row in on)
        candidate = with_settings(cfg, {**settings, "train.offload_budget_gib": 0.0})
        if candidate is None or cheaper >= plan.cost - 1e-9:
            continue
        if any(row.lever.startswith("train.tile") or row.lever in ("train.loss_chunk_size",
                                                                   "train.offload_activations") for row in on):
            continue  # costed where they act, by the share they offload: covered by the plan's own search
        est = estimate(candidate, arch, "qlora", "cuda")
        assert est.card_bytes > card, (settings, cheaper, plan.cost)


def test_on_a_big_card_every_memory_lever_that_costs_time_is_off() -> None:
    """The 8B recipe as shipped on an H200-sized card (139.8 GiB) at 2048 tokens: no recompute, nothing on the host;
    on a 16 GiB card the recipe's own memory levers come back, cheapest first."""
    cfg = recipe("llama8b")
    big = choose(cfg, "cuda", int(139.8 * GIB), HOST)
    memory = [row.lever for row in TABLE if row.kind != "kernels"]
    assert big.cost == 0 and all(big.settings.get(lever, off(lever)) == off(lever) for lever in memory)
    planned, est = as_user_runs_it(cfg, big.overrides(cfg))
    assert not planned.train.gradient_checkpointing and not est.host.get("checkpoints")
    small = choose(cfg, "cuda", 16 * GIB, HOST)
    assert small.cost > 0 and small.estimate.card_bytes <= 16 * GIB
    on = {lever for lever, value in small.settings.items() if lever in COSTS and value != off(lever)}
    assert on and on <= {"train.gradient_checkpointing", "train.loss_chunk_size", "model.embeddings_on_cpu",
                         "train.offload_activations", "train.optimizer_on_cpu", "train.checkpoint_every"}


def test_a_kept_lever_stays_as_set_and_nothing_fits_where_the_weights_do_not() -> None:
    cfg = recipe("llama8b", "--train.plan_keep=train.offload_activations,train.gradient_checkpointing")
    plan = choose(cfg, "cuda", int(139.8 * GIB), HOST)
    assert "train.offload_activations" not in plan.settings and plan.left["train.offload_activations"] == \
        "train.plan_keep"
    assert plan.estimate.host["checkpoints"] > 0  # still offloaded, as the recipe sets it
    assert choose(recipe("llama70b"), "cuda", 24 * GIB, HOST) is None  # 70B's NF4 weights alone exceed 24 GiB


def test_on_a_cpu_device_the_host_is_the_card(tiny_config: Config) -> None:
    """The tiny recipe on CPU: with room, no checkpointing and the speed levers that save time on a CPU; with just
    enough for the recipe's own step, checkpointing stays."""
    cfg = apply_overrides(tiny_config, ["--train.plan=fastest"])
    arch = load_arch(cfg)
    roomy = choose(cfg, "cpu", 64 * GIB, None)
    assert roomy.settings["train.gradient_checkpointing"] is False
    faster = {row.lever for row in TABLE if row.kind == "kernels" and row.cpu is not None and row.cpu < 0}
    assert {lever for lever, v in roomy.settings.items() if lever in faster and v is True}
    tight = estimate(cfg, arch, "qlora", "cpu").card_bytes  # the recipe as it is: checkpointing on, no speed lever
    plan = choose(cfg, "cpu", tight, None)
    assert plan.settings["train.gradient_checkpointing"] is True and plan.estimate.card_bytes <= tight


def test_the_trainer_prints_the_plan_and_records_it(tiny_config: Config, capsys) -> None:
    from qlora.train import train

    cfg = apply_overrides(tiny_config, ["--train.plan=fastest", "--train.steps=1", "--train.eval_before=false",
                                        "--train.eval_batches=1"])
    train(cfg)
    out = capsys.readouterr().out
    assert "train.plan=fastest (this host has " in out and "off: train.gradient_checkpointing" in out
    assert out.index("train.plan=fastest") < out.index("loading ")  # before the base is loaded
    recorded = json.loads((Path(cfg.output.dir) / "run_config.json").read_text())["train"]
    assert recorded["plan"] == "fastest" and "--train.gradient_checkpointing=false" in recorded["plan_chose"]
    assert recorded["gradient_checkpointing"] is False
