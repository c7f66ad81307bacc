"""`quant.keep_16bit_budget`: what 4-bit rounding costs each linear layer where it matters; the worst stay 16-bit.

Rounding a layer's weight W to Q changes its output by (Q - W) x. What that costs depends on the inputs x the layer
sees and on how much the loss cares about each of its outputs. To second order, with the Fisher approximation of the
Hessian in its Kronecker-factored form (K-FAC, Martens & Grosse 2015, arXiv 1503.05671) taken diagonal,

    cost(layer) = 1/2 sum_oi E[g_o^2] E[x_i^2] (W - Q)_oi^2

where g is the gradient of the training loss at the layer's output, and the expectations run over calibration rows of
the training data (`quant.calibration_rows`). One forward and backward per calibration batch through the 4-bit model
gives every layer's E[x^2] and E[g^2] (a vector each: the memory of the measurement is that of one training step);
then each layer's 16-bit weight is read from the checkpoint, one at a time, for W - Q.

Layers are kept greedily by cost per extra byte until the budget is spent. On SmolLM2-135M one MLP output projection
(layer 11's down_proj, which carries the model's massive activations) holds ~91% of the estimated cost
(benchmarks/results/keep-16bit-cpu-smollm2.md); a weight-only criterion (relative rounding error) ranks it nowhere
near the top.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qlora.base.bnb import bnb
from qlora.base.build import weight_locations
from qlora.base.load import keep_16bit
from qlora.base.quantize import dequantize, quant_tensors, weight_bytes
from qlora.config import Config
from qlora.data.batches import micro_batches
from qlora.data.splits import load_splits
from qlora.errors import ConfigError
from qlora.training.loss import loss_sum


@dataclass
class LayerCost:
    name: str
    cost: float
    """1/2 sum_oi g2_o x2_i dW_oi^2 over the calibration sums: proportional to the estimated loss increase from
    this layer's rounding (only its share of all layers' is reported)."""
    extra_bytes: int
    """What keeping it in 16-bit adds to the base weights."""


def candidates(model: nn.Module) -> list[str]:
    """The 4-bit linear layers a recipe may keep in 16-bit: all but a quantised output head."""
    head = model.get_output_embeddings()
    return [name for name, module in model.named_modules()
            if isinstance(module, bnb.nn.Linear4bit) and module is not head]


def add_gradient_square(total: torch.Tensor, grad: torch.Tensor) -> None:
    """A tensor hook: add the squared gradient, summed over tokens, to `total`; the gradient itself is unchanged."""
    total.add_(grad.detach().float().square().reshape(-1, grad.shape[-1]).sum(0))


def input_output_moments(model: nn.Module, batches: list[dict[str, torch.Tensor]], names: list[str],
                         chunk_size: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the sums over the batches' real tokens of x_i^2 (its inputs) and g_o^2 (the gradient of the summed
    target-token loss at its outputs)."""
    device = next(model.parameters()).device
    layers = {name: model.get_submodule(name) for name in names}
    sums = {name: (torch.zeros(m.in_features, device=device), torch.zeros(m.out_features, device=device))
            for name, m in layers.items()}
    seen: set[str] = set()
    mask: list[torch.Tensor] = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in seen:  # a checkpointed layer's recompute in the backward: counted in its forward already
                return
            seen.add(name)
            x2 = args[0].detach().float().square()
            if x2.dim() == mask[0].dim() + 1:  # (batch, seq, features): padding does not count
                x2 = x2 * mask[0][..., None]
            sums[name][0].add_(x2.reshape(-1, x2.shape[-1]).sum(0))
            if output.requires_grad:
                output.register_hook(functools.partial(add_gradient_square, sums[name][1]))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    # The base is frozen: an input that requires grad is what makes the backward run through it.
    handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    was_training, frozen = model.training, [p for p in model.parameters() if p.requires_grad]
    model.train()  # transformers checkpoints layers in training mode only; the frozen base has no dropout of its own
    for param in frozen:  # only activations' gradients are wanted: none for the weights (an 8B embedding's is 1 GB)
        param.requires_grad_(False)
    try:
        for batch in batches:
            seen.clear()
            batch = {k: v.to(device) for k, v in batch.items()}
            mask[:] = [batch["attention_mask"].float()]
            loss_sum(model, batch, chunk_size).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        for param in frozen:
            param.requires_grad_(True)
    return sums


@torch.no_grad()
def layer_costs(model: nn.Module, base_path: str, moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
                dtype: torch.dtype) -> list[LayerCost]:
    """Each layer's cost, its 16-bit weight read from the checkpoint (cast to `dtype` as the loader casts it)."""
    where, out = weight_locations(base_path), []
    for name, (x2, g2) in moments.items():
        layer = model.get_submodule(name)
        with safe_open(where[f"{name}.weight"], "pt") as f:
            weight = f.get_tensor(f"{name}.weight")
        delta = weight.to(layer.weight.device, dtype).float() - dequantize(layer)
        cost = 0.5 * float(g2 @ delta.square() @ x2)
        dense = layer.weight.quant_state.shape.numel() * dtype.itemsize
        packed = sum(t.numel() * t.element_size() for t in quant_tensors(layer.weight))
        out.append(LayerCost(name, cost, dense - packed))
        del weight, delta
    return out


def choose(costs: list[LayerCost], budget_bytes: float) -> list[LayerCost]:
    """Greedily by cost per extra byte, every layer that still fits the budget."""
    kept, left = [], budget_bytes
    for layer in sorted(costs, key=lambda c: c.cost / c.extra_bytes, reverse=True):
        if layer.extra_bytes <= left and layer.cost > 0:
            kept.append(layer)
            left -= layer.extra_bytes
    return kept


def calibration_batches(cfg: Config, tokenizer: object) -> list[dict[str, torch.Tensor]]:
    """The first quant.calibration_rows of the training order, in training's micro-batches."""
    train_rows, _ = load_splits(cfg.data, tokenizer, cfg.train.seed)
    n = math.ceil(min(cfg.quant.calibration_rows, len(train_rows)) / cfg.train.batch_size)
    batches = micro_batches(train_rows, cfg.train.batch_size, cfg.train.seed, tokenizer.pad_token_id)
    return [next(batches)[1] for _ in range(n)]


def keep_sensitive_layers(model: nn.Module, cfg: Config, tokenizer: object, base_path: str, dtype: torch.dtype,
                          resuming: bool = False) -> list[str]:
    """Measure, choose within quant.keep_16bit_budget, put the chosen layers back in 16-bit; print which and why;
    return their names. A resumed run takes the layers its run_config.json recorded when it started."""
    if cfg.model.synthetic:
        raise ConfigError("quant.keep_16bit_budget measures the rounding of real weights, and model.synthetic=true "
                          "has none: list the layers in quant.keep_16bit, or set --quant.keep_16bit_budget=0")
    saved = Path(cfg.output.dir) / "run_config.json"  # written by qlora.training.rundir.start_run when the run began
    if resuming and saved.is_file():
        chosen = json.loads(saved.read_text(encoding="utf-8"))["quant"].get("keep_16bit", [])
        keep_16bit(model, base_path, chosen, dtype)
        print(f"quant.keep_16bit_budget: {len(chosen)} layers kept in 16-bit, as chosen when the run started ({saved})")
        return chosen
    names = candidates(model)
    batches = calibration_batches(cfg, tokenizer)
    device = next(model.parameters()).device  # a CPU run on a machine with a GPU sets no CUDA up
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        moments = input_output_moments(model, batches, names, cfg.train.loss_chunk_size)
    costs = layer_costs(model, base_path, moments, dtype)
    base = weight_bytes(model)
    kept = choose(costs, cfg.quant.keep_16bit_budget * base)
    total = sum(c.cost for c in costs)
    extra = sum(c.extra_bytes for c in kept)
    rows = sum(len(b["input_ids"]) for b in batches)
    print(f"quant.keep_16bit_budget={cfg.quant.keep_16bit_budget:g}: 4-bit rounding cost of {len(costs)} layers "
          f"measured on {rows} training rows; {len(kept)} kept in {str(dtype).removeprefix('torch.')}, "
          f"+{extra / 2**20:,.2f} MiB ({100 * extra / base:+.1f}% of {base / 2**20:,.1f} MiB), holding "
          f"{100 * sum(c.cost for c in kept) / total if total else 0:.1f}% of the estimated cost:")
    for c in kept:
        print(f"  {c.name}: {100 * c.cost / total:.1f}% of the cost, +{c.extra_bytes / 2**20:,.2f} MiB")
    chosen = [c.name for c in kept]
    keep_16bit(model, base_path, chosen, dtype)
    return chosen
