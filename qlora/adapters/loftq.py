"""`lora.init=loftq`: start each adapter at the best rank-r correction of its layer's NF4 rounding.

    W0 (16-bit) = Q (NF4, dequantised) + R        scaling * B A = R_r, the rank-r truncation of R

A zero-initialised adapter starts from Q, i.e. from the base as 4-bit rounding left it; this one starts from Q + R_r,
the closest a rank-r update can bring it back to W0 (Eckart-Young). It is LoftQ with one iteration (Li et al. 2023,
arXiv 2310.08659, alg. 1 with T=1), as in peft's `replace_lora_weights_loftq`: Q stays the ordinary NF4 load of W0,
so any bitsandbytes 4-bit base, and merging onto its dequantised weights, work as for a zero-initialised adapter.
Measured on SmolLM2-135M (benchmarks/results/quality-cpu.md): rank 16 holds 12% of the rounding error's energy and
takes the held-out loss of the untrained base from 4.66 (NF4) to 4.06-4.12 (16-bit: 3.64); after 36 steps it gained
2.7 points of exact match over zero-initialised QLoRA on average, but not held-out loss.

With lora.loftq_iters = T > 1 the steps alternate (alg. 1): Q_t = NF4(W - scaling B_{t-1} A_{t-1}), then A_t, B_t
from the rank-r truncation of W - Q_t. The base is then Q_T, not the ordinary load of W, so the factors of step T-1
are saved with the run (loftq_shifts.safetensors, the size of the adapter) and every reload rebuilds Q_T from the
checkpoint and them (`apply_shifts`); the merge dequantises that base.

The 16-bit weights are read from the checkpoint one tensor at a time, so the extra memory is one layer's weight and
residual (fp32), freed before the next.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from qlora.adapters.lora import lora_layers
from qlora.base.bnb import bnb
from qlora.base.build import weight_locations
from qlora.base.load import compute_dtype
from qlora.base.quantize import dequantize, linear4bit, params4bit, rebuild_from_checkpoint
from qlora.config import Config
from qlora.errors import ConfigError
from qlora.partial import write_aside

SHIFTS = "loftq_shifts.safetensors"  # lora.loftq_iters > 1: what the base was quantised with, for every reload

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


def shifted(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W - scaling * B A in fp32: the weight a later LoftQ step quantises. The product is formed in fp64 and rounded
    once, so it is the same bits whatever the device or the matmul's summation order: a reload rebuilds the base the
    adapter trained on exactly."""
    shift = (scaling * (b.double() @ a.double())).float()
    return weight.float() - shift.to(weight.device)


@torch.no_grad()
def init_loftq(model: nn.Module, cfg: Config, base_path: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Set every adapter on a 4-bit layer to LoftQ's correction after lora.loftq_iters steps, re-quantising the base
    layer at each step after the first. Return the share of the plain NF4 rounding error's energy (squared Frobenius
    norm, over all layers) the base and adapters together remove, and the shifts the base was quantised with
    ({layer}.A, {layer}.B: the factors of the step before the last; none with one step)."""
    where = weight_locations(base_path)
    load_dtype = compute_dtype(cfg.quant, next(model.parameters()).device)
    held = total = 0.0
    shifts: dict[str, torch.Tensor] = {}
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
        weight = weight.to(base.weight.device, torch.float32)
        residual = weight - dequantize(base)
        before = residual.square().sum().item()  # what plain NF4 rounding took from the layer
        a, b = rank_r_factors(residual, layer.lora_A.out_features, layer.scaling, seed=cfg.train.seed + i)
        for _ in range(cfg.lora.loftq_iters - 1):  # LoftQ alg. 1: quantise W minus the correction, fit it again
            shifts[f"{name}.A"], shifts[f"{name}.B"] = a.cpu(), b.cpu()
            base.weight = params4bit(shifted(weight, a, b, layer.scaling).to(load_dtype), cfg.quant, weight.device,
                                     module=base)
            residual = weight - dequantize(base)
            a, b = rank_r_factors(residual, layer.lora_A.out_features, layer.scaling, seed=cfg.train.seed + i)
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
        residual -= layer.delta_weight().float()
        total, held = total + before, held + before - residual.square().sum().item()
        del residual, weight
    return (held / total if total else 0.0), shifts


def save_shifts(run_dir: Path, shifts: dict[str, torch.Tensor]) -> None:
    """The shifts of a run with lora.loftq_iters > 1, beside its adapter: without them its base cannot be rebuilt."""
    write_aside(run_dir / SHIFTS, {k: v.contiguous() for k, v in shifts.items()}, hidden=f".tmp-{SHIFTS}")


def load_shifts(run_dir: Path) -> dict[str, torch.Tensor]:
    """A run's saved shifts, from RUN_DIR or, for RUN_DIR/checkpoint-N, its parent."""
    path = next((d / SHIFTS for d in (run_dir, run_dir.parent) if (d / SHIFTS).is_file()), None)
    if path is None:
        raise ConfigError(f"{run_dir / SHIFTS} not found: a run with lora.loftq_iters > 1 keeps the shifts its 4-bit "
                          "base was quantised with there, and its base cannot be rebuilt without them")
    try:
        return load_file(str(path))
    except Exception as err:  # cut short or not safetensors (SafetensorError), unreadable (OSError)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path} is unreadable ({reason}): the run's 4-bit base cannot be rebuilt without it; "
                          "restore it from a copy of the run") from err


def apply_shifts(model: nn.Module, cfg: Config, base_path: str, shifts: dict[str, torch.Tensor]) -> None:
    """Rebuild the base layers of a run with lora.loftq_iters > 1 as it trained: NF4(W - scaling B A) from the
    checkpoint's W and the saved factors. Call before attaching the adapters."""
    dtype = compute_dtype(cfg.quant, next(model.parameters()).device)
    scaling = cfg.lora.alpha / cfg.lora.r
    names = [key.removesuffix(".A") for key in shifts if key.endswith(".A")]

    def make(name: str, weight: torch.Tensor, old: nn.Module) -> nn.Module:
        moved = shifted(weight.float(), shifts[f"{name}.A"].to(weight.device), shifts[f"{name}.B"].to(weight.device),
                        scaling)
        return linear4bit(moved.to(dtype), old.bias, cfg.quant, dtype)

    rebuild_from_checkpoint(model, base_path, names, torch.float32, make)
