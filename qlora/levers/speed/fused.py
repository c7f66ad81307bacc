"""Our own fused paths, where no library serves (issue 24): each tested equal to the plain path on CPU in fp32
(qlora/levers/speed/test_speed.py states the tolerance).

- `fuse_lora`: an adapted layer as one autograd node. The plain path is four: the base layer, dropout, lora_A,
  lora_B, and an add; its backward makes the base's input gradient and the adapter's as two tokens x in_features
  tensors and adds them. `FusedLoRA` computes

      h  = x W0^T (+ b) + s (xd A^T) B^T           xd = dropout(x), s = alpha / r
      dx = g W0 + s (g B) A   (through dropout's mask when xd is not x)
      dA = s (g B)^T xd,   dB = s g^T (xd A^T)

  writing the update into the base output and the adapter's input gradient into the base's, each by one GEMM with
  beta = 1 (addmm_), and keeping only xd, xd A^T (tokens x r) and the adapters for the backward. W0 is dequantised
  again for the backward, as bitsandbytes does, unless dequant_once keeps it. Unsloth's `matmul_lora` (fast_lora.py)
  takes the same path, inside a library that patches the model whole, so it is not one we can call on our layers.
- `dequant_once`: the base is frozen, so the weight a 4-bit layer dequantises for the first micro-batch is the weight
  of every later micro-batch and step. It is kept, as a plain attribute (not a buffer: checkpoints and adapters never
  hold it), and every forward and backward multiplies by it: one dequantisation per weight for the run, instead of
  three per micro-batch with checkpointing (forward, recompute, backward). It costs a 16-bit copy of the linear
  layers beside the NF4 one, which the estimator counts (qlora/levers/speed/memory.py).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from qlora.adapters.lora import LoRALinear
from qlora.base.bnb import bnb


def base_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight of `layer` in `dtype`: kept (dequant_once), dequantised now (4-bit), or its own."""
    kept = getattr(layer, "dequantised", None)
    if kept is not None:
        return kept if kept.dtype == dtype else kept.to(dtype)
    if not isinstance(layer, bnb.nn.Linear4bit):
        return layer.weight.to(dtype)
    bnb.nn.modules.fix_4bit_weight_quant_state_from_module(layer)
    # The call MatMul4Bit.backward makes: the same weight, to the bit, as bitsandbytes' own path uses.
    weight = bnb.functional.dequantize_4bit(layer.weight, layer.weight.quant_state).to(dtype)
    if getattr(layer, "keep_dequantised", False):  # dequant_once: the first use dequantises for all later ones
        layer.dequantised = weight
    return weight


class FusedLoRA(torch.autograd.Function):
    """h = x W0^T + b + s (xd A^T) B^T and its backward, as one node (the module docstring has the formulas)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, xd: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor, layer: nn.Module, scaling: float) -> torch.Tensor:
        bias = layer.bias
        out = F.linear(x, base_weight(layer, x.dtype), None if bias is None else bias.to(x.dtype))
        down = F.linear(xd, a)  # tokens x r
        out.view(-1, out.shape[-1]).addmm_(down.reshape(-1, down.shape[-1]), b.t(), alpha=scaling)
        ctx.layer, ctx.scaling, ctx.same = layer, scaling, xd is x
        ctx.save_for_backward(xd, down, a, b)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        xd, down, a, b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        g_down = torch.mm(g, b).mul_(s)  # tokens x r: the gradient of xd A^T
        grad_a = torch.mm(g_down.t(), xd.reshape(-1, xd.shape[-1])) if ctx.needs_input_grad[2] else None
        grad_b = torch.mm(g.t(), down.reshape(-1, down.shape[-1])).mul_(s) if ctx.needs_input_grad[3] else None
        grad_x = grad_xd = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_x = torch.mm(g, base_weight(ctx.layer, g.dtype))
            if ctx.same:  # no dropout: x is xd, and its two gradients are one sum, written in place
                grad_x.addmm_(g_down, a)
            else:  # dropout's backward applies its mask to the adapter's part alone
                grad_xd = torch.mm(g_down, a).view(xd.shape)
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1])
        return grad_x, grad_xd, grad_a, grad_b, None, None


def _fused_forward(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    a, b = self.lora_A.weight, self.lora_B.weight
    fusable = not self.merged and torch.is_grad_enabled() and x.dtype == a.dtype and \
        (x.requires_grad or a.requires_grad)
    if not fusable:  # evaluation, merged weights, or adapters in another dtype than the input: the plain path
        return LoRALinear.forward(self, x)
    return FusedLoRA.apply(x, self.dropout(x), a, b, self.base_layer, self.scaling)


def fuse_lora(model: nn.Module) -> int:
    """Route every `LoRALinear`'s training forward through `FusedLoRA`; return how many."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.forward = types.MethodType(_fused_forward, layer)  # per instance: the class is untouched
    return len(layers)


def _linear4bit_dequantised_once(self: bnb.nn.Linear4bit, x: torch.Tensor) -> torch.Tensor:
    dtype = self.compute_dtype or x.dtype
    # The kept weight needs no gradient, so autograd saves it (a reference, no copy) for dx = dy W, and not x.
    out = F.linear(x.to(dtype), base_weight(self, dtype), None if self.bias is None else self.bias.to(dtype))
    return out.to(x.dtype)


def dequant_once(model: nn.Module) -> int:
    """Make every 4-bit linear layer keep its weight dequantised after its first use; return how many. A 4-bit
    lm_head is left alone: quant.quantize_lm_head asked for its memory back."""
    head = model.get_output_embeddings()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m is not head]
    for layer in layers:
        layer.keep_dequantised = True  # read by base_weight, which fuse_lora calls too
        layer.forward = types.MethodType(_linear4bit_dequantised_once, layer)
    return len(layers)
