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


def test_csv_cells_are_the_text_written_and_each_row_is_named_by_the_line_it_starts_on(tmp_path: Path) -> None:
    """pandas read a column of digits as numbers (zip code 00501 trained as `501.0`) and "NA" or "None" as missing;
    a blank line and a quoted field that spans lines moved the line a bad row was named by."""
    text = 'instruction,output\nZip of Holtsville?,00501\nSodium?,NA\nSay none,None\n\n"two\nlines",3.10\nlast,\n'
    for name in ("train.csv", "TRAIN.CSV"):  # an upper-case extension is a CSV file too
        path = tmp_path / name
        path.write_text(text)
        rows = read_rows(str(path))
        assert [r["output"] for r in rows] == ["00501", "NA", "None", "3.10", ""]
        assert rows[3]["instruction"] == "two\nlines"
        assert rows.places == [f"{path}:{n}" for n in (2, 3, 4, 6, 8)]
    # pandas' own to_csv writes its index under an empty name; a cell past the csv module's 128 KiB default
    path = tmp_path / "index.csv"
    path.write_text(',text,output\n0,' + "x" * 200_000 + ',1\n1,NA,00501\n')
    rows = read_rows(str(path))
    assert [(r["Unnamed: 0"], len(r["text"]), r["output"]) for r in rows] == [("0", 200_000, "1"), ("1", 2, "00501")]


def test_only_assistant_turns_are_learned_when_one_opens_the_conversation() -> None:
    """Rendered alone, a first assistant turn brings the template's header with it (SmolLM2's its default system
    prompt too), and all of it was learned; an instruction row's input of 0 was taken for none."""
    from qlora.base.build import ensure_checkpoint
    from qlora.base.load import load_tokenizer
    from qlora.config import load_recipe
    from qlora.data.read import IGNORE, tokenize_row

    tokenizer = load_tokenizer(ensure_checkpoint(load_recipe(ROOT / "recipes" / "tiny.py")))
    turns = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "ok"}]
    row = tokenize_row({"messages": turns}, "messages", tokenizer, "row")
    learned = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE]
    assert tokenizer.decode(learned) == "Hello!<|im_end|>\nok<|im_end|>\n"
    zero = tokenize_row({"instruction": "Add one", "input": 0, "output": "1"}, "instruction", tokenizer, "row")
    assert "### Input:\n0" in tokenizer.decode(zero["input_ids"])
