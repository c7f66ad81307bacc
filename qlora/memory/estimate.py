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
(train.stream_base: the device keeps two decoder layers of it, as `gathered_weights`, and the code tables), and the
process's own runtime. A plan that does not fit the host is no plan (qlora/memory/context.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from qlora.base.attention import by_document, cuda_kernel
from qlora.config import Config
from qlora.errors import ConfigError
from qlora.levers import LEVERS
from qlora.levers.checkpoints.memory import CheckpointPlan, checkpoint_plan
from qlora.levers.cpu_embeddings.memory import table_bytes
from qlora.levers.cpu_embeddings.settings import CPU_EMBEDDINGS
from qlora.levers.host_optimizer import memory as host_optimizer
from qlora.levers.host_optimizer.settings import HOST_OPTIMIZER
from qlora.levers.lm_head.settings import LM_HEAD
from qlora.levers.speed.memory import dequantised_bytes, kept_dequantised_bytes
from qlora.levers.speed.settings import DEQUANT_ONCE, REUSE_DEQUANT
from qlora.levers.stream_base.memory import StreamPlan, stream_plan
from qlora.levers.stream_base.settings import STREAM_BASE
from qlora.levers.tiling.settings import norms_tiled
from qlora.memory.activations import adapted_layers, eager, layer_backward, loss_bytes
from qlora.memory.arch import Arch

# NF4 with double quantisation (QLoRA paper, sec. 3): 4 bits per weight, one 8-bit absmax per block of 64 weights,
# and one fp32 absmax per 256 of those blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256
NF4_TABLES = 16 * 4 + 256 * 4 + 4  # per quantised layer: NF4 code, nested code (fp32) and the nested offset
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages a state buffer only for tensors of >= 1e5 elements (optimizer.py)
MIN_8BIT_NUMEL = 4096  # bitsandbytes keeps 32-bit state for smaller tensors (Optimizer2State, min_8bit_size)
# The CUDA context (driver, kernels, cuBLAS handles) that nvidia-smi counts beside PyTorch's memory; ~0.5 GiB is
# typical for CUDA 12 with lazy module loading. memory.json measures the real figure on each run.
CUDA_CONTEXT = 512 * 2**20
# What a CUDA PyTorch process holds in host memory of its own (libraries, the CUDA driver's host allocations, Python,
# the tokenizer and data): an allowance, not a measurement, until a GPU run records it (VmRSS in memory.json).
HOST_RUNTIME = 6 * 2**30
# The caching allocator's margin on CUDA (expandable segments): what it holds beyond the tensors at the peak, and what
# lives outside it beyond the CUDA context. The H200 measured the 70B recipe (issue 22) reserving 1.74 / 2.72 / 3.49 GiB
# more than it allocated at 29,696 / 46,592 / 58,368 tokens, 3.84 / 3.84 / 3.92 of the micro-batch's hidden states
# (T h e), and 0.39 / 0.43 / 0.46 GiB outside the allocator beyond the context. Fitted to those rows, not derived: the
# GPU battery's snapshot (python -m qlora.report.snapshot) is to say what the reserve is made of.
RESERVE_HIDDEN_STATES = 4
OUTSIDE_BEYOND_CONTEXT = 2**30 * 2 // 5  # 0.4 GiB
ALLOCATOR = (f"PyTorch's caching allocator reserves more than the tensors, and memory outside it grows beyond the "
             f"context: the allocator's margin, {RESERVE_HIDDEN_STATES} T h e + {OUTSIDE_BEYOND_CONTEXT / 2**30:.1f} "
             "GiB, fitted to the 70B recipe on an H200 at 30K-58K tokens with expandable segments (which qlora sets "
             "unless PYTORCH_CUDA_ALLOC_CONF says otherwise) and the norms untiled (their fp32 blocks, which "
             "train.tile_norms removes, may have made part of it), is counted beside the peak: a card must hold both")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ALLREDUCE_BUCKET = 25 * 2**20  # gradients summed at once across processes: qlora/training/distributed.py BUCKET_BYTES
CATEGORIES = ("quantized_weights", "unquantized_weights", "gathered_weights", "adapters", "gradients",
              "optimizer_state", "activations", "cuda_context")


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


def nf4_bytes(n: int, double_quant: bool = True, shards: int = 1, blocksize: int = NF4_BLOCK) -> int:
    """Packed 4-bit weights + 8-bit absmax per block of 64 (quant.blocksize) + fp32 absmax per 256 blocks + the code
    tables; without double quant, an fp32 absmax per block (4.5 bits per parameter at 64). `shards`: one process's
    part when the packed weights are sharded over that many (the quantisation state stays whole on each)."""
    blocks = math.ceil(n / blocksize)
    packed = math.ceil((n + 1) // 2 / shards)
    if not double_quant:
        return packed + 4 * blocks + 16 * 4
    return packed + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + NF4_TABLES


def kept_16bit(arch: Arch, names: list[str]) -> list[tuple[int, int]]:
    """(in_features, out_features) of each layer named in quant.keep_16bit, from its last name part."""
    shapes = arch.linear_shapes
    unknown = [name for name in names if name.rsplit(".", 1)[-1] not in shapes]
    if unknown:
        raise ConfigError(f"quant.keep_16bit names {unknown[0]}: the estimator knows the layers "
                          f"{', '.join(shapes)} of each decoder layer")
    return [shapes[name.rsplit(".", 1)[-1]] for name in names]


def trainable_tensors(arch: Arch, method: str, cfg: Config) -> list[int]:
    """Element counts of every trained tensor (the optimizer keeps state for each)."""
    if method == "full":
        per_layer = [a * b for a, b in arch.linear_shapes.values()] + [arch.hidden, arch.hidden]
        heads = [arch.vocab * arch.hidden] * (1 if arch.tied else 2)
        return per_layer * arch.layers + heads + [arch.hidden]
    r = cfg.lora.r
    return [n for a, b in adapted_layers(arch, cfg.lora.targets).values() for n in (r * a, r * b)] * arch.layers


@functools.lru_cache(maxsize=64)  # max_context asks thousands of times for the same adapters
def optimizer_bytes(sizes: tuple[int, ...], optimizer: str, e: int, device: str) -> tuple[int, int, int, str]:
    """(state bytes, the part paged into CUDA managed memory, temporaries of one step, formula)."""
    if optimizer == "adamw":  # torch: moments in the parameter dtype; foreach ops hold about one temporary per state
        return 2 * e * sum(sizes), 0, e * sum(sizes), "2 P_train e (torch AdamW: moments in the parameter dtype)"
    if optimizer == "paged_adamw_8bit":
        per = [2 * n + 8 * math.ceil(n / 256) if n >= MIN_8BIT_NUMEL else 8 * n for n in sizes]
        formula = "P_train (2 + 8/256) B (8-bit m and v, fp32 absmax per 256)"
    else:
        per = [8 * n for n in sizes]
        formula = "8 P_train (fp32 m and v)"
    paged = sum(b for n, b in zip(sizes, per, strict=True) if n >= PAGED_MIN_NUMEL) if device == "cuda" else 0
    # CUDA: one fused in-place kernel. CPU (bitsandbytes falls back to torch ops, backends/cpu/ops.py): the scaled
    # gradient, sqrt(v), the denominator and the update coexist for the largest tensor, in fp32; the 8-bit update
    # (_optimizer_update_8bit_blockwise_cpu) first dequantises m and v to fp32, 8 bytes per element more.
    largest = max(sizes)
    dequantised = 8 * largest if optimizer == "paged_adamw_8bit" and largest >= MIN_8BIT_NUMEL else 0
    transient = 0 if device == "cuda" else 12 * largest + dequantised + (8 * largest if e < 4 else 0)
    return sum(per), paged, transient, formula + (f"; {paged / 2**30:.2f} GiB of it paged" if paged else "")


@dataclass
class Tally:
    """What an estimate collects as it goes: device bytes and host bytes by category, each with its formula."""

    comp: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    fx: dict[str, str] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    hfx: dict[str, str] = field(default_factory=dict)
    streamed: StreamPlan | None = None


def estimate(cfg: Config, arch: Arch, method: str, device: str, gpus: int = 1) -> Estimate:
    """Peak bytes of one steady-state training step of `method` on `device` ("cuda" or "cpu"), on each of `gpus`
    processes: data parallel, or with train.shard_base (qlora and lora) the frozen base sharded over them; and on
    CUDA the host memory each process needs besides."""
    dname, e = compute_bytes(cfg, device)
    shards = gpus if gpus > 1 and cfg.train.shard_base and method != "full" else 1
    tally = Tally()
    count_weights(tally, cfg, arch, method, device, e, shards)
    sizes = tuple(trainable_tensors(arch, method, cfg))
    g, step_tmp = count_trained(tally, cfg, sizes, method, device, e)
    if gpus > 1:  # the gradients are summed across processes in buckets, each concatenated into one tensor
        step_tmp += min(sum(sizes) * g, ALLREDUCE_BUCKET)
    phases, plan = count_step(tally, cfg, arch, method, device, e, g, sum(sizes) * g, step_tmp)
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
                           "optimizer_step": f"P_train {'e' if g == e else 4}, all of them"}[peak_phase]
    margin, margin_fx = 0, ""
    if device == "cuda":
        comp["cuda_context"] = CUDA_CONTEXT
        fx["cuda_context"] = "0.5 GiB, typical of CUDA 12 (a measured run records the real one)"
        host["runtime"], hfx["runtime"] = HOST_RUNTIME, "6 GiB allowance for the process itself (not measured yet)"
        T = cfg.train.batch_size * cfg.data.max_seq_len
        margin = RESERVE_HIDDEN_STATES * T * arch.hidden * e + OUTSIDE_BEYOND_CONTEXT
        margin_fx = f"{RESERVE_HIDDEN_STATES} T h e + {OUTSIDE_BEYOND_CONTEXT / 2**30:.1f} GiB (fitted on an H200)"
    notes = assumptions(cfg, method, dname, device)
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


def count_weights(tally: Tally, cfg: Config, arch: Arch, method: str, device: str, e: int, shards: int) -> None:
    """The base's weights on the device: 4-bit layers (qlora) and the rest in the compute dtype, less what the levers
    keep elsewhere (an NF4 head, the embeddings on the host), each process's part when the base is sharded."""
    comp, fx, L, h, V = tally.comp, tally.fx, arch.layers, arch.hidden, arch.vocab
    head_nf4 = LM_HEAD.active(cfg, method, device) and not arch.tied
    emb_off = CPU_EMBEDDINGS.active(cfg, method, device)
    per = f" / {shards} (sharded)" if shards > 1 else ""
    if method == "qlora":
        q = cfg.quant
        dq, bs = q.double_quant, q.blocksize
        kept = kept_16bit(arch, q.keep_16bit)
        comp["quantized_weights"] = \
            L * sum(nf4_bytes(a * o, dq, shards, bs) for a, o in arch.linear_shapes.values()) + \
            (nf4_bytes(V * h, dq, shards, bs) if head_nf4 else 0) - \
            sum(nf4_bytes(a * o, dq, shards, bs) for a, o in kept)
        fx["quantized_weights"] = (f"P_lin (1/2{per} + 1/{bs} + 4/({bs}*256)) B, {4 + 8 / bs + 32 / bs / 256:.3f} "
                                   "bits/param unsharded, + 1.1 KB of code tables per layer" if dq else
                                   f"P_lin (1/2{per} + 4/{bs}) B = {4 + 32 / bs:.3f} bits/param unsharded (no double "
                                   "quant)") + (" (lm_head too)" if head_nf4 else "") + \
            (f", less the {len(kept)} layers kept in 16-bit" if kept else "")
        if STREAM_BASE.active(cfg, method, device):
            tally.streamed = stream_plan(L, arch.linear_shapes.values(), dq, bs, kept)
            if device == "cuda":  # the packed weights and absmax wait in host memory; two layers are gathered_weights
                tables = (L * len(arch.linear_shapes) - len(kept)) * (NF4_TABLES if dq else 16 * 4)
                comp["quantized_weights"] = tables + (nf4_bytes(V * h, dq, 1, bs) if head_nf4 else 0)
                fx["quantized_weights"] = "the code tables of every 4-bit weight (1.1 KB each; train.stream_base)" + \
                    (" + lm_head in NF4" if head_nf4 else "")
                tally.host["streamed_base"] = tally.streamed.host_bytes
                tally.hfx["streamed_base"] = (f"L x {tally.streamed.layer_bytes / 2**20:,.1f} MiB: every decoder "
                                              "layer's packed weights and absmax, pinned at their exact size")
        unquantized = arch.other_params - (V * h if head_nf4 else 0) - (V * h if emb_off else 0) + \
            sum(a * o for a, o in kept)
        fx["unquantized_weights"] = f"(V h {'' if arch.tied else 'x 2 '}+ (2L+1) h) e: embeddings, lm_head, norms" + \
            (" - V h e (lm_head in NF4)" if head_nf4 else "") + (" - V h e (embeddings on CPU)" if emb_off else "") + \
            (f" + {len(kept)} linear layers kept in 16-bit (quant.keep_16bit)" if kept else "")
    else:
        unquantized = arch.params - (V * h if emb_off else 0)
        fx["unquantized_weights"] = "P e: every weight" + (" - V h e (embeddings on CPU)" if emb_off else "")
    whole = V * h if shards > 1 and arch.tied else 0  # a tied table stays whole on every process
    comp["unquantized_weights"] = math.ceil((unquantized - whole) * e / shards) + whole * e + arch.buffer_bytes
    if shards > 1:
        fx["unquantized_weights"] = f"({fx['unquantized_weights']}){per}" + \
            (" (the tied embedding table whole)" if whole else "")
    once = method == "qlora" and DEQUANT_ONCE.active(cfg, method, device)
    if once:  # the dequantised copies, made by the first micro-batch and kept (qlora/levers/speed/fused.py)
        comp["unquantized_weights"] += kept_dequantised_bytes(arch.linear_shapes, arch.layers, e)
        fx["unquantized_weights"] += " + L P_layer e: every 4-bit layer dequantised once and kept (train.dequant_once)"
    if method == "qlora" and cfg.quant.keep_16bit_budget and not cfg.quant.keep_16bit:
        # The layers are chosen by measurement at load time; the budget bounds what they add.
        budget = cfg.quant.keep_16bit_budget
        comp["unquantized_weights"] += int(budget * (comp["quantized_weights"] + comp["unquantized_weights"]))
        fx["unquantized_weights"] += f" + at most {budget:g} x the base weights (quant.keep_16bit_budget)"
    if emb_off:
        tally.host["embeddings"], tally.hfx["embeddings"] = table_bytes(V, h, e), "V h e: the input embedding table"


def count_trained(tally: Tally, cfg: Config, sizes: tuple[int, ...], method: str, device: str,
                  e: int) -> tuple[int, int]:
    """What trains and its optimizer: adapters, optimizer state and fp32 masters, on the device or (optimizer_on_cpu)
    the host. Returns (bytes per gradient element, the update's temporaries)."""
    comp, fx, t = tally.comp, tally.fx, cfg.train
    if method != "full":
        comp["adapters"] = sum(sizes) * e
        fx["adapters"] = "L r sum(in + out of each adapted layer) e"
    state, _paged, step_tmp, state_fx = optimizer_bytes(sizes, t.optimizer, e, device)
    g = e  # bytes per gradient element
    masters = 0
    host_opt = HOST_OPTIMIZER.active(cfg, method, device)
    if e < 4 and (method != "full" or host_opt):
        # 16-bit adapters train through fp32 masters, gradients summed in fp32 (master.py); the host optimizer keeps
        # fp32 masters for every 16-bit weight, full fine-tuning's too (qlora/levers/host_optimizer/optimizer.py)
        g, masters = 4, 4 * sum(sizes)
    if host_opt:  # state, fp32 masters and the update in host memory; gradients summed on the card
        _, _, host_tmp, _ = optimizer_bytes(sizes, t.optimizer, 4, "cpu")
        tally.host["optimizer"] = host_optimizer.host_bytes(state, sum(sizes), host_tmp)
        tally.hfx["optimizer"] = f"{state_fx.split(';')[0]} {host_optimizer.FORMULA}"
        step_tmp, fx["optimizer_state"] = 0, "none on the device: train.optimizer_on_cpu"
    else:
        comp["optimizer_state"] = state + masters
        fx["optimizer_state"] = state_fx + (" + 4 P_train (fp32 master copies)" if masters else "")
    return g, step_tmp


def count_step(tally: Tally, cfg: Config, arch: Arch, method: str, device: str, e: int, g: int, grads: int,
               step_tmp: int) -> tuple[dict[str, tuple[int, int]], CheckpointPlan | None]:
    """The candidate peak moments of a step, each as (activation-side bytes, gradient bytes), and where the
    checkpointed layer inputs wait. zero_grad(set_to_none=True) frees gradients before each forward, so none exist
    in the loss's backward; they build up layer by layer after it. `g`: bytes per gradient element, `grads`: all of
    them."""
    t, L, h, fx = cfg.train, arch.layers, arch.hidden, tally.fx
    T = t.batch_size * cfg.data.max_seq_len
    g_fx = "e" if g == e else "4"
    saved, extra, layer_fx = layer_backward(arch, method, cfg, e, device, T)
    loss, loss_fx = loss_bytes(arch, method, cfg, e, device)
    # Every layer's inputs: the rotary tables and, for eager attention, the model's s x s mask in the compute dtype.
    s = cfg.data.max_seq_len
    rotary = 2 * s * arch.head_dim * e + (t.batch_size * s * s * e if eager(cfg) else 0)
    # The largest dequantised weight (a whole layer's with train.reuse_dequant), alive through a linear's backward;
    # none with train.dequant_once, whose copies are counted with the weights.
    dq_w = dequantised_bytes(arch.linear_shapes, REUSE_DEQUANT.active(cfg, method, device), e) \
        if method == "qlora" and not DEQUANT_ONCE.active(cfg, method, device) else 0
    phases = {"optimizer_step": (step_tmp, grads)}
    step_fx = "the update's temporaries (CPU: 12 B x the largest tensor)"
    if not t.gradient_checkpointing:
        phases["loss_backward"] = (L * saved + rotary + loss, 0)
        phases["layer_backward"] = (L * saved + extra + rotary + dq_w, grads // L)
        fx["activations"] = {"loss_backward": f"L layers' saved tensors + {loss_fx}",
                             "layer_backward": f"L layers' saved tensors + the last one's backward: {layer_fx}",
                             "optimizer_step": step_fx}
        return phases, None
    plan = checkpoint_plan(t, arch.layers, T * h * e, device)
    size = plan.input_bytes
    # At fp32 the recomputed layer's first norm keeps the layer input itself as its fp32 input: counted once. (A
    # tiled norm's input is not in `saved`: the layer's own terms leave it to the checkpoint plan.)
    work = saved - (4 * h * T if e == 4 and not norms_tiled(cfg, method, T) else 0) + extra
    # First layer of the backward: the inputs kept on the device beside the group being replayed, one layer's
    # gradients; last: its group's inputs, all gradients.
    first = (plan.device_inputs("first") * size + rotary + work + dq_w, grads // L)
    last = (plan.device_inputs("last") * size + rotary + work + dq_w, grads)
    phases["layer_backward"] = max(first, last, key=sum)
    phases["loss_backward"] = (plan.device_inputs("loss") * size + rotary + loss, 0)
    at_first = phases["layer_backward"] is first
    kept_fx = f"{plan.device_inputs('first' if at_first else 'last')} T h e (layer inputs: {plan.describe()})"
    fx["activations"] = {"loss_backward": f"{plan.device_inputs('loss')} T h e (layer inputs) + {loss_fx}",
                         "layer_backward": f"{kept_fx} + {layer_fx}" +
                                           (" + one dequantised weight" if method == "qlora" else "") +
                                           (" (the backward's first layer)" if at_first
                                            else " (its last layer: every gradient)"),
                         "optimizer_step": step_fx}
    fx["gradients"] = f"P_train {g_fx} / L: one layer's" if at_first else f"P_train {g_fx}, all of them"
    if plan.host:
        tally.host["checkpoints"] = plan.host_bytes
        tally.hfx["checkpoints"] = f"{plan.host} x T h e: offloaded layer inputs, pinned"
    return phases, plan


def gathered_bytes(cfg: Config, arch: Arch, method: str, e: int) -> dict[str, int]:
    """What a process holding 1/N of the base all-gathers at each candidate peak: two decoder layers in their
    backward (FSDP prefetches the next while one computes), the (untied) head in the loss."""
    linear = sum(a * o for a, o in arch.linear_shapes.values())
    layer = (sum((a * o + 1) // 2 for a, o in arch.linear_shapes.values()) if method == "qlora" else linear * e) + \
        2 * arch.hidden * e
    head_nf4 = method == "qlora" and getattr(cfg.quant, "quantize_lm_head", False)
    head = 0 if arch.tied else ((arch.vocab * arch.hidden + 1) // 2 if head_nf4 else arch.vocab * arch.hidden * e)
    return {"layer_backward": 2 * layer, "loss_backward": head}


def levers(cfg: Config, method: str, device: str) -> list[str]:
    """The memory levers this estimate counts, each as its lever says what it does (where the layer inputs wait is
    the checkpoint plan's to say: `Estimate.checkpoints`), and the 8-bit optimizer's moments."""
    out = [lever.effect(cfg, method) for lever in LEVERS
           if lever.kind == "memory" and lever.active(cfg, method, device)]
    if cfg.train.optimizer == "paged_adamw_8bit":
        out.append("paged_adamw_8bit: 8-bit moments")
    return out


def attention_text(cfg: Config, device: str) -> str:
    """How the estimate takes attention: which kernel and what it stores."""
    if eager(cfg):
        return "eager attention: every head's s x s scores stored, in fp32"
    kernel = {"flash": "FlashAttention-2's, which writes dk and dv at every query head first",
              "cudnn": "cuDNN's, which sums dk and dv over the group in the kernel"}
    if by_document(cfg):
        return "attention through SDPA, packed rows one document at a time, no T x T mask (qlora/base/attention.py)" + \
            ("; its backward's buffers FlashAttention-2's, which runs the documents" if device == "cuda" else "")
    chosen = cuda_kernel(cfg)
    why = f"model.sdpa_backend={chosen}" if cfg.model.sdpa_backend != "auto" else \
        "torch's choice on this machine's card" if chosen == "cudnn" else "torch's on a card other than an " \
        "H100/H200/B200, and the larger of the two where no card is at hand"
    return f"attention through SDPA, no s x s matrix stored; its backward's buffers {kernel[chosen]} ({why})" \
        if device == "cuda" else "attention through SDPA's flash kernel, no s x s matrix stored"


def assumptions(cfg: Config, method: str, dname: str, device: str) -> list[str]:
    t, cuda = cfg.train, device == "cuda"
    optimizer = {"adamw": "torch AdamW (moments in the parameter dtype)",
                 "paged_adamw_8bit": "bitsandbytes paged AdamW with 8-bit moments",
                 "paged_adamw_32bit": "bitsandbytes paged AdamW with fp32 moments"}[t.optimizer]
    adapters = f"adapters and their gradients in {dname}" if dname == "fp32" else \
        f"adapters in {dname}, with fp32 master copies and fp32 gradients (qlora/adapters/master.py)"
    out = [{"full": f"every weight and its gradient in {dname}; {optimizer}; no fp32 master copy (as qlora.train "
                    "runs it: mixed-precision trainers that keep one add 4 bytes per parameter)",
            "lora": f"frozen base in {dname}; {adapters}; {optimizer} over the adapters",
            "qlora": f"linear layers in {cfg.quant.quant_type.upper()}"
                     f"{' with double quant' if cfg.quant.double_quant else ''} in blocks of {cfg.quant.blocksize}"
                     f"{', 4.127 bits per parameter (QLoRA paper, sec. 3)' if cfg.quant.blocksize == 64 else ''}"
                     f"{kept_text(cfg, dname)}; embeddings, lm_head, norms in {dname}; {adapters}; {optimizer} "
                     "over the adapters"}[method],
           f"batch {t.batch_size} x {cfg.data.max_seq_len} tokens, every position a target (the worst case: chat "
           "data trains on assistant tokens only)",
           "gradient checkpointing: each layer is recomputed in the backward from its input, kept or replayed "
           "(where the inputs wait: the checkpoint plan)" if t.gradient_checkpointing
           else "no gradient checkpointing: every layer keeps its activations",
           f"loss over {f'chunks of {t.loss_chunk_size}' if t.loss_chunk_size else 'all'} positions, fp32 logits; "
           + attention_text(cfg, device)]
    if t.tile_size and method != "full":
        out.append(f"sequence tiles of {t.tile_size} tokens: one tile's intermediates at a time, the module's input "
                   "at full length (qlora/levers/tiling/tiles.py)")
    if device == "cpu":
        out.append("CPU: weights and compute in fp32 unless quant.compute_dtype says otherwise (checked against "
                   "measurements in fp32; bf16 kernels' own fp32 buffers are not modelled); bitsandbytes pages "
                   "optimizer state only on CUDA; the CUDA-only levers (offload_activations, optimizer_on_cpu, "
                   "embeddings_on_cpu) change nothing here")
    elif t.optimizer_on_cpu:
        out.append("CUDA: the optimizer state, the fp32 masters and the update in host memory, the fp32 gradients "
                   f"summed on the card (train.optimizer_on_cpu); {ALLOCATOR}")
    else:
        out.append("CUDA: paged optimizer state counted as resident on the GPU (it moves to CPU memory only under "
                   f"pressure); {ALLOCATOR}")
    if cuda:
        out.append(f"host: {HOST_RUNTIME / 2**30:.0f} GiB allowed for the process itself and the OS, beside what the "
                   "levers keep there (offloaded layer inputs pinned at their exact size, the optimizer, the "
                   "embedding table)")
    return out


def kept_text(cfg: Config, dname: str) -> str:
    """The assumption about layers kept in 16-bit, if any."""
    if cfg.quant.keep_16bit:
        return f", but {len(cfg.quant.keep_16bit)} kept in {dname} (quant.keep_16bit)"
    if cfg.quant.keep_16bit_budget:
        return (f", but those chosen by quant.keep_16bit_budget={cfg.quant.keep_16bit_budget:g} in {dname}, counted "
                "at the full budget")
    return ""
