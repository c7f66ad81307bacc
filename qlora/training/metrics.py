"""metrics.jsonl: one strict-JSON line per logged step and evaluation, cut back on resume to the checkpoint's length."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qlora.errors import ConfigError
from qlora.partial import name_output, write_aside


def finite_or_null(value: object) -> object:
    """A non-finite float (a diverged loss, an overflowing grad norm) as None: NaN and Infinity are not JSON, and a
    strict reader (jq, JavaScript, Go) refuses the whole line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


def _row(line: bytes) -> dict | None:
    """A whole line of metrics.jsonl as its row; None for a torn or foreign one."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if line.endswith(b"\n") and isinstance(row, dict) and isinstance(row.get("step"), int) else None


def _is_training_line(line: bytes, step: int) -> bool:
    """Whether `line` is the training line of `step` (not its evaluation, nor a line of another step)."""
    row = _row(line)
    return row is not None and row["step"] == step and "loss" in row


def _last_line_start(data: bytes) -> int:
    return data.rstrip(b"\n").rfind(b"\n") + 1


def _rows_before(data: bytes, step: int) -> int | None:
    """The length of `data`'s whole rows before its first row at `step` or later, or None where no such row follows
    them (a torn or foreign line comes first, or none at all)."""
    start = 0
    for line in data.splitlines(keepends=True):
        row = _row(line)
        if row is None:
            return None
        if row["step"] >= step:
            return start
        start += len(line)
    return None


def last_row(path: Path) -> dict | None:
    """The last row of metrics.jsonl; None where the file is gone or empty, or its last line torn or foreign."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return _row(data[_last_line_start(data):]) if data else None


def check_kept(path: Path, keep_bytes: int, ended: int = 0, ended_line: str = "") -> bytes:
    """The rows of metrics.jsonl a resume keeps: its first `keep_bytes`, what the checkpoint recorded. Refuse a file
    cut short since: the first line appended would join the torn one (measured: a file cut mid-line after a 4-step
    run, resumed to 6 steps, held `...}{"step": 5, ...}` on one line, steps 3 and 4 gone). A file deleted starts
    afresh, as a new run's. From a checkpoint at the last step (`ended`) of a shorter run, a resume to more steps drops
    that run's training line there as it writes its first row (MetricsLog): stopped before its own first checkpoint,
    it leaves the rows before that line, then its own. The rows before are kept, and the line is put back from the
    checkpoint (`ended_line`; "" from one written before 2026-12-06), so a resume to the old train.steps ends as the
    run did (measured: without it, a 4-step run extended to 8, killed after its evaluation at step 4 and resumed with
    --train.steps=4, lacked the training line of step 4 its run straight through has)."""
    if not keep_bytes or not path.is_file():
        return b""
    data = path.read_bytes()
    kept = data[:keep_bytes]
    if ended and not _is_training_line(kept[_last_line_start(kept):], ended):
        start = _rows_before(data, ended)
        line = ended_line.encode()  # "" from a checkpoint written before it was recorded
        if start is not None and start < keep_bytes:
            return data[:start] + (line if _is_training_line(line, ended) else b"")
    if len(kept) < keep_bytes or not kept.endswith(b"\n"):
        raise ConfigError(f"{path} holds {len(data)} bytes, the checkpoint recorded {keep_bytes} ending a line: it "
                          "was cut short or replaced, and the lines appended would join its torn one; restore it, or "
                          "move it away to continue the run with a new metrics.jsonl")
    return kept


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step and eval, non-finite numbers as null. Each checkpoint records the
    file's length when it was saved; resuming from it cuts the file back to that length, dropping what was logged after
    the save (steps about to be run again, a final evaluation, a line cut short by a kill -9)."""

    def __init__(self, path: Path, kept: bytes = b"", write: bool = True, unlogged: int | None = None) -> None:
        """`kept`: the rows a resume keeps (check_kept). `unlogged`: a step whose training line, the last one kept,
        goes too (the last step of a shorter run). It goes with the first row written in its place, not before: until
        then checkpoint-`unlogged` counts it."""
        self.path, self.enabled, self.cut = path, write, None  # only rank 0 of several processes writes
        # Rewritten whole in one rename: a kill leaves the old file or the new one, and `.tmp-metrics.jsonl`, which
        # the next start removes (qlora/training/rundir.py's LEFTOVER).
        self.hidden = f".tmp-{path.name}"
        if not write:
            return
        start = _last_line_start(kept)
        if unlogged is not None and _is_training_line(kept[start:], unlogged):
            self.cut = start
        write_aside(path, kept, self.hidden)

    def write(self, record: dict) -> str:
        """Append `record` as a line; the line (written by rank 0 only)."""
        text = json.dumps(finite_or_null(record), allow_nan=False) + "\n"
        if not self.enabled:
            return text
        line = text.encode()
        if self.cut is not None:  # the line to drop and the first row after it: one rename, never the one alone
            write_aside(self.path, self.path.read_bytes()[:self.cut] + line, self.hidden)
            self.cut = None
            return text
        try:
            with open(self.path, "ab") as f:
                f.write(line)
        except OSError as err:
            name_output(err, self.path, self.path)
            raise
        return text

    def size(self) -> int:
        """The length a checkpoint records: without a line still to drop."""
        if not self.enabled:
            return 0
        return self.cut if self.cut is not None else self.path.stat().st_size
