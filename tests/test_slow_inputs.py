"""Inputs that used to fail slowly or cost without bound: a hub id with no network (~25 s of retries before the error)
and a huge line of data (a single 50 MB line took 2 GB for a row cut to 128 tokens).

No test here measures time; the network cases check that the command knows it is offline and says so, which is
what lets it fail at once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from forked_cli import ROOT
from transformers import AutoTokenizer

from qlora.base.build import ensure_checkpoint
from qlora.config import load_recipe
from qlora.data.labels import cut_row, longest_token, tokenize_row, tokenize_rows

TINY = "recipes/tiny.py"
# huggingface_hub's endpoint moved to a port where nothing listens: the same as no network, on any machine.
NO_NETWORK = "import huggingface_hub.constants as c\nc.ENDPOINT = 'http://127.0.0.1:9'\n"


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.status == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_hub_dataset_with_no_network_says_so(cli, tmp_path):
    line = one_line(cli.run([TINY, "--data.train=someone/no-such-dataset", f"--output.dir={tmp_path}/run"],
                            prelude=NO_NETWORK))
    assert re.fullmatch(r"error: data source 'someone/no-such-dataset' is neither a local file nor a reachable hub "
                        r"dataset \(no network: 127.0.0.1 cannot be reached \(Connection refused\), and it is not in "
                        r"the datasets cache\): give a local file, or download the dataset first", line), line


def test_a_hub_model_with_no_network_says_so(cli, tmp_path):
    line = one_line(cli.run([TINY, "--model.path=someone/no-such-model", "--model.build=none",
                             f"--output.dir={tmp_path}/run"], prelude=NO_NETWORK))
    assert line == ("error: model.path=someone/no-such-model is not a local directory, and the hub cannot be reached "
                    "(no network: 127.0.0.1 cannot be reached (Connection refused)) nor holds it in its local cache: "
                    "download it first, or point model.path at a local copy")


def test_hf_hub_offline_is_named_at_once(tmp_path):
    """HF_HUB_OFFLINE read from the environment as the command starts (a cold process)."""
    result = subprocess.run([sys.executable, "-m", "qlora.train", TINY, "--data.eval=someone/held-out",
                             f"--output.dir={tmp_path}/run"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: data source 'someone/held-out' is neither a local file nor a reachable hub dataset (HF_HUB_OFFLINE is "
        "set, and it is not in the datasets cache): give a local file, or download the dataset first")


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    """The tiny byte-level tokenizer, and SmolLM2's real BPE when its checkpoint was built on this machine."""
    found = {"tiny": AutoTokenizer.from_pretrained(ensure_checkpoint(load_recipe(ROOT / TINY)))}
    smol = Path(load_recipe(ROOT / "recipes" / "smollm2_135m.py").model.path)
    if (smol / "tokenizer.json").is_file():
        found["smollm2"] = AutoTokenizer.from_pretrained(smol)
    return found


ROWS = {
    "text": {"text": "the quick brown fox " * 3000},
    "instruction": {"instruction": "Reverse: " + "dog moon red " * 2000, "output": "red moon dog " * 2000},
    "messages": {"messages": [{"role": "system", "content": "be brief " * 1000},
                              {"role": "user", "content": "hello " * 5000},
                              {"role": "assistant", "content": "hi " * 5000}]},
}


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("max_seq_len", [16, 200])
def test_cutting_text_before_tokenising_changes_no_kept_token(tokenizers, fmt, max_seq_len):
    """The row a cut row gives, truncated to max_seq_len, is the row the whole one gives, truncated; and the cut
    does cut (these fields are longer than max_seq_len tokens can cover)."""
    row = ROWS[fmt]
    for name, tokenizer in tokenizers.items():
        cut = cut_row(row, (max_seq_len + 1) * longest_token(tokenizer))
        assert json.dumps(cut) != json.dumps(row), name
        whole, kept = (tokenize_row(r, fmt, tokenizer, "row") for r in (row, cut))
        assert {k: v[:max_seq_len] for k, v in kept.items()} == {k: v[:max_seq_len] for k, v in whole.items()}, name


def test_tokenize_rows_cuts_before_tokenising(tokenizers, monkeypatch):
    """What reaches the tokenizer is bounded by max_seq_len, whatever the row holds."""
    tokenizer, seen = tokenizers["tiny"], []
    call = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, text, *a, **k: (seen.append(len(text)),
                                                                                   call(self, text, *a, **k))[1])
    rows = [{"text": "dog moon red " * 100_000}, {"text": "short"}]
    examples = tokenize_rows(rows, "text", tokenizer, "rows", 64)
    assert [len(e["input_ids"]) for e in examples] == [64, 6]  # "short": 5 bytes and the end token
    assert max(seen) <= 65 * longest_token(tokenizer) + len(tokenizer.eos_token)


def test_a_conversation_of_many_turns_is_rendered_only_as_far_as_max_seq_len(tokenizers, monkeypatch):
    """Each turn's labels come from rendering the conversation up to it, so rendering every turn cost time quadratic
    in the turns (2,000 short turns took 19 s; a 50 MB line of them would not end). Turns past the characters
    max_seq_len + 1 tokens can cover are not rendered, and the kept tokens are those of the whole conversation."""
    tokenizer, rendered = tokenizers["tiny"], []
    render = type(tokenizer).apply_chat_template
    monkeypatch.setattr(type(tokenizer), "apply_chat_template",
                        lambda self, messages, *a, **k: (rendered.append(len(messages)), render(self, messages, *a,
                                                                                               **k))[1])
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"word {i}"} for i in range(400)]
    [kept] = tokenize_rows([{"messages": turns}], "messages", tokenizer, "rows", 64)
    # Each turn renders to at least its content's 6 characters, so the limit falls within its first turns.
    assert max(rendered) <= 65 * longest_token(tokenizer) // 6 + 1 < len(turns), max(rendered)
    monkeypatch.undo()
    whole = tokenize_row({"messages": turns}, "messages", tokenizer, "row")
    assert {k: list(v) for k, v in kept.items()} == {k: list(v[:64]) for k, v in whole.items()}  # rows are int32


def test_a_conversation_is_rendered_to_the_first_turn_that_passes_the_limit(tokenizers):
    """tokenize_rows keeps a row's first max_seq_len tokens from the text of its turns up to the first that passes
    `limit` characters: stopping at the limit, or a turn before it, passed the test above, whose limit (65 tokens of the
    tiny tokenizer's longest entry, 13 characters) lies far past its 64 tokens of one byte each."""
    tokenizer = tokenizers["tiny"]
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"word {i}"} for i in range(6)]
    ends = [len(tokenizer.apply_chat_template(turns[:n], tokenize=False)) for n in range(1, len(turns) + 1)]
    for limit in range(ends[-1] + 1):
        row = tokenize_row({"messages": turns}, "messages", tokenizer, "row", limit)
        assert len(tokenizer.decode(row["input_ids"])) == next((end for end in ends if end > limit), ends[-1]), limit


def test_a_50_mb_line_costs_memory_for_its_kept_tokens_only(cli, tmp_path):
    """Tokenising the data (a 50 MB line among ordinary rows) raises the process's peak memory by little; it used to
    by 2 GB. The child records its peak before and after tokenising, then stops."""
    data = tmp_path / "huge.jsonl"
    rows = (ROOT / "recipes" / "data" / "tiny" / "train.jsonl").read_text().splitlines()[:20]
    line = json.dumps({"messages": [{"role": "user", "content": "w" * 50_000_000},
                                    {"role": "assistant", "content": "ok"}]})
    data.write_text("\n".join([*rows, line]) + "\n")
    peaks = tmp_path / "peaks.json"
    measure = f"""
import json, os, resource, qlora.data.splits
tokenize_rows = qlora.data.splits.tokenize_rows
def measured(*args, **kwargs):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = tokenize_rows(*args, **kwargs)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    open("{peaks}", "w").write(json.dumps([before, after, len(out)]))
    os._exit(0)
qlora.data.splits.tokenize_rows = measured  # where load_splits looks it up
"""
    result = cli.run([TINY, f"--data.train={data}", f"--output.dir={tmp_path}/run"], prelude=measure)
    assert result.status == 0, result.stderr
    before, after, kept = json.loads(peaks.read_text())
    assert kept == 20  # the huge row's answer lies beyond max_seq_len: dropped, as before
    assert (after - before) * 1024 < 200 * 2**20, (before, after)  # ru_maxrss is in KiB
