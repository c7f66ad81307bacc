"""Host buffers pinned at their exact size, for the levers that keep tensors in host memory (layer inputs, optimizer).

torch's caching host allocator (`pin_memory=True`) rounds every pinned block up to a power of two
(ATen/core/CachingHostAllocator.h: "Round up the allocation to the nearest power of two"), so a 3.1 GB layer input
would take 4 GiB of the host. `pinned_buffer` allocates ordinary CPU memory of the exact size and registers it with
the driver (cudaHostRegister, as torch.cuda's own `_pin_memory_utils`), so copies to and from it run asynchronously
and the host holds what the estimate counts.
"""

from __future__ import annotations

import mmap
import weakref

import torch

PAGE = mmap.PAGESIZE


def pinned_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """`nbytes` of CPU memory as a flat uint8 tensor, page-locked for the GPU when `pin` (CUDA; on pages of its own,
    see page_aligned); plain otherwise."""
    if not pin:
        return torch.empty(nbytes, dtype=torch.uint8)
    buffer = page_aligned(nbytes)
    pin_in_place(buffer)
    return buffer


def page_aligned(nbytes: int) -> torch.Tensor:
    """`nbytes` of CPU memory as a flat uint8 tensor on pages of its own: an anonymous mapping, whose storage starts on
    a page boundary. cudaHostRegister pins whole pages and refuses a page another registration holds, which two small
    buffers side by side in malloc's heap would share; and `Tensor.is_pinned` asks the driver about the storage's first
    byte (ATen's Memory.cpp), which a view into a larger allocation would not have registered."""
    if not nbytes:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)  # the tensor keeps the mapping alive


def pin_in_place(buffer: torch.Tensor) -> None:
    """Page-lock `buffer` (a flat CPU tensor) for the GPU as it is, until its memory goes. Filled before it is pinned,
    its pages come into memory one copy at a time: pinning first would fault them all in at once, beside whatever is
    being copied into it."""
    if buffer.numel():
        from torch.cuda._pin_memory_utils import pin_memory

        pin_memory(buffer.data_ptr(), buffer.numel() * buffer.element_size())
        # Unregistered when the storage goes, before its memory returns to the allocator: not when this tensor object
        # goes, for views of it (typed_views) may outlive it and still be copied to and from the card.
        weakref.finalize(buffer.untyped_storage(), _unpin, buffer.data_ptr())


def _unpin(ptr: int) -> None:
    """Unregister the pages at `ptr` once no copy to or from them is in flight. cudaHostUnregister is not documented
    to wait for one (torch's caching host allocator records an event at each use for this), and a buffer may go right
    after its last asynchronous copy was queued: the host optimizer's masters as the run's last step ends, a model
    dropped between two measurements (qlora.report.measure). Buffers go rarely (a slot outgrown, a run's end), so the
    wait costs nothing a step would see."""
    from torch.cuda._pin_memory_utils import unpin_memory

    if torch.cuda.is_initialized():  # registering the pages initialised it, unless the driver was not called
        torch.cuda.synchronize()
    unpin_memory(ptr)


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
