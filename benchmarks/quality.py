"""Does a 4-bit base train adapters as good as a 16-bit one? Full fine-tuning, 16-bit LoRA and QLoRA, same everything.

    nice -n 10 python benchmarks/quality.py [RECIPE] [--section.key=value ...]

Each method trains from the same recipe (default recipes/smollm2_135m.py: SmolLM2-135M-Instruct on the shipped
destination task) with the same data, steps, batches and seed, in its own process (clean memory, honest wall time).
Only quant.method changes, and full fine-tuning's learning rate (--full-lr): every weight moving at a LoRA learning
rate overshoots. QLoRA runs twice: with zero-initialised adapters as in the paper, and with adapters started at the
rank-r correction of the NF4 rounding (lora.init=loftq, qlora/loftq.py). The held-out loss and the task metric
(teacher-forced exact match of the answer, qlora.loss.eval_stats) come from each run's final eval. The QLoRA
paper's claim (sec. 4: adapters on an NF4 + double quant base match 16-bit ones) is the target: QLoRA's held-out loss
within 2% of 16-bit LoRA's, exact match within 2 points.

Runs go to runs/quality/seed-<seed>/<method>; --reuse re-reads a run that already finished with the same config instead
of training it again. Writes benchmarks/results/quality-<device>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import header, record, write_result  # noqa: E402  (a sibling script, not a package)

ROOT = Path(__file__).resolve().parent.parent
# Each method: its label and the overrides that make it. Every LoRA run names its init, so a recipe's own choice
# cannot leak into another method.
METHODS = {"full": ("full fine-tuning", ["--quant.method=full", "--lora.init=zero"]),
           "lora": ("16-bit LoRA", ["--quant.method=lora", "--lora.init=zero"]),
           "qlora": ("QLoRA (NF4 + double quant)", ["--quant.method=qlora", "--lora.init=zero"]),
           "qlora-loftq": ("QLoRA, adapters started at the NF4 correction (lora.init=loftq)",
                           ["--quant.method=qlora", "--lora.init=loftq"])}
QLORA = ("qlora", "qlora-loftq")  # each is held to the target against 16-bit LoRA
TARGET_LOSS_REL, TARGET_EM_POINTS = 0.02, 2.0


def train_one(recipe: str, method: str, run_dir: Path, overrides: list[str]) -> float:
    """Train one run in a child process, its output teed to <run_dir>.log; return the wall seconds."""
    cmd = [sys.executable, "-m", "qlora.train", recipe, *overrides, f"--output.dir={run_dir}", "--overwrite"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n== {METHODS[method][0]}: {shlex.join(cmd)}", flush=True)
    started = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if "it/s]" not in line and "s/it]" not in line:  # progress bars stay in the log only
                print(line, end="", flush=True)
    if proc.wait():
        raise SystemExit(f"{method} training failed (exit {proc.returncode}): see {run_dir.with_suffix('.log')}")
    return time.perf_counter() - started


def read_run(run_dir: Path, seconds: float | None) -> dict:
    """Final and per-eval metrics from metrics.jsonl, trainable parameters from the training log."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if "eval_loss" in r]
    log = run_dir.with_suffix(".log").read_text()
    trainable = re.search(r"trainable ([\d,]+) of ([\d,]+) parameters", log)
    steps = [r for r in records if "tokens_per_s" in r]
    return {"eval_loss": evals[-1]["eval_loss"], "eval_ppl": evals[-1]["eval_ppl"],
            "eval_exact_match": evals[-1]["eval_exact_match"], "before": evals[0],
            "curve": [[r["step"], r["eval_loss"], r["eval_exact_match"]] for r in evals],
            "train_loss_last": steps[-1]["loss"] if steps else None,
            "trainable_params": int(trainable.group(1).replace(",", "")) if trainable else None,
            "total_params": int(trainable.group(2).replace(",", "")) if trainable else None,
            "wall_seconds": seconds}


def verdict(lora: dict[int, dict], qlora: dict[int, dict]) -> dict:
    """A QLoRA method against 16-bit LoRA over the same seeds: the gaps of the means, held to the target, and the
    paired gap of each seed (same data order, same adapter init draw)."""
    seeds = sorted(lora.keys() & qlora.keys())
    lora_loss, qlora_loss = (mean([runs[s]["eval_loss"] for s in seeds]) for runs in (lora, qlora))
    lora_em, qlora_em = (mean([runs[s]["eval_exact_match"] for s in seeds]) for runs in (lora, qlora))
    loss_rel, em_points = qlora_loss / lora_loss - 1, 100 * (qlora_em - lora_em)
    return {"seeds": seeds, "loss_rel_gap": loss_rel, "em_points_gap": em_points,
            "loss_within_target": abs(loss_rel) <= TARGET_LOSS_REL,
            "em_within_target": abs(em_points) <= TARGET_EM_POINTS,
            "paired_loss_rel_gaps": [qlora[s]["eval_loss"] / lora[s]["eval_loss"] - 1 for s in seeds],
            "paired_em_points_gaps": [100 * (qlora[s]["eval_exact_match"] - lora[s]["eval_exact_match"])
                                      for s in seeds]}


def spread(runs: dict[int, dict]) -> float:
    """Seed-to-seed spread of one method's held-out loss: (max - min) / mean."""
    losses = [run["eval_loss"] for run in runs.values()]
    return (max(losses) - min(losses)) / mean(losses)


def markdown(result: dict, plot_name: str) -> str:
    seeds = ", ".join(map(str, result["seeds"]))
    lines = header(f"Quality: full fine-tuning vs 16-bit LoRA vs QLoRA ({result['device']})", result,
                   result["device"])
    lines += [f"Recipe `{result['recipe']}`, {result['steps']} steps; seeds {seeds} (a seed sets the data order, the "
              "adapter init and dropout; every method gets the same ones); full fine-tuning lr "
              f"{result['full_lr']:g}.", "",
              "| method | seeds | held-out loss, mean (per seed) | exact match, mean (per seed) | before training "
              "(loss) | trainable params | wall time per run |", "|---|---|---|---|---|---|---|"]
    for method, runs in result["runs"].items():
        first = runs[min(runs)]
        losses = ", ".join(f"{run['eval_loss']:.4f}" for run in runs.values())
        ems = ", ".join(f"{100 * run['eval_exact_match']:.1f}" for run in runs.values())
        trainable = f"{first['trainable_params']:,}" if first["trainable_params"] else "?"
        walls = [run["wall_seconds"] for run in runs.values() if run["wall_seconds"]]
        wall = f"{mean(walls) / 60:.1f} min" if walls else "?"
        lines.append(f"| {METHODS[method][0]} | {len(runs)} | **{mean([r['eval_loss'] for r in runs.values()]):.4f}** "
                     f"({losses}) | **{100 * mean([r['eval_exact_match'] for r in runs.values()]):.1f}%** ({ems}) | "
                     f"{first['before']['eval_loss']:.4f} | {trainable} | {wall} |")
    lines.append("")
    for method, v in result["verdict"].items():
        ok = "within" if v["loss_within_target"] else "OUTSIDE"
        ok_em = "within" if v["em_within_target"] else "OUTSIDE"
        paired = ", ".join(f"{100 * g:+.0f}%" for g in v["paired_loss_rel_gaps"])
        paired_em = ", ".join(f"{g:+.1f}" for g in v["paired_em_points_gaps"])
        lines.append(f"- **{METHODS[method][0]}** vs 16-bit LoRA, means over seeds {', '.join(map(str, v['seeds']))}: "
                     f"held-out loss {100 * v['loss_rel_gap']:+.1f}% ({ok} the ±2% target), exact match "
                     f"{v['em_points_gap']:+.1f} points ({ok_em} the ±2 point target). Seed by seed: loss "
                     f"{paired}; exact match {paired_em} points.")
    before = {method: runs[min(runs)]["before"]["eval_loss"] for method, runs in result["runs"].items()}
    smallest = {m: min(v["paired_loss_rel_gaps"], key=abs) for m, v in result["verdict"].items()}
    lines += ["", f"Noise: 16-bit LoRA alone moves by {100 * spread(result['runs']['lora']):.0f}% of its mean "
              "held-out loss from one seed to another, so a few seeds cannot resolve a 2% gap; the exact-match score "
              f"moves in steps of 1/{result['eval_rows']} held-out rows. The smallest same-seed loss gap to 16-bit "
              "LoRA was " + ", ".join(f"{100 * g:+.0f}% for {METHODS[m][0].split(' (')[0].split(',')[0]}"
                                      + (" with lora.init=loftq" if m == "qlora-loftq" else "")
                                      for m, g in smallest.items()) + ".", "",
              f"Before any training, NF4 rounding alone moves the base's held-out loss from {before['lora']:.4f} "
              f"(16-bit) to {before['qlora']:.4f} (NF4 + double quant), "
              f"{100 * (before['qlora'] / before['lora'] - 1):+.0f}%; the adapters train on top of that gap."
              + (f" Started at the rank-{result['lora_r']} correction (lora.init=loftq), the same NF4 base scores "
                 f"{before['qlora-loftq']:.4f}." if "qlora-loftq" in before else ""),
              "Wall times are from runs on a machine shared with other jobs: indicative only.", "",
              f"![held-out loss and exact match per seed]({plot_name})", ""]
    return "\n".join(lines)


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_em) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = list(result["runs"])
    for x, method in enumerate(names):
        runs = result["runs"][method]
        losses = [run["eval_loss"] for run in runs.values()]
        ems = [100 * run["eval_exact_match"] for run in runs.values()]
        for ax, values in ((ax_loss, losses), (ax_em, ems)):
            ax.scatter([x] * len(values), values, alpha=0.6)
            ax.hlines(mean(values), x - 0.25, x + 0.25, color="black")
            for seed, value in zip(runs, values, strict=True):
                ax.annotate(f"s{seed}", (x, value), xytext=(6, -3), textcoords="offset points", fontsize=7)
    labels = [METHODS[m][0].split(" (")[0].replace(", adapters started at the NF4 correction", "\n+ LoftQ init")
              for m in names]
    ax_loss.set(ylabel="held-out loss per answer token (bar: mean)")
    ax_em.set(ylabel="held-out exact match, % (bar: mean)")
    for ax in (ax_loss, ax_em):
        ax.set_xticks(range(len(names)), labels, fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{Path(result['recipe']).stem}: {result['steps']} steps, final held-out scores per seed "
                 f"({result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def eval_rows(cfg: object) -> int | str:
    """How many held-out rows the recipe scores (a file's line count; "?" for a split carved out of train)."""
    path = Path(cfg.data.eval or "")
    return sum(1 for line in path.open() if line.strip()) if cfg.data.eval and path.is_file() else "?"


def parse_seeds(text: str | None, methods: list[str], default: int) -> dict[str, list[int]]:
    """--seeds 0,1,2,full:0 -> every method on seeds 0, 1, 2 except full, on 0 alone."""
    items = [item for item in (text or "").split(",") if item]
    every = [int(item) for item in items if ":" not in item] or [default]
    chosen: dict[str, list[int]] = {}
    for item in (item for item in items if ":" in item):
        method, seed = item.split(":", 1)
        if method not in methods:
            raise SystemExit(f"--seeds {item}: {method} is not among --methods {','.join(methods)}")
        chosen.setdefault(method, []).append(int(seed))
    return {method: chosen.get(method, every) for method in methods}


def method_config(method: str, seed: int, overrides: list[str], full_lr: float | None) -> list[str]:
    """The overrides that make one run: the user's, the method's, the seed, and full fine-tuning's lr."""
    extra = [f"--train.lr={full_lr}"] if method == "full" and full_lr is not None else []
    return [*overrides, *METHODS[method][1], f"--train.seed={seed}", *extra]


def finished_with(run_dir: Path, cfg: object) -> bool:
    """Did `run_dir` finish training with exactly `cfg` (its output.dir aside)? Then --reuse re-reads it."""
    from qlora.eval import read_run_config

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file() or not run_dir.with_suffix(".log").is_file():
        return False
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not any(r.get("step") == cfg.train.steps and "eval_loss" in r for r in records):
        return False
    theirs, ours = read_run_config(run_dir).to_dict(), cfg.to_dict()
    theirs["output"], ours["output"] = {}, {}
    return theirs == ours


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/smollm2_135m.py")
    parser.add_argument("--full-lr", type=float, default=None,
                        help="learning rate for full fine-tuning (default: the recipe's lr / 10)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "quality",
                        help="where the runs go: <runs>/seed-<seed>/<method>")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--seeds", default=None,
                        help="comma-separated train.seed values, each method trained once per seed; "
                             "a method:seeds entry such as full:0 limits one method (default: the recipe's seed)")
    parser.add_argument("--reuse", action="store_true",
                        help="re-read a run that already finished with exactly this config instead of training it")
    args, overrides = parser.parse_known_args(argv)
    sys.path.insert(0, str(ROOT))
    from qlora.config import apply_overrides, load_recipe
    from qlora.model import resolve_device

    base = apply_overrides(load_recipe(ROOT / args.recipe), overrides)
    # Every weight moving at a LoRA learning rate overshoots; a tenth of it is the customary full fine-tuning rate.
    full_lr = args.full_lr if args.full_lr is not None else base.train.lr / 10
    device = resolve_device(base.train.device).type
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; use some of {', '.join(METHODS)}")
    if "lora" not in methods:  # every verdict, the noise line and the before-training line compare with it
        raise SystemExit(f"--methods {args.methods}: add lora, the reference every other method is held to "
                         "(with --reuse its finished runs are re-read, not trained)")
    seeds = parse_seeds(args.seeds, methods, base.train.seed)

    runs: dict[str, dict[int, dict]] = {m: {} for m in methods}
    for seed in sorted({s for values in seeds.values() for s in values}):
        for method in methods:
            if seed not in seeds[method]:
                continue
            run_overrides = method_config(method, seed, overrides, full_lr)
            run_dir = args.runs / f"seed-{seed}" / method
            timing = run_dir.with_suffix(".seconds")
            if args.reuse and finished_with(run_dir, apply_overrides(load_recipe(ROOT / args.recipe), run_overrides)):
                print(f"== {METHODS[method][0]}, seed {seed}: reusing {run_dir} (finished, same config)")
            else:
                timing.parent.mkdir(parents=True, exist_ok=True)
                timing.write_text(f"{train_one(args.recipe, method, run_dir, run_overrides)}\n")
            runs[method][seed] = read_run(run_dir, float(timing.read_text()) if timing.is_file() else None)

    result = {
        **record("quality.py", device, argv),
        "recipe": args.recipe, "steps": base.train.steps, "seeds": sorted({s for v in seeds.values() for s in v}),
        "full_lr": full_lr, "lora_r": base.lora.r, "device": device, "eval_rows": eval_rows(base),
        "runs": runs, "target": {"loss_rel": TARGET_LOSS_REL, "em_points": TARGET_EM_POINTS},
    }
    if "lora" in runs:
        result["verdict"] = {m: verdict(runs["lora"], runs[m]) for m in QLORA if m in runs}
    stem = args.results / f"quality-{device}"
    text = markdown(result, stem.with_suffix(".png").name)
    print("\n" + text)
    write_result(stem, result, text)
    plot(stem.with_suffix(".png"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
