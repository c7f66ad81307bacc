"""The longest context a recipe trains on one CUDA card, from the estimator alone: what limits it, and how.

    python -m qlora.memory RECIPE.py --max-context [--gpu-gib 24,48,80] [--host-gib 128]

For each card size the sequence length is bisected (in steps of 1024 tokens, of 64 where none fits; batch as in the
recipe; rows past train.tile_size apart from those up to it, which run untiled and can need more) with the recipe's
levers as they are, except the one choice that depends on the length and the host: where the checkpointed layer
inputs wait. With
`train.offload_activations` they go to pinned host memory as far as the host holds them (after the process's own
allowance, the optimizer and embeddings kept there) and the rest stay on the card; when the card cannot take the rest
either, only every k-th layer keeps its input (`train.checkpoint_every`), the smallest k that fits, as that costs the
least recompute. A plan needing more host memory than the host has is no plan, nor one pinning more than the trainer's
check before the first step allows (qlora/levers/checkpoints/memory.py, `check_pinned_memory`).

`max_context(cfg, gpu_bytes, host_bytes)` is where the GPU battery's search starts, and `probe_overrides` the plan
each of its probes runs at its length.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal

from qlora.config import Config
from qlora.levers.checkpoints.memory import PINNED_HEADROOM
from qlora.levers.stream_base.settings import STREAM_BASE
from qlora.levers.tiling.settings import untiled_up_to
from qlora.memory.arch import Arch, load_arch
from qlora.memory.estimate import Estimate, estimate
from qlora.memory.preflight import STEP, largest

GIB = 2**30
GRANULARITY = 1024

LONGEST = 1 << 24  # 16M tokens: past anything a single card holds


@dataclass
class Fit:
    """The longest context found for one card and host, and the plan that reaches it."""

    tokens: int
    limit: str
    """What stops a longer context: "card" (device memory), "host" (host memory: the card would take more) or
    "search" (it fits at LONGEST, where the search ends)."""
    levers: list[str]
    """The recipe's levers in this plan (where the layer inputs wait: `estimate.checkpoints`)."""
    overrides: list[str] = field(default_factory=list)
    """The overrides that set this plan on the recipe: --data.max_seq_len=..., and the checkpoint plan's."""
    estimate: Estimate | None = None


def planned(cfg: Config, tokens: int, every: int, budget_bytes: int | None) -> Config:
    """`cfg` at `tokens` per row with checkpoint_every=`every` and, unless None, `budget_bytes` of host memory for
    offloaded layer inputs (0: none of them offloaded)."""
    out = copy.copy(cfg)  # shallow, section by section: the bisection builds thousands of these
    out.data, out.train = copy.copy(cfg.data), copy.copy(cfg.train)
    out.data.max_seq_len = tokens
    out.train.checkpoint_every = every
    if budget_bytes is not None:  # offload_budget_gib=0 means no limit: a budget of one byte offloads nothing
        out.train.offload_budget_gib = max(budget_bytes, 1) / GIB
    return out


def fitting_plan(cfg: Config, arch: Arch, tokens: int, gpu_bytes: int,
                 host_bytes: int | None) -> tuple[Config, Estimate] | None:
    """The plan with the fewest replayed layers whose estimate, with the allocator's margin, fits the card and (unless
    None) the host, or None."""
    for plan, est in plans(cfg, arch, tokens, host_bytes):
        if est.card_bytes <= gpu_bytes and (host_bytes is None or est.host_bytes <= host_bytes):
            return plan, est
    return None


def pinned_room(host_bytes: int, bare: Estimate) -> int:
    """Host memory the offloaded layer inputs may pin, beside what `bare` (the same plan, none offloaded) keeps
    there: what is left of the host, and no more than the trainer's own check allows before the first step
    (PINNED_HEADROOM of the memory then available: the host less the process's allowance, its embedding table and
    a base it streams, all loaded into host memory by then)."""
    loaded = sum(bare.host.get(k, 0) for k in ("runtime", "embeddings", "streamed_base"))
    check = PINNED_HEADROOM * (host_bytes - loaded)
    return int(min(host_bytes - bare.host_bytes, check))


def plans(cfg: Config, arch: Arch, tokens: int, host_bytes: int | None) -> Iterator[tuple[Config, Estimate]]:
    """The checkpoint plans for rows of `tokens`, fewest replayed layers first: checkpoint_every 1, 2, ... with, under
    train.offload_activations, as many layer inputs pinned as the host holds (unless `host_bytes` is None). Ends where
    a larger k cannot help: the host has no room, or every kept input is on the host already."""
    t = cfg.train
    if not t.gradient_checkpointing:
        plan = planned(cfg, tokens, 1, None)
        yield plan, estimate(plan, arch, cfg.quant.method, "cuda")
        return
    # A streamed base keeps every layer input (its streamer follows the backward's order; replays would break it).
    for every in range(1, 2 if STREAM_BASE.active(cfg, cfg.quant.method, "cuda") else arch.layers + 1):
        budget = None
        if t.offload_activations:
            bare = estimate(planned(cfg, tokens, every, 0), arch, cfg.quant.method, "cuda")
            budget = pinned_room(host_bytes, bare) if host_bytes is not None else 1 << 62
            if budget < 0:
                return
        plan = planned(cfg, tokens, every, budget)
        est = estimate(plan, arch, cfg.quant.method, "cuda")
        yield plan, est
        if t.offload_activations and est.checkpoints.on_device == 0:
            return  # a larger k only replays more on the card


def plan_overrides(cfg: Config, est: Estimate) -> list[str]:
    """The overrides that set `est`'s checkpoint plan on the recipe `cfg` (its length aside)."""
    chosen, out = est.checkpoints, []
    if chosen is not None and chosen.every != cfg.train.checkpoint_every:
        out.append(f"--train.checkpoint_every={chosen.every}")
    if chosen is not None and chosen.offload and chosen.on_device:  # the host's budget binds: say how much
        out.append(f"--train.offload_budget_gib={budget_text(chosen.host_bytes / GIB)}")
    return out


def budget_text(gib: float) -> str:
    """A budget in GiB as an override gives it back: rounded up to a millionth of a GiB (about a KiB), never down.
    Rounded down to 0.01, the 70B plan for 80 GiB (105.421875 GiB, 39 layer inputs) read back as 105.42, pinned 38,
    and the step no longer fit. Its own text reads back as itself: rounded up to a KiB and then printed to 6 places,
    a resumed plan's budget grew by 1e-6 GiB at every resume (7.200001, 7.200002, ...)."""
    text = str(Decimal(repr(gib)).quantize(Decimal("1e-6"), rounding=ROUND_CEILING))
    return text.rstrip("0").rstrip(".")


def probe_overrides(cfg: Config, tokens: int, gpu_bytes: int, host_bytes: int) -> list[str]:
    """What a measurement of rows of `tokens` on this card and host should run: the estimator's plan where one fits,
    else the one the host holds with the least on the card (a measurement may find room the estimate did not)."""
    held = [est for _, est in plans(cfg, load_arch(cfg), tokens, host_bytes) if est.host_bytes <= host_bytes]
    if not held:
        return [f"--data.max_seq_len={tokens}"]
    # The first that fits the card is fitting_plan's choice; the plans come fewest replayed layers first.
    found = next((est for est in held if est.card_bytes <= gpu_bytes), None) or min(held, key=lambda e: e.card_bytes)
    return [f"--data.max_seq_len={tokens}", *plan_overrides(cfg, found)]


def longest(cfg: Config, arch: Arch, gpu_bytes: int, host_bytes: int | None) -> tuple[int, Config | None,
                                                                                         Estimate | None]:
    """The longest multiple of GRANULARITY that fits, its plan and estimate; where none does, the longest multiple of
    preflight.STEP below it (a card that held the recipe's own 128-token rows was said to fit 0 tokens);
    (0, None, None) if not even that."""
    def fit(n: int) -> bool:
        return fitting_plan(cfg, arch, n, gpu_bytes, host_bytes) is not None

    drop = untiled_up_to(cfg, cfg.quant.method, cfg.train.batch_size)
    tokens = largest(fit, LONGEST + 1, GRANULARITY, drop) or largest(fit, GRANULARITY, STEP, drop)
    return (tokens, *fitting_plan(cfg, arch, tokens, gpu_bytes, host_bytes)) if tokens else (0, None, None)


def max_context(cfg: Config, gpu_bytes: int, host_bytes: int) -> tuple[int, str, list[str]]:
    """(tokens, limit, levers): the longest row of the recipe that trains on one CUDA card of `gpu_bytes` (CUDA
    context included) with `host_bytes` of host memory; "card" or "host" as what limits it; the levers it uses."""
    fit = fit_context(cfg, gpu_bytes, host_bytes)
    return fit.tokens, fit.limit, fit.levers


def fit_context(cfg: Config, gpu_bytes: int, host_bytes: int) -> Fit:
    """`max_context` with the plan's overrides and its estimate."""
    arch = load_arch(cfg)
    tokens, plan, est = longest(cfg, arch, gpu_bytes, host_bytes)
    # Host memory limits when the card alone would take a longer context.
    limit = "search" if tokens == LONGEST else "host" if longest(cfg, arch, gpu_bytes, None)[0] > tokens else "card"
    if plan is None:
        return Fit(0, limit, [])
    return Fit(tokens, limit, est.levers, [f"--data.max_seq_len={tokens}", *plan_overrides(cfg, est)], est)


def streamed_row(est: Estimate) -> dict:
    """train.stream_base's figures for a plan: the base in host memory, the device's two layers, the bytes that cross
    per micro-batch and the seconds they take at the stated link speed."""
    s = est.streamed
    return {"layer_bytes": s.layer_bytes, "host_bytes": s.host_bytes, "card_bytes": s.card_bytes,
            "moved_bytes": s.moved_bytes, "link_gb_s": s.link_gb_s, "transfer_s": s.transfer_s,
            "describe": s.describe()}


def hypothetical_card(cfg: Config) -> Config:
    """`cfg` for cards of any size, not this machine's: SDPA's kernel left to torch (auto) counts FlashAttention-2's
    backward buffers, the larger, which the 24 and 48 GB cards (sm89: RTX 4090, L40S) run, and an upper bound for an
    H100's cuDNN attention. Without this, the table asked on an H200 would count cuDNN's for a 24 GB card too."""
    if cfg.model.attn_implementation != "sdpa" or cfg.model.sdpa_backend != "auto":
        return cfg
    out = copy.copy(cfg)
    out.model = copy.copy(cfg.model)
    out.model.sdpa_backend = "flash"
    return out


def context_report(cfg: Config, gpu_gib: list[float], host_gib: float) -> dict:
    """The --max-context report: one row per card size, each with its plan, as a JSON-ready dict."""
    from qlora.base.build import config_json_path

    sized = hypothetical_card(cfg)
    kernel, cfg = sized is not cfg, sized
    rows = []
    for size in gpu_gib:
        fit = fit_context(cfg, int(size * GIB), int(host_gib * GIB))
        row = {"gpu_gib": size, "tokens": fit.tokens, "limit": fit.limit, "levers": fit.levers,
               "overrides": fit.overrides}
        if fit.estimate is not None:
            est = fit.estimate
            row.update(device_bytes=est.peak_bytes, card_bytes=est.card_bytes, host_bytes=est.host_bytes,
                       peak_phase=est.peak_phase,
                       components=est.components, host=est.host,
                       checkpoints=est.checkpoints.describe() if est.checkpoints else None)
            if est.streamed is not None:
                row["streamed"] = streamed_row(est)
        rows.append(row)
    shortest = estimate(planned(cfg, GRANULARITY, cfg.train.checkpoint_every, None), load_arch(cfg),
                        cfg.quant.method, "cuda")
    fixed = sum(v for k, v in shortest.components.items() if k not in ("activations", "gradients"))
    return {"model": cfg.model.path, "config_json": str(config_json_path(cfg)), "method": cfg.quant.method,
            "estimate_for": "cuda", "host_gib": host_gib, "granularity": GRANULARITY, "fine_granularity": STEP,
            "batch_size": cfg.train.batch_size, "lora_r": cfg.lora.r, "lora_targets": cfg.lora.targets,
            "streamable": cfg.quant.method == "qlora" and not cfg.train.stream_base,
            "fixed_bytes": fixed, "fixed_host_bytes": shortest.host_bytes, "longest_searched": LONGEST, "rows": rows,
            "levers": shortest.levers,
            "assumptions": [a for a in shortest.assumptions if not a.startswith("batch ")] + [
                f"the longest data.max_seq_len in steps of {GRANULARITY} tokens (of {STEP} where none fits) whose "
                "estimated step fits the card "
                "(CUDA context and the allocator's margin included) and whose host side fits the host; the recipe's "
                "levers as they are, the "
                "checkpoint plan (offload budget, checkpoint_every) chosen per length: offload what the host holds, "
                "keep the rest on the card, and only if that fails keep every k-th layer input, smallest k first"] + (
                ["SDPA's kernel counted for every card size: FlashAttention-2, which the 24 and 48 GB cards run, "
                 "whatever card this machine has (an H100 or H200 runs cuDNN's attention, which holds 2 q e bytes a "
                 "token less in the backward: --model.sdpa_backend=cudnn counts it)"] if kernel else [])}
