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

Nothing is imported here at module level, not even qlora.config: this module runs before anything else is loaded
(and `python -m qlora.config` must find qlora.config not yet imported).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_BUG, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_OOM, EXIT_SAVE, EXIT_PEER = 1, 2, 3, 4, 5, 6
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class Stop(Exception):
    """The command ends here on purpose; `code` is the exit status, the message says why and what to do."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


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
    return None


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run a command's `main(argv)`; return its exit status, printing one line for every ending but a bug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    Session.run_dir = Session.signal = None
    default_term = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # it would end the process without a word
    if default_term:
        signal.signal(signal.SIGTERM, raise_signal_interrupt)
    try:
        return main(argv) or 0
    except (Exception, KeyboardInterrupt) as err:
        ending = exit_status(err)
        if debug or ending is None:
            raise
        code, line = ending
        if (line := line_of_this_rank(code, line)) is not None:
            print(line, file=sys.stderr)
        return code
    finally:
        if default_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def line_of_this_rank(code: int, line: str) -> str | None:
    """`line` on rank 0 (or a command run alone); on another rank of several, prefixed with it where the ending was
    this process's own (exit 4 or 6), else None: rank 0 prints what every process met alike."""
    rank = os.environ.get("RANK", "0")
    if not rank.isdigit() or int(rank) == 0:
        return line
    return f"rank {rank}: {line}" if code in (EXIT_OOM, EXIT_PEER) else None


def _early_excepthook(kind: type[BaseException], err: BaseException, tb: object) -> None:
    """A Ctrl-C or SIGTERM during the imports, before `run` took over: one line, and the signal's exit status."""
    if (signum := interrupting_signal(err)) is not None and "--debug" not in sys.argv:
        print(f"stopped by {signal.Signals(signum).name} while starting: nothing was written", file=sys.stderr)
        sys.stderr.flush()
        os._exit(128 + signum)
    sys.__excepthook__(kind, err, tb)


def catch_early_signals() -> None:
    """From the first import of a command on, Ctrl-C and SIGTERM end it with one line."""
    signal.signal(signal.SIGINT, raise_signal_interrupt)
    signal.signal(signal.SIGTERM, raise_signal_interrupt)
    sys.excepthook = _early_excepthook
