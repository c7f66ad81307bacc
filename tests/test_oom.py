"""What an out-of-memory stop says (qlora/training/oom.py, through qlora/training/guard.py's RunGuard), on a device
and a memory reading the tests set."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch

from qlora.config import Config, apply_overrides
from qlora.data.labels import IGNORE
from qlora.data.tokens import int32
from qlora.errors import EXIT_OOM, Stop
from qlora.training import oom
from qlora.training.guard import RunGuard

GIB = 2**30
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 2 GiB"


@pytest.fixture(autouse=True)
def ample_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host of 128 GiB, as the GPU machine's, for what a CUDA plan keeps there: not this machine's."""
    from qlora.memory.preflight import available_on

    monkeypatch.setattr(oom, "available_bytes", lambda: available_on(128 * GIB))


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 GiB device whose process holds 1 GiB, at its peak too."""
    monkeypatch.setattr(oom, "device_total", lambda device: 2 * GIB)
    monkeypatch.setattr(oom, "resident_bytes", lambda name: GIB)


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "1073741824 bytes.")], ids=["MemoryError", "CPU allocator"])
def test_host_memory_running_out_is_an_out_of_memory_stop(tiny_config: Config, memory: None,
                                                         error: Exception) -> None:
    with pytest.raises(Stop) as stop, RunGuard(tiny_config):
        raise error
    said = str(stop.value).splitlines()[0]
    assert stop.value.code == EXIT_OOM and said == f"out of memory in loading the model: {str(error) or 'MemoryError'}"
    with pytest.raises(RuntimeError, match="mat1 and mat2"), RunGuard(tiny_config):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


def test_the_report_names_the_phases_memory_and_the_8_bit_moments_in_the_optimizer_step(tiny_config: Config,
                                                                                     memory: None) -> None:
    profiler = types.SimpleNamespace(phases={"load": 3 * 2**20, "backward": 3 * GIB // 2})
    for phase, eight_bit in (("the optimizer step", True), ("the forward and backward", False)):
        lines = oom.oom_report(torch.OutOfMemoryError(CUDA_OOM), tiny_config, torch.device("cpu"), phase, 6, (8, 60),
                               profiler).splitlines()
        assert lines[0] == f"out of memory in {phase} of step 7, micro-batch 8 rows x 60 tokens: {CUDA_OOM}"
        assert lines[1:3] == ["memory when it failed: 1.00 GiB in use, peak 1.00 GiB in this phase, 2.00 GiB on cpu",
                              "peaks of the phases before: load 3.0 MiB, backward 1.50 GiB"]
        assert any(line.startswith("  --train.optimizer=paged_adamw_8bit: 8-bit moments") for line in lines) \
            is eight_bit


def test_without_an_estimate_the_tokens_of_a_micro_batch_shrink_by_what_the_step_needed(
        tiny_config: Config, memory: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """An architecture the estimator does not model: the step needed its 1 GiB and the 2 GiB it asked for, 3 GiB of
    the 1.90 GiB under the headroom, so rows of 128 tokens become 64 and micro-batches of 8 rows 4, the step's 8 rows
    kept in 2 of them; the logits are offered in chunks (the tiny recipe checkpoints its layers already)."""
    def unmodelled(*args: object) -> list[str]:
        raise KeyError("model_type")

    monkeypatch.setattr(oom, "suggestions", unmodelled)
    cfg = apply_overrides(tiny_config, ["--train.batch_size=8", "--train.grad_accum=1"])
    lines = oom.oom_report(torch.OutOfMemoryError(CUDA_OOM), cfg, torch.device("cpu"), "the forward and backward", 0,
                           (8, 128), None).splitlines()
    assert lines[2:6] == ["the step needed at least 3.00 GiB of 1.90 GiB; scaling the tokens per micro-batch by that "
                          "ratio (qlora.memory.estimate does not know this model), each of these alone:",
                          "  --data.max_seq_len=64", "  --train.batch_size=4 --train.grad_accum=2",
                          "  --train.loss_chunk_size=1024"], lines


def test_the_largest_micro_batch_that_fits_keeps_the_rows_of_a_step(tiny_config: Config) -> None:
    """A device between the estimates of micro-batches of 4 and 8 rows (as the check before loading counts them): 4 is
    offered, in 2 micro-batches a step, so the loss and the schedule stay the run's."""
    from qlora.memory.arch import load_arch
    from qlora.memory.estimate import estimate
    from qlora.memory.preflight import needs

    cfg = apply_overrides(tiny_config, ["--train.batch_size=8", "--train.grad_accum=1"])
    peaks = {}
    for rows in (4, 8):
        c = apply_overrides(copy.deepcopy(cfg), [f"--train.batch_size={rows}"])
        peaks[rows] = needs(estimate(c, load_arch(c), "qlora", "cpu"))[0]
    lines = oom.suggestions(cfg, torch.device("cpu"), int((peaks[4] + peaks[8]) / 2 / oom.HEADROOM), 0)
    assert any(line.startswith("  --train.batch_size=4 --train.grad_accum=2: the largest micro-batch that fits, the "
                               "same 8 rows per step") for line in lines), lines


def test_a_shorter_length_offered_beside_a_checkpoint_says_when_resume_refuses_it(tiny_config: Config, memory: None,
                                                                                   tmp_path: Path) -> None:
    """The report offered --data.max_seq_len=64 and ended 'checkpoint-2 is kept: apply one of these, then continue
    with --resume', which refuses that length for packed data (it fixes the packed rows) and where it drops rows (a
    learned part starting past it): either now says it starts a new run. A length that keeps every row, or no
    checkpoint to resume, says nothing more."""
    def seq_line(cfg: Config, rows: tuple[list, list] | None) -> str:
        lines = oom.oom_report(torch.OutOfMemoryError(CUDA_OOM), cfg, torch.device("cpu"), "the forward and backward",
                               2, (8, 128), None, rows).splitlines()
        return next(line for line in lines if line.startswith("  --data.max_seq_len=64: "))

    late, early = {"labels": int32([IGNORE] * 99 + [5, 6], "row")}, {"labels": int32([IGNORE] * 9 + [5, 6], "row")}
    new_run = "start a new run with it (--overwrite or another output.dir)"
    assert new_run not in seq_line(tiny_config, ([late], []))  # no checkpoint: a new run anyway
    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)
    for name in ("trainer_state.pt", "optimizer.pt"):
        (tmp_path / "run" / "checkpoint-2" / name).touch()
    assert seq_line(tiny_config, ([early], [early])).startswith("  --data.max_seq_len=64: the longest that fits; "
                                                                "longer rows are cut (estimated peak")
    assert f"; it drops rows of the run (their learned part starts past 64 tokens; 100 keeps every row), which " \
           f"--resume refuses: {new_run}" in seq_line(tiny_config, ([early], [late]))
    assert f"; --resume refuses it if it drops rows of the run (a row whose learned part starts past it): then " \
           f"{new_run}" in seq_line(tiny_config, None)  # out of memory before the rows were loaded
    packed = apply_overrides(tiny_config, ["--data.pack=true"])
    assert f"; data.pack fixes data.max_seq_len on --resume (another length packs other rows): {new_run}" in \
        seq_line(packed, ([early], [early]))


def test_out_of_memory_before_overwrite_cleared_the_old_run_never_sends_to_resume_it(tiny_config: Config,
                                                                                      memory: None) -> None:
    """Out of memory while loading under --overwrite, the old run's checkpoints still there (rundir.start_run clears
    them later): the report ended 'checkpoint-2 is kept: ... continue with --resume', which continues the old run (and
    is refused as another run where the fix is lora.r). It says now that the old run is as it was, and to run the
    command again; no length is said to be refused by a resume. Without a checkpoint, as before."""
    def report(replacing: bool) -> list[str]:
        with pytest.raises(Stop) as stop, RunGuard(tiny_config, replacing=replacing):
            raise torch.OutOfMemoryError(CUDA_OOM)
        return str(stop.value).splitlines()

    run = Path(tiny_config.output.dir)
    assert report(True)[-1] == "no checkpoint was written yet: apply one of these and start again"
    (run / "checkpoint-2").mkdir(parents=True)
    for name in ("trainer_state.pt", "optimizer.pt"):
        (run / "checkpoint-2" / name).touch()
    kept = report(False)
    assert kept[-1] == f"{run / 'checkpoint-2'} is kept: apply one of these, then continue with --resume"
    assert any("--resume refuses" in line for line in kept), kept
    lines = report(True)
    assert lines[-1] == (f"nothing of this run was written, and the run it replaces ({run / 'checkpoint-2'} the "
                         "newest) is as it was: apply one of these, then run the command again"), lines
    assert not any("--resume refuses" in line for line in lines), lines


@pytest.mark.parametrize(("overrides", "device", "gib"), [
    (["--data.max_seq_len=65536"], "cuda", 12), (["--data.max_seq_len=65536"], "cuda", 45),
    (["--train.device=cpu", "--data.max_seq_len=8192"], "cpu", 24)])
def test_what_the_report_offers_the_check_before_loading_takes(overrides: list[str], device: str, gib: int) -> None:
    """Each change offered is weighed as the next run's check before loading weighs it (preflight.needs): by the
    bare peak, llama8b at 65,536 tokens on 12 GiB was offered --data.max_seq_len=64000 (11.40 GiB), which the check
    refuses at 13.75 GiB with the allocator's margin, and on a 24 GiB CPU host at 8,192 tokens 8128, refused at 34.98
    GiB with the process's libraries and free lists (it names 3328)."""
    from qlora.config import load_recipe
    from qlora.errors import ConfigError
    from qlora.memory.preflight import available_on, check_fits

    root = Path(__file__).resolve().parent.parent
    cfg = apply_overrides(load_recipe(root / "recipes" / "llama8b.py"),
                          ["--train.plan=recipe", "--train.plan_batch=false", *overrides])
    total = gib * GIB
    lines = oom.suggestions(copy.deepcopy(cfg), torch.device(device), total, 0)
    offered = [[flag for flag in line.split(":")[0].split() if flag.startswith("--")] for line in lines[1:]]
    assert any(flags and flags[0].startswith("--data.max_seq_len=") for flags in offered), lines
    for flags in offered:
        changed = apply_overrides(copy.deepcopy(cfg), flags)
        try:  # the card and an ample host; on the CPU all of the host available
            check_fits(changed, torch.device(device), **({"device_bytes": total, "host_bytes": available_on(128 * GIB)}
                                                        if device == "cuda" else {"available": total}))
        except ConfigError as err:
            pytest.fail(f"{' '.join(flags)} was offered and the check refuses it: {err}")


def test_offloading_the_layer_inputs_is_offered_only_where_it_fits() -> None:
    """It was offered unweighed: llama8b at 65,536 tokens without it, on 12 GiB, was sent to a step of 13.94 GiB
    (with the allocator's margin) that the check before loading refuses; on 16 GiB it fits, and is offered."""
    from qlora.config import load_recipe

    root = Path(__file__).resolve().parent.parent
    cfg = apply_overrides(load_recipe(root / "recipes" / "llama8b.py"), [
        "--train.plan=recipe", "--train.plan_batch=false", "--data.max_seq_len=65536",
        "--train.offload_activations=false"])
    offered = {gib: [line for line in oom.suggestions(copy.deepcopy(cfg), torch.device("cuda"), gib * GIB, 0)
                     if line.startswith("  --train.offload_activations=true")] for gib in (12, 16)}
    assert not offered[12] and offered[16], offered
    assert offered[16][0].endswith("wait in CPU memory (estimated peak 13.94 GiB)"), offered


def test_a_step_that_needed_more_than_its_estimate_scales_each_offer_by_what_it_needed() -> None:
    """On CUDA the failed step's own peak corrects the estimate, allocated against allocated (the estimate's bare
    peak, never its margin): each offer and the head line's figure are the check's need (with the allocator's margin)
    times that scale, once. A step that needed more than the bare peak but less than the peak with the margin is
    scaled too."""
    from qlora.config import load_recipe
    from qlora.memory.arch import load_arch
    from qlora.memory.estimate import estimate
    from qlora.memory.preflight import needs

    root = Path(__file__).resolve().parent.parent
    cfg = apply_overrides(load_recipe(root / "recipes" / "llama8b.py"),
                          ["--train.plan=recipe", "--train.plan_batch=false", "--data.max_seq_len=65536"])
    est, total = estimate(cfg, load_arch(cfg), "qlora", "cuda"), 45 * GIB
    assert est.margin
    for needed in ((est.peak_bytes + needs(est)[0]) // 2, est.peak_bytes * 3 // 2):
        scale = needed / est.peak_bytes
        lines = oom.suggestions(copy.deepcopy(cfg), torch.device("cuda"), total, needed)
        assert lines[0] == (f"estimated peak of this recipe {needs(est)[0] * scale / GIB:.2f} GiB (qlora.memory."
                            f"estimate, with the allocator's margin, as the check before loading counts it, scaled "
                            f"x{scale:.2f} to what the failed step needed); each of these alone fits under "
                            f"{oom.HEADROOM * total / GIB:.2f} GiB:"), lines
        seq = int(lines[1].split("--data.max_seq_len=")[1].split(":")[0])
        shorter = apply_overrides(copy.deepcopy(cfg), [f"--data.max_seq_len={seq}"])
        figure = needs(estimate(shorter, load_arch(cfg), "qlora", "cuda"))[0] * scale
        assert lines[1].endswith(f"(estimated peak {figure / GIB:.2f} GiB)"), lines


def test_what_the_host_cannot_hold_is_not_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the next run's check weighs the host too (what the plan keeps there, against what is available): on a
    host of 128 GiB llama8b at 65,536 tokens is offered its layer inputs in host memory on 16 GiB, and as shipped
    (those offloaded) the optimizer state in host memory on 15 GiB; with 3 GiB available (this process's own memory
    counted as freed by then) the check refuses each, and the report offered them all the same."""
    from qlora.config import load_recipe
    from qlora.errors import ConfigError
    from qlora.memory.preflight import check_fits

    root = Path(__file__).resolve().parent.parent
    shipped = apply_overrides(load_recipe(root / "recipes" / "llama8b.py"), [
        "--train.plan=recipe", "--train.plan_batch=false", "--data.max_seq_len=65536"])
    cases = [(apply_overrides(copy.deepcopy(shipped), ["--train.offload_activations=false"]), 16,
              "--train.offload_activations=true"), (shipped, 15, "--train.optimizer_on_cpu=true")]

    def offered(cfg: Config, gib: int) -> list[str]:
        lines = oom.suggestions(copy.deepcopy(cfg), torch.device("cuda"), gib * GIB, 0)
        return [line.split(":")[0].strip() for line in lines[1:]]

    assert [flag in offered(cfg, gib) for cfg, gib, flag in cases] == [True, True]
    monkeypatch.setattr(oom, "resident_bytes", lambda name: GIB)
    monkeypatch.setattr(oom, "available_bytes", lambda: 2 * GIB)
    for cfg, gib, flag in cases:
        assert flag not in offered(cfg, gib), offered(cfg, gib)
        with pytest.raises(ConfigError, match="in host memory"):  # what the check before loading says of it there
            check_fits(apply_overrides(copy.deepcopy(cfg), [flag]), torch.device("cuda"), device_bytes=gib * GIB,
                       host_bytes=3 * GIB)
