"""What a command shows while it works, besides its results: a line for each long phase saying what and how many,
a progress bar under it on a terminal, and the libraries' own chatter kept out of the way.

Phase lines go to stdout with the command's other lines (so that stderr holds only an error's one line), except where
stdout is what the command makes (qlora.generate's text): there they go to stderr with a failure's line. Bars go to
stderr and only where they can be drawn (`draws_bars`: a sized terminal, not TERM=dumb), so a log file gets lines, not
bar frames.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
CLOSED_AT_START: set[str] = set()
"""The streams fill_closed_streams found closed ("stdout", "stderr"): what is printed there goes nowhere."""


def fill_closed_streams() -> None:
    """A command started with stdout or stderr closed (`>&-`, a launcher that closes them) writes those lines to
    /dev/null. Python leaves such a stream None, and the first phase line (`tqdm.write`, then `flush`) failed on it:
    the run ended with exit 1 before loading. A descriptor still free is held with /dev/null too, or the first file
    the run opens (metrics.jsonl, a checkpoint's) would take it and receive what a C library prints."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None:
            continue
        CLOSED_AT_START.add(name)  # a command whose result is its stdout refuses to start (qlora.cli.require_stdout)
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115  for the life of the process


def quiet_libraries() -> None:
    """Library output we know and accept, said once in our words or not at all. Called as every `python -m qlora.*`
    command starts (qlora/__init__.py), and again by each command for runs started in-process; idempotent.

    - transformers' "Loading weights" and datasets' bars: only on a terminal that draws them (`draws_bars`). The
      environment switches work when set before transformers is imported; transformers' own switch covers a process
      that imported it already.
    - bars of libraries that leave `disable` to tqdm's default (transformers' "Converting and de-quantizing GGUF
      tensors" as the demo builds SmolLM2): TQDM_DISABLE, off such a terminal only. tqdm reads it as a default, so the
      bars that pass `disable` themselves (ours: `progress`, the training bar) still decide for themselves.
    - bitsandbytes' "Paged optimizers are not supported on CPU" (a two-line UserWarning at the first optimizer step,
      in the middle of the progress bar): the trainer's summary says instead that nothing pages on CPU.
    - torch's "Detected pickle protocol 4 in the checkpoint", before the line that refuses that pickle.
    """
    if not draws_bars(sys.stderr):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
        if "transformers" in sys.modules:
            from transformers.utils import logging

            logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    # torch's weights-only reader on a pytorch_model.bin that pickle.dump wrote (model.allow_pickle=true): a two-line
    # UserWarning before the line that refuses the file (qlora/base/load.py, load_error).
    warnings.filterwarnings("ignore", message="Detected pickle protocol")
    # A step skipped for a non-finite loss steps the schedule on purpose (the data and the schedule move on); if it is
    # the first, torch warns that the scheduler stepped before its optimizer.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step")


def draws_bars(stream: object, figures: str = "") -> bool:
    """Whether a progress bar can be drawn on `stream`: a terminal, sized (a pty no one sized, `script -c CMD` or some
    CI runners, reports 0 rows and columns, and tqdm hides every bar there), that moves the cursor (TERM=dumb does not:
    a bar under another, the evaluation's under the training's, printed its escape codes as text), and wider than the
    bar's `figures` (tqdm cuts its line at the edge: on 20 columns a count of 10/300 read 10/30). Elsewhere lines take
    over."""
    size = _terminal_size(stream)
    return size is not None and size.columns > len(figures) and size.lines > 0 and os.environ.get("TERM") != "dumb"


def terminal_columns(stream: object) -> int:
    """The width of the terminal `stream` is, now (a window can be resized during a run); 0 if it is none."""
    size = _terminal_size(stream)
    return size.columns if size is not None else 0


def _terminal_size(stream: object) -> os.terminal_size | None:
    try:
        return os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # not a terminal, or no descriptor (a StringIO)
        return None


def widest_meter(total: int, what: str, unit: str = "it") -> str:
    """tqdm's own figures for a bar of `total` at their widest (the last item, hours in), with no room for the bar."""
    from tqdm import tqdm

    return tqdm.format_meter(total - 1, total, 99 * 3600, prefix=what, unit=unit, bar_format="{l_bar}{r_bar}")


def announce(what: str) -> float:
    """Say now what a long phase does and how many (`loading ... (272 tensors)`); return when it started.

    Written through tqdm so that a progress bar already on the terminal (the training loop's) is redrawn below it.
    """
    from tqdm import tqdm

    tqdm.write(f"{what} ...", file=sys.stdout)
    sys.stdout.flush()
    return time.perf_counter()


def since(started: float) -> str:
    """The time since `started` (from `announce`), for the line that ends the phase."""
    seconds = time.perf_counter() - started
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def progress(items: Iterable[T], total: int, what: str, unit: str, show: bool = True) -> Iterator[T]:
    """`items` with a progress bar on a terminal that draws it (stderr), gone when done; nothing otherwise, or without
    `show` (a process of several other than rank 0)."""
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=what, unit=unit, leave=False,
                    disable=not (show and draws_bars(sys.stderr, widest_meter(total, what, unit))), dynamic_ncols=True)
