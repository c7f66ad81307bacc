"""Every command ends through qlora/cli.py: one line on stderr and an exit status that says which kind of ending."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from forked_cli import hangup_at_default

ROOT = Path(__file__).resolve().parent.parent


def command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def loading_torch(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until `proc` maps torch's library: its imports have reached torch, and the seconds of them are ahead. A fixed
    sleep of 0.3 s sent the signal before the interpreter had run a line of qlora on a loaded 2-core machine (measured:
    10 of 12 starts still in site or qlora/__init__.py's first imports, ending -15 or in a KeyboardInterrupt
    traceback): the interpreter's own start-up no command can say a line about (its first imports, see below)."""
    deadline = time.monotonic() + timeout
    while b"libtorch_cpu" not in Path(f"/proc/{proc.pid}/maps").read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, "torch never loaded"
        time.sleep(0.01)


def test_config_command_prints_the_resolved_recipe() -> None:
    proc = command("qlora.config", "recipes/tiny.py", "--train.lr=1e-3")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["train"]["lr"] == 1e-3


@pytest.mark.parametrize(("code", "status", "line"), [
    ("raise KeyboardInterrupt", 2, r"error: RECIPE:3: the recipe raised KeyboardInterrupt\(\), not a Ctrl-C: a "
                                   r"recipe only builds `config`"),
    ("class Stop(KeyboardInterrupt):\n    pass\nraise Stop('done')", 2,
     r"error: RECIPE:5: the recipe raised Stop\('done'\), not a Ctrl-C: a recipe only builds `config`"),
    ("sys.exit('no GPU here')", 2, r"error: RECIPE:3: the recipe called exit\('no GPU here'\): a recipe only "
                                   r"builds `config`"),
    ("class Done(BaseException):\n    pass\nraise Done('x')", 2, r"error: RECIPE:5: Done: x"),
    ("os.kill(os.getpid(), signal.SIGINT)", 130, r"stopped by SIGINT"),  # a Ctrl-C while it runs: still one
], ids=["KeyboardInterrupt", "its subclass", "exit with a message", "BaseException subclass", "a real Ctrl-C"])
def test_a_recipe_that_raises_an_interrupt_is_named_not_taken_for_ctrl_c(tmp_path, code, status, line) -> None:
    """A recipe that raised KeyboardInterrupt (or a subclass) was reported as the user's Ctrl-C: 'stopped by SIGINT',
    exit 130, no word of the recipe."""
    recipe = tmp_path / "recipe.py"
    recipe.write_text(f"import os, signal, sys\n\n{code}\n")
    proc = command("qlora.config", str(recipe))
    assert proc.returncode == status and proc.stdout == "", proc.stderr
    assert re.fullmatch(line.replace("RECIPE", re.escape(str(recipe))) + "\n", proc.stderr), proc.stderr


def test_config_command_says_a_plan_chooses_the_levers_at_start() -> None:
    """With train.plan=fastest the levers printed are the recipe's, not what a run uses: said on stderr."""
    proc = command("qlora.config", "recipes/tiny.py", "--train.plan=fastest")
    assert proc.returncode == 0 and json.loads(proc.stdout)["train"]["plan"] == "fastest"
    assert proc.stderr.startswith("train.plan=fastest: qlora.train chooses the levers above for the card")
    assert command("qlora.config", "recipes/tiny.py").stderr == ""


def test_a_recipe_that_prints_leaves_the_json_whole(tmp_path: Path) -> None:
    """A recipe's own print() came first on stdout, and `qlora.config RECIPE > cfg.json` (or qlora.memory --json)
    wrote a file json.loads refuses: the recipe's prints go to stderr there."""
    recipe = tmp_path / "chatty.py"
    recipe.write_text((ROOT / "recipes/tiny.py").read_text() + "print('built the config')\n")
    for args in [("qlora.config", str(recipe)), ("qlora.memory", str(recipe), "--json", "--methods=qlora")]:
        proc = command(*args)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) and proc.stderr.startswith("built the config\n"), (proc.stdout, proc.stderr)


def test_config_command_bad_override_is_one_line() -> None:
    proc = command("qlora.config", "recipes/tiny.py", "--train.lr=fast")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --train.lr=fast: expected float, e.g. --train.lr=1"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("delay", [0, 0.7])
def test_signal_while_importing_ends_in_one_line(tmp_path: Path, sig: signal.Signals, delay: float) -> None:
    """Ctrl-C, SIGTERM or SIGHUP while torch and transformers still load: no traceback, nothing written, 128 + signal.
    A SIGHUP (an ssh session lost while the base loaded) ended the process without a word: killed by it, status -1."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "qlora.train", "recipes/tiny.py", f"--output.dir={out}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=hangup_at_default)
    loading_torch(proc)
    time.sleep(delay)  # as torch starts, or deeper into it and transformers
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {sig.name}"), err
    assert not out.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_before_the_early_handlers_are_installed_ends_in_one_line(sig: signal.Signals) -> None:
    """The first lines of qlora/__init__.py, as `python -m` runs them, imported logging and qlora.cli before the
    handler was in place (30-55 ms of a loaded CPU's start-up): a Ctrl-C there was a KeyboardInterrupt traceback, a
    SIGTERM an exit without a word. The signal comes here as qlora.cli is looked for, at once, from an import hook."""
    code = ("import os, signal, sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name == 'qlora.cli': os.kill(os.getpid(), {int(sig)})\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "sys.argv = ['-m', 'recipes/tiny.py']  # as runpy has it while it imports the package\n"
            "import qlora\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=hangup_at_default)
    assert proc.returncode == 128 + sig, proc.stderr
    assert proc.stderr == f"stopped by {sig.name} while starting: nothing was written\n"


@pytest.mark.parametrize(("module", "args", "sig"), [
    ("qlora.eval", ["runs/none"], signal.SIGINT), ("qlora.merge", ["runs/none", "--out=x"], signal.SIGTERM),
    ("qlora.memory", ["recipes/tiny.py", "--out-dir={tmp}"], signal.SIGINT),
    ("qlora.generate", ["runs/none"], signal.SIGTERM),
], ids=["eval SIGINT", "merge SIGTERM", "memory SIGINT", "generate SIGTERM"])
def test_every_command_ends_in_one_line_when_interrupted_while_importing(tmp_path, module, args, sig):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]  # a report goes to tmp_path, never into the checkout
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    loading_torch(proc)  # each of these commands ends within a second or two of its imports
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines() == [f"stopped by {sig.name} while starting: nothing was written"], err


@pytest.mark.parametrize(("module", "args", "said"), [
    ("qlora.train", ["recipes/tiny.py", "--output.dir={tmp}/run"], False), ("qlora.eval", ["runs/none"], True),
], ids=["train: rank 0 alone says it", "eval: runs alone whatever RANK says"])
def test_rank_1_interrupted_while_importing_leaves_the_line_to_rank_0(tmp_path, module, args, said):
    """torchrun passes a Ctrl-C or SIGTERM on to every process: during the imports each of them said `stopped by
    SIGTERM while starting: nothing was written`, where rank 0 speaks for the run."""
    env = {**os.environ, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    proc = subprocess.Popen([sys.executable, "-m", module, *(a.replace("{tmp}", str(tmp_path)) for a in args)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    loading_torch(proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err == ("stopped by SIGTERM while starting: nothing was written\n" if said else ""), err


@pytest.mark.parametrize(("rank", "said"), [("0", True), ("1", False)])
def test_a_signal_swallowed_while_importing_is_said_by_rank_0_alone(capsys, monkeypatch, rank, said):
    from qlora import cli

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cli.Session.signal = signal.SIGINT  # as raise_signal_interrupt records it, in the middle of an import
    assert cli.run(lambda argv: 0, [], ranked=True) == 130
    assert capsys.readouterr().err == ("stopped by SIGINT while starting: nothing was written\n" if said else "")


@pytest.mark.parametrize("args", [["qlora.config"], ["qlora.memory", "--methods=qlora"]], ids=["config", "memory"])
def test_a_closed_stdout_ends_quietly(args):
    """`python -m qlora.config RECIPE | head -1`: the reader goes away; no BrokenPipeError traceback. Without
    PYTHONUNBUFFERED (a shell's default) the short result waited in stdout's buffer for the interpreter's exit, which
    printed "Exception ignored ... BrokenPipeError" and ended 120."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", args[0], "recipes/tiny.py", *args[1:]], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # as `head` does once it has its line
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode == 128 + signal.SIGPIPE


OR_OUT_DIR = ", or write the report with --out-dir=DIR"


@pytest.mark.parametrize(("args", "what"), [
    (["qlora.config"], "the resolved config"),
    (["qlora.memory", "--methods=qlora"], "the report" + OR_OUT_DIR),
    (["qlora.memory", "--methods=qlora", "--json"], "the report's JSON" + OR_OUT_DIR),
    (["qlora.memory", "--methods=qlora", "--out-dir={tmp}"], None),  # the files hold the report
], ids=["config", "memory", "memory --json", "memory --out-dir"])
def test_a_command_whose_result_is_its_stdout_refuses_a_closed_one(tmp_path, args, what):
    """`python -m qlora.config RECIPE >&-`: Python leaves sys.stdout None, fill_closed_streams sends it to /dev/null
    (so training runs), and the JSON went there with exit 0, nothing said. Refused in one line, exit 2."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-m", argv[0], "recipes/tiny.py", *argv[1:]], cwd=ROOT, timeout=300,
                          stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))  # noqa: PLW1509
    if what is None:
        assert proc.returncode == 0 and (tmp_path / "tiny-none.md").is_file(), proc.stderr
        return
    result, _, fix = what.partition(",")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: stdout is closed, where {result} would be printed: give it a file or "
                                        f"a pipe (> FILE){',' if fix else ''}{fix}"], proc.stderr


def test_a_command_run_from_a_script_with_stdout_closed_refuses_or_ends_as_usual(capsys, monkeypatch, tmp_path):
    """A script's own `run(main)` (not `python -m`, so fill_closed_streams never filled it) started with stdout closed:
    Python leaves sys.stdout None and CLOSED_AT_START empty. qlora.config, whose result is its stdout, refuses it as
    under `python -m` (print to a None stdout writes nothing: it ended 0, its JSON gone); qlora.memory --out-dir,
    whose result is its files, ends 0 with them written (run's flush of stdout met None: an AttributeError)."""
    from qlora.config.__main__ import main as config_main
    from qlora.console import CLOSED_AT_START
    from qlora.report.memory import main as memory_main

    assert not CLOSED_AT_START  # this process's stdout was open: only the None says it is closed
    with monkeypatch.context() as closed:
        closed.setattr(sys, "stdout", None)
        refused = config_main([str(ROOT / "recipes/tiny.py")])
        written = memory_main([str(ROOT / "recipes/tiny.py"), "--methods=qlora", f"--out-dir={tmp_path}"])
    assert refused == 2
    assert capsys.readouterr().err.splitlines() == ["error: stdout is closed, where the resolved config would be "
                                                    "printed: give it a file or a pipe (> FILE)"]
    assert written == 0 and (tmp_path / "tiny-none.md").is_file()


def test_a_recipe_printing_to_a_closed_stdout_ends_quietly(tmp_path):
    """`python -m qlora.train RECIPE | head -1` of a recipe that prints: its print() met the closed pipe and the
    command ended in 'error: RECIPE:2: BrokenPipeError: [Errno 32] Broken pipe', exit 2, as a mistake in the recipe."""
    recipe = tmp_path / "chatty.py"
    recipe.write_text("for _ in range(100000):\n    print('x' * 80)\n")
    proc = subprocess.Popen([sys.executable, "-m", "qlora.train", str(recipe), f"--output.dir={tmp_path / 'run'}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does once it has its line
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert err == "" and proc.returncode == 128 + signal.SIGPIPE, err
    assert not (tmp_path / "run").exists()


def test_a_signal_a_library_swallowed_while_importing_still_stops_the_command(capsys):
    """transformers' lazy imports can turn a Ctrl-C into an ImportError that a caller catches and goes on from: the
    signal, recorded as it came, still ends the command before it does anything."""
    from qlora import cli
    from qlora.config.__main__ import main

    cli.Session.signal = signal.SIGINT  # as raise_signal_interrupt records it, in the middle of an import
    assert main(["recipes/tiny.py"]) == 130
    assert capsys.readouterr() == ("", "stopped by SIGINT while starting: nothing was written\n")
    assert main(["recipes/tiny.py"]) == 0  # the next command in this process starts afresh


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_after_the_command_ended_keeps_its_status_and_says_nothing(sig: signal.Signals) -> None:
    """torchrun stops what is left of a run whose other process died with SIGTERM, as the survivor shuts down having
    said which checkpoint is intact: it ended -15 (the interpreter's shutdown resets Python's handlers), or 143 under
    "while starting: nothing was written" (`run` put exit_while_starting back). The status stays the command's.
    A Ctrl-C there ended a finished training run -2 without a word (a shell's 130): measured 2.5 s between its last
    line and its exit on a loaded 2-core CPU, the adapter and memory.json written."""
    code = ("import os, signal, sys; sys.argv = ['-m']; import qlora; from qlora.cli import run; "
            f"status = run(lambda argv: 6, []); os.kill(os.getpid(), {int(sig)}); "
            f"import atexit; atexit.register(os.kill, os.getpid(), {int(sig)}); sys.exit(status)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 6 and proc.stderr == "", proc.stderr


def test_a_command_process_leaves_its_heap_out_of_the_collections_of_its_shutdown() -> None:
    """After a training run's last line the interpreter's shutdown took 1.3-5.2 s on a loaded 2-core CPU, ~75% of it
    the garbage collector walking the heap torch and transformers imported: a command's process freezes it as the
    command ends (cli.skip_final_collection). A command run in-process leaves the collector alone: the process goes
    on, and what it freed in cycles must still be collected."""
    code = ("import gc, sys; sys.argv = ['-m']; import qlora; from qlora.cli import run; "
            "print(gc.get_freeze_count()); run(lambda argv: 0, []); print(gc.get_freeze_count())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    before, after = map(int, proc.stdout.split())
    assert proc.returncode == 0 and before == 0 and after > 1000, (proc.stdout, proc.stderr)
    from qlora.config.__main__ import main

    assert main(["recipes/tiny.py"]) == 0 and gc.get_freeze_count() == 0
