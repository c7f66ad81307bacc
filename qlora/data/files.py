"""Data files: the rows of a local JSONL, JSON, Parquet or CSV file, or of a hub dataset's train split, each with the
place it came from (`file:LINE`) for the messages that name a bad row. Nothing here knows a tokenizer."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

from qlora.base.build import hub_unreachable, looks_like_hub_id
from qlora.data.compressed import refuse_compressed
from qlora.data.jsonl import Places, Rows, not_utf8_line, read_json, read_jsonl
from qlora.errors import ConfigError

LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def read_rows(source: str, key: str = "data.train / data.eval") -> Rows:
    """Rows of a local file, or of a hub dataset's train split when `source` is no local path, refused where it holds
    none; `key` is the setting or flag that named it, for the message when it is not there or empty."""
    rows = _read(source, key)
    if not rows:
        raise ConfigError(f"{source} holds no rows: add data, or check {key}")
    return rows


def _read(source: str, key: str) -> Rows:
    path = Path(source).expanduser()
    suffix = path.suffix.lower()  # train.JSONL too
    if suffix in LOADERS or not looks_like_hub_id(source):
        if not path.is_file():
            problem = ("is a directory, not a file" if path.is_dir() else
                       "is not a regular file" if path.exists() else
                       "is a link that leads nowhere (a loop, or a missing target)" if path.is_symlink() else
                       "not found")
            # A recipe's relative paths are read from where the command runs, not from the recipe's folder.
            where, fix = ("", "") if path.is_absolute() else (
                f" (relative to the directory the command runs in, {Path.cwd()})",
                ", or run the command from the folder the path is relative to (the shipped recipes': the project's)")
            raise ConfigError(f"data file {path} {problem}{where}: check {key}{fix}")
        refuse_compressed(path, key, ", ".join(LOADERS))
        if suffix == ".jsonl":
            return read_jsonl(path)
        if suffix == ".json":
            return read_json(path)
        if suffix not in LOADERS:
            raise ConfigError(f"data file {path}: unknown extension, use one of {', '.join(LOADERS)}")
        import datasets

        logging.getLogger("datasets").setLevel(logging.CRITICAL)  # its own error line would repeat ours
        header, lines = csv_records(path) if suffix == ".csv" else ([], [])
        # A CSV's cells are text as written: pandas would read a column of digits as numbers (zip code 00501 as 501.0)
        # and "NA", "None" or "null" as missing.
        # Converters by column position: pandas names the columns itself (an empty name `Unnamed: 0`, as its own
        # to_csv writes an index; a repeated one `text.1`).
        as_text = dict(converters=dict.fromkeys(range(len(header)), str), keep_default_na=False,
                       na_filter=False) if header else {}
        try:
            rows = columnar_rows(datasets.load_dataset(LOADERS[suffix], data_files=str(path), split="train",
                                                       **as_text))
        except Exception as err:  # datasets wraps the parser's error ("An error occurred while generating ...")
            if holds_no_rows(path, suffix, header, lines):
                return Rows([], [])  # read_rows names it, as it names an empty JSONL file
            cause = err
            while cause.__cause__ or cause.__context__:
                cause = cause.__cause__ or cause.__context__
            text = (str(cause).strip() or "no details").splitlines()[0]
            raise ConfigError(f"data file {path} could not be read ({type(cause).__name__}: {text}): fix the file, "
                              "or convert it to JSONL") from err
        if suffix == ".csv":  # a row per line after the header where pandas read the file otherwise
            lines = lines if len(lines) == len(rows) else range(2, len(rows) + 2)
            return Rows(rows, Places(f"{path}:", lines))
        return Rows(rows, Places(f"{path}: row ", range(1, len(rows) + 1)))
    import datasets

    offline = hub_unreachable()  # with no network: fail at once, not after ~25 s of retries
    try:
        rows = columnar_rows(datasets.load_dataset(source, split="train"))
        return Rows(rows, Places(f"{source}: row ", range(1, len(rows) + 1)))
    except Exception as err:
        why = f"{offline}, and it is not in the datasets cache" if offline else str(err).splitlines()[0]
        raise ConfigError(f"data source {source!r} is neither a local file nor a reachable hub dataset ({why}): "
                          "give a local file, or download the dataset first") from err


def rows_sha256(rows: list[dict]) -> str:
    """A fingerprint of the rows as read, for a resume to tell the run's rows from others where a data file moved
    (a count alone takes any file of the same length): of the rows, not the file's bytes, so the same rows written
    with other spacing or key order are the same. One json.dumps per row, a small share of tokenising it."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=repr).encode() + b"\n")
    return digest.hexdigest()


def csv_records(path: Path) -> tuple[list[str], list[int]]:
    """A CSV file's column names, and the line an editor shows for each row: where its record begins, counting the
    header, blank lines (which pandas skips) and quoted fields that span lines.

    Refuses a row of more or fewer fields than the header, and a column named twice, which pandas reads without a
    word: one row with an unquoted comma made it take the first column for an index and shift every row's cells one
    column left (outputs trained as instructions), a short row's missing cells became empty text, and a second
    `output` column became `output.1`, never read."""
    header, starts, end = [], [], 0
    limit = csv.field_size_limit(2**31 - 1)  # a cell of any length, as pandas reads it (the default is 128 KiB)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)  # an unclosed quote is csv.Error, not a short row
            for record in reader:
                if record and not header:
                    header = record
                    twice = next((name for n, name in enumerate(header) if name and name in header[:n]), None)
                    if twice is not None:
                        raise ConfigError(f"{path}:{reader.line_num}: column {twice!r} appears twice in the header, "
                                          "and only the first would be read: rename or drop one")
                elif record:  # [] for a blank line
                    if len(record) != len(header):
                        fix = ("quote the field that holds a comma (\"a, b\")" if len(record) > len(header) else
                               "add the missing cells (an empty one is written as nothing between two commas)")
                        raise ConfigError(f"{path}:{end + 1}: {len(record)} field(s) where the header has "
                                          f"{len(header)} ({', '.join(header)}): {fix}")
                    starts.append(end + 1)
                end = reader.line_num
    except UnicodeDecodeError as err:  # pandas named no line, nor the encoding
        raise not_utf8_line(path, err) from None
    except csv.Error:  # pandas names what is wrong with the file
        return [], []
    finally:
        csv.field_size_limit(limit)
    return header, starts


def holds_no_rows(path: Path, suffix: str, header: list[str], lines: list[int]) -> bool:
    """Whether a file `datasets` could not read holds no rows, which it refuses in its own words ('Instruction "train"
    corresponds to no data!' for a CSV of its header alone, 'No columns to parse from file' for an empty CSV,
    'BatchSize must be greater than 0' for a Parquet file of none). `header` and `lines`: a CSV's, from
    csv_records."""
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows == 0
        text = path.read_text(encoding="utf-8-sig")
        if not text.strip():
            return True
        return bool(header) and not lines
    except Exception:  # noqa: BLE001  unreadable or damaged: not a file of no rows, and datasets' error stands
        return False


def columnar_rows(table: object) -> list[dict]:
    """A `datasets` table's rows as the file wrote them. Arrow gives every row every column, a field the row lacks as
    None (a JSON array of chat rows and text rows: `messages: None` in each text row), so None is taken for absent,
    as a CSV's empty cell is (its input field, say). So in a chat row's messages: one message with a `name` gave
    every other message `name: None`, which a chat template that prints a name where it is given rendered as "None"."""
    return [_present(row) for row in table.to_list()]


def _present(value: object) -> object:
    """`value` with the None fields of its objects dropped, at any depth."""
    if isinstance(value, dict):
        return {k: _present(v) for k, v in value.items() if v is not None}
    return [_present(v) for v in value] if isinstance(value, list) else value
