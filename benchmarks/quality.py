"""Does a 4-bit base train adapters as good as a 16-bit one? Full fine-tuning, 16-bit LoRA and QLoRA, same everything.

    nice -n 10 python benchmarks/quality.py [RECIPE] [--section.key=value ...]

Each method trains from the same recipe (default recipes/smollm2_135m.py: SmolLM2-135M-Instruct on the shipped
destination task) with the same data, steps, batches and seed, in its own process (clean memory, honest wall time).
Only quant.method changes, and full fine-tuning's learning rate (--full-lr): every weight moving at a LoRA learning
rate overshoots. The held-out loss and the task metric (teacher-forced exact match of the answer, qlora.loss.eval_stats)
come from each run's final eval. The QLoRA paper's claim (sec. 4: adapters on an NF4 + double quant base match 16-bit
ones) is the target: QLoRA's held-out loss within 2% of 16-bit LoRA's, exact match within 2 points.

Writes benchmarks/results/quality-<device>.{md,json,png}; --report-only re-reads finished runs without training.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"full": "full fine-tuning", "lora": "16-bit LoRA", "qlora": "QLoRA (NF4 + double quant)"}
TARGET_LOSS_REL, TARGET_EM_POINTS = 0.02, 2.0


def train_one(recipe: str, method: str, run_dir: Path, overrides: list[str], full_lr: float | None) -> float:
    """Train one method in a child process, its output teed to <run_dir>.log; return the wall seconds."""
    cmd = [sys.executable, "-m", "qlora.train", recipe, *overrides, f"--quant.method={method}",
           f"--output.dir={run_dir}", "--overwrite"]
    if method == "full" and full_lr is not None:
        cmd.append(f"--train.lr={full_lr}")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n== {METHODS[method]}: {shlex.join(cmd)}", flush=True)
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


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if git("status", "--porcelain") else "")


def machine(device: str) -> str:
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return f"{cpu}, {os.cpu_count()} cores, torch using {torch.get_num_threads()} threads{gpu}"


def verdict(runs: dict) -> dict:
    lora, qlora = runs["lora"], runs["qlora"]
    loss_rel = (qlora["eval_loss"] - lora["eval_loss"]) / lora["eval_loss"]
    em_points = 100 * (qlora["eval_exact_match"] - lora["eval_exact_match"])
    return {"loss_rel_gap": loss_rel, "em_points_gap": em_points,
            "loss_within_target": abs(loss_rel) <= TARGET_LOSS_REL,
            "em_within_target": abs(em_points) <= TARGET_EM_POINTS}


def write_markdown(path: Path, result: dict) -> None:
    v = result["verdict"]
    lines = [f"# Quality: full fine-tuning vs 16-bit LoRA vs QLoRA ({result['device']})", "",
             f"- date: {result['date']}", f"- command: `{result['command']}`",
             f"- recipe: `{result['recipe']}`; {result['steps']} steps, seed {result['seed']}, identical data and "
             f"batches for every method; full fine-tuning lr {result['full_lr']:g}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}; "
             f"qlora {result['commit']}",
             f"- machine: {result['machine']}", "",
             "| method | held-out loss | perplexity | exact match | before training (loss / EM) | trainable params "
             "| wall time |", "|---|---|---|---|---|---|---|"]
    for method, run in result["runs"].items():
        trainable = f"{run['trainable_params']:,}" if run["trainable_params"] else "?"
        wall = f"{run['wall_seconds'] / 60:.1f} min" if run["wall_seconds"] else "?"
        lines.append(f"| {METHODS[method]} | {run['eval_loss']:.4f} | {run['eval_ppl']:.3f} | "
                     f"{100 * run['eval_exact_match']:.1f}% | {run['before']['eval_loss']:.4f} / "
                     f"{100 * run['before']['eval_exact_match']:.1f}% | {trainable} | {wall} |")
    ok = "within" if v["loss_within_target"] else "OUTSIDE"
    ok_em = "within" if v["em_within_target"] else "OUTSIDE"
    lora, qlora = result["runs"]["lora"]["before"], result["runs"]["qlora"]["before"]
    lines += ["", f"QLoRA vs 16-bit LoRA: held-out loss {100 * v['loss_rel_gap']:+.2f}% ({ok} the ±2% target), "
              f"exact match {v['em_points_gap']:+.1f} points ({ok_em} the ±2 point target).", "",
              f"Before any training, NF4 rounding alone moves the base's held-out loss from {lora['eval_loss']:.4f} "
              f"(16-bit) to {qlora['eval_loss']:.4f} (NF4 + double quant), "
              f"{100 * (qlora['eval_loss'] / lora['eval_loss'] - 1):+.0f}%; the adapters train on top of that gap.",
              "Wall times are from one run each on a machine shared with other jobs: indicative only.", "",
              f"![held-out loss and exact match during training]({path.with_suffix('.png').name})", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, (ax_loss, ax_em) = plt.subplots(1, 2, figsize=(11, 4))
    for method, run in result["runs"].items():
        steps, loss, em = zip(*run["curve"], strict=True)
        ax_loss.plot(steps, loss, marker="o", label=f"{METHODS[method]}: {run['eval_loss']:.3f}")
        ax_em.plot(steps, [100 * e for e in em], marker="o",
                   label=f"{METHODS[method]}: {100 * run['eval_exact_match']:.1f}%")
    # Log scale: the gaps that matter lie between losses of 0.05 and 0.2, after a first eval near 4.
    ax_loss.set(xlabel="optimizer step", ylabel="held-out loss per answer token (log)", yscale="log")
    ax_loss.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax_loss.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}" if f"{y:g}"[0] in "25" else ""))
    ax_em.set(xlabel="optimizer step", ylabel="held-out exact match (%)", ylim=(-2, 102))
    for ax in (ax_loss, ax_em):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(result['recipe']).stem}: {result['steps']} steps, seed {result['seed']} ({result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/smollm2_135m.py")
    parser.add_argument("--full-lr", type=float, default=None,
                        help="learning rate for full fine-tuning (default: the recipe's lr / 10)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "quality", help="where the three runs go")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--methods", default="full,lora,qlora", help="train only these; the rest are re-read")
    parser.add_argument("--report-only", action="store_true", help="re-read finished runs, train nothing")
    args, overrides = parser.parse_known_args(argv)
    sys.path.insert(0, str(ROOT))
    from qlora.config import apply_overrides, load_recipe
    from qlora.model import resolve_device

    cfg = apply_overrides(load_recipe(ROOT / args.recipe), overrides)
    # Every weight moving at a LoRA learning rate overshoots; a tenth of it is the customary full fine-tuning rate.
    full_lr = args.full_lr if args.full_lr is not None else cfg.train.lr / 10
    device = resolve_device(cfg.train.device).type
    runs, chosen = {}, set(args.methods.split(","))
    for method in METHODS:
        run_dir = args.runs / method
        seconds = None
        if method in chosen and not args.report_only:
            seconds = train_one(args.recipe, method, run_dir, overrides, full_lr)
        timing = run_dir.with_suffix(".seconds")
        if seconds is not None:
            timing.write_text(f"{seconds}\n")
        elif timing.is_file():
            seconds = float(timing.read_text())
        runs[method] = read_run(run_dir, seconds)

    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "recipe": args.recipe, "steps": cfg.train.steps, "seed": cfg.train.seed, "full_lr": full_lr,
        "device": device,
        "versions": {name: version(name) for name in ("torch", "transformers", "bitsandbytes", "safetensors")},
        "commit": git_commit(), "machine": machine(device),
        "runs": runs, "target": {"loss_rel": TARGET_LOSS_REL, "em_points": TARGET_EM_POINTS},
    }
    result["verdict"] = verdict(runs)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"quality-{device}"
    if args.report_only and stem.with_suffix(".json").is_file():  # the runs are the earlier ones: keep their record
        earlier = json.loads(stem.with_suffix(".json").read_text())
        result.update({k: earlier[k] for k in ("date", "command", "commit", "machine", "full_lr") if k in earlier})
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(stem.with_suffix(".md"), result)
    plot(stem.with_suffix(".png"), result)
    print("\n" + stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
