"""How a command can end, and the line it ends with: error types, exit statuses, and the mapping from one to the other.

    0      done
    1      a bug: the traceback
    2      bad input (a ConfigError), found before anything is written
    3      more than train.max_bad_steps steps with a non-finite loss or gradient; a checkpoint is saved
    4      out of memory; the last checkpoint is kept, the message says what would fit
    5      a file could not be written (disk full); the message names what is intact
    6      several processes: another one died or hung; the newest checkpoint is intact (qlora/training/launch.py)
    128+N  stopped by signal N: 130 for Ctrl-C (SIGINT), 143 for SIGTERM, 129 for SIGHUP (the terminal closed; not
           under nohup), and in training 141 for SIGPIPE (stdout's reader gone); in training each with a checkpoint

A file or directory the command cannot use (permission denied, a read-only disk, a directory where a file should be,
or the other way round) is bad input too (2), whichever command met it. Every module may import this one: it imports
nothing but the standard library. `qlora.cli.run` is the one place that turns an ending into its status and prints the
line (`exit_status` here says which).
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from pathlib import Path

EXIT_BUG, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_OOM, EXIT_SAVE, EXIT_PEER = 1, 2, 3, 4, 5, 6
# What gives room to a write the system refused for want of it: a full disk or quota, or a file-size limit (ulimit -f,
# a FAT32 disk's 4 GiB: Python ignores SIGXFSZ, so the write fails with EFBIG), which no space freed would lift.
ROOM_FIX = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
            errno.EFBIG: "raise the file-size limit (ulimit -f), or write to a file system that takes larger files"}
# Errors of a path the user chose, not of the program: "cannot use PATH (reason)", exit 2.
UNUSABLE_PATH = (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOENT,
                 errno.ENAMETOOLONG, errno.ELOOP)
# What a refusal of `--resume` names to start a new run instead: the trainer refuses --resume with --overwrite, so
# "--overwrite" alone, added to the command refused, met that refusal next.
OVERWRITE_ON_RESUME = "--overwrite in place of --resume"


def start_over(resume: bool) -> str:
    """The flag a refusal names to start a new run in output.dir: in place of --resume where the command has it."""
    return OVERWRITE_ON_RESUME if resume else "--overwrite"


class ConfigError(ValueError):
    """A mistake in a recipe, an override or another input; the message names the key (or file) and the fix."""


class Stop(Exception):
    """The command ends here on purpose; `code` is the exit status, the message says why and what to do."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def stopping_signals() -> list[int]:
    """The signals a command ends for with one line: Ctrl-C, SIGTERM, and SIGHUP (its terminal closed, an ssh session
    lost) unless ignored (`nohup`). Uncaught, a SIGHUP while the base loaded ended the process without a word."""
    return [sig for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN]


class Session:
    """What the command has reached, for the line it ends with: what of its run is intact (set by a command once it
    has a run directory whose checkpoints may be), the signal that is ending it, if one is, and the exit status its
    ending has decided before it is reported (a Ctrl-C or SIGTERM then would only replace it: qlora/cli.py)."""

    intact: Callable[[], str] | None = None
    signal: int | None = None
    ended: int | None = None


def check_writable(path: Path, what: str, directory: bool = False) -> None:
    """Refuse (exit 2) a `path` a command is told to write (a file, or with `directory` one to create or fill) that
    cannot be: of the other kind, under a file, or in a directory it may not write; or that holds a control character
    (a newline split the `written:` line naming it, and a script reading that line got two paths). Checked before any
    work."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in str(path)):
        raise Stop(EXIT_BAD_INPUT, f"{what}={str(path)!a} holds a control character (a newline or a tab), which would "
                                   "split the line that names it: choose a path without one")
    if path.exists() and path.is_dir() != directory:
        raise Stop(EXIT_BAD_INPUT, f"{what}={path} is a {'directory' if path.is_dir() else 'file'}: give "
                                   f"{'a directory' if directory else 'the path of a file'}")
    if not directory and path.exists() and not path.is_file():  # renamed over, /dev/zero was a 208-byte file
        raise Stop(EXIT_BAD_INPUT, f"{what}={path} is not a regular file (a pipe or a device), which writing would "
                                   "replace: give the path of a file")
    probe = path
    while not probe.exists() and probe != probe.parent:  # the nearest existing ancestor: where creating starts
        if probe.is_symlink():  # a loop or a link to nothing: what resolves the path (run_owned) raised RuntimeError
            where = "" if probe == path else f" cannot be created: {probe}"
            raise Stop(EXIT_BAD_INPUT, f"{what}={path}{where} is a link that leads nowhere (a loop, or a missing "
                                       "target): remove the link, or choose another path")
        probe = probe.parent
    if not probe.is_dir() and probe != path:
        raise Stop(EXIT_BAD_INPUT, f"{what}={path} cannot be created: {probe} is a file: move it aside, or choose "
                                   "another path")
    if not os.access(probe, os.W_OK | (os.X_OK if probe.is_dir() else 0)):
        if os.statvfs(probe).f_flag & os.ST_RDONLY:  # access() says EROFS too: no permission would help
            raise Stop(EXIT_BAD_INPUT, f"{what}={path} is not writable ({probe} is on a read-only file system): "
                                       "choose another path, or remount it read-write")
        raise Stop(EXIT_BAD_INPUT, f"{what}={path} is not writable ({probe}: permission denied): choose another "
                                   "path or make it writable")


def json_trouble(err: ValueError | RecursionError) -> str:
    """Why json.loads refused a text, in a few words for the one line: JSON's own message and where, the first clause
    of the limit an integer of over 4,300 digits meets (a ValueError), or JSON nested past Python's recursion limit
    (a RecursionError, which a file of 100,000 brackets meets)."""
    return "nested too deeply" if isinstance(err, RecursionError) else str(err).split(";")[0]


def interrupting_signal(err: BaseException) -> int | None:
    """The signal that ended the command, whatever `err` it surfaced as; None if none did."""
    if Session.signal is not None:
        return Session.signal
    return signal.SIGINT if isinstance(err, KeyboardInterrupt) else None  # Ctrl-C under Python's own handler


def came_of_a_signal() -> bool:
    """Whether a KeyboardInterrupt being handled now came of a signal. Every command's handler records the signal as
    it raises (qlora/cli.py), so one with none recorded was raised by code (a recipe's `raise KeyboardInterrupt`).
    Under Python's own handler (a command called in-process) the two look alike: taken for a signal."""
    return Session.signal is not None or signal.getsignal(signal.SIGINT) is signal.default_int_handler


def exit_status(err: BaseException) -> tuple[int, str] | None:
    """The exit status and the line for an error that ends a command, or None for a bug (show the traceback)."""
    signum = interrupting_signal(err)
    if signum is not None and not (isinstance(err, Stop) and err.code >= 128):  # the loop's own stop says more
        intact = Session.intact() if Session.intact else ""
        tail = (f"; {intact}" + (": continue with --resume" if "intact" in intact else ": run the command again to "
                                 "start")) if intact else ""
        return 128 + signum, f"stopped by {signal.Signals(signum).name}{tail}"
    if isinstance(err, ConfigError):  # one line, whatever the bad value held (`--train.steps=$'3\n4'`)
        return EXIT_BAD_INPUT, "error: " + str(err).replace("\r", "\\r").replace("\n", "\\n")
    if isinstance(err, Stop):
        return err.code, str(err) if err.code >= 128 else f"error: {err}"
    if isinstance(err, OSError) and err.errno in ROOM_FIX:  # outside a checkpoint: metrics.jsonl, run_config.json
        intact, fix = Session.intact() if Session.intact else "", ROOM_FIX[err.errno]
        return EXIT_SAVE, (f"error: could not write {err.filename or 'a file'} ({err.strerror}); "
                           + (f"{intact}: {fix}, then continue with --resume" if "intact" in intact
                              else f"{fix}, then run the command again"))
    if isinstance(err, OSError) and err.errno in UNUSABLE_PATH and err.filename is not None:
        return EXIT_BAD_INPUT, f"error: cannot use {err.filename} ({err.strerror}): check that path, or choose another"
    return None


def check_ascii_number(flag: str, text: str) -> None:
    """Refuse a number given to `flag` in other digits than ASCII's or with '_' in it: int() and float() read '٣' as
    3 and '1_000' as 1000, which --gpus and WORLD_SIZE refused; one rule and one line for every number a command
    takes (an override's, qlora.memory's sizes, the commands' --rows, --temperature ...)."""
    if text.isascii() and "_" not in text:
        return
    read = ""  # what Python makes of it, not a suggestion: '0_5' is 5, and 0.5 may have been meant
    for kind in (int, float):
        try:
            read = f" (Python reads it as {kind(text)!r})"
            break
        except ValueError:
            continue
    raise ConfigError(f"{flag}={text!a}: write numbers in ASCII digits (0-9), without '_'{read}")


def launched_ranks() -> tuple[int, int, int, int]:
    """RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE as torchrun and accelerate launch set them (0, 1, 0, 1 for a
    process alone): each ASCII digits (int() also takes " 1", "-1" and "٣", and "²" passes isdigit), the ranks below
    the world size. RANK=1 alone trained on no rows and crashed in its first step; WORLD_SIZE=0 divided by zero in
    the first evaluation. A launcher that leaves LOCAL_WORLD_SIZE unset is taken to start every process on this host:
    the share of its memory each counts on (preflight.host_share) is then never more than its own."""
    size = os.environ.get("WORLD_SIZE", "1")
    values = {name: os.environ.get(name, default) for name, default in (
        ("RANK", "0"), ("WORLD_SIZE", size), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", size))}
    fix = "launch with torchrun --nproc-per-node=N -m qlora.train RECIPE.py, which sets them, or unset them"
    for name, value in values.items():
        if not (value.isascii() and value.isdigit()) or len(value) > 9:  # int() refuses 4,300 digits
            raise ConfigError(f"{name}={value!r} is not a whole number of up to 9 digits: {fix}")
    rank, size, local_rank, local_size = (int(v) for v in values.values())
    if max(rank, local_rank) >= size:
        raise ConfigError(f"RANK={rank} and LOCAL_RANK={local_rank} with WORLD_SIZE={size}: each rank lies in [0, "
                          f"WORLD_SIZE); {fix}")
    if not local_rank < local_size <= size:
        raise ConfigError(f"LOCAL_RANK={local_rank} with LOCAL_WORLD_SIZE={local_size} of WORLD_SIZE={size}: this "
                          f"host's ranks lie in [0, LOCAL_WORLD_SIZE), and it has at most WORLD_SIZE; {fix}")
    return rank, size, local_rank, local_size


def line_of_this_rank(code: int, line: str) -> str | None:
    """`line` on rank 0 (or a command run alone); on another rank of several, prefixed with it where the ending was
    this process's own (exit 4 or 6), else None: rank 0 prints what every process met alike."""
    try:
        rank = launched_ranks()[0]
    except ConfigError:  # a process whose ranks are refused has no rank 0 to speak for it: the refusal is its line
        return line
    if rank == 0:
        return line
    return f"rank {rank}: {line}" if code in (EXIT_OOM, EXIT_PEER) else None


def repeated_notes(given: dict[str, list[str]]) -> list[str]:
    """For each flag or key given more than once with other values (`given`: its name and each `--name=value`), the
    line saying which stands: the last, as argparse and the recipe's overrides take it."""
    return [f"{name} is given {len(items)} times: the last, {items[-1]}, stands (not {', '.join(items[:-1])})"
            for name, items in given.items() if len(set(items)) > 1]
