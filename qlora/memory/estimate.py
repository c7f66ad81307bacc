"""Predict the peak memory of a training step from the model's config.json and the recipe, before any weight exists.

Three methods for the same model, batch and sequence length:

    full   every weight trains: weights + gradients + AdamW's two moments, all per parameter
    lora   frozen 16-bit base + LoRA adapters on the targeted linear layers
    qlora  frozen NF4 base with double quantisation + the same adapters

Symbols: L layers, h hidden, i intermediate, nh heads, q = nh*hd and kv = nkv*hd attention widths, V vocabulary,
b batch, s sequence length, T = b*s tokens, N = b*(s-1) predicted positions, e bytes per element of the compute dtype
(bf16 on CUDA, fp32 on CPU; the model is loaded in it, so unquantised weights take e bytes too).

Several processes (`gpus` > 1, qlora/training/distributed.py), per process: data parallel holds all one process does,
plus one bucket of gradients being summed; `train.shard_base` holds 1/gpus of the frozen base (packed 4-bit weights,
embeddings, head, norms; the quantisation state and a tied embedding table whole), plus what FSDP all-gathers for the
moment: two decoder layers in the backward (the one computing and the one prefetched), the head in the loss.

The activation formulas (activations.py) count what autograd saves in a Llama-style decoder layer; they were checked
tensor by tensor against torch's saved-tensor hooks on the tiny Llama in fp32 and bf16, with and without LoRA dropout,
for all three methods, and whole steps against CPU measurements with and without each lever (tests/test_memory.py).

Two memories are counted. `components` is the device's (what the card would show, CUDA context included; on a CPU
device, the process's RAM). `host` is the CPU memory a CUDA run needs besides: offloaded layer inputs (pinned), the
optimizer when it runs on the CPU, the embedding table kept there, the 4-bit base streamed from there
(train.stream_base: the device keeps two decoder layers of it, as `gathered_weights`, and the code tables), the
tokenised rows (rows.py; on a CPU device one of the `components`), and the process's own runtime. A plan that
does not fit the host is no plan (qlora/memory/context.py).

Each term, with its formula, is counted in terms.py; the estimate's assumptions in words are assumptions.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora.config import Config
from qlora.levers.checkpoints.memory import CheckpointPlan
from qlora.levers.stream_base.memory import StreamPlan
from qlora.memory import window
from qlora.memory.arch import Arch
from qlora.memory.assumptions import assumptions, levers
from qlora.memory.rows import rows_bytes
from qlora.memory.terms import (
    ALLREDUCE_BUCKET,
    CUDA_CONTEXT,
    HOST_RUNTIME,
    OUTSIDE_BEYOND_CONTEXT,
    RESERVE_HIDDEN_STATES,
    Tally,
    count_step,
    count_trained,
    count_weights,
    gathered_bytes,
    trainable_tensors,
)

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class Estimate:
    method: str
    device: str
    components: dict[str, int]
    """Bytes per category at the peak moment; they sum to the peak."""
    formulas: dict[str, str]
    phases: dict[str, int]
    """Activation + gradient bytes of each candidate peak moment; the largest sets the peak."""
    peak_phase: str
    assumptions: list[str] = field(default_factory=list)
    host: dict[str, int] = field(default_factory=dict)
    """CUDA: host-memory bytes the plan needs besides the device's (empty for a CPU device: it is all `components`)."""
    host_formulas: dict[str, str] = field(default_factory=dict)
    levers: list[str] = field(default_factory=list)
    """The memory levers in effect, each as the recipe spells it, with what it does here."""
    checkpoints: CheckpointPlan | None = None
    """Where the checkpointed layer inputs wait (None without gradient checkpointing)."""
    margin: int = 0
    """CUDA: the allocator's margin beyond `peak_bytes` (its reserve, memory outside it beyond the context)."""
    margin_formula: str = ""
    streamed: StreamPlan | None = None
    """train.stream_base: the base in host memory, what the device holds of it and what crosses per micro-batch."""

    @property
    def peak_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def card_bytes(self) -> int:
        """What the card must hold: the peak and the allocator's margin (on a CPU device, the peak)."""
        return self.peak_bytes + self.margin

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())


def compute_bytes(cfg: Config, device: str) -> tuple[str, int]:
    """(name, bytes per element) of the compute dtype: mirrors qlora.base.load.compute_dtype without importing torch."""
    name = cfg.quant.compute_dtype
    if name == "auto":
        name = "bf16" if device == "cuda" else "fp32"
    return name, DTYPE_BYTES[name]


def estimate(cfg: Config, arch: Arch, method: str, device: str, gpus: int = 1) -> Estimate:
    """Peak bytes of one steady-state training step of `method` on `device` ("cuda" or "cpu"), on each of `gpus`
    processes: data parallel, or with train.shard_base (qlora and lora) the frozen base sharded over them; and on
    CUDA the host memory each process needs besides."""
    dname, e = compute_bytes(cfg, device)
    shards = gpus if gpus > 1 and cfg.train.shard_base and method != "full" else 1
    tally = Tally()
    count_weights(tally, cfg, arch, method, device, e, shards)
    sizes = tuple(trainable_tensors(arch, method, cfg))
    g, step_tmp, staged = count_trained(tally, cfg, sizes, method, device, e, gpus)
    if gpus > 1:  # the gradients are summed across processes in buckets, each concatenated into one tensor
        step_tmp += min(sum(sizes) * g, ALLREDUCE_BUCKET)
    phases, plan = count_step(tally, cfg, arch, method, device, e, g, sum(sizes) * g, step_tmp, staged)
    gathered = gathered_bytes(cfg, arch, method, e) if shards > 1 else {}
    streamed = tally.streamed
    if streamed is not None:  # the streamer's two slots, there from the first step to the last
        gathered = dict.fromkeys(phases, streamed.card_bytes)
    phases = {k: (v[0] + gathered.get(k, 0), v[1]) for k, v in phases.items()}  # peaks compared with them in
    peak_phase = max(phases, key=lambda k: sum(phases[k]))
    comp, fx, host, hfx = tally.comp, tally.fx, tally.host, tally.hfx
    comp["gathered_weights"] = gathered.get(peak_phase, 0)
    comp["activations"] = phases[peak_phase][0] - comp["gathered_weights"]
    comp["gradients"] = phases[peak_phase][1]
    if comp["gathered_weights"] and streamed is not None:
        fx["gathered_weights"] = ("two decoder layers' packed weights and absmax (train.stream_base: the one "
                                  "computing, the next being copied in)")
    elif comp["gathered_weights"]:
        fx["gathered_weights"] = ("two decoder layers whole (FSDP: the one in its backward, the next prefetched)"
                                  if peak_phase == "layer_backward" else "the head whole (FSDP), for the loss")
    fx["activations"] = f"at {peak_phase}: {fx['activations'][peak_phase]}"
    if peak_phase != "layer_backward":
        fx["gradients"] = {"loss_backward": "none yet: freed before the forward",
                           "optimizer_step": "none on the device: in host memory (train.optimizer_on_cpu)" if staged
                           else f"P_train {'e' if g == e else 4}, all of them"}[peak_phase]
    # Held from before the base loads to the run's end: on a CPU device with the rest of the process, of which the
    # measured peak names them too (profiler: tokenised_rows); on CUDA, in host memory beside the card
    held, held_fx = rows_bytes(cfg)
    if held:
        if device == "cpu":
            comp["tokenised_rows"], fx["tokenised_rows"] = held, held_fx
        else:
            host["tokenised_rows"], hfx["tokenised_rows"] = held, held_fx
    margin, margin_fx = 0, ""
    if device == "cuda":
        comp["cuda_context"] = CUDA_CONTEXT
        fx["cuda_context"] = "0.5 GiB, typical of CUDA 12 (a measured run records the real one)"
        host["runtime"], hfx["runtime"] = HOST_RUNTIME, "6 GiB allowance for the process itself (not measured yet)"
        T = cfg.train.batch_size * cfg.data.max_seq_len
        margin = RESERVE_HIDDEN_STATES * T * arch.hidden * e + OUTSIDE_BEYOND_CONTEXT
        margin_fx = f"{RESERVE_HIDDEN_STATES} T h e + {OUTSIDE_BEYOND_CONTEXT / 2**30:.1f} GiB (fitted on an H200)"
    notes = assumptions(cfg, method, dname, device)
    if window.windowed(cfg, arch):
        notes.append(window.note(cfg, arch, device))
    if streamed is not None:
        notes.append(f"train.stream_base: {streamed.describe()} (hidden behind the compute where a layer computes "
                     "longer than its copy takes" + ("" if device == "cuda" else "; on a CPU device host and device "
                                                     "are one memory, so the two layers come on top") + ")")
    if gpus > 1:
        notes.append(f"per process of {gpus}: " + (
            "the frozen base sharded (train.shard_base, FSDP2), quantisation state whole on each" if shards > 1 else
            "data parallel, every process holds the whole model") + f"; gradients summed in buckets of up to "
            f"{ALLREDUCE_BUCKET // 2**20} MiB; the communication library's own buffers are not counted; host memory "
            "is each process's")
    return Estimate(method, device, comp, fx, {k: sum(v) for k, v in phases.items()}, peak_phase, notes, host, hfx,
                    levers(cfg, method, device), plan, margin, margin_fx, streamed)
