"""`--help` of every entry point, in real processes: answered before torch is imported, and with a recipe it lists
every field with its type, value and docstring."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from qlora.cli import running_command
from qlora.commands import PARSERS
from qlora.config import Config, apply_overrides, field_docs, load_recipe

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "bitsandbytes", "numpy", "safetensors", "peft", "datasets")
COMMANDS = ["qlora.train", "qlora.memory", "qlora.config", "qlora.eval", "qlora.generate", "qlora.merge",
            "qlora.export"]


def command(*args: str) -> subprocess.CompletedProcess:
    # -X importtime writes one line per imported module to stderr: the test reads what the command imported.
    return subprocess.run([sys.executable, "-X", "importtime", "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def imported(proc: subprocess.CompletedProcess) -> set[str]:
    return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s+(\S+)$", proc.stderr, re.M)}


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_answers_help_before_importing_torch(name: str, flag: str) -> None:
    proc = command(name, flag)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m " + name), proc.stdout
    assert not imported(proc) & set(HEAVY), imported(proc) & set(HEAVY)


def test_the_measuring_child_answers_help_too() -> None:
    """qlora.memory --measure runs it, and failures.md names it: `--help` was refused as an unknown flag (exit 2)."""
    proc = command("qlora.report.measure", "--help")
    assert proc.returncode == 0 and "python -m qlora.report.measure RECIPE.py --quant.method=qlora" in proc.stdout


def test_the_allocation_recorder_answers_help_too(capsys: pytest.CaptureFixture) -> None:
    """memory_reports/README.md names `python -m qlora.report.recorder`: `--help` was refused as 'no output file'
    (exit 2)."""
    from qlora.report.recorder import main

    assert main(["--help"]) == 0
    assert "python -m qlora.report.recorder RECIPE.py OUT.pickle.gz" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_of_a_command_on_a_run_says_what_every_flag_does(name: str) -> None:
    """`--max-new-tokens` had no help (nor its default), and `--debug`, which every command takes, was missing from
    eval's, generate's, merge's and export's help though train's, memory's and config's list it."""
    parser = PARSERS[name]()
    bare = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not bare, bare
    assert "--debug" in parser.format_help()


def test_train_help_after_a_recipe_lists_every_field_with_type_value_and_docstring() -> None:
    proc = command("qlora.train", "recipes/tiny.py", "--lora.r=4", "--train.lr=1e-3", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not imported(proc) & set(HEAVY)
    config = apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), ["--lora.r=4", "--train.lr=1e-3"])
    lines = proc.stdout.splitlines()
    for section in dataclasses.fields(Config):
        obj = getattr(config, section.name)
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            line = f"  {section.name}.{f.name}: {f.type} = {getattr(obj, f.name)!r}"
            assert line in lines, line
            after = " ".join(s.strip() for s in lines[lines.index(line) + 1:lines.index(line) + 6])
            assert after.startswith(" ".join(docs[f.name].split())[:60]), (line, after)
    assert "  lora.r: int = 4" in lines and "  train.lr: float = 0.001" in lines


def test_every_config_field_has_a_docstring() -> None:
    for section in typing.get_type_hints(Config).values():
        missing = [f.name for f in dataclasses.fields(section) if not field_docs(section).get(f.name)]
        assert not missing, (section.__name__, missing)


def test_help_after_a_bad_recipe_is_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "qlora.train", "recipes/nope.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: recipe recipes/nope.py not found: pass the path of a "
                                                "recipe file such as recipes/tiny.py"]


def test_help_inside_the_command_matches_the_early_answer(capsys: pytest.CaptureFixture) -> None:
    """Run in-process (as tests/forked_cli.py does, where qlora/__init__.py did not see the command line), the
    commands answer --help themselves, with the same text."""
    from qlora.train import main

    assert main(["recipes/tiny.py", "--help"]) == 0
    assert capsys.readouterr().out == command("qlora.train", "recipes/tiny.py", "--help").stdout


@pytest.mark.parametrize("argv, found", [
    (["python", "-m", "qlora.train", "x.py"], "qlora.train"),
    (["python", "-X", "importtime", "-W", "ignore", "-m", "qlora.eval"], "qlora.eval"),
    (["python", "-mqlora.merge", "run"], "qlora.merge"),
    (["python", "-c", "import qlora", "-m", "qlora.train"], None),
    (["python", "script.py", "-m", "qlora.train"], None),
])
def test_running_command_reads_the_interpreter_command_line(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                            found: str | None) -> None:
    monkeypatch.setattr(sys, "orig_argv", argv)
    assert running_command() == found
