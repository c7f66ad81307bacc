"""What each lever costs in step time: the one table train.plan=fastest orders the levers by (qlora/memory/plan.py).

A figure is the time a lever adds to a step, as a share of the plain step (no checkpointing, no lever): +0.30 makes a
step 30% longer than the plain one; a negative figure saves time. Figures add up. Each comes from
`python benchmarks/lever_costs.py` (the step of `benchmarks/throughput.py`'s `ours`: on a GPU one configuration per
process, on a CPU all in one, timed round-robin; the median of its timed steps), and the `source` of each row says
which measurement. What the kinds of cost are:

    recompute      the step runs part of the forward again: gradient_checkpointing (the whole forward, in the
                   backward), checkpoint_every (k-1 of each k layers once more: (k-1)/k of its figure, which is that
                   of replaying every layer), tile_size / tile_projections / tile_norms (the MLP / q,k,v,o / the
                   norms once more, for rows longer than a tile), loss_chunk_size (the head, for rows longer than a
                   chunk)
    host traffic   bytes cross PCIe each step: layer inputs (offload_activations; scaled by the share of them the
                   plan pins on the host), the adapters' gradients and weights and a CPU update (optimizer_on_cpu),
                   each step's embedding rows (embeddings_on_cpu), the base's layers (stream_base)
    kernels        the same arithmetic in other kernels: speed levers, negative where they save time
    batch shape    train.batch_size (with train.plan_batch): its figure is of another kind, the share of a one-row
                   micro-batch's step (checkpointing on, as recipes run) that does not grow with its rows (every
                   weight dequantised, every kernel launched, the optimizer), measured as 2 - t(2 rows) / t(1 row)
                   at MEASURED_TOKENS[device] tokens a row; candidates.batch_cost turns it into a share of the step

PROVENANCE, read before trusting an order. The CPU column is measured (below); the CUDA column is NOT yet: no GPU
has run benchmarks/lever_costs.py. Until the GPU battery's `lever-costs-8b` item does, the CUDA column holds
  - for recompute, the CPU figure: replaying a forward costs its share of FLOPs on any device, though on the CPU
    dequantisation weighs more in it;
  - for host traffic, an assumption (marked ASSUMED), ordered by the bytes each moves per step for Llama-3.1-8B at
    2048 tokens: embedding rows 16 MiB, layer inputs 2 x 512 MiB overlapped with compute on a side stream, the
    adapters' fp32 gradients and weights 2 x 160 MiB plus a CPU AdamW over 42M parameters, not overlapped; and
    last, the whole 4-bit base twice a micro-batch (stream_base: 6.8 GB, 69 GB for 70B), behind the compute only in
    part, at the 1.3x of a resident step issue 25 bounds it to;
  - for speed levers, None: the plan leaves a lever it has no figure for as the recipe sets it, so no speed lever is
    chosen on CUDA before a GPU measured that it pays.
Replace the CUDA column from the battery's report (benchmarks/results/lever-costs-cuda-8b.md) and say so in `source`.
"""

from __future__ import annotations

from dataclasses import dataclass

# The CPU measurement behind the cpu column: benchmarks/results/lever-costs-cpu-small.md (figures rounded to 0.01).
CPU_RUN = ("CPU (2-core AMD EPYC, 2 threads, no other work; timed round-robin), 2026-12-05, python "
           "benchmarks/lever_costs.py --steps=31 --warmup=3: 4-layer Llama, hidden 256, vocabulary 8192, "
           "1 x 512 tokens")

# tile_norms came later, measured with the configurations it is set against, in one round-robin:
# benchmarks/results/lever-costs-cpu-small-tile-norms.md (tile_size +0.62 and tile_projections +0.58 there).
NORMS_RUN = ("the same machine and model, 2026-12-05, python benchmarks/lever_costs.py --steps=31 --warmup=3 --only "
             "plain,train.gradient_checkpointing,train.tile_size,train.tile_norms,train.tile_projections")

# Tokens a row in the measurement behind each column (what the batch shape's figure scales with).
MEASURED_TOKENS = {"cpu": 512, "cuda": 2048}


@dataclass(frozen=True)
class LeverCost:
    lever: str
    """The field, as a recipe spells it."""
    kind: str
    """recompute, host traffic or kernels (the module docstring)."""
    setting: object
    """The value the plan switches it on with when the recipe leaves it at its default (else the recipe's value)."""
    cpu: float | None
    """Added step time / the plain step on a CPU device; None where the lever changes nothing on a CPU."""
    cuda: float | None
    """The same on CUDA; None where not measured: the plan then leaves the lever as the recipe sets it."""
    source: str

    def figure(self, device: str) -> float | None:
        return self.cpu if device == "cpu" else self.cuda


MEASURED = f"measured: {CPU_RUN}"
STAND_IN = "CUDA: the CPU figure stands in until the GPU battery measures it"
ASSUMED = "CUDA: ASSUMED, not measured (no effect on a CPU device); the GPU battery's lever-costs-8b measures it"
NO_GPU = "CUDA: not measured yet (the GPU battery's lever-costs-8b): left as the recipe sets it"

TABLE: tuple[LeverCost, ...] = (
    LeverCost("train.gradient_checkpointing", "recompute", True, 0.39, 0.39, f"{MEASURED}; {STAND_IN}"),
    LeverCost("train.checkpoint_every", "recompute", None, 0.38, 0.38,
              f"{MEASURED} (checkpoint_every=4 of 4 layers, +0.285, scaled by 4/3 to a whole forward); {STAND_IN}"),
    LeverCost("train.tile_size", "recompute", 4096, 0.63, 0.63,
              f"{MEASURED} (tiles of 128 of 512 tokens: small tiles cost a CPU more than a card); {STAND_IN}"),
    LeverCost("train.tile_projections", "recompute", True, 0.56, 0.56, f"{MEASURED}; {STAND_IN}"),
    LeverCost("train.tile_norms", "recompute", True, 0.08, 0.08,
              f"measured: {NORMS_RUN} (+0.079 against tile_size alone); {STAND_IN}"),
    LeverCost("train.loss_chunk_size", "recompute", 1024, 0.16, 0.16,
              f"{MEASURED} (chunks of 128 of 512 tokens); {STAND_IN}"),
    LeverCost("model.embeddings_on_cpu", "host traffic", True, None, 0.01, ASSUMED),
    LeverCost("train.offload_activations", "host traffic", True, None, 0.05, ASSUMED),
    LeverCost("train.optimizer_on_cpu", "host traffic", True, None, 0.10, ASSUMED),
    LeverCost("train.stream_base", "host traffic", True, None, 0.30,
              f"{ASSUMED}: issue 25's bound on it at 4,096 tokens (the battery's throughput-70b-stream measures it)"),
    LeverCost("train.batch_size", "batch shape", None, 0.18, None, f"{MEASURED}; {NO_GPU}"),
    LeverCost("train.fuse_lora_add", "kernels", True, -0.05, None, f"{MEASURED}; {NO_GPU}"),
    LeverCost("train.fuse_lora", "kernels", True, -0.09, None, f"{MEASURED}; {NO_GPU}"),
    LeverCost("train.reuse_dequant", "kernels", True, -0.05, None, f"{MEASURED}; {NO_GPU}"),
    LeverCost("train.dequant_once", "kernels", True, -0.13, None, f"{MEASURED}; {NO_GPU}"),
    LeverCost("train.liger_kernels", "kernels", True, None, None, f"CUDA only (Triton); {NO_GPU}"),
    LeverCost("train.liger_ce", "kernels", True, None, None, f"CUDA only (Triton); {NO_GPU}"),
)
COSTS = {row.lever: row for row in TABLE}
