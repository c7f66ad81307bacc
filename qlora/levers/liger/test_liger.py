"""liger-kernel's RMSNorm, SwiGLU and RoPE (train.liger_kernels): the plain path's loss and gradients on a GPU, in
fp32; on a CPU device, nothing changes."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from support import assert_same, build, loss_and_grads

from qlora.config import Config
from qlora.levers.liger.kernels import use_liger_kernels


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


def test_which_modules_liger_kernels_switches_and_with_what(tiny_config: Config, batch: dict,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring, without a GPU: liger-kernel's functional ops stood in for by PyTorch's own arithmetic (the
    Triton kernels run only on CUDA), each recording its call. Every RMSNorm (two a layer, the final norm) and every
    gated MLP is switched, with its own weight, epsilon, gate and up, to the plain path's loss and gradients to the
    bit; RoPE is switched in the model's modeling file for CUDA tensors only, so a CPU model keeps PyTorch's."""
    calls = []

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str,
                 in_place: bool) -> torch.Tensor:
        calls.append("rms_norm")
        assert (offset, casting, in_place) == (0.0, "llama", False)
        fp32 = x.float()
        return weight * (fp32 * torch.rsqrt(fp32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        calls.append("swiglu")
        return torch.nn.functional.silu(gate) * up

    def rope(*args: object) -> None:
        raise AssertionError("liger's RoPE called on CPU tensors")

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_rms_norm, functional.liger_swiglu, functional.liger_rope = rms_norm, swiglu, rope
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)
    model = build(tiny_config)
    plain = loss_and_grads(model, batch)
    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", modeling.apply_rotary_pos_emb)  # restored after
    assert use_liger_kernels(model) == (2 * 2 + 1, 2, modeling.__name__)
    assert_same(loss_and_grads(model, batch), plain, rtol=0, atol=0)
    assert set(calls) == {"rms_norm", "swiglu"}
