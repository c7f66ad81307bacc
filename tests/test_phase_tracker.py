"""The profiler's CPU readings in this process: each phase's peak above the resident set before loading, reset at each
mark, less the unused pages of mapped checkpoint files; the training peak, what a resumed run carries, and what
`qlora.memory --measure` takes of its runs."""

from __future__ import annotations

import functools
import mmap
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from qlora.memory.profiler import PhaseTracker
from qlora.memory.readings import unused_file_pages

CPU = torch.device("cpu")
MIB = 2**20


FRESH = "QLORA_TEST_FRESH_PROCESS"  # the test a child pytest runs for its parent


def in_a_fresh_process(test: Callable) -> Callable:
    """Run `test` in a pytest of its own. The readings are this process's resident set, and a pytest worker that ran
    other files first frees their memory at moments of its own: in the suite one phase of 64 MiB read 53 MiB, and
    another 40.7 MiB where it touched 64 (alone, each reads within a page or two of what it touched)."""
    @functools.wraps(test)
    def run(*args: object, **kwargs: object) -> None:
        if os.environ.get(FRESH) == test.__name__:
            return test(*args, **kwargs)
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                                 "-o", "addopts=", f"{__file__}::{test.__name__}"],
                                env={**os.environ, FRESH: test.__name__}, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return run


def touch(mib: int) -> None:
    """Raise the resident set's high-water mark by `mib` MiB and free it (over 32 MiB: glibc maps it, and unmaps it)."""
    big = torch.ones(mib * MIB // 4)
    del big


@in_a_fresh_process
def test_each_phase_reads_its_own_peak_above_the_start():
    """A phase's peak is the resident set's rise above its level before loading, since the mark before: clear_refs
    resets the high-water mark at each mark, and a phase that touched nothing reads close to 0, not the process's
    resident set (hundreds of MiB of torch and Python) nor the phase before's 64 MiB."""
    tracker = PhaseTracker(CPU)
    tracker.watch(torch.nn.Linear(1024, 1024, bias=False))  # 4 MiB of fp32 weights, made after the start
    touch(64)
    first = tracker.mark("backward")
    second = tracker.mark("optimizer_step")["allocated"]
    assert 64 * MIB <= first["allocated"] < 80 * MIB, first
    assert second < 16 * MIB, second
    # What the tensors by category do not name is the rest: here the 64 MiB touched and freed.
    assert first["categories"]["unquantized_weights"] == 4 * MIB
    assert first["activations"] == first["allocated"] - 4 * MIB


@in_a_fresh_process
def test_the_training_peak_leaves_out_loading_and_evaluation():
    """memory.json's peak is the training phases' highest: a larger peak while loading or evaluating is reported as
    its phase's, not as the run's, and a lower training phase is not it."""
    tracker = PhaseTracker(CPU)
    for phase, mib in (("loaded", 64), ("backward", 40), ("steady", 0), ("evaluate", 64)):
        touch(mib)
        tracker.mark(phase)
    assert tracker.phases["evaluate"] > tracker.phases["backward"] > tracker.phases["steady"]
    summary = tracker.summary()
    assert summary["peak_phase"] == "backward" and summary["peak_bytes"] == tracker.phases["backward"]
    assert tracker.highest() == tracker.phases["backward"]


@in_a_fresh_process
def test_a_resumed_run_reports_the_peak_its_earlier_process_met():
    """A checkpoint carries the training phases' peaks (not loading's): the resumed process's memory.json is the whole
    run's, and a phase the new process meets again keeps the larger of the two."""
    earlier = PhaseTracker(CPU)
    for phase in ("loaded", "backward", "steady"):
        touch(64)
        earlier.mark(phase)
    carried = earlier.carried()
    assert set(carried["phases"]) == {"backward", "steady"}
    resumed = PhaseTracker(CPU)
    resumed.restore(carried)
    touch(40)
    resumed.mark("steady")
    assert resumed.phases == {"backward": earlier.phases["backward"], "steady": earlier.phases["steady"]}
    assert resumed.summary()["peak_bytes"] == max(earlier.phases["backward"], earlier.phases["steady"])


@in_a_fresh_process
def test_unused_pages_of_a_mapped_checkpoint_are_those_no_tensor_lies_in(tmp_path: Path):
    """Of a mapped .safetensors file of 8 MiB, every page read, a parameter holding its first 4 MiB: the other 4 MiB
    are resident file pages the kernel may drop, subtracted from the peak."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(8 * MIB))
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    assert sum(mapped[i] for i in range(0, 8 * MIB, mmap.PAGESIZE)) == 0  # every page resident
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.frombuffer(mapped, dtype=torch.uint8, count=4 * MIB), requires_grad=False)
    assert unused_file_pages(model) == 4 * MIB
    del model


@in_a_fresh_process
def test_measure_takes_the_smaller_runs_training_peak_with_loading_apart(monkeypatch):
    """`qlora.memory --measure` (qlora.report.measure): of --runs=2, after a warm-up whose figure is dropped, the run
    with the smaller training peak is the figure; loading's peak (lora_attached's here, above loaded's) is reported
    apart and does not set it. Phases here touch known sizes in place of a model's steps."""
    import qlora.report.measure as measuring
    from qlora.config import load_recipe

    runs = iter([(40, 40, 120), (40, 96, 48), (40, 96, 64)])  # MiB while loaded, lora_attached, backward

    def steps(cfg, n, tracker):
        loaded, attached, backward = next(runs)
        for phase, mib in (("loaded", loaded), ("lora_attached", attached), ("first_forward", 0),
                           ("backward", backward), ("optimizer_step", 0)):
            touch(mib)
            tracker.mark(phase)

    monkeypatch.setattr(measuring, "train_steps", steps)
    monkeypatch.setattr(measuring, "glibc_returns_freed_memory", lambda: None)  # this process keeps its allocator
    got = measuring.measure(load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "tiny.py"), 1, 2)
    smaller, larger = got["runs"]
    assert 44 * MIB < smaller < 56 * MIB < larger < 72 * MIB, got["runs"]  # 48 and 64 MiB, give or take pages
    assert got["measured_peak_bytes"] == smaller and got["peak_phase"] == "backward"
    assert got["load_peak_bytes"] > 88 * MIB > got["phases"]["loaded"]["allocated"]


@in_a_fresh_process
def test_the_measured_optimizer_step_holds_the_gradients():
    """The measured steps mark the optimizer step before zero_grad: its breakdown holds the adapters' fp32 gradients,
    as many bytes as the fp32 adapters."""
    from qlora.config import apply_overrides, load_recipe
    from qlora.report.measure import train_steps

    cfg = apply_overrides(load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "tiny.py"),
                          ["--train.device=cpu", "--quant.compute_dtype=fp32"])
    tracker = PhaseTracker(CPU)
    train_steps(cfg, 1, tracker)
    step = tracker.records["optimizer_step"]["categories"]
    assert step["gradients"] == step["adapters"] > 0
