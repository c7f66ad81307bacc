"""The output directory: whose run it holds, the names its trainer owns there (`run_owned`, which merge, export,
eval and qlora.memory's --out-dir keep their outputs out of), the lock, and the first write of a run (what `--resume`
may change in it: qlora/training/runconfig.py).

Everything here but `start_run` only reads, so a refused command leaves the directory as it was.

One trainer at a time: `start_run` takes an exclusive lock (flock on `.qlora.lock`, released when the run or its
process ends), and `check_run_dir` refuses a directory whose lock another process holds (on a file system without
flock, the run goes on unguarded). Of the hidden files a run leaves, only
those this code writes (LEFTOVER) are ever removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from qlora.adapters.loftq import SHIFTS
from qlora.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from qlora.config import Config, read_config_json
from qlora.errors import ROOM_FIX, ConfigError, check_writable, start_over, stopping_signals
from qlora.partial import name_output, write_aside
from qlora.training.checkpoint import (
    FULL_WEIGHTS,
    METRICS,
    PATTERN,
    RUN_CONFIG,
    STATE,
    check_ours,
    checkpoint_dirs,
    remove_checkpoint,
)
from qlora.training.runconfig import check_identity

MEMORY = "memory.json"
LOCK = ".qlora.lock"
RUN_FILES = (RUN_CONFIG, METRICS, ADAPTER_WEIGHTS, ADAPTER_CONFIG, FULL_WEIGHTS, MEMORY, SHIFTS)  # a run's own files
# What a killed run may leave half-written (checkpoint.py, metrics.MetricsLog, start_run, loftq.save_shifts): never
# read, so only in the way. Nothing else is removed, whatever its name.
LEFTOVER = re.compile(r"^\.(tmp|trash)-(checkpoint-\d+(\.damaged(-\d+)?)?|final|run_config\.json|metrics\.jsonl"
                      r"|loftq_shifts\.safetensors)$")
RUN_DIRS = re.compile(r"^checkpoint-\d+(\.damaged(-\d+)?)?$")  # a run's checkpoints, damaged ones set aside included

NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # a file system without flock (some network mounts)
_held: dict[str, int] = {}  # run dir (realpath: resolve() raises on a link loop) -> the fd holding its lock


def run_owned(path: Path, run_dir: Path) -> str | None:
    """The name in the run of `run_dir` (that directory, or the one a checkpoint-N lies in) under which `path` lies,
    where the trainer owns that name: its files, lock, checkpoints and what a killed run leaves, which a resume or the
    next checkpoint reads, renames or removes. None for a path anywhere else."""
    run = Path(run_dir).resolve()
    run = run.parent if RUN_DIRS.match(run.name) else run
    target = Path(path).resolve()
    if not target.is_relative_to(run) or target == run:
        return None
    top = target.relative_to(run).parts[0]
    return top if top in RUN_FILES or top == LOCK or RUN_DIRS.match(top) or LEFTOVER.match(top) else None


def lock_holder(run_dir: Path) -> str | None:
    """The pid written by the process that holds the directory's lock, or None if no process holds it."""
    path = run_dir / LOCK
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken and, by the close below, released: a probe
        return None
    except BlockingIOError:
        return path.read_text(encoding="utf-8").strip() or "unknown"
    except OSError as err:
        if err.errno in NO_LOCKS:
            return None
        raise
    finally:
        os.close(fd)


def _in_use(run_dir: Path, pid: str) -> ConfigError:
    return ConfigError(f"output.dir={run_dir} is in use by another trainer (pid {pid}): wait for it to end, or use "
                       "another output.dir")


def _check_paths(run_dir: Path) -> None:
    """The directory can be created or written, and every name the run writes is free or of the kind it writes."""
    check_writable(run_dir, "output.dir", directory=True)
    if not run_dir.is_dir():
        return
    for name in RUN_FILES:
        path = run_dir / name
        if (path.exists() or path.is_symlink()) and not path.is_file():
            raise ConfigError(f"{path} is not a file, yet the run writes that file there: move it away, or use "
                              "another output.dir")
    lock = run_dir / LOCK
    if lock.is_symlink() or (lock.exists() and not lock.is_file()):  # the lock file is written: never through a link
        raise ConfigError(f"{lock} is not a plain file (a trainer's lock is written there): remove it, or use "
                          "another output.dir")
    for path in run_dir.iterdir():
        if RUN_DIRS.match(path.name) and not path.is_dir():
            raise ConfigError(f"{path} is not a checkpoint directory, yet the run writes one under that name: move "
                              "it away, or use another output.dir")


def contents(run_dir: Path) -> tuple:
    """What of a run the directory holds, to tell whether another trainer wrote to it: each checkpoint's name, and
    each of a run's files with its size and modification time."""
    if not run_dir.is_dir():
        return ()
    files = tuple((name, s.st_size, s.st_mtime_ns) for name in RUN_FILES
                  if (s := _stat(run_dir / name)) is not None)
    return files + tuple(p.name for p in checkpoint_dirs(run_dir))


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def check_run_dir(run_dir: Path, cfg: Config, resume: bool, overwrite: bool) -> tuple:
    """Refuse an output dir that holds another run, one in use, one the run cannot write, or a run that would be
    started over by mistake. Reads only; returns what it found (`contents`), for `start_run` to check again under the
    lock."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output.dir and --overwrite discards it: pass one of them "
                          "(--overwrite alone starts over)")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output.dir={run_dir} is a file: point output.dir at a directory")
    base = Path(cfg.model.path).expanduser() if cfg.model.path else None
    if base is not None and base.is_dir() and run_dir.is_dir() and os.path.samefile(base, run_dir):
        raise ConfigError(f"output.dir={run_dir} is the base model's directory (model.path): transformers would load "
                          "the adapter written there with the base from then on; choose another output.dir")
    _check_paths(run_dir)  # first: a link loop here is refused in its line, not met by a resolve below
    _check_not_checkpoint(run_dir)
    for key in ("train", "eval"):  # read before the first write, then written over or removed (--overwrite) by it
        data = getattr(cfg.data, key)
        try:
            name = run_owned(Path(data).expanduser(), run_dir) if data else None
        except (OSError, RuntimeError):  # a data path in a link loop: the data reader's line says so
            name = None
        if name is not None:
            raise ConfigError(f"data.{key}={data} lies at {name} in output.dir={run_dir}, a name the run writes (and "
                              "--overwrite removes): move the data file out of it, or use another output.dir")
    if not run_dir.is_dir():
        return ()
    for path in run_dir.iterdir():  # after the data: a data file in a checkpoint-N is named as such, not as another's
        if RUN_DIRS.match(path.name):  # a run resumes, sets aside, prunes or deletes (--overwrite) each as its own
            check_ours(path)
    if (pid := lock_holder(run_dir)) is not None:
        raise _in_use(run_dir, pid)
    seen = contents(run_dir)
    # A run writes run_config.json before any other file: without it, these are someone else's (a metrics.jsonl or an
    # adapter of another tool, a home folder's memory.json), unless beside checkpoints of ours. A run would write over
    # them, and --overwrite deleted them.
    theirs = [name for name in RUN_FILES if (run_dir / name).exists()]
    latest = checkpoint_dirs(run_dir)
    if theirs and not (run_dir / RUN_CONFIG).exists() and not latest:
        raise ConfigError(f"output.dir={run_dir} holds {', '.join(theirs)} but no {RUN_CONFIG}, so no run's files, "
                          "which this run would write over (and --overwrite delete): move them out of it, or use "
                          "another output.dir")
    if overwrite:
        return seen
    recorded = read_config_json(run_dir / RUN_CONFIG, resume) if (run_dir / RUN_CONFIG).is_file() else None
    if recorded is not None:
        # On --resume cfg is the run's own (resume_config): a model.path that differs there was a moved base, given.
        check_identity(recorded, cfg, run_dir, moved=resume, resume=resume)
    finished = next((name for name in (ADAPTER_WEIGHTS, FULL_WEIGHTS) if (run_dir / name).exists()), None)
    if latest and not resume:
        steps = recorded.train.steps if recorded is not None else None
        if finished and steps is not None and int(PATTERN.match(latest[-1].name)[1]) >= steps:
            # the same command run again, most likely: --resume alone would rewrite the same adapter
            raise ConfigError(f"output.dir={run_dir} already holds a finished run ({steps} of {steps} steps, "
                              f"{finished} written): train it further with --resume --train.steps=N (N > {steps}), "
                              "start over with --overwrite, or use another output.dir")
        raise ConfigError(f"output.dir={run_dir} already holds a run (up to {latest[-1].name}): pass --resume to "
                          "continue it, or --overwrite to start over")
    restart = start_over(resume)  # the two are refused together
    if finished and not latest:  # its checkpoints deleted to save space
        raise ConfigError(f"output.dir={run_dir} holds a trained {finished} and no checkpoint to continue from: use "
                          f"another output.dir, or {restart} to replace it")
    return seen


def _check_not_checkpoint(run_dir: Path) -> None:
    """Refuse a checkpoint of ours as output.dir (our trainer_state.pt in it, or a checkpoint-N beside a run's config):
    a run there wrote its run_config.json into it, and --overwrite deleted its adapter files."""
    run = run_dir.parent
    if (run_dir / STATE).is_file() or (RUN_DIRS.match(run_dir.name) and (run / RUN_CONFIG).is_file()):
        raise ConfigError(f"output.dir={run_dir} is a checkpoint, not a run's folder (a run there would write over it, "
                          f"and --overwrite delete it): continue its run with --resume and --output.dir={run}, or use "
                          "another output.dir")


def _lock(run_dir: Path) -> None:
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = (run_dir / LOCK).read_text(encoding="utf-8").strip() or "unknown"
        os.close(fd)
        raise _in_use(run_dir, pid) from None
    except OSError as err:
        os.close(fd)
        if err.errno in NO_LOCKS:
            return  # the run goes on unguarded rather than not at all
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as err:  # a full disk: the first write of a run is its pid here
        os.close(fd)
        name_output(err, run_dir / LOCK, run_dir / LOCK)
        raise
    _held[os.path.realpath(run_dir)] = fd


def unlock(run_dir: Path) -> None:
    """Release the lock `start_run` took (a process that ends releases it anyway)."""
    fd = _held.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)


def aside_name(path: Path) -> Path:
    """A free name beside `path` for a damaged checkpoint kept for inspection: checkpoint-8.damaged(-2, ...)."""
    target, n = path.with_name(f"{path.name}.damaged"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    return target


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP (unless ignored: `nohup`) held back until the block ends, then delivered as they
    would have been."""
    heard: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: heard.append(signum)) for sig in stopping_signals()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in heard[:1]:
            signal.raise_signal(sig)


def config_text(cfg: Config) -> str:
    """run_config.json as `start_run` writes it for `cfg`."""
    return json.dumps(cfg.to_dict(), indent=2) + "\n"


def start_run(run_dir: Path, cfg: Config, overwrite: bool, seen: tuple, damaged: list[Path] | tuple = ()) -> None:
    """The first write of a run, once every input is validated: take the lock, check that the directory still holds
    what `check_run_dir` saw (`seen`), clear a replaced run, set damaged checkpoints aside, remove this code's own
    leftovers, record the config."""
    try:
        # Ctrl-C, SIGTERM or SIGHUP in here would leave half of a replaced run: they wait for the new run_config.json.
        with deferred_signals():
            run_dir.mkdir(parents=True, exist_ok=True)
            _lock(run_dir)
            # The lock is taken only now, the base and data loaded: a trainer started meanwhile on the same directory
            # may have written to it, and what was checked (its run, its checkpoints) no longer holds.
            if contents(run_dir) != seen:
                raise ConfigError(f"output.dir={run_dir} changed while this run loaded: another trainer wrote to it. "
                                  "Nothing was written: check what it holds, then run the command again")
            if overwrite:  # run_config.json last: until it goes, what is left is the old run, resumable as it was
                for path in sorted(run_dir.iterdir(), key=lambda p: p.name == RUN_CONFIG):
                    if RUN_DIRS.match(path.name):
                        remove_checkpoint(path)
                    elif path.name in RUN_FILES:
                        path.unlink()
            for path in damaged:
                os.replace(path, aside_name(path))  # out of the checkpoint names: never resumed, pruned or overwritten
            for path in run_dir.iterdir():
                if LEFTOVER.match(path.name):  # a link is removed, never what it points at
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            write_aside(run_dir / RUN_CONFIG, config_text(cfg), hidden=f".tmp-{RUN_CONFIG}")
    except OSError as err:
        unlock(run_dir)
        if err.errno in ROOM_FIX:
            raise  # not the user's choice of directory: reported as a full disk (or file-size limit), exit 5
        raise ConfigError(f"output.dir={run_dir} cannot be written ({err.strerror or err}): choose another "
                          "output.dir") from err
    except BaseException:
        unlock(run_dir)
        raise

