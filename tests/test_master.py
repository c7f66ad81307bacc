"""bf16 adapters lose no update: fp32 masters in the optimizer, gradients summed in fp32 (qlora/adapters/master.py).

Run on the CPU with quant.compute_dtype=bf16, which gives the adapters the dtype they have on CUDA.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from qlora.adapters.master import MasterWeights
from qlora.config import Config, apply_overrides
from qlora.data.batches import collate
from qlora.train import train
from qlora.training.assemble import prepare
from qlora.training.loss import loss_sum
from qlora.training.optimizer import build_optimizer, stepped_params
from qlora.training.step import forward_backward


def bf16_run(cfg: Config, *overrides: str) -> dict:
    """The trainer's model in bf16 on the CPU, every B non-zero (a zero B leaves A without gradient)."""
    run = prepare(apply_overrides(cfg, ["--quant.compute_dtype=bf16", *overrides]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in run["model"].named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    run["model"].train()
    return run


def test_a_small_lr_step_moves_every_entry_whose_fp32_update_is_not_zero(tiny_config: Config) -> None:
    run = bf16_run(tiny_config, "--train.optimizer=adamw", "--train.lr=2e-5")
    model = run["model"]
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.bfloat16 for p in params)
    start = [p.detach().float().clone() for p in params]
    optimizer = build_optimizer(params, tiny_config)
    forward_backward(model, [collate(run["train_rows"][:4], run["tokenizer"].pad_token_id)])

    # The reference: the same AdamW step on fp32 copies with the gradients the step used.
    trained = stepped_params(optimizer)
    reference = [w.clone().requires_grad_() for w in start]
    for ref, p in zip(reference, trained, strict=True):
        ref.grad = p.grad.float().clone()
    torch.optim.AdamW(reference, lr=2e-5, weight_decay=0.0).step()
    optimizer.step()

    for p, w0, ref, param in zip(trained, start, reference, params, strict=True):
        should_move = ref.detach() != w0
        assert should_move.float().mean() > 0.99  # nearly every entry has a gradient
        assert ((p.detach().float() != w0) | ~should_move).all(), "an update was lost"
        torch.testing.assert_close(p.detach().float(), ref.detach(), rtol=0, atol=0)
        torch.testing.assert_close(param.detach(), p.detach().to(torch.bfloat16), rtol=0, atol=0)


def test_micro_batch_gradients_are_summed_in_fp32(tiny_config: Config) -> None:
    run = bf16_run(tiny_config)
    model, pad = run["model"], run["tokenizer"].pad_token_id
    micro = [collate(run["train_rows"][i:i + 2], pad) for i in range(0, 8, 2)]
    n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], tiny_config)
    trained = stepped_params(optimizer)

    # Each micro-batch's own bf16 gradient, then their sum in fp32, in the order the step adds them.
    total = None
    for batch in micro:
        optimizer.zero_grad(set_to_none=True)
        (loss_sum(model, batch) / n_targets).backward()
        grads = [p.grad.float().clone() for p in trained]
        total = grads if total is None else [t + g for t, g in zip(total, grads, strict=True)]
    optimizer.zero_grad(set_to_none=True)
    forward_backward(model, micro)
    for p, expected in zip(trained, total, strict=True):
        torch.testing.assert_close(p.grad.float(), expected, rtol=0, atol=0)
        assert p.grad.dtype == torch.float32


def test_bf16_resume_restores_the_masters_exactly(tiny_config: Config, tmp_path) -> None:
    cfg = apply_overrides(tiny_config, ["--quant.compute_dtype=bf16", "--train.lr=1e-4"])
    cfg.train.steps, cfg.train.save_every, cfg.train.keep_checkpoints = 4, 2, 2
    whole = train(cfg)
    masters = torch.load(tmp_path / "run" / "checkpoint-4" / "optimizer.pt", weights_only=True)["masters"]
    assert masters and all(m.dtype == torch.float32 for m in masters)

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "run" / "checkpoint-2", resumed_dir / "checkpoint-2")
    cfg.output.dir = str(resumed_dir)
    resumed = train(cfg, resume=True)
    expected = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    got = load_file(str(resumed_dir / "adapter_model.safetensors"))
    for key in expected:
        assert got[key].dtype == torch.bfloat16
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    again = torch.load(resumed_dir / "checkpoint-4" / "optimizer.pt", weights_only=True)["masters"]
    for a, b in zip(again, masters, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed["after"] == whole["after"]


@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "adamw"])
def test_fp32_adapters_train_without_masters(tiny_config: Config, optimizer: str) -> None:
    run = prepare(tiny_config)
    params = [p for p in run["model"].parameters() if p.requires_grad]
    built = build_optimizer(params, apply_overrides(tiny_config, [f"--train.optimizer={optimizer}"]))
    assert not isinstance(built, MasterWeights)
    assert all(a is b for a, b in zip(stepped_params(built), params, strict=True))


def test_fp16_adapters_train_through_masters(tiny_config: Config) -> None:
    """fp16 (quant.compute_dtype=fp16, cards without bf16) keeps 11 significant bits: at 0.05 it moves in steps of
    3.1e-5, so an AdamW update of 1e-5 rounds away unless an fp32 copy takes it."""
    param = torch.nn.Parameter(torch.full((4, 4), 0.05, dtype=torch.float16))
    optimizer = build_optimizer([param], apply_overrides(tiny_config, ["--train.optimizer=adamw", "--train.lr=1e-5"]))
    assert isinstance(optimizer, MasterWeights)
    param.float().square().sum().backward()
    optimizer.step()
    (master,) = stepped_params(optimizer)
    assert master.dtype == torch.float32 and (master < 0.05).all()
    torch.testing.assert_close(param.detach(), master.detach().half(), rtol=0, atol=0)
