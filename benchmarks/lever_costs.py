"""What each lever costs in step time: the figures of the plan's cost table (qlora/memory/costs.py), measured.

    python benchmarks/lever_costs.py                 # CPU: a small synthetic Llama (below), ~2 minutes on 2 cores
    python benchmarks/lever_costs.py --size 8b       # GPU: Llama-3.1-8B architecture, synthetic NF4, 1 x 2048 tokens

Each configuration is our trainer's step (benchmarks/throughput.py's `ours`) with every lever off and no checkpointing
(`plain`), then with checkpointing (how every recipe runs), then with one lever more. On a GPU each configuration runs
in a child process of its own (a clean allocator); on a CPU, where other work shares the cores and its load drifts
over minutes, all configurations are built in one child and timed round-robin, one step each per round, so that a
drift in load weighs on every configuration alike. A lever's cost is the time it adds as a share of the plain step:
(t(lever) - t(reference)) / t(plain), the reference being checkpointing alone for the levers that act within it;
negative for a lever that saves time. The batch shape (train.batch_size) is measured as one micro-batch of two rows
against checkpointing alone; its figure, 2 - t(2 rows) / t(1 row), is the share of a one-row step that does not grow
with the rows (qlora/memory/costs.py). The CPU model is small enough to measure in minutes and shaped like a Llama
(grouped-query attention, a gated MLP, a vocabulary 32x the hidden size, as Llama-3's is); the tiles and loss chunks
are a quarter of the row, so that they act.

Writes <out-dir>/lever-costs-<cpu|cuda>-<size>.{json,md}: the table's figures with the command, date and machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (sibling scripts, not a package)
from probes import CUT_SHORT, Deadline, ProbeLog, child_command, measured  # noqa: E402
from provenance import header, record, write_result  # noqa: E402

from qlora import cli  # noqa: E402  (one line and its exit status for each ending)

ROOT = Path(__file__).resolve().parent.parent
# The CPU model: 4 Llama layers of hidden 256 (8 heads, 4 KV heads), MLP 704, vocabulary 8192; 1 x 512 tokens.
SMALL = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4, "head_dim": 32, "vocab_size": 8192, "max_position_embeddings": 4096,
         "tie_word_embeddings": False}
# Every lever off, the plan too (throughput.AS_SET).
OFF = ["--train.offload_activations=false", "--train.tile_size=0", "--train.tile_projections=false",
       "--train.tile_norms=false", "--train.loss_chunk_size=0", "--train.optimizer_on_cpu=false",
       "--model.embeddings_on_cpu=false", "--quant.quantize_lm_head=false", "--train.batch_size=1"]
# Rows in the one micro-batch a configuration's step runs (1 unless named): the batch shape's figure is the share of
# a one-row step that a second row does not add, 2 - t(2 rows) / t(1 row), against checkpointing alone.
ROWS = {"train.batch_size": 2}


def configs(seq: int, layers: int) -> dict[str, tuple[str | None, list[str]]]:
    """name -> (the configuration it is measured against, overrides on top of OFF)."""
    gc = ["--train.gradient_checkpointing=true"]
    quarter = seq // 4
    return {
        "plain": (None, ["--train.gradient_checkpointing=false"]),
        "train.gradient_checkpointing": ("plain", gc),
        "train.checkpoint_every": ("train.gradient_checkpointing", [*gc, f"--train.checkpoint_every={layers}"]),
        "train.tile_size": ("train.gradient_checkpointing", [*gc, f"--train.tile_size={quarter}"]),
        "train.tile_projections": ("train.tile_size", [*gc, f"--train.tile_size={quarter}",
                                                       "--train.tile_projections=true"]),
        "train.tile_norms": ("train.tile_size", [*gc, f"--train.tile_size={quarter}", "--train.tile_norms=true"]),
        "train.loss_chunk_size": ("train.gradient_checkpointing", [*gc, f"--train.loss_chunk_size={quarter}"]),
        "train.offload_activations": ("train.gradient_checkpointing", [*gc, "--train.offload_activations=true"]),
        "train.optimizer_on_cpu": ("train.gradient_checkpointing", [*gc, "--train.optimizer_on_cpu=true"]),
        "model.embeddings_on_cpu": ("train.gradient_checkpointing", [*gc, "--model.embeddings_on_cpu=true"]),
        "train.reuse_dequant": ("train.gradient_checkpointing", [*gc, "--train.reuse_dequant=true"]),
        "train.dequant_once": ("train.gradient_checkpointing", [*gc, "--train.dequant_once=true"]),
        "train.fuse_lora_add": ("train.gradient_checkpointing", [*gc, "--train.fuse_lora_add=true"]),
        "train.fuse_lora": ("train.gradient_checkpointing", [*gc, "--train.fuse_lora=true"]),
        "train.liger_kernels": ("train.gradient_checkpointing", [*gc, "--train.liger_kernels=true"]),
        "train.liger_ce": ("train.gradient_checkpointing", [*gc, "--train.liger_ce=true"]),
        "train.batch_size": ("train.gradient_checkpointing", [*gc, f"--train.batch_size={ROWS['train.batch_size']}"]),
    }


CUDA_ONLY = ("train.offload_activations", "train.optimizer_on_cpu", "model.embeddings_on_cpu", "train.liger_kernels",
             "train.liger_ce")


def costs(results: dict[str, dict], table: dict[str, tuple[str | None, list[str]]]) -> dict[str, float]:
    """Each lever's added time as a share of the plain step."""
    plain = results.get("plain", {}).get("step_s")
    out = {}
    for name, (reference, _) in table.items():
        got, ref = results.get(name, {}).get("step_s"), results.get(reference or "", {}).get("step_s")
        if name in ROWS and got and ref:
            out[name] = ROWS[name] - got / ref  # the batch shape's figure (qlora/memory/costs.py)
        elif plain and got and ref:
            out[name] = (got - ref) / plain
    return out


def round_robin(spec: argparse.Namespace, overrides: dict[str, list[str]]) -> dict[str, dict]:
    """Every configuration built in this process, then timed one step each per round; the median step of each."""
    import statistics
    import time

    steps = {}
    for name, extra in overrides.items():
        cfg = throughput.stack_config(spec, [*OFF, *extra])  # as throughput.measure builds a stack
        throughput.torch.manual_seed(0)
        model, step, device = throughput.build_ours(cfg)
        steps[name] = step
    batches = {rows: throughput.synthetic_batch(model.config.vocab_size, rows, spec.seq, device)
               for rows in {ROWS.get(name, spec.batch) for name in steps}}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(spec.warmup + spec.steps):
        for name, step in steps.items():
            started = time.perf_counter()
            step(batches[ROWS.get(name, spec.batch)])
            if i >= spec.warmup:
                times[name].append(time.perf_counter() - started)
    return {name: {"step_s": statistics.median(t), "steps_s": t} for name, t in times.items()}


def _base(args: argparse.Namespace, device: str, work: Path) -> list[str]:
    """The overrides every configuration runs with: on `small`, the tiny recipe's tokenizer and data on a synthetic
    model of SMALL's shape, its config.json written into `work`."""
    if args.size != "small":
        return [f"--train.device={device}"]
    from qlora.base.build import ensure_checkpoint
    from qlora.config import load_recipe

    tiny_dir = Path(ensure_checkpoint(load_recipe(ROOT / "recipes" / "tiny.py")))
    tiny = json.loads((tiny_dir / "config.json").read_text(encoding="utf-8"))
    (work / "config.json").write_text(json.dumps({**tiny, **SMALL}), encoding="utf-8")
    return ["--model.synthetic=true", f"--model.config_json={work / 'config.json'}", "--lora.r=16", "--lora.alpha=16",
            "--lora.dropout=0.05", "--train.device=cpu"]


def _measure(args: argparse.Namespace, log: ProbeLog, deadline: Deadline, names: list[str], table: dict,
             base: list[str], cuda: bool) -> dict[str, dict]:
    """Each configuration's step times, from children (on CPU one child, round-robin), logged as they come."""
    results: dict[str, dict] = {}
    groups = [names] if not cuda else [[name] for name in names]
    for group in groups:
        key = ",".join(group)
        print(f"== {key}", flush=True)
        cmd = child_command("lever_costs.py", ["--child", key, f"--size={args.size}", f"--seq={args.seq}",
                                               f"--steps={args.steps}", f"--warmup={args.warmup}",
                                               *[f"--override={o}" for o in base]])
        found = measured(log, deadline, key, cmd, args.probe_timeout) or {"error": "not run (deadline)"}
        # A group's child reports each configuration; one that failed fails every configuration of its group.
        results.update(found if len(group) > 1 and "error" not in found else {name: found for name in group})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["small", "8b", "70b"], default="small")
    parser.add_argument("--seq", type=int, help="tokens per row (default 512 small, 2048 otherwise)")
    parser.add_argument("--steps", type=int, default=9, help="timed steps per configuration (the median is kept)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", help="comma-separated configurations (default: all that act on this device)")
    parser.add_argument("--probe-timeout", type=float, default=300)
    parser.add_argument("--deadline", type=float)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    cuda = throughput.torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    args.seq = args.seq or (512 if args.size == "small" else 2048)
    layers = SMALL["num_hidden_layers"] if args.size == "small" else 4
    table = configs(args.seq, layers)
    if args.child:
        # throughput.measure's settings: ours, one row (ROWS), the rank and dropout of the recipe.
        spec = argparse.Namespace(size="tiny" if args.size == "small" else args.size, override=args.override,
                                  rank=None, batch=ROWS.get(args.child, 1), seq=args.seq, steps=args.steps,
                                  warmup=args.warmup,
                                  standard_prep="kbit", peak_tflops=None, profile=0, out_dir=args.out_dir)
        if "," in args.child:
            result = round_robin(spec, {name: table[name][1] for name in args.child.split(",")})
        else:
            result = throughput.measure(spec, "ours", [*OFF, *table[args.child][1]])
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    names = [n for n in table if cuda or n not in CUDA_ONLY] if not args.only else args.only.split(",")
    stem = Path(args.out_dir) / f"lever-costs-{device}-{args.size}"
    setup = {"size": args.size, "seq": args.seq, "steps": args.steps, "warmup": args.warmup}
    log, deadline = ProbeLog(stem.with_suffix(".probes.jsonl"), setup, args.fresh), Deadline(args.deadline)
    prov = record("lever_costs.py", device, argv)
    with tempfile.TemporaryDirectory(prefix="lever-costs-") as work:  # the small model's config.json, for the children
        results = _measure(args, log, deadline, names, table, _base(args, device, Path(work)), cuda)
    found = costs(results, table)
    lines = header(f"Lever costs: {args.size} on {device}", prov, device,
                   "CPU figures: what the plan's cost table uses on a CPU device, and until a GPU measures them, "
                   "in its order of the memory levers on CUDA (qlora/memory/costs.py says which).")
    lines += [f"1 x {args.seq} tokens, {args.warmup} warmup + {args.steps} timed steps (median) per configuration; "
              "cost = added step time / the plain step (no checkpointing, no lever); for train.batch_size (2 rows in "
              "one micro-batch) 2 - t(2 rows) / t(1 row), the share of a one-row step that does not grow with rows", "",
              "| configuration | step s | against | cost |", "|---|---:|---|---:|"]
    for name, r in results.items():
        reference = table[name][0] or ""
        step = f"{r['step_s']:.4f}" if "step_s" in r else f"failed: {r.get('error', '')[:60]}"
        cost = f"{found[name]:+.3f}" if name in found else ""
        lines.append(f"| {name} | {step} | {reference} | {cost} |")
    text = "\n".join(lines) + "\n"
    write_result(stem, {"device": device, **prov, "setup": setup, "results": results, "costs": found}, text)
    print(text)
    return CUT_SHORT if deadline.hit else 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
