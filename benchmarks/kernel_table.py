"""Where a step's time goes: a torch.profiler record of a few steps, summed by kernel family (issue 24).

    families: dequantisation, base matmuls, LoRA matmuls, attention, norms/activations, loss, host copies, optimizer,
              other

On CUDA each kernel's device time counts, in the family of the kernel and of the operator that launched it; on a CPU
(where there are no kernels) each operator's own CPU time counts the same way, so the table is made and tested on a
CPU as on a GPU. How an operator is placed, first match wins:

    optimizer          under `Optimizer.step` / `Optimizer.zero_grad` (torch labels every optimizer's), or an
                       optimizer kernel of bitsandbytes
    host copies        CUDA memcpy kernels between host and device (a CPU device has none: its copies are `other`)
    dequantisation     bitsandbytes' dequantize ops and kernels
    attention          SDPA and its backends (flash, cuDNN, memory-efficient, math) with all they call
    loss               under cross-entropy (log-softmax, NLL; liger-kernel's fused loss with its head matmul)
    LoRA / base        matrix products (mm, addmm, bmm, bitsandbytes' 4-bit gemm): LoRA's when one side of an input
      matmuls          has the adapters' rank r, else the base's (the output head's included)
    norms/activations  elementwise and reduction kernels (RMSNorm, SiLU, RoPE, the residual adds, LoRA's scaling),
                       liger-kernel's Triton kernels
    other              the rest: casts and copies on one device, indexing, Python between operators

`sdpa_backends` says which SDPA backend ran, by the operator that ran: flash, cudnn, efficient or math (on a CPU,
flash means PyTorch's CPU flash kernel).
"""

from __future__ import annotations

import re

import torch
from torch.autograd.profiler_util import FunctionEvent

FAMILIES = ("dequantisation", "base matmuls", "LoRA matmuls", "attention", "norms/activations", "loss", "host copies",
            "optimizer", "other")
MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
           "bitsandbytes::gemm_4bit", "aten::_addmm_activation"}
ATTENTION = re.compile(r"scaled_dot_product|flash_attention|efficient_attention|cudnn_attention|attention_math|"
                       r"fmha|flash_fwd|flash_bwd|cudnn.*attn|sdpa", re.I)
LOSS = re.compile(r"cross_entropy|log_softmax|nll_loss|CrossEntropy", re.I)
ELEMENTWISE = re.compile(r"^aten::(mul|add|sub|div|neg|pow|rsqrt|sqrt|mean|sum|silu|sigmoid|gelu|cat|exp|rms_norm|"
                         r"_fused_rms_norm|layer_norm|native_layer_norm|where|fill_|zero_|masked_fill|dropout|"
                         r"native_dropout|bernoulli|threshold|clamp)|elementwise|vectorized|reduce|rms_norm|swiglu|"
                         r"silu|rope|rotary|liger|rms_?layernorm|_fg_kernel|dfg_kernel", re.I)  # Unsloth's Triton
BACKENDS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_cudnn_attention": "cudnn",
            "_scaled_dot_product_efficient_attention": "efficient", "_scaled_dot_product_attention_math": "math",
            "_scaled_dot_product_fused_attention_overrideable": "overrideable"}


def lineage(event: FunctionEvent) -> list[FunctionEvent]:
    """The event and the operators around it, innermost first."""
    out = []
    while event is not None:
        out.append(event)
        event = event.cpu_parent
    return out


def family(event: FunctionEvent, rank: int, kernel: str = "") -> str:
    """The family of `event`'s own time (or of `kernel`, one of the device kernels it launched)."""
    names = [e.name for e in lineage(event)]
    if any(n.startswith(("Optimizer.step", "Optimizer.zero_grad")) for n in names) or "optimizer" in kernel.lower() \
            or any("optimizer" in n for n in names if n.startswith("bitsandbytes::")):
        return "optimizer"
    if kernel.startswith("Memcpy") and ("HtoD" in kernel or "DtoH" in kernel):
        return "host copies"
    if any("dequantize" in n for n in names) or "dequantize" in kernel.lower():
        return "dequantisation"
    if any(ATTENTION.search(n) for n in names) or ATTENTION.search(kernel):
        return "attention"
    if any(LOSS.search(n) for n in names):
        return "loss"
    matmul = next((e for e in lineage(event) if e.name in MATMULS), None)
    if matmul is not None:
        shapes = [s for e in lineage(event)[:lineage(event).index(matmul) + 1] for s in (e.input_shapes or [])]
        return "LoRA matmuls" if any(rank in shape for shape in shapes if isinstance(shape, list)) else "base matmuls"
    if ELEMENTWISE.search(event.name) or ELEMENTWISE.search(kernel):
        return "norms/activations"
    return "other"


def kernel_table(prof: torch.profiler.profile, rank: int, steps: int) -> dict[str, float]:
    """Milliseconds per step in each family: device time of the kernels where any ran (CUDA), else CPU time."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    on_device = any(e.kernels for e in events)
    totals = dict.fromkeys(FAMILIES, 0.0)
    for event in events:
        if on_device:
            for k in event.kernels:
                totals[family(event, rank, k.name)] += k.duration / 1e3  # microseconds
        else:
            totals[family(event, rank)] += event.self_cpu_time_total / 1e3
    return {name: ms / steps for name, ms in totals.items()}


def unclassified(prof: torch.profiler.profile, rank: int, steps: int, most: int = 20) -> dict[str, float]:
    """The `most` operators (or kernels) whose time the table puts under `other`, ms per step, largest first: what a
    GPU run's `other` row holds, to read on a CPU afterwards."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    on_device = any(e.kernels for e in events)
    found: dict[str, float] = {}
    for event in events:
        for name, us in ([(k.name, k.duration) for k in event.kernels] if on_device else
                         [(event.name, event.self_cpu_time_total)]):
            if family(event, rank, name if on_device else "") == "other":
                found[name] = found.get(name, 0.0) + us / 1e3 / steps
    return dict(sorted(found.items(), key=lambda item: -item[1])[:most])


def sdpa_backends(prof: torch.profiler.profile) -> dict[str, int]:
    """Calls of each SDPA backend's forward operator in the record (flash, cudnn, efficient, math)."""
    found: dict[str, int] = {}
    for event in prof.events():
        name = event.name.removeprefix("aten::")
        for op, backend in BACKENDS.items():
            if name.startswith(op) and "backward" not in name:
                found[backend] = found.get(backend, 0) + 1
    return found


def table_text(tables: dict[str, dict[str, float]], walls: dict[str, float] | None = None) -> list[str]:
    """One markdown table: a column per stack, ms per step and share of the step for each family. The total sums the
    kernels of every stream, so where copies on a side stream overlap the compute (offloaded layer inputs, a streamed
    base) it exceeds the step's wall-clock time; `walls` (ms per profiled step, the profiler's own overhead included)
    adds that time as a last row, so the overlap shows."""
    names = list(tables)
    lines = ["| family | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    totals = {n: sum(tables[n].values()) or 1.0 for n in names}
    for fam in FAMILIES:
        cells = [f"{tables[n].get(fam, 0):.1f} ms ({100 * tables[n].get(fam, 0) / totals[n]:.0f}%)" for n in names]
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    lines.append("| total, every stream | " + " | ".join(f"{totals[n]:.1f} ms" for n in names) + " |")
    if walls:
        lines.append("| step, wall clock | " + " | ".join(f"{walls[n]:.1f} ms" if n in walls else "" for n in names)
                     + " |")
    return lines
