"""Speed levers, each behind a `train.*` switch and each tested equal to the plain path on CPU (test_speed.py).

- `reuse_dequant`: bitsandbytes dequantises an NF4 weight in the forward and again in the backward
  (`MatMul4Bit.backward`: `matmul(grad, dequantize_4bit(B))`); at more than 1536 tokens its CUDA forward is the same
  dequantise-then-`F.linear` (`backends/cuda/ops.py`, `_gemm_4bit_custom_max_m`). `DequantLinear4bit` saves the
  weight it dequantised for the backward instead. Under non-reentrant checkpointing the first forward's saves are
  dropped and only the recompute's are kept, so this costs one decoder layer of 16-bit weights at peak
  (436 MiB for Llama-3.1-8B, 1.7 GiB for 70B) and saves a third of all dequantisations.
- `fuse_lora_add`: h = W0 x + s B (A x) as one `addmm_` into the base output (`LoRALinear.add_in_place`), so the
  update never exists as a tensor of its own: no tokens x out_features temporaries for B A x, its scaling and the
  sum, forward or backward.
- `dequant_once`, `fuse_lora`: our own fused paths (fused.py).
- `compile`: `torch.compile` of each adapter's update (lora) or of each decoder layer's attention and MLP blocks
  (layers). Compiling inside the checkpoint, not around it, keeps transformers' checkpoint wrapper and our
  activation offload hooks in eager mode, where saved-tensor hooks work.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from qlora.adapters.lora import LoRALinear
from qlora.base.bnb import bnb
from qlora.levers.lever import RunConfig
from qlora.levers.speed.fused import dequant_once, fuse_lora
from qlora.levers.speed.settings import SpeedFields


class DequantLinear4bit(torch.autograd.Function):
    """y = x W^T + b with W dequantised once, and that same W reused for dx = dy W (W and b are frozen)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor,
                quant_state: bnb.functional.QuantState, bias: torch.Tensor | None) -> torch.Tensor:
        # The same call MatMul4Bit.backward makes, so the backward is bitwise the one bitsandbytes computes.
        w = bnb.functional.dequantize_4bit(weight, quant_state).to(x.dtype)
        ctx.save_for_backward(w)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        (w,) = ctx.saved_tensors
        grad_x = torch.matmul(grad, w.to(grad.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _linear4bit_reusing_dequant(self: bnb.nn.Linear4bit, x: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad):
        # Nothing to reuse without a backward; bitsandbytes' own path has fused kernels for short inputs.
        return type(self).forward(self, x)
    bnb.nn.modules.fix_4bit_weight_quant_state_from_module(self)
    out = DequantLinear4bit.apply(x.to(self.compute_dtype or x.dtype), self.weight, self.weight.quant_state,
                                  self.bias)
    return out.to(x.dtype)


def reuse_dequant(model: nn.Module) -> int:
    """Route every 4-bit linear layer's training forward through `DequantLinear4bit`; return how many.

    A 4-bit lm_head (quant.quantize_lm_head) is left alone: it sits outside the layer checkpoints, so its saved
    weight (vocab x hidden x 2 bytes) would live from the end of the forward to the loss backward."""
    head = model.get_output_embeddings()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m is not head]
    for layer in layers:
        layer.forward = types.MethodType(_linear4bit_reusing_dequant, layer)  # per instance: the class is untouched
    return len(layers)


def fuse_lora_add(model: nn.Module) -> int:
    """Make every `LoRALinear` add its update into the base output in place; return how many."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.fuse_add = True  # LoRALinear.forward's in-place path (add_in_place)
    return len(layers)


def compile_model(model: nn.Module, what: str, backend: str = "inductor") -> int:
    """torch.compile each adapter (what=lora) or each decoder layer's attention and MLP (what=layers)."""
    if what == "lora":
        targets = [m for m in model.modules() if isinstance(m, LoRALinear)]
    elif what == "layers":
        layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing") and hasattr(m, "mlp")]
        targets = [getattr(layer, name) for layer in layers for name in ("self_attn", "mlp") if hasattr(layer, name)]
    else:
        raise ValueError(f"compile target {what!r}: use lora or layers")
    for module in targets:
        # dynamic: one graph for every adapter and row length (every LoRALinear shares one forward, and a graph per
        # shape ran into dynamo's recompile limit of 8 within two steps of the tiny model, the rest uncompiled)
        module.compile(backend=backend, dynamic=True)  # in place: names and weights unchanged
    return len(targets)


def apply_speed_levers(model: nn.Module, cfg: SpeedFields) -> list[str]:
    """Switch on the levers `cfg` asks for, in the order they compose (compile last); return what was done."""
    done = []
    if cfg.reuse_dequant:
        done.append(f"reuse_dequant on {reuse_dequant(model)} 4-bit layers")
    if cfg.dequant_once:
        done.append(f"dequant_once on {dequant_once(model)} 4-bit layers")
    if cfg.fuse_lora_add:
        done.append(f"fuse_lora_add on {fuse_lora_add(model)} adapters")
    if cfg.fuse_lora:
        done.append(f"fuse_lora on {fuse_lora(model)} adapters")
    if cfg.compile != "none":
        done.append(f"compile={cfg.compile}: {compile_model(model, cfg.compile)} modules")
    return done


def apply(model: nn.Module, cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> None:
    """The trainer's hook, once adapters are on."""
    for lever in apply_speed_levers(model, cfg.train):
        print(f"train.{lever}")
