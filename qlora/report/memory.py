"""The memory report: estimated (and, with --measure, measured) peak of full fine-tuning, LoRA and QLoRA for a recipe.

    python -m qlora.memory RECIPE.py [--measure] [--methods qlora,lora,full] [--gpus N] [--json] [--section.key=v ...]
    python -m qlora.memory RECIPE.py --max-context [--gpu-gib 24,48,80] [--host-gib 128]

With --gpus N the report adds each method's peak per process of a run over N GPUs (torchrun): data parallel, and for
qlora and lora the frozen base sharded (train.shard_base), estimated only.

Prints the report's summary (all of it as JSON with --json). Only with --out-dir=DIR does it write files:
DIR/<recipe>-<device>.md, .json and .png, where <device> is the device that measured ("cpu", the GPU's name) or
"none" when nothing was measured; memory_reports/ holds the committed ones, made with --out-dir=memory_reports.
Without --measure nothing is loaded: config.json and the recipe are enough, and it answers in seconds.
--max-context prints the longest context per card size (qlora/memory/context.py), estimated; with --out-dir it
writes DIR/<recipe>-max-context.md and .json.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from qlora.base.attention import cuda_kernel
from qlora.base.build import config_json_path
from qlora.cli import run
from qlora.commands import MEMORY, help_text, wants_help
from qlora.config import METHODS, Config, parse_args
from qlora.config.model import FP16_ON_CUDA, check_rank
from qlora.errors import ConfigError, check_writable
from qlora.memory.activations import adapted_layers
from qlora.memory.arch import Arch, load_arch
from qlora.memory.estimate import Estimate, compute_bytes, estimate
from qlora.memory.readings import available_bytes, meminfo_bytes
from qlora.partial import remove_abandoned

USAGE = MEMORY.usage
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
    total = meminfo_bytes("MemTotal")
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
                 measure: bool, gpus: int = 1, card: tuple[int, str] | None = None) -> dict:
    """The report's dict; `card` (bytes, label): the CUDA card to draw it against, named rather than found."""
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
        entry = estimate_entry(est, total)
        if measure:
            entry.update(measure_entry(recipe, overrides + extra, est, device))
            if "measured_device" in entry:
                report["device"] = entry.pop("measured_device")
        if gpus > 1:
            entry["per_gpu"] = per_gpu(mcfg, arch, method, device, gpus, total)
        report["methods"][method] = entry
    if gpus > 1:
        report["gpus"] = gpus
    if measure:
        from qlora.report.measure import CPU_DEFINITION

        report["measurement"] = CPU_DEFINITION if device == "cpu" else \
            "PyTorch reserved at its peak + memory outside its allocator (paged optimizer state) + CUDA context"
    return report


def per_gpu(cfg: Config, arch: Arch, method: str, device: str, gpus: int, device_total: int) -> dict:
    """The estimate per process of `gpus`: data parallel, and (qlora, lora) with the frozen base sharded."""
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
        out[case] = estimate_entry(estimate(c, arch, method, device, gpus), device_total)
    return out


def arch_dict(arch: Arch) -> dict:
    return {"layers": arch.layers, "hidden": arch.hidden, "intermediate": arch.intermediate, "heads": arch.heads,
            "kv_heads": arch.kv_heads, "head_dim": arch.head_dim, "vocab": arch.vocab, "tied_embeddings": arch.tied,
            "params": arch.params, "linear_params": arch.linear_params}


def estimate_entry(est: Estimate, device_total: int) -> dict:
    return {"estimated_peak_bytes": est.peak_bytes, "measured_peak_bytes": None, "error": None,
            "allocator_margin_bytes": est.margin, "allocator_margin_formula": est.margin_formula,
            "fits": est.card_bytes <= device_total, "components": est.components, "formulas": est.formulas,
            "estimated_peak_phase": est.peak_phase, "estimated_phases": est.phases, "assumptions": est.assumptions,
            "levers": est.levers, "checkpoints": est.checkpoints.describe() if est.checkpoints else None,
            "host_bytes": est.host_bytes, "host": est.host, "host_formulas": est.host_formulas,
            "streamed": est.streamed.describe() if est.streamed else None}


def measure_entry(recipe: str, overrides: list[str], est: Estimate, device: str) -> dict:
    """Measure one method in a fresh process, unless its estimate says it cannot fit."""
    from qlora.report.measure import measure_in_subprocess

    room = available_bytes() * 0.8 if device == "cpu" else device_memory(device)[0]
    if est.peak_bytes > room:
        return {"measure_error": f"not measured: the estimate ({est.peak_bytes / GIB:.1f} GiB) exceeds the "
                                 f"{room / GIB:.1f} GiB available"}
    print(f"measuring {est.method} ...", file=sys.stderr)
    got = measure_in_subprocess(recipe, overrides, est.method)
    if "error" in got:
        return {"measure_error": got["error"]}
    measured = got["measured_peak_bytes"]
    return {"measured_peak_bytes": measured, "error": est.peak_bytes / measured - 1,
            "measured_components": got["measured_components"], "measured_peak_phase": got["peak_phase"],
            "measured_phases": {k: v["card_total"] if "card_total" in v else v["allocated"]
                                for k, v in got["phases"].items()},
            "load_peak_bytes": got["load_peak_bytes"], "measure_seconds": got["seconds"],
            "measured_device": "cpu" if got["device"] == "cpu" else got["device"]}


def device_slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower().removeprefix("nvidia ")).strip("-") or "none"


def write_report(report: dict, out_dir: Path) -> Path:
    """Write <recipe>-<device>.json, .md and .png into out_dir (write_together); return the .md path."""
    from qlora.report.markdown import markdown
    from qlora.report.plot import plot_report

    stem = f"{Path(report['recipe']).stem}-{device_slug(report['device'])}"
    write_together(out_dir, {f"{stem}.png": lambda path: plot_report(report, path),
                             f"{stem}.md": lambda path: path.write_text(markdown(report, f"{stem}.png")),
                             f"{stem}.json": lambda path: path.write_text(json.dumps(report, indent=2) + "\n")})
    return out_dir / f"{stem}.md"


def write_together(out_dir: Path, writers: dict[str, Callable[[Path], object]]) -> None:
    """Write each file of a report (its name -> a function that writes it at a path) under a hidden temporary name in
    out_dir, then rename them into place, in the order given; on failure remove the temporaries.

    The files are one report: written in place, a kill (the plot takes most of the time) would leave a new .json
    beside an old .md, or a 0-byte .png. Written aside, a kill while writing leaves the old set as it was, and only a
    kill between the renames (microseconds) can mix them. The .json goes last: it is the record a tool reads, with the
    command that made it, so a .json is never newer than the .md and .png beside it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem in {Path(name).stem for name in writers}:
        remove_abandoned(out_dir / stem)  # a killed report's temporaries
    # The suffix stays last: matplotlib picks the image format from it.
    temps = {name: out_dir / f".{Path(name).stem}.partial-{os.getpid()}{Path(name).suffix}" for name in writers}
    try:
        for name, write in writers.items():
            write(temps[name])
        for name, tmp in temps.items():
            os.replace(tmp, out_dir / name)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise


@dataclass
class Cli:
    """The command line of `python -m qlora.memory`, apart from the recipe's overrides."""

    rest: list[str] = field(default_factory=list)
    """The recipe and its --section.key=value overrides."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    measure: bool = False
    as_json: bool = False
    out_dir: Path | None = None
    """Where to write the report's files; None: write nothing, print only."""
    gpus: int = 1
    max_context: bool = False
    gpu_gib: list[float] = field(default_factory=lambda: [24.0, 48.0, 80.0])
    host_gib: float = 128.0
    card_gib: float | None = None
    """Without --max-context, the one card --gpu-gib names: the report is drawn against it, and a recipe's
    train.plan=fastest chooses its levers for it (and --host-gib's host)."""


def _numbers(flag: str, value: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or any(not 0 < v <= 2**20 for v in out):  # 1 PiB: beyond it the bisection's sizes overflow
        raise ConfigError(f"{flag} {value!r}: use positive sizes in GiB up to 1048576, e.g. {flag}=24,48,80")
    return out


def parse_cli(argv: list[str]) -> Cli:
    cli, sized = Cli(), []
    args = iter(argv)
    for arg in args:
        name, sep, value = arg.partition("=")
        if name in ("--methods", "--gpu-gib", "--host-gib", "--gpus", "--out-dir") and not sep:
            value = next(args, "")
        if name == "--gpus":
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--gpus {value!r}: give the number of GPUs (processes), e.g. --gpus 2")
            cli.gpus = int(value)
        elif arg == "--measure":
            cli.measure = True
        elif arg == "--json":
            cli.as_json = True
        elif arg == "--max-context":
            cli.max_context = True
        elif name == "--methods":
            cli.methods = [m.strip() for m in value.split(",") if m.strip()]
            unknown = [m for m in cli.methods if m not in METHODS]
            if unknown or not cli.methods:
                raise ConfigError(f"--methods {value!r}: use a comma-separated subset of {','.join(METHODS)}")
        elif name == "--gpu-gib":
            cli.gpu_gib, sized = _numbers(name, value), sized + [name]
        elif name == "--host-gib":
            if len(sizes := _numbers(name, value)) > 1:
                raise ConfigError(f"--host-gib {value!r}: give the one host's memory in GiB, e.g. --host-gib 128 (the "
                                  "cards are --gpu-gib's list)")
            cli.host_gib, sized = sizes[0], sized + [name]
        elif name == "--out-dir":
            cli.out_dir = Path(value)
            if not value.strip():
                raise ConfigError("--out-dir= is empty: give the directory for the report, e.g. --out-dir=reports")
            check_writable(cli.out_dir, "--out-dir", directory=True)  # before the report is built, not after
        else:
            cli.rest.append(arg)
    if sized and not cli.max_context:
        if "--gpu-gib" not in sized:
            raise ConfigError("--host-gib sizes the host beside the card --gpu-gib names, or the cards of "
                              "--max-context: add --gpu-gib N or --max-context")
        if len(cli.gpu_gib) > 1:
            raise ConfigError(f"--gpu-gib {','.join(f'{g:g}' for g in cli.gpu_gib)}: the report is drawn against one "
                              "card, e.g. --gpu-gib 48 (several are --max-context's: add --max-context)")
        if cli.measure:
            raise ConfigError("--gpu-gib draws the estimate against a card of that size; --measure measures the card "
                              "here: drop one of them")
        cli.card_gib = cli.gpu_gib[0]
    if cli.max_context and cli.gpus > 1:
        raise ConfigError("--max-context sizes one card; --gpus N asks about several: drop one of them")
    if cli.max_context and (cli.measure or cli.methods != Cli().methods):
        flag = "--measure" if cli.measure else "--methods"
        raise ConfigError(f"--max-context estimates the recipe's own method on cards of several sizes; {flag} asks "
                          "for the report of one: drop one of them")
    return cli


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    if wants_help(argv):
        print(help_text("qlora.memory", argv), end="")
        return 0
    cli = parse_cli(argv)
    cfg, flags = parse_args(cli.rest, USAGE)
    if flags:
        raise ConfigError(f"unknown flag {flags[0]}: {USAGE}")
    sized = cli.max_context or cli.card_gib is not None
    if sized and cfg.train.device == "cpu":
        flag = "--max-context" if cli.max_context else "--gpu-gib"
        raise ConfigError(f"{flag} sizes CUDA cards and the recipe trains on the CPU (train.device=cpu): set "
                          f"--train.device=cuda, or drop {flag}")
    refuse_untrainable(cfg, "cuda" if sized else target_device(cfg))
    if cli.max_context:
        return max_context_main(cli, argv, cfg)
    card, plan = None, None
    if cli.card_gib is not None:
        card = (int(cli.card_gib * GIB), f"a card of {cli.card_gib:g} GiB (--gpu-gib)")
        if cfg.train.plan == "fastest":
            plan = card_plan(cfg, cli, card)
    report = build_report(cli.rest[0], argv, cfg, cli.rest[1:], cli.methods, cli.measure, cli.gpus, card)
    if plan is not None:
        report["plan"] = plan
    if cli.as_json:
        print(json.dumps(report, indent=2))
    from qlora.report.markdown import summary_lines

    written = None
    if cli.out_dir is not None:
        md = write_report(report, cli.out_dir)
        written = [md, md.with_suffix(".json"), md.with_suffix(".png")]
    note = []
    if cfg.train.plan == "fastest" and plan is None:
        note = ["train.plan=fastest: the levers above are the recipe's, the least it needs; a run takes the fastest "
                "that fit its card and host: --gpu-gib N [--host-gib H] shows them for a card"]
    lines = (plan["lines"] if plan else []) + summary_lines(report) + note
    for line in lines + [written_line(written, ".md, .json and .png")]:
        print(line, file=sys.stderr if cli.as_json else sys.stdout)
    return 0


def card_plan(cfg: Config, cli: Cli, card: tuple[int, str]) -> dict:
    """train.plan=fastest for --gpu-gib's card and --host-gib's host, as qlora.train would choose it there (with
    several processes the host is not counted, as there): its levers set on `cfg`, and what it chose and why."""
    from qlora.memory.plan import plan_for

    host = int(cli.host_gib * GIB) if cli.gpus == 1 else None
    chosen, lines = plan_for(cfg, "cuda", *card, host, cli.gpus)
    return {"card_gib": cli.card_gib, "host_gib": cli.host_gib if host is not None else None,
            "chose": cfg.train.plan_chose if chosen is not None else None, "lines": lines}


def refuse_untrainable(cfg: Config, device: str) -> None:
    """What the trainer refuses only once it loads, refused before an estimate of a run that could not start: fp16 on
    CUDA, a rank beyond the narrowest adapted layer (Llama-3.1-8B at lora.r=5000 was estimated at 225 GiB)."""
    if device == "cuda" and cfg.quant.compute_dtype == "fp16":
        raise ConfigError(FP16_ON_CUDA)
    if cfg.quant.method == "full":
        return
    check_rank(cfg.lora.r, adapted_layers(load_arch(cfg), cfg.lora.targets), "each decoder layer's {}")


def written_line(paths: list[Path] | None, kinds: str) -> str:
    """The report's closing line: the files written, or how to write them (nothing is written unless told where)."""
    if paths is not None:
        return "written: " + ", ".join(map(str, paths))
    return (f"nothing written: --out-dir=DIR writes the report as {kinds} (memory_reports/ holds the committed ones, "
            "made with --out-dir=memory_reports)")


def max_context_main(cli: Cli, argv: list[str], cfg: Config) -> int:
    """--max-context: the table per card size, on stdout and, with --out-dir, into <recipe>-max-context.md/.json."""
    from qlora.memory.context import context_report
    from qlora.report.markdown import context_lines, context_markdown

    report = context_report(cfg, cli.gpu_gib, cli.host_gib)
    report.update(recipe=cli.rest[0], command="python -m qlora.memory " + shlex.join(argv),
                  date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                  versions=versions())
    written = None
    if cli.out_dir is not None:
        stem = f"{Path(cli.rest[0]).stem}-max-context"
        write_together(cli.out_dir, {f"{stem}.md": lambda path: path.write_text(context_markdown(report)),
                                     f"{stem}.json": lambda path: path.write_text(json.dumps(report, indent=2) + "\n")})
        written = [cli.out_dir / f"{stem}.md", cli.out_dir / f"{stem}.json"]
    if cli.as_json:
        print(json.dumps(report, indent=2))
    for line in context_lines(report) + [written_line(written, ".md and .json")]:
        print(line, file=sys.stderr if cli.as_json else sys.stdout)
    return 0
