"""What the trainer does with the levers a recipe switches on, at the moments a model is put together
(qlora/training/assemble.py): where the base loads, as it loads, once adapters and checkpointing are on, and once the
model is complete (for a run about to train and for a finished one read back). The optimizer's lever
(host_optimizer) and the loss's (loss) act where those are built: qlora/training/optimizer.py and loss.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qlora.levers.checkpoints import layer_inputs
from qlora.levers.cpu_embeddings import embedding
from qlora.levers.lever import RunConfig
from qlora.levers.liger import kernels as liger
from qlora.levers.lm_head import head
from qlora.levers.loss import chunks
from qlora.levers.speed import kernels
from qlora.levers.stream_base import stream
from qlora.levers.tiling import tiles

Hook = Callable[[torch.nn.Module, RunConfig, torch.device, torch.dtype], None]

# How frozen weights are stored, as the base loads (before adapters): a finished run is rebuilt the same way.
AT_LOAD: tuple[Hook, ...] = (head.apply, embedding.apply)
# Once adapters and checkpointing are on, in the order they compose: a tile runs whatever forward its module has by
# then (a speed lever's included), so tiles come last.
ON_MODEL: tuple[Hook, ...] = (chunks.apply, kernels.apply, liger.apply, tiles.apply)


def base_place(cfg: RunConfig, device: torch.device) -> torch.device | None:
    """Where the base loads when a lever keeps it off the device (train.stream_base: host memory); None: on it."""
    return stream.base_place(cfg, device)


def at_load(model: torch.nn.Module, cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> None:
    for hook in AT_LOAD:
        hook(model, cfg, device, dtype)


def on_model(model: torch.nn.Module, cfg: RunConfig, device: torch.device, dtype: torch.dtype,
             host: tuple[int, str]) -> None:
    """`host`: (bytes, what they are) of the host memory this process may count on, its share of the host's
    available memory, which the checkpoints lever checks its pinned buffers against."""
    layer_inputs.apply(model, cfg, device, dtype, host)
    for hook in ON_MODEL:
        hook(model, cfg, device, dtype)


def on_complete(model: torch.nn.Module, cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Once the model is complete, before anything runs: the base streamed from host memory (train.stream_base),
    the rest of the model put on the device."""
    stream.apply(model, cfg, device, dtype)
