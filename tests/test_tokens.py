"""How tokenised rows are held (qlora/data/tokens.py): int32 arrays, a few bytes a token where lists of Python ints
took 16 (ids of 256 or less, as the tiny tokenizer's: cached ints) to 48 (SmolLM2's); the batches made of them the
same to the bit as of lists; an id past int32 refused, not wrapped."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from qlora.base.build import ensure_checkpoint
from qlora.base.load import load_tokenizer
from qlora.config import Config, load_recipe
from qlora.data.batches import batch_rows, collate, micro_batches
from qlora.data.labels import tokenize_rows
from qlora.data.pack import pack_examples
from qlora.data.tokens import INT32_MAX, held_bytes, held_line, int32
from qlora.errors import ConfigError
from qlora.memory.profiler import PhaseTracker

ROOT = Path(__file__).resolve().parent.parent
WORDS = "red blue green tree bird cat dog moon sun star".split()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer(ensure_checkpoint(load_recipe(ROOT / "recipes" / "tiny.py")))


def rows(n: int, seed: int = 0) -> list[dict]:
    """Instruction rows of some 100 to 1,000 tokens on the tiny tokenizer (a token a character or two)."""
    rnd = random.Random(seed)
    return [{"instruction": "reverse: " + " ".join(rnd.choices(WORDS, k=3)),
             "output": " ".join(rnd.choices(WORDS, k=rnd.randint(20, 200)))} for _ in range(n)]


def test_tokenised_rows_hold_a_few_bytes_a_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Lists of ints held 16 bytes a token here (two 8-byte slots; the tiny vocabulary's ids are CPython's cached
    small ints) and 48 on SmolLM2's: int32 arrays of input_ids and labels hold 8, and each row's dict and arrays some
    300 bytes more. held_bytes, which print_summary and the profiler report, is what tracemalloc sees."""
    data = rows(3000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        examples = tokenize_rows(data, "instruction", tokenizer, "test", max_seq_len=1024)
        held = tracemalloc.get_traced_memory()[0] - before
        packed = pack_examples(examples, 1024)
        held_packed = tracemalloc.get_traced_memory()[0] - before - held
    finally:
        tracemalloc.stop()
    tokens = sum(len(ex["input_ids"]) for ex in examples)
    assert tokens > 1_000_000 and max(len(ex["input_ids"]) for ex in examples) < 1024
    assert held / tokens <= 10, f"{held / tokens:.1f} bytes a token"
    assert held_packed / tokens <= 13, f"{held_packed / tokens:.1f} bytes a token packed (with position_ids)"
    assert held_bytes(examples) == pytest.approx(held, rel=0.05)
    assert held_bytes(packed) == pytest.approx(held_packed, rel=0.05)


def test_held_bytes_of_short_rows_is_what_tracemalloc_sees() -> None:
    """Rows of 10 tokens, where each row's dict and the arrays' headers are most of the bytes (the test above, of
    rows of some 500 tokens, is within 5% without the dicts): the list, each dict and each array are counted; and
    held_line, which print_summary prints, gives them in MiB."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        examples = [{"input_ids": int32(list(range(i, i + 10)), "r"), "labels": int32(list(range(10)), "r")}
                    for i in range(5000)]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Within 0.13-0.52% (200 rows: to the byte); the list's 8 bytes a row are 1.8%, which 5% did not see.
    assert held_bytes(examples) == pytest.approx(held, rel=0.01)
    mib = held_bytes(examples) / 2**20  # some 2 MiB: in MB, 5% more
    assert held_line(examples, []) == f"train 50,000 tokens held in {mib:,.1f} MiB, held out 0 tokens held in 0.0 MiB"


def test_a_batch_is_an_int64_copy_of_its_rows() -> None:
    """collate copies each row into the batch: a batch of one full row read straight from the row's buffer
    (torch.frombuffer) would be int32, and an in-place op on it (a loss masking its labels) would change the row that
    every later epoch trains on."""
    want = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2]}
    row = {k: int32(v, "r") for k, v in want.items()}
    for examples in ([row], [row, {k: int32(list(range(5)), "r") for k in row}]):
        batch = collate(examples, 0)
        for key in ("input_ids", "labels", "position_ids"):
            assert batch[key].dtype == torch.int64, key
            batch[key].fill_(9)
        assert {k: list(v) for k, v in row.items()} == want


def reference(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """collate as it was on rows of plain lists: int64 tensors padded right, positions restarting in the padding."""
    plain = [{k: list(v) for k, v in ex.items()} for ex in examples]
    width = max(len(ex["input_ids"]) for ex in plain)

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([ex[key] + [fill] * (width - len(ex[key])) for ex in plain])

    batch = {"input_ids": padded("input_ids", pad_id), "labels": padded("labels", -100),
             "attention_mask": torch.tensor([[1] * len(ex["input_ids"]) + [0] * (width - len(ex["input_ids"]))
                                             for ex in plain])}
    if "position_ids" in plain[0]:
        batch["position_ids"] = torch.tensor([ex["position_ids"] + list(range(width - len(ex["position_ids"])))
                                              for ex in plain])
    return batch


@pytest.mark.parametrize("pack", [False, True], ids=["rows", "packed"])
def test_batches_of_int32_rows_are_those_of_plain_lists(tokenizer: PreTrainedTokenizerBase, pack: bool) -> None:
    examples = tokenize_rows(rows(40, seed=1), "instruction", tokenizer, "test", max_seq_len=512)
    if pack:
        examples = pack_examples(examples, 512)
    for (_, batch), index in zip(micro_batches(examples, 4, 0, tokenizer.pad_token_id), range(12), strict=False):
        want = reference([examples[i] for i in batch_rows(len(examples), 4, 0, index)], tokenizer.pad_token_id)
        assert batch.keys() == want.keys()
        for key, tensor in want.items():
            assert batch[key].dtype == tensor.dtype == torch.int64 and torch.equal(batch[key], tensor), key
    assert torch.equal(collate(examples[:3], 0)["input_ids"], reference(examples[:3], 0)["input_ids"])


class WideTokenizer:
    """A stand-in tokenizer whose every text is the ids it is built with."""

    eos_token = "</s>"

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_vocab(self) -> dict[str, int]:
        return {"</s>": 0, "a": 1}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.ids}


def test_an_id_past_int32_is_refused_not_wrapped() -> None:
    row = [{"text": "a"}]
    held = tokenize_rows(row, "text", WideTokenizer([1, INT32_MAX]), "data.jsonl", max_seq_len=8)
    assert list(held[0]["input_ids"]) == [1, INT32_MAX]
    for ids in ([1, INT32_MAX + 1], [INT32_MAX + 1, 1]):  # the id named wherever it is in the row
        with pytest.raises(ConfigError, match=r"data.jsonl: row 1: token id 2,147,483,648 does not fit the int32"):
            tokenize_rows(row, "text", WideTokenizer(ids), "data.jsonl", max_seq_len=8)


def test_the_rows_bytes_are_said_and_named_in_a_cpu_peak(tiny_config: Config, capsys: pytest.CaptureFixture) -> None:
    """print_summary says the rows' host bytes; on CPU, where the measured peak is the process's resident memory,
    the profiler names them as a category rather than leaving them in the rest."""
    from qlora.training.assemble import prepare, print_summary

    tracker = PhaseTracker(torch.device("cpu"))
    run = prepare(tiny_config, profiler=tracker)
    held = held_bytes(run["train_rows"]) + held_bytes(run["eval_rows"])
    assert tracker.rows_bytes == held > 0
    tracker.watch(tracker.model)  # as train.py's watch(model, optimizer): no rows_bytes, and the rows stay named
    record = tracker.mark("first_forward")
    assert record["categories"]["tokenised_rows"] == held
    # Named once: what the categories leave of the peak is the rest, the rows not counted in it again.
    assert record["activations"] == max(0, record["allocated"] - sum(record["categories"].values()))
    print_summary(tiny_config, run)
    tokens = sum(len(r["input_ids"]) for r in run["train_rows"])
    said = capsys.readouterr().out
    assert f"tokenised rows in host memory: train {tokens:,} tokens held in " in said
    # The recipe's warmup of 5 steps over a run of 4: the schedule's lr never passes 4/6 of its peak, said once.
    assert (tiny_config.train.steps, tiny_config.train.warmup_steps) == (4, 5)
    assert "train.warmup_steps=5 is not shorter than the run's 4 steps: the learning rate rises to 66.7% of " \
           "train.lr=0.003 and never decays" in said
    tiny_config.train.warmup_steps = 3
    print_summary(tiny_config, run)
    assert "warmup_steps" not in capsys.readouterr().out


def test_on_cuda_the_rows_are_no_category_of_the_cards_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows live in host memory: a CUDA peak (faked here, 2 MiB allocated) names no tokenised_rows and leaves
    all of the peak to the rest, however many bytes of rows watch was given."""
    mib = 2**20
    for name, value in {"mem_get_info": (8 * mib, 16 * mib), "memory_reserved": 0, "memory_stats": {},
                        "max_memory_reserved": 3 * mib, "max_memory_allocated": 2 * mib}.items():
        monkeypatch.setattr(torch.cuda, name, lambda *_, value=value: value)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *_: None)
    tracker = PhaseTracker(torch.device("cuda"))
    tracker.watch(rows_bytes=10 * mib)
    record = tracker.mark("first_forward")
    assert record["categories"] == {} and record["activations"] == 2 * mib
