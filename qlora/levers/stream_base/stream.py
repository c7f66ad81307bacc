"""The 4-bit base streamed from host memory (train.stream_base): each decoder layer's packed weights and absmax wait in
pinned host memory (one buffer, a slice per layer) and are copied to the device just before the layer runs, the next
layer's copy on a side stream while the current layer computes, in the forward and again in the backward. Two layers
on the device.

Why our own streamer and not FSDP2's CPU offload (`fully_shard(layer, offload_policy=CPUOffloadPolicy())` on a world
of one), which moves parameters between host and device around each module's forward and backward:

- On a world of one FSDP2 cannot overlap the copies with compute. Since pytorch PR 160135 (August 2025; read here
  in torch 2.13, and the GPU image's 2.11 is later than it) `FSDPParamGroup.unshard` returns at once when the
  group's world size is 1, so a prefetch (explicit or the backward's default one) starts nothing; the copy to the
  device happens in `wait_for_unshard`, on the current (compute) stream, as the layer is about to run
  (`all_gather_inputs` calls `.to(device, non_blocking=True)` there, then `copy_` into the unsharded buffer). Every
  layer's copy would sit between two layers' compute: 68.9 GB per 70B micro-batch, 2.75 s at 25 GB/s added to
  every one, none of it hidden. On more than one rank the copy-in runs on FSDP's all-gather streams and does
  overlap; issue 25 is one card.
- It holds each layer twice on the device while it arrives (the `.to(device)` temporary and the unsharded copy), and
  `CPUOffloadPolicy(pin_memory=True)` pins each weight with torch's caching host allocator, which rounds every block
  up to a power of two: 38.3 GB of host memory for 70B's 34.2 GB of packed weights (qlora/levers/pinned.py).
- Packed 4-bit weights go through FSDP's float code paths when stored as a float dtype, which canonicalise NaN bit
  patterns (bitsandbytes issue 1945); here every byte travels as uint8 (tests: the round trip, every bf16 pattern).

It does run on CPU with gloo (a world of one keeps a tiny run's losses bitwise, tried while deciding), so the choice is
about the card, not about correctness.

What travels: each `Linear4bit` weight's packed bytes, its absmax and its nested absmax (memory.py); the code tables
and offset (1.1 KB a weight), norms, adapters, embeddings and head stay on the device (or where their own levers keep
them). Layer i always lands in device slot i % 2, at the same offsets, and its module's weight, absmax and nested
absmax are views of that slot from the start: bitsandbytes' `MatMul4Bit` keeps a view of the weight for its backward
(`ctx.tensors`) and the `QuantState` itself, read again in the backward, so both see layer i's bytes once it is back
in its slot. Nothing outside a layer's own forward and backward may read its weights (they hold another layer's bytes
while it is out); the streamer brings each layer in before it runs:

- before layer i's forward (a forward pre-hook): layer i in (the compute stream waits for its copy), layer i+1's
  copy started;
- when the gradient of layer i's output is ready (a hook on that tensor: layer i's backward, the recompute of a
  checkpointed layer included, is next): layer i in, layer i-1's copy started.

A slot is overwritten only once the compute that read it was queued: the copy stream waits for an event recorded on
the compute stream at that moment. The forward begins with the two layers the last backward ended on and the
backward with the two the forward ended on, so each copies L - 2 layers. On a CPU device the copies are plain ones
in the same order: the same bookkeeping, which the tests check bitwise against the base held whole.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from qlora.base.bnb import bnb
from qlora.errors import ConfigError
from qlora.levers.lever import RunConfig
from qlora.levers.pinned import page_aligned, pin_in_place, typed_views, views_size
from qlora.levers.stream_base.memory import SLOTS
from qlora.levers.stream_base.settings import STREAM_BASE, refuse_several


def travelling(layer: nn.Module) -> list[tuple[object, str]]:
    """(owner, attribute) of each tensor of `layer` that travels, in module order (the same in every layer): every
    4-bit weight's packed data, its absmax and, with double quantisation, the nested absmax."""
    out: list[tuple[object, str]] = []
    for module in layer.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            out += [(module.weight, "data"), (state, "absmax")]
            if state.nested:
                out.append((state.state2, "absmax"))
    return out


def in_backward() -> bool:
    """Whether autograd's engine is running now (a checkpoint's recompute, a tensor hook): torch.utils.checkpoint asks
    the same way."""
    return torch._C._current_graph_task_id() != -1


class LayerStream:
    """The decoder `layers`' 4-bit tensors in host buffers (pinned on CUDA), two layers at a time in device slots.

    `moved_bytes` counts what was copied to the device; `occupant` says which layer each slot holds.
    """

    def __init__(self, layers: nn.ModuleList, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # tensors say cuda:0, and torch.device("cuda") != that
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        parts = [travelling(layer) for layer in layers]
        if not any(parts):
            raise ConfigError("train.stream_base streams the decoder layers' 4-bit weights, and this model's have "
                              "none: use --train.stream_base=false")
        self.sizes = [views_size([getattr(owner, name) for owner, name in part]) for part in parts]
        starts = [sum(self.sizes[:i]) for i in range(len(parts))]
        self.slots = [torch.empty(max(self.sizes), dtype=torch.uint8, device=device)
                      for _ in range(min(SLOTS, len(layers)))]
        # One host buffer for every layer, on pages of its own (one registration with the driver), pinned once
        # filled: the loaded tensors are let go layer by layer, so the host holds the base and one layer more.
        self.buffer = page_aligned(sum(self.sizes))
        self.host = [self.buffer[start:start + size] for start, size in zip(starts, self.sizes, strict=True)]
        for i, part in enumerate(parts):
            loaded = [getattr(owner, name) for owner, name in part]
            for view, t in zip(typed_views(self.host[i], loaded), loaded, strict=True):
                view.copy_(t)
            # From here on the module reads its slot.
            for (owner, name), view in zip(part, typed_views(self.slots[i % len(self.slots)], loaded), strict=True):
                setattr(owner, name, view)
            del loaded
        if self.cuda:
            pin_in_place(self.buffer)
        self.occupant: list[int | None] = [None] * len(self.slots)
        self.ready: list[torch.cuda.Event | None] = [None] * len(self.slots)
        self.moved_bytes = 0
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(functools.partial(self.before_forward, i))
            layer.register_forward_hook(functools.partial(self.after_forward, i))

    def before_forward(self, i: int, module: nn.Module, args: tuple) -> None:
        self.bring(i)
        if not in_backward():  # a recompute (hooks inside the checkpoint: transformers < 5.23) goes backwards
            self.fetch(i + 1)

    def after_forward(self, i: int, module: nn.Module, args: tuple, output: object) -> None:
        if in_backward() or not torch.is_grad_enabled():
            return
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(functools.partial(self.before_backward, i))

    def before_backward(self, i: int, grad: torch.Tensor) -> None:
        """The gradient of layer i's output is complete: every backward op of layer i+1 that read its slot is
        queued, and layer i's own backward is next."""
        self.bring(i)
        self.fetch(i - 1)

    def bring(self, i: int) -> None:
        """Layer i in its slot, the compute stream waiting for its copy."""
        slot = i % len(self.slots)
        if self.occupant[slot] != i:
            self.fetch(i)
        if self.cuda and self.ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def fetch(self, i: int) -> None:
        """Start copying layer i into its slot, unless it is there already (or there is no layer i)."""
        if not 0 <= i < len(self.host):
            return
        slot = i % len(self.slots)
        if self.occupant[slot] == i:
            return
        n = self.sizes[i]
        if self.cuda:
            # Everything that read the slot's last layer is queued on the compute stream by now.
            released = torch.cuda.current_stream(self.device).record_event()
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(released)
                self.slots[slot][:n].copy_(self.host[i], non_blocking=True)
                self.ready[slot] = self.stream.record_event()
        else:
            self.slots[slot][:n].copy_(self.host[i])
        self.occupant[slot] = i
        self.moved_bytes += n


def to_device(model: nn.Module, device: torch.device) -> None:
    """Every parameter and buffer to `device`, and every 4-bit weight's quantisation state with it (what the streamer
    took already is there). A CPU embedding table (model.embeddings_on_cpu) is neither, and stays."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
            state = getattr(param, "quant_state", None)
            if state is not None:
                state.to(device)
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)


def base_place(cfg: RunConfig, device: torch.device) -> torch.device | None:
    """Where the base loads: host memory when it will be streamed (never whole on the device), else None."""
    return torch.device("cpu") if STREAM_BASE.active(cfg, cfg.quant.method, device.type) else None


def stream_base(model: nn.Module, device: torch.device) -> LayerStream:
    """Stream `model`'s decoder layers from host memory to `device` and put the rest of it there."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        refuse_several(dist.get_world_size())
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"train.stream_base streams decoders with a .layers list; {type(decoder).__name__} has "
                          "none: use --train.stream_base=false")
    stream = LayerStream(layers, device)
    to_device(model, device)
    return stream


def apply(model: nn.Module, cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> None:
    """The trainer's hook once the model is complete (its levers on, adapters loaded), before anything runs."""
    if not STREAM_BASE.active(cfg, cfg.quant.method, device.type):
        return
    stream = stream_base(model, device)
    model.layer_stream = stream  # for start-up figures and tests; the hooks hold it too
    layer, host = max(stream.sizes), sum(b.numel() for b in stream.host)
    print(f"train.stream_base: {len(stream.host)} decoder layers of {layer / 2**20:,.1f} MiB in "
          f"{'pinned ' if stream.cuda else ''}host memory ({host / 2**30:.2f} GiB), {len(stream.slots)} at a time "
          f"on {device} ({len(stream.slots) * layer / 2**20:,.1f} MiB)")
