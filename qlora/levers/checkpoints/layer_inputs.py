"""Where each checkpointed decoder layer keeps its input until the backward: on the device, in pinned CPU memory, or
nowhere (recomputed from the group's first layer).

With gradient checkpointing each layer keeps only its input (batch x seq x hidden x 2 bytes: 1.6 GiB per layer at 100K
tokens of Llama-70B, 131 GiB over its 80 layers). Two levers act on these inputs:

- `train.offload_activations` (CUDA): the input is copied to pinned CPU memory on a side stream while the layer
  computes, and its device memory is released once the copy lands. In the backward, fetching layer i's input also
  starts the copy of the one before it, so the transfer overlaps layer i's recompute and backward. With
  `train.offload_budget_gib`, inputs go to CPU memory until the budget is spent and the later ones stay on the device:
  a plan must fit the host's memory too. transformers 5 has a synchronous version (`activation_checkpointing_enable(
  offload=True)`, torch's `save_on_cpu` on the compute stream), which benchmarks/memory_levers.py measures beside this.
- `train.checkpoint_every=k` (any device): only layers 0, k, 2k, ... keep their input. When the backward reaches a
  group of k layers, its first layer's input is run forward through the group once more (keeping nothing but the
  layer outputs) to give every layer of the group its input back, and the backward goes on as before. L/k + k inputs
  instead of L, for one more forward of k-1 layers in k. Each replayed layer sees the random state of its first
  forward (LoRA dropout draws the same masks), as `torch.utils.checkpoint` arranges for its own recompute, so the
  replayed inputs are the forward's, bit for bit.

How: non-reentrant `torch.utils.checkpoint` saves the checkpointed function's positional tensor inputs as saved
tensors, so a `saved_tensors_hooks` pair around each layer's checkpoint call sees exactly the layer input (everything
the layer saves inside is the checkpoint's own business). transformers passes the hidden states positionally and the
rotary tables and mask as keywords, which are shared by all layers and stay put.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora.errors import ConfigError
from qlora.levers.checkpoints.memory import GIB, check_pinned_memory
from qlora.levers.checkpoints.settings import EVERY, OFFLOAD
from qlora.levers.lever import RunConfig
from qlora.levers.pinned import pinned_buffer


class _Offloaded:
    """One offloaded tensor: its CPU copy, the device copy once fetched back, and the tensor offloaded before it
    (weakly: the autograd graph owns each handle, so handles die with the graph)."""

    def __init__(self, cpu: torch.Tensor, device: torch.device, prev: _Offloaded | None) -> None:
        self.cpu = cpu
        self.device = device
        self.fetched: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        self.prev = weakref.ref(prev) if prev is not None else None


class _Group:
    """k consecutive layers of which only the first kept its input: what it takes to replay the others' inputs."""

    def __init__(self) -> None:
        self.start: torch.Tensor | _Offloaded | None = None  # the first layer's input, as kept
        self.requires_grad = False
        self.layers: list[tuple[Callable, tuple]] = []  # each layer's function and its random state before it ran
        self.inputs: dict[int, torch.Tensor] = {}  # replayed inputs, by offset in the group, until unpacked


class _Dropped:
    """The saved-tensor handle of a layer whose input was not kept: its group and its offset in it."""

    def __init__(self, group: _Group, offset: int) -> None:
        self.group = group
        self.offset = offset


def _discard(_: torch.Tensor) -> None:
    return None


def _unreachable(_: None) -> torch.Tensor:
    raise RuntimeError("a replayed layer's graph is never differentiated")


class LayerInputs:
    """`saved_tensors_hooks` that decide where each checkpointed layer's input waits for the backward.

    `every` = k keeps the input of layers 0, k, 2k, ... only; `offload` sends kept inputs to CPU memory (CUDA: side
    stream, pinned; elsewhere, the CPU tests: plain copies, which run the same bookkeeping and order) until
    `budget_bytes` are taken (0: no limit). `log`, when given, records ("offload" | "fetch" | "prefetch" | "drop" |
    "replay", id) events for tests.
    """

    def __init__(self, device: torch.device, offload: bool = True, every: int = 1, budget_bytes: int = 0,
                 n_layers: int = 0, log: list | None = None) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # tensors say cuda:0, and torch.device("cuda") != that
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.offload, self.every, self.budget_bytes = offload, every, budget_bytes
        self.stream = torch.cuda.Stream(device) if self.cuda and offload else None
        self.last: _Offloaded | None = None
        self.log = log
        self.offloaded_bytes = 0  # running totals, for start-up summaries and tests
        self.kept_on_device_bytes = 0
        # One host buffer per offloaded input of a forward, kept and reused from step to step (pinned at its exact
        # size on CUDA: see offload.pinned_buffer); the side stream orders each step's copy out after the last
        # step's copy back.
        self.slots: list[torch.Tensor] = []
        self._slot = 0
        self._input: torch.Tensor | None = None  # the layer input being checkpointed now
        self._index = 0
        self._group: _Group | None = None
        self.n_layers = n_layers

    def run(self, index: int, function: Callable, *args: object, **kwargs: object) -> object:
        """Layer `index`'s `_gradient_checkpointing_func`: torch's non-reentrant checkpoint, inputs kept by us."""
        self._index, self._input = index, args[0] if args and isinstance(args[0], torch.Tensor) else None
        if index == 0:  # a new forward: nothing links to the last one's handles
            self.last = self._group = None
            self._slot = 0
        if self.every > 1:
            if index % self.every == 0:
                self._group = _Group()
            # What replaying this layer takes: its function and the random state it starts from.
            self._group.layers.append((function, self._rng_state()))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                return checkpoint(function, *args, use_reentrant=False, **kwargs)
        finally:
            self._input = None
            if index == self.n_layers - 1:  # the graph owns the handles now; holding them would keep their memory
                self.last = self._group = None

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Offloaded | _Dropped:
        layer_input = self._input
        if layer_input is None or tensor.data_ptr() != layer_input.data_ptr() or tensor.shape != layer_input.shape:
            return tensor
        offset = self._index % self.every
        if offset:  # inside a group: replayed from its first layer when the backward needs it
            self._record("drop", self._group)
            return _Dropped(self._group, offset)
        size = tensor.numel() * tensor.element_size()
        kept: torch.Tensor | _Offloaded = tensor
        if self.offload and (not self.budget_bytes or (self._slot + 1) * size <= self.budget_bytes):
            kept = self._offload(tensor)
        else:
            self.kept_on_device_bytes += size
        if self.every > 1:
            self._group.start, self._group.requires_grad = kept, tensor.requires_grad
        return kept

    def unpack(self, handle: torch.Tensor | _Offloaded | _Dropped) -> torch.Tensor:
        if isinstance(handle, torch.Tensor):
            return handle
        if isinstance(handle, _Dropped):
            return self._replayed(handle)
        if handle.fetched is None:
            self._fetch(handle)
            self._record("fetch", handle)
        tensor, handle.fetched = handle.fetched, None  # the handle keeps only the CPU copy (retain_graph re-fetches)
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(handle.ready)
            tensor.record_stream(current)  # allocated on the side stream, used on the compute stream
        # The backward recomputes layers last to first: start bringing back the input kept before this one.
        prev = handle.prev() if handle.prev is not None else None
        if prev is not None and prev.fetched is None:
            self._fetch(prev)
            self._record("prefetch", prev)
        return tensor

    def _host_buffer(self, tensor: torch.Tensor) -> torch.Tensor:
        """This forward's next host slot, shaped as `tensor` (grown if a longer batch needs more)."""
        size = tensor.numel() * tensor.element_size()
        if self._slot == len(self.slots) or self.slots[self._slot].numel() < size:
            if self.cuda and self._slot < len(self.slots):  # no copy of the slot replaced may still be in flight
                self.stream.synchronize()
            buffer = pinned_buffer(size, pin=self.cuda)
            if self._slot == len(self.slots):
                self.slots.append(buffer)
            else:
                self.slots[self._slot] = buffer
        buffer = self.slots[self._slot]
        self._slot += 1
        return buffer[:size].view(tensor.dtype).view(tensor.shape)

    def _offload(self, tensor: torch.Tensor) -> _Offloaded:
        cpu = self._host_buffer(tensor)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the layer input must be written first
            with torch.cuda.stream(self.stream):
                cpu.copy_(tensor, non_blocking=True)
            # The caching allocator must not hand this memory out again until the side stream has read it.
            tensor.record_stream(self.stream)
        else:
            cpu.copy_(tensor)
        handle = _Offloaded(cpu, tensor.device, self.last)
        self.last = handle
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        self._record("offload", handle)
        return handle

    def _fetch(self, handle: _Offloaded) -> None:
        if self.cuda:
            with torch.cuda.stream(self.stream):
                handle.fetched = handle.cpu.to(handle.device, non_blocking=True)
                handle.ready = torch.cuda.Event()
                handle.ready.record(self.stream)
        else:
            handle.fetched = handle.cpu.clone()

    def _start_tensor(self, group: _Group) -> torch.Tensor:
        """The group's first input on the device, without taking it from its handle (its own unpack does that)."""
        start = group.start
        if isinstance(start, torch.Tensor):
            return start
        if start.fetched is None:
            self._fetch(start)
            self._record("fetch", start)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(start.ready)
        return start.fetched

    def _replayed(self, handle: _Dropped) -> torch.Tensor:
        group = handle.group
        if handle.offset not in group.inputs:
            # The backward meets a group's layers last to first: replay up to this one, keep each input on the way.
            self._record("replay", group)
            x = self._start_tensor(group)
            devices = [self.device] if self.cuda else []
            for offset in range(1, handle.offset + 1):
                function, (cpu_state, device_state) = group.layers[offset - 1]  # the layer that made this input
                with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                        torch.autograd.graph.saved_tensors_hooks(_discard, _unreachable):
                    torch.set_rng_state(cpu_state)
                    if device_state is not None:
                        torch.cuda.set_rng_state(device_state, self.device)
                    out = function(x.detach().requires_grad_(group.requires_grad))
                x = (out[0] if isinstance(out, tuple) else out).detach()
                group.inputs[offset] = x
        return group.inputs.pop(handle.offset)

    def _rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.cuda else None

    def _record(self, what: str, handle: object) -> None:
        if self.log is not None:
            self.log.append((what, id(handle)))


def keep_layer_inputs(model: nn.Module, device: torch.device, offload: bool, every: int = 1,
                      budget_gib: float = 0.0, force: bool = False) -> LayerInputs | None:
    """Install `LayerInputs` as every checkpointed layer's checkpoint function (call after enabling gradient
    checkpointing); None when there is nothing to do. Offloading is a no-op off CUDA, where activations already live
    in CPU memory, unless `force` (tests); `every` > 1 acts on any device."""
    if offload and device.type != "cuda" and not force:
        print("train.offload_activations: no CUDA device, activations already live in CPU memory: nothing to do")
        offload = False
    if not offload and every == 1:
        return None
    from transformers.modeling_layers import GradientCheckpointingLayer

    # The decoder layers; the decoder itself carries the same flag but does not checkpoint anything.
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise ConfigError("train.offload_activations and train.checkpoint_every act on checkpointed layers: enable "
                         "gradient checkpointing first")
    store = LayerInputs(device, offload, every, int(budget_gib * GIB), len(layers))
    for index, module in enumerate(layers):
        # transformers' GradientCheckpointingLayer calls this attribute with (partial(forward, **kwargs), *args).
        module._gradient_checkpointing_func = functools.partial(store.run, index)
    kept = -(-len(layers) // every)
    where = ("pinned CPU memory (async, side stream)" + (f" up to {budget_gib:g} GiB, the rest on the device"
                                                         if budget_gib else "") if offload else "device memory")
    print(f"train.checkpoint_every={every}, offload_activations={offload}: {kept} of {len(layers)} checkpointed "
          f"layers keep their input, in {where}" + (f"; the other {len(layers) - kept} are replayed from their "
                                                     "group's first layer" if every > 1 else ""))
    return store


def apply(model: nn.Module, cfg: RunConfig, device: torch.device, dtype: torch.dtype, host: tuple[int, str]) -> None:
    """The trainer's hook: with gradient checkpointing on, where each layer input waits (offload_activations on CUDA
    after checking the host can pin them, every k-th kept). `host`: (bytes, what they are) of the host memory this
    process may count on (check_pinned_memory)."""
    t = cfg.train
    if not t.gradient_checkpointing:
        return
    if OFFLOAD.active(cfg, cfg.quant.method, device.type):  # refused now, not when pinning fails mid-run
        text = model.config.get_text_config()
        check_pinned_memory(text.num_hidden_layers, t, cfg.data.max_seq_len, text.hidden_size, dtype.itemsize,
                            host)
    keep_layer_inputs(model, device, t.offload_activations,
                      t.checkpoint_every if EVERY.active(cfg, cfg.quant.method, device.type) else 1,
                      t.offload_budget_gib)
