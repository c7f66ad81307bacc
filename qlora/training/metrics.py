"""metrics.jsonl: one strict-JSON line per logged step and evaluation, cut back on resume to the checkpoint's length."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from qlora.errors import ConfigError


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


def check_kept(path: Path, keep_bytes: int) -> None:
    """Refuse to resume onto a metrics.jsonl cut short since the checkpoint recorded its length: the first line
    appended would join the torn one (measured: a file cut mid-line after a 4-step run, resumed to 6 steps, held
    `...}{"step": 5, ...}` on one line, steps 3 and 4 gone). A file deleted starts afresh, as a new run's."""
    if not keep_bytes or not path.is_file():
        return
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, min(size, keep_bytes) - 1))
        last = f.read(1)
    if size < keep_bytes or last != b"\n":
        raise ConfigError(f"{path} holds {size} bytes, the checkpoint recorded {keep_bytes} ending a line: it was "
                          "cut short or replaced, and the lines appended would join its torn one; restore it, or move "
                          "it away to continue the run with a new metrics.jsonl")


def _is_training_line(line: bytes, step: int) -> bool:
    """Whether `line` is the training line of `step` (not its evaluation, nor a line of another step)."""
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and row.get("step") == step and "loss" in row


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step and eval, non-finite numbers as null. Each checkpoint records the
    file's length when it was saved; resuming from it cuts the file back to that length, dropping what was logged after
    the save (steps about to be run again, a final evaluation, a line cut short by a kill -9)."""

    def __init__(self, path: Path, keep_bytes: int = 0, write: bool = True, unlogged: int | None = None) -> None:
        """`unlogged`: a step whose training line, the last one kept, goes too (the last step of a shorter run)."""
        self.path, self.enabled = path, write  # only rank 0 of several processes writes
        if not write:
            return
        kept = path.read_bytes()[:keep_bytes] if keep_bytes and path.exists() else b""
        start = kept.rstrip(b"\n").rfind(b"\n") + 1
        if unlogged is not None and _is_training_line(kept[start:], unlogged):
            kept = kept[:start]
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_bytes(kept)
        os.replace(tmp, path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")

    def size(self) -> int:
        return self.path.stat().st_size if self.enabled else 0
