"""liger-kernel's fused RMSNorm, SwiGLU and RoPE (train.liger_kernels): the recipe field."""

from __future__ import annotations

from dataclasses import dataclass

from qlora.levers.lever import Lever, LeverFields


@dataclass
class LigerFields(LeverFields):
    liger_kernels: bool = False
    """CUDA: run each decoder layer's RMSNorm, SwiGLU (silu(gate) * up) and rotary embedding through liger-kernel's
    Triton kernels (pip install liger-kernel) instead of PyTorch's elementwise ops. Changes nothing on a CPU device."""


LIGER_KERNELS = Lever(
    name="train.liger_kernels", kind="speed",
    active=lambda cfg, method, device: cfg.train.liger_kernels and device == "cuda",
    effect=lambda cfg, method: "liger_kernels: liger-kernel's RMSNorm, SwiGLU and RoPE")

LEVERS = (LIGER_KERNELS,)
