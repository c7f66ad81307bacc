"""The data file types training.md names besides JSONL (a JSON array, Parquet, CSV) give the rows the JSONL file
gives, through `datasets` (the version range pyproject.toml admits: 4.8 is Unsloth's stack's, 5.2 ours)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qlora.data.files import read_rows
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
    rows[0]["messages"][0]["name"] = "ada"  # Arrow gives every other message `name: None`: absent, not "None"
    rows[0]["messages"][1]["weight"] = 0  # a value, not absent as None is: a turn not trained (axolotl's weight)
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


@pytest.mark.parametrize("content", ["", "\n \n"], ids=["empty", "blank lines"])
def test_a_file_of_no_rows_is_refused_as_it_is_read(tmp_path: Path, content: str) -> None:
    """Each reader refused an empty file itself, or none did: read_splits and detect_format named the key, tokenising
    ('data.train / data.eval' for qlora.eval --data of a run whose data.format is set, once its model had loaded) and
    the export's held-out check nothing."""
    (tmp_path / "held.jsonl").write_text(content)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'held.jsonl'} holds no rows: add data, or check --data$"):
        read_rows(str(tmp_path / "held.jsonl"), "--data")


@pytest.mark.parametrize(("name", "content"), [("held.json", "[]\n"), ("held.json", " \n"), ("held.csv", "a,b\n"),
                                             ("held.csv", ""), ("held.parquet", None)],
                         ids=["empty JSON array", "blank JSON file", "CSV header alone", "empty CSV", "parquet"])
def test_a_file_of_no_rows_that_datasets_reads_is_refused_in_the_same_words(tmp_path: Path, name: str,
                                                                              content: str | None) -> None:
    """datasets refuses these itself, in words that name no empty file: 'could not be read (ValueError: Instruction
    "train" corresponds to no data!)' for an empty array and a header alone, 'EmptyDataError: No columns to parse
    from file' for an empty CSV, 'ArrowInvalid: BatchSize must be greater than 0' for a Parquet file of no rows."""
    path = tmp_path / name
    if content is None:
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=rf"^{path} holds no rows: add data, or check --data$"):
        read_rows(str(path), "--data")


def test_a_damaged_parquet_or_csv_file_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError, match=r"data file .*train.parquet could not be read \(.*\): fix the file"):
        read_rows(str(path))
    # A CSV file with rows is not taken for its header alone ('holds no rows') where pandas cannot read one of them.
    path = tmp_path / "train.csv"
    path.write_text('instruction,output\na,b\n"c\n')
    with pytest.raises(ConfigError, match=r"train.csv could not be read \(ParserError: .*EOF inside string"):
        read_rows(str(path))


@pytest.mark.parametrize(("content", "message"), [
    ("instruction,output\nreverse: a, b,b a\nreverse: c d,d c\n",
     r":2: 3 field\(s\) where the header has 2 \(instruction, output\): quote the field that holds a comma "
     r"\(\"a, b\"\)"),
    ("instruction,output\nreverse: a b,b a\n\nreverse: c d\n",
     r":4: 1 field\(s\) where the header has 2 \(instruction, output\): add the missing cells \(an empty one is "
     r"written as nothing between two commas\)"),
    # named by the line it begins on, where an editor shows the row, not the line its quoted line break ends on
    ('instruction,output\n"reverse:\nred blue",blue, red\n', r":2: 3 field\(s\) where the header has 2 .*"),
    ("instruction,output,output\nreverse: a b,b a,x\n", r":1: column 'output' appears twice in the header, and only "
                                                         r"the first would be read: rename or drop one"),
    # Excel's export in cp1252, once "could not be read (ArrowInvalid: Invalid UTF8 sequence at string index 1)"
    ("instruction,output\nreverse: a b,b a\nreverse: caf\xe9 d,d caf\xe9\n",
     r":3: not UTF-8 \(invalid continuation byte at byte 12\): re-encode the file as UTF-8"),
], ids=["unquoted comma", "missing cell", "comma in a row of two lines", "column twice", "not UTF-8"])
def test_a_csv_row_pandas_would_misread_is_named_by_its_line(tmp_path: Path, content: str, message: str) -> None:
    """pandas read these without a word: one row with an unquoted comma made the first column an index and shifted
    every row's cells one column left (each output trained as its instruction), a short row's missing output became
    empty text (the row trained to answer nothing), and a second `output` column became `output.1`. A file not in
    UTF-8 was named by no line."""
    path = tmp_path / "train.csv"
    path.write_bytes(content.encode("cp1252"))
    with pytest.raises(ConfigError, match=rf"^{path}{message}$"):
        read_rows(str(path))


def test_a_bad_row_is_named_by_its_line_in_the_file(tmp_path: Path) -> None:
    """Blank lines count in a JSONL file, and a CSV file's header is its line 1: the line a user's editor shows."""
    from qlora.base.build import ensure_checkpoint
    from qlora.base.load import load_tokenizer
    from qlora.config import load_recipe
    from qlora.data.labels import tokenize_rows

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
    """Arrow gives every row of a Parquet file (and of a JSON array, as `datasets` read it) every column, a missing
    one as None: read as absent, so the format is the first row's and the other row is named for the field it lacks
    (not `messages must be a list, got NoneType`, nor a text row taken for a chat row)."""
    from qlora.data.labels import detect_format

    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    rows = [chat, {"text": "plain"}] if first == "chat" else [{"text": "plain"}, chat]
    array = tmp_path / "train.json"
    array.write_text(json.dumps(rows))
    parquet = tmp_path / "train.parquet"  # a column per field, None where a row lacks it: kept, a text row was chat
    pq.write_table(pa.Table.from_pydict({k: [row.get(k) for row in rows] for k in ("messages", "text")}), parquet)
    for path in (array, parquet):
        got = read_rows(str(path))
        assert got == rows
        assert detect_format(got, str(path)) == ("messages" if first == "chat" else "text")


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
    path.write_text(",,text,output\n0,a,hi,1\n")  # a two-level index's two empty names: no column named twice
    assert read_rows(str(path)) == [{"Unnamed: 0": "0", "Unnamed: 1": "a", "text": "hi", "output": "1"}]


def test_only_assistant_turns_are_learned_when_one_opens_the_conversation() -> None:
    """Rendered alone, a first assistant turn brings the template's header with it (SmolLM2's its default system
    prompt too), and all of it was learned; an instruction row's input of 0 was taken for none."""
    from qlora.base.build import ensure_checkpoint
    from qlora.base.load import load_tokenizer
    from qlora.config import load_recipe
    from qlora.data.labels import IGNORE, tokenize_row

    tokenizer = load_tokenizer(ensure_checkpoint(load_recipe(ROOT / "recipes" / "tiny.py")))
    turns = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "ok"}]
    row = tokenize_row({"messages": turns}, "messages", tokenizer, "row")
    learned = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE]
    assert tokenizer.decode(learned) == "Hello!<|im_end|>\nok<|im_end|>\n"
    zero = tokenize_row({"instruction": "Add one", "input": 0, "output": "1"}, "instruction", tokenizer, "row")
    assert "### Input:\n0" in tokenizer.decode(zero["input_ids"])


def test_messy_jsonl_reads_where_it_is_good_and_names_line_and_key_where_it_is_not(tmp_path: Path) -> None:
    """Files joined with `cat` carry a byte order mark at the start of a later line (refused as malformed, with the
    advice to delete a good row); a key written twice kept the last silently (a second `messages` replaced the
    conversation); a JSON document in a .jsonl file was "malformed JSON (Expecting value)"; a link looping onto itself
    was "not found"."""
    row = '{"text": "a"}'
    joined = tmp_path / "joined.jsonl"
    joined.write_bytes(f"\ufeff{row}\r\n{row}\r\n\ufeff{row}\r\n".encode())
    assert read_rows(str(joined)) == [{"text": "a"}] * 3
    assert read_rows(str(joined)).places[2] == f"{joined}:3"
    twice = tmp_path / "twice.jsonl"
    twice.write_text(row + '\n{"messages": [{"role": "user", "content": "q", "role": "assistant"}]}\n')
    with pytest.raises(ConfigError, match=r"twice.jsonl:2: key 'role' appears twice in one object.*: keep one"):
        read_rows(str(twice))
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text(json.dumps([{"text": "a"}], indent=2))
    with pytest.raises(ConfigError, match=r"pretty.jsonl:1: a JSON document written over several lines.*\.json"):
        read_rows(str(pretty))
    pretty.write_text('[{"text": "a"},\n {"text": "b"}]\n')  # a row per line, in an array: "Expecting value"
    with pytest.raises(ConfigError, match=r"pretty.jsonl:1: a JSON document written over several lines.*\.json"):
        read_rows(str(pretty))
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    with pytest.raises(ConfigError, match=r"loop.jsonl is a link that leads nowhere"):
        read_rows(str(loop))


def test_nan_and_infinity_are_refused_not_trained_as_text(tmp_path: Path) -> None:
    """json.dumps writes a pandas gap as NaN, and Parquet keeps it as a float: both trained as the text "nan"."""
    from qlora.base.build import byte_tokenizer
    from qlora.data.labels import tokenize_rows

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": NaN}\n')
    with pytest.raises(ConfigError, match=r"train.jsonl:2: field output must be text, got NaN"):
        tokenize_rows(read_rows(str(jsonl)), "instruction", byte_tokenizer(), str(jsonl), 64)
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": 1.5}, {"text": float("-inf")}]), parquet)
    with pytest.raises(ConfigError, match=r"train.parquet: row 2: field text must be text, got -Infinity"):
        tokenize_rows(read_rows(str(parquet)), "text", byte_tokenizer(), str(parquet), 64)


def test_a_turn_that_cannot_train_is_named_by_its_place_in_a_short_line() -> None:
    """The message was the turn's repr: a tool result of 100,000 characters gave a line as long as its cut."""
    from qlora.base.build import byte_tokenizer
    from qlora.data.labels import tokenize_rows

    turns = [{"role": "user", "content": "q"}, {"role": "tool", "content": "x" * 100_000}]
    with pytest.raises(ConfigError, match=r"^rows: row 1: each message .*; message 2 has role 'tool' \(.*\): fix or "
                                          r"drop that turn$") as err:
        tokenize_rows([{"messages": turns}], "messages", byte_tokenizer(), "rows", 64)
    assert len(str(err.value)) < 250
    # The note each role fits: human, User and null were told that tool calls and tool results are not trained here.
    sharegpt, lower = "ShareGPT's human and gpt are user and assistant", "roles are lower case"
    tool = "tool calls and tool results are not trained here"
    notes = {"human": sharegpt, "gpt": sharegpt, "Human": sharegpt, "GPT": sharegpt, "User": lower, "ASSISTANT": lower,
             "function": tool, "ipython": tool}
    for role, said in [*((role, rf"'{role}' \({note}\)") for role, note in notes.items()), (None, "null")]:
        with pytest.raises(ConfigError, match=rf"; message 2 has role {said}: fix or drop that turn$"):
            tokenize_rows([{"messages": [turns[0], {"role": role, "content": "a"}]}], "messages", byte_tokenizer(),
                          "rows", 64)
    parts = {"role": "user", "content": [{"type": "text", "text": "a"}]}  # was told only 'has content list'
    with pytest.raises(ConfigError, match=r"message 1 \(user\) has content list of parts \(OpenAI's multimodal form\): "
                                          r"join their text into one string: fix or drop that turn$"):
        tokenize_rows([{"messages": [parts, turns[0]]}], "messages", byte_tokenizer(), "rows", 64)
    with pytest.raises(ConfigError, match=r"message 1 \(user\) has content dict: fix or drop that turn$"):  # no parts
        tokenize_rows([{"messages": [{**parts, "content": {"text": "a"}}, turns[0]]}], "messages", byte_tokenizer(),
                      "rows", 64)
    call = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}
    with pytest.raises(ConfigError, match=r"message 2 \(assistant\) has content null beside tool_calls"):
        tokenize_rows([{"messages": [turns[0], call]}], "messages", byte_tokenizer(), "rows", 64)


# Llama 3's template, on the tiny tokenizer: the beginning-of-text token (here `<|im_start|>`) only before the first
# turn, so an empty conversation's header is not where a first turn starts; each content trimmed.
LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
          "\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + "
          "content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>"
          "assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.mark.parametrize(("content", "learned"), [("start", "start<|eot_id|>"), (" padded\n", "padded<|eot_id|>")])
def test_an_opening_assistant_turn_learns_its_text_only_under_a_llama3_template(content: str, learned: str) -> None:
    """Its start was searched for in the rendered text: content that also occurs in the header ("start" in
    <|im_start|>) learned the header from there on, and content the template trims was refused."""
    from qlora.base.build import byte_tokenizer
    from qlora.data.labels import IGNORE, tokenize_row

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = LLAMA3
    turns = [{"role": "assistant", "content": content}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "ok"}]
    row = tokenize_row({"messages": turns}, "messages", tokenizer, "row")
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(turns, tokenize=False)
    kept = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE]
    assert tokenizer.decode(kept) == learned + "ok<|eot_id|>"


def test_a_malformed_json_file_is_named_by_the_line_that_breaks_it(tmp_path: Path) -> None:
    """`datasets` names a byte position at best ("Expected object or value at position 14"), in a JSON array and in
    JSON Lines written to a .json file alike."""
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "a"}] * 3, indent=1).replace('"a"', "a", 1))
    with pytest.raises(ConfigError, match=r"array.json:3: malformed JSON \(Expecting value\): fix the file"):
        read_rows(str(array))
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n' * 5 + '{"text": oops}\n')
    with pytest.raises(ConfigError, match=r"lines.json:6: malformed JSON"):
        read_rows(str(lines))
    mixed = tmp_path / "mixed.json"  # JSON, but `datasets` named "row 0" for the second row, a string
    mixed.write_text('[{"text": "a"}, "b", {"text": "c"}]')
    with pytest.raises(ConfigError, match=r"mixed.json: row 2: expected a JSON object per row, got string: fix or "
                                          r"delete that row$"):
        read_rows(str(mixed))
    latin = tmp_path / "latin.json"  # named by no line: "not UTF-8 (invalid continuation byte at byte 29)"
    latin.write_bytes('[{"text": "a"},\n{"text": "café"}]'.encode("cp1252"))
    with pytest.raises(ConfigError, match=r"latin.json:2: not UTF-8 \(invalid continuation byte at byte 13\): "
                                          r"re-encode the file as UTF-8$"):
        read_rows(str(latin))



@pytest.mark.parametrize("content,line", [
    # datasets: "DataFrame constructor not properly called!"; of `null`, a segmentation fault (exit 139, no line)
    ('"just text"', " holds one JSON string, not rows: write them as a top-level array of objects, or one object per "
                    "line (.jsonl)"),
    ("42", " holds one JSON number, not rows"), ("null", " holds one JSON null, not rows"),
    ("null\n" + '{"text": "a"}\n', ":1: expected a JSON object per line, got null"),  # JSON Lines: a segfault too
    # datasets took these for rows of a column it named `text`, and trained on "a" and "1"
    ('["a", "b"]', ": row 1: expected a JSON object per row, got string: fix or delete that row"),
    ('[{"text": "a"}, 1]', ": row 2: expected a JSON object per row, got number"),
    ("[[1]]", ": row 1: expected a JSON object per row, got array"),
    ('[{"text": "a"}, null]', ": row 2: expected a JSON object per row, got null"),
    # datasets kept the last of the two
    ('[{"text": "a", "text": "b"}]', ": key 'text' appears twice in one object, and JSON would keep only the last"),
    ('[{"n": 1' + "0" * 5000 + "}]", ": unreadable JSON ("), ("[" * 100_000 + "]" * 100_000, ": unreadable JSON ("),
    ("{}", " holds no rows: add data, or check data.train / data.eval")])
def test_a_json_file_that_holds_no_rows_of_objects_is_named_in_one_line(tmp_path: Path, content: str,
                                                                          line: str) -> None:
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        read_rows(str(path))
    assert str(err.value).startswith(f"{path}{line}"), str(err.value)


def test_held_out_rows_that_are_also_training_rows_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A row written twice lands on both sides of the seeded split, and a held-out file cut from the training one
    shares its rows: the held-out loss then scores memorisation, and nothing said so."""
    from qlora.base.build import byte_tokenizer
    from qlora.config.run import DataConfig
    from qlora.data.splits import load_splits

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"row {n}"}) + "\n" for n in range(20)))
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": "row 3"}) + "\n" + json.dumps({"text": "new"}) + "\n")
    cfg = DataConfig(train=str(train), eval=str(held), max_seq_len=64)
    load_splits(cfg, byte_tokenizer(), 0)
    assert f"{held}: 1 of 2 held-out rows are also training rows" in capsys.readouterr().out
    cfg = DataConfig(train=str(train), max_seq_len=64, eval_fraction=0.2)
    load_splits(cfg, byte_tokenizer(), 0)
    assert "held-out rows are also training rows" not in capsys.readouterr().out
    train.write_text(train.read_text() * 2)  # every row twice: with seed 0 no row has both copies held out
    _, rows = load_splits(cfg, byte_tokenizer(), 0)
    assert f"{train}: {len(rows)} of {len(rows)} held-out rows are also training rows" in capsys.readouterr().out


@pytest.mark.parametrize(("kind", "tool"), [(".gz", "gunzip -c"), (".bz2", "bunzip2 -c"), (".xz", "unxz -c"),
                                           (".zip", "unzip -p")])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_a_compressed_file_under_a_data_files_name_is_refused_with_the_command_that_unpacks_it(
        tmp_path: Path, kind: str, tool: str, suffix: str) -> None:
    """`gzip -c rows.jsonl > train.jsonl`: refused as 'not UTF-8 ...: re-encode the file as UTF-8' (JSONL, JSON,
    CSV), or in pyarrow's words (Parquet); `gunzip` itself refuses the name, so the fix names -c."""
    import bz2
    import gzip
    import lzma
    import zipfile

    rows = b'{"text": "a"}\n'
    path = tmp_path / f"train{suffix}"
    if kind == ".zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("train.jsonl", rows)
    else:
        path.write_bytes({".gz": gzip, ".bz2": bz2, ".xz": lzma}[kind].compress(rows))
    with pytest.raises(ConfigError, match=rf"^data file {path} is \{kind} compressed, though named \{suffix}: unpack "
                                          rf"it \({tool} {path} > NEW\{suffix}\) and point data.train at the file it "
                                          r"holds$"):
        read_rows(str(path), "data.train")


@pytest.mark.parametrize(("n_rows", "fraction", "held"), [(1, 0.05, 1), (2, 0.9, 2)])
def test_a_train_file_too_small_to_hold_rows_out_is_refused_as_it_is_read(tmp_path: Path, n_rows: int,
                                                                        fraction: float, held: int) -> None:
    """One row and no data.eval: the held-out row left none to train on, and the step check before loading said
    "exceed the 0 training rows ...: launch at most 0 process(es), or add rows" to a run of one process."""
    from qlora.config.run import DataConfig
    from qlora.data.splits import read_splits

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"row {n}"}) + "\n" for n in range(n_rows)))
    with pytest.raises(ConfigError, match=rf"^{train}: its {n_rows} row\(s\) are too few to hold out {held} "
                                          rf"\(data.eval_fraction={fraction:g}\) and train on the rest: give a "
                                          r"held-out file as data.eval, or add rows$"):
        read_splits(DataConfig(train=str(train), eval_fraction=fraction))
    assert len(read_splits(DataConfig(train=str(train), eval=str(train)))[1]) == n_rows  # a held-out file: trains


def test_a_missing_data_file_is_named_by_the_setting_or_flag_that_named_it(tmp_path: Path) -> None:
    """Every missing file said 'check data.train / data.eval', `qlora.eval --data FILE` too, where neither is the
    setting to fix."""
    from qlora.base.build import byte_tokenizer
    from qlora.config.run import DataConfig
    from qlora.data.splits import load_splits
    from qlora.eval import evaluate_run

    missing = tmp_path / "held.jsonl"
    with pytest.raises(ConfigError, match=r"held.jsonl not found: check data.eval$"):
        load_splits(DataConfig(train=str(CHAT), eval=str(missing)), byte_tokenizer(), 0)
    with pytest.raises(ConfigError, match=r"held.jsonl not found: check --data$"):
        evaluate_run(tmp_path, data=str(missing))


def test_a_missing_relative_data_file_names_the_directory_it_was_read_from(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe run from another folder (`cd /tmp && python -m qlora.train /repo/recipes/tiny.py`) said only
    'data file recipes/data/tiny/train.jsonl not found', which reads as if the file were missing from the checkout."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        read_rows("recipes/data/tiny/train.jsonl", "data.train")
    assert str(err.value) == ("data file recipes/data/tiny/train.jsonl not found (relative to the directory the "
                              f"command runs in, {tmp_path}): check data.train, or run the command from the folder "
                              "the path is relative to (the shipped recipes': the project's)")


def test_a_jsonl_file_is_read_a_line_at_a_time_and_numbered_as_an_editor_numbers_it(tmp_path: Path) -> None:
    """Read whole and split, a file took twice its size beside the rows it holds (380 MiB of rows: 964 MiB more at
    the peak); a line at a time, the rows alone. A lone \\r still ends a line, and blank lines still count."""
    import tracemalloc

    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": f"{n} " + "x" * 20_000}) + "\n" for n in range(200)))
    size = path.stat().st_size
    tracemalloc.start()
    rows = read_rows(str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(rows) == 200
    assert peak < 1.3 * size, f"{peak:,} bytes at the peak to read {size:,}"
    mac = tmp_path / "mac.jsonl"
    mac.write_bytes(b'{"text": "a"}\r\r{"text": "b"}\n\n{"text": "c"}\r\n{"text": "d"}')
    rows = read_rows(str(mac))
    assert [r["text"] for r in rows] == ["a", "b", "c", "d"]
    assert rows.places == [f"{mac}:{n}" for n in (1, 3, 5, 6)]
    assert rows.places[1:3] == [f"{mac}:3", f"{mac}:5"]
    mac.write_bytes(b'{"text": "a"}\r{"text": \n')
    with pytest.raises(ConfigError, match=r"mac.jsonl:2: malformed JSON"):
        read_rows(str(mac))
