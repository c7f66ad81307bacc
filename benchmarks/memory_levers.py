"""What each memory lever saves, and the longest context a recipe trains in a memory budget (issue 4).

    python benchmarks/memory_levers.py --size 8b                                  # GPU: the lever table, seq 2048
    python benchmarks/memory_levers.py --size 70b --no-levers --max-context --deadline 540
    python benchmarks/memory_levers.py --size tiny --max-context                  # CPU: the machinery, in minutes

Every probe is one child process that builds our trainer's model for the recipe plus overrides, runs
`--probe-steps` full training steps (forward, backward, optimizer step; the first allocates the optimizer state) on a
random batch of `--seq` tokens, and reports its peak: on CUDA what a user compares with the card (PyTorch's peak
reserved + memory outside its allocator, CUDA context included), on CPU the peak resident set. A CUDA out-of-memory
error, a refusal (the pinned-memory check of activation offload), or a peak over `--budget-gib` (default: the card's
memory, 0.5 GiB on CPU) is a failure.

Levers are measured one at a time against a baseline with every lever off except gradient checkpointing (the
trainer's default), then all together as the recipe sets them. transformers' own synchronous offload runs beside
ours: `activation_checkpointing_enable(offload=True)` where transformers has it (5.23 on), else the same wrapping of
each checkpoint in torch's `save_on_cpu` done here (the GPU image's transformers 5.17 has no such option).

`--max-context` searches the longest sequence the recipe as configured (plus --override) trains in: from
`--start-seq` (default: the estimator's longest for the budget on CUDA, --seq on CPU) it steps by a factor of
`--growth` (squared each time the limit is not yet bracketed, so a poor start costs few probes) until one length fits
and a longer one fails, then bisects until the two lie within `--precision` of each other (or `--granularity`
tokens), in at most `--max-probes` new probes.

Bounded and resumable: each probe gets at most `--probe-timeout` seconds and the whole run `--deadline` seconds
(a probe starts only if the longest so far would still finish); each result is appended to
`<out-dir>/memory-levers-<device>-<size>.probes.jsonl` as it finishes and the report is rewritten after every probe;
a rerun with the same settings measures only what is missing (`--fresh` starts over). The parent process never
touches CUDA, so no context of its own inflates the children's peaks.

Writes <out-dir>/memory-levers-<device>-<size>.{json,md} (default out-dir: benchmarks/results).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probes import CUT_SHORT, Deadline, ProbeLog, child_command, measured  # noqa: E402  (sibling scripts)
from provenance import gpu, header, record, write_result  # noqa: E402
from throughput import RESULTS, base_config, build_ours, card_peak, reset_peak, synthetic_batch  # noqa: E402

BASELINE = ["--train.gradient_checkpointing=true", "--train.offload_activations=false", "--train.loss_chunk_size=0",
            "--train.liger_ce=false", "--quant.quantize_lm_head=false", "--model.embeddings_on_cpu=false",
            "--train.optimizer=paged_adamw_32bit", "--train.reuse_dequant=false", "--train.tile_size=0",
            "--train.tile_projections=false", "--train.checkpoint_every=1", "--train.offload_budget_gib=0",
            "--train.optimizer_on_cpu=false"]
REFERENCE_GPU_GIB = 80e9 / 2**30  # the estimate's start without nvidia-smi: one 80 GB card
TABLE_TILE = 512  # tokens per tile in the lever table: several tiles at its lengths (a row of one tile runs as is)


def levers(chunk: int, cuda: bool) -> dict[str, dict]:
    """Key -> probe: its name in the table, overrides on top of BASELINE (or the recipe as is), transformers' offload.
    In order of interest: a deadline cuts the list from the end."""
    out = {
        "baseline": {"name": "baseline (checkpointing only)"},
        "recipe": {"name": "recipe as configured", "recipe": True},
        "offload": {"name": "offload_activations (ours, async)", "overrides": ["--train.offload_activations=true"]},
        "hf_offload": {"name": "offload (transformers, sync)", "hf_offload": True},
        "loss_chunk": {"name": f"loss_chunk_size={chunk}", "overrides": [f"--train.loss_chunk_size={chunk}"]},
        "liger_ce": {"name": "liger_ce", "overrides": ["--train.liger_ce=true"]},
        "quantize_lm_head": {"name": "quantize_lm_head", "overrides": ["--quant.quantize_lm_head=true"]},
        "embeddings_on_cpu": {"name": "embeddings_on_cpu", "overrides": ["--model.embeddings_on_cpu=true"]},
        "optimizer_on_cpu": {"name": "optimizer_on_cpu", "overrides": ["--train.optimizer_on_cpu=true"]},
        "tiles": {"name": f"tile_size={TABLE_TILE} + tile_projections",
                  "overrides": [f"--train.tile_size={TABLE_TILE}", "--train.tile_projections=true"]},
        "checkpoint_every": {"name": "checkpoint_every=4", "overrides": ["--train.checkpoint_every=4"]},
        "paged_adamw_8bit": {"name": "paged_adamw_8bit", "overrides": ["--train.optimizer=paged_adamw_8bit"]},
        "reuse_dequant": {"name": "reuse_dequant (a speed lever's memory cost)",
                          "overrides": ["--train.reuse_dequant=true"]},
        "no_checkpointing": {"name": "no gradient checkpointing",
                             "overrides": ["--train.gradient_checkpointing=false"]},
    }
    if not cuda:
        del out["liger_ce"]  # Triton kernels: CUDA only
    return out


# --- the child: one probe ---

def hf_offload(model: torch.nn.Module) -> None:
    """transformers' synchronous offload: torch's `save_on_cpu` (pinned on CUDA) around each layer's checkpoint, the
    copies on the compute stream. Through transformers where it has the option (5.23 on), else the same wrapping
    here on the layers our trainer already checkpoints."""
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable = getattr(model, "activation_checkpointing_enable", None)
    cuda = next(model.parameters()).is_cuda
    if cuda and enable is not None and "offload" in inspect.signature(enable).parameters:
        enable({"use_reentrant": False}, offload=True)
        return

    def offloaded(function: Callable, *args: object, **kwargs: object) -> object:
        with torch.autograd.graph.save_on_cpu(pin_memory=cuda):  # pinning needs CUDA; on CPU the copies are plain
            return checkpoint(function, *args, **kwargs)

    func = functools.partial(offloaded, use_reentrant=False)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise ValueError("transformers' offload wraps checkpointed layers: enable gradient checkpointing first")
    for layer in layers:
        layer._gradient_checkpointing_func = func  # what transformers' own offload sets, in the same place


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device_name": props.name, "total_gib": props.total_memory / 2**30}
    return {"device_name": "cpu", "total_gib": None}


def probe(args: argparse.Namespace, spec: dict) -> dict:
    """One probe, in this (child) process: build, `--probe-steps` steps, the peak; or how it failed."""
    from qlora.base.load import resolve_device
    from qlora.errors import ConfigError

    # Every probe batch has one shape, as packed rows do (it sizes the pinned-memory check of activation offload).
    overrides = ([] if spec.get("recipe") else BASELINE) + spec.get("overrides", []) + args.override + \
        [f"--data.max_seq_len={args.seq}", "--data.pack=true"]
    cfg = base_config(args.size, overrides)
    device = resolve_device(cfg.train.device)
    try:
        model, step, device = build_ours(cfg, hf_offload if spec.get("hf_offload") else None)
        batch = synthetic_batch(model.get_input_embeddings().num_embeddings, args.batch, args.seq, device)
        reset_peak(device)
        for _ in range(args.probe_steps):
            step(batch)
        result = {"ok": True, **card_peak(device)}
    except torch.OutOfMemoryError:
        result = {"ok": False, "oom": True}
    except ConfigError as err:
        result = {"ok": False, "refused": str(err)}
    result.update(device_info(device))
    budget = args.budget_gib or result["total_gib"] or 0.5
    if result.get("ok") and result["peak_gib"] > budget:
        result.update(ok=False, over_budget=True)
    return result


def probe_command(args: argparse.Namespace, spec: dict, seq: int) -> list[str]:
    passed = [f"--size={args.size}", f"--batch={args.batch}", f"--probe-steps={args.probe_steps}", f"--seq={seq}",
              *[f"--override={o}" for o in args.override], "--probe", json.dumps(spec)]
    if args.budget_gib:
        passed.append(f"--budget-gib={args.budget_gib}")
    return child_command("memory_levers.py", passed)


# --- the parent: lever table and max-context search ---

def search_max_context(fits: Callable[[int], bool | None], start: int, granularity: int, max_seq: int,
                       precision: float = 1 / 16, growth: float = 1.25) -> tuple[int | None, int | None]:
    """(longest length found to fit, shortest found to fail), lengths multiples of `granularity` up to `max_seq`.
    Coarse to fine: steps of `growth` (squared after each step that does not bracket the limit) from `start`, then
    bisection until the bracket is within `precision` of its lower end or one granularity step. `fits` answers None
    when no further probe may run: the search then returns what it has."""
    def snap(x: float) -> int:
        return min(max_seq, max(granularity, int(x) // granularity * granularity))

    lo = hi = None
    seq = snap(start)
    while lo is None or hi is None:
        ok = fits(seq)
        if ok is None:
            return lo, hi
        lo, hi = (seq, hi) if ok else (lo, seq)
        if lo is not None and hi is not None:
            break
        following = snap(max(seq * growth, seq + granularity) if ok else min(seq / growth, seq - granularity))
        if following == seq:  # at --max-seq, or one granularity step: nothing further to try
            return lo, hi
        seq, growth = following, growth * growth
    while hi - lo > max(granularity, precision * lo):
        mid = snap((lo + hi) / 2)
        if mid in (lo, hi):
            break
        ok = fits(mid)
        if ok is None:
            break
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo, hi


def estimated_start(cfg, budget_bytes: float, granularity: int, max_seq: int) -> int:  # noqa: ANN001 (Config)
    """Where the measured search starts: the estimator's longest context for the recipe on a card of `budget_bytes`
    and this host's memory (qlora/memory/context.py, as `python -m qlora.memory --max-context` prints it)."""
    from qlora.memory.context import max_context

    tokens, _, _ = max_context(cfg, int(budget_bytes), host_bytes())
    return min(max(tokens // granularity * granularity, granularity), max_seq)


def host_bytes() -> int:
    """This machine's memory (MemTotal): what a plan's pinned layer inputs and host optimizer must fit in."""
    from qlora.memory.profiler import meminfo_bytes

    return meminfo_bytes("MemTotal")


def card_gib() -> float:
    """The card's memory from nvidia-smi (no CUDA context in this process), else an 80 GB card's."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return int(out[0]) / 1024 if out else REFERENCE_GPU_GIB
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return REFERENCE_GPU_GIB


class Run:
    """One invocation. Its report shows every probe logged under the same setup (an earlier run's lever table stays
    in a later run's report of the search), rewritten after each probe."""

    def __init__(self, args: argparse.Namespace, cuda: bool) -> None:
        self.args, self.cuda = args, cuda
        self.device = "cuda" if cuda else "cpu"
        self.stem = Path(args.out_dir) / f"memory-levers-{self.device}-{args.size}"
        setup = {k: getattr(args, k) for k in ("size", "batch", "probe_steps", "override", "budget_gib")}
        self.log = ProbeLog(self.stem.with_suffix(".probes.jsonl"), setup, fresh=args.fresh)
        self.deadline = Deadline(args.deadline)
        self.prov = record("memory_levers.py", self.device, args.argv)
        self.new_context_probes = 0

    def lever_table(self) -> None:
        chosen = levers(self.args.chunk, self.cuda)
        if self.args.levers != "all":
            keys = [k.strip() for k in self.args.levers.split(",") if k.strip()]
            unknown = [k for k in keys if k not in chosen]
            if unknown:
                print(f"error: --levers {unknown[0]}: use all or some of {','.join(chosen)}", file=sys.stderr)
                raise SystemExit(2)
            chosen = {k: chosen[k] for k in keys}
        for key, spec in chosen.items():
            print(f"== {spec['name']} at seq {self.args.seq}", flush=True)
            measured(self.log, self.deadline, f"lever {key} seq {self.args.seq}",
                     probe_command(self.args, spec, self.args.seq), self.args.probe_timeout)
            self.write()

    def fits(self, seq: int) -> bool | None:
        key = f"context seq {seq}"
        fresh = self.log.get(key) is None
        if fresh and self.new_context_probes >= self.args.max_probes:
            print(f"   seq {seq:,}: not run, --max-probes={self.args.max_probes} reached", flush=True)
            return None
        plan = self.plan(seq)
        if plan:
            print(f"   seq {seq:,}: the estimator's plan for this card and host: {' '.join(plan)}", flush=True)
        result = measured(self.log, self.deadline, key,
                          probe_command(self.args, {"recipe": True, "overrides": plan}, seq), self.args.probe_timeout)
        if result is None:
            return None
        self.new_context_probes += fresh
        self.write()
        if result.get("timed_out"):  # too slow to measure within --probe-timeout: longer ones are slower still
            return None
        return bool(result.get("ok"))

    def plan(self, seq: int) -> list[str]:
        """Where the layer inputs wait at `seq` tokens (checkpoint_every, offload budget), as the estimator plans it
        for this card and host: the recipe's one plan, made for 2,048 tokens, would pin more than the host has long
        before the card is full (the H200 battery of 2026-12-04 saw every 70B probe refused so)."""
        if not self.cuda:
            return []
        from qlora.memory.context import probe_overrides

        cfg = base_config(self.args.size, self.args.override)
        return [o for o in probe_overrides(cfg, seq, self.card_bytes, host_bytes())
                if not o.startswith("--data.max_seq_len=")]

    @functools.cached_property  # nvidia-smi once, not at every probe
    def card_bytes(self) -> int:
        """The memory budget of the search: --budget-gib, else the card's."""
        return int((self.args.budget_gib or card_gib()) * 2**30)

    def max_context(self) -> None:
        args = self.args
        start = args.start_seq
        if start is None:
            if self.cuda:
                start = estimated_start(base_config(args.size, args.override), self.card_bytes, args.granularity,
                                        args.max_seq)
            else:
                start = args.seq
        print(f"== max context of the recipe, starting at {start:,} tokens", flush=True)
        search_max_context(self.fits, start, args.granularity, args.max_seq, args.precision, args.growth)
        self.write()

    def lever_results(self) -> dict[str, dict]:
        """Name -> result of each lever logged at --seq, in the table's order."""
        found = {spec["name"]: self.log.get(f"lever {key} seq {self.args.seq}")
                 for key, spec in levers(self.args.chunk, self.cuda).items()}
        return {name: result for name, result in found.items() if result is not None}

    def context_results(self) -> dict[int, dict]:
        return dict(sorted((int(key.rsplit(" ", 1)[1]), entry["result"]) for key, entry in self.log.done.items()
                           if key.startswith("context seq ")))

    def bracket(self) -> tuple[int | None, int | None]:
        """The longest length that fit and the shortest longer one that did not (a probe that timed out says
        neither)."""
        probes = {seq: r for seq, r in self.context_results().items() if not r.get("timed_out")}
        lo = max((seq for seq, r in probes.items() if r.get("ok")), default=None)
        hi = min((seq for seq, r in probes.items() if not r.get("ok") and (lo is None or seq > lo)), default=None)
        return lo, hi

    def write(self) -> None:
        if self.args.no_write:
            return
        lo, hi = self.bracket()
        write_result(self.stem, {"device": self.device, "device_name": self.device_name(), **self.prov,
                                 "setup": {k: v for k, v in vars(self.args).items()
                                           if k not in ("probe", "no_write", "argv")},
                                 "levers": self.lever_results(), "max_context": lo, "first_failing_context": hi,
                                 "probes": sorted(self.context_results().items())}, report(self), quiet=True)

    def device_name(self) -> str:
        results = [entry["result"] for entry in self.log.done.values()]
        names = [r["device_name"] for r in results if r.get("device_name")]
        return names[0] if names else (gpu() if self.cuda else "cpu")


def outcome(r: dict) -> str:
    if r.get("oom"):
        return "out of memory"
    if r.get("refused"):
        return "refused: " + r["refused"][:90]
    if r.get("timed_out"):
        return r["error"]
    return "failed: " + str(r.get("error"))[:80]


def report(run: Run) -> str:
    args = run.args
    lines = header(f"Memory levers: {args.size} on {run.device_name()} ({run.device})", run.prov, run.device,
                   "CPU run at a tiny size: peak resident set of the whole process, most of it the Python and "
                   "library baseline. It shows the benchmark works; it says nothing about GPU memory.")
    table = run.lever_results()
    if table:
        base = table.get("baseline (checkpointing only)", {}).get("peak_gib")
        lines += [f"batch {args.batch} x seq {args.seq}, {args.probe_steps} training steps per probe", "",
                  "| lever | peak GiB | vs baseline GiB |", "|---|---:|---:|"]
        for name, r in table.items():
            if "peak_gib" in r:
                delta = f"{r['peak_gib'] - base:+.3f}" if base is not None else "n/a"
                over = " (over budget)" if r.get("over_budget") else ""
                lines.append(f"| {name} | {r['peak_gib']:.3f}{over} | {delta} |")
            else:
                lines.append(f"| {name} | {outcome(r)} | |")
        missing = [spec["name"] for spec in levers(args.chunk, run.cuda).values() if spec["name"] not in table]
        if missing:
            lines += ["", f"Not measured (yet): {', '.join(missing)}."]
    context = run.context_results()
    if context:
        lo, hi = run.bracket()
        budget = f"{args.budget_gib:.2f} GiB" if args.budget_gib else "the card's memory" if run.cuda else "0.50 GiB"
        found = f"**{lo:,} tokens**" if lo else "**none found**"
        if hi:
            found += f"; {hi:,} does not fit"
        elif lo and lo >= args.max_seq:
            found += " (the --max-seq cap: raise it to look further)"
        else:
            found += " (no failing length found yet: the search was cut short)"
        lines += ["", f"Max context of the recipe within {budget}: {found} (precision {args.precision:.3g}, "
                  f"granularity {args.granularity})", "", "| seq | fits | peak GiB |", "|---:|---|---:|"]
        for seq, r in context.items():
            peak = f"{r['peak_gib']:.3f}" if "peak_gib" in r else outcome(r)
            lines.append(f"| {seq:,} | {'yes' if r.get('ok') else 'no'} | {peak} |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "8b", "70b"], default="tiny")
    parser.add_argument("--seq", type=int, help="sequence length of the lever table (default 128 tiny, else 2048)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, help="loss_chunk_size to measure (default 32 tiny, 1024 otherwise)")
    parser.add_argument("--probe-steps", type=int, default=2)
    parser.add_argument("--levers", default="all", help="comma-separated lever keys, or all (see levers())")
    parser.add_argument("--no-levers", action="store_true", help="skip the lever table")
    parser.add_argument("--max-context", action="store_true", help="search the longest sequence that fits")
    parser.add_argument("--budget-gib", type=float, help="memory budget (default: the card's memory; 0.5 on CPU)")
    parser.add_argument("--start-seq", type=int, help="first length of the search (default: the estimator's on "
                        "CUDA, --seq on CPU)")
    parser.add_argument("--growth", type=float, default=1.25, help="first step factor of the search")
    parser.add_argument("--precision", type=float, default=1 / 16, help="stop when the bracket is this close")
    parser.add_argument("--granularity", type=int, help="lengths are multiples of this (default 64 tiny, else 256)")
    parser.add_argument("--max-seq", type=int, help="longest length tried (default 4096 tiny, else 262144)")
    parser.add_argument("--max-probes", type=int, default=6, help="new probes of the search, at most")
    parser.add_argument("--probe-timeout", type=float, default=600, help="seconds a probe may take")
    parser.add_argument("--deadline", type=float, help="seconds for this whole run (default: none)")
    parser.add_argument("--override", action="append", default=[], metavar="--section.key=value",
                        help="recipe override for every probe, e.g. --override=--train.loss_chunk_size=4096")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where reports and the probe log go")
    parser.add_argument("--fresh", action="store_true", help="ignore probes logged by an earlier run")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    tiny = args.size == "tiny"
    args.seq = args.seq or (128 if tiny else 2048)
    args.chunk = args.chunk or (32 if tiny else 1024)
    args.granularity = args.granularity or (64 if tiny else 256)
    args.max_seq = args.max_seq or (4096 if tiny else 262_144)
    return args


def main(argv: list[str] | None = None) -> int:
    """0 when every probe asked for was measured (or the search ended within --max-probes); CUT_SHORT when the
    deadline left some out: a rerun goes on from the log."""
    args = parse(argv)
    if args.probe:
        print("RESULT " + json.dumps(probe(args, json.loads(args.probe))), flush=True)
        return 0
    run = Run(args, torch.cuda.is_available())  # is_available asks the driver; it creates no context
    if not args.no_levers:
        run.lever_table()
    if args.max_context:
        run.max_context()
    print("\n" + report(run))
    if not args.no_write:
        print(f"wrote {run.stem}.json and .md")
    if run.deadline.hit:
        print(f"stopped at --deadline={args.deadline:.0f}: run the same command again to go on", flush=True)
        return CUT_SHORT
    return 0


if __name__ == "__main__":
    sys.exit(main())
