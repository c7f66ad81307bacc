"""A terminal that reports 0 rows or columns (a pty no one sized: `script -q -c CMD /dev/null`, some CI runners): tqdm
hides every bar there, so the trainer must fall back to the log lines rather than show no progress at all."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from forked_cli import ROOT


def test_an_unsized_terminal_gets_the_step_lines(tmp_path):
    master, slave = pty.openpty()  # a fresh pty: 0 rows x 0 columns
    assert os.get_terminal_size(slave).columns == 0
    try:
        result = subprocess.run(
            [sys.executable, "-m", "qlora.train", "recipes/tiny.py", "--train.steps=2", "--train.batch_size=4",
             "--train.eval_before=false", "--train.eval_batches=1", f"--output.dir={tmp_path / 'run'}"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=slave, text=True,
            timeout=600)
    finally:
        os.close(slave)
        os.close(master)
    assert result.returncode == 0
    assert "training 2 steps of 4 rows" in result.stdout and "step 2/2: loss" in result.stdout, result.stdout
