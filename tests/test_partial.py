"""What a killed writer leaves beside its output (qlora/partial.py): removed by the next writer when its process is
gone, kept while it lives; a build of the cache and a memory report clean up after a killed one."""

from __future__ import annotations

import os
import re
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
    from qlora.partial import write_aside, write_together

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


def test_a_file_system_without_hard_links_never_renames_over_a_file_that_appeared(tmp_path: Path, monkeypatch) -> None:
    """Where os.link is refused (vfat, some FUSE mounts), rename_new checks the name again and renames: a file that
    took the name while the command wrote (another export's) is kept, and a free name gets the whole output."""
    import errno

    from qlora.errors import ConfigError
    from qlora.partial import rename_new

    def no_links(*args: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / ".x.gguf.partial").write_text("this export's\n")
    (tmp_path / "x.gguf").write_text("the other export's\n")
    with pytest.raises(ConfigError, match=r"--gguf=.*x.gguf appeared while this command wrote it"):
        rename_new(tmp_path / ".x.gguf.partial", tmp_path / "x.gguf", "--gguf")
    assert (tmp_path / "x.gguf").read_text() == "the other export's\n"
    rename_new(tmp_path / ".x.gguf.partial", tmp_path / "y.gguf", "--gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf", "y.gguf"]
    assert (tmp_path / "y.gguf").read_text() == "this export's\n"


def test_the_copy_of_another_users_live_process_is_kept(tmp_path: Path, monkeypatch) -> None:
    """os.kill(pid, 0) on a process of another user is refused (EPERM): it lives, and its copy is not removed."""
    def not_yours(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    (tmp_path / ".merged.partial-4242-ab12").mkdir()
    monkeypatch.setattr(os, "kill", not_yours)
    remove_abandoned(tmp_path / "merged")
    assert [p.name for p in tmp_path.iterdir()] == [".merged.partial-4242-ab12"]


def test_a_file_written_aside_through_a_link_is_written_to_its_target(tmp_path: Path) -> None:
    """A run's run_config.json or eval.json kept on another disk behind a link: the new file goes where the link points
    and the link stays, as write_text would have it; renamed over the link itself, the target would keep the old one."""
    from qlora.partial import write_aside

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "eval.json").write_text("the earlier result\n")
    (tmp_path / "eval.json").symlink_to(tmp_path / "elsewhere" / "eval.json")
    write_aside(tmp_path / "eval.json", "{}\n")
    assert (tmp_path / "eval.json").is_symlink() and (tmp_path / "elsewhere" / "eval.json").read_text() == "{}\n"
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["eval.json"]


def test_a_directory_at_any_of_a_reports_names_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """write_together refuses a directory at the name of any file of the report, not only the .json the command table
    tries (a mutant that looked at the last name alone survived), before any file is replaced; a link to a directory
    there is replaced, as a file is, and its directory left as it was (a mutant that refused it survived)."""
    from qlora.errors import ConfigError
    from qlora.partial import write_together

    names = ("r.png", "r.md", "r.json")
    writers = {name: (lambda path, name=name: path.write_text(f"new {name}\n")) for name in names}
    for name in names:
        out = tmp_path / name.replace(".", "-")
        out.mkdir()
        for other in names:
            (out / other).write_text(f"old {other}\n")
        (out / name).unlink()
        (out / name).mkdir()
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(out / name))} is a directory, where the report "
                                              rf"writes its \{name[1:]} file: move it away, or choose another "
                                              r"--out-dir$"):
            write_together(out, writers)
        assert {p.name: p.is_dir() or p.read_text() for p in out.iterdir()} == \
            {other: other == name or f"old {other}\n" for other in names}
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "r.md").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    write_together(tmp_path / "linked", writers)
    assert {p.name: p.is_symlink() or p.read_text() for p in (tmp_path / "linked").iterdir()} == \
        {name: f"new {name}\n" for name in names}
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_what_a_rename_names_is_on_disk_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    """A rename may reach the disk before the data it names (ext4 with delalloc, xfs): after a power cut the name
    could stand on a file of zeros. Each file and folder is fsynced before its rename, and the folder it lands in
    after; merges, exports, reports and eval results were renamed unsynced (checkpoints alone were synced)."""
    from qlora import partial

    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename, real_link = os.fsync, os.replace, os.rename, os.link

    def fsync(fd: int) -> None:
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def named(op: str, real):
        def call(src, dst, *args, **kwargs):
            events.append((op, str(dst)))
            return real(src, dst, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", named("rename", real_replace))
    monkeypatch.setattr(os, "rename", named("rename", real_rename))
    monkeypatch.setattr(os, "link", named("rename", real_link))

    partial.write_aside(tmp_path / "eval.json", "{}\n")
    hidden = str(tmp_path / f".eval.json.partial-{os.getpid()}")
    assert events == [("sync", hidden), ("rename", str(tmp_path / "eval.json")), ("sync", str(tmp_path))]

    events.clear()
    built = tmp_path / ".merged.partial-1"
    (built / "sub").mkdir(parents=True)
    (built / "model.safetensors").write_bytes(b"x" * 100)
    (built / "sub" / "a.json").write_text("{}")
    partial.rename_new(built, tmp_path / "merged", "--out")
    *before, (op, dst), last = events
    assert {path for _, path in before} == {str(built / "model.safetensors"), str(built / "sub" / "a.json"),
                                           str(built / "sub"), str(built)}, events
    assert before[-1] == ("sync", str(built)) and (op, dst) == ("rename", str(tmp_path / "merged"))
    assert last == ("sync", str(tmp_path))

    events.clear()
    file = tmp_path / ".out.gguf.partial-1"
    file.write_bytes(b"GGUF")
    partial.rename_new(file, tmp_path / "out.gguf", "--gguf")
    assert events[0] == ("sync", str(file)) and events[1] == ("rename", str(tmp_path / "out.gguf"))
    assert events[-1] == ("sync", str(tmp_path))

    events.clear()
    partial.write_together(tmp_path / "report", {"r.md": lambda p: p.write_text("m"),
                                                 "r.json": lambda p: p.write_text("{}")})
    renames = [i for i, (op, _) in enumerate(events) if op == "rename"]
    syncs = [path for op, path in events[:renames[0]] if op == "sync"]
    assert len(syncs) == 2 and events[-1] == ("sync", str(tmp_path / "report")), events
