"""How close is each 4-bit base to the 16-bit one before any training? A cheap screen for the QLoRA variants.

    nice -n 10 python benchmarks/quant_screen.py [RECIPE] [--methods qlora,qlora-bs32,...] [--rows 48]

For each method of benchmarks/quality.py the model is built as training builds it (qlora.training.assemble.build_model:
the base with its block size and kept layers, the adapters with their initialisation, LoftQ's included) and scored,
untrained, on the recipe's held-out split: the held-out loss the quality table shows "before training", and the mean
KL divergence from the 16-bit model's next-token distribution over every position of the first --rows held-out rows
(prompt and answer). The KL measures the rounding itself; the held-out loss only the probability of this task's bare
answers, which an untrained chat model gives little and which rounding moves either way. Base-weight bytes are the
frozen weights as loaded. Writes benchmarks/results/quant-screen-<device>.{md,json}; no training, minutes per method.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import header, record, write_result  # noqa: E402  (a sibling script, not a package)
from quality import DEFAULTS, METHODS  # noqa: E402

from qlora import cli  # noqa: E402  (one line and its exit status for each ending)
from qlora.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def log_probs(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """fp32 next-token log-probabilities at every position of each batch, in CPU memory."""
    device = next(model.parameters()).device
    return [model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
            .logits.float().log_softmax(-1).cpu() for b in batches]


@torch.no_grad()
def mean_kl(reference: list[torch.Tensor], model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """KL(16-bit || this model) per real token, averaged over every non-padding position."""
    total = tokens = 0.0
    for ref, ours, batch in zip(reference, log_probs(model, batches), batches, strict=True):
        kl = (ref.exp() * (ref - ours)).sum(-1)
        mask = batch["attention_mask"].bool()
        total, tokens = total + float(kl[mask].sum()), tokens + int(mask.sum())
    return total / tokens


def screen(recipe: str, method: str, overrides: list[str], batches: list[dict], reference: list[torch.Tensor] | None,
           ) -> tuple[dict, list[torch.Tensor] | None]:
    """Build one method's untrained model and score it; return its numbers (and its log-probs, for 16-bit LoRA)."""
    from qlora.config import apply_overrides, load_recipe
    from qlora.memory.readings import tensor_categories
    from qlora.training.assemble import prepare
    from qlora.training.step import evaluate

    cfg = apply_overrides(load_recipe(ROOT / recipe), [*overrides, *DEFAULTS, *METHODS[method][2]])
    run = prepare(cfg)
    model = run["model"].eval()
    held = evaluate(model, run["eval_rows"], cfg, run["tokenizer"].pad_token_id, run["device"])
    weights = tensor_categories(model)
    out = {"eval_loss": held["eval_loss"], "eval_exact_match": held["eval_exact_match"],
           "base_bytes": weights["quantized_weights"] + weights["unquantized_weights"],
           "kept_16bit": list(cfg.quant.keep_16bit)}
    if reference is None:
        return out, log_probs(model, batches)
    out["kl"] = mean_kl(reference, model, batches)
    return out, None


def markdown(result: dict) -> str:
    lines = header(f"4-bit bases before training ({result['device']})", result, result["device"])
    lora = result["methods"]["lora"]
    lines += [f"Recipe `{result['recipe']}`, untrained (adapters as initialised: zero, or LoftQ's correction). KL: "
              f"mean KL divergence from the 16-bit model per token, over every position of {result['rows']} held-out "
              f"rows ({result['tokens']} tokens). Held-out loss and exact match: the recipe's held-out split. Base "
              "weights: the frozen weights as loaded (4-bit layers with their state, the rest in the compute dtype).",
              "", "| method | KL to 16-bit | held-out loss | exact match | base weights | vs QLoRA | kept in 16-bit |",
              "|---|---|---|---|---|---|---|"]
    plain = result["methods"].get("qlora", lora)["base_bytes"]
    for method, m in result["methods"].items():
        kl = f"{m['kl']:.4f}" if "kl" in m else "0 (reference)"
        lines.append(f"| {METHODS[method][0]} | {kl} | {m['eval_loss']:.4f} | {100 * m['eval_exact_match']:.1f}% | "
                     f"{m['base_bytes'] / 2**20:.1f} MiB | {100 * (m['base_bytes'] / plain - 1):+.1f}% | "
                     f"{len(m['kept_16bit']) or ''} |")
    kept = {m: v["kept_16bit"] for m, v in result["methods"].items() if v["kept_16bit"]}
    for method, names in kept.items():
        lines.append("")
        lines.append(f"{METHODS[method][0]} kept: " + ", ".join(f"`{n.removeprefix('model.')}`" for n in names) + ".")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/smollm2_135m.py")
    parser.add_argument("--methods", default="qlora,qlora-loftq,qlora-loftq3,qlora-bs32,qlora-keep5,qlora-keep10,"
                                             "qlora-keep5-bs32", help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--rows", type=int, default=48, help="held-out rows the KL is measured on")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args, overrides = parser.parse_known_args(argv)
    sys.path.insert(0, str(ROOT))
    from qlora.base.load import load_tokenizer, resolve_device
    from qlora.config import apply_overrides, load_recipe
    from qlora.data.batches import collate
    from qlora.data.splits import load_splits

    methods = [m for m in args.methods.split(",") if m != "lora"]
    unknown = [m for m in methods if m not in METHODS or m == "full"]
    if unknown:
        raise ConfigError(f"--methods: {', '.join(unknown)} cannot be screened; use some of "
                         f"{', '.join(m for m in METHODS if m not in ('full', 'lora'))}")
    base = apply_overrides(load_recipe(ROOT / args.recipe), overrides)
    tokenizer = load_tokenizer(base.model.path)
    _, held_out = load_splits(base.data, tokenizer, base.train.seed)
    rows = held_out[:args.rows]
    batches = [collate(rows[i:i + base.train.batch_size], tokenizer.pad_token_id)
               for i in range(0, len(rows), base.train.batch_size)]
    results, reference = {}, None
    for method in ["lora", *methods]:  # 16-bit LoRA first: its log-probs are the reference
        print(f"== {METHODS[method][0]}", flush=True)
        results[method], probs = screen(args.recipe, method, overrides, batches, reference)
        reference = reference or probs
        print({k: v for k, v in results[method].items() if k != "kept_16bit"}, flush=True)
    device = resolve_device(base.train.device).type
    result = {**record("quant_screen.py", device, argv), "recipe": args.recipe, "device": device,
              "rows": len(rows), "tokens": sum(int(b["attention_mask"].sum()) for b in batches), "methods": results}
    text = markdown(result)
    print("\n" + text)
    write_result(args.results / f"quant-screen-{device}", result, text)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
