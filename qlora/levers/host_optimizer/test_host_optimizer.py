"""The optimizer in host memory (optimizer_on_cpu): the same steps as the optimizer on the device, resumable."""

from __future__ import annotations

import functools

import pytest
import torch
from support import build

from qlora.config import Config, apply_overrides
from qlora.levers.host_optimizer.optimizer import HostOptimizer
from qlora.training.loss import loss_sum


def steps(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, cfg: Config, n: int = 3,
          accum: int = 1) -> dict:
    """`n` of the trainer's steps: backward (of `accum` micro-batches: the batch's halves), clip what the optimizer
    steps (a norm small enough to bite), step."""
    from qlora.training.optimizer import build_scheduler, stepped_params

    scheduler = build_scheduler(optimizer, cfg)
    rows = batch["input_ids"].shape[0]
    micro = [{k: v[i * rows // accum:(i + 1) * rows // accum] for k, v in batch.items()} for i in range(accum)]
    for _ in range(n):
        for part in micro:
            (loss_sum(model, part) / 100).backward()
        assert torch.nn.utils.clip_grad_norm_(stepped_params(optimizer), 0.05) > 0.05
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def host_optimizer(model: torch.nn.Module, cfg: Config, to_host: bool = True) -> HostOptimizer:
    """Built directly: on a CPU device train.optimizer_on_cpu has nothing to move, and build_optimizer says so."""
    from qlora.training.optimizer import make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    return HostOptimizer(params, functools.partial(make_optimizer, cfg=cfg, paged=False), to_host)


@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit", "adamw"])
@pytest.mark.parametrize("compute", ["fp32", "bf16"])
@pytest.mark.parametrize("to_host", [True, False], ids=["gradients to the host", "gradients summed on the device"])
@pytest.mark.parametrize("accum", [1, 2])
def test_host_optimizer_steps_as_the_optimizer_on_the_device(tiny_config: Config, batch: dict, optimizer: str,
                                                             compute: str, to_host: bool, accum: int) -> None:
    # bf16 adapters: the device path steps fp32 masters on the device (qlora/adapters/master.py), this one on the host,
    # its gradients summed in fp32 in host memory (one process) or on the device (several). With weight decay, which
    # the inner optimizer applies once.
    from qlora.training.optimizer import build_optimizer

    cfg = apply_overrides(tiny_config, [f"--train.optimizer={optimizer}", f"--quant.compute_dtype={compute}",
                                        "--train.weight_decay=0.1"])
    model = build(cfg)
    reference = steps(model, batch, build_optimizer([p for p in model.parameters() if p.requires_grad], cfg), cfg,
                      accum=accum)
    model = build(cfg)
    host = host_optimizer(model, cfg, to_host)
    assert all(m.dtype == torch.float32 and not m.is_cuda for m in host.masters)
    assert len(host.staged) == (len(host.params) if to_host and compute == "bf16" else 0)
    got = steps(model, batch, host, cfg, accum=accum)
    assert got.keys() == reference.keys()
    for name in got:  # the same update on copies: exact
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=0, msg=name)


def test_host_optimizer_resumes_from_its_state_dict(tiny_config: Config, batch: dict) -> None:
    cfg = apply_overrides(tiny_config, ["--quant.compute_dtype=bf16"])
    model = build(cfg)
    first = host_optimizer(model, cfg)
    steps(model, batch, first, cfg, n=2)
    saved, adapters = first.state_dict(), {n: p.detach().clone() for n, p in model.named_parameters()
                                           if p.requires_grad}
    assert saved.keys() == {"inner", "masters"}  # qlora/adapters/master.py's format: a checkpoint loads either way
    resumed = build(cfg)
    with torch.no_grad():
        for name, p in resumed.named_parameters():
            if p.requires_grad:
                p.copy_(adapters[name])
    second = host_optimizer(resumed, cfg)
    second.load_state_dict(saved)
    torch.testing.assert_close(second.masters, first.masters, rtol=0, atol=0)
    after_resume, uninterrupted = steps(resumed, batch, second, cfg, n=1), steps(model, batch, first, cfg, n=1)
    for name, value in after_resume.items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=0, atol=0, msg=name)


def test_optimizer_on_cpu_is_a_noop_on_a_cpu_device(tiny_config: Config, capsys: pytest.CaptureFixture) -> None:
    from qlora.training.optimizer import build_optimizer

    cfg = apply_overrides(tiny_config, ["--train.optimizer_on_cpu=true"])
    model = build(cfg)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    assert not isinstance(optimizer, HostOptimizer) and "nothing to do" in capsys.readouterr().out


def test_a_resume_that_restarts_the_optimizer_keeps_the_resumed_weights(tiny_config: Config, batch: dict) -> None:
    """A resume that changed train.optimizer loads the weights, not the old state, after the optimizer was built over
    the fresh adapters: its masters must come from the loaded weights (qlora/training/progress.py), or the first step
    writes the fresh adapters back. The step then equals that of an optimizer built over the loaded weights."""
    from qlora.training.optimizer import restart_from_weights

    cfg = apply_overrides(tiny_config, ["--quant.compute_dtype=bf16"])
    trained = build(cfg)
    steps(trained, batch, host_optimizer(trained, cfg), cfg, n=2)
    weights = {n: p.detach().clone() for n, p in trained.named_parameters() if p.requires_grad}

    def resumed() -> tuple[torch.nn.Module, HostOptimizer]:
        model = build(cfg)
        optimizer = host_optimizer(model, cfg)  # built first, as the trainer builds it, then the weights load
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(weights[name])
        return model, optimizer

    model, optimizer = resumed()
    restart_from_weights(optimizer)
    torch.testing.assert_close(optimizer.masters, [weights[n].float() for n, p in model.named_parameters()
                                                   if p.requires_grad], rtol=0, atol=0)
    fresh = build(cfg)
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if p.requires_grad:
                p.copy_(weights[name])
    expected, got = steps(fresh, batch, host_optimizer(fresh, cfg), cfg, n=1), steps(model, batch, optimizer, cfg, n=1)
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    model, optimizer = resumed()  # without it, the fresh adapters come back
    stale = steps(model, batch, optimizer, cfg, n=1)
    assert any(not torch.equal(stale[n], expected[n]) for n in expected)


def test_the_weights_checked_after_a_step_are_what_it_wrote(tiny_config: Config) -> None:
    """After each step the trainer looks for non-finite weights in what the step wrote. The host optimizer's
    param_groups hold zero stand-ins for 16-bit adapters' gradients: its masters are what it writes."""
    from qlora.training import guard
    from qlora.training.optimizer import updated_weights

    cfg = apply_overrides(tiny_config, ["--quant.compute_dtype=bf16"])
    model = build(cfg)
    optimizer = host_optimizer(model, cfg)
    assert updated_weights(optimizer) is optimizer.masters and guard.all_finite(updated_weights(optimizer))
    with torch.no_grad():
        optimizer.masters[0][0, 0] = float("nan")
    assert not guard.all_finite(updated_weights(optimizer))


def test_16_bit_gradients_leave_the_parameters_as_the_backward_sums_them(tiny_config: Config, batch: dict) -> None:
    """One process: no gradient stays with a 16-bit parameter (on CUDA, none on the card after the backward); the
    fp32 sums wait in host memory, where the stand-ins the trainer clips hold them, the sums of each micro-batch's."""
    cfg = apply_overrides(tiny_config, ["--quant.compute_dtype=bf16"])
    model = build(cfg)
    optimizer = host_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros(p.shape) for p in params]
    for _ in range(2):
        (loss_sum(model, batch) / 100).backward()
        assert all(p.grad is None for p in params) and not optimizer.landing
        for total, grad in zip(sums, optimizer.staged.values(), strict=True):
            total.add_(grad)
    for holder, grad, total in zip(optimizer.holders, optimizer.host_grads, sums, strict=True):
        assert holder.grad is grad and holder.device.type == "cpu"
        torch.testing.assert_close(grad, total, rtol=0, atol=0)


def test_a_backward_that_raised_leaves_nothing_for_the_next_step(tiny_config: Config, batch: dict) -> None:
    """A backward stopped by an error after some gradients were staged never runs its end-of-backward callback; after
    zero_grad the next backward lands all of its own."""
    cfg = apply_overrides(tiny_config, ["--quant.compute_dtype=bf16"])
    model = build(cfg)
    optimizer = host_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]

    def fail(grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("out of memory")

    handle = params[0].register_hook(fail)  # the first adapter's gradient, the backward's last: others came first
    with pytest.raises(RuntimeError, match="out of memory"):
        (loss_sum(model, batch) / 100).backward()
    handle.remove()
    assert optimizer.landing
    optimizer.zero_grad(set_to_none=True)
    (loss_sum(model, batch) / 100).backward()
    assert not optimizer.landing and all(h.grad is not None for h in optimizer.holders)


@pytest.mark.parametrize("gpus", [1, 2])
def test_the_estimate_of_host_memory_is_what_the_host_optimizer_holds(tiny_config: Config, batch: dict,
                                                                       gpus: int) -> None:
    """The estimator's host term for train.optimizer_on_cpu, less the CPU update's temporaries, against the bytes
    a real HostOptimizer holds after a step of bf16 adapters: fp32 masters and gradients, the inner optimizer's
    state and, with one process, the 16-bit gradients on their way (several sum theirs on the card)."""
    from qlora.memory.arch import load_arch
    from qlora.memory.estimate import estimate
    from qlora.memory.terms import optimizer_bytes

    cfg = apply_overrides(tiny_config, ["--quant.compute_dtype=bf16", "--train.optimizer=paged_adamw_32bit",
                                        "--train.optimizer_on_cpu=true"])
    model = build(cfg)
    host = host_optimizer(model, cfg, to_host=gpus == 1)
    steps(model, batch, host, cfg, n=1)
    held = sum(t.numel() * t.element_size() for t in host.masters + host.host_grads + list(host.staged.values()))
    held += sum(v.numel() * v.element_size() for s in host.state.values() for v in s.values() if torch.is_tensor(v))
    temporaries = optimizer_bytes(tuple(p.numel() for p in host.params), cfg.train.optimizer, 4, "cpu")[2]
    assert estimate(cfg, load_arch(cfg), "qlora", "cuda", gpus).host["optimizer"] - temporaries == held
