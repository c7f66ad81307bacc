"""Every command under a locale that is not UTF-8 (LC_ALL=C with Python's coercion and UTF-8 mode off: as on a latin-1
or EUC machine, or a minimal container): the files it writes are UTF-8, and it ends as it would under UTF-8.
Each command runs in a subprocess, since the locale decides how Python sets up its streams and argv at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASCII_LOCALE = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


def command(*args: str, stdin: bytes = b"", locale: dict[str, str] = ASCII_LOCALE) -> subprocess.CompletedProcess:
    """`python -m ARGS` from the repository root under `locale`; its output as bytes (their codec is the test's)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONIOENCODING"}  # it would set the codec
    env.update(locale, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, input=stdin, capture_output=True,
                          timeout=600)


def test_the_memory_report_is_written_as_utf8(tmp_path):
    """Its markdown holds "–" (a range of cards): written with the locale's codec it ended in a UnicodeEncodeError."""
    done = command("qlora.memory", "recipes/llama70b.py", "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    (md,) = tmp_path.glob("*.md")
    assert "–" in md.read_text(encoding="utf-8")

