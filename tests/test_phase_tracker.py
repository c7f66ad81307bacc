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
    # A second parameter on the first's storage is the same pages; a buffer in the file is used as a parameter is.
    model.head = torch.nn.Parameter(model.weight[:MIB], requires_grad=False)
    model.register_buffer("scale", torch.frombuffer(mapped, dtype=torch.uint8, count=2 * MIB, offset=4 * MIB))
    assert unused_file_pages(model) == 2 * MIB
    del model
    mapped.close()
    # A parameter on pages never read: no resident page is unused, and its own are not taken off the others'.
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.frombuffer(mapped, dtype=torch.uint8), requires_grad=False)
    assert unused_file_pages(model) == 0
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


@in_a_fresh_process
def test_a_repeated_phase_takes_a_higher_step_and_a_lower_step_resets_the_peak():
    """A step below the phase's record ends at the high-water mark check, which still resets the peak: the next phase
    reads its own, not that step's 48 MiB; a later step above the record is measured and kept."""
    tracker = PhaseTracker(CPU)
    touch(72)
    first = tracker.mark("steady")["allocated"]
    touch(48)
    assert tracker.mark("steady")["allocated"] == first  # lower: the record stands
    assert tracker.mark("evaluate")["allocated"] < 16 * MIB
    touch(96)
    tracker.mark("steady")
    assert first < 88 * MIB <= tracker.phases["steady"], (first, tracker.phases)


@in_a_fresh_process
def test_a_marks_peak_leaves_out_mapped_checkpoint_pages_no_tensor_lies_in(tmp_path: Path):
    """A 64 MiB .safetensors file mapped and read after the start, a parameter on its first 8 MiB: the other 56 MiB
    are resident but the kernel's to drop, so the phase's peak is the 8 MiB, not the 64."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(64 * MIB))
    tracker = PhaseTracker(CPU)  # after the write: its 64 MiB of bytes are not the phase's
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    assert sum(mapped[i] for i in range(0, 64 * MIB, mmap.PAGESIZE)) == 0  # every page resident
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.frombuffer(mapped, dtype=torch.uint8, count=8 * MIB), requires_grad=False)
    tracker.watch(model)
    record = tracker.mark("backward")
    assert 8 * MIB <= record["allocated"] < 24 * MIB, record
    assert record["categories"]["unquantized_weights"] == 8 * MIB
    del model, tracker


def test_a_cuda_mark_counts_paged_state_once_and_keeps_a_repeated_phases_larger_peak(monkeypatch):
    """A CUDA mark, the card's counters set by hand (context 4 MiB): optimizer state paged outside the allocator
    (1 MiB) is optimizer state in the categories and outside the allocator in the card's total, not a category of its
    own as well; a later step of the same phase with a smaller card total leaves the larger."""
    card = {"mem_get_info": (10 * MIB, 16 * MIB), "memory_reserved": 2 * MIB, "memory_stats": {},
            "max_memory_reserved": 9 * MIB, "max_memory_allocated": 7 * MIB, "reset_peak_memory_stats": None,
            "device_memory_used": 12 * MIB}
    for name in card:
        monkeypatch.setattr(torch.cuda, name, lambda *_, name=name: card[name])
    model = torch.nn.Linear(512, 512)  # host tensors, the optimizer's and a frozen bias: not the card's
    model.bias.requires_grad_(False)
    optimizer = torch.optim.AdamW([model.weight])
    model(torch.randn(2, 512)).sum().backward()
    optimizer.step()
    optimizer.state[model.weight]["exp_avg"].is_paged = True
    tracker = PhaseTracker(torch.device("cuda", 0))
    assert tracker.context == 4 * MIB
    tracker.watch(model, optimizer)
    card["memory_reserved"] = 5 * MIB
    first = tracker.mark("steady")
    assert first["categories"] == {"quantized_weights": 0, "unquantized_weights": 0, "adapters": 0, "gradients": 0,
                                   "optimizer_state": MIB}
    assert (first["outside_allocator"], first["card_total"], first["card_total_now"]) == (MIB, 14 * MIB, 10 * MIB)
    assert first["activations"] == 7 * MIB  # allocated + outside, less the categories
    card.update(max_memory_reserved=6 * MIB, max_memory_allocated=5 * MIB)
    tracker.mark("steady")
    assert tracker.phases == {"steady": 14 * MIB} and tracker.records["steady"] is first


def test_a_malformed_carried_record_is_ignored_on_resume():
    """What a checkpoint carries is read back only where it is a phase's int peak with a record beside it: a string
    peak or a missing record is dropped, not taken to fail the resumed run's next mark or its memory.json."""
    tracker = PhaseTracker(CPU)
    record = {"allocated": 7, "reserved": 7, "active": 7, "outside_allocator": 0, "categories": {}, "activations": 7}
    for carried in (None, [], {"phases": []}, {"phases": {}, "records": None}):
        tracker.restore(carried)
    tracker.restore({"phases": {"steady": "12", "backward": 9, "optimizer_step": 7},
                     "records": {"steady": record, "backward": None, "optimizer_step": record}})
    assert tracker.phases == {"optimizer_step": 7}
    tracker.mark("steady")
    assert tracker.summary()["peak_phase"] in ("optimizer_step", "steady")
