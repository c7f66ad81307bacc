"""Sequence packing (issue 5): packed rows give every document the loss it has alone, on the tiny NF4 Llama."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support import architecture, recorded_and_estimated

from qlora.config import Config, apply_overrides
from qlora.data.batches import collate
from qlora.data.labels import IGNORE, tokenize_rows
from qlora.data.pack import check_packing, join_documents, pack_examples
from qlora.errors import ConfigError
from qlora.training.assemble import build_model, prepare
from qlora.training.loss import loss_sum, target_hidden

TEXTS = ["the quick brown fox", "jumps", "over the lazy dog and keeps running far away",
         "a b c", "packing must not leak", "x"]


@pytest.fixture
def docs(tiny_config: Config) -> tuple[torch.nn.Module, object, list[dict]]:
    """The tiny model and six text documents of mixed length (every token is a label, the hardest case: a leaked
    boundary would train one document's last position on the next document's first token). CPU, fp32: exact."""
    tiny_config.train.device = "cpu"
    run = build_model(tiny_config)
    tokenizer = run["tokenizer"]
    examples = tokenize_rows([{"text": t} for t in TEXTS], "text", tokenizer, "test", max_seq_len=128)
    return run["model"].train(), tokenizer, examples


def per_document_loss(model: torch.nn.Module, batch: dict, doc_of_row_segment: list[list[int]]) -> torch.Tensor:
    """Summed cross-entropy per document; document = doc_of_row_segment[row][segment], segments counted by
    restarting position ids (one segment per row when unpacked)."""
    hidden, labels, rows = target_hidden(model, batch)
    token_loss = F.cross_entropy(model.get_output_embeddings()(hidden).float(), labels, reduction="none")
    positions = batch.get("position_ids", torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    segment = (positions == 0).cumsum(-1) - 1  # segment index of each position in its row
    target_segment = segment[:, :-1][batch["labels"][:, 1:] != IGNORE]
    doc = torch.tensor([doc_of_row_segment[r][s] for r, s in zip(rows.tolist(), target_segment.tolist(), strict=True)])
    return torch.zeros(len(TEXTS)).index_add_(0, doc, token_loss)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_each_document_its_unpacked_loss(docs: tuple, attn: str) -> None:
    model, tokenizer, examples = docs
    model.set_attn_implementation(attn)
    unpacked = collate(examples, tokenizer.pad_token_id)
    rows = [[0, 1, 2], [3, 4, 5]]  # two packed rows of three documents each, the second padded
    packed = collate([join_documents([examples[i] for i in row]) for row in rows], tokenizer.pad_token_id)
    assert packed["attention_mask"][1].sum() < packed["attention_mask"].shape[1]  # padding is exercised too
    with torch.no_grad():
        alone = per_document_loss(model, unpacked, [[i] for i in range(len(TEXTS))])
        together = per_document_loss(model, packed, rows)
        torch.testing.assert_close(together, alone)
        # The same rows without restarting positions let documents see each other: the test can tell.
        naive = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
        naive_loss = loss_sum(model, {**naive, "labels": packed["labels"]})
        assert not torch.allclose(naive_loss, together.sum())


def test_packed_gradients_match_unpacked(docs: tuple) -> None:
    model, tokenizer, examples = docs
    for layer in (m for m in model.modules() if hasattr(m, "lora_B")):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)  # non-zero B so A has gradients too
    grads = []
    for batch in (collate(examples, tokenizer.pad_token_id),
                  collate(pack_examples(examples, max_seq_len=64), tokenizer.pad_token_id)):
        model.zero_grad(set_to_none=True)
        loss = loss_sum(model, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for packed_grad, unpacked_grad in zip(grads[1][1], grads[0][1], strict=True):
        torch.testing.assert_close(packed_grad, unpacked_grad)


def test_pack_examples_places_every_document_once_within_max_len() -> None:
    lengths = [5, 9, 3, 12, 7, 1, 8, 8, 2, 11]
    examples = [{"input_ids": [100 + i] * n, "labels": [100 + i] * n} for i, n in enumerate(lengths)]
    packed = pack_examples(examples, max_seq_len=16)
    assert all(len(row["input_ids"]) <= 16 for row in packed)
    assert len(packed) == -(-sum(lengths) // 16)  # best-fit decreasing reaches the bound here: 66 tokens, 5 rows
    seen = sorted(tok for row in packed for tok in row["input_ids"])
    assert seen == sorted(100 + i for i, n in enumerate(lengths) for _ in range(n))
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        ends = starts[1:] + [len(row["input_ids"])]
        for start, end in zip(starts, ends, strict=True):
            assert list(row["position_ids"][start:end]) == list(range(end - start))
            assert len(set(row["input_ids"][start:end])) == 1  # one document per segment
            assert row["labels"][start] == IGNORE and row["labels"][start + 1:end] == row["input_ids"][start + 1:end]
    assert pack_examples(examples, 16) == packed  # deterministic, so resume packs the same rows
    assert len(pack_examples(examples[3:5], max_seq_len=19)) == 1  # 12 + 7: a document fills a row's room exactly
    with pytest.raises(ConfigError, match="longer than data.max_seq_len"):
        pack_examples(examples, max_seq_len=10)


def test_packed_documents_keep_their_masked_prompts(tiny_config: Config) -> None:
    """Every document above learns all its tokens, so packed labels built from the ids (a masked prompt learned)
    passed: here instruction rows, whose prompts are masked, keep exactly their own labels, the first masked too."""
    from qlora.base.build import ensure_checkpoint
    from qlora.base.load import load_tokenizer

    tokenizer = load_tokenizer(ensure_checkpoint(tiny_config))
    rows = [{"instruction": f"reverse: {t}", "output": " ".join(reversed(t.split()))} for t in TEXTS]
    examples = tokenize_rows(rows, "instruction", tokenizer, "test", max_seq_len=128)
    packed = pack_examples(examples, max_seq_len=128)
    assert len(packed) < len(examples)  # documents do share rows
    own = {tuple(ex["input_ids"]): ex["labels"] for ex in examples}
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for start, end in zip(starts, starts[1:], strict=False):
            assert list(row["labels"][start:end]) == [IGNORE, *own[tuple(row["input_ids"][start:end])][1:]]


def test_flash_attention_packing_needs_batch_of_one(tiny_config: Config) -> None:
    cfg = apply_overrides(tiny_config, ["--data.pack=true"])
    cfg.model.attn_implementation = "flash_attention_2"  # past Config's own check, which wants flash-attn installed
    with pytest.raises(ConfigError, match="batch_size=1"):
        check_packing(cfg)
    cfg.train.batch_size = 2  # two rows already: flash-attention reads packed boundaries in a batch of one alone
    with pytest.raises(ConfigError, match="batch_size=1"):
        check_packing(cfg)
    cfg.train.batch_size = 1
    check_packing(cfg)


def test_prepare_packs_train_rows_only(tiny_config: Config) -> None:
    run = prepare(apply_overrides(tiny_config, ["--data.pack=true", "--train.device=cpu"]))
    assert all("position_ids" in row for row in run["train_rows"])
    assert all(len(row["input_ids"]) <= tiny_config.data.max_seq_len for row in run["train_rows"])
    assert not any("position_ids" in row for row in run["eval_rows"])


def test_an_example_longer_than_a_row_is_refused_in_one_line(capsys: pytest.CaptureFixture) -> None:
    """Issue 23: this was a ValueError and a traceback; as every bad input, it is one line and exit 2."""
    from qlora.cli import run

    example = {"input_ids": [1] * 9, "labels": [1] * 9}
    assert run(lambda argv: pack_examples([example], 8), []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 examples are longer than data.max_seq_len=8 (longest 9)") and err.count("\n") == 1


def test_a_mask_with_padding_still_masks(docs: tuple) -> None:
    """A caller's own 2D mask with padding (left padding here, which the trainer never makes) goes to transformers'
    mask and stock SDPA: the padded row's logits are the unpadded row's (its positions shifted by the padding, which
    rotary embeddings leave to rounding). Without the mask the row's tokens would see the padding."""
    model, tokenizer, examples = docs
    ids = torch.tensor([examples[2]["input_ids"]])
    pad = 5
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], 1)
    padded = torch.cat([torch.full((1, pad), tokenizer.pad_token_id), ids], 1)
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        left = model(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(left[:, pad:], alone, atol=1e-4, rtol=1e-4)


def test_packed_rows_attend_by_document_with_no_row_sized_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recorded step of 2,048 tokens on the narrow Llama (four documents a row, qlora.report.measure.random_batch):
    packed, it holds what the unpacked step holds and one copy of o_proj's input (T q e, the estimate's term), where
    transformers' own sdpa would hold a T x T mask and K and V repeated to every head."""
    import qlora.base.synthetic

    base = ["--model.synthetic=true", "--model.config_json=tests/snapshots/narrow-llama.json",
            "--data.max_seq_len=2048", "--train.batch_size=1", "--train.device=cpu"]
    recorded, estimated = zip(*(recorded_and_estimated(*base, f"--data.pack={pack}") for pack in (False, True)),
                              strict=True)
    copy = 2048 * 256 * 4  # T q e: fp32 on a CPU, q = 8 heads x 32
    assert estimated[True] - estimated[False] == copy
    assert abs(recorded[True] - recorded[False] - copy) <= 2**16, recorded
    monkeypatch.setattr(qlora.base.synthetic, "implementation", lambda name: name)  # transformers' sdpa as it is
    stock, _ = recorded_and_estimated(*base, "--data.pack=true")
    assert stock - recorded[True] > 2048 * 2048, (stock, recorded)


@pytest.mark.parametrize("build", ["tiny-mistral", "tiny-gemma3"])
def test_a_sliding_window_is_kept_on_rows_longer_than_it(tiny_config: Config, build: str) -> None:
    """Rows of 40 tokens past a window of 16 (Mistral's sliding_window, Gemma 3's sliding layers), as the trainer
    makes them (no padding), packed and padded: the trainer's SDPA gives the logits of transformers' eager attention,
    which keeps the window. With no padding it made no mask, and SDPA's plain causal attention let every query see
    past its window: logits up to 5.5 apart on tiny-mistral, 2.9 on tiny-gemma3."""
    model = build_model(apply_overrides(tiny_config, [*architecture(build), "--train.device=cpu"]))["model"].eval()
    ids = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    padded = torch.ones_like(ids)
    padded[1, 32:] = 0
    cases = {"as made": dict(input_ids=ids),
             "packed": dict(input_ids=ids, position_ids=torch.cat([torch.arange(30), torch.arange(10)]).expand(2, 40)),
             "padded": dict(input_ids=ids, attention_mask=padded)}
    with torch.no_grad():
        ours = {name: model(**case).logits for name, case in cases.items()}
        model.set_attn_implementation("eager")
        eager = {name: model(**case).logits for name, case in cases.items()}
    for name, case in cases.items():
        real = case.get("attention_mask", torch.ones_like(ids)).bool()
        torch.testing.assert_close(ours[name][real], eager[name][real], atol=1e-4, rtol=1e-4, msg=name)
