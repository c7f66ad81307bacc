"""Every command ends through qlora/cli.py: one line on stderr and an exit status that says which kind of ending."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_config_command_prints_the_resolved_recipe() -> None:
    proc = command("qlora.config", "recipes/tiny.py", "--train.lr=1e-3")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["train"]["lr"] == 1e-3


def test_config_command_bad_override_is_one_line() -> None:
    proc = command("qlora.config", "recipes/tiny.py", "--train.lr=fast")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --train.lr=fast: expected float, e.g. --train.lr=1"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_signal_while_importing_ends_in_one_line(tmp_path: Path, sig: signal.Signals, delay: float) -> None:
    """Ctrl-C or SIGTERM while torch and transformers still load: no traceback, nothing written, 128 + signal."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "qlora.train", "recipes/tiny.py", f"--output.dir={out}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {sig.name}"), err
    assert not out.exists()
