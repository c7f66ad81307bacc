"""The output directory is the user's too: a run removes only what it wrote, and one trainer at a time uses it.

Real processes, forked from one that imported qlora.train once (tests/forked_cli.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_crash import wait_for_step

import qlora.train as train_module
from qlora.errors import ConfigError, Stop
from qlora.training import checkpoint, rundir
from qlora.training.checkpoint import list_checkpoints
from qlora.training.runconfig import resume_config

TINY = "recipes/tiny.py"
QUICK = ["--train.steps=1", "--train.eval_every=0", "--train.eval_batches=1"]


def test_a_run_removes_only_the_leftovers_it_wrote(cli, tmp_path):
    """Once every file beginning `.tmp-` or `.trash-` was deleted at start, the user's among them."""
    out = tmp_path / "run"
    mine = {".tmp-notes.txt": "a user's scratch file", ".trash-keep": "kept on purpose", "metrics.tmp": "mine",
            ".tmp-checkpoint-x": "not a checkpoint of ours", ".tmp-final.txt": "mine too", "notes.txt": "mine"}
    ours = [".tmp-checkpoint-7", ".trash-checkpoint-2", ".tmp-final", ".trash-checkpoint-3.damaged"]
    out.mkdir()
    for name, text in mine.items():
        (out / name).write_text(text)
    (out / ".tmp-mine").mkdir()
    (out / ".tmp-mine" / "data.jsonl").write_text("{}\n")
    for name in ours:  # what a killed run of ours leaves: half-written checkpoints and the adapter, being deleted
        (out / name).mkdir()
        (out / name / "adapter_model.safetensors").write_bytes(b"half")
    (out / ".tmp-run_config.json").write_text("{")
    result = cli.run([TINY, *QUICK, f"--output.dir={out}"])
    assert result.status == 0, result.stderr
    for name, text in mine.items():
        assert (out / name).read_text() == text, name
    assert (out / ".tmp-mine" / "data.jsonl").read_text() == "{}\n"
    for name in [*ours, ".tmp-run_config.json"]:
        assert not (out / name).exists(), name


def test_overwrite_deletes_the_other_runs_files_and_no_others(cli, tmp_path):
    out = tmp_path / "run"
    assert cli.run([TINY, *QUICK, f"--output.dir={out}", "--lora.r=4"]).status == 0
    (out / "checkpoint-1.damaged").mkdir()  # set aside by an earlier resume: part of that run
    (out / "checkpoint-notes").write_text("mine")
    (out / ".tmp-notes").write_text("mine")
    result = cli.run([TINY, *QUICK, f"--output.dir={out}", "--overwrite"])
    assert result.status == 0, result.stderr
    assert not (out / "checkpoint-1.damaged").exists()
    assert (out / "checkpoint-notes").read_text() == (out / ".tmp-notes").read_text() == "mine"


def test_a_second_trainer_on_the_same_dir_is_refused_while_the_first_runs(cli, tmp_path):
    """Two trainers once interleaved metrics.jsonl and broke each other's checkpoints. The second is refused in one
    line, with --resume or --overwrite too, and the first is not disturbed; once it ended, the directory is free."""
    out = tmp_path / "run"
    first = cli.start([TINY, "--train.steps=400", "--train.eval_every=0", "--train.log_every=1", f"--output.dir={out}"])
    wait_for_step(out, 1)
    for flags in ([], ["--resume"], ["--overwrite"]):
        result = cli.run([TINY, "--train.steps=400", "--train.eval_every=0", f"--output.dir={out}", *flags])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.status == 2 and len(lines) == 1, result.stderr
        assert lines[0] == (f"error: output.dir={out} is in use by another trainer (pid {first}): wait for it to end, "
                            "or use another output.dir")
    os.kill(first, signal.SIGTERM)
    stopped = cli.wait(first)
    assert stopped.status == 128 + signal.SIGTERM, stopped.stderr
    step = int(list_checkpoints(out)[-1].name.split("-")[1])
    logged = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(logged) == step  # the refused trainers logged nothing
    result = cli.run([TINY, f"--train.steps={step}", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr


def test_the_lock_is_released_when_a_run_ends_in_its_process(tiny_config, monkeypatch):
    """In one process (a notebook, a sweep), a run that stopped with an error leaves its directory usable."""
    tiny_config.train.steps = 1
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: {"eval_loss": float("nan"), "eval_ppl": 0.0,
                                                                    "eval_exact_match": 0.0})
    with pytest.raises(Stop) as stop:
        train_module.train(tiny_config)
    assert stop.value.code == 3 and "held-out loss before training is nan" in str(stop.value)
    monkeypatch.undo()
    train_module.train(tiny_config, overwrite=True)
    assert list_checkpoints(Path(tiny_config.output.dir))


def test_an_unwritable_output_dir_is_refused_before_loading(cli, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere: permissions cannot be tested")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = cli.run([TINY, *QUICK, f"--output.dir={locked}/run"])
    assert result.status == 2 and "is not writable" in result.stderr, result.stderr


def test_an_output_dir_on_a_read_only_file_system_is_refused_as_such(cli, tmp_path):
    """It was refused as "permission denied: ... make it writable", which no chmod helps."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(read_only)], capture_output=True).returncode:
        pytest.skip("mounting a read-only file system needs root (CAP_SYS_ADMIN)")
    try:
        result = cli.run([TINY, *QUICK, f"--output.dir={read_only}/run"])
    finally:
        subprocess.run(["umount", str(read_only)], check=True)
    assert result.status == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: output.dir={read_only}/run is not writable ({read_only} is on a read-only file system): choose "
        "another path, or remount it read-write")


@pytest.mark.parametrize(("error", "fix"), [("PermissionError(errno.EACCES, 'Permission denied'", "make {} writable"),
                                           ("OSError(errno.EROFS, 'Read-only file system'",
                                            "remount the file system of {} read-write")], ids=["EACCES", "EROFS"])
def test_a_write_refused_by_the_system_is_one_line_not_the_disk_full_advice(cli, tmp_path, error, fix):
    """A save that fails for another reason than a full disk does not tell the user to free space."""
    out = tmp_path / "run"
    fail = ("import errno, qlora.training.checkpoint as c\n"
            "def refuse(obj, path):\n"
            f"    raise {error}, str(path))\n"
            "c.torch_save = refuse\n")
    result = cli.run([TINY, *QUICK, f"--output.dir={out}"], prelude=fail)
    assert result.status == 5, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    why = error.split("'")[1]
    assert last == (f"error: could not write checkpoint-1 in {out} ({why}); there is no earlier "
                    f"checkpoint: {fix.format(out)}, then continue with --resume")


def test_a_trained_adapter_without_checkpoints_is_never_trained_over(cli, tmp_path):
    """A finished run whose checkpoints were deleted to save space, and a checkpoint's own folder given as output.dir:
    a new run (or --resume, which would start at step 0) once replaced the adapter and exited 0; --overwrite on the
    checkpoint deleted its adapter files."""
    out = tmp_path / "run"
    assert cli.run([TINY, "--train.steps=2", "--train.save_every=1", "--train.eval_every=0",
                    "--train.keep_checkpoints=1", f"--output.dir={out}"]).status == 0
    for target, flags in ((out / "checkpoint-2", []), (out / "checkpoint-2", ["--resume"]),
                          (out / "checkpoint-2", ["--overwrite"])):
        before = {p.name: p.read_bytes() for p in target.iterdir()}
        result = cli.run([TINY, *QUICK, f"--output.dir={target}", *flags])
        assert result.status == 2 and "is a checkpoint, not a run's folder" in result.stderr, result.stderr
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    for path in list_checkpoints(out):
        shutil.rmtree(path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for flags in ([], ["--resume"]):
        result = cli.run([TINY, *QUICK, f"--output.dir={out}", *flags])
        assert result.status == 2 and "no checkpoint to continue from" in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert cli.run([TINY, *QUICK, f"--output.dir={out}", "--overwrite"]).status == 0


def test_the_base_models_directory_is_no_output_dir(cli, tmp_path):
    # transformers loads an adapter it finds beside a model's weights: the base would come with it from then on.
    from qlora.base.build import ensure_checkpoint
    from qlora.config import load_recipe

    base = tmp_path / "base"
    shutil.copytree(ensure_checkpoint(load_recipe(Path(TINY))), base)
    before = sorted(p.name for p in base.iterdir())
    result = cli.run([TINY, *QUICK, f"--model.path={base}", f"--output.dir={base}/."])
    assert result.status == 2 and "is the base model's directory (model.path)" in result.stderr, result.stderr
    assert sorted(p.name for p in base.iterdir()) == before


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(cli, tmp_path):
    out, target = tmp_path / "run", tmp_path / "precious.txt"
    out.mkdir()
    target.write_text("keep me")
    (out / ".qlora.lock").symlink_to(target)
    result = cli.run([TINY, *QUICK, f"--output.dir={out}"])
    assert result.status == 2 and ".qlora.lock is not a plain file" in result.stderr, result.stderr
    assert target.read_text() == "keep me"


KILL_AFTER_REMOVING = """
import os, signal
import qlora.training.rundir as rundir
removed = []
real = rundir.remove_checkpoint
def remove_checkpoint(path):
    real(path)
    removed.append(path)
    if len(removed) == {n}:
        os.kill(os.getpid(), signal.{sig})
rundir.remove_checkpoint = remove_checkpoint
"""


def test_an_overwrite_cut_short_leaves_the_old_run_or_the_new_one(cli, tmp_path):
    """--overwrite deletes the old run: killed in the middle, what is left was the old run with its run_config.json
    (it went last), so a --resume with the new run's settings is refused instead of continuing an old checkpoint under
    them; and without run_config.json, checkpoints are never resumed. A SIGTERM there waits for the deletion to end."""
    out = tmp_path / "run"
    old = [TINY, "--train.steps=3", "--train.save_every=1", "--train.eval_every=0", "--train.keep_checkpoints=3"]
    assert cli.run([*old, f"--output.dir={out}"]).status == 0
    result = cli.run([*old, "--train.seed=7", f"--output.dir={out}", "--overwrite"],
                     prelude=KILL_AFTER_REMOVING.format(n=1, sig="SIGKILL"))
    assert result.status == -signal.SIGKILL
    assert (out / "run_config.json").is_file() and len(list_checkpoints(out)) == 2
    result = cli.run([*old, "--train.seed=7", f"--output.dir={out}", "--resume"])
    assert result.status == 2 and "--resume cannot change train.seed (0 -> 7)" in result.stderr, result.stderr
    (out / "run_config.json").unlink()
    result = cli.run([*old, "--train.seed=7", f"--output.dir={out}", "--resume"])
    assert result.status == 2 and "holds checkpoints but no run_config.json" in result.stderr, result.stderr
    assert cli.run([*old, f"--output.dir={out}", "--overwrite"]).status == 0
    result = cli.run([*old, "--train.seed=7", f"--output.dir={out}", "--overwrite"],
                     prelude=KILL_AFTER_REMOVING.format(n=1, sig="SIGTERM"))
    assert result.status == 128 + signal.SIGTERM, result.stderr
    assert list_checkpoints(out) == [] and "checkpoint-" not in result.stderr, result.stderr
    assert json.loads((out / "run_config.json").read_text())["train"]["seed"] == 7


def test_a_runs_files_are_ordinary_files(cli, tmp_path):
    """Every file a run writes has the mode open() gives under the umask (safetensors writes its own 0600): another
    user or a serving process reads the adapter as it reads the rest."""
    out = tmp_path / "run"
    result = cli.run([TINY, *QUICK, f"--output.dir={out}", "--train.save_every=1"])
    assert result.status == 0, result.stderr
    umask = os.umask(0o022)
    os.umask(umask)
    files = [f for f in out.rglob("*") if f.is_file()]
    assert any(f.name == "adapter_model.safetensors" and f.parent.name.startswith("checkpoint-") for f in files)
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_a_directory_written_while_the_run_loaded_is_refused_at_its_first_write(tiny_config):
    """The lock is taken at the run's first write, the base and data loaded: a second trainer started meanwhile on
    the same directory (a fresh start, not --resume) had trained over the first's finished run, exit 0."""
    out = Path(tiny_config.output.dir)
    seen = rundir.check_run_dir(out, tiny_config, resume=False, overwrite=False)
    out.mkdir()  # what the other trainer wrote while this one loaded
    (out / "run_config.json").write_text("{}")
    (out / "checkpoint-1").mkdir()
    with pytest.raises(ConfigError, match=rf"output.dir={out} changed while this run loaded: another trainer wrote to "
                                          r"it. Nothing was written"):
        rundir.start_run(out, tiny_config, overwrite=False, seen=seen)
    assert (out / "run_config.json").read_text() == "{}" and (out / "checkpoint-1").is_dir()
    (out / "run_config.json").unlink()  # the lock went with the refusal: once the directory is as seen, it starts
    shutil.rmtree(out / "checkpoint-1")
    rundir.start_run(out, tiny_config, overwrite=False, seen=seen)
    rundir.unlock(out)
    assert json.loads((out / "run_config.json").read_text())["output"]["dir"] == str(out)


def test_a_run_file_rewritten_at_its_own_size_while_the_run_loaded_is_refused(tiny_config):
    """--overwrite of a run while another trainer replaced it with a run of its own: the other's run_config.json is
    as long as the one seen (another train.lr of as many digits), so only its modification time tells. Compared by
    name and size alone, the first write went on and deleted the other trainer's run."""
    out = Path(tiny_config.output.dir)
    out.mkdir()
    (out / "run_config.json").write_text('{"train": {"lr": 0.0002}}')
    (out / "checkpoint-1").mkdir()
    seen = rundir.check_run_dir(out, tiny_config, resume=False, overwrite=True)
    (out / "run_config.json").write_text('{"train": {"lr": 0.0003}}')  # the other trainer's run, the same size
    stat = (out / "run_config.json").stat()
    os.utime(out / "run_config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ConfigError, match=rf"output.dir={out} changed while this run loaded"):
        rundir.start_run(out, tiny_config, overwrite=True, seen=seen)
    assert (out / "run_config.json").read_text() == '{"train": {"lr": 0.0003}}' and (out / "checkpoint-1").is_dir()


def test_a_run_records_its_local_paths_absolute_and_is_evaluated_from_anywhere(cli, tmp_path):
    """run_config.json kept `recipes/data/tiny/...` as the recipe wrote it: qlora.eval from another directory loaded
    the model, then found no data."""
    out = tmp_path / "run"
    assert cli.run([TINY, *QUICK, f"--output.dir={out}"]).status == 0
    data = json.loads((out / "run_config.json").read_text())["data"]
    assert Path(data["train"]).is_absolute() and Path(data["train"]).is_file() and Path(data["eval"]).is_file()
    proc = subprocess.run([sys.executable, "-m", "qlora.eval", str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "held-out loss" in proc.stdout, proc.stderr


def test_a_damaged_checkpoint_is_set_aside_under_a_name_still_free(tmp_path):
    """A resume sets a damaged checkpoint aside by os.replace, which fails onto a folder that is not empty: the name is
    one that no earlier resume took."""
    checkpoint = tmp_path / "checkpoint-8"
    assert rundir.aside_name(checkpoint) == tmp_path / "checkpoint-8.damaged"
    for taken in ("checkpoint-8.damaged", "checkpoint-8.damaged-2"):
        (tmp_path / taken).mkdir()
        (tmp_path / taken / "adapter_model.safetensors").write_bytes(b"set aside by an earlier resume")
    assert rundir.aside_name(checkpoint) == tmp_path / "checkpoint-8.damaged-3"


def test_the_lock_holds_this_runs_pid_alone_over_a_killed_runs_longer_one(tiny_config):
    """The lock file outlives its run: written over a longer pid, this run's must not keep that one's tail, or the
    trainer refused next names a pid that is neither (4242 over 4194304 read '4242\\n04')."""
    out = Path(tiny_config.output.dir)
    out.mkdir()
    (out / rundir.LOCK).write_text("4194304\n")  # a killed run's, released with its process
    seen = rundir.check_run_dir(out, tiny_config, resume=False, overwrite=False)
    rundir.start_run(out, tiny_config, overwrite=False, seen=seen)
    try:
        assert rundir.lock_holder(out) == str(os.getpid())
    finally:
        rundir.unlock(out)


def test_the_names_a_run_owns_are_told_from_the_rest_of_its_directory(tmp_path):
    """What merge, export and eval refuse to write into (run_owned): the run's files, checkpoints and leftovers, found
    from the run or from a checkpoint given as the run; not the run's directory itself (it has no name in the run: an
    IndexError), a file of the user's in it, or a path outside it."""
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    owned = {run: None, run / "checkpoint-2": "checkpoint-2", run / "checkpoint-2" / "m": "checkpoint-2",
             run / "metrics.jsonl": "metrics.jsonl", run / ".qlora.lock": ".qlora.lock",
             run / ".tmp-final": ".tmp-final", run / "checkpoint-3.damaged": "checkpoint-3.damaged",
             run / "eval.json": None, run / "notes" / "m": None, tmp_path / "run-merged": None}
    for given in (run, run / "checkpoint-2"):
        assert {path: rundir.run_owned(path, given) for path in owned} == owned, given


def test_a_start_refused_by_the_system_releases_the_lock(tiny_config, monkeypatch):
    """In one process (a notebook, a sweep), a run whose first write the system refused leaves its directory to the
    next try, not 'in use by another trainer' (this very process)."""
    import errno

    out = Path(tiny_config.output.dir)

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    seen = rundir.check_run_dir(out, tiny_config, resume=False, overwrite=False)
    monkeypatch.setattr(rundir, "write_aside", refused)
    with pytest.raises(ConfigError, match=rf"output.dir={out} cannot be written \(Permission denied\)"):
        rundir.start_run(out, tiny_config, overwrite=False, seen=seen)
    assert rundir.lock_holder(out) is None


def test_a_run_config_rewritten_at_the_same_size_while_the_run_loaded_is_refused(tiny_config):
    """Another trainer's --overwrite with train.seed=2 over one with seed=1 writes a run_config.json of the same size:
    the run that loaded meanwhile is refused by the file's time, and the other's file is kept."""
    out = Path(tiny_config.output.dir)
    out.mkdir()
    (out / "run_config.json").write_text('{"train": {"seed": 1}}\n')
    seen = rundir.check_run_dir(out, tiny_config, resume=False, overwrite=True)
    (out / "run_config.json").write_text('{"train": {"seed": 2}}\n')
    stat = (out / "run_config.json").stat()
    os.utime(out / "run_config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later write, however coarse
    with pytest.raises(ConfigError, match=rf"output.dir={out} changed while this run loaded"):
        rundir.start_run(out, tiny_config, overwrite=True, seen=seen)
    assert (out / "run_config.json").read_text() == '{"train": {"seed": 2}}\n'


def test_a_held_lock_is_refused_by_the_check_before_loading(tiny_config):
    """check_run_dir, run before the base and data load, refuses a directory another trainer holds: left to the lock
    start_run takes, the refusal came only once the base was loaded (minutes on a large model), the same line."""
    out = Path(tiny_config.output.dir)
    seen = rundir.check_run_dir(out, tiny_config, resume=False, overwrite=False)
    rundir.start_run(out, tiny_config, overwrite=False, seen=seen)  # this process holds the lock, as another would
    try:
        in_use = rf"output.dir={out} is in use by another trainer \(pid {os.getpid()}\)"
        for resume, overwrite in ((False, False), (True, False), (False, True)):
            with pytest.raises(ConfigError, match=in_use):
                rundir.check_run_dir(out, tiny_config, resume=resume, overwrite=overwrite)
    finally:
        rundir.unlock(out)
    assert rundir.check_run_dir(out, tiny_config, resume=True, overwrite=False) == rundir.contents(out)


# A Hugging Face Trainer's checkpoint (with PEFT): optimizer.pt and the adapter's names are ours too.
HF_CHECKPOINT = ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt",
                 "trainer_state.json", "training_args.bin")


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("name", "held", "ours_beside", "why"), [
    ("checkpoint-500", HF_CHECKPOINT, False, r"it holds rng_state.pth, scheduler.pt, trainer_state.json, \.\.\., "
                                             r"which ours never hold"),
    ("checkpoint-500", HF_CHECKPOINT, True, r"it holds rng_state.pth, scheduler.pt, trainer_state.json, \.\.\., "
                                            r"which ours never hold"),
    ("checkpoint-500.damaged", HF_CHECKPOINT, False, r"it holds rng_state.pth"),
    ("checkpoint-500", ("optimizer.pt", "adapter_model.safetensors"), False,
     r"it holds no trainer_state.pt, and no run_config.json lies beside it"),
], ids=["Trainer's, alone", "Trainer's, in a run of ours", "set aside as damaged", "only names of ours"])
def test_another_tools_checkpoint_is_refused_and_never_deleted(tiny_config, name, held, ours_beside, why):
    """Another tool's checkpoint-500 was taken for a run of ours: refused with "pass --resume to continue it", and
    --overwrite deleted it. Now refused before loading, whatever the flags, naming the folder; nothing is touched.
    Our own checkpoints, damaged since they were written, are still set aside or deleted as before."""
    out = Path(tiny_config.output.dir)
    (out / name).mkdir(parents=True)
    for held_name in held:
        (out / name / held_name).write_bytes(b"another tool's " + held_name.encode())
    (out / "notes.txt").write_text("mine")
    if ours_beside:
        (out / "run_config.json").write_text(json.dumps(tiny_config.to_dict(), indent=2) + "\n")
    before = files(out)
    refusal = (rf"^{out}/{re.escape(name)} is another tool's checkpoint, not this trainer's \({why}.*\), which a run "
               rf"here would set aside or delete as its own: move it out of {out}, or use another output.dir$")
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        with pytest.raises(ConfigError, match=refusal):
            rundir.check_run_dir(out, tiny_config, resume=resume, overwrite=overwrite)
    if not ours_beside and not name.endswith("damaged"):
        with pytest.raises(ConfigError, match=refusal):  # --resume reads the run's config first: not "restore it"
            resume_config(tiny_config, [])
    assert files(out) == before
    # Moved away, as the line says: checkpoints of ours, damaged since, are ours still, and --overwrite deletes them.
    (out / name).rename(out.parent / name)
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "optimizer.pt").write_bytes(b"ours, its trainer_state.pt removed")
    (out / "checkpoint-3.damaged").mkdir()
    (out / "run_config.json").write_text(json.dumps(tiny_config.to_dict(), indent=2) + "\n")
    seen = rundir.check_run_dir(out, tiny_config, resume=False, overwrite=True)
    rundir.start_run(out, tiny_config, overwrite=True, seen=seen)
    rundir.unlock(out)
    assert sorted(p.name for p in out.iterdir()) == [".qlora.lock", "notes.txt", "run_config.json"]


@pytest.mark.parametrize("junk", [".DS_Store", "._optimizer.pt", "Thumbs.db", "desktop.ini"])
def test_a_file_browsers_files_leave_a_checkpoint_ours(tiny_config, junk):
    """A checkpoint of ours opened in macOS Finder (its .DS_Store; ._NAME on a drive of another format) or Windows
    Explorer was refused as another tool's, and the run could not resume. Ours still; a name of another kind is not."""
    out = Path(tiny_config.output.dir)
    (out / "checkpoint-4").mkdir(parents=True)
    for name in ("trainer_state.pt", "optimizer.pt", junk):
        (out / "checkpoint-4" / name).write_bytes(b"x")
    checkpoint.check_ours(out / "checkpoint-4")
    (out / "checkpoint-4" / f"x{junk}").write_bytes(b"x")
    with pytest.raises(ConfigError, match=rf"\(it holds x{re.escape(junk)}, which ours never hold\)"):
        checkpoint.check_ours(out / "checkpoint-4")


def test_another_tools_adapter_is_never_deleted_by_overwrite(tiny_config):
    """An adapter (or metrics.jsonl) in a folder without run_config.json, which a run writes first, is another tool's:
    --overwrite deleted it, as the refusal without it offered. A checkpoint's own folder given is still ours."""
    out = Path(tiny_config.output.dir)
    out.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.jsonl"):
        (out / name).write_text("another tool's")
    before = files(out)
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        with pytest.raises(ConfigError, match=rf"^output.dir={out} holds metrics.jsonl, adapter_model.safetensors, "
                                              r"adapter_config.json but no run_config.json, so no run's files, which "
                                              r"this run would write over \(and --overwrite delete\): move them out "
                                              r"of it, or use another output.dir$"):
            rundir.check_run_dir(out, tiny_config, resume=resume, overwrite=overwrite)
    assert files(out) == before
    (out / "metrics.jsonl").unlink()
    (out / "trainer_state.pt").write_bytes(b"ours")  # out is a checkpoint-N of ours: its own refusal stands
    with pytest.raises(ConfigError, match=r"is a checkpoint, not a run's folder"):
        rundir.check_run_dir(out, tiny_config, resume=False, overwrite=False)


@pytest.mark.parametrize("name", ["checkpoint-4", "best"], ids=["in its run", "copied out as best"])
def test_a_checkpoint_given_as_output_dir_is_refused_whatever_the_flags(tiny_config, name):
    """--output.dir=RUN/checkpoint-4 --overwrite deleted the checkpoint's adapter files and wrote a run_config.json
    into it (without --overwrite: "holds a trained adapter ... or --overwrite to replace it"). A checkpoint (our
    trainer_state.pt in it) is never a run's output.dir: refused with or without either flag, nothing touched."""
    run = Path(tiny_config.output.dir)
    ckpt = run / name
    ckpt.mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps(tiny_config.to_dict(), indent=2) + "\n")
    for held in ("trainer_state.pt", "optimizer.pt", "adapter_model.safetensors", "adapter_config.json"):
        (ckpt / held).write_bytes(held.encode())
    before = files(run)
    refusal = (rf"^output.dir={ckpt} is a checkpoint, not a run's folder \(a run there would write over it, and "
               rf"--overwrite delete it\): continue its run with --resume and --output.dir={run}, or use another "
               r"output.dir$")
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        with pytest.raises(ConfigError, match=refusal):
            rundir.check_run_dir(ckpt, tiny_config, resume=resume, overwrite=overwrite)
    (ckpt / "trainer_state.pt").unlink()  # damaged since: still a checkpoint-N of the run beside it
    if name.startswith("checkpoint-"):
        with pytest.raises(ConfigError, match=refusal):
            rundir.check_run_dir(ckpt, tiny_config, resume=False, overwrite=True)
    (ckpt / "trainer_state.pt").write_bytes(b"trainer_state.pt")
    assert files(run) == before
