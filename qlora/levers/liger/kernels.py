"""liger-kernel's fused RMSNorm, SwiGLU and RoPE (train.liger_kernels), switched on per module on CUDA.

Each RMSNorm and each gated MLP of the model gets a forward of its own that calls liger-kernel's functional ops
(`liger_kernel.transformers.functional`); the module, its weights and names stay. RoPE is a function transformers
calls from its attention module, `apply_rotary_pos_emb` in the model's modeling file, which is replaced there, as
liger-kernel's own `apply_liger_kernel_to_llama` does: for every model of that family in the process (CUDA tensors
only: others keep PyTorch's). The kernels are
Triton, CUDA only: on a CPU device the lever says so and changes nothing. What each kernel saves for its backward is
less than the plain path's (memory.py), and its arithmetic differs in rounding only: qlora/levers/liger/test_liger.py
holds it to the plain path on a GPU, in fp32.
"""

from __future__ import annotations

import sys
import types
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn

from qlora.errors import ConfigError
from qlora.levers.lever import RunConfig

MINIMUM = (0, 6)  # the functional API with liger_rms_norm(..., in_place) and liger_rope(q, k, cos, sin)


def require_liger() -> None:
    try:
        found = version("liger-kernel")
    except PackageNotFoundError:
        raise ConfigError("train.liger_kernels needs liger-kernel: pip install 'liger-kernel>=0.6' (CUDA only), or "
                          "set --train.liger_kernels=false") from None
    if tuple(int(x) for x in found.split(".")[:2]) < MINIMUM:
        raise ConfigError(f"train.liger_kernels needs liger-kernel >= 0.6 (found {found}): pip install -U "
                          "liger-kernel")


def _rms_norm(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_rms_norm

    # casting_mode="llama": the variance in fp32, the product with the weight in the input dtype, as Llama's
    # RMSNorm computes it. Not in place: our checkpoint and tile hooks may still hold the gradient it would overwrite.
    return liger_rms_norm(hidden, self.weight, self.variance_epsilon, 0.0, "llama", False)


def _swiglu_mlp(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_swiglu

    return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def is_silu(mlp: nn.Module) -> bool:
    """Whether a gated MLP's activation is SiLU: torch's module, or transformers' own (from 5.0 ACT2FN["silu"] is
    transformers.activations.SiLUActivation, not an nn.SiLU)."""
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def use_liger_kernels(model: nn.Module) -> tuple[int, int, str | None]:
    """Switch the model's RMSNorms, SwiGLU MLPs and RoPE to liger-kernel; (norms, MLPs, the patched modeling file)."""
    from liger_kernel.transformers.functional import liger_rope

    norms = mlps = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm, module)
            norms += 1
        elif all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")) and is_silu(module):
            module.forward = types.MethodType(_swiglu_mlp, module)
            mlps += 1
    attention = next((m for m in model.modules() if type(m).__name__.endswith("Attention")), None)
    modeling = sys.modules.get(type(attention).__module__) if attention is not None else None
    patched = None
    if modeling is not None and hasattr(modeling, "apply_rotary_pos_emb"):
        # The name the attention's forward looks up, as liger patches it: for the whole process, so tensors on
        # another device (a CPU model beside this one: an evaluation, a test's reference) keep PyTorch's RoPE.
        plain = getattr(modeling.apply_rotary_pos_emb, "plain", modeling.apply_rotary_pos_emb)

        def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: object,
                 **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
            return (liger_rope if q.is_cuda else plain)(q, k, cos, sin, *args, **kwargs)

        rope.plain = plain
        modeling.apply_rotary_pos_emb = rope
        patched = modeling.__name__
    return norms, mlps, patched


def apply(model: nn.Module, cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> None:
    """The trainer's hook, once adapters are on (before tiles, which wrap whatever forward the MLP has)."""
    if not cfg.train.liger_kernels:
        return
    if device.type != "cuda":
        print("train.liger_kernels: liger-kernel runs on CUDA only; PyTorch's norm, SwiGLU and RoPE on this device")
        return
    require_liger()
    norms, mlps, patched = use_liger_kernels(model)
    print(f"train.liger_kernels: liger-kernel's RMSNorm on {norms} norms, SwiGLU on {mlps} MLPs, RoPE in "
          f"{patched or 'no attention module (not patched)'}")
