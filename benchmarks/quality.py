"""Does a 4-bit base train adapters as good as a 16-bit one, and which changes to the 4-bit base close the gap?

    nice -n 10 python benchmarks/quality.py [RECIPE] [--methods lora,qlora,...] [--seeds 0,1,2] [--section.key=value]

Each method trains from the same recipe (default recipes/smollm2_135m.py: SmolLM2-135M-Instruct on the shipped
destination task) with the same data, steps, batches and seed, in its own process (clean memory, honest wall time).
Only the method's own settings change (METHODS), and full fine-tuning's learning rate (--full-lr): every weight
moving at a LoRA learning rate overshoots. Besides full fine-tuning, 16-bit LoRA and QLoRA as in the paper, the QLoRA
variants change the 4-bit base: adapters started at LoftQ's correction (lora.init=loftq, one or three alternating
steps), blocks of 32 (quant.blocksize), the layers whose rounding costs most kept in 16-bit (quant.keep_16bit_budget),
and combinations. The held-out loss and the task metric (teacher-forced exact match of the answer,
qlora.training.loss.eval_stats) come from each run's final eval; base-weight bytes: its memory.json and the estimator.

Two targets: the QLoRA paper's claim (sec. 4: adapters on an NF4 + double quant base match 16-bit ones), held-out
loss within 2% of 16-bit LoRA's and exact match within 2 points; and issue 15's for a variant: close at least half of
standard QLoRA's held-out loss gap to 16-bit LoRA, keep its exact match, add at most 10% to the base weights.

Runs go to runs/quality/seed-<seed>/<method>; --reuse re-reads a run that already finished with the same config instead
of training it again; --earlier RESULT.json takes the (method, seed) runs not trained here from an earlier result of the
same recipe (said in the report, with the pairs trained both times side by side). Writes
benchmarks/results/quality-<device>.{md,json,png}.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, stdev

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import header, record, write_result  # noqa: E402  (a sibling script, not a package)

from qlora import cli  # noqa: E402  (one line and its exit status for each ending)
from qlora.errors import ConfigError, Stop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Each method: its label, a short name for plots and lists, and the overrides that make it. Every run names its init,
# block size and 16-bit budget (DEFAULTS), so a recipe's own choice cannot leak into another method.
DEFAULTS = ["--lora.init=zero", "--lora.loftq_iters=1", "--quant.blocksize=64", "--quant.keep_16bit_budget=0",
            "--quant.keep_16bit="]
KEEP5 = "--quant.keep_16bit_budget=0.05"
METHODS = {"full": ("full fine-tuning", "full FT", ["--quant.method=full"]),
           "lora": ("16-bit LoRA", "16-bit LoRA", ["--quant.method=lora"]),
           "qlora": ("QLoRA (NF4 + double quant)", "QLoRA", ["--quant.method=qlora"]),
           "qlora-loftq": ("QLoRA, adapters started at the NF4 correction (lora.init=loftq)", "QLoRA\n+ LoftQ init",
                           ["--quant.method=qlora", "--lora.init=loftq"]),
           "qlora-loftq3": ("QLoRA, LoftQ with 3 alternating steps (lora.loftq_iters=3)", "QLoRA\n+ LoftQ x3",
                            ["--quant.method=qlora", "--lora.init=loftq", "--lora.loftq_iters=3"]),
           "qlora-bs32": ("QLoRA, blocks of 32 (quant.blocksize=32)", "QLoRA\nblocks of 32",
                          ["--quant.method=qlora", "--quant.blocksize=32"]),
           "qlora-keep5": ("QLoRA, most sensitive layers in 16-bit (quant.keep_16bit_budget=0.05)",
                           "QLoRA\n+5% in 16-bit", ["--quant.method=qlora", KEEP5]),
           "qlora-keep10": ("QLoRA, most sensitive layers in 16-bit (quant.keep_16bit_budget=0.1)",
                            "QLoRA\n+10% in 16-bit", ["--quant.method=qlora", "--quant.keep_16bit_budget=0.1"]),
           "qlora-keep5-bs32": ("QLoRA, blocks of 32 and the most sensitive layers in 16-bit (quant.blocksize=32, "
                                "quant.keep_16bit_budget=0.05)", "QLoRA, blocks of 32\n+5% in 16-bit",
                                ["--quant.method=qlora", "--quant.blocksize=32", KEEP5])}
QLORA = [m for m in METHODS if m.startswith("qlora")]  # each is held to the target against 16-bit LoRA
TARGET_LOSS_REL, TARGET_EM_POINTS = 0.02, 2.0
# Issue 15: a variant should close at least half of QLoRA's held-out loss gap to 16-bit LoRA, keep QLoRA's exact
# match, and add at most 10% to the base's weights.
TARGET_GAP_CLOSED, TARGET_WEIGHTS_REL = 0.5, 0.10


def train_one(recipe: str, method: str, run_dir: Path, overrides: list[str]) -> float:
    """Train one run in a child process, its output teed to <run_dir>.log; return the wall seconds."""
    cmd = [sys.executable, "-m", "qlora.train", recipe, *overrides, f"--output.dir={run_dir}", "--overwrite"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n== {METHODS[method][0]}: {shlex.join(cmd)}", flush=True)
    started = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        for line in proc.stdout:
            log.write(line)
            if "it/s]" not in line and "s/it]" not in line:  # progress bars stay in the log only
                print(line, end="", flush=True)
    if proc.wait():
        status = proc.returncode if proc.returncode > 0 else 128 - proc.returncode  # -9: killed by SIGKILL
        raise Stop(status, f"{method} training failed (exit {status}): see {run_dir.with_suffix('.log')}")
    return time.perf_counter() - started


def read_run(run_dir: Path, seconds: float | None) -> dict:
    """Final and per-eval metrics from metrics.jsonl, trainable parameters from the training log."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    evals = [r for r in records if "eval_loss" in r]
    log = run_dir.with_suffix(".log").read_text(encoding="utf-8")
    trainable = re.search(r"trainable ([\d,]+) of ([\d,]+) parameters", log)
    steps = [r for r in records if "tokens_per_s" in r]
    return {**base_weights(run_dir), "eval_loss": evals[-1]["eval_loss"], "eval_ppl": evals[-1]["eval_ppl"],
            "eval_exact_match": evals[-1]["eval_exact_match"], "before": evals[0],
            "curve": [[r["step"], r["eval_loss"], r["eval_exact_match"]] for r in evals],
            "train_loss_last": steps[-1]["loss"] if steps else None,
            "trainable_params": int(trainable.group(1).replace(",", "")) if trainable else None,
            "total_params": int(trainable.group(2).replace(",", "")) if trainable else None,
            "wall_seconds": seconds}


def base_weights(run_dir: Path) -> dict[str, int]:
    """Bytes of the frozen base's weights: as this run held them (memory.json, once the adapters were attached:
    4-bit layers with their quantisation state, every other weight in the compute dtype), and as the estimator counts
    them for the same recipe on CUDA, where the dense weights are bf16."""
    from qlora.memory.arch import load_arch
    from qlora.memory.estimate import estimate
    from qlora.training.assemble import read_run_config

    held = json.loads((run_dir / "memory.json").read_text(encoding="utf-8"))["phases"]["lora_attached"]["categories"]
    cfg = read_run_config(run_dir)
    cuda = estimate(cfg, load_arch(cfg), cfg.quant.method, "cuda").components
    if cfg.quant.method == "full":  # every weight trains: the "base" is the model
        return {"base_bytes": held["unquantized_weights"], "base_bytes_cuda": cuda["unquantized_weights"]}
    return {"base_bytes": held["quantized_weights"] + held["unquantized_weights"],
            "base_bytes_cuda": cuda["quantized_weights"] + cuda["unquantized_weights"]}


def gap_closed(lora: float, qlora: float, variant: float) -> float:
    """The share of QLoRA's held-out loss gap to 16-bit LoRA that `variant` closes (1 = all of it)."""
    return (qlora - variant) / (qlora - lora)


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


def improvement(lora: dict[int, dict], qlora: dict[int, dict], variant: dict[int, dict]) -> dict:
    """A QLoRA variant against standard QLoRA and 16-bit LoRA over their common seeds: the share of the held-out loss
    gap it closes (of the means, and seed by seed), its exact match against QLoRA's, and what it adds to the base's
    weights; each held to issue 15's target."""
    seeds = sorted(lora.keys() & qlora.keys() & variant.keys())
    loss = {name: mean([runs[s]["eval_loss"] for s in seeds]) for name, runs in
            (("lora", lora), ("qlora", qlora), ("variant", variant))}
    closed = gap_closed(loss["lora"], loss["qlora"], loss["variant"])
    em_points = 100 * mean([variant[s]["eval_exact_match"] - qlora[s]["eval_exact_match"] for s in seeds])
    weights = {key: variant[seeds[0]][key] / qlora[seeds[0]][key] - 1 if variant[seeds[0]][key] else None
               for key in ("base_bytes", "base_bytes_cuda")}
    return {"seeds": seeds, "gap_closed": closed, "em_points_vs_qlora": em_points, "weights_rel": weights,
            "paired_gap_closed": [gap_closed(lora[s]["eval_loss"], qlora[s]["eval_loss"], variant[s]["eval_loss"])
                                  for s in seeds],
            "paired_em_points_vs_qlora": [100 * (variant[s]["eval_exact_match"] - qlora[s]["eval_exact_match"])
                                          for s in seeds],
            "meets_target": closed >= TARGET_GAP_CLOSED and em_points >= 0 and None not in weights.values()
            and max(weights.values()) <= TARGET_WEIGHTS_REL}


def take_earlier(runs: dict[str, dict[int, dict]], earlier: dict) -> dict:
    """Fill `runs` with an earlier result's runs (quality-<device>.json, same recipe and steps) for the (method, seed)
    pairs not trained here, marked "earlier"; return where they came from and, for the pairs trained both times, both
    final scores (a run on CPU is deterministic, so they show whether the earlier code still trains the same)."""
    taken, compared = [], []
    for method, by_seed in earlier["runs"].items():
        ours = runs.setdefault(method, {})
        here = [run for run in ours.values() if not run.get("earlier")]
        for key, run in sorted(by_seed.items(), key=lambda item: int(item[0])):
            seed = int(key)
            if seed in ours:
                compared.append({"method": method, "seed": seed,
                                 "eval_loss": [ours[seed]["eval_loss"], run["eval_loss"]],
                                 "eval_exact_match": [ours[seed]["eval_exact_match"], run["eval_exact_match"]]})
                continue
            # The base is the same for every seed of a method: its bytes come from a run trained here, if any.
            weights = {k: here[0][k] if here else None for k in ("base_bytes", "base_bytes_cuda")}
            ours[seed] = {**weights, **run, "earlier": True}
            taken.append([method, seed])
        runs[method] = dict(sorted(ours.items()))
    return {"date": earlier["date"], "command": earlier["command"], "versions": earlier["versions"], "taken": taken,
            "compared": compared}


def spread(runs: dict[int, dict]) -> float:
    """Seed-to-seed spread of one method's held-out loss: (max - min) / mean."""
    losses = [run["eval_loss"] for run in runs.values()]
    return (max(losses) - min(losses)) / mean(losses)


def short_name(method: str) -> str:
    return METHODS[method][1].replace("\n", " ")


def mib(n: int | None) -> str:
    return f"{n / 2**20:.1f} MiB" if n else "?"


def percent(share: float | None) -> str:
    return f"{100 * share:+.1f}%" if share is not None else "?"


def markdown(result: dict, plot_name: str) -> str:
    seeds = ", ".join(map(str, result["seeds"]))
    runs_of = result["runs"]
    lines = header(f"Quality: 16-bit LoRA vs QLoRA and its variants ({result['device']})", result, result["device"])
    lines += [f"Recipe `{result['recipe']}`, {result['steps']} steps; seeds {seeds} (a seed sets the data order, the "
              "adapter init and dropout; every method gets the same ones)"
              + (f"; full fine-tuning lr {result['full_lr']:g}" if "full" in runs_of else "") + ". Base weights: "
              "the frozen model's weights as the run held them (4-bit layers with their quantisation state, the rest "
              f"in {result['device']}'s compute dtype: fp32 on CPU), and as the estimator counts the same recipe on "
              "CUDA (the rest in bf16).", "",
              "| method | seeds | held-out loss, mean (per seed) | exact match, mean (per seed) | before training "
              "(loss) | base weights | on CUDA (bf16) | trainable params | wall time per run |",
              "|---|---|---|---|---|---|---|---|---|"]
    for method, runs in runs_of.items():
        first = runs[min(runs)]
        losses = ", ".join(f"{run['eval_loss']:.4f}" for run in runs.values())
        ems = ", ".join(f"{100 * run['eval_exact_match']:.1f}" for run in runs.values())
        trainable = f"{first['trainable_params']:,}" if first["trainable_params"] else "?"
        walls = [run["wall_seconds"] for run in runs.values() if run["wall_seconds"]]
        wall = f"{mean(walls) / 60:.1f} min" if walls else "?"
        lines.append(f"| {METHODS[method][0]} | {len(runs)} | **{mean([r['eval_loss'] for r in runs.values()]):.4f}** "
                     f"({losses}) | **{100 * mean([r['eval_exact_match'] for r in runs.values()]):.1f}%** ({ems}) | "
                     f"{first['before']['eval_loss']:.4f} | {mib(first['base_bytes'])} | "
                     f"{mib(first['base_bytes_cuda'])} | {trainable} | {wall} |")
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
    if result.get("improvement"):
        lines += ["", f"Against standard QLoRA (target: close at least {100 * TARGET_GAP_CLOSED:.0f}% of its held-out "
                  "loss gap to 16-bit LoRA, keep its exact match, add at most "
                  f"{100 * TARGET_WEIGHTS_REL:.0f}% to the base weights):", ""]
    for method, v in result.get("improvement", {}).items():
        paired = ", ".join(f"{100 * g:.0f}%" for g in v["paired_gap_closed"])
        paired_em = ", ".join(f"{g:+.1f}" for g in v["paired_em_points_vs_qlora"])
        w = v["weights_rel"]
        lines.append(f"- **{METHODS[method][0]}**: closes **{100 * v['gap_closed']:.0f}%** of the gap (of the means; "
                     f"seed by seed {paired}), exact match {v['em_points_vs_qlora']:+.1f} points vs QLoRA (seed by "
                     f"seed {paired_em}), base weights {percent(w['base_bytes'])} here, "
                     f"{percent(w['base_bytes_cuda'])} on CUDA: "
                     f"{'meets' if v['meets_target'] else 'does NOT meet'} the target.")
    before = {method: runs[min(runs)]["before"]["eval_loss"] for method, runs in runs_of.items()}
    lora_losses = [run["eval_loss"] for run in runs_of["lora"].values()]
    lines += ["", f"Noise: 16-bit LoRA alone moves by {100 * spread(runs_of['lora']):.0f}% of its mean held-out loss "
              f"from one seed to another (standard deviation {stdev(lora_losses) if len(lora_losses) > 1 else 0:.4f})"
              + (f", QLoRA by {100 * spread(runs_of['qlora']):.0f}%" if "qlora" in runs_of else "")
              + f"; the exact-match score moves in steps of 1/{result['eval_rows']} held-out rows. Same-seed "
              "comparisons (same data order, same adapter init draw) are the paired numbers above.", "",
              "Before any training (held-out loss of the base with zero adapters, or LoftQ's initial ones): "
              + ", ".join(f"{short_name(m)} {b:.4f}" for m, b in before.items()) + ".",
              "Wall times are from runs on a machine shared with other jobs: indicative only.", "",
              *earlier_lines(result.get("earlier")),
              f"![held-out loss and exact match per seed]({plot_name})", ""]
    return "\n".join(lines)


def earlier_lines(earlier: dict | None) -> list[str]:
    """What came from an earlier result (--earlier), and whether the runs trained both times agree."""
    if not earlier:
        return []
    taken: dict[str, list[int]] = {}
    for method, seed in earlier["taken"]:
        taken.setdefault(method, []).append(seed)
    v = earlier["versions"]
    pairs = "; ".join(f"{short_name(m)} seed {', '.join(map(str, seeds))}" for m, seeds in taken.items())
    lines = [f"Not trained again here, taken from the earlier result of {earlier['date'][:10]} (qlora {v['qlora']}, "
             f"transformers {v['transformers']}, `{earlier['command']}`): {pairs} (base weights not recorded then: ? "
             "where no run of the method was trained here)."]
    if earlier["compared"]:
        lines[-1] += " Trained both times, final held-out loss and exact match now vs then: " + "; ".join(
            f"{short_name(c['method'])} seed {c['seed']} {c['eval_loss'][0]:.4f} vs "
            f"{c['eval_loss'][1]:.4f}, {100 * c['eval_exact_match'][0]:.1f}% vs {100 * c['eval_exact_match'][1]:.1f}%"
            for c in earlier["compared"]) + "."
    return [*lines, ""]


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
    labels = [METHODS[m][1] for m in names]
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
    return sum(1 for line in path.open(encoding="utf-8") if line.strip()) if cfg.data.eval and path.is_file() else "?"


def parse_seeds(text: str | None, methods: list[str], default: int) -> dict[str, list[int]]:
    """--seeds 0,1,2,full:0 -> every method on seeds 0, 1, 2 except full, on 0 alone."""
    items = [item for item in (text or "").split(",") if item]
    every = [int(item) for item in items if ":" not in item] or [default]
    chosen: dict[str, list[int]] = {}
    for item in (item for item in items if ":" in item):
        method, seed = item.split(":", 1)
        if method not in methods:
            raise ConfigError(f"--seeds {item}: {method} is not among --methods {','.join(methods)}")
        chosen.setdefault(method, []).append(int(seed))
    return {method: chosen.get(method, every) for method in methods}


def method_config(method: str, seed: int, overrides: list[str], full_lr: float | None) -> list[str]:
    """The overrides that make one run: the user's, the method's, the seed, and full fine-tuning's lr."""
    extra = [f"--train.lr={full_lr}"] if method == "full" and full_lr is not None else []
    return [*overrides, *DEFAULTS, *METHODS[method][2], f"--train.seed={seed}", *extra]


def finished_with(run_dir: Path, cfg: object) -> bool:
    """Did `run_dir` finish training with exactly `cfg` (its output.dir aside)? Then --reuse re-reads it."""
    from qlora.training.assemble import read_run_config

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file() or not run_dir.with_suffix(".log").is_file():
        return False
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not any(r.get("step") == cfg.train.steps and "eval_loss" in r for r in records):
        return False
    theirs, ours = read_run_config(run_dir).to_dict(), cfg.to_dict()
    theirs["output"], ours["output"] = {}, {}
    if ours["quant"]["keep_16bit_budget"] and not ours["quant"]["keep_16bit"]:  # the run recorded what it chose
        ours["quant"]["keep_16bit"] = theirs["quant"]["keep_16bit"]
    return theirs == ours


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
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
    parser.add_argument("--earlier", type=Path, default=None,
                        help="an earlier quality-<device>.json of the same recipe and steps: its runs stand in for "
                             "the (method, seed) pairs not trained here, and are compared with those that are")
    parser.add_argument("--reuse", action="store_true",
                        help="re-read a run that already finished with exactly this config instead of training it")
    args, overrides = parser.parse_known_args(argv)
    sys.path.insert(0, str(ROOT))
    from qlora.base.load import resolve_device
    from qlora.config import apply_overrides, load_recipe

    base = apply_overrides(load_recipe(ROOT / args.recipe), overrides)
    # Every weight moving at a LoRA learning rate overshoots; a tenth of it is the customary full fine-tuning rate.
    full_lr = args.full_lr if args.full_lr is not None else base.train.lr / 10
    device = resolve_device(base.train.device).type
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; use some of {', '.join(METHODS)}")
    if "lora" not in methods:  # every verdict, the noise line and the before-training line compare with it
        raise ConfigError(f"--methods {args.methods}: add lora, the reference every other method is held to "
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
                timing.write_text(f"{train_one(args.recipe, method, run_dir, run_overrides)}\n", encoding="utf-8")
            seconds = float(timing.read_text(encoding="utf-8")) if timing.is_file() else None
            runs[method][seed] = read_run(run_dir, seconds)

    taken = None
    if args.earlier:
        earlier = json.loads(args.earlier.read_text(encoding="utf-8"))
        if (earlier["recipe"], earlier["steps"]) != (args.recipe, base.train.steps):
            raise ConfigError(f"--earlier {args.earlier}: its runs trained {earlier['recipe']} for {earlier['steps']} "
                              f"steps, not {args.recipe} for {base.train.steps}: use a result of the same recipe")
        taken = take_earlier(runs, earlier)
        runs = {m: runs[m] for m in METHODS if m in runs}
    result = {
        **record("quality.py", device, argv),
        "recipe": args.recipe, "steps": base.train.steps, "seeds": sorted({s for v in runs.values() for s in v}),
        "full_lr": full_lr, "lora_r": base.lora.r, "device": device, "eval_rows": eval_rows(base),
        "runs": runs, "target": {"loss_rel": TARGET_LOSS_REL, "em_points": TARGET_EM_POINTS},
    }
    if taken:
        result["earlier"] = taken
    result["verdict"] = {m: verdict(runs["lora"], runs[m]) for m in QLORA if m in runs}
    if "qlora" in runs:
        result["improvement"] = {m: improvement(runs["lora"], runs["qlora"], runs[m]) for m in QLORA
                                 if m in runs and m != "qlora"}
    stem = args.results / f"quality-{device}"
    text = markdown(result, stem.with_suffix(".png").name)
    print("\n" + text)
    write_result(stem, result, text)
    plot(stem.with_suffix(".png"), result)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
