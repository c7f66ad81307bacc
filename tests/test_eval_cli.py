"""qlora.eval (qlora/eval.py) on a run without data.eval: it scores the split the run itself held out of data.train,
with training's final numbers, and says them as its result file holds them."""

from __future__ import annotations

import json
from pathlib import Path

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
