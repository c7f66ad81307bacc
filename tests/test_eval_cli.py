"""qlora.eval (qlora/eval.py) on a run without data.eval: it scores the split the run itself held out of data.train,
with training's final numbers, and says them as its result file holds them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qlora import eval as run_eval

ROOT = Path(__file__).resolve().parent.parent


def test_eval_of_a_run_without_data_eval_scores_the_split_it_held_out(tmp_path, capsys) -> None:
    """The held-out rows are the seeded 5% training held out of data.train's 600 (30 rows): the same numbers as its
    final evaluation, the rows counted as held out (not data.train's), none capped, and the printed line the file's."""
    from qlora.config import load_recipe
    from qlora.train import train

    cfg = load_recipe(ROOT / "recipes/tiny.py")
    cfg.data.train, cfg.data.eval, cfg.output.dir = str(ROOT / cfg.data.train), None, str(tmp_path / "run")
    cfg.train.steps, cfg.train.eval_every, cfg.train.eval_before, cfg.train.log_every = 2, 0, False, 2
    final = train(cfg)["after"]
    capsys.readouterr()
    assert run_eval.main([str(tmp_path / "run"), f"--json={tmp_path / 'eval.json'}"]) == 0
    said = capsys.readouterr().out.splitlines()
    result = json.loads((tmp_path / "eval.json").read_text())
    assert {key: result[key] for key in final} == final
    assert result["rows"] == result["eval_rows"] == 30
    assert result["data"] == f"{cfg.data.train} (held-out 5%, seed {cfg.train.seed})"
    assert f"{result['data']}: 30 rows" in said
    assert any(line.startswith(f"held-out loss {result['eval_loss']:.4f} | perplexity {result['eval_ppl']:.3f} | "
                               f"exact match {100 * result['eval_exact_match']:.1f}% (") for line in said), said


def test_every_printed_exact_match_is_the_recorded_share_as_a_percentage(tmp_path, capsys) -> None:
    """Rows cut by data.max_seq_len to one target token, the first of the answer, and half of them the token the base
    predicts there: a real exact match of 50%, not the 0% of every other short run, under which a line that printed
    the share itself (0.5%) or 100 x a percentage (5000.0%) read right. Each line that prints it, of training (before,
    at step 1, after, and after alone with train.eval_before=false) and of qlora.eval, shows 100 x the share that
    metrics.jsonl and --json record."""
    from qlora.config import load_recipe
    from qlora.data.labels import tokenize_row
    from qlora.train import train
    from qlora.training.assemble import prepare

    cfg = load_recipe(ROOT / "recipes/tiny.py")
    cfg.output.dir = str(tmp_path / "probe")
    base = prepare(cfg)  # the base as training evaluates it first: NF4, adapters zero
    model, tokenizer = base["model"].eval(), base["tokenizer"]
    rows, head = [], 41  # prompts whose answer starts at token 41, so max_seq_len=42 keeps its first token alone
    for line in open(ROOT / cfg.data.eval):
        messages = json.loads(line)["messages"]
        ids = tokenize_row({"messages": messages}, "messages", tokenizer, "row")
        if next(i for i, label in enumerate(ids["labels"]) if label != -100) != head:
            continue
        with torch.no_grad():
            best = int(model(input_ids=torch.tensor([ids["input_ids"][:head]])).logits[0, -1].argmax())
        char = tokenizer.decode([best])
        if char.isascii() and char.isalpha() and tokenizer.encode(char, add_special_tokens=False) == [best]:
            answer = char if len(rows) % 2 else ("b" if char == "a" else "a")  # predicted in every second row
            rows.append({"messages": [messages[0], {"role": "assistant", "content": answer}]})
        if len(rows) == 8:
            break
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def trained(name: str, *overrides: str) -> tuple[list[dict], str]:
        from qlora.config import apply_overrides

        run = apply_overrides(load_recipe(ROOT / "recipes/tiny.py"), [
            f"--data.train={data}", f"--data.eval={data}", "--data.max_seq_len=42", "--train.lr=1e-6",
            f"--output.dir={tmp_path / name}", *overrides])
        train(run)
        logged = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        return [r for r in logged if "eval_loss" in r], capsys.readouterr().out

    scores, said = trained("run", "--train.steps=2", "--train.eval_every=1")
    assert [s["step"] for s in scores] == [0, 1, 2] and scores[0]["eval_exact_match"] == 0.5, scores
    assert all(0 < s["eval_exact_match"] < 1 for s in scores), scores
    pct = [f"{100 * s['eval_exact_match']:.1f}%" for s in scores]
    loss = [f"{s['eval_loss']:.4f}" for s in scores]
    assert f"before training: held-out loss {loss[0]}, exact match {pct[0]} (" in said, said
    assert f"step 1: held-out loss {loss[1]}, exact match {pct[1]} (" in said, said
    assert f"held-out loss {loss[0]} -> {loss[2]}, exact match {pct[0]} -> {pct[2]} (" in said, said

    alone, said = trained("alone", "--train.steps=1", "--train.eval_before=false")
    assert 0 < alone[0]["eval_exact_match"] < 1, alone
    assert f"held-out loss {alone[0]['eval_loss']:.4f}, exact match {100 * alone[0]['eval_exact_match']:.1f}% (" \
        in said, said

    assert run_eval.main([str(tmp_path / "run"), f"--json={tmp_path / 'eval.json'}"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["eval_exact_match"] == scores[-1]["eval_exact_match"], (result, scores)
    assert f"exact match {pct[-1]} (" in capsys.readouterr().out
