"""A run that is killed, interrupted, starved of disk or memory, or fed non-finite numbers: nothing is lost.

Real processes (forked from one that imported qlora.train once, see tests/forked_cli.py) run the tiny recipe; each
interrupted run is resumed and must end with exactly the adapter, losses and learning rates of an uninterrupted one.
Faults that cannot be caused from outside (a kill at an exact point of a save, NaN, CUDA out of memory) are injected
by a `prelude` that patches torch in the child before the CLI starts.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from forked_cli import ROOT
from safetensors.torch import load_file, save_file
from support import finished_run

from qlora.base.build import ensure_checkpoint
from qlora.config import apply_overrides, load_recipe
from qlora.data.batches import batch_rows
from qlora.errors import exit_status
from qlora.memory.arch import load_arch
from qlora.memory.estimate import estimate
from qlora.memory.preflight import needs
from qlora.memory.profiler import PhaseTracker
from qlora.training import checkpoint
from qlora.training.checkpoint import STATE, list_checkpoints, prune, remove_checkpoint
from qlora.training.metrics import MetricsLog, check_kept
from qlora.training.oom import HEADROOM
from qlora.training.rundir import start_run

STEPS = 8
# 4 rows x 2 micro-batches per step, dropout on (resume must restore its RNG), an evaluation every 3 steps.
ARGS = ["recipes/tiny.py", f"--train.steps={STEPS}", "--train.save_every=1", "--train.keep_checkpoints=2",
        "--train.eval_every=3", "--train.log_every=1", "--train.batch_size=4", "--train.grad_accum=2",
        "--lora.dropout=0.1"]
N_TRAIN = len((ROOT / "recipes/data/tiny/train.jsonl").read_text().splitlines())  # held-out rows: a file of their own


@pytest.fixture(scope="module")
def reference(cli, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = cli.run([*ARGS, f"--output.dir={out}"])
    assert result.status == 0, result.stderr
    return out


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def metrics(run: Path) -> list[dict]:
    """What must match between runs: every logged loss, lr, gradient norm and evaluation (not speed or memory)."""
    keep = ("step", "loss", "lr", "grad_norm", "eval_loss", "eval_exact_match")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k in keep} for line in lines]


def assert_same_run(run: Path, reference: Path) -> None:
    expected, got = adapter(reference), adapter(run)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    assert metrics(run) == metrics(reference)
    assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def wait_for_step(run: Path, step: int, timeout: float = 120) -> None:
    """Until metrics.jsonl has a training line for `step` (written right after that step's update)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            lines = (run / "metrics.jsonl").read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if any(f'"step": {step},' in line and '"loss"' in line for line in lines):
            return
        time.sleep(0.005)
    raise TimeoutError(f"{run} never reached step {step}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_random_moments_then_resume_ends_with_the_same_adapter(cli, reference, tmp_path, seed):
    rng = random.Random(seed)
    out = tmp_path / "run"
    # First kill: a random moment after a random step (in the update, an evaluation, or a save that follows it).
    pid = cli.start([*ARGS, f"--output.dir={out}"])
    wait_for_step(out, rng.randint(1, STEPS - 3))
    time.sleep(rng.uniform(0, 0.4))
    os.kill(pid, signal.SIGKILL)
    assert cli.wait(pid).status == -signal.SIGKILL, "the run ended before the kill: nothing was tested"
    # Second kill: a random moment of the resumed run, loading included.
    pid = cli.start([*ARGS, f"--output.dir={out}", "--resume"])
    time.sleep(rng.uniform(0.2, 2.5))
    os.kill(pid, signal.SIGKILL)
    cli.wait(pid)
    result = cli.run([*ARGS, f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert_same_run(out, reference)


# The levers a user combines, each with state a resume must carry or rebuild: packed rows, sequence tiles (MLP,
# projections, norms), a chunked loss, warmup then cosine, 8-bit paged Adam's state. Checked by hand for each alone.
LEVERS = ["--data.pack=true", "--train.tile_size=16", "--train.tile_projections=true", "--train.tile_norms=true",
          "--train.loss_chunk_size=16", "--train.schedule=cosine", "--train.warmup_steps=3",
          "--train.optimizer=paged_adamw_8bit"]


def test_kill_9_then_resume_with_the_levers_on_ends_with_the_same_adapter(cli, tmp_path):
    reference = tmp_path / "reference"
    assert cli.run([*ARGS, *LEVERS, f"--output.dir={reference}"]).status == 0
    out = tmp_path / "run"
    pid = cli.start([*ARGS, *LEVERS, f"--output.dir={out}"])
    wait_for_step(out, 3)  # mid-warmup, between an evaluation and the next checkpoint's save
    time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    assert cli.wait(pid).status == -signal.SIGKILL, "the run ended before the kill: nothing was tested"
    result = cli.run([*ARGS, *LEVERS, f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert_same_run(out, reference)


KILL_ON_SAVE = """
import os, signal, torch
save, calls = torch.save, [0]
def killing_save(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {call}:  # this save never happens: the process dies with its checkpoint half-written
        os.kill(os.getpid(), signal.SIGKILL)
    return save(*args, **kwargs)
torch.save = killing_save
"""


def test_a_half_written_checkpoint_is_never_taken_for_a_complete_one(cli, reference, tmp_path):
    out = tmp_path / "run"
    # torch.save runs twice per checkpoint (optimizer, trainer state): the 3rd call is checkpoint-2's optimizer,
    # after its adapter is on disk.
    result = cli.run([*ARGS, f"--output.dir={out}"], prelude=KILL_ON_SAVE.format(call=3))
    assert result.status == -signal.SIGKILL
    # optimizer.pt is there but empty: opened, then the process died inside torch.save.
    assert sorted(p.name for p in (out / ".tmp-checkpoint-2").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.pt"]
    assert list_checkpoints(out) == [out / "checkpoint-1"]
    result = cli.run([*ARGS, f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert "resumed from" in result.stdout and "checkpoint-1 at step 1" in result.stdout
    assert_same_run(out, reference)


SIGNAL_IN_SAVE = """
import os, signal
import qlora.training.checkpoint as ckpt
save_weights = ckpt.save_weights
def signalling_save_weights(model, cfg, base_path, out_dir, *args):
    save_weights(model, cfg, base_path, out_dir, *args)
    if out_dir.name == "{folder}":  # the adapter is written, the folder not yet renamed into place
        for _ in range({times}):
            os.kill(os.getpid(), signal.{sig})
ckpt.save_weights = signalling_save_weights
"""
KILL_IN_FINAL_SAVE = SIGNAL_IN_SAVE.format(sig="SIGKILL", times=1, folder=".tmp-final")


def test_a_kill_while_the_adapter_is_written_leaves_no_half_adapter(cli, reference, tmp_path):
    out = tmp_path / "run"
    assert cli.run([*ARGS, f"--output.dir={out}"], prelude=KILL_IN_FINAL_SAVE).status == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists() and (out / ".tmp-final").is_dir()
    result = cli.run([*ARGS, f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert_same_run(out, reference)


def test_a_signal_while_the_adapter_is_written_lets_the_finished_run_end_done(cli, reference, tmp_path):
    """SIGTERM after the final evaluation, as the adapter was written, said "stopping after the step in flight, with a
    checkpoint" and then the run ended 0, its adapter written: the line was not true. It says now that the run ends
    done; a second signal stops it at once, with the last step's checkpoint, as the line says."""
    out, again, final = tmp_path / "run", tmp_path / "again", {"sig": "SIGTERM", "folder": ".tmp-final"}
    result = cli.run([*ARGS, f"--output.dir={out}"], prelude=SIGNAL_IN_SAVE.format(times=1, **final))
    assert result.status == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "SIGTERM: the run is done but for writing its adapter and memory.json: it ends when they are written, exit 0 "
        "(SIGTERM again stops at once, and --resume then writes them)"), result.stderr
    assert f"adapter written to {out}" in result.stdout and (out / "memory.json").is_file()
    assert_same_run(out, reference)
    result = cli.run([*ARGS, f"--output.dir={again}"], prelude=SIGNAL_IN_SAVE.format(times=2, **final))
    assert result.status == 128 + signal.SIGTERM, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"stopped by SIGTERM; {again}/checkpoint-{STEPS} is intact: "
                                                      "continue with --resume")
    assert not (again / "adapter_model.safetensors").exists()  # --resume writes it (as after a kill there, above)


def test_a_signal_while_a_checkpoint_is_written_stops_with_it(cli, tmp_path):
    """SIGTERM as checkpoint-3 was written let the run train step 4 (minutes of a large model, perhaps past a
    scheduler's grace period) before it stopped with checkpoint-4; that step 3's checkpoint holds the run."""
    out = tmp_path / "run"
    result = cli.run([*ARGS, f"--output.dir={out}"],
                     prelude=SIGNAL_IN_SAVE.format(sig="SIGTERM", times=1, folder=".tmp-checkpoint-3"))
    assert result.status == 128 + signal.SIGTERM, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"stopped by SIGTERM after step 3; {out}/checkpoint-3 holds it: "
                                                      "continue with --resume")
    assert [line["step"] for line in metrics(out) if "loss" in line] == [1, 2, 3]
    assert list_checkpoints(out)[-1] == out / "checkpoint-3"


def test_a_signal_as_a_finished_run_unwinds_leaves_it_done(cli, tmp_path):
    """Once the run's watch had put the command's handlers back, a SIGTERM ended the finished run 143 with "stopped by
    SIGTERM; .../checkpoint-1 is intact: continue with --resume", its adapter and memory.json written."""
    out = tmp_path / "run"
    prelude = ("import os, signal\nfrom qlora.training.guard import RunGuard\nexit_ = RunGuard.__exit__\n"
               "def signalled(self, *args):\n    exit_(self, *args)\n    os.kill(os.getpid(), signal.SIGTERM)\n"
               "RunGuard.__exit__ = signalled\n")
    result = cli.run([*ARGS, "--train.steps=1", f"--output.dir={out}"], prelude=prelude)
    assert result.status == 0 and "stopped" not in result.stderr, result.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "memory.json").is_file()


def test_a_kill_between_the_adapters_renames_leaves_no_adapter_config_without_its_weights(tmp_path, monkeypatch):
    """The final adapter's files are renamed into place one by one, the weights first: killed between the two, the
    run dir holds the new weights and no adapter_config.json, never a config that PEFT takes for an adapter beside no
    weights (or the earlier end's)."""
    def weights_and_config(model, cfg, base_path, out_dir, step):
        (out_dir / "adapter_model.safetensors").write_bytes(b"weights")
        (out_dir / "adapter_config.json").write_text("{}")

    renamed, replace = [], os.replace

    def killed_after_one(src: object, dst: object) -> None:
        if renamed:
            raise KeyboardInterrupt  # as a kill: nothing after it runs
        renamed.append(Path(dst).name)
        replace(src, dst)

    monkeypatch.setattr(checkpoint, "save_weights", weights_and_config)
    monkeypatch.setattr(os, "replace", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_final(None, None, "", tmp_path, 1)
    assert renamed == ["adapter_model.safetensors"]
    assert not (tmp_path / "adapter_config.json").exists()


# A run stopped after its last checkpoint (killed between that checkpoint's rename and the pruning of older ones, or
# in the final evaluation; a SIGINT in that evaluation) and resumed: the resume trains no step and writes no
# checkpoint, yet must leave what an uninterrupted run leaves: train.keep_checkpoints checkpoints, and a memory line
# and memory.json of the run's steps. A signal there stops the run as after a step (exit 130), not after the adapter.
KILL_BEFORE_PRUNING = """
import os, signal
import qlora.training.checkpoint as ckpt
remove = ckpt.remove_checkpoint
def killing_remove(path):
    if path.name != "checkpoint-{step}" and (path.parent / "checkpoint-{step}").is_dir():  # renamed, not yet pruned
        os.kill(os.getpid(), signal.SIGKILL)
    remove(path)
ckpt.remove_checkpoint = killing_remove
"""


SIGINT_IN_FINAL_EVAL = """
import os, signal
import qlora.training.step as step  # `python -m qlora.train` imports evaluate from it as it starts
evaluate, calls = step.evaluate, [0]
def interrupted_evaluate(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {call}:  # the final evaluation: Ctrl-C while it runs
        os.kill(os.getpid(), signal.SIGINT)
    return evaluate(*args, **kwargs)
step.evaluate = interrupted_evaluate
"""


def test_a_kill_before_the_last_checkpoint_prunes_leaves_keep_checkpoints_after_resume(cli, reference, tmp_path):
    out = tmp_path / "run"
    result = cli.run([*ARGS, f"--output.dir={out}"], prelude=KILL_BEFORE_PRUNING.format(step=STEPS))
    assert result.status == -signal.SIGKILL
    assert len(list_checkpoints(out)) == 3  # keep_checkpoints=2, and one more the kill left
    result = cli.run([*ARGS, f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert_same_run(out, reference)
    assert [p.name for p in list_checkpoints(out)] == [p.name for p in list_checkpoints(reference)]


def test_a_run_resumed_after_its_last_checkpoint_reports_the_memory_of_its_steps(cli, reference, tmp_path):
    out = tmp_path / "run"
    assert cli.run([*ARGS, f"--output.dir={out}"], prelude=KILL_IN_FINAL_SAVE).status == -signal.SIGKILL
    result = cli.run([*ARGS, f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert_same_run(out, reference)
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("memory: peak") and "no training step" not in line, line
    got, expected = (json.loads((run / "memory.json").read_text()) for run in (out, reference))
    assert got["peak_bytes"] is not None and got["peak_phase"] is not None
    assert got["estimated_for"] == expected["estimated_for"]  # the longest micro-batch the run met, not max_seq_len


def test_a_signal_in_the_final_evaluation_stops_with_the_last_checkpoint(cli, reference, tmp_path):
    out = tmp_path / "run"
    evaluations = 1 + (STEPS - 1) // 3 + 1  # before training, every 3 steps (not at the last), after training
    result = cli.run([*ARGS, f"--output.dir={out}"], prelude=SIGINT_IN_FINAL_EVAL.format(call=evaluations))
    assert result.status == 128 + signal.SIGINT, result.stderr
    assert f"stopped by SIGINT after step {STEPS}" in result.stderr
    assert not (out / "adapter_model.safetensors").exists()
    result = cli.run([*ARGS, f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert_same_run(out, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_step_saves_and_exits(cli, reference, tmp_path, sig):
    out = tmp_path / "run"
    # No periodic saves: the checkpoint the run stops with is the signal's own.
    pid = cli.start([*ARGS, f"--output.dir={out}", "--train.save_every=0"])
    wait_for_step(out, 2)
    os.kill(pid, sig)
    result = cli.wait(pid)
    assert result.status == 128 + sig, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    m = re.fullmatch(rf"stopped by {sig.name} after step (\d+); (.+) holds it: continue with --resume", last)
    assert m, result.stderr
    step = int(m.group(1))
    assert 2 <= step < STEPS and list_checkpoints(out) == [out / f"checkpoint-{step}"] == [Path(m.group(2))]
    assert f"{sig.name}: stopping after the step in flight, with a checkpoint ({sig.name} again stops at once)" in \
        result.stderr  # said when the signal came, not only at the end
    logged = [line["step"] for line in metrics(out) if "loss" in line]
    assert logged == list(range(1, step + 1))  # the step in flight finished; no other began
    result = cli.run([*ARGS, f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert_same_run(out, reference)


# Room for two checkpoints and part of a third: the third save fails in its adapter (safetensors, written first: it
# said "Error while serializing: I/O error: No space left on device (os error 28)" and "remove the cause") or in its
# optimizer state (torch.save).
@pytest.mark.parametrize("room", [2.15, 2.5], ids=["in the adapter", "in the optimizer state"])
def test_disk_full_keeps_the_previous_checkpoint_and_says_so(cli, reference, tmp_path, room):
    checkpoint_bytes = sum(f.stat().st_size for f in (reference / f"checkpoint-{STEPS}").iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    size_kib = int(room * checkpoint_bytes / 1024) + 64
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        out = disk / "run"
        result = cli.run([*ARGS, f"--output.dir={out}"])
        assert result.status == 5, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last == (f"error: could not write checkpoint-3 in {out} (No space left on device); "
                        f"{out}/checkpoint-2 is intact: free some space, then continue with --resume")
        assert "Traceback" not in result.stderr
        assert list_checkpoints(out) == [out / "checkpoint-1", out / "checkpoint-2"]
        assert not (out / ".tmp-checkpoint-3").exists()
        moved = tmp_path / "run"  # "free some space": the run moves to a disk with room, and resumes
        shutil.copytree(out, moved)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
    result = cli.run([*ARGS, f"--output.dir={moved}", "--resume"])
    assert result.status == 0, result.stderr
    assert "checkpoint-2 at step 2" in result.stdout
    assert_same_run(moved, reference)


def test_a_file_size_limit_is_said_with_its_fix(cli, tmp_path):
    """A write beyond a file-size limit (`ulimit -f`, a FAT32 disk's 4 GiB) failing as 'File too large' ended a
    checkpoint in 'remove the cause', and run_config.json in 'choose another output.dir': neither lifts it. Run under
    a limit of 300 KB the tiny recipe's 512 KiB adapter cannot be written; with no limit, the run resumes."""
    ensure_checkpoint(load_recipe(ROOT / "recipes/tiny.py"))  # the base's cache, written before the limit
    out = tmp_path / "run"
    argv = [*ARGS, f"--output.dir={out}"]
    limit = "import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))\n"
    limited = cli.run(argv, prelude=limit)
    assert limited.status == 5, limited.stderr
    assert re.fullmatch(r"error: could not write checkpoint-1 in \S+ \(File too large\); there is no earlier "
                        r"checkpoint: raise the file-size limit \(ulimit -f\), or write to a file system that takes "
                        r"larger files, then continue with --resume\n", limited.stderr), limited.stderr
    assert cli.run([*argv, "--resume"]).status == 0


def test_a_full_disk_under_a_runs_own_files_names_each(tiny_config, tmp_path, monkeypatch):
    """A small file's write on a full disk fails as it is closed, in an OSError without a filename: on a tmpfs filled
    before each, the lock's pid, run_config.json, metrics.jsonl (as a run starts, and at a step) and memory.json ended
    the run in 'could not write a file (No space left on device)'."""
    run = tmp_path / "run"

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as close() raises it: no filename

    with monkeypatch.context() as patched, pytest.raises(OSError) as caught:
        patched.setattr(os, "write", full)
        start_run(run, tiny_config, False, ())
    assert exit_status(caught.value) == (5, f"error: could not write {run / '.qlora.lock'} (No space left on "
                                            "device); free some space, then run the command again")
    with monkeypatch.context() as patched, pytest.raises(OSError) as caught:
        patched.setattr(Path, "write_text", full)
        start_run(run, tiny_config, False, ())
    assert caught.value.filename == str(run / "run_config.json")
    with monkeypatch.context() as patched, pytest.raises(OSError) as caught:
        patched.setattr(Path, "write_bytes", full)
        MetricsLog(run / "metrics.jsonl", b'{"step": 0}\n')
    assert caught.value.filename == str(run / "metrics.jsonl")
    log = MetricsLog(run / "metrics.jsonl")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to("/dev/full")  # a write there fails with ENOSPC
    with pytest.raises(OSError) as caught:
        log.write({"step": 1, "loss": 4.0})
    assert caught.value.filename == str(run / "metrics.jsonl")
    (run / "memory.json").write_text("{}\n")
    write_text = Path.write_text

    def half(self: Path, text: str, **kwargs: object) -> None:  # the disk fills halfway through the file
        write_text(self, text[:len(text) // 2], **kwargs)
        full()

    with monkeypatch.context() as patched, pytest.raises(OSError) as caught:
        patched.setattr(Path, "write_text", half)
        PhaseTracker(torch.device("cpu")).write(run / "memory.json")
    assert caught.value.filename == str(run / "memory.json")
    assert (run / "memory.json").read_text() == "{}\n" and sorted(p.name for p in run.iterdir() if "memory" in p.name) \
        == ["memory.json"]  # the earlier file whole, nothing half-written beside it


def test_a_full_disk_halfway_through_a_runs_own_file_leaves_no_half_copy(tiny_config, tmp_path, monkeypatch):
    """run_config.json and metrics.jsonl are written aside and renamed, as qlora.eval's --json and memory.json are
    (partial.write_aside): a disk that filled halfway left the half copy, .tmp-run_config.json or .tmp-metrics.jsonl,
    taking its space until the next start removed it."""
    run = tmp_path / "run"
    write_text, write_bytes = Path.write_text, Path.write_bytes

    def half(self: Path, data: str | bytes, **kwargs: object) -> None:  # the disk fills halfway through the file
        (write_bytes if isinstance(data, bytes) else write_text)(self, data[:len(data) // 2], **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched, pytest.raises(OSError) as caught:
        patched.setattr(Path, "write_text", half)
        start_run(run, tiny_config, False, ())
    assert caught.value.filename == str(run / "run_config.json")
    (run / "metrics.jsonl").write_bytes(b'{"step": 0}\n')
    with monkeypatch.context() as patched, pytest.raises(OSError) as caught:
        patched.setattr(Path, "write_bytes", half)
        MetricsLog(run / "metrics.jsonl", b'{"step": 0}\n{"step": 1}\n')
    assert caught.value.filename == str(run / "metrics.jsonl")
    assert sorted(p.name for p in run.iterdir()) == [".qlora.lock", "metrics.jsonl"]
    assert (run / "metrics.jsonl").read_bytes() == b'{"step": 0}\n'  # the earlier file whole


@pytest.mark.parametrize("lora", [{}, {"init": "loftq", "loftq_iters": 2}], ids=["plain", "LoftQ shifts"])
def test_a_checkpoint_is_flushed_with_the_files_a_resume_reads_beside_it(tmp_path, monkeypatch, lora):
    """A power cut keeps a checkpoint (flushed before its rename) but may lose what was written and not flushed: the
    last lines of metrics.jsonl, which the checkpoint counts (--resume then refuses the file as cut short), a fresh
    run's run_config.json (then empty: refused as malformed), and with lora.loftq_iters > 1 the shifts its base was
    quantised with. Each is flushed before each checkpoint is renamed."""
    events, fsync, replace = [], os.fsync, os.replace

    def flush(fd: int) -> None:
        events.append(("flushed", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def rename(src: object, dst: object) -> None:
        events.append(("renamed", str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", flush)
    monkeypatch.setattr(os, "replace", rename)
    run = (tmp_path / "run").resolve()
    finished_run("tiny.py", run, steps=2, save_every=1, log_every=1, eval_every=0, eval_before=False, lora=lora)
    beside = {"metrics.jsonl", "run_config.json"} | ({"loftq_shifts.safetensors"} if lora else set())
    own = [p.name for p in list_checkpoints(run)[-1].iterdir()]  # its own files too, and its folder's entries
    start = 0
    for step in (1, 2):
        end = events.index(("renamed", str(run / f"checkpoint-{step}")))
        flushed = {path for what, path in events[start:end] if what == "flushed"}
        tmp = run / f".tmp-checkpoint-{step}"
        assert {str(run / name) for name in beside} | {str(tmp / name) for name in own} | {str(tmp)} <= flushed, step
        assert events[end + 1] == ("flushed", str(run)), step  # the rename itself, before the run goes on
        start = end


NON_FINITE = """
import torch, qlora.training.step
class InfGrad(torch.autograd.Function):  # a finite loss whose gradients are inf
    @staticmethod
    def forward(ctx, x):
        return x.clone()
    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")
loss_sum, calls = qlora.training.step.loss_sum, [0]
def faulty_loss_sum(model, batch, chunk_size=0):
    calls[0] += 1
    loss = loss_sum(model, batch, chunk_size)
    if calls[0] == 3:  # micro-batch 2 (step 2): the loss itself is nan
        return loss * float("nan")
    if calls[0] == 8:  # micro-batch 7 (step 4): the loss is fine, its gradients are not
        return InfGrad.apply(loss)
    return loss
qlora.training.step.loss_sum = faulty_loss_sum  # where the step looks it up
"""


def test_non_finite_steps_are_skipped_then_the_run_stops_with_their_position(cli, tmp_path):
    out = tmp_path / "run"
    result = cli.run([*ARGS, f"--output.dir={out}", "--train.max_bad_steps=1", "--train.keep_checkpoints=8"],
                     prelude=NON_FINITE)
    assert result.status == 3, result.stderr

    def rows(first: int) -> str:
        return ", ".join(map(str, sorted(batch_rows(N_TRAIN, 4, 0, first) + batch_rows(N_TRAIN, 4, 0, first + 1))))

    lines = result.stderr.strip().splitlines()
    assert (f"step 2: non-finite loss or gradient in micro-batches 2-3 (rows {rows(2)} of the training split): "
            "skipped, no update (1 of train.max_bad_steps=1)") in lines
    assert lines[-1] == (f"error: stopped at step 4: 2 steps with a non-finite loss or gradient, more than "
                         f"train.max_bad_steps=1; the last in micro-batches 6-7 (rows {rows(6)} of the training "
                         f"split). {out}/checkpoint-4 holds the run without their updates: check those rows, "
                         "lower train.lr or raise train.max_bad_steps, then continue with --resume")
    assert list_checkpoints(out) == [out / f"checkpoint-{s}" for s in range(1, 5)]
    a = {s: adapter(out / f"checkpoint-{s}") for s in range(1, 5)}
    for key in a[1]:  # skipped steps change nothing; the good step between them does
        torch.testing.assert_close(a[2][key], a[1][key], rtol=0, atol=0)
        torch.testing.assert_close(a[4][key], a[3][key], rtol=0, atol=0)
    assert any(not torch.equal(a[3][key], a[2][key]) for key in a[1])
    assert all(torch.isfinite(t).all() for t in a[4].values())
    assert torch.load(out / "checkpoint-4" / STATE, weights_only=True)["bad_steps"] == 2
    # a skipped step still moves the schedule on: step k at its own warmup lr, k / 6 of 3e-3 (warmup_steps=5)
    assert [row["lr"] for row in metrics(out) if "lr" in row] == pytest.approx([3e-3 * k / 6 for k in range(1, 5)])


OOM = """
import torch
import qlora.training.oom
qlora.training.oom.device_total = lambda device: {total}  # a device just too small for this recipe
forwards = [0]
def out_of_memory(module, args, output):
    if type(module).__name__ == "LlamaModel" and module.training:
        forwards[0] += 1
        if forwards[0] == 5:  # micro-batch 4: step 3's first
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total "
                                         "capacity of 1 GiB of which 2.00 MiB is free.")
torch.nn.modules.module.register_module_forward_hook(out_of_memory)
"""


def test_out_of_memory_reports_the_phase_and_what_would_fit_and_keeps_the_checkpoint(cli, tmp_path):
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), ARGS[1:])  # the run's config, dropout included
    arch = load_arch(cfg)
    peaks = {}
    for seq in (64, 128):
        cfg.data.max_seq_len = seq
        peaks[seq] = needs(estimate(cfg, arch, "qlora", "cpu"))[0]  # as the check before loading counts them
    total = int((peaks[64] + peaks[128]) / 2 / HEADROOM)  # seq 64 fits, 128 (the recipe's) does not
    out = tmp_path / "run"
    result = cli.run([*ARGS, f"--output.dir={out}", "--train.save_every=2"], prelude=OOM.format(total=total))
    assert result.status == 4, result.stderr
    report = result.stderr[result.stderr.index("error: out of memory"):]  # after the library warnings
    lines = report.strip().splitlines()
    assert re.fullmatch(r"error: out of memory in the forward and backward of step 3, micro-batch 4 rows x \d+ "
                        r"tokens \(the step's longest\): CUDA out of memory\. Tried to allocate 1\.50 GiB\..*",
                        lines[0]), lines[0]
    assert lines[1].startswith("memory when it failed: ")
    assert lines[2].startswith("peaks of the phases before: ")
    assert lines[3].startswith("estimated peak of this recipe ") and "(qlora.memory.estimate, with the process's " \
        "libraries and malloc's free lists, as the check before loading counts it)" in lines[3]
    assert any(line.startswith("  --data.max_seq_len=64: the longest that fits") for line in lines)
    assert lines[-1] == f"{out}/checkpoint-2 is kept: apply one of these, then continue with --resume"
    assert "Traceback" not in result.stderr
    assert list_checkpoints(out) == [out / "checkpoint-2"]


def test_list_checkpoints_sees_only_complete_ones(tmp_path):
    for name, files in {"checkpoint-3": ["optimizer.pt", STATE], "checkpoint-5": [STATE],
                        ".tmp-checkpoint-6": ["optimizer.pt", STATE], ".trash-checkpoint-1": ["optimizer.pt", STATE],
                        "checkpoint-x": ["optimizer.pt", STATE]}.items():
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_bytes(b"")
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-3"]


def test_checkpoints_go_by_their_step_and_the_oldest_are_pruned(tmp_path):
    """checkpoint-10 is newer than checkpoint-9, though its name sorts first: a resume takes it, pruning keeps it."""
    for step in (2, 9, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        for file in ("optimizer.pt", STATE):
            (tmp_path / f"checkpoint-{step}" / file).write_bytes(b"")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]
    prune(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    prune(tmp_path, 1, newest=tmp_path / "checkpoint-9")  # a resume from checkpoint-9 keeps it, whatever is newer
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9"]


def test_a_pruned_checkpoint_linked_from_another_disk_leaves_no_trash_and_its_target(tmp_path):
    """A link is unlinked, not renamed to .trash-checkpoint-N, which rmtree refuses and leaves until the next start
    (a finished run kept it); what it points at is never deleted."""
    other = tmp_path / "other-disk" / "checkpoint-1"
    run = tmp_path / "run"
    for path in (other, run / "checkpoint-2"):
        path.mkdir(parents=True)
        for file in ("optimizer.pt", STATE):
            (path / file).write_bytes(b"x")
    (run / "checkpoint-1").symlink_to(other)
    prune(run, 1)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2"]
    assert sorted(p.name for p in other.iterdir()) == ["optimizer.pt", STATE]


def test_a_checkpoint_deleted_halfway_is_never_taken_for_a_complete_one(tmp_path, monkeypatch):
    """Pruning stopped halfway (Ctrl-C, a kill) through an old checkpoint's files: what is left of it is under a
    .trash- name, never under its own with its state and optimizer still there for a resume to take."""
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    for file in ("adapter_model.safetensors", "optimizer.pt", STATE):
        (checkpoint / file).write_bytes(b"")

    def stopped_halfway(path: Path, ignore_errors: bool = False) -> None:
        if Path(path).is_dir():
            (Path(path) / "adapter_model.safetensors").unlink()
            raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", stopped_halfway)
    with pytest.raises(KeyboardInterrupt):
        remove_checkpoint(checkpoint)
    assert list_checkpoints(tmp_path) == []


# The paged classes, whose state a CUDA run saves; on the CPU they run unpaged, and bitsandbytes warns that they do.
@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU:UserWarning")
@pytest.mark.parametrize("cls", [bnb.optim.PagedAdamW32bit, bnb.optim.PagedAdamW8bit])
def test_bitsandbytes_optimizer_state_survives_weights_only_loading(tmp_path, cls):
    """torch.load(weights_only=True) refuses arbitrary pickles: the optimizer state must be plain tensors and
    numbers (the 8-bit one includes its quantisation maps), and the run must continue exactly."""
    torch.manual_seed(0)
    # 8-bit state only for tensors of >= 4096 elements (bitsandbytes' min_8bit_size); the small one stays 32-bit.
    params = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(8, 16))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]

    def step(ps: list[torch.nn.Parameter], opt: torch.optim.Optimizer) -> None:
        (ps[0].square().sum() + ps[1].pow(3).sum()).backward()
        opt.step()
        opt.zero_grad()

    opt = cls(params, lr=1e-2)
    for _ in range(2):
        step(params, opt)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    with torch.no_grad():
        for c, p in zip(copies, params, strict=True):
            c.copy_(p)
    restored = cls(copies, lr=1e-2)
    restored.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    for _ in range(2):
        step(params, opt)
        step(copies, restored)
    for c, p in zip(copies, params, strict=True):
        torch.testing.assert_close(c, p, rtol=0, atol=0)


def test_resume_cuts_metrics_back_to_what_the_checkpoint_saw(tmp_path):
    path = tmp_path / "metrics.jsonl"
    kept = '{"step": 0, "eval_loss": 5.0}\n{"step": 1, "loss": 4.0}\n'  # logged before checkpoint-1 was saved
    path.write_text(kept + '{"step": 2, "loss": 3.9}\n{"step": 3, "lo')  # after it; the last line cut by a kill
    log = MetricsLog(path, check_kept(path, len(kept)))
    assert path.read_text() == kept and log.size() == len(kept)


def all_finite(run: Path) -> bool:
    return all(torch.isfinite(t).all() for ckpt in list_checkpoints(run) for t in adapter(ckpt).values())


def test_a_diverging_lr_never_saves_the_diverged_adapter(cli, tmp_path):
    """lr=1e30: one update makes the adapter huge, every later step non-finite. The run stops (exit 3) without a
    checkpoint of that adapter (resuming it could never recover) and says so."""
    out = tmp_path / "run"
    result = cli.run([*ARGS, "--train.lr=1e30", "--train.save_every=0", "--train.eval_every=0", f"--output.dir={out}"])
    assert result.status == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: stopped at step \d: 4 steps with a non-finite loss or gradient, the last in "
                        r"micro-batches .*, and a held-out batch fails too: the adapter itself has diverged \(train.lr="
                        r"1e\+30 is too high\), so no checkpoint was written of it\. No checkpoint was written: start "
                        r"again with a lower train.lr \(--overwrite\)", last), last
    assert list_checkpoints(out) == [] and not (out / "adapter_model.safetensors").exists()


def test_a_run_whose_every_step_was_skipped_ends_in_an_error_not_an_untrained_adapter(cli, tmp_path):
    """lora.alpha=1e30: every gradient overflows, each step is skipped within train.max_bad_steps=3, and the run
    ended with exit 0 and the adapter it started with as its result."""
    out = tmp_path / "run"
    result = cli.run(["recipes/tiny.py", "--train.steps=2", "--lora.alpha=1e30", "--train.eval_before=false",
                      f"--output.dir={out}"])
    assert result.status == 3, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: all 2 steps had a non-finite loss or gradient and were skipped"), result.stderr
    assert not (out / "adapter_model.safetensors").exists()


def test_a_nan_held_out_loss_is_never_the_result(cli, tmp_path):
    """With enough bad steps allowed, the diverged run reaches its end: the final held-out loss is nan, so the adapter
    is not written and the run exits 3 (it used to exit 0 with every adapter tensor nan)."""
    out = tmp_path / "run"
    result = cli.run([*ARGS, "--train.lr=1e30", "--train.max_bad_steps=100", "--train.eval_every=0",
                      f"--output.dir={out}"])
    assert result.status == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"error: stopped at step {STEPS}: the held-out loss is nan although every trainable weight is "
                    "finite: the adapter has diverged (or the forward overflows in quant.compute_dtype=auto); it is "
                    f"not written as the result. {out}/checkpoint-{STEPS} holds this adapter, {out}/checkpoint-"
                    f"{STEPS - 1} an earlier one: set the newest aside (mv {out}/checkpoint-{STEPS} {out}/checkpoint-"
                    f"{STEPS}.damaged) and continue from checkpoint-{STEPS - 1} with --resume and a lower train.lr, or "
                    "start again with a lower train.lr (--overwrite, which deletes every checkpoint)")
    assert not (out / "adapter_model.safetensors").exists() and all_finite(out)
    # metrics.jsonl stays strict JSON: the nan loss is null, not a bare NaN that jq or JavaScript refuse
    final = [json.loads(line, parse_constant=refuse_constant) for line in (out / "metrics.jsonl").open()][-1]
    assert final["step"] == STEPS and final["eval_loss"] is None and final["eval_ppl"] is None, final


def refuse_constant(name: str) -> None:
    raise AssertionError(f"{name} in metrics.jsonl: not JSON")


NAN_UPDATE = """
import bitsandbytes as bnb
# On the CPU the trainer builds bitsandbytes' plain AdamW32bit: its paged class pages CUDA memory only.
step, calls = bnb.optim.AdamW32bit.step, [0]
def nan_step(self, *args, **kwargs):
    out = step(self, *args, **kwargs)
    calls[0] += 1
    if calls[0] == 3:  # the third update leaves a weight nan (finite loss, finite gradients)
        self.param_groups[0]["params"][0].data[0, 0] = float("nan")
    return out
bnb.optim.AdamW32bit.step = nan_step
"""


def test_an_update_that_leaves_a_weight_nan_stops_before_saving_it(cli, tmp_path):
    out = tmp_path / "run"
    result = cli.run([*ARGS, f"--output.dir={out}"], prelude=NAN_UPDATE)
    assert result.status == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == ("error: stopped at step 3: its update left trainable weights nan or inf (train.lr=0.003 is too "
                    f"high for them), and nothing of it was saved. {out}/checkpoint-2 is the newest checkpoint: "
                    "continue from it with --resume and a lower train.lr; if it has diverged too, set it aside (mv "
                    f"{out}/checkpoint-2 {out}/checkpoint-2.damaged) and continue from checkpoint-1 the same way, or "
                    "start again (--overwrite, which deletes every checkpoint)")
    assert list_checkpoints(out) == [out / "checkpoint-1", out / "checkpoint-2"] and all_finite(out)
    result = cli.run([*ARGS, f"--output.dir={out}", "--resume", "--train.lr=1e-3"])  # the advice works
    assert result.status == 0, result.stderr


def nan_base(tmp_path: Path, norm: float = float("nan")) -> Path:
    """A copy of the tiny Llama whose final norm's weights are all `norm`: nan, every logit it gives is nan, whatever
    the adapter; 1e37, every token's loss is finite (about 3e36) and their sum over a held-out batch overflows fp32 to
    inf (measured: 1e36 left the first batch's finite)."""
    base = tmp_path / "base"
    shutil.copytree(ensure_checkpoint(load_recipe(ROOT / "recipes" / "tiny.py")), base)
    weights = load_file(str(base / "model.safetensors"))
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], norm)
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base


def test_a_base_that_gives_nan_stops_before_training(cli, tmp_path):
    base = nan_base(tmp_path)
    out = tmp_path / "run"
    result = cli.run([*ARGS, f"--model.path={base}", "--model.build=none", f"--output.dir={out}"])
    assert result.status == 3, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the held-out loss before training is nan: the base model gives non-finite logits on the held-out "
        "data (nan or inf in its weights, or an overflow in quant.compute_dtype=auto): check model.path, or try "
        "--quant.compute_dtype=fp32")
    assert list_checkpoints(out) == []


@pytest.mark.parametrize("norm", [float("nan"), 1e37], ids=["nan", "inf"])
def test_a_base_that_gives_nan_is_named_at_an_evaluation_before_max_bad_steps(cli, tmp_path, norm):
    """train.eval_before=false and an evaluation at step 1: the nan base meets the held-out check before the bad-step
    one, and the line names the base, not a diverged adapter and a learning rate (no update was even applied). So does
    a base whose held-out loss is inf, not nan: a check of isnan alone trained on to max_bad_steps, and said the
    adapter had diverged."""
    base = nan_base(tmp_path, norm)
    out = tmp_path / "run"
    result = cli.run([*ARGS, f"--model.path={base}", "--model.build=none", f"--output.dir={out}",
                      "--train.eval_before=false", "--train.eval_every=1", "--train.max_bad_steps=5"])
    assert result.status == 3, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: stopped at step 1: the held-out loss is {'nan' if math.isnan(norm) else 'inf'}, and it stays so with "
        "the adapters switched off: the base model gives non-finite logits (nan or inf in its weights, or an overflow "
        "in quant.compute_dtype=auto): check model.path, or try --quant.compute_dtype=fp32, then start again with "
        "--overwrite")


def slowed(target: str, seconds: float) -> str:
    """A prelude: `target` ("module:function" or "module:Class.method") writes {marker}, then waits `seconds`, before
    doing its work; a test sends its signal once the marker is there."""
    module, qualname = target.split(":")
    owner, name = f"{module}.{qualname}".rsplit(".", 1)
    return f"""
import pathlib, time, {module}
work = {owner}.{name}
def slowed(*args, **kwargs):
    pathlib.Path("{{marker}}").write_text("here")
    time.sleep({seconds})
    return work(*args, **kwargs)
{owner}.{name} = slowed
"""


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def interrupt(cli, argv: list[str], prelude: str, marker: Path, sig: int):
    """Run the CLI with a `prelude` that writes `marker` where it waits, and send `sig` once it does."""
    pid = cli.start(argv, prelude=prelude.format(marker=marker))
    wait_for(marker)
    os.kill(pid, sig)
    return cli.wait(pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_while_the_model_loads_ends_in_one_line(cli, tmp_path, sig):
    """SIGTERM while loading once ended the process without a word; SIGHUP (an ssh session lost) did until h69."""
    out = tmp_path / "run"
    slow_load = slowed("transformers:AutoModelForCausalLM.from_pretrained", 60)
    result = interrupt(cli, [*ARGS, f"--output.dir={out}"], slow_load, tmp_path / "loading", sig)
    assert result.status == 128 + sig, result.stderr
    assert result.stderr.strip().splitlines() == [f"stopped by {sig.name}; no checkpoint was written: run the "
                                                  "command again to start"]
    assert not out.exists()


def test_a_signal_during_the_first_evaluation_stops_without_training_a_step(cli, tmp_path):
    out = tmp_path / "run"
    argv = [*ARGS, "--train.eval_batches=3", f"--output.dir={out}"]
    result = interrupt(cli, argv, slowed("qlora.training.step:eval_stats", 0.5), tmp_path / "evaluating",
                       signal.SIGTERM)
    assert result.status == 128 + signal.SIGTERM, result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("stopped by SIGTERM before the first step; no checkpoint was "
                                                      "written: run the command again to start")
    assert list_checkpoints(out) == [] and not [line for line in metrics(out) if "loss" in line]
    assert cli.run([*argv, "--train.steps=1"]).status == 0  # the advice works


def test_a_base_that_gives_nan_is_named_when_training_starts_without_an_evaluation(cli, tmp_path):
    """With train.eval_before=false the first thing to meet a nan base is a step: skipped until max_bad_steps, then
    the held-out check names the base (it fails with the adapters switched off too), not the learning rate, and torch
    says nothing of a schedule stepped before its optimizer."""
    base = nan_base(tmp_path)
    out = tmp_path / "run"
    result = cli.run([*ARGS, f"--model.path={base}", "--model.build=none", f"--output.dir={out}",
                      "--train.eval_before=false", "--train.max_bad_steps=1"])
    assert result.status == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "a held-out batch fails even with the adapters switched off: the base model gives non-finite logits" in last
    assert last.endswith(f"try --quant.compute_dtype=fp32 and continue from {out}/checkpoint-1 with --resume, or "
                         "check model.path and start again with --overwrite (what this run saved trained on that "
                         "base)"), last
    assert "lr_scheduler" not in result.stderr, result.stderr


def test_a_stop_before_overwrite_cleared_the_old_run_never_sends_to_resume_it(cli, tmp_path):
    """SIGTERM while loading under --overwrite said 'checkpoint-2 is intact: continue with --resume', which continues
    the old run, not this one (whose recipe may differ in a key a resume refuses): it says now that the old run is as it
    was. Once the old run is cleared, a checkpoint of this run is named to continue from again (out of memory in its
    step 2: 'checkpoint-1 is kept')."""
    out = tmp_path / "run"
    assert cli.run([*ARGS, "--train.steps=2", "--train.eval_every=0", f"--output.dir={out}"]).status == 0
    def held() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".lock"}

    before = held()
    argv = [*ARGS, "--train.steps=2", "--train.eval_every=0", "--lora.r=4", f"--output.dir={out}", "--overwrite"]
    slow_load = slowed("transformers:AutoModelForCausalLM.from_pretrained", 60)
    result = interrupt(cli, argv, slow_load, tmp_path / "loading", signal.SIGTERM)
    assert result.status == 128 + signal.SIGTERM, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"stopped by SIGTERM; nothing of this run was written, and the "
                                                      f"run it replaces ({out}/checkpoint-2 the newest) is as it was: "
                                                      "run the command again to start")
    assert held() == before
    result = cli.run(argv, prelude=OOM.format(total=2**40).replace("== 5:", "== 3:"))  # step 2's first micro-batch
    assert result.status == 4, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"{out}/checkpoint-1 is kept: apply one of these, then continue " \
                                                     "with --resume"
