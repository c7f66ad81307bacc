"""liger-kernel's RMSNorm, SwiGLU and RoPE (train.liger_kernels): the plain path's loss and gradients on a GPU, in
fp32; on a CPU device, nothing changes."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from support import assert_same, build, loss_and_grads

from qlora.config import Config


def test_liger_kernels_change_nothing_on_a_cpu_device(tiny_config: Config, batch: dict, capsys) -> None:
    plain = loss_and_grads(build(tiny_config), batch)
    model = build(tiny_config, "--train.liger_kernels=true")
    assert "liger-kernel runs on CUDA only" in capsys.readouterr().out
    assert all("forward" not in vars(m) for m in model.modules() if type(m).__name__.endswith(("RMSNorm", "MLP")))
    assert_same(loss_and_grads(model, batch), plain)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="needs a CUDA GPU and liger-kernel (Triton kernels; the GPU battery carries the wheel)")
def test_liger_kernels_keep_loss_and_grads_on_cuda(tiny_config: Config, batch: dict) -> None:
    gpu = {k: v.cuda() for k, v in batch.items()}
    on_cuda = ("--train.device=cuda", "--quant.compute_dtype=fp32")
    plain = loss_and_grads(build(tiny_config, *on_cuda), gpu)
    on_cpu = loss_and_grads(build(tiny_config), batch)
    model = build(tiny_config, *on_cuda, "--train.liger_kernels=true")
    patched = [m for m in model.modules() if "forward" in vars(m) and type(m).__name__.endswith(("RMSNorm", "MLP"))]
    assert len(patched) == 2 * 2 + 1 + 2  # two norms per layer, the final norm, one MLP per layer
    # Triton's fp32 reductions run in another order than PyTorch's.
    assert_same(loss_and_grads(model, gpu), plain, rtol=1e-4, atol=1e-5)
    # RoPE is switched for the whole process (kernels.py): a CPU model beside it keeps PyTorch's, to the bit.
    assert_same(loss_and_grads(build(tiny_config), batch), on_cpu, rtol=0, atol=0)
