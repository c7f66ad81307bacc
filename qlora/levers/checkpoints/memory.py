"""What the checkpoint plan keeps, for the estimate and for the trainer's check before the first step: how many layer
inputs wait on the device, how many in pinned host memory, and the pinned bytes that takes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qlora.errors import ConfigError
from qlora.levers.checkpoints.settings import CheckpointFields

GIB = 2**30
PINNED_HEADROOM = 0.9  # of the host's available memory: the rest is the process's own (data, a CPU embedding table)


@dataclass(frozen=True)
class CheckpointPlan:
    """Where the checkpointed layer inputs wait: every k-th layer keeps its input, the first `host` of those in
    pinned CPU memory, the rest on the device."""

    layers: int
    every: int
    host: int
    input_bytes: int
    """Bytes of one layer input (T h e)."""
    offload: bool

    @property
    def kept(self) -> int:
        return -(-self.layers // self.every)

    @property
    def on_device(self) -> int:
        return self.kept - self.host

    @property
    def host_bytes(self) -> int:
        return self.host * self.input_bytes

    def device_inputs(self, moment: str) -> int:
        """Layer inputs on the device at the backward's first layer ("first"), its last ("last"), or in the loss's
        backward ("loss"): the inputs that stayed, the group being replayed, and one fetched ahead."""
        ahead = 1 if self.host else 0  # an offloaded input is fetched back while the layer after it runs
        if moment == "loss":
            return self.on_device + ahead
        if moment == "last":  # the first group: its inputs replayed, every gradient built
            return min(self.every, self.layers)
        # The last group's inputs are replayed beside every input that stayed; its own first input is among those
        # that stayed, or fetched from the host.
        return max(self.on_device - 1, 0) + min(self.every, self.layers) + ahead

    def describe(self) -> str:
        where = (f"{self.host} in pinned CPU memory" + (f", {self.on_device} on the device" if self.on_device else "")
                 if self.offload else "on the device")
        replay = f"; the other {self.layers - self.kept} replayed from their group's first" if self.every > 1 else ""
        return f"{self.kept} of {self.layers} layer inputs kept ({where}){replay}"


def checkpoint_plan(train: CheckpointFields, layers: int, input_bytes: int, device: str,
                    budget_bytes: int | None = None, every: int | None = None) -> CheckpointPlan:
    """The recipe's plan (`train.checkpoint_every`, `offload_activations`, `offload_budget_gib`) for layer inputs of
    `input_bytes` each, or the given `every` and host budget in its place. Offloading happens on CUDA only: on a CPU
    device the inputs already are in CPU memory, and the lever changes nothing there."""
    every = every or train.checkpoint_every
    plan = CheckpointPlan(layers, every, 0, input_bytes, train.offload_activations and device == "cuda")
    if not plan.offload:
        return plan
    if budget_bytes is None:  # the recipe's budget; 0 = no limit
        budget_bytes = int(train.offload_budget_gib * GIB) or plan.kept * input_bytes
    return CheckpointPlan(layers, every, min(plan.kept, max(budget_bytes, 0) // input_bytes), input_bytes, True)


def pinned_need(train: CheckpointFields, layers: int, input_bytes: int) -> int:
    """Pinned host memory the offloaded layer inputs take: every train.checkpoint_every-th layer's input, as far as
    train.offload_budget_gib allows, each at its exact size (qlora/levers/pinned.py: one buffer per input, reused by
    every step and grown to the longest batch, so rows of other lengths add nothing)."""
    return checkpoint_plan(train, layers, input_bytes, "cuda").host_bytes if train.offload_activations else 0


def check_pinned_memory(layers: int, train: CheckpointFields, seq: int, hidden: int, elem_bytes: int,
                        host: tuple[int, str]) -> None:
    """Refuse, before the first step, an offload whose pinned buffers cannot fit in the host memory this process may
    count on, naming the budget that does. `train` is the recipe's train section (batch_size and this lever's
    fields); `host`: (bytes, what they are) of that memory, this process's share of the host's available memory
    (qlora/memory/preflight.py host_share: each process of several on one host pins its own buffers)."""
    available, where = host
    size = train.batch_size * seq * hidden * elem_bytes
    need = pinned_need(train, layers, size)
    room = int(available * PINNED_HEADROOM)
    if need <= room:
        return
    # Rounded down: rounded to nearest, a room of 1.854 GiB named 1.9, which pinned an input more and was refused
    # again naming itself. Below 0.1 GiB there is no budget to name (0 means no limit).
    budget = math.floor(room / GIB * 10) / 10
    fix = f"--train.offload_budget_gib={budget:.1f} (the other inputs stay on the device), or " if budget else ""
    raise ConfigError(
        f"train.offload_activations would pin {need / GIB:,.1f} GiB of host memory ({need // size} layer inputs of "
        f"{train.batch_size} x {seq:,} tokens x {hidden} x {elem_bytes} B) and {where}: set {fix}"
        f"--train.checkpoint_every={train.checkpoint_every * 2}, or --train.offload_activations=false")
