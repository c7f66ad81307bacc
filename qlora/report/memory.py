"""The memory report: estimated (and, with --measure, measured) peak of full fine-tuning, LoRA and QLoRA for a recipe.

    python -m qlora.memory RECIPE.py [--measure] [--methods qlora,lora,full] [--gpus N] [--json] [--section.key=v ...]
    python -m qlora.memory RECIPE.py --gpu-gib N [--host-gib 128] [--out-dir=DIR] ...
    python -m qlora.memory RECIPE.py --max-context [--gpu-gib 24,48,80] [--host-gib 128]

With --gpus N the report adds each method's peak per process of a run over N GPUs (torchrun): data parallel, and for
qlora and lora the frozen base sharded (train.shard_base), estimated only. With --gpu-gib N the report is drawn
against a card of N GiB, and a recipe's train.plan=fastest chooses its levers for that card and --host-gib's host.

Prints the report's summary (all of it as JSON with --json). Only with --out-dir=DIR does it write files:
DIR/<recipe>-<device>.md, .json and .png, where <device> is the device that measured ("cpu", the GPU's name) or
"none" when nothing was measured; memory_reports/ holds the committed ones, made with --out-dir=memory_reports.
Without --measure nothing is loaded: config.json and the recipe are enough, and it answers in seconds.
--max-context prints the longest context per card size (qlora/memory/context.py), estimated; with --out-dir it
writes DIR/<recipe>-max-context.md and .json.

This module is the command: its arguments, what it prints and the files it writes; what the report holds is
contents.py's.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qlora.cli import require_stdout, run
from qlora.commands import MEMORY, help_text, wants_help
from qlora.config import METHODS, Config, parse_args
from qlora.config.model import FP16_ON_CUDA, check_rank
from qlora.errors import ConfigError, check_ascii_number, check_writable, repeated_notes
from qlora.memory.activations import adapted_layers
from qlora.memory.arch import load_arch
from qlora.memory.terms import CUDA_CONTEXT
from qlora.partial import write_together
from qlora.report.contents import build_report, target_device, versions

USAGE = MEMORY.usage
GIB = 2**30


def device_slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower().removeprefix("nvidia ")).strip("-") or "none"


def write_report(report: dict, out_dir: Path) -> Path:
    """Write <recipe>-<device>.json, .md and .png into out_dir (write_together); return the .md path."""
    from qlora.report.markdown import markdown
    from qlora.report.plot import plot_report

    stem = f"{Path(report['recipe']).stem}-{device_slug(report['device'])}"
    write_together(out_dir, {
        f"{stem}.png": lambda path: plot_report(report, path),
        f"{stem}.md": lambda path: path.write_text(markdown(report, f"{stem}.png"), encoding="utf-8"),
        f"{stem}.json": lambda path: path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")})
    return out_dir / f"{stem}.md"


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
    repeated: list[str] = field(default_factory=list)
    """A line for each flag given twice with other values: the last stands, as for the recipe's keys."""


def _items(flag: str, value: str, what: str, example: str) -> list[str]:
    """`value`'s comma-separated items, stripped, the empty ones left out; refused where one lies between or beside
    commas: 24,,48 was read as 24,48, and a size (or method) left out by mistake went unsaid."""
    items = [v.strip() for v in value.split(",")]
    if len(items) > 1 and "" in items:
        raise ConfigError(f"{flag} {value!r} has an empty item (two commas together, or one at an end): give {what} "
                          f"between each two commas, e.g. {example}")
    return [v for v in items if v]


def _numbers(flag: str, value: str) -> list[float]:
    example = "--host-gib=128" if flag == "--host-gib" else f"{flag}=24,48,80"  # one host, several cards
    check_ascii_number(flag, value)
    items = _items(flag, value, "a size", example)
    try:
        out = [float(v) for v in items]
    except ValueError:
        out = []
    # At most 1 PiB: beyond it the bisection's sizes overflow. Above a CUDA context (or a process holding torch): a
    # card of 0.001 GiB was drawn and planned for.
    least = CUDA_CONTEXT / 2**30
    if not out or any(not least < v <= 2**20 for v in out):
        raise ConfigError(f"{flag} {value!r}: use sizes in GiB above {least:g} (a CUDA context, or a process holding "
                          f"torch, takes that alone) and up to 1048576, e.g. {example}")
    # Refused, not taken once: 24,24 is more likely a slip for 24,48 than a wish, and the card meant would go unsaid.
    if twice := next((v for i, v in enumerate(out) if v in out[:i]), None):
        raise ConfigError(f"{flag} {value!r} names {twice:g} GiB twice: give each size once, e.g. {example}")
    return out


def parse_cli(argv: list[str]) -> Cli:
    cli, sized, given = Cli(), [], {}
    args = iter(argv)
    for arg in args:
        name, sep, value = arg.partition("=")
        if name in ("--methods", "--gpu-gib", "--host-gib", "--gpus", "--out-dir"):
            value = value if sep else next(args, "")
            given.setdefault(name, []).append(f"{name}={value}")
        if name == "--gpus":
            check_ascii_number(name, value)
            # isdigit alone takes "²"; 9 digits, as WORLD_SIZE (int() refuses 4,300, and 10**23 GPUs were estimated)
            if not (value.isascii() and value.isdigit()) or len(value) > 9 or int(value) < 1:
                raise ConfigError(f"--gpus {value[:20]!r}: give the number of GPUs (processes), up to 9 digits, e.g. "
                                  "--gpus 2")
            cli.gpus = int(value)
        elif arg == "--measure":
            cli.measure = True
        elif arg == "--json":
            cli.as_json = True
        elif arg == "--max-context":
            cli.max_context = True
        elif name == "--methods":
            cli.methods = _items(name, value, "a method", f"--methods={','.join(METHODS)}")
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
            refuse_in_a_run(cli.out_dir)
        else:
            cli.rest.append(arg)
    cli.repeated = repeated_notes(given)  # --gpu-gib 40 --gpu-gib 80 drew the report against 80 without a word
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


def refuse_in_a_run(out_dir: Path) -> None:
    """Refuse an --out-dir in a training run's checkpoint-N (or what a killed run left), which that run's next
    checkpoint removes with the report in it; the run's own directory is free, as merge's and export's are."""
    from qlora.training.rundir import run_owned

    for run_dir in Path(out_dir).resolve().parents:
        if (run_dir / "run_config.json").is_file() and (top := run_owned(out_dir, run_dir)) is not None:
            raise ConfigError(f"--out-dir={out_dir} lies in the run {run_dir}'s own {top}, which its training reads, "
                              "renames or removes: choose a directory outside it")


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    if wants_help(argv):
        print(help_text("qlora.memory", argv), end="")
        return 0
    cli = parse_cli(argv)
    if cli.out_dir is None:  # with --out-dir the files hold the report
        require_stdout("the report" if not cli.as_json else "the report's JSON",
                       "give it a file or a pipe (> FILE), or write the report with --out-dir=DIR")
    with contextlib.redirect_stdout(sys.stderr if cli.as_json else sys.stdout):  # --json: stdout is the JSON
        for line in cli.repeated:
            print(line)
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
    card, plan, host = None, None, None
    if cli.card_gib is not None:
        card = (int(cli.card_gib * GIB), f"a card of {cli.card_gib:g} GiB (--gpu-gib)")
        host = int(cli.host_gib * GIB)
        if cfg.train.plan == "fastest":
            plan = card_plan(cfg, cli, card, host)
    report = build_report(cli.rest[0], argv, cfg, cli.rest[1:], cli.methods, cli.measure, cli.gpus, card, host)
    report.update({"plan": plan} if plan is not None else {})
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


def card_plan(cfg: Config, cli: Cli, card: tuple[int, str], host: int) -> dict:
    """train.plan=fastest for --gpu-gib's card and --host-gib's host of `host` bytes, as qlora.train would choose it
    there, given what it would find available (with --gpus N, each process's share): its levers set on `cfg`, what
    it chose and why."""
    from qlora.levers.stream_base.settings import check_processes
    from qlora.memory.plan import keep_overridden, plan_for
    from qlora.memory.preflight import available_on, host_share

    try:  # qlora.train refuses a streamed base over several processes before it plans: no plan to show
        check_processes(cfg, cli.gpus)
    except ConfigError as err:  # its 12.88 GiB for llama70b_24gb over 2 GPUs was the streamed base's, one process's
        return {"card_gib": cli.card_gib, "host_gib": cli.host_gib, "chose": None,
                "lines": [f"train.plan=fastest: none, for qlora.train refuses the run before it plans: {err}"]}
    keep_overridden(cfg, cli.rest[1:])  # a lever set on the command line stays as set, as qlora.train keeps it
    share = host_share(available_on(host), cli.gpus, f"a host of {cli.host_gib:g} GiB (--host-gib)")
    chosen, lines = plan_for(cfg, "cuda", card[0], card[1], share, cli.gpus)
    return {"card_gib": cli.card_gib, "host_gib": cli.host_gib,
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
                  date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), versions=versions())
    written = None
    if cli.out_dir is not None:
        stem = f"{Path(cli.rest[0]).stem}-max-context"
        write_together(cli.out_dir, {
            f"{stem}.md": lambda path: path.write_text(context_markdown(report), encoding="utf-8"),
            f"{stem}.json": lambda path: path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")})
        written = [cli.out_dir / f"{stem}.md", cli.out_dir / f"{stem}.json"]
    if cli.as_json:
        print(json.dumps(report, indent=2))
    for line in context_lines(report) + [written_line(written, ".md and .json")]:
        print(line, file=sys.stderr if cli.as_json else sys.stdout)
    return 0
