"""`lora.init=loftq`: start each adapter at the best rank-r correction of its layer's NF4 rounding.

    W0 (16-bit) = Q (NF4, dequantised) + R        scaling * B A = R_r, the rank-r truncation of R

A zero-initialised adapter starts from Q, i.e. from the base as 4-bit rounding left it; this one starts from Q + R_r,
the closest a rank-r update can bring it back to W0 (Eckart-Young). It is LoftQ with one iteration (Li et al. 2023,
arXiv 2310.08659, alg. 1 with T=1), as in peft's `replace_lora_weights_loftq`: Q stays the ordinary NF4 load of W0,
so any bitsandbytes 4-bit base, and merging onto its dequantised weights, work as for a zero-initialised adapter.
Measured on SmolLM2-135M (benchmarks/results/quality-cpu.md): rank 16 holds 12% of the rounding error's energy and
takes the held-out loss of the untrained base from 4.66 (NF4) to 4.06-4.12 (16-bit: 3.64); after 36 steps it gained
2.7 points of exact match over zero-initialised QLoRA on average, but not held-out loss.

The 16-bit weights are read from the checkpoint one tensor at a time, so the extra memory is one layer's weight and
residual (fp32), freed before the next.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from safetensors import safe_open
from torch import nn

from qlora.build import weight_locations
from qlora.config import Config, ConfigError
from qlora.lora import lora_layers

# torch.svd_lowrank's oversampling and power iterations: with both, the top r singular pairs of a flat, noise-like
# spectrum come out within ~1% of the exact SVD's energy, at the cost of a few matmuls rather than a full SVD
# (seconds per 8192 x 28672 layer of a 70B model, minutes for all 560 of them).
OVERSAMPLE, POWER_ITERATIONS = 16, 4


@torch.no_grad()
def rank_r_factors(residual: torch.Tensor, r: int, scaling: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x in) and B (out x r) with scaling * B @ A the rank-r truncation of `residual`, split evenly
    (sqrt of the singular values on each side, as peft's `_low_rank_decomposition`)."""
    q = min(r + OVERSAMPLE, *residual.shape)
    # svd_lowrank draws its random projection from the global generator: a private one keeps the training RNG
    # (dropout, data order) exactly where a zero-initialised run would have it.
    with torch.random.fork_rng(devices=[residual.device] if residual.is_cuda else []):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(residual, q=q, niter=POWER_ITERATIONS)
    root = (s[:r] / scaling).sqrt()
    return root[:, None] * v[:, :r].T, u[:, :r] * root[None, :]


@torch.no_grad()
def init_loftq(model: nn.Module, cfg: Config, base_path: str) -> float:
    """Set every adapter on a 4-bit layer to its rank-r correction; return the share of the rounding error's energy
    (squared Frobenius norm) the adapters hold, over all layers."""
    where = weight_locations(base_path)
    held = total = 0.0
    for i, (name, layer) in enumerate(lora_layers(model).items()):
        base = layer.base_layer
        if not isinstance(base, bnb.nn.Linear4bit):
            continue
        key = f"{name}.weight"
        if key not in where:
            raise ConfigError(f"lora.init=loftq: {base_path} has no tensor {key} to correct toward; "
                              "set --lora.init=zero")
        with safe_open(where[key], "pt") as f:
            weight = f.get_tensor(key)
        if not weight.is_floating_point():
            raise ConfigError(f"lora.init=loftq: {key} in {base_path} is stored as {weight.dtype}, already "
                              "quantised, so there is no 16-bit weight to correct toward; set --lora.init=zero")
        residual = weight.to(base.weight.device, torch.float32)
        del weight
        residual -= bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        a, b = rank_r_factors(residual, layer.lora_A.out_features, layer.scaling, seed=cfg.train.seed + i)
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
        before = residual.square().sum().item()
        residual -= layer.delta_weight().float()
        total, held = total + before, held + before - residual.square().sum().item()
        del residual
    return held / total if total else 0.0
