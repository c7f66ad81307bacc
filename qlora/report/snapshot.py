"""Read a CUDA allocator snapshot and say what the peak held: every block over a few MiB alive at the peak of allocated
memory, each put to a term of the estimator (qlora/memory/terms.py, activations.py) by its stack and its size, what
no term explains, and what the allocator held beyond it (reserved but not allocated).

    python -m qlora.report.snapshot SNAPSHOT [--recipe R --tokens N] [--device cuda|cpu] [--min-mib 2] [--compact OUT]

SNAPSHOT is the pickle `torch.cuda.memory._dump_snapshot` writes after `_record_memory_history` (gzip or not), or
one of qlora/report/recorder.py's from a CPU run. With --recipe and --tokens (one row of N tokens, the recipe's batch)
each block's size is also read in the model's widths ("T h e": tokens x hidden x bytes per element), which names the
blocks autograd's engine allocates on CUDA, where no Python frame is on the stack, and the estimate for the same
shape stands beside the measured figures. --compact writes the snapshot back with only what this tool reads (Python
frames and the frames of autograd's nodes and ATen's kernels), gzip-compressed: what a GPU run brings back.

The snapshot is read by replay.py (loaded, replayed to its peak, compacted) and its blocks named by attribution.py;
this module is the command and the report it prints.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from qlora.errors import ConfigError
from qlora.report.attribution import Shape, attribute, phase, shape_for
from qlora.report.replay import Block, compact, load, peak

T = TypeVar("T")

MIB, GIB = 2**20, 2**30


def where_text(block: Block, width: int = 4) -> str:
    """The innermost Python frames (else the innermost of any kind), innermost first."""
    py = [f for f in block.frames if f["filename"].endswith(".py") and "torch/nn/modules/module.py" not in
          f["filename"]] or block.frames
    return " < ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in py[:width]) or \
        "no frames (autograd's engine, or before the recording)"


def report(snapshot: dict, shape: Shape | None = None, min_bytes: int = 2 * MIB,
           estimate: object | None = None) -> str:
    found = peak(snapshot)
    terms, unexplained, small = attribute(found, shape, min_bytes)
    unit, scale = ("GiB", GIB) if found.allocated >= GIB else ("MiB", MIB)
    per_token = shape.tokens if shape is not None else 0
    hidden_copy = shape.tokens * shape.widths["h"] * shape.e if shape is not None else 0
    gap = found.reserved_then - found.allocated
    lines = [f"peak allocated {found.allocated / scale:.3f} {unit} after event {found.index:,} of {found.events:,}; "
             f"reserved then {found.reserved_then / scale:.3f} {unit}, {gap / scale:.3f} {unit} of it not allocated "
             f"(the allocator's reserve and fragmentation); peak reserved {found.peak_reserved / scale:.3f} {unit}",
             f"{sum(len(v) for v in terms.values()) + len(unexplained)} blocks of {min_bytes / MIB:g} MiB or more "
             f"alive at the peak; smaller blocks {small / scale:.3f} {unit}", "",
             f"| term | blocks | {unit} | bytes per token | T h e copies |", "|---|---:|---:|---:|---:|"]

    def row(name: str, blocks: list[Block]) -> str:
        total = sum(b.size for b in blocks)
        tok = f"{total / per_token:,.0f}" if per_token else ""
        copies = f"{total / hidden_copy:.2f}" if hidden_copy else ""
        return f"| {name} | {len(blocks)} | {total / scale:.3f} | {tok} | {copies} |"

    lines += [row(name, blocks) for name, blocks in sorted(terms.items(), key=lambda kv: -sum(b.size for b in kv[1]))]
    lines.append(row("**unexplained**", unexplained))
    if estimate is not None:
        comp = estimate.components
        lines += ["", f"the estimate for this shape: {estimate.peak_bytes / scale:.3f} {unit} at "
                  f"{estimate.peak_phase} (" + ", ".join(f"{k} {v / scale:.3f}" for k, v in comp.items() if v) +
                  f" {unit})"]
    lines += ["", "unexplained blocks (size, read in the model's widths, where made):"]
    for b in unexplained:
        reading = ", ".join(shape.read(b.size)[:3]) if shape is not None else ""
        lines.append(f"  {b.size / MIB:10.1f} MiB  {reading or '-':16s} {phase(b.frames):10s} {where_text(b)}")
    if not unexplained:
        lines.append("  none")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from qlora.cli import ArgumentParser, run

    def _main(args: list[str]) -> int:
        parser = ArgumentParser(prog="python -m qlora.report.snapshot", description=__doc__.split("\n\n")[0])
        parser.add_argument("snapshot", help="the allocator's snapshot pickle (.gz or not)")
        parser.add_argument("--recipe", help="the recipe the snapshot's run trained: sizes read in its widths")
        parser.add_argument("--tokens", type=int, help="the run's data.max_seq_len (one row's tokens)")
        parser.add_argument("--override", action="append", default=[], help="a recipe override the run used")
        parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where the run computed")
        parser.add_argument("--min-mib", type=float, default=2.0, help="blocks this large or more are listed")
        parser.add_argument("--compact", help="write the compacted snapshot here (gzip) and stop")
        a = parser.parse_args(args)
        if not 0 <= a.min_mib < float("inf"):  # nan fails too
            parser.error(f"--min-mib={a.min_mib} must be a finite number of MiB >= 0, e.g. 2")
        snapshot = load(a.snapshot)
        if a.compact:
            from qlora.report.recorder import write_snapshot

            write_snapshot(shaped(a.snapshot, compact, snapshot), Path(a.compact))
            print(f"wrote {a.compact} ({Path(a.compact).stat().st_size / MIB:.1f} MiB)")
            return 0
        shape = est = None
        if a.recipe:
            from qlora.config import apply_overrides, load_recipe
            from qlora.memory.arch import load_arch
            from qlora.memory.estimate import estimate

            if not a.tokens:
                raise ConfigError("--recipe needs --tokens: the length of the run's rows")
            cfg = apply_overrides(load_recipe(a.recipe), [*a.override, f"--data.max_seq_len={a.tokens}"])
            shape = shape_for(cfg, a.tokens, a.device)
            est = estimate(cfg, load_arch(cfg), cfg.quant.method, a.device)
        print(shaped(a.snapshot, report, snapshot, shape, int(a.min_mib * MIB), est))
        return 0

    return run(_main, argv)


def shaped(path: str, work: Callable[..., T], snapshot: dict, *args: object) -> T:
    """`work(snapshot, *args)`, with a snapshot whose entries lack what the allocator writes (a segment without
    blocks, an event without an address) named in one line as the file it came from."""
    try:
        return work(snapshot, *args)
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise ConfigError(f"{path} is not an allocator snapshot (its entries lack what torch writes: "
                          f"{type(err).__name__}: {err}): give the file torch.cuda.memory._dump_snapshot wrote") \
            from None


if __name__ == "__main__":
    sys.exit(main())
