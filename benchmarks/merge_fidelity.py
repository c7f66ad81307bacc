"""How close is a merged checkpoint to the adapter model it came from, and what does rounding to bf16 cost?

    nice -n 5 python benchmarks/merge_fidelity.py [RECIPE] [--seed 0] [--runs DIR] [--reuse] [--section.key=value]

Trains the recipe (default recipes/smollm2_135m.py) as 16-bit LoRA and as QLoRA, with the overrides and seed of
benchmarks/quality.py (its train_one, in a child process each), then merges each run as docs/after-training.md's
tolerance table lists (qlora.merge's own `merge`, its check included): the QLoRA run onto its dequantised NF4 base in
bf16 and in fp32 and onto the original 16-bit weights (--base-16bit), the 16-bit LoRA run in bf16 (stochastic
rounding, as the merge does where W0 is already bf16) and, for comparison, rounded to nearest, which the merge does not
do: that one is written here from the merge's own fold in fp32, rounded to nearest bf16, and checked by its check.
Each merged model (CPU, fp32) is scored on the run's held-out rows as its run's final eval scored the adapter model
(qlora.training.step.evaluate: loss per target token, teacher-forced exact match). For the 16-bit LoRA run, every
adapted weight's W0 + update is rounded both ways and counted: the entries left at W0, and the share of the update lost
(rounding_loss).

Runs and merges go to <runs>/seed-<seed>/; --reuse re-reads a run that finished with the same config. Writes
benchmarks/results/merge-<device>.{md,json}.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import header, record, write_result  # noqa: E402  (a sibling script, not a package)
from quality import METHODS, finished_with, method_config, train_one  # noqa: E402

from qlora import cli  # noqa: E402  (one line and its exit status for each ending)
from qlora.base.build import checkpoint_shards, ensure_checkpoint  # noqa: E402
from qlora.base.load import load_tokenizer  # noqa: E402
from qlora.config import apply_overrides, load_recipe  # noqa: E402
from qlora.data.splits import load_splits  # noqa: E402
from qlora.merge.checkpoint import (  # noqa: E402
    INFO,
    TOLERANCE,
    copy_side_files,
    merge,
    merge_error,
    prompt_logits,
    write_shards,
)
from qlora.merge.fold import folding, merge_source, round_stochastic  # noqa: E402
from qlora.training.assemble import load_run_fp32, read_run_config  # noqa: E402
from qlora.training.step import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Each merge of the table: (run, its folder, label, dtype, onto the 16-bit base). None as the dtype: bf16 rounded to
# nearest, which qlora.merge does not do (merge_nearest).
MERGES = [("qlora", "qlora-bf16", "default: dequantised NF4, bf16", torch.bfloat16, False),
          ("qlora", "qlora-fp32", "--dtype fp32", torch.float32, False),
          ("qlora", "qlora-base16-bf16", "--base-16bit, bf16", torch.bfloat16, True),
          ("lora", "lora-bf16", "bf16 (stochastic rounding)", torch.bfloat16, False),
          ("lora", "lora-bf16-nearest", "bf16 rounded to nearest (not used)", None, False)]
NEAR_TIE = 0.5  # logits between a position's two best tokens, below which its top token is a near tie


def rounding_loss(w0: torch.Tensor, exact: torch.Tensor, rounded: torch.Tensor) -> tuple[int, float, float]:
    """(entries left at W0, sum of u * (rounded - W0), sum of u^2) for one weight, u = exact - W0 the update.

    Summed over weights, 1 - the second / the third is the share of the update the rounded weights lose: 0 when they
    carry it all (in expectation, stochastic rounding), 1 when they are W0 again.
    """
    u, kept = exact - w0, rounded.float() - w0
    return int((kept == 0).sum()), float((u.double() * kept.double()).sum()), float(u.double().square().sum())


def merge_nearest(run_dir: Path, out: Path, cfg: object) -> dict:
    """The run merged as qlora.merge does but rounded to nearest bf16 (from its fold in fp32), checked by its check;
    returns the rounding counts of the adapted weights whose W0 is already bf16, nearest and stochastic alike."""
    source = merge_source(run_dir, cfg=cfg)
    counts = {"entries": 0, "updated_abs": 0.0, "base_abs": 0.0, "nearest": [0, 0.0, 0.0], "stochastic": [0, 0.0, 0.0]}

    def nearest(fold: object, merged: set[str], name: str, tensor: torch.Tensor) -> torch.Tensor:
        before = len(merged)
        exact = fold(name, tensor, torch.float32)
        if not exact.is_floating_point():
            return exact
        rounded = exact.to(torch.bfloat16)
        w0 = tensor.float()
        if len(merged) > before and torch.equal(w0.to(torch.bfloat16).float(), w0):  # an adapted weight, on the grid
            stochastic = round_stochastic(exact, torch.bfloat16, zlib.crc32(name.encode()))  # as the merge's fold
            for key, values in (("nearest", rounded), ("stochastic", stochastic)):
                counts[key] = [a + b for a, b in zip(counts[key], rounding_loss(w0, exact, values), strict=True)]
            counts["entries"] += w0.numel()
            counts["updated_abs"] += float((exact - w0).abs().sum())
            counts["base_abs"] += float(w0.abs().sum())
        return rounded

    out.mkdir(parents=True)
    with folding(source) as (fold, merged):
        write_shards(checkpoint_shards(Path(source.base)), out, lambda name, t: nearest(fold, merged, name, t),
                     torch.bfloat16, 5 * 10**9)
    copy_side_files(Path(source.base), out, torch.bfloat16)
    info = {"run_dir": str(run_dir.resolve()), "base": source.base, "base_weights": "16bit", "dtype": "bfloat16",
            "rounded": "to nearest (benchmarks/merge_fidelity.py)", "merged_layers": len(merged)}
    (out / INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    info["merge_error"] = merge_error(run_dir, out, cfg)
    n = counts["entries"]
    if n == 0:  # a base stored wider than bf16: the merge rounds to nearest there too, and there is nothing to count
        info["rounding"] = None
        return info
    info["rounding"] = {"entries": n, "update_over_weight": counts["updated_abs"] / counts["base_abs"],
                        **{key: {"unchanged": counts[key][0] / n, "update_lost": 1 - counts[key][1] / counts[key][2]}
                           for key in ("nearest", "stochastic")}}
    return info


def held_out(model: torch.nn.Module, tokenizer: object, cfg: object) -> dict:
    """The run's held-out loss and exact match for `model` on the CPU, as training's final eval scores them."""
    examples = load_splits(cfg.data, tokenizer, cfg.train.seed)[1]
    return evaluate(model, examples, cfg, tokenizer.pad_token_id, torch.device("cpu"))


def merged_scores(out: Path, cfg: object) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map={"": "cpu"}, use_kernels=False)
    return held_out(model, load_tokenizer(str(out)), cfg)


def adapter_scores(run_dir: Path) -> dict:
    """The adapter model's held-out scores, its run's final eval (the same evaluate on the same rows, its base as it
    trained: on the CPU the 4-bit one computing in fp32), and the share of the check's prompt positions whose two
    best tokens it puts within NEAR_TIE logits (on its base in fp32, as the check runs it)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    final = [r for r in records if "eval_loss" in r][-1]
    _, model, tokenizer, _ = load_run_fp32(run_dir)
    logits = torch.cat(prompt_logits(model, tokenizer))
    top2 = logits.topk(2, dim=-1).values
    near_ties = float(((top2[:, 0] - top2[:, 1]) < NEAR_TIE).float().mean())
    return {**{k: final[k] for k in ("step", "eval_loss", "eval_exact_match", "eval_rows") if k in final},
            "near_ties": near_ties, "positions": logits.shape[0]}


def train_runs(recipe: str, seed: int, runs: Path, overrides: list[str], reuse: bool) -> dict[str, Path]:
    dirs = {}
    for method in ("qlora", "lora"):
        run_overrides = method_config(method, seed, overrides, None)
        run_dir = runs / f"seed-{seed}" / method
        if reuse and finished_with(run_dir, apply_overrides(load_recipe(ROOT / recipe), run_overrides)):
            print(f"== {METHODS[method][0]}, seed {seed}: reusing {run_dir} (finished, same config)")
        else:
            train_one(recipe, method, run_dir, run_overrides)
        dirs[method] = run_dir
    return dirs


def markdown(result: dict) -> str:
    lines = header("Merge fidelity: each merged checkpoint against the adapter model it came from", result, "cpu")
    lines += [f"Recipe `{result['recipe']}`, {result['steps']} steps, seed {result['seed']}, trained as benchmarks/"
              f"quality.py trains 16-bit LoRA and QLoRA. Check: qlora.merge's own (max |logit difference| at every "
              f"position of its {result['positions']} prompt positions, merged model against the adapter on the base "
              "merged onto, both CPU fp32; bound: TOLERANCE x the largest |logit|). Held-out: the run's "
              f"{result['eval_rows']} held-out rows, loss per target token and teacher-forced exact match: the "
              "adapter model's from its run's final eval, the merged model's by the same evaluate, loaded in fp32.", "",
              "| run, merge | max &#124;Δlogit&#124; (largest logit): share | bound | same top token | merge s | "
              "held-out loss, adapter → merged | exact match, adapter → merged |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["merges"]:
        check, adapter, merged = row["check"], result["adapters"][row["run"]], row["held_out"]
        share = check["max_abs_logit_diff"] / check["max_abs_logit"]
        bound = TOLERANCE[row["dtype"]]
        verdict = "within" if check["within_tolerance"] else "OVER"
        lines.append(f"| {METHODS[row['run']][1]}, {row['label']} | {check['max_abs_logit_diff']:.3g} "
                     f"({check['max_abs_logit']:.1f}): {100 * share:.2g}% | {100 * bound:g}%: {verdict} | "
                     f"{round(check['argmax_agreement'] * check['positions'])}/{check['positions']} | "
                     f"{row['seconds']:.0f} | {adapter['eval_loss']:.5f} → {merged['eval_loss']:.5f} | "
                     f"{100 * adapter['eval_exact_match']:.1f}% → {100 * merged['eval_exact_match']:.1f}% |")
    lines.append("")
    for row in result["merges"]:
        if "vs adapter on 4-bit base" in row["all_checks"] and row["onto_16bit"]:
            four = row["all_checks"]["vs adapter on 4-bit base"]
            differ = four["positions"] - round(four["argmax_agreement"] * four["positions"])
            lines.append(f"- QLoRA merged onto the original 16-bit weights (--base-16bit), against the model it "
                         f"trained as (the adapter on its 4-bit base): max |logit difference| "
                         f"{four['max_abs_logit_diff']:.3g} (mean {four['mean_abs_logit_diff']:.3g}), another top "
                         f"token at {differ} of {four['positions']} positions.")
    rounding = result["rounding"]
    if rounding is None:
        lines.append("- 16-bit LoRA: no adapted weight's W0 is on the bf16 grid (a base stored wider), so nothing is "
                     "rounded stochastically and the rounding counts are left out.")
    else:
        lines.append(f"- 16-bit LoRA, its {rounding['entries']:,} adapted weight entries whose W0 is already bf16: the "
                     f"update is {100 * rounding['update_over_weight']:.2g}% of |W| (sum over sum). Rounded to nearest "
                     f"bf16, {100 * rounding['nearest']['unchanged']:.0f}% of them stay at W0 and "
                     f"{100 * rounding['nearest']['update_lost']:.0f}% of the update is lost; rounded stochastically "
                     f"(the merge), {100 * rounding['stochastic']['unchanged']:.0f}% and "
                     f"{100 * rounding['stochastic']['update_lost']:.1f}%. Lost: 1 - Σ u (rounded - W0) / Σ u², u the "
                     "update in fp32.")
    lines += [f"- Near ties: at {100 * result['adapters']['qlora']['near_ties']:.0f}% (QLoRA) and "
              f"{100 * result['adapters']['lora']['near_ties']:.0f}% (16-bit LoRA) of the check's prompt positions "
              f"the adapter model's two best tokens are within {NEAR_TIE} logits."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/smollm2_135m.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "merge")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--reuse", action="store_true",
                        help="re-read a run that already finished with exactly this config instead of training it")
    args, overrides = parser.parse_known_args(argv)
    prov = record("merge_fidelity.py", "cpu", argv)
    runs = train_runs(args.recipe, args.seed, args.runs, overrides, args.reuse)
    adapters = {method: adapter_scores(run_dir) for method, run_dir in runs.items()}
    cfg = {method: read_run_config(run_dir) for method, run_dir in runs.items()}
    rows, rounding = [], None
    for method, folder, label, dtype, onto_16bit in MERGES:
        out = args.runs / f"seed-{args.seed}" / "merged" / folder
        shutil.rmtree(out, ignore_errors=True)  # this script's own output from an earlier run
        out.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if dtype is None:
            info = merge_nearest(runs[method], out, cfg[method])
            rounding = info["rounding"]
        else:
            base_16bit = str(ensure_checkpoint(cfg[method])) if onto_16bit else None
            info = merge(runs[method], out, base_16bit, dtype, check=True)
        seconds = time.perf_counter() - started
        check = next(iter(info["merge_error"].values()))  # the base merged onto, held to TOLERANCE
        rows.append({"run": method, "label": label, "dtype": info["dtype"], "onto_16bit": onto_16bit,
                     "seconds": seconds, "check": check, "all_checks": info["merge_error"],
                     "held_out": merged_scores(out, cfg[method])})
    recipe_cfg = cfg["qlora"]
    result = {**prov, "recipe": args.recipe, "steps": recipe_cfg.train.steps, "seed": args.seed,
              "eval_rows": rows[0]["held_out"]["eval_rows"], "positions": adapters["qlora"]["positions"],
              "adapters": adapters, "merges": rows, "rounding": rounding}
    text = markdown(result)
    print("\n" + text)
    write_result(args.results / "merge-cpu", result, text)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
