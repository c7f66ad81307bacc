"""Several processes, one run: `torchrun --nproc-per-node=N -m qlora.train RECIPE.py` (or `accelerate launch`).

Every process (rank) runs the same loop on its share of each batch. Micro-batch i of the run holds the rows one process
with batch N*b would take (data.batches.micro_batches); rank r collates its r-th b of them, and every rank divides its
summed token loss by the target tokens of the whole global batch, so N ranks x batch b compute the loss and gradients
of one process with batch N*b.

Data parallel (the default): every rank holds the whole model. After the accumulation, one summing all-reduce of the
adapters' gradients (in buckets, as DDP does) gives every rank the same gradient, so clipping, the optimizer step, the
adapters and the optimizer state stay identical everywhere with no more communication. DDP itself is not used: it
hooks the model's forward, and the loss calls the decoder and the head directly (qlora/training/loss.py).

`train.shard_base`: the frozen base sharded over the ranks by FSDP2 (qlora/base/shard.py); the adapters stay whole on
every rank and are summed as in data parallel.

Every rank runs the same collectives in the same order; how the processes meet, and how a run of them ends, is
qlora/training/launch.py's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from qlora.base import shard
from qlora.config import Config
from qlora.data.batches import target_tokens
from qlora.errors import EXIT_BUG, ConfigError, Stop, exit_status
from qlora.training import guard
from qlora.training.checkpoint import rng_state, set_rng_state

BUCKET_BYTES = 25 * 2**20  # gradients summed per all-reduce: DDP's default bucket_cap_mb
T = TypeVar("T")


@dataclass
class Ranks:
    """This process's place in the run; one process (rank 0 of 1) when not launched by torchrun or accelerate."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    """The run's processes on this host (torchrun's LOCAL_WORLD_SIZE), which share its memory."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where this rank computes, and where its collectives' tensors live: its own GPU (NCCL) or CPU (gloo)."""
    store: dist.Store | None = None
    """The key-value store the processes met through (torchrun's, or rank 0's); it outlives a rank that ended."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1

    def on_main(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` on rank 0 alone once every rank has got here; every rank returns its result, or ends as it did
        (rank 0 with the original error, the others with its exit status, in silence: qlora.cli prints it once)."""
        if not self.several:
            return fn(*args)
        dist.barrier()  # all ranks have read and checked what they need before rank 0 writes
        outcome: list[object] = [None]
        original = None
        if self.main:
            try:
                outcome = [("ok", fn(*args))]
            except Exception as err:  # its exit status goes to the others, then it is raised here
                original, ending = err, exit_status(err)
                outcome = [("error", (ending[0] if ending else EXIT_BUG, f"rank 0: {err}"))]
        dist.broadcast_object_list(outcome, src=0)
        kind, value = outcome[0]
        if kind == "error":
            raise original or Stop(*value)
        return value

    def gathered(self, value: T) -> list[T]:
        """Every rank's `value`, rank 0's first (a collective: every rank calls it)."""
        every: list[T] = [value] * self.size
        dist.all_gather_object(every, value)
        return every

    def least(self, room: tuple[int, str]) -> tuple[int, str]:
        """The least of every rank's `room` (bytes, what they are): what a choice every rank must make alike is made
        for. The plan (train.plan=fastest) chose by each rank's own card or host memory differed between cards of
        other sizes, or on CPU between hosts (or moments) of other available memory (with train.plan_batch, the
        rows each takes too)."""
        if not self.several:
            return room
        least = min(self.gathered(room), key=lambda r: r[0])
        return least[0], f"{least[1]}, the least of {self.size} processes'"

    def global_targets(self, examples: list[dict], batch_size: int, seed: int, indices: list[int]) -> int | None:
        """Target tokens of the global batch made of micro-batches `indices`; None for one process (forward_backward
        counts its own micro-batches, which are the whole batch)."""
        if not self.several:
            return None
        return sum(target_tokens(examples, batch_size * self.size, seed, i) for i in indices)

    def check_same(self, values: dict, fix: str) -> None:
        """Refuse `values` that differ between the ranks, naming the first that differs from rank 0's. Each rank may
        have its own command line, recipe file and data (torchrun on each of several machines): a rank with another
        train.lr trained its own adapters into the sum without a word. Every rank raises alike; rank 0 says it."""
        if not self.several:
            return
        every = self.gathered(values)
        for rank, theirs in enumerate(every[1:], 1):
            differ = [k for k in dict.fromkeys([*every[0], *theirs]) if every[0].get(k) != theirs.get(k)]
            if differ:
                key, more = differ[0], f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
                raise ConfigError(f"rank {rank} has {key}={theirs.get(key)!r} where rank 0 has "
                                  f"{every[0].get(key)!r}{more}: {fix}")

    def sum_gradients(self, params: list[nn.Parameter], loss: float, tokens: int) -> tuple[float, int]:
        """Sum the adapters' gradients over the ranks, once per optimizer step (DDP's all-reduce under no_sync for
        the accumulation); return the global batch's loss and token count. Each rank's loss was divided by the
        global batch's target tokens, so the sum is the gradient of the global batch's mean token loss."""
        if not self.several:
            return loss, tokens
        grads = []
        for p in params:
            if p.grad is None:  # every rank must send the same tensors, whatever its batch reached
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for bucket in buckets(grads, BUCKET_BYTES):
            if len(bucket) == 1:
                dist.all_reduce(bucket[0])
                continue
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                g.copy_(part.view_as(g))
        total_loss, total_tokens = self.sum_values(loss, tokens)
        return total_loss, int(total_tokens)

    def sum_values(self, *values: float) -> tuple[float, ...]:
        """Numbers summed over the ranks (float64); as given for one process."""
        if not self.several:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return tuple(type(v)(x) for v, x in zip(values, t.tolist(), strict=True))

    def agree_signal(self, watch: guard.RunGuard) -> int | None:
        """The signal (SIGINT/SIGTERM) every rank stops for at the end of this step: the one any rank has received.
        Each rank catches its own, at its own moment; deciding together keeps them stopping at the same step (a rank
        that stopped alone would leave the others waiting in the next step's all-reduce)."""
        if not self.several:
            return watch.signal
        flag = torch.tensor([watch.signal or 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item()) or None
        if agreed and watch.signal is None:  # for its exit status; a rank's own later signal is kept for next step
            watch.signal = agreed
        return agreed

    def rng_states(self) -> dict:
        """Every rank's RNG state, for the checkpoint rank 0 writes (dropout draws differ between ranks)."""
        if not self.several:
            return {}
        states: list[object] = [None] * self.size
        dist.all_gather_object(states, rng_state(self.device))
        return {"rng_ranks": states}

    def restore_rng(self, state: dict, dropout: bool) -> None:
        """After `restore.load_checkpoint` (which restored rank 0's RNG everywhere): this rank's own. `dropout`:
        whether the step draws random numbers (lora.dropout), which another number of processes draws otherwise."""
        ranks = state.get("rng_ranks") or [state.get("rng")]  # a one-process checkpoint: rank 0's alone
        if len(ranks) == self.size:
            if self.several:
                set_rng_state(ranks[self.rank], self.device)
        else:  # one process resuming the checkpoint of several is told too
            draws = "dropout draws differ from the run that wrote it, and so do the batches" if dropout else \
                "the batches differ from the run that wrote it"
            print(f"the checkpoint was written by {len(ranks)} process(es), this run has {self.size}: {draws} "
                  "unless processes x train.batch_size is the same")

    def share(self, batches: Iterable[T], n: int) -> Iterator[tuple[T, bool]]:
        """This rank's share of the first `n` batches (round robin), each with whether its statistics count. Every
        rank runs the same number of forwards, as a sharded base all-gathers in each: a rank one short runs the
        first batch again, uncounted."""
        first, mine = None, 0
        for i, batch in enumerate(batches):
            if i >= n:
                break
            first = batch if first is None else first
            if i % self.size == self.rank:
                mine += 1
                yield batch, True
        for _ in range(math.ceil(n / self.size) - mine):  # fewer batches than ranks: some have none of their own
            yield first, False

    def distribute(self, model: nn.Module, cfg: Config, device: torch.device) -> None:
        """Make this rank's model ready to train beside the others: the base sharded (train.shard_base) and a
        dropout stream of its own (the adapters were initialised alike on every rank from train.seed)."""
        if not self.several:
            return
        if cfg.train.shard_base:
            shard.shard_base(model, cfg, self.size, device)
        for p in model.parameters():  # as DDP does: every rank starts from rank 0's trainable weights
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
        torch.manual_seed(cfg.train.seed * 100_003 + self.rank)


    def base_place(self, cfg: Config) -> torch.device | None:
        """Where the base is loaded: CPU memory when it will be sharded onto the GPUs (no GPU holds it whole)."""
        return torch.device("cpu") if self.several and cfg.train.shard_base else None


def buckets(tensors: list[torch.Tensor], cap: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device, up to `cap` bytes a group (a larger tensor goes alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > cap or t.dtype != bucket[0].dtype or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket
