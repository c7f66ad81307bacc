"""The optimizer and its schedule: AdamW over the trainable parameters only, paged by bitsandbytes, through fp32 master
copies for 16-bit adapters (qlora/adapters/master.py), or in host memory (the host_optimizer lever); warmup then
cosine or constant; and what a resume may change of them.
"""

from __future__ import annotations

import functools
import math

import torch

from qlora.adapters.master import MasterWeights, needs_masters
from qlora.config import Config
from qlora.levers.host_optimizer.optimizer import HostOptimizer


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only: bitsandbytes' paged one, whose state pages to CPU under memory
    pressure. 16-bit adapters train through fp32 master copies (qlora/adapters/master.py): clip and step
    `optimizer.param_groups`. With train.optimizer_on_cpu on CUDA, the masters, the state and the update live in host
    memory from the start (qlora/levers/host_optimizer/optimizer.py)."""
    if cfg.train.optimizer_on_cpu:
        if any(p.is_cuda for p in params):  # several processes sum the gradients on their cards (NCCL) first
            alone = not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)
            return HostOptimizer(params, functools.partial(make_optimizer, cfg=cfg, paged=False), alone)
        print("train.optimizer_on_cpu: the parameters are in CPU memory already: nothing to do")
    make = functools.partial(make_optimizer, cfg=cfg)
    return MasterWeights(params, make) if cfg.quant.method != "full" and needs_masters(params) else make(params)


def make_optimizer(tensors: list[torch.Tensor], cfg: Config, paged: bool = True) -> torch.optim.Optimizer:
    """The AdamW of train.optimizer over `tensors`: torch's, or bitsandbytes' with 32- or 8-bit moments, paged or
    not (a host optimizer's tensors are in CPU memory already)."""
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(tensors, lr=t.lr, weight_decay=t.weight_decay)
    from qlora.base.bnb import bnb

    # bitsandbytes pages CUDA memory only: on the CPU its paged class runs as the plain one, after a warning.
    paged = paged and any(x.is_cuda for x in tensors)
    if t.optimizer == "paged_adamw_8bit":
        cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    else:
        cls = bnb.optim.PagedAdamW32bit if paged else bnb.optim.AdamW32bit
    optimizer = cls(tensors, lr=t.lr, weight_decay=t.weight_decay)
    if paged:
        optimizer.register_step_pre_hook(empty_cache_before_state)
    return optimizer


def empty_cache_before_state(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """bitsandbytes allocates the paged state in the first step, right after the first backward, when PyTorch's
    cache still holds that backward's freed activations: hand them back to the driver first, so the state's pages
    find room on the card instead of thrashing at its edge."""
    if not optimizer.state and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def stepped_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """What the optimizer updates and whose gradients are clipped: the trainable parameters, or their fp32 masters
    (or, with train.optimizer_on_cpu, what holds their fp32 gradients on the device)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def updated_weights(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What a step writes, to look for non-finite values after it: the host optimizer's fp32 masters (its
    param_groups hold stand-ins for the gradients, zeros), else what it steps."""
    return optimizer.masters if isinstance(optimizer, HostOptimizer) else stepped_params(optimizer)


def repage(optimizer: torch.optim.Optimizer) -> None:
    """After a resume: a paged bitsandbytes optimizer's moments back in paged memory. A paged moment is a CPU tensor
    over CUDA managed memory marked `is_paged` (bitsandbytes functional.get_paged); load_state_dict deep-copies the
    state, and deepcopy (as torch.save and torch.load) keeps a tensor's Python attributes, so each moment comes back as
    ordinary host memory still marked paged, which bitsandbytes' to_gpu leaves where it is and its CUDA kernels and
    prefetch are then handed. Each moment of a CUDA parameter goes into a buffer of bitsandbytes' own (paged where it
    pages one: 1e5 elements or more)."""
    inner = getattr(optimizer, "inner", optimizer)  # MasterWeights, HostOptimizer: the optimizer they step
    if not getattr(inner, "is_paged", False):
        return
    for param, values in inner.state.items():
        if not param.is_cuda:
            continue
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                buffer = inner.get_state_buffer(param, dtype=value.dtype)
                buffer.copy_(value)
                values[key] = buffer


def keeps_masters(optimizer: torch.optim.Optimizer) -> bool:
    """Whether it steps fp32 master copies of the weights (qlora/adapters/master.py, or in host memory), whose state
    dict holds them beside the inner optimizer's."""
    return isinstance(optimizer, MasterWeights | HostOptimizer)


def restart_from_weights(optimizer: torch.optim.Optimizer) -> None:
    """A fresh optimizer after a resume loaded the weights (train.optimizer changed, its old state of no use): its
    fp32 masters, where it keeps any, from those weights."""
    if keeps_masters(optimizer):
        optimizer.copy_from_params()


def retarget(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: Config) -> None:
    """After a resume: the lr, schedule and weight decay of `cfg`, not those the checkpoint's state dicts carry, from
    the resumed step on (so `--resume --train.lr=1e-4` trains at 1e-4). Unchanged settings give back the very same
    numbers: the lr is the schedule's own formula at the same step."""
    scheduler.base_lrs = [cfg.train.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["weight_decay"] = cfg.train.lr, cfg.train.weight_decay
        group["lr"] = cfg.train.lr * factor(scheduler.last_epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak lr, then cosine decay to zero at the last step (or constant)."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
