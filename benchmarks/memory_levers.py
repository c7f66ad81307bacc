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

Cheap probes (issue 22): with `--depth=auto` (or a number) each probe runs the recipe cut to k of its decoder layers
at full width and length (qlora/memory/depth.py) and reports the whole model's peak as the probe's measured peak plus
the known bytes of the missing layers; fit and `--budget-gib` are judged on that. `--rows 2048,29696,58368` measures
one probe per length (the estimator's plan for the card of --budget-gib and this host) and writes the estimate beside
each to <out-dir>/<recipe>-rows-<device>.json and .md; `--full-depth-at N` adds one probe of the whole model, the
check of the truncated ones. `--history=FILE.pickle.gz` records the allocator through each probe
(`torch.cuda.memory._record_memory_history`; on CPU qlora/report/recorder.py), writes the snapshot compacted and the
attribution of its peak (`python -m qlora.report.snapshot`) beside it (FILE's name up to its first dot, .txt).

Bounded and resumable: each probe gets at most `--probe-timeout` seconds and the whole run `--deadline` seconds
(a probe starts only if the longest so far would still finish); each result is appended to
`<out-dir>/memory-levers-<device>-<size>.probes.jsonl` as it finishes and the report is rewritten after every probe;
a rerun with the same settings measures only what is missing (`--fresh` starts over). The parent process never
touches CUDA, so no context of its own inflates the children's peaks.

Writes <out-dir>/memory-levers-<device>-<size>.{json,md} (default out-dir: benchmarks/results); with --depth, a
max-context search writes <out-dir>/<recipe>-context-<device>-<budget>gib.{json,md} (memory_reports/ keeps them).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probes import CUT_SHORT, Deadline, ProbeLog, child_command, measured  # noqa: E402  (sibling scripts)
from provenance import gpu, header, record, write_result  # noqa: E402
from throughput import AS_SET, RESULTS, SIZES, base_config, build_ours, card_peak, reset_peak, synthetic_batch  # noqa: E402

from qlora import cli  # noqa: E402  (one line and its exit status for each ending)
from qlora.errors import ConfigError  # noqa: E402

if TYPE_CHECKING:  # the hints only: qlora is imported where used, to keep --help fast
    from qlora.config import Config

BASELINE = ["--train.gradient_checkpointing=true", "--train.offload_activations=false", "--train.loss_chunk_size=0",
            "--train.liger_ce=false", "--quant.quantize_lm_head=false", "--model.embeddings_on_cpu=false",
            "--train.optimizer=paged_adamw_32bit", "--train.reuse_dequant=false", "--train.tile_size=0",
            "--train.tile_projections=false", "--train.tile_norms=false", "--train.checkpoint_every=1",
            "--train.offload_budget_gib=0", "--train.optimizer_on_cpu=false"]
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
        "tile_norms": {"name": f"tile_size={TABLE_TILE} + tile_projections + tile_norms",
                       "overrides": [f"--train.tile_size={TABLE_TILE}", "--train.tile_projections=true",
                                     "--train.tile_norms=true"]},
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


def probe_config(args: argparse.Namespace, spec: dict) -> Config:
    """The recipe a probe runs: its levers as set (not train.plan's for this card), the baseline's or the spec's
    overrides, --override, and its --batch rows of --seq tokens (each one document:
    qlora.report.measure.random_batch), so that the estimate beside it and a truncated probe's known bytes are of
    the rows it runs, not the recipe's batch_size."""
    return base_config(args.size, [*AS_SET, *([] if spec.get("recipe") else BASELINE), *spec.get("overrides", []),
                                   *args.override, f"--data.max_seq_len={args.seq}",
                                   f"--train.batch_size={args.batch}"])


def probe(args: argparse.Namespace, spec: dict) -> dict:
    """One probe, in this (child) process: build, `--probe-steps` steps, the peak; or how it failed. With --depth the
    recipe runs cut to that many decoder layers and the whole model's peak is predicted from it."""
    with tempfile.TemporaryDirectory(prefix="qlora-depth-") as work:  # the cut model's config.json, for this probe
        return _probe(args, spec, Path(work))


def _probe(args: argparse.Namespace, spec: dict, work: Path) -> dict:
    from qlora.base.load import resolve_device
    from qlora.errors import ConfigError
    from qlora.memory.arch import load_arch
    from qlora.memory.estimate import estimate

    whole = probe_config(args, spec)
    device = resolve_device(whole.train.device)
    cfg, cut = whole, depth_of(args, spec, whole, device.type)
    if cut is not None:
        from qlora.memory.depth import truncated_config

        cfg = truncated_config(whole, cut, work)
    recorder = start_history(args, device)
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
    result.update(device_info(device), plan=spec.get("overrides", []) if spec.get("recipe") else None)
    est = estimate(whole, load_arch(whole), whole.quant.method, device.type)
    result.update(estimated_gib=est.card_bytes / 2**30, estimated_peak_gib=est.peak_bytes / 2**30,
                  layers=load_arch(whole).layers)
    if recorder is not None:
        result["history"] = stop_history(args, recorder, cfg, device)
    if result.get("ok") and cut is not None:
        from qlora.memory.depth import full_depth

        try:
            predicted = full_depth(whole, cut, int(result["peak_gib"] * 2**30), device.type)
        except ConfigError as err:  # the probe peaks elsewhere than the whole model: it stands for nothing
            return {**result, "ok": False, "refused": str(err), "depth": cut}
        result.update(depth=cut, probe_peak_gib=result["peak_gib"], peak_gib=predicted.predicted / 2**30,
                      known_gib={k: v / 2**30 for k, v in predicted.known.items()})
    budget = args.budget_gib or result["total_gib"] or 0.5
    if result.get("ok") and result["peak_gib"] > budget:
        result.update(ok=False, over_budget=True)
    return result


def depth_of(args: argparse.Namespace, spec: dict, cfg: Config, device: str) -> int | None:
    """The decoder layers this probe runs (None: all of them): --depth, or with --depth=auto the fewest whose peak
    stands for the whole model's (qlora/memory/depth.py; the whole model where that takes more than half of it)."""
    wanted = spec.get("depth", args.depth)
    if not wanted or wanted == "full":
        return None
    from qlora.memory.arch import load_arch
    from qlora.memory.depth import probe_depth

    layers = load_arch(cfg).layers
    depth = probe_depth(cfg, device) if wanted == "auto" else int(wanted)
    return depth if depth <= layers // 2 else None


def start_history(args: argparse.Namespace, device: torch.device) -> object | None:
    """Start recording the allocator (--history); returns what stop_history needs."""
    if not args.history:
        return None
    if device.type == "cuda":
        # dladdr names the C++ frames at once; torch's default (addr2line) can take minutes for a long trace.
        os.environ.setdefault("TORCH_SYMBOLIZE_MODE", "dladdr")
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks=args.history_stacks,
                                                 max_entries=args.history_entries)
        return "cuda"
    from qlora.report.recorder import AllocationRecorder

    return AllocationRecorder().__enter__()


def stop_history(args: argparse.Namespace, recorder: object, cfg: Config, device: torch.device) -> dict:
    """Write the snapshot (compacted, gzip) to --history and the attribution of its peak beside it (.txt); on CUDA
    the frames of blocks under 1 MiB are left out, which keeps a 70B probe's snapshot to a few MB."""
    from qlora.memory.arch import load_arch
    from qlora.memory.estimate import estimate
    from qlora.report import replay, snapshot
    from qlora.report.attribution import shape_for
    from qlora.report.recorder import write_snapshot

    if recorder == "cuda":
        taken = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    else:
        taken = recorder.snapshot()
        recorder.__exit__(None, None, None)
    path = Path(args.history)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_snapshot(replay.compact(taken, frames_from=2**20 if device.type == "cuda" else 0), path)
    shape = shape_for(cfg, args.seq, device.type)
    est = estimate(cfg, load_arch(cfg), cfg.quant.method, device.type)
    text = snapshot.report(replay.load(path), shape, int(args.history_min_mib * 2**20), est)
    attribution = path.with_name(path.name.split(".")[0] + ".txt")
    title = f"Allocator snapshot of one probe: {args.size} at {args.seq:,} tokens, {path.name}"
    attribution.write_text("\n".join([*header(title, record("memory_levers.py", device.type), device.type), text])
                           + "\n", encoding="utf-8")
    return {"snapshot": str(path), "bytes": path.stat().st_size, "attribution": str(attribution)}


def probe_command(args: argparse.Namespace, spec: dict, seq: int) -> list[str]:
    passed = [f"--size={args.size}", f"--batch={args.batch}", f"--probe-steps={args.probe_steps}", f"--seq={seq}",
              *[f"--override={o}" for o in args.override], "--probe", json.dumps(spec)]
    if args.budget_gib:
        passed.append(f"--budget-gib={args.budget_gib}")
    if args.depth:
        passed.append(f"--depth={args.depth}")
    if args.history:
        passed += [f"--history={args.history}", f"--history-stacks={args.history_stacks}",
                   f"--history-entries={args.history_entries}", f"--history-min-mib={args.history_min_mib}"]
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


def estimated_start(cfg: Config, budget_bytes: float, granularity: int, max_seq: int) -> int:
    """Where the measured search starts: the estimator's longest context for the recipe on a card of `budget_bytes`
    and this host's memory (qlora/memory/context.py, as `python -m qlora.memory --max-context` prints it)."""
    from qlora.memory.context import max_context

    tokens, _, _ = max_context(cfg, int(budget_bytes), host_bytes())
    return min(max(tokens // granularity * granularity, granularity), max_seq)


def host_bytes() -> int:
    """This machine's memory (MemTotal, or its memory cgroup's limit where that is less): what a plan's pinned layer
    inputs and host optimizer must fit in."""
    from qlora.memory.readings import total_bytes

    return total_bytes()


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
        recipe = Path(SIZES[args.size]["recipe"]).stem
        if args.rows:
            self.stem = Path(args.out_dir) / f"{recipe}-rows-{self.device}"
        elif args.depth and args.max_context:  # one report per emulated card: the budget is in its name
            budget = f"{args.budget_gib:g}gib".replace(".", "_") if args.budget_gib else "card"
            self.stem = Path(args.out_dir) / f"{recipe}-context-{self.device}-{budget}"
        setup = {k: getattr(args, k) for k in ("size", "batch", "probe_steps", "override", "budget_gib")}
        if args.depth:  # probes at another depth are other measurements (earlier logs have no such key)
            setup["depth"] = args.depth
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
                raise ConfigError(f"--levers {unknown[0]}: use all or some of {','.join(chosen)}")
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

        return [o for o in probe_overrides(self.searched(), seq, self.card_bytes, host_bytes())
                if not o.startswith("--data.max_seq_len=")]

    def searched(self) -> Config:
        """The recipe the context search plans and starts from, at the --batch rows its probes run (probe_config):
        at the recipe's train.batch_size, a search of 1-row probes on a recipe of 8 rows planned their levers and
        started at the lengths 8 rows fit."""
        return base_config(self.args.size, [*self.args.override, f"--train.batch_size={self.args.batch}"])

    @functools.cached_property  # nvidia-smi once, not at every probe
    def card_bytes(self) -> int:
        """The memory budget of the search: --budget-gib, else the card's."""
        return int((self.args.budget_gib or card_gib()) * 2**30)

    def max_context(self) -> None:
        args = self.args
        start = args.start_seq
        if start is None:
            if self.cuda:
                start = estimated_start(self.searched(), self.card_bytes, args.granularity, args.max_seq)
            else:
                start = args.seq
        print(f"== max context of the recipe, starting at {start:,} tokens", flush=True)
        search_max_context(self.fits, start, args.granularity, args.max_seq, args.precision, args.growth)
        self.write()

    def rows(self) -> None:
        """--rows: one probe per length with the estimator's plan for it, and --full-depth-at: the whole model once."""
        lengths = [int(x) for x in self.args.rows.split(",") if x.strip()]
        full = [self.args.full_depth_at] if self.args.full_depth_at else []
        for seq, depth in [(n, None) for n in lengths] + [(n, "full") for n in full]:
            key = f"row seq {seq}" + (" full depth" if depth else "")
            plan = self.plan(seq)
            print(f"== {key}" + (f": the estimator's plan {' '.join(plan)}" if plan else ""), flush=True)
            spec = {"recipe": True, "overrides": plan, **({"depth": depth} if depth else {})}
            if self.args.history and not (self.log.get(key) or {}).get("history"):
                self.log.done.pop(key, None)  # measured before without the recording asked for now: again
            measured(self.log, self.deadline, key, probe_command(self.args, spec, seq), self.args.probe_timeout)
            self.write()

    def row_results(self) -> list[dict]:
        """The estimate-vs-measured rows (issue 22), each with at least model, tokens, budget_gib, estimated_gib and
        measured_gib: the card's peak, predicted from a truncated probe where `depth` < `layers`."""
        cfg = base_config(self.args.size, self.args.override)
        out = []
        for key, entry in sorted(self.log.done.items(), key=lambda kv: int(kv[0].split()[2])):
            if not key.startswith("row seq "):
                continue
            r = entry["result"]
            measured_gib = r.get("peak_gib") if r.get("ok") or r.get("over_budget") else None
            out.append({"model": cfg.model.path, "recipe": SIZES[self.args.size]["recipe"],
                        "tokens": int(key.split()[2]), "budget_gib": self.args.budget_gib or r.get("total_gib"),
                        "estimated_gib": r.get("estimated_gib"), "estimated_peak_gib": r.get("estimated_peak_gib"),
                        "measured_gib": measured_gib,
                        "error": measured_gib and r.get("estimated_gib") and r["estimated_gib"] / measured_gib - 1,
                        "depth": r.get("depth", r.get("layers")), "layers": r.get("layers"),
                        "probe_gib": r.get("probe_peak_gib", measured_gib), "known_gib": r.get("known_gib"),
                        "reserved_gib": r.get("reserved_gib"), "allocated_gib": r.get("allocated_gib"),
                        "outside_gib": r.get("outside_gib"), "plan": r.get("plan"), "fits": bool(r.get("ok")),
                        "outcome": "measured" if measured_gib is not None else outcome(r),
                        "device": r.get("device_name"), "seconds": entry.get("seconds")})
        return out

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
        if self.args.rows:
            write_result(self.stem, {"device": self.device, "device_name": self.device_name(), **self.prov,
                                     "rows": self.row_results()}, rows_report(self), quiet=True)
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
                  f"granularity {args.granularity})"]
        if (theirs := UNSLOTH.get((args.size, args.budget_gib))) is not None:
            target = math.ceil(1.5 * theirs)  # the least length that is 1.5x
            ours = f" Ours is {lo / theirs:.2f}x theirs: {'at or past' if lo >= target else 'short of'} the target." \
                if lo else ""
            lines.append(f"Unsloth's published figure for this card: {theirs:,} tokens (QLoRA r=32, batch 1); "
                         f"issue 22's target, 1.5x: {target:,}.{ours}")
        depth = "predicted from a probe of the depth shown" if args.depth else "measured"
        lines += ["", f"| seq | fits | peak GiB ({depth}) | estimate GiB | depth | plan |",
                  "|---:|---|---:|---:|---|---|"]
        for seq, r in context.items():
            peak = f"{r['peak_gib']:.3f}" if "peak_gib" in r else outcome(r)
            est = f"{r['estimated_gib']:.3f}" if r.get("estimated_gib") is not None else ""
            plan = " ".join(r.get("plan") or []) or "as the recipe"
            lines.append(f"| {seq:,} | {'yes' if r.get('ok') else 'no'} | {peak} | {est} | "
                         f"{r.get('depth', r.get('layers', ''))} | {plan} |")
    return "\n".join(lines) + "\n"


def rows_report(run: Run) -> str:
    rows = run.row_results()
    lines = header(f"Estimate against measurement: {run.args.size} on {run.device_name()} ({run.device})", run.prov,
                   run.device, "CPU run at a tiny size: resident memory, not a card's. It shows the benchmark works.")
    lines += ["Each row: the card's peak (reserved + outside the allocator + context) of one probe at the recipe's "
              "plan for the length, predicted from a probe of `depth` of the model's layers plus the known bytes of "
              "the others where depth < layers (qlora/memory/depth.py); the estimate with the allocator's margin.", "",
              "| tokens | budget GiB | estimated GiB | measured GiB | estimate vs measured | depth | probe GiB | "
              "reserved / allocated / outside GiB | plan |", "|---:|---:|---:|---:|---:|---|---:|---|---|"]

    def gib(x: float | None) -> str:
        return f"{x:.2f}" if isinstance(x, int | float) else "–"

    for r in rows:
        error = f"{100 * r['error']:+.1f}%" if isinstance(r["error"], float) else r["outcome"]
        lines.append(f"| {r['tokens']:,} | {gib(r['budget_gib'])} | {gib(r['estimated_gib'])} | "
                     f"{gib(r['measured_gib'])} | {error} | {r['depth']} of {r['layers']} | {gib(r['probe_gib'])} | "
                     f"{gib(r['reserved_gib'])} / {gib(r['allocated_gib'])} / {gib(r['outside_gib'])} | "
                     f"{' '.join(r['plan'] or []) or 'as the recipe'} |")
    return "\n".join(lines) + "\n"


# Unsloth's published longest contexts (QLoRA r=32 on all linear layers, batch 1; issue 22), by the --budget-gib that
# stands for their card: 24.0 an RTX 4090, 45.0 an L40S (48 GB), 79.6 an H100 80GB (nvidia-smi's totals).
UNSLOTH = {("70b", 45.0): 12_106, ("70b", 79.6): 89_389, ("8b", 24.0): 78_475, ("8b", 45.0): 191_728,
           ("8b", 79.6): 342_733}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "8b", "70b", "70b-24gb", "8b-6gb"], default="tiny",
                        help="a recipe: tiny, llama8b, llama70b, and (issue 25, the base streamed) llama70b_24gb, "
                        "llama8b_6gb")
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
    parser.add_argument("--depth", help="probe this many decoder layers, or auto (qlora/memory/depth.py), and "
                        "predict the whole model's peak")
    parser.add_argument("--rows", help="comma-separated lengths: one probe each, estimate beside measurement")
    parser.add_argument("--full-depth-at", type=int, help="with --rows: one probe of the whole model at this length")
    parser.add_argument("--history", help="record the allocator through each probe: the snapshot (.pickle.gz) here")
    parser.add_argument("--history-stacks", choices=["python", "all"], default="all",
                        help="frames to record: all adds C++ (autograd's nodes, the kernels)")
    parser.add_argument("--history-entries", type=int, default=1_000_000, help="events kept, the newest")
    parser.add_argument("--history-min-mib", type=float, default=2.0, help="blocks named in the attribution")
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
    if not args.no_levers and not args.rows:
        run.lever_table()
    if args.rows:
        run.rows()
    if args.max_context:
        run.max_context()
    print("\n" + (rows_report(run) if args.rows else report(run)))
    if not args.no_write:
        print(f"wrote {run.stem}.json and .md")
    if run.deadline.hit:
        print(f"stopped at --deadline={args.deadline:.0f}: run the same command again to go on", flush=True)
        return CUT_SHORT
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
