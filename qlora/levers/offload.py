"""Keep what the step does not need right now in CPU memory: checkpointed layer inputs and the input embeddings.

Activation offload. With gradient checkpointing, each decoder layer keeps only its input for the backward (batch x
seq x hidden x 2 bytes: 1.6 GiB per layer at 100K tokens of Llama-70B, 131 GiB over its 80 layers). Here that input
is copied to pinned CPU memory on a side CUDA stream while the layer computes, and its GPU memory is released once
the copy lands. In the backward, fetching layer i's input also starts the copy of layer i-1's, so the transfer
overlaps layer i's recompute and backward instead of stalling it. transformers 5 has the synchronous version
(`activation_checkpointing_enable(offload=True)`, torch's `save_on_cpu` on the compute stream), which
benchmarks/memory_levers.py measures beside this one.

How: non-reentrant `torch.utils.checkpoint` saves the checkpointed function's positional tensor inputs as saved
tensors, so a `saved_tensors_hooks` pair around the checkpoint call sees exactly the layer inputs (everything the
layer saves inside is the checkpoint's own business). transformers passes the hidden states positionally and the
rotary tables and mask as keywords, which are shared by all layers and stay put.

Input embeddings. `CPUEmbedding` looks tokens up in a table left in CPU memory and sends only their vectors to the
device: vocab x hidden x 2 bytes of device memory saved (1.0 GiB for Llama-3.1-8B, 2.1 GiB for 70B) for one
batch x seq x hidden copy per step.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora.config import ConfigError


class _Offloaded:
    """One offloaded tensor: its CPU copy, the device copy once fetched back, and the tensor offloaded before it
    (weakly: the autograd graph owns each handle, so handles die with the graph)."""

    def __init__(self, cpu: torch.Tensor, device: torch.device, prev: _Offloaded | None) -> None:
        self.cpu = cpu
        self.device = device
        self.fetched: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        self.prev = weakref.ref(prev) if prev is not None else None


class ActivationOffload:
    """`saved_tensors_hooks` that keep the checkpointed layer inputs in CPU memory between forward and backward.

    Only floating-point tensors that require grad and hold at least `min_bytes` are moved: the hidden states, one per
    layer. On CUDA the copies run on a side stream into pinned memory; elsewhere (the CPU tests) they are plain
    synchronous copies, which exercises the same bookkeeping and order. `log`, when given, records
    ("offload" | "fetch" | "prefetch", id) events for tests.
    """

    def __init__(self, device: torch.device, min_bytes: int = 1 << 20, log: list | None = None) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # tensors say cuda:0, and torch.device("cuda") != that
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.min_bytes = min_bytes
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.last: _Offloaded | None = None
        self.log = log
        self.offloaded_bytes = 0  # running total, for start-up summaries and tests

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Offloaded:
        if not (tensor.is_floating_point() and tensor.requires_grad and tensor.device == self.device
                and tensor.numel() * tensor.element_size() >= self.min_bytes):
            return tensor
        if self.cuda:
            cpu = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)  # torch caches pinned blocks
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the layer input must be written first
            with torch.cuda.stream(self.stream):
                cpu.copy_(tensor, non_blocking=True)
            # The caching allocator must not hand this memory out again until the side stream has read it.
            tensor.record_stream(self.stream)
        else:
            cpu = tensor.detach().clone()
        handle = _Offloaded(cpu, tensor.device, self.last)
        self.last = handle
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        self._record("offload", handle)
        return handle

    def unpack(self, handle: torch.Tensor | _Offloaded) -> torch.Tensor:
        if isinstance(handle, torch.Tensor):
            return handle
        if handle.fetched is None:
            self._fetch(handle)
            self._record("fetch", handle)
        tensor, handle.fetched = handle.fetched, None  # the handle keeps only the CPU copy (retain_graph re-fetches)
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(handle.ready)
            tensor.record_stream(current)  # allocated on the side stream, used on the compute stream
        # The backward recomputes layers last to first: start bringing back the input of the layer before this one.
        prev = handle.prev() if handle.prev is not None else None
        if prev is not None and prev.fetched is None:
            self._fetch(prev)
            self._record("prefetch", prev)
        return tensor

    def _fetch(self, handle: _Offloaded) -> None:
        if self.cuda:
            with torch.cuda.stream(self.stream):
                handle.fetched = handle.cpu.to(handle.device, non_blocking=True)
                handle.ready = torch.cuda.Event()
                handle.ready.record(self.stream)
        else:
            handle.fetched = handle.cpu.clone()

    def _record(self, what: str, handle: _Offloaded) -> None:
        if self.log is not None:
            self.log.append((what, id(handle)))


PINNED_HEADROOM = 0.9  # of the host's available memory: the rest is the process's own (data, a CPU embedding table)


def pinned_need(layers: int, tokens: int, hidden: int, elem_bytes: int, one_shape: bool) -> int:
    """Pinned host memory that offloading `layers` layer inputs of `tokens` x `hidden` can hold. PyTorch's caching
    host allocator rounds each block up to a power of two and keeps freed blocks by size class, never splitting one
    (aten/src/ATen/core/CachingHostAllocator.h): micro-batches padded to other lengths leave blocks of each smaller
    class cached as well, which together stay under as much again. With one shape (packed rows) there is one class."""
    block = 1 << (tokens * hidden * elem_bytes - 1).bit_length()
    return layers * block * (1 if one_shape else 2)


def check_pinned_memory(layers: int, batch: int, seq: int, hidden: int, elem_bytes: int, one_shape: bool,
                        available: int) -> None:
    """Refuse, before the first step, an offload whose pinned blocks cannot fit in the host's available memory,
    naming the longest data.max_seq_len whose blocks do."""
    need = pinned_need(layers, batch * seq, hidden, elem_bytes, one_shape)
    room = int(available * PINNED_HEADROOM)
    if need <= room:
        return
    per_layer = room // (layers * (1 if one_shape else 2))
    fit = (1 << per_layer.bit_length() - 1) // (batch * hidden * elem_bytes) if per_layer else 0
    advice = f"--data.max_seq_len={fit} or less" if fit else "a smaller train.batch_size"
    raise ConfigError(
        f"train.offload_activations would pin up to {need / 2**30:,.1f} GiB of host memory ({layers} layer inputs "
        f"of {batch} x {seq:,} tokens x {hidden} x {elem_bytes} B, each rounded up to a power of two by the pinned "
        f"allocator{'' if one_shape else ', twice that as rows of other lengths leave smaller blocks cached'}) but "
        f"{available / 2**30:,.1f} GiB is available: use {advice}{'' if one_shape else ', or --data.pack=true'}, "
        "or --train.offload_activations=false")


def offloaded_checkpoint(offload: ActivationOffload, function: Callable, *args: object, **kwargs: object) -> object:
    """`torch.utils.checkpoint.checkpoint` with the layer inputs it saves kept by `offload`."""
    with offload.hooks():
        return checkpoint(function, *args, **kwargs)


def enable_activation_offload(model: nn.Module, device: torch.device, force: bool = False) -> ActivationOffload | None:
    """Offload every checkpointed layer's input (call after enabling gradient checkpointing). A no-op off CUDA,
    where activations already live in CPU memory, unless `force` (tests)."""
    if device.type != "cuda" and not force:
        print("train.offload_activations: no CUDA device, activations already live in CPU memory: nothing to do")
        return None
    offload = ActivationOffload(device)
    func = functools.partial(offloaded_checkpoint, offload, use_reentrant=False)
    from transformers.modeling_layers import GradientCheckpointingLayer

    # The decoder layers; the decoder itself carries the same flag but does not checkpoint anything.
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise ValueError("train.offload_activations found no checkpointed layer: enable gradient checkpointing first")
    for module in layers:
        # transformers' GradientCheckpointingLayer calls this attribute with (partial(forward, **kwargs), *args).
        module._gradient_checkpointing_func = func
    print(f"train.offload_activations: inputs of {len(layers)} checkpointed layers go to pinned CPU memory "
          "(async, side stream)")
    return offload


class CPUEmbedding(nn.Module):
    """An embedding table that stays in CPU memory: look up there, send the vectors to `device`.

    The table is a plain attribute, not a parameter or buffer, so `model.to(device)` leaves it where it is and
    `model.device` still names the accelerator. It is frozen: only LoRA or quantised-base methods may use it.
    """

    def __init__(self, embedding: nn.Embedding, device: torch.device) -> None:
        super().__init__()
        self.table = embedding.weight.detach().to("cpu")
        self.padding_idx = embedding.padding_idx
        self.device = device
        self.num_embeddings, self.embedding_dim = self.table.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        vectors = nn.functional.embedding(input_ids.to("cpu"), self.table, self.padding_idx)
        if self.device.type == "cuda":
            vectors = vectors.pin_memory()  # lets the copy below run asynchronously
        return vectors.to(self.device, non_blocking=True)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table on cpu, output on {self.device}"


def embeddings_to_cpu(model: nn.Module, device: torch.device) -> int:
    """Move the input embedding table to CPU memory (model.embeddings_on_cpu); return the accelerator bytes freed
    (none where the table already lived in CPU memory)."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise ConfigError(f"model.embeddings_on_cpu expects an nn.Embedding, found {type(embedding).__name__}")
    output = model.get_output_embeddings()
    if output is not None and output.weight is embedding.weight:
        raise ConfigError("model.embeddings_on_cpu: this model ties lm_head to the input embeddings, so the table "
                         "must stay on the device for the head: set --model.embeddings_on_cpu=false")
    # By type: the trainer names the device `cuda`, the table's tensor says `cuda:0`.
    freed = embedding.weight.numel() * embedding.weight.element_size() if embedding.weight.is_cuda else 0
    model.set_input_embeddings(CPUEmbedding(embedding, device))
    del embedding, output  # the last references to the old table: the cache can only hand back unreferenced memory
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the table's device memory back, so reserved memory shows the saving
    return freed
