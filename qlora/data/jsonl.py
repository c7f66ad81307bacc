"""JSON and JSONL data files read with Python's json, each row with its place (`file:LINE`, `file: row N`), and the
Rows every reader of qlora/data/files.py returns."""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from qlora.errors import ConfigError, json_trouble


class Places(Sequence):
    """Where each of a source's rows stands, written when asked: `prefix` and the row's number (`file:` and its line,
    `file: row ` and its index). A number a row in an array, not a string of ~100 bytes: 200,000 rows held 20 MiB of
    such strings for the few messages that name one."""

    def __init__(self, prefix: str, numbers: Sequence[int]) -> None:
        self.prefix = prefix
        self.numbers = numbers  # a range, or an array('q')

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, index: int | slice) -> str | Places:
        if isinstance(index, slice):
            return Places(self.prefix, self.numbers[index])
        return f"{self.prefix}{self.numbers[index]}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)


class Rows(list):
    """A source's rows, each with where it stands (`places`), for the messages that name a row: `file:LINE` in a
    JSONL file (blank lines count) or a CSV file (its header is line 1), `file: row N` in the other kinds."""

    def __init__(self, rows: list[dict], places: Sequence[str]) -> None:
        super().__init__(rows)
        self.places = places


def read_jsonl(path: Path) -> Rows:
    """A JSONL file's rows, read a line at a time: read whole and split, a file of 380 MiB took 964 MiB more at the
    peak than before it (the file, its lines, then the rows), now 569 MiB, the rows alone."""
    rows, numbers = [], array("q")
    try:
        with path.open("rb") as f:
            for number, raw in _lines(f):
                row = _jsonl_row(path, number, raw, not rows)
                if row is not None:
                    rows.append(row)
                    numbers.append(number)
    except OSError as err:
        raise unreadable(path, err) from err
    return Rows(rows, Places(f"{path}:", numbers))


def _lines(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(number, line) of a file open in binary, numbered as bytes.splitlines numbers them, as an editor does: a lone
    \r ends a line too, where iterating the file ends one at \n alone."""
    number = 0
    for chunk in f:
        for raw in chunk.splitlines() if b"\r" in chunk else (chunk.rstrip(b"\n"),):
            number += 1
            yield number, raw


def _jsonl_row(path: Path, number: int, raw: bytes, first: bool) -> dict | None:
    """Line `number` of a JSONL file as a row, or None for a blank line; `first`: no row came before it."""
    try:
        # A byte order mark some editors write; at the start of any line, since files joined with `cat` carry
        # each one's mark where it begins.
        line = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _not_utf8(f"{path}:{number}", err) from None
    if not line.strip():
        return None
    try:
        row = _parse(line, f"{path}:{number}", "fix or delete that line")
    except json.JSONDecodeError as err:
        # json.dump(rows, f, indent=2) into a file named .jsonl, or an array written a row per line by hand
        if line.strip() in ("[", "{") or first and line.lstrip().startswith("["):
            raise ConfigError(f"{path}:{number}: a JSON document written over several lines, not one JSON object "
                              "per line (JSONL): name the file .json, or write one row per line") from None
        raise ConfigError(f"{path}:{number}: malformed JSON ({err.msg}): fix or delete that line") from None
    if not isinstance(row, dict):
        hint = ": a JSON array of rows belongs in a .json file" if isinstance(row, list) else ""
        raise ConfigError(f"{path}:{number}: expected a JSON object per line, got {_json_kind(row)}{hint}")
    return row


def read_json(path: Path) -> Rows:
    """A .json file: an array of row objects, one object (one row: detect_format names rows wrapped in it), or JSON
    Lines under a .json name. Read with Python's json, as JSONL is, not with `datasets`, whose reader ended the
    process in a segmentation fault on a file of `null`, took an array of strings or numbers for rows of a column it
    named `text`, and named a byte position at best where a file broke JSON."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise unreadable(path, err) from err
    except UnicodeDecodeError as err:
        raise not_utf8_line(path, err) from None
    if not text.strip():
        return Rows([], [])  # read_rows names it
    try:
        value = _parse(text, str(path), "fix the file")
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # a value per line (JSON Lines), which `datasets` read in a .json file too
            return read_jsonl(path)
        raise ConfigError(f"{path}:{err.lineno}: malformed JSON ({err.msg}): fix the file, or convert it to "
                          "JSONL") from None
    rows = ([value] if value else []) if isinstance(value, dict) else value
    if not isinstance(rows, list):
        raise ConfigError(f"{path} holds one JSON {_json_kind(value)}, not rows: write them as a top-level array of "
                          "objects, or one object per line (.jsonl)")
    bad = next((n for n, row in enumerate(rows, 1) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ConfigError(f"{path}: row {bad}: expected a JSON object per row, got {_json_kind(rows[bad - 1])}: fix "
                          "or delete that row")
    return Rows(rows, Places(f"{path}: row ", range(1, len(rows) + 1)))


def _parse(text: str, where: str, fix: str) -> object:
    """`text` as JSON, each object's keys unique (_unique_keys), for the JSON and JSONL readers alike: a key written
    twice, an integer of over 4,300 digits or objects nested too deep refused naming `where` (the file, or its line)
    and `fix`. Malformed JSON (JSONDecodeError) is the caller's to say: what it means depends on the file's kind."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except DuplicateKey as err:
        raise ConfigError(f"{where}: key {err.key!r} appears twice in one object, and JSON would keep only the last: "
                          "keep one of them") from None
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"{where}: unreadable JSON ({json_trouble(err)}): {fix}") from None


def _not_utf8(where: str, err: UnicodeDecodeError) -> ConfigError:
    """A data file (or its line, `where`) that is not UTF-8."""
    return ConfigError(f"{where}: not UTF-8 ({err.reason} at byte {err.start}): re-encode the file as UTF-8")


def not_utf8_line(path: Path, err: UnicodeDecodeError) -> ConfigError:
    """A data file read whole that is not UTF-8 (`err`, at a byte of the whole file), named by the line that is not,
    as a JSONL file's: no UTF-8 sequence holds a line break's byte, so that line fails alone."""
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            raw.decode("utf-8-sig")
        except UnicodeDecodeError as line_err:
            return _not_utf8(f"{path}:{number}", line_err)
    return _not_utf8(str(path), err)


def unreadable(path: Path, err: OSError) -> ConfigError:
    """A data file the OS would not let us read (its permissions), for the JSON and JSONL readers alike."""
    return ConfigError(f"data file {path} is unreadable ({err.strerror}): check its permissions")


def _json_kind(value: object) -> str:
    """What JSON calls `value`'s type, as the file wrote it."""
    kinds = {str: "string", bool: "boolean", type(None): "null", list: "array", dict: "object"}
    return kinds.get(type(value), "number")


class DuplicateKey(ValueError):
    """A key written twice in one JSON object."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object as a dict, refusing a key written twice: json.loads keeps the last silently, and a second
    `messages` (a generator's bug) would replace the conversation without a word."""
    row = dict(pairs)
    if len(row) < len(pairs):
        seen = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return row
