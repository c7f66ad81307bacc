"""The optimizer and its schedule (qlora/training/optimizer.py) against torch's AdamW and transformers' cosine."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from qlora.base.bnb import bnb
from qlora.config import Config, apply_overrides
from qlora.training.optimizer import build_scheduler, make_optimizer, retarget


def lrs(cfg: Config, schedule: object = build_scheduler) -> list[float]:
    """The lr each of the run's steps runs at, as the loop reads it: before the schedule's step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    scheduler = schedule(optimizer, cfg)
    out = []
    for _ in range(cfg.train.steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_the_schedule_warms_up_as_documented_then_decays_as_transformers_cosine(tiny_config: Config) -> None:
    """Step k of the warmup at (k+1)/(warmup_steps+1) of the peak (train.warmup_steps' docstring), then transformers'
    get_cosine_schedule_with_warmup: the last step runs at a small lr, zero comes after it."""
    cfg = apply_overrides(tiny_config, ["--train.steps=20", "--train.warmup_steps=4", "--train.lr=1e-3"])
    got = lrs(cfg)
    theirs = lrs(cfg, lambda o, c: get_cosine_schedule_with_warmup(o, c.train.warmup_steps, c.train.steps))
    assert got[:4] == pytest.approx([1e-3 * (k + 1) / 5 for k in range(4)], rel=1e-12)
    assert got[4:] == pytest.approx(theirs[4:], rel=1e-12)
    assert got[4] == 1e-3 and got[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 15 / 16)), rel=1e-12)

    constant = lrs(apply_overrides(cfg, ["--train.schedule=constant"]))
    assert constant == pytest.approx(got[:4] + [1e-3] * 16, rel=1e-12)


@pytest.mark.parametrize("optimizer,kind", [("adamw", torch.optim.AdamW), ("paged_adamw_32bit", bnb.optim.AdamW32bit),
                                            ("paged_adamw_8bit", bnb.optim.AdamW8bit)])
@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_each_optimizer_is_the_adamw_named_with_the_recipes_lr_and_decay(tiny_config: Config, optimizer: str,
                                                                         kind: type, decay: float) -> None:
    """No decay unless train.weight_decay asks (torch's AdamW decays by 0.01 where none is given); on the CPU the
    paged classes run as the plain ones. The 32-bit moments step as torch's AdamW does."""
    cfg = apply_overrides(tiny_config, [f"--train.optimizer={optimizer}", "--train.lr=1e-2",
                                        f"--train.weight_decay={decay}"])
    weights = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    ours, reference = torch.nn.Parameter(weights.clone()), torch.nn.Parameter(weights.clone())
    optimizer_ = make_optimizer([ours], cfg)
    assert type(optimizer_) is kind
    group = optimizer_.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (1e-2, decay, (0.9, 0.999), 1e-8)
    if optimizer == "paged_adamw_8bit":
        return
    torch_adamw = torch.optim.AdamW([reference], lr=1e-2, weight_decay=decay)
    for step in range(3):
        grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(step + 1))
        for p, o in ((ours, optimizer_), (reference, torch_adamw)):
            p.grad = grad.clone()
            o.step()
    torch.testing.assert_close(ours.detach(), reference.detach())


def test_a_resume_steps_on_with_the_lr_and_weight_decay_it_is_given(tiny_config: Config) -> None:
    """--resume --train.lr=1e-4 --train.weight_decay=0.1 after 4 steps of a run at 1e-3 without decay: from step 4 on,
    the schedule and decay of a run started with them (retarget), not the checkpoint's."""
    cfg = apply_overrides(tiny_config, ["--train.steps=10", "--train.warmup_steps=2", "--train.lr=1e-3",
                                        "--train.optimizer=adamw"])
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    scheduler = build_scheduler(optimizer, cfg)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    resumed = apply_overrides(cfg, ["--train.lr=1e-4", "--train.weight_decay=0.1"])
    retarget(optimizer, scheduler, resumed)
    got = []
    for _ in range(4, 10):
        got.append(optimizer.param_groups[0]["lr"])
        assert optimizer.param_groups[0]["weight_decay"] == 0.1
        optimizer.step()
        scheduler.step()
    assert got == pytest.approx(lrs(resumed)[4:], rel=1e-12)
