"""The memory profiler: peak bytes per named phase of a run, broken down by what holds them (`memory.json`), and the
run's closing memory line.

Phases: loaded, lora_attached, first_forward, backward, optimizer_step, steady (and evaluate). Each mark records the
peak since the previous mark, then resets it; what it reads, on CUDA and on CPU, is readings.py's.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from qlora.config import Config
from qlora.errors import ConfigError
from qlora.memory.readings import nvml_used, reset_peak, resident_bytes, tensor_categories, unused_file_pages
from qlora.partial import write_aside

GIB = 2**30


class PhaseTracker:
    """Records the peak of each named phase; a phase ends when the next is marked. A repeated name keeps the larger.

    `phases` maps each phase to its peak in bytes (CUDA: reserved; CPU: resident above the baseline); `records` holds
    every figure of the phase's peak mark, with the tensors by category at that mark.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phases: dict[str, int] = {}
        self.records: dict[str, dict] = {}
        self._high: dict[str, int] = {}  # CPU: the raw high-water mark above the baseline at each phase's record
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.rows_bytes = 0  # the tokenised rows' host bytes (qlora/data/tokens.py), a category of a CPU peak
        self.context = 0
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)  # creates the context if nothing has yet
            # Device-wide: on a shared GPU other processes' memory lands here too.
            self.context = total - free - torch.cuda.memory_reserved(device)
            self.baseline = 0
        else:
            self.baseline = resident_bytes("VmRSS")
        reset_peak(device)

    def watch(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
              rows_bytes: int | None = None) -> None:
        """Break later marks down by category over these (and on CPU, the tokenised rows' `rows_bytes`)."""
        self.model = model if model is not None else self.model
        self.optimizer = optimizer if optimizer is not None else self.optimizer
        self.rows_bytes = rows_bytes if rows_bytes is not None else self.rows_bytes

    def mark(self, phase: str) -> dict:
        """Ends the phase: its peak since the last mark, kept if it is the phase's largest; returns the phase's record.
        On CPU a step that did not raise the resident set's high-water mark above the phase's record ends there: the
        walk of /proc/self/smaps and the census of tensors (some 25 ms a step, a third of the tiny recipe's time)
        would find no higher peak, give or take file pages the kernel evicted in between."""
        if self.device.type != "cuda":
            high = resident_bytes("VmHWM") - self.baseline
            if phase in self.phases and high <= self._high[phase]:
                reset_peak(self.device)
                return self.records[phase]
        cats = tensor_categories(self.model, self.optimizer, self.device) if self.model is not None else {}
        outside = cats.pop("outside_allocator", 0)
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
            record = {"allocated": torch.cuda.max_memory_allocated(self.device), "reserved": reserved,
                      "active": stats.get("active_bytes.all.peak", 0), "outside_allocator": outside,
                      "cuda_context": self.context, "card_total": reserved + outside + self.context,
                      "card_total_now": torch.cuda.memory_reserved(self.device) + outside + self.context,
                      "nvml_used_now": nvml_used(self.device)}
            peak = record["allocated"] + outside
        else:
            peak = max(0, high - unused_file_pages(self.model))
            record = {"allocated": peak, "reserved": peak, "active": peak, "outside_allocator": 0}
            if self.rows_bytes:  # read after the baseline, so inside the resident peak; on CUDA not the card's
                cats["tokenised_rows"] = self.rows_bytes
        record["categories"] = cats
        # Everything the categories do not name: activations, temporaries, allocator slack, (CPU) Python objects.
        record["activations"] = max(0, peak - sum(cats.values()))
        key = record["card_total"] if self.device.type == "cuda" else peak
        if phase not in self.phases or key > self.phases[phase]:
            self.phases[phase], self.records[phase] = key, record
            if self.device.type != "cuda":
                self._high[phase] = high
        reset_peak(self.device)
        return record

    def carried(self) -> dict:
        """The training phases' peaks and records so far, for a checkpoint: a resumed run's memory.json, closing line
        and `peak_gib` report the whole run's peak, not only what the process that resumed it met."""
        skip = ("loaded", "lora_attached")
        return {"phases": {p: v for p, v in self.phases.items() if p not in skip},
                "records": {p: v for p, v in self.records.items() if p not in skip}}

    def restore(self, carried: object) -> None:
        """Take back `carried()` of the run's earlier processes (anything malformed is ignored: it only reports)."""
        if not isinstance(carried, dict):
            return
        phases, records = carried.get("phases"), carried.get("records")
        if not isinstance(phases, dict) or not isinstance(records, dict):
            return
        for phase, value in phases.items():
            if isinstance(value, int) and isinstance(records.get(phase), dict) and phase not in self.phases:
                self.phases[phase], self.records[phase] = value, records[phase]
                if self.device.type != "cuda":
                    self._high[phase] = value  # a later mark of this phase is measured only above it

    def peak(self, skip: tuple[str, ...] = ("loaded", "lora_attached", "evaluate")) -> tuple[str, dict] | None:
        """The training phase with the highest peak (loading and evaluation are reported, not counted)."""
        phases = [p for p in self.phases if p not in skip]
        if not phases:
            return None
        name = max(phases, key=self.phases.get)
        return name, self.records[name]

    def highest(self) -> int:
        """The training peak so far, as memory.json will report it (DEFINITION): what the progress bar shows."""
        found = self.peak()
        return self.phases[found[0]] if found else 0

    def summary(self, estimate: int | None = None, shape: tuple[int, int] | None = None) -> dict:
        """memory.json: every phase, the training peak by category, and the estimate (for batches of `shape`, rows x
        tokens) when one is given."""
        found = self.peak()
        out = {"device": str(self.device), "unit": "bytes", "definition": DEFINITION[self.device.type],
               "phases": self.records, "peak_phase": found[0] if found else None,
               "peak_bytes": self.phases[found[0]] if found else None, "estimated_peak_bytes": estimate,
               "estimated_for": {"batch_size": shape[0], "seq_len": shape[1]} if shape else None}
        if found:
            rec = found[1]
            out["peak_by_category"] = {**rec["categories"], "activations": rec["activations"],
                                       "cuda_context": rec.get("cuda_context", 0)}
            if self.device.type == "cuda":  # held by the allocator in no tensor: the rest of the card's peak
                out["peak_by_category"]["allocator_cache"] = rec["reserved"] - rec["allocated"]
        return out

    def write(self, path: Path, cfg: Config | None = None, seq_len: int | None = None, processes: int = 1) -> str:
        """Write memory.json and return the one-line summary. With `cfg`, the estimator's figure beside the measured
        one, for the shape the run met: `cfg.train.batch_size` rows of `seq_len` tokens (the longest micro-batch
        it padded to; the estimator's worst case is data.max_seq_len, which a run with shorter rows never reaches).
        `processes`: the run's; rank 0 measures its own, which the estimate is of (per process of several)."""
        estimate, shape = None, None
        if cfg is not None:
            shape = (cfg.train.batch_size, seq_len or cfg.data.max_seq_len)
            estimate = estimated_peak(cfg, self.device, shape[1], processes)
        summary = self.summary(estimate, shape)
        if processes > 1:
            summary["processes"] = processes
            summary["definition"] += f"; rank 0's, one process of {processes}"
        write_aside(Path(path), json.dumps(summary, indent=2) + "\n")  # a kill while writing leaves no half file
        return one_line(summary)


DEFINITION = {
    "cuda": "peak = PyTorch reserved + outside its allocator (paged optimizer state) + CUDA context",
    "cpu": "peak = peak RSS minus RSS before the model was loaded, less unused pages of mapped checkpoint files "
           "(in a training run this includes code imported while loading; python -m qlora.memory --measure warms up "
           "first)",
}


def estimated_peak(cfg: Config, device: torch.device, seq_len: int | None = None, processes: int = 1) -> int | None:
    """The estimator's peak for this run (at `seq_len` tokens per row if given, else data.max_seq_len; per process of
    `processes`), or None where it cannot tell (an architecture it does not know)."""
    from qlora.memory.arch import load_arch
    from qlora.memory.estimate import estimate

    if seq_len is not None:
        cfg = copy.deepcopy(cfg)
        cfg.data.max_seq_len = seq_len
    try:
        return estimate(cfg, load_arch(cfg), cfg.quant.method, device.type, processes).peak_bytes
    except (ConfigError, OSError, ValueError, KeyError) as err:
        print(f"memory: no estimate for this model ({err})", file=sys.stderr)
        return None


def human(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def one_line(summary: dict) -> str:
    """The run's closing memory line: the measured peak, by category, and the estimate for the same batch shape.

    On CUDA both count the same things (PyTorch's memory, paged optimizer state, the CUDA context), so the line gives
    the estimate's error. On CPU the measured figure is the process's resident set above its start, which includes
    libraries loaded with the model and malloc's free lists, and the estimate counts tensors and the tokenised rows
    only: the line says so instead of a percentage (`python -m qlora.memory RECIPE --measure` compares the two like
    with like; docs/memory.md says how the run's figures relate).
    """
    if summary.get("peak_bytes") is None:
        return "memory: no training step was recorded"
    if not summary["peak_bytes"]:  # a CPU process that freed more before the run than the run then took
        return ("memory: the resident set never rose above its level before loading (memory this process had freed "
                "was reused): python -m qlora.memory RECIPE --measure measures the steps in a fresh process")
    peak, est, shape = summary["peak_bytes"], summary.get("estimated_peak_bytes"), summary.get("estimated_for")
    cpu = not summary["device"].startswith("cuda")
    # On CPU what the categories do not name is more than activations: libraries, Python objects, malloc slack.
    names = {"activations": "activations and the rest" if cpu else "activations"}
    parts = ", ".join(f"{names.get(k, k.replace('_', ' '))} {human(v)}"
                      for k, v in summary["peak_by_category"].items() if v >= peak / 100)
    batch = f"batches of {shape['batch_size']} x {shape['seq_len']} tokens" if shape else "the recipe's batches"
    if not cpu:
        vs = f"; estimated {human(est)} for {batch} ({100 * (est / peak - 1):+.0f}%)" if est else ""
        return f"memory: peak {human(peak)} in {summary['peak_phase']} on {summary['device']} ({parts}){vs}"
    vs = f"; the estimate, {human(est)} for {batch}, counts tensors and the rows only" if est else ""
    return f"memory: peak resident set {human(peak)} above the start, in {summary['peak_phase']} ({parts}){vs}"
