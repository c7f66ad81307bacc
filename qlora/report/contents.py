"""What the memory report holds, as one dict (the .json; the .md, the .png and the printed summary are made from it):
the recipe's settings, the model's shapes, the versions, and each method's estimate, measured in a fresh process with
--measure and per process of several with --gpus N, drawn against the device the report is for.
"""

from __future__ import annotations

import copy
import datetime
import platform
import shlex
import sys
from importlib import metadata

import torch

from qlora.base.attention import cuda_kernel
from qlora.base.build import config_json_path
from qlora.config import Config
from qlora.errors import ConfigError
from qlora.memory.arch import Arch, load_arch
from qlora.memory.estimate import Estimate, compute_bytes, estimate
from qlora.memory.preflight import available_on, host_share, needs, process_margin
from qlora.memory.readings import available_bytes, container_limit, total_bytes

GIB = 2**30
REFERENCE_GPU = 80 * 10**9  # an estimate for CUDA made without a GPU is drawn against one 80 GB card (A100/H100)


def method_config(cfg: Config, method: str) -> tuple[Config, list[str]]:
    """`cfg` for `method`, with the recipe's levers that do not apply to it switched off (and the overrides)."""
    out = copy.deepcopy(cfg)
    out.quant.method = method
    extra = [f"--quant.method={method}"]
    if out.quant.quantize_lm_head and method != "qlora":
        out.quant.quantize_lm_head = False
        extra.append("--quant.quantize_lm_head=false")
    # The 4-bit base's own settings, which a 16-bit base does not have.
    for section, key, off, flag in (("quant", "blocksize", 64, "64"), ("quant", "keep_16bit_budget", 0.0, "0"),
                                    ("quant", "keep_16bit", [], ""), ("lora", "init", "zero", "zero"),
                                    ("lora", "loftq_iters", 1, "1")):
        if method != "qlora" and getattr(getattr(out, section), key) != off:
            setattr(getattr(out, section), key, off)
            extra.append(f"--{section}.{key}={flag}")
    if out.model.embeddings_on_cpu and method == "full":
        out.model.embeddings_on_cpu = False
        extra.append("--model.embeddings_on_cpu=false")
    if out.train.tile_size and method == "full":
        out.train.tile_size, out.train.tile_projections, out.train.tile_norms = 0, False, False
        extra += ["--train.tile_size=0", "--train.tile_projections=false", "--train.tile_norms=false"]
    return out, extra


def target_device(cfg: Config) -> str:
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.train.device


def device_memory(device: str) -> tuple[int, str]:
    """(bytes, label) of the device the report is drawn against."""
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"{props.name} ({props.total_memory / GIB:.0f} GiB)"
    if device == "cuda":
        return REFERENCE_GPU, "an 80 GB GPU (reference)"
    total = total_bytes()  # a container's limit where it is less: what the kernel lets this process have
    if container_limit() is not None:
        return total, f"this machine's memory cgroup's limit ({total / GIB:.2f} GiB)"
    return total, f"this machine's RAM ({total / GIB:.0f} GiB)"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "bitsandbytes", "accelerate", "qlora"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda or ""
        out["cudnn"] = str(torch.backends.cudnn.version() or "")
    return out


def settings(cfg: Config, device: str) -> dict:
    t = cfg.train
    return {"seq_len": cfg.data.max_seq_len, "batch_size": t.batch_size, "attention": cfg.model.attn_implementation,
            **({"sdpa_kernel": cuda_kernel(cfg)} if device == "cuda" and cfg.model.attn_implementation == "sdpa"
               else {}), "lora_r": cfg.lora.r,
            "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout, "lora_targets": cfg.lora.targets,
            "optimizer": t.optimizer, "gradient_checkpointing": t.gradient_checkpointing,
            "loss_chunk_size": t.loss_chunk_size, "offload_activations": t.offload_activations,
            "offload_budget_gib": t.offload_budget_gib, "checkpoint_every": t.checkpoint_every,
            "tile_size": t.tile_size, "tile_projections": t.tile_projections, "optimizer_on_cpu": t.optimizer_on_cpu,
            "quantize_lm_head": cfg.quant.quantize_lm_head, "embeddings_on_cpu": cfg.model.embeddings_on_cpu,
            "stream_base": t.stream_base,
            "blocksize": cfg.quant.blocksize, "keep_16bit_budget": cfg.quant.keep_16bit_budget,
            "keep_16bit": len(cfg.quant.keep_16bit),
            "compute_dtype": compute_bytes(cfg, device)[0]}


def build_report(recipe: str, argv: list[str], cfg: Config, overrides: list[str], methods: list[str],
                 measure: bool, gpus: int = 1, card: tuple[int, str] | None = None, host: int | None = None) -> dict:
    """The report's dict; `card` (bytes, label): the CUDA card to draw it against, named rather than found; `host`
    (bytes, --host-gib's machine): the host a step's host side must fit too, as qlora.train checks before loading."""
    device = "cuda" if card is not None else target_device(cfg)
    arch = load_arch(cfg)
    total, total_label = card or device_memory(device)
    if measure and device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--measure: the recipe trains on CUDA (train.device=cuda) but no GPU is visible; drop "
                          "--measure for an estimate, or measure on CPU with --train.device=cpu")
    report = {"model": cfg.model.path, "config_json": str(config_json_path(cfg)), "recipe": recipe,
              "device": "none", "estimate_for": device, "device_memory_bytes": total, "device_memory": total_label,
              "measured": measure, "command": "python -m qlora.memory " + shlex.join(argv),
              "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "versions": versions(), "settings": settings(cfg, device), "arch": arch_dict(arch), "methods": {}}
    for method in methods:
        mcfg, extra = method_config(cfg, method)
        est = estimate(mcfg, arch, method, device)
        entry = estimate_entry(est, total, host)
        if measure:
            entry.update(measure_entry(recipe, overrides + extra, est, device))
            if "measured_device" in entry:
                report["device"] = entry.pop("measured_device")
        if gpus > 1:
            entry["per_gpu"] = per_gpu(mcfg, arch, method, device, gpus, total, host)
        report["methods"][method] = entry
    if gpus > 1:
        report["gpus"] = gpus
    if host is not None:
        report["host_memory_bytes"] = host
    if measure:
        from qlora.report.measure import CPU_DEFINITION

        report["measurement"] = CPU_DEFINITION if device == "cpu" else \
            "PyTorch reserved at its peak + memory outside its allocator (paged optimizer state) + CUDA context"
    return report


def per_gpu(cfg: Config, arch: Arch, method: str, device: str, gpus: int, device_total: int,
            host: int | None = None) -> dict:
    """The estimate per process of `gpus`: data parallel, and (qlora, lora) with the frozen base sharded; each
    against the card and (unless `host` is None) its share of the host, as each process checks before loading."""
    out = {}
    for case, shard in (("data_parallel", False), ("shard_base", True)):
        if shard and method == "full":  # every weight trains: qlora.train refuses train.shard_base
            continue
        c = copy.deepcopy(cfg)
        c.train.shard_base = shard
        c.train.stream_base = False  # one process's lever: qlora.train refuses it beside others
        if shard:  # what qlora.train refuses beside a sharded base: embeddings in CPU memory, sequence tiles
            c.model.embeddings_on_cpu, c.train.tile_size, c.train.tile_projections = False, 0, False
            c.train.tile_norms = False
        out[case] = estimate_entry(estimate(c, arch, method, device, gpus), device_total, host, gpus)
    return out


def arch_dict(arch: Arch) -> dict:
    return {"layers": arch.layers, "hidden": arch.hidden, "intermediate": arch.intermediate, "heads": arch.heads,
            "kv_heads": arch.kv_heads, "head_dim": arch.head_dim, "vocab": arch.vocab, "tied_embeddings": arch.tied,
            "params": arch.params, "linear_params": arch.linear_params}


def estimate_entry(est: Estimate, device_total: int, host: int | None = None, processes: int = 1) -> dict:
    """One estimate's entry; `fits`: the card holds the step and (unless `host` is None) the share of the host of
    `host` bytes that one of `processes` on it has holds what it keeps there, the trainer's check before loading
    (preflight.check_fits) on such a machine. On a CPU device that check counts the process's libraries and
    malloc's free lists beside the tensors (preflight.process_margin): the verdict left them out, and a CPU step of
    llama8b (10.28 GiB, 17.97 with them) fitted a 16 GiB machine the trainer refuses it on."""
    card, host_need = needs(est)
    host_fits = None if host is None else host_need <= host_share(available_on(host), processes)[0]
    return {"estimated_peak_bytes": est.peak_bytes, "measured_peak_bytes": None, "error": None,
            "allocator_margin_bytes": est.margin, "allocator_margin_formula": est.margin_formula,
            "process_margin_bytes": process_margin(est),
            "fits": card <= device_total and host_fits is not False, "host_fits": host_fits,
            "components": est.components, "formulas": est.formulas,
            "estimated_peak_phase": est.peak_phase, "estimated_phases": est.phases, "assumptions": est.assumptions,
            "levers": est.levers, "checkpoints": est.checkpoints.describe() if est.checkpoints else None,
            "host_bytes": est.host_bytes, "host": est.host, "host_formulas": est.host_formulas,
            "streamed": est.streamed.describe() if est.streamed else None,
            **({"host_shared_by": processes} if host is not None and processes > 1 else {})}


def measure_entry(recipe: str, overrides: list[str], est: Estimate, device: str) -> dict:
    """Measure one method in a fresh process, unless its estimate says it cannot fit."""
    from qlora.report.measure import measure_in_subprocess

    room = available_bytes() * 0.8 if device == "cpu" else device_memory(device)[0]
    if est.card_bytes > room:
        return {"measure_error": f"not measured: the estimate ({est.card_bytes / GIB:.1f} GiB) exceeds the "
                                 f"{room / GIB:.1f} GiB available"}
    print(f"measuring {est.method} ...", file=sys.stderr)
    got = measure_in_subprocess(recipe, overrides, est.method)
    if "error" in got:
        return {"measure_error": got["error"]}
    measured = got["measured_peak_bytes"]
    # The card's measured peak holds the allocator's reserve: set against the estimate with its margin.
    return {"measured_peak_bytes": measured, "error": est.card_bytes / measured - 1,
            "measured_components": got["measured_components"], "measured_peak_phase": got["peak_phase"],
            "measured_phases": {k: v["card_total"] if "card_total" in v else v["allocated"]
                                for k, v in got["phases"].items()},
            "load_peak_bytes": got["load_peak_bytes"], "measure_seconds": got["seconds"],
            "measured_device": "cpu" if got["device"] == "cpu" else got["device"]}
