"""What the commands show while they work, in real processes: a line for each long phase, no library noise in a log,
and on a terminal a stop line that starts a line of its own."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--train.steps=4", "--train.eval_every=2", "--train.eval_batches=2", "--train.log_every=1"]


def command(*args: str) -> subprocess.CompletedProcess:
    """`python -m ARGS` with stdout and stderr to pipes, as in a log file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("console") / "run"
    return out, command("qlora.train", "recipes/tiny.py", f"--output.dir={out}", *QUICK)


def test_a_logged_run_says_each_phase_and_nothing_else_on_stderr(logged_run) -> None:
    _, proc = logged_run
    assert proc.returncode == 0, proc.stderr
    # No bitsandbytes "Paged optimizers are not supported on CPU" warning, no transformers or tqdm bars.
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    expected = [r"loading .*tiny-llama-v2 \(.* MB of safetensors\) as NF4 \+ double quant, float32 compute onto "
                r"cpu \.\.\.", r"loaded in [\d.]+ s",
                r"optimizer paged_adamw_32bit: on CPU nothing pages",
                r"evaluating 16 held-out rows before training \(2 batches of 8; --train.eval_before=false skips it\)",
                r"before training: held-out loss [\d.]+, exact match [\d.]+% \([\d.]+ s\)",
                r"training 4 steps of 8 rows \.\.\.", r"step 1/4: loss [\d.]+, lr",
                r"evaluating 16 held-out rows at step 2 ", r"step 2: held-out loss [\d.]+, exact match",
                r"step 4/4: loss", r"evaluating 16 held-out rows after training ",
                r"held-out loss [\d.]+ -> [\d.]+, exact match [\d.]+% -> [\d.]+% \([\d.]+ s\)", r"memory: peak"]
    at = 0
    for pattern in expected:  # each in this order
        found = next((i for i in range(at, len(lines)) if re.match(pattern, lines[i])), None)
        assert found is not None, (pattern, lines[at:])
        at = found + 1


LIBRARY_BAR = """
import sys
sys.argv = ["-m"]  # as runpy has it while `python -m qlora.train` imports the package
import qlora
from tqdm.auto import tqdm
from qlora.console import progress
list(tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))  # transformers' call, disable left default
list(progress(range(3), 3, "ours", "rows", show=True))
print("done")
"""


def test_a_library_bar_that_sets_no_disable_stays_out_of_a_log() -> None:
    """transformers' GGUF conversion (the demo's first run) drew its bar frames into a log file."""
    proc = subprocess.run([sys.executable, "-c", LIBRARY_BAR], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"})
    assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr
    assert proc.stderr == ""


def test_eval_generate_and_merge_in_a_log_show_no_loading_bars(logged_run, tmp_path: Path) -> None:
    run_dir, _ = logged_run
    for args in (["qlora.eval", str(run_dir)], ["qlora.generate", str(run_dir), "--prompt", "reverse: a b c",
                                                "--max-new-tokens=4"],
                 ["qlora.merge", str(run_dir), f"--out={tmp_path / 'merged'}"]):
        proc = command(*args)
        assert proc.returncode == 0, proc.stderr
        if args[0] == "qlora.generate":  # its stdout is the text alone: its lines are on stderr, still no bar
            assert "loading" not in proc.stdout, proc.stdout
            assert "\r" not in proc.stderr and "Loading weights" not in proc.stderr, proc.stderr
            proc.stdout, proc.stderr = proc.stderr, ""
        assert proc.stderr == "", (args, proc.stderr)  # transformers' "Loading weights" bar included
        assert proc.stdout.startswith("merging " if args[0] == "qlora.merge" else "loading "), proc.stdout
        if args[0] == "qlora.eval":  # silent for minutes before: now says what it scores, and how many
            assert re.search(r"^evaluating 16 held-out rows of /\S*/recipes/data/tiny/heldout.jsonl \(2 batches of 8\)",
                             proc.stdout, re.M), proc.stdout
        if args[0] == "qlora.merge":
            assert re.search(r"^reading \d+ base tensors, folding in the adapter, writing 1 shard", proc.stdout, re.M)
            assert "checking the merge: logits" in proc.stdout


def test_a_stop_on_a_terminal_ends_the_bar_before_its_line(tmp_path: Path) -> None:
    """On a terminal the progress bar holds the last line; the SIGINT stop line must start a line of its own."""
    out = tmp_path / "run"
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.chdir(ROOT)
        os.environ["OMP_NUM_THREADS"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "qlora.train", "recipes/tiny.py", f"--output.dir={out}",
                                  "--train.steps=300", "--train.eval_before=false", "--train.eval_every=0"])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    seen, deadline, sent = b"", time.monotonic() + 300, False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        if not sent and re.search(rb"train: +\d+%.*\| *[1-9]\d*/300", seen):  # a few steps into the bar
            os.kill(pid, signal.SIGINT)
            sent = True
    _, status = os.waitpid(pid, 0)
    text = seen.decode(errors="replace")
    assert sent and os.waitstatus_to_exitcode(status) == 130, text[-2000:]
    assert re.search(r"\n\s*stopped by SIGINT after step \d+", text), text[-2000:]
    assert not re.search(r"[^\n\s]stopped by SIGINT", text), text[-2000:]


def test_a_run_with_stdout_and_stderr_closed_trains_and_saves(tmp_path: Path) -> None:
    """`python -m qlora.train ... >&- 2>&-`: Python leaves sys.stdout None, and the first phase line ended the run
    with exit 1 before loading, nothing written."""

    def close_both() -> None:  # in the child, after subprocess set up its descriptors
        os.close(1)
        os.close(2)

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "qlora.train", "recipes/tiny.py", f"--output.dir={out}",
                           "--train.steps=2", "--train.eval_batches=1"], cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=close_both)  # noqa: PLW1509
    assert proc.returncode == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 2, 2]


@pytest.mark.parametrize("stderr", [subprocess.PIPE, subprocess.STDOUT], ids=["stdout", "stdout and stderr"])
def test_a_run_whose_stdout_reader_leaves_stops_with_a_checkpoint(tmp_path: Path, stderr: int) -> None:
    """`python -m qlora.train ... | head`: the first line after the reader left raised BrokenPipeError and the run
    ended at once (exit 141), every step since its last checkpoint lost and no line saying so. It stops as for a
    signal: after the step in flight, with a checkpoint, and says so on stderr. With stderr in the same pipe
    (`2>&1 | head`) that line failed in turn: exit 1."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "qlora.train", "recipes/tiny.py", f"--output.dir={out}",
                             "--train.eval_before=false", "--train.eval_every=0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("training 300 steps"):  # the step lines come every 30 steps from here
            break
    proc.stdout.close()  # as `head` does once it has its lines
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.wait(timeout=600) == 128 + signal.SIGPIPE, err
    (saved,) = out.glob("checkpoint-*")
    assert int(saved.name.removeprefix("checkpoint-")) < 300
    if proc.stderr:
        assert err == f"stopped by SIGPIPE after step {saved.name.removeprefix('checkpoint-')}; {saved} holds it: " \
                      "continue with --resume\n", err


@pytest.mark.parametrize("nohup", [False, True], ids=["terminal closed", "under nohup"])
def test_a_run_whose_terminal_closes_stops_with_a_checkpoint(tmp_path: Path, nohup: bool) -> None:
    """An ssh session lost: the kernel sends SIGHUP, whose default ended the run at once, every step since its last
    checkpoint lost (measured: exit -1 (SIGHUP) with no checkpoint-N, 15 steps in). It stops as for SIGTERM, after the
    step in flight, with a checkpoint (exit 129). Under `nohup` (SIGHUP ignored) it is not the trainer's to stop."""
    out = tmp_path / "run"
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.chdir(ROOT)
        os.environ["OMP_NUM_THREADS"] = "1"
        # Kept across exec, as nohup does it; a terminal's shell starts its commands with the default (this test, run
        # under nohup, passed SIG_IGN on: the run trained to its last step, and the test failed).
        signal.signal(signal.SIGHUP, signal.SIG_IGN if nohup else signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-m", "qlora.train", "recipes/tiny.py", f"--output.dir={out}",
                                  "--train.steps=3000", "--train.eval_before=false", "--train.eval_every=0"])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    seen, deadline = b"", time.monotonic() + 300
    while time.monotonic() < deadline and not re.search(rb"train: +\d+%.*\| *[1-9]\d*/3000", seen):
        if select.select([fd], [], [], 1)[0]:
            seen += os.read(fd, 4096)
    if nohup:
        os.kill(pid, signal.SIGHUP)
        time.sleep(1)
        os.kill(pid, signal.SIGTERM)
        while select.select([fd], [], [], 1)[0]:  # the terminal stays open: read it until the child closes it
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    os.close(fd)  # without nohup: the terminal goes away, and the kernel hangs up its session
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + (signal.SIGTERM if nohup else signal.SIGHUP), seen[-2000:]
    (saved,) = out.glob("checkpoint-*")
    step = saved.name.removeprefix("checkpoint-")
    assert 0 < int(step) < 3000
    if nohup:
        assert f"stopped by SIGTERM after step {step}" in seen.decode(errors="replace")
