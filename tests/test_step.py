"""The held-out evaluation (qlora/training/step.py) against losses and exact matches summed by hand, row by row."""

from __future__ import annotations

import math

import pytest
import torch

from qlora.config import Config, apply_overrides
from qlora.training.assemble import prepare
from qlora.training.step import evaluate


def test_the_evaluation_is_the_mean_over_target_tokens_and_the_share_of_rows_exactly_right(tiny_config: Config) -> None:
    """Rows of other lengths and target counts in batches of 4, the last one short: the loss is the sum over every
    target token divided by their count (not a mean of rows or batches), the perplexity its exp, the exact match a
    share of the rows scored; and the model trains again after it (dropout back on)."""
    cfg = apply_overrides(tiny_config, ["--train.batch_size=4"])
    run = prepare(cfg)
    model = run["model"].eval()
    with torch.no_grad():
        rows = run["eval_rows"][:2]  # as they are: many targets each, so a per-token and a per-row mean differ
        for i, row in enumerate(run["eval_rows"][2:7]):
            # a prefix and one target: the token the model predicts (the row is exactly right), or another
            prefix = row["input_ids"][:20 + 7 * i]
            best = int(model(input_ids=torch.tensor([prefix])).logits[0, -1].argmax())
            token = best if i % 2 else (best + 1) % 259
            rows.append({"input_ids": [*prefix, token], "labels": [-100] * len(prefix) + [token]})
        loss = tokens = exact = 0
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(row["labels"][1:])
            kept = labels != -100
            loss += float(torch.nn.functional.cross_entropy(logits[kept], labels[kept], reduction="sum"))
            tokens += int(kept.sum())
            exact += bool((logits[kept].argmax(-1) == labels[kept]).all())
    assert 0 < exact < len(rows) and tokens > 2 * len(rows)

    model.train()
    scores = evaluate(model, rows, cfg, run["tokenizer"].pad_token_id, run["device"])
    assert model.training
    assert scores["eval_loss"] == pytest.approx(loss / tokens, rel=1e-5)
    assert scores["eval_ppl"] == pytest.approx(math.exp(loss / tokens), rel=1e-5)
    assert (scores["eval_exact_match"], scores["eval_rows"]) == (exact / len(rows), len(rows))
