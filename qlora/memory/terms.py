"""The estimate's terms, each with its formula: the base's weights on the device (4-bit layers, the rest in the compute
dtype, each process's part of a sharded base), what trains and its optimizer, and the candidate peak moments of a step;
with the CUDA context, the host's allowance and the allocator's margin that a CUDA run adds. Symbols as in estimate.py;
estimate.py adds them up at the step's peak.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from qlora.base.attention import by_document
from qlora.config import Config
from qlora.errors import ConfigError
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
from qlora.memory import window
from qlora.memory.activations import adapted_layers, eager, layer_backward, loss_bytes
from qlora.memory.arch import Arch

# NF4 with double quantisation (QLoRA paper, sec. 3): 4 bits per weight, one 8-bit absmax per block of 64 weights,
# and one fp32 absmax per 256 of those blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256
NF4_TABLES = 16 * 4 + 256 * 4 + 4  # per quantised layer: NF4 code, nested code (fp32) and the nested offset
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages a state buffer only for tensors of >= 1e5 elements (optimizer.py)
MIN_8BIT_NUMEL = 4096  # bitsandbytes keeps 32-bit state for smaller tensors (Optimizer2State, min_8bit_size)
# The 8-bit state's signed and unsigned dynamic maps, 256 fp32 values each, shared by every tensor on the device
# (bitsandbytes Optimizer8bit.fill_qmap)
QMAPS = 2 * 256 * 4
# The CUDA context (driver, kernels, cuBLAS handles) that nvidia-smi counts beside PyTorch's memory; ~0.5 GiB is
# typical for CUDA 12 with lazy module loading. memory.json measures the real figure on each run.
CUDA_CONTEXT = 512 * 2**20
# What a CUDA PyTorch process holds in host memory of its own (libraries, the CUDA driver's host allocations, Python,
# the tokenizer; the tokenised rows are a term of their own, rows.py): an allowance, not a measurement, until a GPU run
# records it (VmRSS in memory.json).
HOST_RUNTIME = 6 * 2**30
# The caching allocator's margin on CUDA (expandable segments): what it holds beyond the tensors at the peak, and what
# lives outside it beyond the CUDA context. The H200 measured the 70B recipe (issue 22) reserving 1.74 / 2.72 / 3.49 GiB
# more than it allocated at 29,696 / 46,592 / 58,368 tokens, 3.84 / 3.84 / 3.92 of the micro-batch's hidden states
# (T h e), and 0.39 / 0.43 / 0.46 GiB outside the allocator beyond the context. Fitted to those rows, not derived: the
# GPU battery's snapshot (python -m qlora.report.snapshot) is to say what the reserve is made of.
RESERVE_HIDDEN_STATES = 4
OUTSIDE_BEYOND_CONTEXT = 2**30 * 2 // 5  # 0.4 GiB
ALLREDUCE_BUCKET = 25 * 2**20  # gradients summed at once across processes: qlora/training/distributed.py BUCKET_BYTES
CATEGORIES = ("quantized_weights", "unquantized_weights", "gathered_weights", "adapters", "gradients",
              "optimizer_state", "activations", "cuda_context")


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
        per_layer = [a * b for a, b in arch.linear_shapes.values()] + [arch.hidden, arch.hidden] + \
            ([arch.layer_extra] if arch.layer_extra else [])  # biases, extra norms: small, counted as one tensor
        heads = [arch.vocab * arch.hidden] * (1 if arch.tied else 2)
        return per_layer * arch.layers + heads + [arch.hidden]
    r = cfg.lora.r
    return [n for a, b in adapted_layers(arch, cfg.lora.targets).values() for n in (r * a, r * b)] * arch.layers


@functools.lru_cache(maxsize=64)  # max_context asks thousands of times for the same adapters
def optimizer_bytes(sizes: tuple[int, ...], optimizer: str, e: int, device: str,
                    stepped: int = 0) -> tuple[int, int, int, str]:
    """(state bytes, the part paged into CUDA managed memory, temporaries of one step, formula). `stepped`: bytes per
    element of what the optimizer steps where not `e`: 4 for 16-bit adapters' fp32 masters."""
    if optimizer == "adamw":  # torch: moments in the dtype of what it steps; foreach ops hold ~one temporary per state
        s = stepped or e
        counts = 4 * len(sizes) if device == "cpu" else 0  # each tensor's step, an fp32 scalar kept on the host
        return 2 * s * sum(sizes) + counts, 0, s * sum(sizes), \
            f"2 P_train {'4' if s != e else 'e'} (torch AdamW: moments in the stepped parameters' dtype)"
    maps = 0
    if optimizer == "paged_adamw_8bit":
        per = [2 * n + 8 * math.ceil(n / 256) if n >= MIN_8BIT_NUMEL else 8 * n for n in sizes]
        maps = QMAPS if max(sizes) >= MIN_8BIT_NUMEL else 0
        formula = "P_train (2 + 8/256) B (8-bit m and v, fp32 absmax per 256) + 2 KB of maps"
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
    return sum(per) + maps, paged, transient, formula + (f"; {paged / 2**30:.2f} GiB of it paged" if paged else "")


@dataclass
class Tally:
    """What an estimate collects as it goes: device bytes and host bytes by category, each with its formula."""

    comp: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    fx: dict[str, str] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    hfx: dict[str, str] = field(default_factory=dict)
    streamed: StreamPlan | None = None


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
        fx["unquantized_weights"] = f"(V h {'' if arch.tied else 'x 2 '}+ (2L+1) h" + \
            (f" + L x {arch.layer_extra:,}" if arch.layer_extra else "") + ") e: embeddings, lm_head, norms" + \
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
                  e: int, gpus: int = 1) -> tuple[int, int, bool]:
    """What trains and its optimizer: adapters, optimizer state and fp32 masters, on the device or (optimizer_on_cpu)
    the host. Returns (bytes per gradient element, the update's temporaries, whether the gradients leave the device
    as the backward sums them)."""
    comp, fx, t = tally.comp, tally.fx, cfg.train
    if method != "full":
        comp["adapters"] = sum(sizes) * e
        fx["adapters"] = "L r sum(in + out of each adapted layer) e"
    g = e  # bytes per gradient element
    masters = 0
    host_opt = HOST_OPTIMIZER.active(cfg, method, device)
    if e < 4 and (method != "full" or host_opt):
        # 16-bit adapters train through fp32 masters, gradients summed in fp32 (master.py); the host optimizer keeps
        # fp32 masters for every 16-bit weight, full fine-tuning's too (qlora/levers/host_optimizer/optimizer.py)
        g, masters = 4, 4 * sum(sizes)
    state, _paged, step_tmp, state_fx = optimizer_bytes(sizes, t.optimizer, e, device, 4 if masters else 0)
    # One process's 16-bit gradients go to the host as they are summed (several sum theirs on the card first)
    staged = host_opt and e < 4 and gpus == 1
    if host_opt:  # state, fp32 masters and the update in host memory
        _, _, host_tmp, _ = optimizer_bytes(sizes, t.optimizer, 4, "cpu")
        tally.host["optimizer"] = host_optimizer.host_bytes(state, sum(sizes), host_tmp, e if staged else 0)
        tally.hfx["optimizer"] = f"{state_fx.split(';')[0]} {host_optimizer.FORMULA}" + \
            (f" {host_optimizer.STAGED_FORMULA}" if staged else "")
        step_tmp, fx["optimizer_state"] = 0, "none on the device: train.optimizer_on_cpu"
    else:
        comp["optimizer_state"] = state + masters
        fx["optimizer_state"] = state_fx + (" + 4 P_train (fp32 master copies)" if masters else "")
    return (e, step_tmp, True) if staged else (g, step_tmp, False)


def count_step(tally: Tally, cfg: Config, arch: Arch, method: str, device: str, e: int, g: int, grads: int,
               step_tmp: int, staged: bool = False) -> tuple[dict[str, tuple[int, int]], CheckpointPlan | None]:
    """The candidate peak moments of a step, each as (activation-side bytes, gradient bytes), and where the
    checkpointed layer inputs wait. zero_grad(set_to_none=True) frees gradients before each forward, so none exist
    in the loss's backward; they build up layer by layer after it, or (`staged`, count_trained) leave for the host
    as each is summed, one layer's at most on the device. `g`: bytes per gradient element, `grads`: all of them."""
    t, L, h, fx = cfg.train, arch.layers, arch.hidden, tally.fx
    T = t.batch_size * cfg.data.max_seq_len
    g_fx = "e" if g == e else "4"
    saved, extra, layer_fx = layer_backward(arch, method, cfg, e, device, T)
    loss, loss_fx = loss_bytes(arch, method, cfg, e, device)
    # Every layer's inputs: the rotary tables and, for eager attention, the model's s x s mask in the compute dtype;
    # through SDPA with a sliding window shorter than the row, the blocks' mask, kept (qlora/memory/window.py).
    s, masked = cfg.data.max_seq_len, window.windowed(cfg, arch)
    rotary = 2 * s * arch.head_dim * e + (t.batch_size * s * s * e if eager(cfg) else 0) + \
        (window.mask_bytes(arch, e) if masked else 0)
    mask_fx = f" + {window.MASK_FORMULA}" if masked else ""
    # The largest dequantised weight (a whole layer's with train.reuse_dequant), alive through a linear's backward;
    # none with train.dequant_once, whose copies are counted with the weights.
    dq_w = dequantised_bytes(arch.linear_shapes, REUSE_DEQUANT.active(cfg, method, device), e) \
        if method == "qlora" and not DEQUANT_ONCE.active(cfg, method, device) else 0
    held = grads // arch.layers if staged else grads  # on the device at the backward's end
    phases = {"optimizer_step": (step_tmp, 0 if staged else grads)}
    step_fx = "the update's temporaries (CPU: 12 B x the largest tensor)"
    if not t.gradient_checkpointing:
        # `saved` is a windowed layer's where any is: the layers attending to the whole row keep less.
        every = L * saved - ((L - arch.windowed_layers) * window.layer_bytes(cfg, arch, e, device, by_document(cfg))
                             if masked else 0)
        phases["loss_backward"] = (every + rotary + loss, 0)
        phases["layer_backward"] = (every + extra + rotary + dq_w, grads // L)  # staged or not
        fx["activations"] = {"loss_backward": f"L layers' saved tensors + {loss_fx}{mask_fx}",
                             "layer_backward": f"L layers' saved tensors + the last one's backward: {layer_fx}"
                                               f"{mask_fx}",
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
    last = (plan.device_inputs("last") * size + rotary + work + dq_w, held)
    phases["layer_backward"] = max(first, last, key=sum)
    phases["loss_backward"] = (plan.device_inputs("loss") * size + rotary + loss, 0)
    at_first = phases["layer_backward"] is first
    kept_fx = f"{plan.device_inputs('first' if at_first else 'last')} T h e (layer inputs: {plan.describe()})"
    fx["activations"] = {"loss_backward": f"{plan.device_inputs('loss')} T h e (layer inputs) + {loss_fx}{mask_fx}",
                         "layer_backward": f"{kept_fx}{mask_fx} + {layer_fx}" +
                                           (" + one dequantised weight" if method == "qlora" else "") +
                                           (" (the backward's first layer)" if at_first
                                            else " (its last layer)" if staged
                                            else " (its last layer: every gradient)"),
                         "optimizer_step": step_fx}
    fx["gradients"] = f"P_train {g_fx} / L: one layer's" + (", on its way to the host" if staged else "") \
        if at_first or staged else f"P_train {g_fx}, all of them"
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
