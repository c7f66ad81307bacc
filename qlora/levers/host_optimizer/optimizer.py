"""The optimizer in host memory from the start (train.optimizer_on_cpu): its state, the fp32 master copies and the
update live in buffers pinned at their exact size (qlora/levers/pinned.py), and the device holds none of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch

from qlora.adapters.master import accumulate_fp32
from qlora.levers.pinned import pinned_buffer, typed_views, views_size


class HostOptimizer(torch.optim.Optimizer):
    """The optimizer of `train.optimizer`, in host memory from the start (train.optimizer_on_cpu).

    The trainable parameters stay on the device for the forward and backward. The fp32 master copy of each parameter
    (qlora/adapters/master.py explains why 16-bit adapters need one), its gradient for the update and the optimizer's
    state live in host memory, pinned at their exact size: `step` runs the inner optimizer on the masters and writes
    each master back into its parameter, rounded to the parameter's dtype. For fp32 parameters (the CPU) the update
    is the inner optimizer's on copies, to the bit.

    A 16-bit parameter's gradient leaves the device as soon as autograd has summed it (`gradients_to_host`, one
    process): copied into a pinned 16-bit buffer on the stream that computed it, freed on the device, and summed in
    fp32 in host memory once the backward ends (each micro-batch's backward: one wait for the copies). The device
    holds no state, no master and no fp32 gradient: per trainable parameter its 16-bit value, and its 16-bit gradient
    for a moment (on the 70B recipe 0.77 GiB of fp32 gradients no longer on the card at the backward's end). With
    several processes the gradients are summed across them on the device (NCCL sums device tensors), so there they
    are summed in fp32 on the device and copied over at the step.

    Its `param_groups` are its own: the gradients to clip (for 16-bit parameters, zero-stride fp32 stand-ins of each
    parameter's shape, in host memory or on the device, whose gradient is the fp32 sum) and the learning rate the
    schedule sets, copied to the inner optimizer at each step. `state` is the inner optimizer's, so checkpoints and
    the memory profiler see it.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], build: Callable[[list[torch.Tensor]],
                                                                              torch.optim.Optimizer],
                 gradients_to_host: bool = True) -> None:
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
        staged = [i for i, p in enumerate(self.params) if gradients_to_host and p.dtype != torch.float32]
        like16 = [torch.empty(self.params[i].shape, dtype=self.params[i].dtype, device="meta") for i in staged]
        self.staged = dict(zip(staged, typed_views(pinned_buffer(views_size(like16), pin), like16), strict=True))
        self.landing: list[int] = []  # staged gradients copied out in this backward, not yet summed
        # What the trainer clips: the parameters' own gradients when they are fp32, else the fp32 sums of their
        # gradients, held by stand-ins (an expanded scalar has the shape and no memory of its own).
        self.holders = []
        for i, p in enumerate(self.params):
            if p.dtype == torch.float32:
                self.holders.append(p)
                continue
            where = "cpu" if i in self.staged else p.device
            holder = torch.zeros((), dtype=torch.float32, device=where).expand(p.shape).requires_grad_(True)
            self.holders.append(holder)
            hook = functools.partial(self._stage, i) if i in self.staged else \
                functools.partial(accumulate_fp32, holder)
            p.register_post_accumulate_grad_hook(hook)
        self.inner = build(self.masters)
        super().__init__(self.holders, self.inner.defaults)
        self.state = self.inner.state

    def _stage(self, i: int, p: torch.nn.Parameter) -> None:
        """Autograd has summed `p`'s gradient: copy it out and free it. The copy runs on the stream that computed
        it, so the memory freed is reused only after the copy has read it; the sum waits for the backward's end."""
        self.staged[i].copy_(p.grad, non_blocking=True)
        if p.grad.is_cuda:  # freed on the stream that copies it, whichever allocated it
            p.grad.record_stream(torch.cuda.current_stream(p.grad.device))
        p.grad = None
        if not self.landing:  # run once this backward ends (the hook FSDP's post-backward uses too)
            torch.autograd.Variable._execution_engine.queue_callback(self._land)
        self.landing.append(i)

    def _land(self) -> None:
        """At the end of a backward: once its copies have landed, add them to the fp32 sums on the host."""
        if self.pinned:
            torch.cuda.synchronize()
        for i in self.landing:
            holder = self.holders[i]
            if holder.grad is None:
                holder.grad = self.host_grads[i].copy_(self.staged[i])
            else:
                holder.grad.add_(self.staged[i])
        self.landing.clear()

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
            # As on the device: no gradient, no update. A staged gradient was summed into its host buffer already.
            master.grad = None if holder.grad is None else \
                holder.grad if holder.grad is grad else grad.copy_(holder.grad, non_blocking=True)
        if self.pinned:
            torch.cuda.current_stream().synchronize()  # the gradients must have landed before the CPU reads them
        self.inner.step()
        for p, master in zip(self.params, self.masters, strict=True):
            # Rounded to the parameter's dtype on the way; the next step's copies wait on this stream, so the host
            # buffers may be reused.
            p.copy_(master, non_blocking=True)

    @torch.no_grad()
    def copy_from_params(self) -> None:
        """The fp32 masters set from the weights: after those were loaded by another route than this optimizer's
        state (a resume that changed train.optimizer): else the first step would write the masters of the fresh
        adapters back over the resumed ones."""
        for master, p in zip(self.masters, self.params, strict=True):
            master.copy_(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)  # the gradients the next backward sums afresh
        # A backward that raised never ran its callback: what it staged is no gradient of the next one, which must
        # queue its own (a stale entry would keep it from queueing, and its sums would never land).
        self.landing.clear()

    def state_dict(self) -> dict:
        self._sync_groups()
        return {"inner": self.inner.state_dict(), "masters": [m.detach() for m in self.masters]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """qlora/adapters/master.py's format ({"inner", "masters"}), or a plain optimizer's (the model's weights)."""
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
