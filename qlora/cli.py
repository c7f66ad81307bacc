"""How every command ends: the one place that turns the way a command stopped into an exit status and one line.

    0      done
    1      a bug: the traceback
    2      bad input (a ConfigError), found before anything is written
    3      more than train.max_bad_steps steps with a non-finite loss or gradient; a checkpoint is saved
    4      out of memory; the last checkpoint is kept, the message says what would fit
    5      a file could not be written (disk full); the message names what is intact
    6      several processes: another one died or hung; the newest checkpoint is intact (qlora/distributed.py)
    128+N  stopped by signal N: 130 for Ctrl-C (SIGINT), 143 for SIGTERM

Of several processes of one run (torchrun sets RANK), rank 0 speaks for all: an ending every process meets alike
prints once; one that befell a single process (it lost the others, ran out of memory) prints there, after its rank.

Every `python -m qlora.<command>` calls `run(main)`; `--debug` anywhere on its command line shows the traceback
instead of the line. A Ctrl-C or SIGTERM that arrives while Python is still importing torch ends in one line too:
`qlora/__init__.py` calls `catch_early_signals()` as such a command starts.

A file or directory the command cannot use (permission denied, a read-only disk, a directory where a file should be,
or the other way round) is bad input too (2), whichever command met it; argparse's own errors are one line with
exit 2 as well (`ArgumentParser`). A closed stdout (`... | head`) ends the command quietly.

Nothing is imported here at module level but the standard library, not even qlora.config: this module runs before
anything else is loaded (and `python -m qlora.config` must find qlora.config not yet imported).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_BUG, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_OOM, EXIT_SAVE, EXIT_PEER = 1, 2, 3, 4, 5, 6
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Errors of a path the user chose, not of the program: "cannot use PATH (reason)", exit 2.
UNUSABLE_PATH = (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOENT,
                 errno.ENAMETOOLONG, errno.ELOOP)


class Stop(Exception):
    """The command ends here on purpose; `code` is the exit status, the message says why and what to do."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one line and exit 2, like every other bad input (argparse prints a usage line
    above the error)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        raise Stop(EXIT_BAD_INPUT, f"{message} (usage: {usage})")


def check_writable(path: Path, what: str, directory: bool = False) -> None:
    """Refuse (exit 2) a `path` a command is told to write (a file, or with `directory` one to create or fill) that
    cannot be: of the other kind, under a file, or in a directory it may not write. Checked before any work."""
    if path.exists() and path.is_dir() != directory:
        raise Stop(EXIT_BAD_INPUT, f"{what}={path} is a {'directory' if path.is_dir() else 'file'}: give "
                                   f"{'a directory' if directory else 'the path of a file'}")
    probe = path
    while not probe.exists() and probe != probe.parent:  # the nearest existing ancestor: where creating starts
        probe = probe.parent
    if not probe.is_dir() and probe != path:
        raise Stop(EXIT_BAD_INPUT, f"{what}={path} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | (os.X_OK if probe.is_dir() else 0)):
        raise Stop(EXIT_BAD_INPUT, f"{what}={path} is not writable ({probe}: permission denied): choose another "
                                   "path or make it writable")


class SignalInterrupt(KeyboardInterrupt):
    """Ctrl-C or SIGTERM outside the training loop's own handling, raised as a KeyboardInterrupt (so every cleanup
    that runs for Ctrl-C runs for SIGTERM too)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Session:
    """What the command has reached, for the line it ends with: the run directory whose checkpoints may be intact
    (set by commands that write one), and the signal that is ending it, if one is."""

    run_dir: Path | None = None
    signal: int | None = None


def raise_signal_interrupt(signum: int, frame: object) -> None:
    # Recorded before raising: an import interrupted midway may surface as another error entirely (transformers'
    # lazy modules turn it into a ModuleNotFoundError, sometimes after a RecursionError, with no trace of the signal).
    Session.signal = signum
    raise SignalInterrupt(signum)


def _intact() -> str:
    if Session.run_dir is None:
        return ""
    from qlora.checkpoint import list_checkpoints  # torch is loaded by now: a run dir is known only once it is

    latest = list_checkpoints(Session.run_dir)
    return f"{latest[-1]} is intact" if latest else "no checkpoint was written"


def interrupting_signal(err: BaseException) -> int | None:
    """The signal that ended the command, whatever `err` it surfaced as; None if none did."""
    if Session.signal is not None:
        return Session.signal
    return signal.SIGINT if isinstance(err, KeyboardInterrupt) else None  # Ctrl-C under Python's own handler


def exit_status(err: BaseException) -> tuple[int, str] | None:
    """The exit status and the line for an error that ends a command, or None for a bug (show the traceback)."""
    from qlora.config import ConfigError

    signum = interrupting_signal(err)
    if signum is not None and not (isinstance(err, Stop) and err.code >= 128):  # the loop's own stop says more
        intact = _intact()
        tail = (f"; {intact}" + (": continue with --resume" if "intact" in intact else "")) if intact else ""
        return 128 + signum, f"stopped by {signal.Signals(signum).name}{tail}"
    if isinstance(err, ConfigError):
        return EXIT_BAD_INPUT, f"error: {err}"
    if isinstance(err, Stop):
        return err.code, str(err) if err.code >= 128 else f"error: {err}"
    if isinstance(err, OSError) and err.errno in DISK_FULL:  # outside a checkpoint: metrics.jsonl, run_config.json
        intact = _intact()
        return EXIT_SAVE, (f"error: could not write {err.filename or 'a file'} ({err.strerror}); "
                           + (f"{intact}: free some space, then continue with --resume" if intact
                              else "free some space, then run the command again"))
    if isinstance(err, OSError) and err.errno in UNUSABLE_PATH and err.filename is not None:
        return EXIT_BAD_INPUT, f"error: cannot use {err.filename} ({err.strerror}): check that path, or choose another"
    return None


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run a command's `main(argv)`; return its exit status, printing one line for every ending but a bug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if Session.signal is not None:  # a Ctrl-C during the imports that a library caught and went on from
        signum, Session.signal = Session.signal, None
        print(f"stopped by {signal.Signals(signum).name} while starting: nothing was written", file=sys.stderr)
        return 128 + signum
    Session.run_dir = None
    replaced = {}  # from here on a signal is raised, so that what a command started can be cleaned up
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIG_DFL: SIGTERM would end the process without a word
        if signal.getsignal(sig) in (signal.SIG_DFL, exit_while_starting):
            replaced[sig] = signal.signal(sig, raise_signal_interrupt)
    try:
        return main(argv) or 0
    except BrokenPipeError:  # stdout closed by its reader (`| head`): nothing more to say, and no one to say it to
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (Exception, KeyboardInterrupt) as err:
        ending = exit_status(err)
        if debug or ending is None:
            raise
        code, line = ending
        if (line := line_of_this_rank(code, line)) is not None:
            print(line, file=sys.stderr)
        return code
    finally:
        Session.run_dir = Session.signal = None  # a later command in this process starts afresh
        for sig, handler in replaced.items():
            signal.signal(sig, handler)


def exit_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM during the imports, before `run` took over: nothing is written yet, so the process ends here,
    at once. Raising instead can abort the interpreter: an exception thrown through torch's C++ while it imports
    ends in "terminate called after throwing an instance of 'pybind11::error_already_set'" and SIGABRT."""
    os.write(2, f"stopped by {signal.Signals(signum).name} while starting: nothing was written\n".encode())
    os._exit(128 + signum)


def line_of_this_rank(code: int, line: str) -> str | None:
    """`line` on rank 0 (or a command run alone); on another rank of several, prefixed with it where the ending was
    this process's own (exit 4 or 6), else None: rank 0 prints what every process met alike."""
    rank = os.environ.get("RANK", "0")
    if not rank.isdigit() or int(rank) == 0:
        return line
    return f"rank {rank}: {line}" if code in (EXIT_OOM, EXIT_PEER) else None


def _early_excepthook(kind: type[BaseException], err: BaseException, tb: object) -> None:
    """A Ctrl-C or SIGTERM raised during the imports (with --debug, or one a library turned into another error):
    one line, and the signal's exit status."""
    if (signum := interrupting_signal(err)) is not None and "--debug" not in sys.argv:
        print(f"stopped by {signal.Signals(signum).name} while starting: nothing was written", file=sys.stderr)
        sys.stderr.flush()
        os._exit(128 + signum)
    sys.__excepthook__(kind, err, tb)


def catch_early_signals() -> None:
    """From the first import of a command on, Ctrl-C and SIGTERM end it with one line (with --debug, by raising:
    the traceback shows where the imports were)."""
    handler = raise_signal_interrupt if "--debug" in sys.argv else exit_while_starting
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    sys.excepthook = _early_excepthook
