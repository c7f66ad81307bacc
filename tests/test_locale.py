"""Every command under a locale that is not UTF-8 (LC_ALL=C with Python's coercion and UTF-8 mode off: as on a latin-1
or EUC machine, or a minimal container): the files it writes are UTF-8, and it ends as it would under UTF-8.
Each command runs in a subprocess, since the locale decides how Python sets up its streams and argv at start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASCII_LOCALE = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
UTF8_LOCALE = {"LC_ALL": "C.UTF-8", "PYTHONUTF8": "1"}
PROMPT = "reverse: café naïve"


def command(*args: str | bytes, stdin: bytes = b"",
            locale: dict[str, str] = ASCII_LOCALE) -> subprocess.CompletedProcess:
    """`python -m ARGS` from the repository root under `locale`; its output as bytes (their codec is the test's)."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=environment(locale), input=stdin,
                          capture_output=True, timeout=600)


def environment(locale: dict[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONIOENCODING"}  # it would set the codec
    return {**env, **locale, "PYTHONPATH": str(ROOT)}


def test_the_memory_report_is_written_as_utf8(tmp_path):
    """Its markdown holds "–" (a range of cards): written with the locale's codec it ended in a UnicodeEncodeError."""
    done = command("qlora.memory", "recipes/llama70b.py", "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    (md,) = tmp_path.glob("*.md")
    assert "–" in md.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The tiny recipe, 4 steps, under the ASCII locale, on rows of non-ASCII text in a file so named, into an
    output.dir so named: (the run, the data file, the training command)."""
    folder = tmp_path_factory.mktemp("locale")
    rows = (ROOT / "recipes/data/tiny/train.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    rows[:8] = [json.dumps({"messages": [{"role": "user", "content": f"{PROMPT} {i}"},
                                         {"role": "assistant", "content": f"{i} naïve café"}]}, ensure_ascii=False)
                for i in range(8)]
    data, run_dir = folder / "données.jsonl", folder / "rün"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    done = command("qlora.train", "recipes/tiny.py", f"--data.train={data}", "--train.steps=4",
                   "--train.eval_every=2", f"--output.dir={run_dir}")
    return run_dir, data, done


def test_a_run_on_non_ascii_rows_into_a_folder_so_named_trains_and_its_files_are_utf8(trained):
    run_dir, _, done = trained
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"adapter written to " + os.fsencode(run_dir) in done.stdout  # the path printed as the bytes it is
    for name in ("run_config.json", "adapter_config.json", "memory.json"):
        json.loads((run_dir / name).read_text(encoding="utf-8"))
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)][-1] == 4


def test_eval_on_non_ascii_rows(trained, tmp_path):
    run_dir, data, _ = trained
    done = command("qlora.eval", str(run_dir), "--data", str(data), "--json", str(tmp_path / "ë.json"))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert json.loads((tmp_path / "ë.json").read_text(encoding="utf-8"))["eval_rows"] == 40


def generated(run_dir: Path, *args: str, stdin: bytes = b"", locale: dict[str, str] = ASCII_LOCALE) -> bytes:
    done = command("qlora.generate", str(run_dir), "--format=text", "--max-new-tokens=20", *args, stdin=stdin,
                   locale=locale)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


@pytest.fixture(scope="module")
def answer(trained) -> str:
    """The tiny run's answer to PROMPT under the UTF-8 locale."""
    return generated(trained[0], "--prompt", PROMPT, locale=UTF8_LOCALE).decode("utf-8")


def test_generated_text_the_locale_cannot_hold_is_printed_escaped(trained, answer):
    """The tiny run's answer to PROMPT holds characters ASCII lacks (U+FFFD of bytes that are no UTF-8): print raised
    UnicodeEncodeError. The prompt comes as JSON escapes, ASCII itself."""
    assert not answer.isascii()  # else this test would test nothing
    prompt = json.dumps(PROMPT).encode("ascii") + b"\n"
    assert generated(trained[0], "--jsonl", stdin=prompt) == answer.encode("ascii", "backslashreplace")


def test_a_prompt_is_taken_as_utf8_on_the_command_line_and_on_stdin(trained, answer):
    """Python decodes argv and stdin with the locale's codec: --prompt "é" came as '\\udcc3\\udca9' and was refused as
    no UTF-8, and so was a stdin line. Each gives the answer the UTF-8 locale gives."""
    assert generated(trained[0], "--prompt", PROMPT) == answer.encode("ascii", "backslashreplace")
    assert generated(trained[0], stdin=PROMPT.encode("utf-8") + b"\n") == answer.encode("ascii", "backslashreplace")


def test_a_prompt_that_is_no_utf8_is_still_refused(trained):
    """Latin-1's "é", one byte: on the command line and on stdin, exit 2 and the line saying so, before generating."""
    for args, stdin, where in (((b"--prompt", b"caf\xe9"), b"", b"--prompt"), ((), b"caf\xe9\n", b"stdin:1")):
        done = command("qlora.generate", str(trained[0]), *args, stdin=stdin)
        assert done.returncode == 2, done.stderr.decode(errors="replace")
        assert b"error: " + where + b": not UTF-8" in done.stderr, done.stderr.decode(errors="replace")


@pytest.mark.parametrize(("setting", "old", "new"), [("output.dir", '"runs/tiny"', '"runs/rün"'),
                                                      ("data.train", '"recipes/data/tiny/train.jsonl"',
                                                       '"recipes/data/tiny/données.jsonl"')])
def test_a_recipes_path_the_locale_cannot_name_is_refused_in_one_line(tmp_path, setting, old, new):
    """A recipe's non-ASCII output.dir ended in a UnicodeEncodeError traceback under an ASCII locale (twice: the run
    directory's lock was released with the same path), and its data.train was "not found" (Path.exists() is False
    for a path it cannot encode). From the command line the same names come as bytes and train (above)."""
    recipe = tmp_path / "recipe.py"
    recipe.write_text((ROOT / "recipes/tiny.py").read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
    done = command("qlora.train", str(recipe), "--train.steps=1")
    assert done.returncode == 2, done.stderr.decode(errors="replace")
    escaped = new.strip('"').replace("ü", "\\xfc").replace("é", "\\xe9")
    assert done.stderr.decode().splitlines() == [
        f"error: {recipe}:11: {setting}='{escaped}' cannot be a file name under "
        "this locale's file system encoding (ascii): run under a UTF-8 locale (LC_ALL=C.UTF-8, or PYTHONUTF8=1), or "
        "name an ASCII path"]
    assert command("qlora.config", str(recipe), locale=UTF8_LOCALE).returncode == 0
