"""How every command ends: `run(main)` turns the way a command stopped into its exit status and one line
(qlora/errors.py lists the statuses and says which line), for every entry point.

Of several processes of one run (torchrun sets RANK), rank 0 speaks for all: an ending every process meets alike
prints once; one that befell a single process (it lost the others, ran out of memory) prints there, after its rank.

Every `python -m qlora.<command>` calls `run(main)`; `--debug` anywhere on its command line shows the traceback
instead of the line. A Ctrl-C, SIGTERM or SIGHUP that arrives while Python still imports torch ends in one line too:
`qlora/__init__.py` calls `catch_early_signals()` as such a command starts. argparse's own errors are one line with
exit 2 as well (`ArgumentParser`). A closed stdout (`... | head`) ends the command quietly, whether a print met it
or the last flush did; a command whose result is what it prints (config's JSON, the memory report, generated text)
refuses to start with stdout closed (`>&-`: `require_stdout`). Under a locale that is not UTF-8, what stdout's and
stderr's codec lacks is printed escaped (`escape_what_streams_cannot_hold`), never a UnicodeEncodeError.

Nothing is imported here at module level but the standard library and qlora.errors: this module runs before anything
else is loaded (and `python -m qlora.config` must find qlora.config not yet imported).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import gc
import io
import os
import signal
import sys
from collections.abc import Callable, Sequence

from qlora.errors import (
    EXIT_BAD_INPUT,
    ConfigError,
    Session,
    Stop,
    check_ascii_number,
    exit_status,
    interrupting_signal,
    line_of_this_rank,
    repeated_notes,
    stopping_signals,
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one line and exit 2, like every other bad input (argparse prints a usage line
    above the error), and a flag given twice with other values said on stderr, as a recipe's key is (argparse took
    the last without a word: `qlora.merge RUN --out A --out B` wrote B)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        for name in (None, "store"):  # None: an argument named without an action
            self.register("action", name, NotedStore)
        self.given: dict[str, list[str]] = {}

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        self.given = {}
        parsed = super().parse_known_args(args, namespace)
        for line in repeated_notes(self.given):
            print(line, file=sys.stderr)
        return parsed

    def _get_value(self, action: argparse.Action, arg_string: str) -> object:
        if action.type in (int, float):  # check_ascii_number's line, as an override's and qlora.memory's numbers
            try:
                check_ascii_number(action.option_strings[0] if action.option_strings else action.dest, arg_string)
            except ConfigError as err:  # a ValueError, which argparse would take for its own "invalid int value"
                raise Stop(EXIT_BAD_INPUT, str(err)) from None
        return super()._get_value(action, arg_string)

    def error(self, message: str) -> None:  # type: ignore[override]
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        raise Stop(EXIT_BAD_INPUT, f"{message} (usage: {usage})")


class NotedStore(argparse._StoreAction):
    """argparse's `store`, recording each value an option is given (ArgumentParser.given)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        if option_string is not None and isinstance(parser, ArgumentParser):
            parser.given.setdefault(self.option_strings[-1], []).append(f"{self.option_strings[-1]}={values}")
        super().__call__(parser, namespace, values, option_string)


# A command process (`python -m qlora.<command>`) whose command has ended, its status decided, while the interpreter
# shuts down: nothing is left to stop, and "while starting: nothing was written" would no longer be true. A SIGTERM
# (torchrun stopping what is left of a run whose other process failed), a SIGHUP or a Ctrl-C is ignored, so the status
# stays the one decided: SIG_IGN also outlives the shutdown, which resets Python's own handlers to the default. Under
# SIG_DFL a Ctrl-C in the 2.5 s between a finished run's last line and its exit (a loaded 2-core CPU; ~0.5 s since
# skip_final_collection) ended it -2, 130 in a shell, without a word: a `train && merge` script stopped at a run that
# was done. The cost: a shutdown that hangs (a stuck thread, a CUDA teardown) takes Ctrl-\ or kill to end.
ENDED = {signal.SIGTERM: signal.SIG_IGN, signal.SIGHUP: signal.SIG_IGN, signal.SIGINT: signal.SIG_IGN}


class SignalInterrupt(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP outside the training loop's own handling, raised as a KeyboardInterrupt (so every
    cleanup that runs for Ctrl-C runs for the others too)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)


def raise_signal_interrupt(signum: int, frame: object) -> None:
    if Session.ended is not None:  # the ending is decided (a lost process: exit 6) and being reported
        return
    # Recorded before raising: an import interrupted midway may surface as another error entirely (transformers'
    # lazy modules turn it into a ModuleNotFoundError, sometimes after a RecursionError, with no trace of the signal).
    Session.signal = signum
    raise SignalInterrupt(signum)


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None, ranked: bool = False) -> int:
    """Run a command's `main(argv)`; return its exit status, printing one line for every ending but a bug. `ranked`:
    the command runs as one of several processes where launched so (qlora.train), and rank 0 speaks for them all;
    the others run alone whatever RANK says (an eval in a job script that set it stayed silent on rank 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    escape_what_streams_cannot_hold()
    if Session.signal is not None:  # a Ctrl-C during the imports that a library caught and went on from
        signum, Session.signal = Session.signal, None
        if (line := said_while_starting(signum, ranked)) is not None:
            print(line, file=sys.stderr)
        return 128 + signum
    Session.intact = Session.ended = None
    replaced = {}  # from here on a signal is raised, so that what a command started can be cleaned up
    for sig in stopping_signals():  # SIG_DFL: SIGTERM or SIGHUP would end the process without a word
        if signal.getsignal(sig) in (signal.SIG_DFL, exit_while_starting):
            replaced[sig] = signal.signal(sig, raise_signal_interrupt)
    try:
        code = main(argv) or 0
        # Flushed here, not at the interpreter's exit: with stdout a pipe (block-buffered) a short result waited there
        # for a reader that had left, and the exit printed "Exception ignored ... BrokenPipeError" and ended 120.
        if sys.stdout is not None:
            sys.stdout.flush()
        return code
    except BrokenPipeError:  # stdout closed by its reader (`| head`): nothing more to say, and no one to say it to
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (Exception, KeyboardInterrupt) as err:
        ending = exit_status(err)
        if debug or ending is None:
            raise
        code, line = ending
        if (line := line_of_this_rank(code, line) if ranked else line) is not None:
            try:
                print(line, file=sys.stderr)
            except OSError:  # its reader left too (`2>&1 | head`), or its terminal (SIGHUP): the status says it
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
        return code
    finally:
        Session.intact = Session.signal = Session.ended = None  # a later command in this process starts afresh
        ended = False  # this process's command, not one run in-process (a test's, whose process goes on)
        for sig, handler in replaced.items():
            ended = ended or handler is exit_while_starting
            signal.signal(sig, handler if handler is not exit_while_starting else ENDED[sig])
        if ended:  # the interpreter's shutdown is all that is left: see skip_final_collection
            skip_final_collection()


def escaped(err: UnicodeError) -> tuple[str | bytes, int]:
    """The error handler ESCAPED: the character at `err.start` that the stream's codec lacks, as surrogateescape gives
    it where it stands for a byte Python could not decode (a path from argv under LC_ALL=C, written back as the bytes
    it came as, which Python's own surrogateescape on such a stdout did), else as backslashreplace writes it."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    one = UnicodeEncodeError(err.encoding, err.object, err.start, err.start + 1, err.reason)
    if 0xDC80 <= ord(err.object[err.start]) <= 0xDCFF:
        return codecs.lookup_error("surrogateescape")(one)
    return codecs.backslashreplace_errors(one)


ESCAPED = "qlora.escaped"
codecs.register_error(ESCAPED, escaped)


def escape_what_streams_cannot_hold() -> None:
    """Under a locale that is not UTF-8 (latin-1, EUC, LC_ALL=C in a container with Python's coercion off), stdout and
    stderr take its codec, and a print of text it lacks (a generated answer, a data row, the memory report's "–")
    raised UnicodeEncodeError: the command ended in a traceback, its result half printed. Such characters are escaped
    instead; the codec stays the locale's, which is what the terminal or the file reading them expects."""
    for stream in (sys.stdout, sys.stderr):
        if not isinstance(stream, io.TextIOWrapper) or stream.closed:  # a StringIO put in its place: no codec
            continue
        if codecs.lookup(stream.encoding).name != "utf-8":
            stream.reconfigure(errors=ESCAPED)


def require_stdout(what: str, fix: str = "give it a file or a pipe (> FILE)") -> None:
    """Refuse (exit 2), before any work, a command whose result is `what` it prints on stdout, started with stdout
    closed (`>&-`, a launcher's): fill_closed_streams sends stdout to /dev/null so that a training run's progress
    lines go nowhere and it trains, but `qlora.config RECIPE >&-` printed its JSON there and ended 0, nothing said."""
    from qlora.console import CLOSED_AT_START

    if sys.stdout is None or "stdout" in CLOSED_AT_START:
        raise Stop(EXIT_BAD_INPUT, f"stdout is closed, where {what} would be printed: {fix}")


def skip_final_collection() -> None:
    """Leave every object alive now out of the garbage collector's walks as the interpreter shuts down: after a
    training run's last line its shutdown took 1.3-5.2 s (~3) on the loaded 2-core CPU, all of it after the atexit
    handlers, ~75% of it the collector walking the heap of the ~2,100 modules torch and transformers import (the
    walk of a process that only imported them: 1.8-2.4 s) with nothing to find. Everything else runs as before:
    the atexit handlers (logging's flush, tempfile's cleanup, coverage's), the joining of threads, the freeing of
    every object outside a cycle (a file closes as its last reference goes); only a cycle alive at the end is no
    longer collected, which Python never promised to do. os._exit would cut the rest as well, but would skip the flush
    of any file a library left open and the C++ teardown of torch and CUDA."""
    gc.freeze()


def running_command() -> str | None:
    """The `X` of `python [options] -m X ...`, from the interpreter's own command line; None otherwise."""
    args = iter(getattr(sys, "orig_argv", [])[1:])
    for arg in args:
        if arg in ("-X", "-W", "--check-hash-based-pycs"):  # the interpreter's options that take a value
            next(args, None)
        elif arg.startswith("-m"):
            return arg[2:] or next(args, None)
        elif arg.startswith("-c") or not arg.startswith("-"):  # code or a script: no module is run
            return None
    return None


RANKED = "qlora.train"  # the command run as one of several processes (torchrun): run(..., ranked=True)


def said_while_starting(signum: int, ranked: bool) -> str | None:
    """The line of a Ctrl-C or SIGTERM that ends a command as it starts; None on a process of several but rank 0,
    which speaks for them (torchrun passes a Ctrl-C on to every process, and each of them said it)."""
    line = f"stopped by {signal.Signals(signum).name} while starting: nothing was written"
    return line_of_this_rank(128 + signum, line) if ranked else line


def exit_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM during the imports, before `run` took over: nothing is written yet, so the process ends here,
    at once. Raising instead can abort the interpreter: an exception thrown through torch's C++ while it imports
    ends in "terminate called after throwing an instance of 'pybind11::error_already_set'" and SIGABRT."""
    if (line := said_while_starting(signum, running_command() == RANKED)) is not None:
        with contextlib.suppress(OSError):  # after SIGHUP the terminal is gone: EIO; the status says it
            os.write(2, f"{line}\n".encode())
    os._exit(128 + signum)


def _early_excepthook(kind: type[BaseException], err: BaseException, tb: object) -> None:
    """A Ctrl-C or SIGTERM raised during the imports (with --debug, or one a library turned into another error):
    one line, and the signal's exit status."""
    if (signum := interrupting_signal(err)) is not None and "--debug" not in sys.argv:
        if (line := said_while_starting(signum, running_command() == RANKED)) is not None:
            print(line, file=sys.stderr)
            sys.stderr.flush()
        os._exit(128 + signum)
    sys.__excepthook__(kind, err, tb)


def catch_early_signals() -> None:
    """From the first import of a command on, Ctrl-C, SIGTERM and SIGHUP end it with one line (with --debug, by
    raising: the traceback shows where the imports were)."""
    handler = raise_signal_interrupt if "--debug" in sys.argv else exit_while_starting
    for sig in stopping_signals():
        signal.signal(sig, handler)
    sys.excepthook = _early_excepthook
