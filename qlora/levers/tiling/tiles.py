"""Sequence tiles: run a position-wise module a few thousand tokens at a time, forward and backward (train.tile_size).

At long context a decoder layer's MLP dominates memory: in the recomputed layer's backward autograd holds gate, up
and act(gate) (and, with LoRA dropout, each adapter's dropped input and mask) for every token: 100K tokens x 28,672 x
2 B = 5.7 GB per tensor for Llama-70B. The MLP, and each attention projection, works on one token at a time, so it can
run tile by tile: `SequenceTiles` computes the tiles in the forward and keeps only its input; its backward recomputes
one tile at a time with autograd on, takes that tile's gradients and lets the tile's intermediates go before the next.
No full-length intermediate of the module exists at once, for the price of one more forward of the module (the
checkpointed layer's recompute already ran it once: three in all). DeepSpeed's `TiledMLP`
(deepspeed/runtime/sequence_parallel/ulysses_sp.py; Arctic Long Sequence Training, arXiv 2506.13996) takes the same
path; its forward tiles run under no_grad, ours with autograd on and nothing saved, so that bitsandbytes and the speed
levers choose the same kernels in the forward as in the recompute. An RMSNorm is position-wise too, and once the MLP
is tiled its intermediates are the layer's largest: transformers' norm computes in fp32, so autograd keeps an fp32
copy of its input and the backward holds five fp32 tensors of the row at once (train.tile_norms tiles it). Where a
norm feeds only tiled modules (a Llama layer's input norm its q/k/v projections, its post-attention norm its MLP), it
is not tiled apart but folded into them: each consumer normalises its own tile, so what it keeps is the norm's input,
which the layer keeps anyway, not a normalised copy of the row (h e bytes a token less for each).

Each tile's forward and its recompute see the same random state (LoRA dropout draws the same mask), as
`torch.utils.checkpoint` arranges. The sums over tokens that make a weight gradient are added tile by tile (in fp32,
whatever the adapters' dtype), so the gradients equal the untiled ones up to floating-point rounding, not bitwise
(test_tiling.py states the tolerance). In bf16 the untiled path is no exact reference either: both are held to
their distance from an fp32 run instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qlora.errors import ConfigError
from qlora.levers.lever import RunConfig
from qlora.levers.tiling.settings import TILES

# What reads the input norm's output in each layout: q/k/v, or Phi-3's one qkv_proj (split into views after it).
QKV = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))
PROJECTIONS = (*QKV[0], *QKV[1], "o_proj")


def _discard(tensor: torch.Tensor) -> None:
    """Forward tiles save nothing: the backward recomputes each tile."""
    return None


def _unreachable(_: None) -> torch.Tensor:
    raise RuntimeError("a forward tile's graph is never differentiated")


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class SequenceTiles(torch.autograd.Function):
    """y = forward(x), computed `tile` tokens at a time; the backward recomputes each tile and differentiates it alone.

    `params` are the trainable parameters `forward` uses: inputs of the function, so that its output needs a gradient
    even where `x` does not (the first layer's projections read frozen embeddings), and so that their gradients,
    summed over the tiles, flow out through autograd like any other.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, forward: Callable, tile: int,
                *params: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        ctx.forward, ctx.tile, ctx.params, ctx.states, out = forward, tile, params, [], None
        # The tiles run with autograd on, as they will in the backward, so both take the same code path (bitsandbytes
        # and the speed levers choose their kernels by it); the graphs keep nothing and die with each tile.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_discard, _unreachable):
            for start in range(0, flat.shape[0], tile):
                ctx.states.append(_rng_state(x.device))
                y = forward(flat[start:start + tile].detach().requires_grad_(x.requires_grad)).detach()
                if out is None:
                    out = flat.new_empty((flat.shape[0], y.shape[-1]), dtype=y.dtype)
                out[start:start + tile] = y
        ctx.save_for_backward(x)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        flat, grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        want_x = ctx.needs_input_grad[0]
        grad_x = torch.empty_like(flat) if want_x else None
        grad_params: list[torch.Tensor | None] = [None] * len(ctx.params)
        devices = [x.device] if x.device.type == "cuda" else []
        for n, start in enumerate(range(0, flat.shape[0], ctx.tile)):
            piece = flat[start:start + ctx.tile].detach().requires_grad_(want_x)
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                cpu_state, cuda_state = ctx.states[n]
                torch.set_rng_state(cpu_state)  # the tile's dropout masks, as drawn in the forward
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, x.device)
                y = ctx.forward(piece)
            grads = torch.autograd.grad(y, ([piece] if want_x else []) + list(ctx.params),
                                        grad[start:start + ctx.tile], allow_unused=True)
            del y  # the tile's intermediates go with its graph, before the next tile is recomputed
            if want_x:
                grad_x[start:start + ctx.tile] = grads[0]
                grads = grads[1:]
            for i, g in enumerate(grads):  # summed in fp32: a bf16 sum would round at every tile
                if g is not None:
                    grad_params[i] = g.float() if grad_params[i] is None else grad_params[i].add_(g)
        grad_params = [g if g is None else g.to(p.dtype) for g, p in zip(grad_params, ctx.params, strict=True)]
        return (grad_x.view_as(x) if want_x else None, None, None, *grad_params)


def tile_module(module: nn.Module, tile: int) -> None:
    """Make `module` (position-wise: an MLP, a projection) run in tiles of `tile` tokens while it trains.

    The forward is replaced on this instance only, wrapping whatever forward it has now (a speed lever's included), so
    names, parameters and state-dict keys stay as they were."""
    inner = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or x.numel() <= tile * x.shape[-1]:
            return inner(x)  # no backward to serve (evaluation), or a single tile anyway: nothing to gain
        return SequenceTiles.apply(x, inner, tile, *(p for p in module.parameters() if p.requires_grad))

    module.forward = forward


def is_norm(module: nn.Module) -> bool:
    """An RMSNorm over the hidden state (transformers names each model's own: LlamaRMSNorm, Qwen2RMSNorm, ...)."""
    return type(module).__name__.endswith("RMSNorm")


def fold_norm(norm: nn.Module, consumers: list[nn.Module]) -> None:
    """`norm` passes its input on as it is, and each of `consumers` (its only readers) normalises it first."""
    normalise = norm.forward
    norm.forward = lambda x: x
    for module in consumers:
        module.forward = lambda x, inner=module.forward: inner(normalise(x))


def foldable(layer: nn.Module, projections: bool) -> dict[str, list[nn.Module]]:
    """A Llama-style layer's norms and the tiled modules that alone read each: the input norm q/k/v or Phi-3's
    qkv_proj (when the projections are tiled), the post-attention norm the MLP. Other layouts (Gemma's four norms)
    fold nothing."""
    names = {name for name, child in layer.named_children() if is_norm(child)}
    if names != {"input_layernorm", "post_attention_layernorm"}:
        return {}
    qkv = next(([getattr(layer.self_attn, n) for n in layout] for layout in QKV
                if all(hasattr(layer.self_attn, n) for n in layout)), None)
    folds = {"post_attention_layernorm": [layer.mlp]}
    if projections and qkv:
        folds["input_layernorm"] = qkv
    return folds


def tile_layers(model: nn.Module, tile: int, projections: bool, norms: bool = False) -> int:
    """Tile each decoder layer's MLP and, with `projections`, its q/k/v/o projections, with `norms` its RMSNorms and
    the final one (folded into the tiles they feed where they can be); return how many modules run in tiles."""
    layers = [m for m in model.modules() if hasattr(m, "mlp") and hasattr(m, "self_attn")]
    if not layers:
        raise ConfigError("train.tile_size found no decoder layer with an mlp and a self_attn in this model: set "
                          "--train.tile_size=0")
    targets = [layer.mlp for layer in layers]
    if projections:
        targets += [getattr(layer.self_attn, name) for layer in layers for name in PROJECTIONS
                    if hasattr(layer.self_attn, name)]
    if norms:
        # The norms on the residual stream: a layer's own children and the final norm, the decoder's child. (The
        # per-head q/k norms of some models sit inside self_attn and work on head_dim: too small to pay.)
        decoders = [m for m in model.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList)]
        norms_found = [child for parent in [*layers, *decoders] for child in parent.children() if is_norm(child)]
        if not norms_found:  # the estimate counts them tiled: say so rather than run them as they are
            raise ConfigError("train.tile_norms found no RMSNorm in this model's decoder layers: set "
                              "--train.tile_norms=false")
        folded = set()
        for layer in layers:
            for name, consumers in foldable(layer, projections).items():
                fold_norm(getattr(layer, name), consumers)
                folded.add(id(getattr(layer, name)))
        targets += [norm for norm in norms_found if id(norm) not in folded]
    for module in targets:
        tile_module(module, tile)
    return len(targets)


def apply(model: nn.Module, cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> None:
    """The trainer's hook, last: a tile runs whatever forward its module has by then (a speed lever's included)."""
    if TILES.active(cfg, cfg.quant.method, device.type):
        t, longest = cfg.train, cfg.data.max_seq_len
        n = tile_layers(model, t.tile_size, t.tile_projections, t.tile_norms)
        most = t.batch_size * longest  # a micro-batch of at most tile_size tokens runs as one tile (tile_module)
        print(f"train.tile_size={t.tile_size}: {n} modules run in sequence tiles" if t.tile_size < most else
              f"train.tile_size={t.tile_size} is not below a micro-batch's {t.batch_size} x {longest} = {most:,} "
              f"tokens at most: its {n} modules run each as one tile, saving nothing (set --train.tile_size below "
              f"{most:,} to tile, or 0)")
