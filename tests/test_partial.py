"""What a killed writer leaves beside its output (qlora/partial.py): removed by the next writer when its process is
gone, kept while it lives; a build of the cache and a memory report clean up after a killed one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora.partial import remove_abandoned


def gone_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_only_the_copies_of_processes_that_are_gone_are_removed(tmp_path: Path, capsys) -> None:
    dead, live = gone_pid(), os.getpid()
    names = {f".merged.partial-{dead}-ab12": True, f".merged.partial-{live}-cd34": False,
             f".x.gguf.partial-{dead}-ef56.gguf": False,  # another output's
             f".smollm2.building-{dead}": False, "merged": False, f".merged.partial-{dead}": False,  # no tail: not ours
             f"..merged.partial-{dead}-gh78": True}  # a writer inside a partial names its own after it
    for name in names:
        (tmp_path / name).mkdir()
    remove_abandoned(tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, gone in names.items() if not gone)
    out = capsys.readouterr().out
    assert f"removed .merged.partial-{dead}-ab12 left by a run that was killed\n" in out
    remove_abandoned(tmp_path / "smollm2", "building")
    assert not (tmp_path / f".smollm2.building-{dead}").exists()


def test_a_build_killed_before_its_rename_is_cleared_by_the_next(tmp_path: Path) -> None:
    """The tiny Llama built into a fresh cache by a process killed in the middle of it, then by another."""
    env = {**os.environ, "QLORA_CACHE": str(tmp_path)}
    kill = ("import os, signal\nimport qlora.base.build as build\nreal = build.BUILDERS['tiny-llama']\n"
            "def builder(path):\n    real(path)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "build.BUILDERS['tiny-llama'] = builder\n"
            "from qlora.base.build import ensure_checkpoint\nfrom qlora.config import load_recipe\n"
            "ensure_checkpoint(load_recipe('recipes/tiny.py'))\n")
    root = Path(__file__).resolve().parent.parent
    killed = subprocess.run([sys.executable, "-c", kill], cwd=root, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    [left] = [p.name for p in tmp_path.iterdir()]
    assert left.startswith(".tiny-llama") and ".building-" in left
    again = ("from qlora.base.build import ensure_checkpoint\nfrom qlora.config import load_recipe\n"
             "print(ensure_checkpoint(load_recipe('recipes/tiny.py')))\n")
    built = subprocess.run([sys.executable, "-c", again], cwd=root, env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert f"removed {left} left by a run that was killed" in built.stdout
    assert [p.name for p in tmp_path.iterdir()] == [Path(built.stdout.strip().splitlines()[-1]).name]


def test_a_full_disk_under_a_file_written_aside_names_the_file(tmp_path: Path, monkeypatch) -> None:
    """A full disk refuses a small file as it is closed, in an OSError without a filename: `qlora.eval --json` and a
    memory report on a full tmpfs said 'could not write a file (No space left on device)'. The path asked for is
    named, the earlier file is kept and no hidden copy is left."""
    import errno

    from qlora.errors import exit_status
    from qlora.partial import write_aside
    from qlora.report.memory import write_together

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as close() raises it: no filename

    (tmp_path / "eval.json").write_text("the earlier result\n")
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as caught:
        write_aside(tmp_path / "eval.json", "{}\n")
    assert exit_status(caught.value) == (5, f"error: could not write {tmp_path / 'eval.json'} (No space left on "
                                            "device); free some space, then run the command again")
    monkeypatch.undo()
    with pytest.raises(OSError) as caught:  # into folders it creates, which it removes again (they were left empty)
        write_together(tmp_path / "reports" / "new", {"r.md": lambda path: path.write_text("report\n"), "r.json": full})
    assert caught.value.filename == str(tmp_path / "reports" / "new" / "r.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    assert (tmp_path / "eval.json").read_text() == "the earlier result\n"
