"""A run stopped after its last checkpoint (killed between that checkpoint's rename and the pruning of older ones, or
in the final evaluation; a SIGINT in that evaluation) and resumed: the resume trains no step and writes no
checkpoint, yet must leave what an uninterrupted run leaves: train.keep_checkpoints checkpoints, and a memory line and
memory.json of the run's steps. A signal there stops the run as after a step (exit 130), not after the adapter.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from test_crash import ARGS, KILL_IN_FINAL_SAVE, STEPS, assert_same_run

from qlora.training.checkpoint import list_checkpoints

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


@pytest.fixture(scope="module")
def reference(cli, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = cli.run([*ARGS, f"--output.dir={out}"])
    assert result.status == 0, result.stderr
    return out


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
