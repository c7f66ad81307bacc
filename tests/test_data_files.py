"""The data file types training.md names besides JSONL (a JSON array, Parquet, CSV) give the rows the JSONL file
gives, through `datasets` (the version range pyproject.toml admits: 4.8 is Unsloth's stack's, 5.2 ours)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qlora.data.read import read_rows
from qlora.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "recipes" / "data" / "tiny" / "train.jsonl"


def instruction_rows() -> list[dict]:
    """The tiny task as instruction rows (CSV holds flat fields only), with a comma, a quote and a line break."""
    rows = [{"instruction": r["messages"][0]["content"], "output": r["messages"][1]["content"]}
            for r in read_rows(str(CHAT))[:20]]
    rows[0]["instruction"] = 'reverse, "quoted":\nred blue'
    return rows


def test_a_json_array_and_parquet_give_the_chat_rows_of_the_jsonl_file(tmp_path: Path) -> None:
    rows = read_rows(str(CHAT))
    array = tmp_path / "train.json"
    array.write_text(json.dumps(rows))
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    assert read_rows(str(array)) == rows
    assert read_rows(str(parquet)) == rows


def test_csv_gives_the_instruction_rows_it_was_written_from(tmp_path: Path) -> None:
    rows = instruction_rows()
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "output"])
        writer.writeheader()
        writer.writerows(rows)
    assert read_rows(str(path)) == rows


def test_a_damaged_parquet_file_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError, match=r"data file .*train.parquet could not be read \(.*\): fix the file"):
        read_rows(str(path))


def test_a_bad_row_is_named_by_its_line_in_the_file(tmp_path: Path) -> None:
    """Blank lines count in a JSONL file, and a CSV file's header is its line 1: the line a user's editor shows."""
    from qlora.base.build import ensure_checkpoint
    from qlora.base.load import load_tokenizer
    from qlora.config import load_recipe
    from qlora.data.read import tokenize_rows

    tokenizer = load_tokenizer(ensure_checkpoint(load_recipe(ROOT / "recipes" / "tiny.py")))
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('\n\n{"text": "a"}\n\n{"text": null}\n')
    with pytest.raises(ConfigError, match=r"train.jsonl:5: field text must be text, got null"):
        tokenize_rows(read_rows(str(jsonl)), "text", tokenizer, str(jsonl), 64)
    table = tmp_path / "train.csv"
    table.write_text("instruction,output,input\na,b,\nc,d,\n")
    rows = read_rows(str(table))
    rows[1]["output"] = None  # what a CSV cell cannot say: the row of line 3 made bad after reading
    with pytest.raises(ConfigError, match=r"train.csv:3: field output must be text, got null"):
        tokenize_rows(rows, "instruction", tokenizer, str(table), 64)


@pytest.mark.parametrize("first", ["chat", "text"])
def test_a_json_array_mixing_formats_names_the_row_that_lacks_the_first_rows_field(tmp_path: Path, first: str) -> None:
    """Arrow gives every row of a JSON array every column, a missing one as None: read as absent, so the format is
    the first row's and the other row is named for the field it lacks (not `messages must be a list, got NoneType`,
    nor a text row taken for a chat row)."""
    from qlora.data.read import detect_format

    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    rows = [chat, {"text": "plain"}] if first == "chat" else [{"text": "plain"}, chat]
    array = tmp_path / "train.json"
    array.write_text(json.dumps(rows))
    got = read_rows(str(array))
    assert got == rows
    assert detect_format(got, str(array)) == ("messages" if first == "chat" else "text")
