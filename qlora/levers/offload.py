"""Keep what the step does not need on the device in CPU memory: the input embeddings and the optimizer, in host
buffers pinned at their exact size. (Checkpointed layer inputs: qlora/levers/checkpoints.py.)

Pinned buffers. torch's caching host allocator (`pin_memory=True`) rounds every pinned block up to a power of two
(ATen/core/CachingHostAllocator.h: "Round up the allocation to the nearest power of two"), so a 3.1 GB layer input
would take 4 GiB of the host. `pinned_buffer` allocates ordinary CPU memory of the exact size and registers it with
the driver (cudaHostRegister, as torch.cuda's own `_pin_memory_utils`), so copies to and from it run asynchronously
and the host holds what the estimate counts.

Input embeddings. `CPUEmbedding` looks tokens up in a table left in CPU memory and sends only their vectors to the
device: vocab x hidden x 2 bytes of device memory saved (1.0 GiB for Llama-3.1-8B, 2.1 GiB for 70B) for one
batch x seq x hidden copy per step.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

from qlora.config import ConfigError
from qlora.master import accumulate_fp32


def pinned_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """`nbytes` of CPU memory as a flat uint8 tensor, page-locked for the GPU when `pin` (CUDA); plain otherwise."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if pin and nbytes:
        from torch.cuda._pin_memory_utils import pin_memory, unpin_memory

        pin_memory(buffer.data_ptr(), nbytes)
        # Unregister when the tensor goes, before its memory returns to the allocator.
        weakref.finalize(buffer, unpin_memory, buffer.data_ptr())
    return buffer


def typed_views(buffer: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `buffer` shaped and typed as each tensor of `like`, one after another (each at an aligned offset)."""
    out, offset = [], 0
    for t in like:
        size = t.numel() * t.element_size()
        out.append(buffer[offset:offset + size].view(t.dtype).view(t.shape))
        offset += -(-size // 64) * 64
    return out


def views_size(like: list[torch.Tensor]) -> int:
    return sum(-(-t.numel() * t.element_size() // 64) * 64 for t in like)


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


class HostOptimizer(torch.optim.Optimizer):
    """The optimizer of `train.optimizer`, in host memory from the start (train.optimizer_on_cpu).

    The trainable parameters stay on the device for the forward and backward, and their gradients are summed there in
    fp32. The fp32 master copy of each parameter (qlora/master.py explains why 16-bit adapters need one), its
    gradient for the update and the optimizer's state live in host memory, pinned at their exact size: `step` copies
    the gradients over, runs the inner optimizer on the masters, and writes each master back into its parameter,
    rounded to the parameter's dtype. The device holds no state and no master: per trainable parameter, its 16-bit
    value and, from its backward to the step, its fp32 gradient. For fp32 parameters (the CPU) the update is the
    inner optimizer's on copies, to the bit.

    Its `param_groups` are its own, over the device side: the gradients to clip (for 16-bit parameters, zero-stride
    fp32 stand-ins of each parameter's shape that hold the fp32 gradient and take no memory) and the learning rate
    the schedule sets, copied to the inner optimizer at each step. `state` is the inner optimizer's, so checkpoints
    and the memory profiler see it.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], build: Callable[[list[torch.Tensor]],
                                                                              torch.optim.Optimizer]) -> None:
        self.params = list(params)
        pin = any(p.is_cuda for p in self.params)
        self.pinned = pin
        like = [torch.empty(p.shape, device="meta") for p in self.params]  # fp32, the shapes: no memory
        self.masters = typed_views(pinned_buffer(views_size(like), pin), like)
        self.host_grads = typed_views(pinned_buffer(views_size(like), pin), like)
        with torch.no_grad():
            for master, p in zip(self.masters, self.params, strict=True):
                master.copy_(p)
                master.requires_grad_(True)
        # What the trainer clips: the parameters' own gradients when they are fp32, else fp32 gradients summed on the
        # device into stand-ins that hold them (an expanded scalar has the shape and no memory of its own).
        self.holders = []
        for p in self.params:
            if p.dtype == torch.float32:
                self.holders.append(p)
                continue
            holder = torch.zeros((), dtype=torch.float32, device=p.device).expand(p.shape).requires_grad_(True)
            p.register_post_accumulate_grad_hook(functools.partial(accumulate_fp32, holder))
            self.holders.append(holder)
        self.inner = build(self.masters)
        super().__init__(self.holders, self.inner.defaults)
        self.state = self.inner.state

    def _sync_groups(self) -> None:
        """The schedule sets the learning rate on our groups; the inner optimizer steps with its own."""
        for ours, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner.update({k: v for k, v in ours.items() if k != "params"})

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        if closure is not None:
            raise ValueError("train.optimizer_on_cpu: a closure would run the model on the host copies")
        self._sync_groups()
        for holder, master, grad in zip(self.holders, self.masters, self.host_grads, strict=True):
            # As on the device: no gradient, no update.
            master.grad = None if holder.grad is None else grad.copy_(holder.grad, non_blocking=True)
        if self.pinned:
            torch.cuda.current_stream().synchronize()  # the gradients must have landed before the CPU reads them
        self.inner.step()
        for p, master in zip(self.params, self.masters, strict=True):
            # Rounded to the parameter's dtype on the way; the next step's copies wait on this stream, so the host
            # buffers may be reused.
            p.copy_(master, non_blocking=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)  # the device side: the gradients the next backward sums afresh

    def state_dict(self) -> dict:
        self._sync_groups()
        return {"inner": self.inner.state_dict(), "masters": [m.detach() for m in self.masters]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """qlora/master.py's format ({"inner", "masters"}), or a plain optimizer's, whose weights are the model's."""
        if "masters" in state_dict:
            self.inner.load_state_dict(state_dict["inner"])
            saved = state_dict["masters"]
        else:
            self.inner.load_state_dict(state_dict)
            saved = self.params
        self.state = self.inner.state
        for ours, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            ours.update({k: v for k, v in inner.items() if k != "params"})
        for p, master, value in zip(self.params, self.masters, saved, strict=True):
            master.copy_(value)
            p.copy_(master)
