"""A terminal that reports 0 rows or columns (a pty no one sized: `script -q -c CMD /dev/null`, some CI runners): tqdm
hides every bar there, so the trainer must fall back to the log lines rather than show no progress at all. A terminal
too narrow for the bar's figures, or TERM=dumb, gets the lines too; on one wide enough, the figures beside the bar are
whole."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
import types

from forked_cli import ROOT
from tqdm import tqdm

from qlora.console import draws_bars, widest_meter
from qlora.training import progress


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


def sized_pty(columns: int) -> tuple[int, int]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return master, slave


def test_a_terminal_too_narrow_or_dumb_gets_the_step_lines(monkeypatch):
    """On 20 columns tqdm cut the bar's own count (10/300 read `10/30`), and under TERM=dumb the evaluation's bar
    below the training's printed its cursor-up escape codes as text: both get the lines instead."""
    monkeypatch.setenv("TERM", "xterm")
    for columns, draws in ((120, True), (60, True), (20, False)):
        master, slave = sized_pty(columns)
        with os.fdopen(slave, "w") as stream:
            assert draws_bars(stream, widest_meter(300, "train")) is draws, columns
            assert draws_bars(stream, widest_meter(13, "evaluate", "batch")) is draws, columns
            monkeypatch.setenv("TERM", "dumb")
            assert not draws_bars(stream)
            monkeypatch.setenv("TERM", "xterm")
        os.close(master)


def test_the_bar_shows_whole_figures_beside_their_own_step(monkeypatch):
    """tqdm cuts its line at the terminal's edge, mid-number: on 80 columns `mem=0.09G` read `mem=0.0` and tokens/s
    was gone; and set_postfix's own redraw showed a step's loss beside the count of the step before."""
    for columns in (200, 100, 90, 80, 60):
        monkeypatch.setattr(progress, "terminal_columns", lambda stream, c=columns: c)
        frames = io.StringIO()
        bar = tqdm(total=300, desc="train", file=frames, ncols=columns, mininterval=0, disable=False)
        for step in (1, 2, 3, 10):
            bar.n = step - 1
            progress.show_step(bar, {"step": step, "loss": step + 0.123456, "lr": 3e-3, "tokens_per_s": 14236.4,
                                      "peak_gib": 0.0872}, 300, (0, time.perf_counter()))
        shown = [f for f in frames.getvalue().split("\r") if "=" in f]
        assert shown or columns < 80, (columns, frames.getvalue())  # on 60 no figure fits beside a fast rate
        for frame in shown:
            count = int(re.search(r"\| *(\d+)/300", frame)[1])
            whole = {f"loss={count}.1235", "lr=3.00e-03", "tok_s=14236", "mem=0.09G"}
            assert set(re.findall(r"\w+=[^,\]\s]*", frame)) <= whole, (columns, frame)
        if columns == 200:
            assert all(field in shown[-1] for field in ("loss=10.1235", "lr=", "tok_s=14236", "mem=0.09G"))


def test_the_step_lines_say_the_time_left_from_this_process_steps(capsys):
    """The lines that stand in for the bar in a log said loss, lr, tokens/s and peak, but not when the run would end;
    after a resume, the time left counts the steps this process ran, not its loading."""
    bar = tqdm(total=300, disable=True)
    fields = {"loss": 1.5, "lr": 3e-3, "tokens_per_s": 9000.0, "peak_gib": 0.09}
    progress.show_step(bar, {"step": 30, **fields}, 300, (0, time.perf_counter() - 30))  # 1 s a step
    progress.show_step(bar, {"step": 120, **fields}, 300, (100, time.perf_counter() - 40))  # resumed at 100: 2 s a step
    assert capsys.readouterr().out.splitlines() == [
        "step 30/300: loss 1.5000, lr 3.00e-03, 9000 tokens/s, peak 0.09 GiB, 04:30 left",
        "step 120/300: loss 1.5000, lr 3.00e-03, 9000 tokens/s, peak 0.09 GiB, 06:00 left"]


def test_a_run_resumed_after_its_last_step_announces_no_training(tiny_config, capsys):
    """Stopped during its final evaluation and resumed, a run said `training 0 steps of 8 rows ...` before it."""
    ranks = types.SimpleNamespace(main=True, several=False, size=1)
    for step, said in ((0, "training 300 steps of 8 rows ...\n"), (120, "training 180 steps of 8 rows ...\n"),
                       (299, "training 1 step of 8 rows ...\n"), (300, "")):
        tiny_config.train.steps = 300
        progress.progress_bar(tiny_config, step, ranks).close()
        assert capsys.readouterr().out == said


def test_a_resumed_bar_counts_on_from_its_step_and_a_log_names_the_rows_of_every_micro_batch(tiny_config, capsys,
                                                                                            monkeypatch):
    """On a terminal the resumed run's bar stands at its step (120/300, its rate and time left from there); in a log
    the announcement counts a step's rows over its micro-batches, and the last step has its line however the run's
    steps divide into tenths."""
    ranks = types.SimpleNamespace(main=True, several=False, size=1)
    tiny_config.train.steps, tiny_config.train.grad_accum = 300, 4
    progress.progress_bar(tiny_config, 120, ranks).close()
    assert capsys.readouterr().out == "training 180 steps of 32 rows ...\n"
    monkeypatch.setattr(progress, "draws_bars", lambda stream, figures="": True)
    bar = progress.progress_bar(tiny_config, 120, ranks)
    assert not bar.disable and (bar.n, bar.total) == (120, 300)
    bar.close()

    fields = {"loss": 1.5, "lr": 3e-3, "tokens_per_s": 9000.0, "peak_gib": 0.09}
    lines = tqdm(total=25, disable=True)
    for step in range(1, 26):  # a line every 2 steps, and one at step 25
        progress.show_step(lines, {"step": step, **fields}, 25, (0, time.perf_counter() - step))
    said = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in said] == [f"step {k}/25" for k in (*range(2, 25, 2), 25)]
