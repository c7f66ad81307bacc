"""Measure the memory of real training steps for one method, in a process of its own.

    python -m qlora.report.measure RECIPE.py --quant.method=qlora --out=FILE.json [--steps=3] [--runs=1]
        [--section.key=value ...]

The steps take the trainer's own path: `qlora.training.assemble.prepare` (load, adapters, checkpointing, levers),
`loss_sum`, backward, gradient clipping and the optimizer of `build_optimizer`. The batch is random token ids of exactly
`train.batch_size` x `data.max_seq_len`, every position a target: the worst case of the recipe's shape (with
`data.pack`, each row four documents).

Each method gets a fresh process, so that no method inherits another's allocator caches. On CPU the process first
runs the same load and one step once and frees them (a warm-up), so that one-time costs (imports, kernel and thread
pool set-up, per-shape kernel caches) stay out of the figure; and glibc is told to return every block of 8 KiB or
more to the OS when freed (readings.MEASURE_MMAP_THRESHOLD), so that the resident set follows the live tensors instead
of malloc's free lists.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qlora.cli import run
from qlora.commands import wants_help
from qlora.config import Config, parse_args
from qlora.errors import ConfigError, check_ascii_number, check_writable
from qlora.memory.profiler import PhaseTracker
from qlora.memory.readings import glibc_returns_freed_memory, resident_bytes
from qlora.partial import write_aside
from qlora.training.assemble import prepare
from qlora.training.loss import loss_sum
from qlora.training.optimizer import build_optimizer, stepped_params

USAGE = ("python -m qlora.report.measure RECIPE.py --quant.method=qlora --out=FILE.json [--steps=3] [--runs=1] "
         "[--section.key=value ...]")
CPU_DEFINITION = ("resident memory (RSS) of a fresh process at its peak, minus its RSS just before the model was "
                  "loaded, after a warm-up run of the same load and step was freed (so imports and one-time kernel "
                  "set-up are excluded), less resident pages of memory-mapped checkpoint files that no tensor uses; "
                  "with --runs=N, the smallest of N such runs, each begun after the one before it was freed")


def _release() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


PACKED_DOCUMENTS = 4  # with data.pack, each measured row holds this many documents of (nearly) equal length


def random_batch(cfg: Config, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random ids, every position a target; with data.pack, rows of PACKED_DOCUMENTS documents whose positions
    restart, as qlora.data.pack makes them (a packed row's attention is its documents')."""
    g = torch.Generator().manual_seed(cfg.train.seed)
    b, s = cfg.train.batch_size, cfg.data.max_seq_len
    ids = torch.randint(0, vocab, (b, s), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if cfg.data.pack:
        docs = [len(part) for part in torch.arange(s).tensor_split(min(PACKED_DOCUMENTS, s))]
        batch["position_ids"] = torch.cat([torch.arange(n) for n in docs]).expand(b, s).contiguous()
    return {k: v.to(device) for k, v in batch.items()}


def train_steps(cfg: Config, steps: int, tracker: PhaseTracker | None) -> None:
    """Load, attach, then `steps` optimizer steps on random tokens, marking each phase on `tracker`."""
    run = prepare(cfg, profiler=tracker)
    model = run["model"]
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    params = stepped_params(optimizer)
    mark = tracker.mark if tracker is not None else (lambda phase: None)
    if tracker is not None:
        tracker.watch(model, optimizer)
    batch = random_batch(cfg, model.config.vocab_size, run["device"])
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    model.train()
    t = cfg.train
    for step in range(steps):
        first = step == 0
        loss = loss_sum(model, batch, t.loss_chunk_size) / n_targets
        if first:
            mark("first_forward")
        loss.backward()
        del loss
        mark("backward" if first else "steady")
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        optimizer.step()
        mark("optimizer_step" if first else "steady")  # before zero_grad, so that the breakdown shows the gradients
        optimizer.zero_grad(set_to_none=True)


def measure(cfg: Config, steps: int = 3, runs: int = 1) -> dict:
    """Peak memory of `steps` training steps of `cfg` (its quant.method), phase by phase. With `runs` > 1 the load and
    steps run that many times, each freed before the next (as the warm-up is before the first), and the run with the
    smallest peak is the figure: one that met the machine's own disturbance does not count."""
    from qlora.base.load import resolve_device

    device = resolve_device(cfg.train.device)
    started = time.perf_counter()

    def one_run(n_steps: int) -> tuple[dict, PhaseTracker, int]:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        tracker = PhaseTracker(device)
        baseline = resident_bytes("VmRSS") if device.type == "cpu" else 0
        train_steps(cfg, n_steps, tracker)
        summary = tracker.summary()
        tracker.model = tracker.optimizer = None  # the run's model and optimizer freed before the next run
        _release()
        return summary, tracker, baseline

    if device.type == "cpu":
        glibc_returns_freed_memory()
        one_run(1)  # the warm-up, through the same code as the runs (the tracker's included); its figure dropped
    measured = [one_run(steps) for _ in range(runs)]
    summary, tracker, baseline = min(measured, key=lambda m: m[0]["peak_bytes"] or 0)
    return {"method": cfg.quant.method, "device": device_name(device), "steps": steps,
            "seconds": round(time.perf_counter() - started, 1), "baseline_rss_bytes": baseline,
            "measured_peak_bytes": summary["peak_bytes"], "peak_phase": summary["peak_phase"],
            "runs": [m[0]["peak_bytes"] for m in measured],
            "measured_components": summary.get("peak_by_category"),
            "load_peak_bytes": max((v for k, v in tracker.phases.items() if k in ("loaded", "lora_attached")),
                                   default=None),
            "definition": CPU_DEFINITION if device.type == "cpu" else summary["definition"],
            "phases": summary["phases"]}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def measure_in_subprocess(recipe: str, overrides: list[str], method: str, steps: int = 3) -> dict:
    """Run `measure` for one method in a fresh Python process; return its result, or {"error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "measured.json"
        cmd = [sys.executable, "-m", "qlora.report.measure", recipe, *overrides, f"--quant.method={method}",
               f"--out={out}", f"--steps={steps}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=os.environ.copy())
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
        return json.loads(out.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    if wants_help(argv):  # qlora.memory --measure runs it; a user may too
        print(__doc__, end="")
        return 0
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), None)
    counts = {}
    for flag, default in (("--steps=", 3), ("--runs=", 1)):
        value = next((a.split("=", 1)[1] for a in argv if a.startswith(flag)), str(default))
        check_ascii_number(flag[:-1], value)
        if not (value.isascii() and value.isdigit()) or int(value) < 1:  # isdigit alone takes '²', int() does not
            raise ConfigError(f"{flag}{value}: give a whole number of at least 1 ({USAGE})")
        counts[flag] = int(value)
    rest = [a for a in argv if not a.startswith(("--out=", "--steps=", "--runs="))]
    cfg, flags = parse_args(rest, USAGE)
    if flags or out is None:
        raise ConfigError(f"{'unknown flag ' + flags[0] if flags else 'no --out=FILE.json'}: {USAGE}")
    if not out.strip():
        raise ConfigError("--out= is empty: give the path of the JSON file, e.g. --out=measured.json")
    check_writable(Path(out), "--out")  # before the model loads and the steps run, not after
    result = measure(cfg, counts["--steps="], counts["--runs="])
    write_aside(Path(out), json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
