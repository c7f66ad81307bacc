"""Predict the peak memory of a training step from the model's config.json and the recipe, before any weight exists.

Three methods for the same model, batch and sequence length:

    full   every weight trains: weights + gradients + AdamW's two moments, all per parameter
    lora   frozen 16-bit base + LoRA adapters on the targeted linear layers
    qlora  frozen NF4 base with double quantisation + the same adapters

Symbols: L layers, h hidden, i intermediate, nh heads, q = nh*hd and kv = nkv*hd attention widths, V vocabulary,
b batch, s sequence length, T = b*s tokens, N = b*(s-1) predicted positions, e bytes per element of the compute dtype
(bf16 on CUDA, fp32 on CPU; the model is loaded in it, so unquantised weights take e bytes too).

Several processes (`gpus` > 1, qlora/distributed.py), per process: data parallel holds everything one process does,
plus one bucket of gradients being summed; `train.shard_base` holds 1/gpus of the frozen base (packed 4-bit weights,
embeddings, head, norms; the quantisation state and a tied embedding table whole), plus what FSDP all-gathers for the
moment: two decoder layers in the backward (the one computing and the one prefetched), the head in the loss.

The activation formulas count what autograd saves in a Llama-style decoder layer (pre-norm RMSNorm, GQA attention
through an SDPA flash/efficient kernel, gated MLP); they were checked tensor by tensor against torch's saved-tensor
hooks on the tiny Llama in fp32 and bf16, with and without LoRA dropout, for all three methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qlora.config import Config, ConfigError
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
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ALLREDUCE_BUCKET = 25 * 2**20  # gradients summed at once across processes: qlora/distributed.py BUCKET_BYTES
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

    @property
    def peak_bytes(self) -> int:
        return sum(self.components.values())


def compute_bytes(cfg: Config, device: str) -> tuple[str, int]:
    """(name, bytes per element) of the compute dtype: mirrors qlora.model.compute_dtype without importing torch."""
    name = cfg.quant.compute_dtype
    if name == "auto":
        name = "bf16" if device == "cuda" else "fp32"
    return name, DTYPE_BYTES[name]


def adapted_layers(arch: Arch, targets: list[str]) -> dict[str, tuple[int, int]]:
    shapes = arch.linear_shapes
    if targets == ["all-linear"]:
        return shapes
    chosen = {name: shape for name, shape in shapes.items() if name in targets}
    if not chosen:
        raise ConfigError(f"lora.targets={','.join(targets)}: the estimator knows all-linear and {', '.join(shapes)}")
    return chosen


def nf4_bytes(n: int, double_quant: bool = True, shards: int = 1) -> int:
    """Packed 4-bit weights + 8-bit absmax per 64 + fp32 absmax per 256 blocks + the code tables; without double
    quant, an fp32 absmax per 64 (4.5 bits per parameter). `shards`: one process's part when the packed weights are
    sharded over that many (the quantisation state stays whole on each)."""
    blocks = math.ceil(n / NF4_BLOCK)
    packed = math.ceil((n + 1) // 2 / shards)
    if not double_quant:
        return packed + 4 * blocks + 16 * 4
    return packed + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + NF4_TABLES


def trainable_tensors(arch: Arch, method: str, cfg: Config) -> list[int]:
    """Element counts of every trained tensor (the optimizer keeps state for each)."""
    if method == "full":
        per_layer = [a * b for a, b in arch.linear_shapes.values()] + [arch.hidden, arch.hidden]
        heads = [arch.vocab * arch.hidden] * (1 if arch.tied else 2)
        return per_layer * arch.layers + heads + [arch.hidden]
    r = cfg.lora.r
    return [n for a, b in adapted_layers(arch, cfg.lora.targets).values() for n in (r * a, r * b)] * arch.layers


def optimizer_bytes(sizes: list[int], optimizer: str, e: int, device: str) -> tuple[int, int, int, str]:
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
    # gradient, sqrt(v), the denominator and the update coexist for the largest tensor, in fp32.
    largest = max(sizes)
    transient = 0 if device == "cuda" else 12 * largest + (8 * largest if e < 4 else 0)
    return sum(per), paged, transient, formula + (f"; {paged / 2**30:.2f} GiB of it paged" if paged else "")


def layer_bytes_per_token(arch: Arch, method: str, cfg: Config, e: int) -> tuple[int, str]:
    """Bytes autograd saves per token in one decoder layer, and the formula."""
    h, i, q = arch.hidden, arch.intermediate, arch.heads * arch.head_dim
    kv = arch.kv_heads * arch.head_dim
    adapted = arch.linear_shapes if method == "full" else adapted_layers(arch, cfg.lora.targets)
    # A frozen layer's input is saved only where a trained weight needs it (q/k/v share one, gate/up another).
    y1 = any(n in adapted for n in ("q_proj", "k_proj", "v_proj"))
    y2 = any(n in adapted for n in ("gate_proj", "up_proj"))
    # q and out of attention, k and v, the normed inputs, the MLP's gate, up, act(gate) and product (kept for down),
    # the two fp32 norm inputs (at fp32 one is the layer input itself), SDPA's logsumexp and the norms' rsqrt.
    per_token = e * (2 * q + 2 * kv + h * (y1 + y2) + i * (3 + ("down_proj" in adapted))) + 8 * h + 4 * arch.heads + 8
    formula = "e(2q + 2kv + 2h + 4i) + 8h + 4nh + 8"
    if method == "full":  # the norms' weights train: each keeps its normalised input
        return per_token + 2 * h * e, formula + " + 2he"
    per_token += len(adapted) * cfg.lora.r * e
    formula += " + r e per adapter"
    if cfg.lora.dropout > 0:  # dropout keeps its output and a bool mask for each adapter
        per_token += sum(a for a, _ in adapted.values()) * (e + 1)
        formula += " + in_features (e+1) per adapter (dropout)"
    return per_token, formula


def loss_bytes(arch: Arch, method: str, cfg: Config, e: int, device: str) -> tuple[int, str]:
    """Bytes alive beyond the layers in the loss's backward (final norm, labels, logits), and the formula."""
    b, s, t = cfg.train.batch_size, cfg.data.max_seq_len, cfg.train
    T, N, h, V = b * s, b * (s - 1), arch.hidden, arch.vocab
    # The final norm's fp32 input and rsqrt; the labels (int64) and their mask.
    total, formula = T * (4 * h + 4) + 9 * N, "T(4h + 4) + 9N"
    if getattr(t, "liger_ce", False) and device == "cuda":  # fused: chunks of ~T*h/V tokens' logits, input grads
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(N / math.ceil(V / h)))))
        return total + 2 * chunk * V * e + N * h * e, formula + f" + 2 c V e + N h e (liger chunks of c={chunk})"
    n = min(N, t.loss_chunk_size) if t.loss_chunk_size > 0 else N
    # Log-softmax keeps fp32 log-probs; its backward holds them with the incoming and outgoing fp32 gradients.
    total += 12 * n * V
    formula += f" + 12 {'min(N, chunk)' if t.loss_chunk_size > 0 else 'N'} V"
    if method == "full" or t.loss_chunk_size > 0:  # lm_head's input: its weight gradient, or the chunks, keep it
        total, formula = total + N * h * e, formula + " + N h e"
    if method == "full":
        total, formula = total + T * h * e, formula + " + T h e"
    if getattr(cfg.quant, "quantize_lm_head", False) and method == "qlora":  # the NF4 head, dequantised to compute
        total, formula = total + V * h * e, formula + " + V h e (NF4 head dequantised)"
    return total, formula


def estimate(cfg: Config, arch: Arch, method: str, device: str, gpus: int = 1) -> Estimate:
    """Peak bytes of one steady-state training step of `method` on `device` ("cuda" or "cpu"), on each of `gpus`
    processes: data parallel, or with train.shard_base (qlora and lora) the frozen base sharded over them."""
    dname, e = compute_bytes(cfg, device)
    t, L, h, V = cfg.train, arch.layers, arch.hidden, arch.vocab
    T = t.batch_size * cfg.data.max_seq_len
    comp, fx = dict.fromkeys(CATEGORIES, 0), {}
    head_nf4 = method == "qlora" and getattr(cfg.quant, "quantize_lm_head", False) and not arch.tied
    emb_off = method != "full" and device == "cuda" and getattr(cfg.model, "embeddings_on_cpu", False)
    shards = gpus if gpus > 1 and getattr(t, "shard_base", False) and method != "full" else 1
    per = f" / {shards} (sharded)" if shards > 1 else ""
    if method == "qlora":
        dq = cfg.quant.double_quant
        comp["quantized_weights"] = L * sum(nf4_bytes(a * o, dq, shards) for a, o in arch.linear_shapes.values()) + \
            (nf4_bytes(V * h, dq, shards) if head_nf4 else 0)
        fx["quantized_weights"] = (f"P_lin (1/2{per} + 1/64 + 4/(64*256)) B, 4.127 bits/param unsharded, + 1.1 KB of "
                                   "code tables per layer" if dq else f"P_lin (1/2{per} + 4/64) B = 4.5 bits/param "
                                   "unsharded (no double quant)") + (" (lm_head too)" if head_nf4 else "")
        unquantized = arch.other_params - (V * h if head_nf4 else 0) - (V * h if emb_off else 0)
        fx["unquantized_weights"] = f"(V h {'' if arch.tied else 'x 2 '}+ (2L+1) h) e: embeddings, lm_head, norms" + \
            (" - V h e (lm_head in NF4)" if head_nf4 else "") + (" - V h e (embeddings on CPU)" if emb_off else "")
    else:
        unquantized = arch.params - (V * h if emb_off else 0)
        fx["unquantized_weights"] = "P e: every weight" + (" - V h e (embeddings on CPU)" if emb_off else "")
    whole = V * h if shards > 1 and arch.tied else 0  # a tied table stays whole on every process
    comp["unquantized_weights"] = math.ceil((unquantized - whole) * e / shards) + whole * e + arch.buffer_bytes
    if shards > 1:
        fx["unquantized_weights"] = f"({fx['unquantized_weights']}){per}" + \
            (" (the tied embedding table whole)" if whole else "")
    sizes = trainable_tensors(arch, method, cfg)
    if method != "full":
        comp["adapters"] = sum(sizes) * e
        fx["adapters"] = "L r sum(in + out of each adapted layer) e"
    comp["optimizer_state"], _paged, step_tmp, fx["optimizer_state"] = optimizer_bytes(sizes, t.optimizer, e, device)
    g = e  # bytes per gradient element
    if method != "full" and e < 4:  # 16-bit adapters train through fp32 masters, gradients summed in fp32 (master.py)
        g = 4
        comp["optimizer_state"] += 4 * sum(sizes)
        fx["optimizer_state"] += " + 4 P_train (fp32 master copies)"
    grads = sum(sizes) * g

    # Candidate peak moments: (activation-side bytes, gradient bytes). zero_grad(set_to_none=True) frees gradients
    # before each forward, so none exist in the loss's backward; they build up layer by layer after it.
    per_token, layer_fx = layer_bytes_per_token(arch, method, cfg, e)
    loss, loss_fx = loss_bytes(arch, method, cfg, e, device)
    rotary = 2 * cfg.data.max_seq_len * arch.head_dim * e
    if gpus > 1:  # the gradients are summed across processes in buckets, each concatenated into one tensor
        step_tmp += min(grads, ALLREDUCE_BUCKET)
    phases = {"optimizer_step": (step_tmp, grads)}
    if t.gradient_checkpointing:
        offload = t.offload_activations and device == "cuda"  # layer inputs wait in pinned CPU memory
        kept = (2 if offload else L) * T * h * e + rotary
        kept_fx = "2 T h e (the rest offloaded to CPU)" if offload else "L T h e"
        # Backward through one recomputed layer: its saved tensors (at fp32 the first norm's input is the checkpoint
        # itself), the gradients of its output and input, two MLP gradients at once, and for qlora one weight
        # dequantised to the compute dtype (a whole layer's with train.reuse_dequant).
        largest = max(a * o for a, o in arch.linear_shapes.values())
        dq = (sum(a * o for a, o in arch.linear_shapes.values()) if getattr(t, "reuse_dequant", False) else largest)
        work = T * per_token - (4 * h * T if e == 4 else 0) + 2 * T * h * e + 2 * T * arch.intermediate * e + \
            (dq * e if method == "qlora" else 0)
        # First layer of the backward: every checkpoint, one layer's gradients; last: one checkpoint, all gradients.
        first, last = (kept + work, grads // L), (T * h * e + rotary + work, grads)
        phases["layer_backward"] = max(first, last, key=sum)
        phases["loss_backward"] = (kept + loss, 0)
        at_first = phases["layer_backward"] is first
        fx["activations"] = {"loss_backward": f"{kept_fx} (checkpoints) + {loss_fx}",
                             "layer_backward": f"{kept_fx if at_first else 'T h e'} + T [{layer_fx}] + 2 T h e + "
                                               "2 T i e" + (" + one dequantised weight" if method == "qlora" else "")
                                               + (" (the backward's first layer: every checkpoint)" if at_first
                                                  else " (its last layer: one checkpoint, every gradient)"),
                             "optimizer_step": "the update's temporaries (CPU: 12 B x the largest tensor)"}
        fx["gradients"] = f"P_train {'e' if g == e else 4} / L: one layer's" if at_first else \
            f"P_train {'e' if g == e else 4}, all of them"
    else:
        phases["loss_backward"] = (L * T * per_token + rotary + loss, 0)
        fx["activations"] = {"loss_backward": f"L T [{layer_fx}] + {loss_fx}",
                             "optimizer_step": "the update's temporaries (CPU: 12 B x the largest tensor)"}
    gathered = gathered_bytes(cfg, arch, method, e) if shards > 1 else {}
    phases = {k: (v[0] + gathered.get(k, 0), v[1]) for k, v in phases.items()}  # peaks compared with them in
    peak_phase = max(phases, key=lambda k: sum(phases[k]))
    comp["gathered_weights"] = gathered.get(peak_phase, 0)
    comp["activations"] = phases[peak_phase][0] - comp["gathered_weights"]
    comp["gradients"] = phases[peak_phase][1]
    if comp["gathered_weights"]:
        fx["gathered_weights"] = ("two decoder layers whole (FSDP: the one in its backward, the next prefetched)"
                                  if peak_phase == "layer_backward" else "the head whole (FSDP), for the loss")
    fx["activations"] = f"at {peak_phase}: {fx['activations'][peak_phase]}"
    if peak_phase != "layer_backward":
        fx["gradients"] = {"loss_backward": "none yet: freed before the forward",
                           "optimizer_step": f"P_train {'e' if g == e else 4}, all of them"}[peak_phase]
    if device == "cuda":
        comp["cuda_context"] = CUDA_CONTEXT
        fx["cuda_context"] = "0.5 GiB, typical of CUDA 12 (a measured run records the real one)"
    notes = assumptions(cfg, method, dname, device)
    if gpus > 1:
        notes.append(f"per process of {gpus}: " + (
            "the frozen base sharded (train.shard_base, FSDP2), quantisation state whole on each" if shards > 1 else
            "data parallel, every process holds the whole model") + f"; gradients summed in buckets of up to "
            f"{ALLREDUCE_BUCKET // 2**20} MiB; the communication library's own buffers are not counted")
    return Estimate(method, device, comp, fx, {k: sum(v) for k, v in phases.items()}, peak_phase, notes)


def gathered_bytes(cfg: Config, arch: Arch, method: str, e: int) -> dict[str, int]:
    """What a process holding 1/N of the base all-gathers at each candidate peak: two decoder layers in their
    backward (FSDP prefetches the next while one computes), the (untied) head in the loss."""
    linear = sum(a * o for a, o in arch.linear_shapes.values())
    layer = (sum((a * o + 1) // 2 for a, o in arch.linear_shapes.values()) if method == "qlora" else linear * e) + \
        2 * arch.hidden * e
    head_nf4 = method == "qlora" and getattr(cfg.quant, "quantize_lm_head", False)
    head = 0 if arch.tied else ((arch.vocab * arch.hidden + 1) // 2 if head_nf4 else arch.vocab * arch.hidden * e)
    return {"layer_backward": 2 * layer, "loss_backward": head}


def assumptions(cfg: Config, method: str, dname: str, device: str) -> list[str]:
    t = cfg.train
    optimizer = {"adamw": "torch AdamW (moments in the parameter dtype)",
                 "paged_adamw_8bit": "bitsandbytes paged AdamW with 8-bit moments",
                 "paged_adamw_32bit": "bitsandbytes paged AdamW with fp32 moments"}[t.optimizer]
    adapters = f"adapters and their gradients in {dname}" if dname == "fp32" else \
        f"adapters in {dname}, with fp32 master copies and fp32 gradients (qlora/master.py)"
    out = [{"full": f"every weight and its gradient in {dname}; {optimizer}; no fp32 master copy (as qlora.train "
                    "runs it: mixed-precision trainers that keep one add 4 bytes per parameter)",
            "lora": f"frozen base in {dname}; {adapters}; {optimizer} over the adapters",
            "qlora": f"linear layers in NF4 with double quant, 4.127 bits per parameter (QLoRA paper, sec. 3); "
                     f"embeddings, lm_head, norms in {dname}; {adapters}; {optimizer} over the adapters"}[method],
           f"batch {t.batch_size} x {cfg.data.max_seq_len} tokens, every position a target (the worst case: chat "
           "data trains on assistant tokens only)",
           "gradient checkpointing: each layer keeps its input and is recomputed in the backward"
           if t.gradient_checkpointing else "no gradient checkpointing: every layer keeps its activations",
           f"loss over {f'chunks of {t.loss_chunk_size}' if t.loss_chunk_size else 'all'} positions, fp32 logits; "
           "attention through SDPA's flash/efficient kernels (no s x s matrix is stored)"]
    if device == "cpu":
        out.append("CPU: weights and compute in fp32 unless quant.compute_dtype says otherwise; bitsandbytes pages "
                   "optimizer state only on CUDA")
    else:
        out.append("CUDA: paged optimizer state counted as resident on the GPU (it moves to CPU memory only under "
                   "pressure); PyTorch's caching allocator may reserve a few percent more than this (fragmentation)")
    return out
