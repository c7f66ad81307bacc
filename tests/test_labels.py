"""Which tokens a row trains on (qlora/data/labels.py), on the tiny recipe's tokenizer: what the README says is
learned (an instruction row's output and end token, a chat row's assistant turns) and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import adding_bos
from transformers import PreTrainedTokenizerBase

from qlora.base.build import ensure_checkpoint
from qlora.base.load import load_tokenizer
from qlora.config import load_recipe
from qlora.data.labels import ALPACA_PROMPT, ALPACA_PROMPT_INPUT, IGNORE, tokenize_row, tokenize_rows
from qlora.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer(ensure_checkpoint(load_recipe(ROOT / "recipes" / "tiny.py")))


def split(tokenizer: PreTrainedTokenizerBase, example: dict) -> tuple[str, str]:
    """(the masked text, the learned text) of a tokenised row; the learned tokens must follow every masked one."""
    learned = [label != IGNORE for label in example["labels"]]
    first = learned.index(True)
    assert all(learned[first:]), "a masked token inside the learned part"
    assert example["labels"][first:] == example["input_ids"][first:]
    return tokenizer.decode(example["input_ids"][:first]), tokenizer.decode(example["input_ids"][first:])


@pytest.mark.parametrize("extra", [{}, {"input": "red blue"}], ids=["no input", "input"])
def test_an_instruction_row_learns_its_output_and_end_token_and_not_its_prompt(tokenizer: PreTrainedTokenizerBase,
                                                                              extra: dict) -> None:
    """The prompt learned (the model trained to write instructions) or the end token dropped (it never learns to
    stop) passed every test of the data."""
    row = {"instruction": "reverse the words", "output": "blue red", **extra}
    prompt = (ALPACA_PROMPT_INPUT if extra else ALPACA_PROMPT).format(instruction=row["instruction"], **extra)
    assert split(tokenizer, tokenize_row(row, "instruction", tokenizer, "row")) == (prompt,
                                                                                   "blue red" + tokenizer.eos_token)


@pytest.mark.parametrize(("fmt", "row"), [("instruction", {"instruction": "reverse the words", "output": "blue red"}),
                                          ("text", {"text": "red blue"})])
def test_a_row_without_a_template_begins_as_the_tokenizer_begins_a_text(tokenizer: PreTrainedTokenizerBase, fmt: str,
                                                                        row: dict) -> None:
    """Under a tokenizer that begins each text with its bos (Llama 3's <|begin_of_text|>, Llama 2's <s>), instruction
    and text rows were tokenised without it: trained on a start the model never met in pretraining, nor meets in
    llama.cpp after export. They begin with it now, once, never learned; a text that holds it already gets no second,
    and a tokenizer that adds none (SmolLM2's, the tiny one) is as before."""
    adds = adding_bos(tokenizer)
    plain = tokenize_row(row, fmt, tokenizer, "row")
    assert plain["input_ids"][0] != tokenizer.bos_token_id
    example = tokenize_row(row, fmt, adds, "row")
    assert example == {"input_ids": [tokenizer.bos_token_id, *plain["input_ids"]],
                       "labels": [IGNORE, *plain["labels"]]}
    if fmt == "text":
        again = tokenize_row({"text": tokenizer.bos_token + row["text"]}, fmt, adds, "row")
        assert again["input_ids"] == example["input_ids"]


def test_a_chat_row_learns_its_assistant_turns_only(tokenizer: PreTrainedTokenizerBase) -> None:
    """A system turn learned (the mask keyed on role != "user") passed every test of the data: the model would be
    trained to write the system prompt."""
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse: red blue"},
             {"role": "assistant", "content": "blue red"}, {"role": "user", "content": "again"},
             {"role": "assistant", "content": "red blue"}]
    example = tokenize_row({"messages": turns}, "messages", tokenizer, "row")
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(turns, tokenize=False)
    learned = [i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE]
    assert tokenizer.decode(learned) == "blue red<|im_end|>\nred blue<|im_end|>\n"


def test_a_row_whose_only_label_is_its_first_token_is_dropped(tokenizer: PreTrainedTokenizerBase,
                                                             capsys: pytest.CaptureFixture) -> None:
    """Position t predicts token t+1, so an empty text (its end token alone) has nothing to learn; kept (the check
    reading labels[0] too), it passed every test of the data, and a file of them would train on no token at all."""
    examples = tokenize_rows([{"text": ""}, {"text": "a"}], "text", tokenizer, "rows", 64)
    assert [tokenizer.decode(ex["input_ids"]) for ex in examples] == ["a" + tokenizer.eos_token]
    assert "rows: dropped 1 of 2 rows with no learnable token within max_seq_len=64 (the first: rows: row 1)" in \
        capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"^rows: every row has all its labels masked \(no text within"):
        tokenize_rows([{"text": ""}], "text", tokenizer, "rows", 64)


def test_the_shortest_length_that_keeps_every_row_is_the_one_tokenize_rows_keeps_them_at(
        tokenizer: PreTrainedTokenizerBase) -> None:
    """shortest_keeping (what an out-of-memory report checks a suggested data.max_seq_len against, since --resume
    refuses one that drops rows) is where tokenize_rows starts dropping: every row kept at it, one fewer below."""
    from qlora.data.labels import shortest_keeping

    rows = [{"instruction": "reverse: " + "red " * n, "output": "blue"} for n in (2, 9, 5)]
    least = shortest_keeping(tokenize_rows(rows, "instruction", tokenizer, "rows", 128))
    assert len(tokenize_rows(rows, "instruction", tokenizer, "rows", least)) == 3
    assert len(tokenize_rows(rows, "instruction", tokenizer, "rows", least - 1)) == 2
