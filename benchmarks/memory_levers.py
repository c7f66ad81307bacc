"""What each memory lever saves, and the longest context a recipe trains in a memory budget (issue 4).

    python benchmarks/memory_levers.py --size 8b --seq 2048 --max-context     # GPU: real numbers
    python benchmarks/memory_levers.py --size 70b --seq 2048 --max-context
    python benchmarks/memory_levers.py --size tiny --max-context              # CPU: the machinery, in about a minute

Every probe is one child process that builds our trainer's model for the recipe plus overrides, runs
`--probe-steps` full training steps (forward, backward, optimizer step; the first allocates the optimizer state) on a
random batch of `--seq` tokens, and reports its peak: on CUDA what a user compares with the card (PyTorch's peak
reserved + memory outside its allocator, CUDA context included), on CPU the peak resident set. A CUDA out-of-memory
error, or a peak over `--budget-gib`, is a failure.

Levers are measured one at a time against a baseline with every lever off except gradient checkpointing (the
trainer's default), then all together as the recipe sets them. transformers' own synchronous offload
(`activation_checkpointing_enable(offload=True)`) runs beside ours. `--max-context` bisects the sequence length,
in steps of `--granularity`, for the recipe as it is (plus any --override).

Writes benchmarks/results/memory-levers-<cpu|cuda>-<size>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import header, record, write_result  # noqa: E402
from throughput import (  # noqa: E402  (a sibling script, not a package)
    RESULTS,
    ROOT,
    base_config,
    build_ours,
    card_peak,
    reset_peak,
    synthetic_batch,
)

BASELINE = ["--train.gradient_checkpointing=true", "--train.offload_activations=false", "--train.loss_chunk_size=0",
            "--train.liger_ce=false", "--quant.quantize_lm_head=false", "--model.embeddings_on_cpu=false",
            "--train.optimizer=paged_adamw_32bit", "--train.reuse_dequant=false"]


def levers(chunk: int, cuda: bool) -> dict[str, dict]:
    """Name -> probe spec: overrides on top of BASELINE (or the recipe as is), and whether to use HF's offload."""
    out = {
        "baseline (checkpointing only)": {},
        "no gradient checkpointing": {"overrides": ["--train.gradient_checkpointing=false"]},
        "offload_activations (ours, async)": {"overrides": ["--train.offload_activations=true"]},
        "offload (transformers 5, sync)": {"hf_offload": True},
        f"loss_chunk_size={chunk}": {"overrides": [f"--train.loss_chunk_size={chunk}"]},
        "liger_ce": {"overrides": ["--train.liger_ce=true"]},
        "quantize_lm_head": {"overrides": ["--quant.quantize_lm_head=true"]},
        "embeddings_on_cpu": {"overrides": ["--model.embeddings_on_cpu=true"]},
        "paged_adamw_8bit": {"overrides": ["--train.optimizer=paged_adamw_8bit"]},
        "reuse_dequant (a speed lever's memory cost)": {"overrides": ["--train.reuse_dequant=true"]},
        "recipe as configured": {"recipe": True},
    }
    if not cuda:
        del out["liger_ce"]  # Triton kernels: CUDA only
        del out["offload (transformers 5, sync)"]  # asks for pinned memory, which needs an accelerator
    return out


# --- the child: one probe ---

def probe(args: argparse.Namespace, spec: dict) -> dict:
    overrides = ([] if spec.get("recipe") else BASELINE) + spec.get("overrides", []) + args.override
    cfg = base_config(args.size, overrides)

    def hf_offload(model: torch.nn.Module) -> None:
        # transformers' own offload: torch's save_on_cpu around each checkpoint, copies on the compute stream.
        model.activation_checkpointing_enable({"use_reentrant": False}, offload=True)

    try:
        model, step, device = build_ours(cfg, hf_offload if spec.get("hf_offload") else None)
        batch = synthetic_batch(model.get_input_embeddings().num_embeddings, args.batch, args.seq, device)
        reset_peak(device)
        for _ in range(args.probe_steps):
            step(batch)
        return {"ok": True, **card_peak(device)}
    except torch.cuda.OutOfMemoryError:
        return {"ok": False, "oom": True}


def run_probe(args: argparse.Namespace, spec: dict, seq: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--probe", json.dumps(spec),
           f"--seq={seq}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not found:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-10:]
        print("\n".join(tail))
        oom = "out of memory" in proc.stderr.lower()
        return {"ok": False, "oom": oom, "error": None if oom else (tail[-1] if tail else f"exit {proc.returncode}")}
    result = json.loads(found[-1].removeprefix("RESULT "))
    if result.get("ok") and result["peak_gib"] > args.budget_gib:
        result.update(ok=False, over_budget=True)
    return result


# --- the parent: lever table and max-context bisection ---

def lever_table(args: argparse.Namespace) -> dict[str, dict]:
    results = {}
    for name, spec in levers(args.chunk, torch.cuda.is_available()).items():
        print(f"== {name} at seq {args.seq}", flush=True)
        results[name] = run_probe(args, spec, args.seq)
        print(f"   {results[name]}", flush=True)
    return results


def max_context(args: argparse.Namespace) -> tuple[int | None, list[tuple[int, dict]]]:
    """Largest multiple of --granularity that trains within the budget, by doubling then bisection."""
    spec, probes = {"recipe": True}, []

    def fits(seq: int) -> bool:
        result = run_probe(args, spec, seq)
        probes.append((seq, result))
        print(f"   seq {seq:>7,}: {'fits' if result['ok'] else 'fails'} {result}", flush=True)
        return result["ok"]

    g = args.granularity
    lo = max(g, args.seq // g * g)
    print(f"== max context of the recipe, budget {args.budget_gib:.2f} GiB", flush=True)
    if not fits(lo):
        return None, probes
    hi = lo * 2
    while hi <= args.max_seq and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, args.max_seq + g)
    while hi - lo > g:  # invariant: lo fits, hi fails (or lies past --max-seq)
        mid = (lo + hi) // 2 // g * g
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, probes


def report(args: argparse.Namespace, prov: dict, device: str, levers_: dict, best: int | None, probes: list) -> str:
    lines = header(f"Memory levers: {args.size} on {device}", prov, device,
                   "CPU run at a tiny size: peak resident set of the whole process, most of it the Python and "
                   "library baseline. It shows the benchmark works; it says nothing about GPU memory.")
    if levers_:
        base = levers_.get("baseline (checkpointing only)", {}).get("peak_gib")
        lines += [f"batch {args.batch} x seq {args.seq}, {args.probe_steps} training steps per probe", "",
                  "| lever | peak GiB | vs baseline GiB |", "|---|---:|---:|"]
        for name, r in levers_.items():
            if r.get("ok") or r.get("over_budget"):
                delta = f"{r['peak_gib'] - base:+.3f}" if base is not None else "n/a"
                lines.append(f"| {name} | {r['peak_gib']:.3f} | {delta} |")
            else:
                lines.append(f"| {name} | {'out of memory' if r.get('oom') else 'failed: ' + str(r.get('error'))[:70]}"
                             " | |")
    if probes:
        found = f"{best:,} tokens" if best else "none"
        if best and best >= args.max_seq:
            found += " (the --max-seq cap: raise it to look further)"
        lines += ["", f"Max context of the recipe within {args.budget_gib:.2f} GiB: **{found}** "
                  f"(granularity {args.granularity})", "", "| seq | fits | peak GiB |", "|---:|---|---:|"]
        lines += [f"| {s:,} | {'yes' if r['ok'] else 'no'} | "
                  f"{r['peak_gib']:.3f} |" if "peak_gib" in r else f"| {s:,} | no | oom |" for s, r in probes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "8b", "70b"], default="tiny")
    parser.add_argument("--seq", type=int, help="sequence length of the lever table and bisection start "
                        "(default 128 tiny, 2048 otherwise)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, help="loss_chunk_size to measure (default 32 tiny, 1024 otherwise)")
    parser.add_argument("--probe-steps", type=int, default=2)
    parser.add_argument("--no-levers", action="store_true", help="skip the lever table")
    parser.add_argument("--max-context", action="store_true", help="bisect the longest sequence that fits")
    parser.add_argument("--budget-gib", type=float, help="memory budget (default: the GPU's total; 0.5 on CPU)")
    parser.add_argument("--granularity", type=int, help="bisection step (default 64 tiny, 1024 otherwise)")
    parser.add_argument("--max-seq", type=int, help="stop doubling here (default 2048 tiny, 262144 otherwise)")
    parser.add_argument("--override", action="append", default=[], metavar="--section.key=value",
                        help="recipe override for every probe, e.g. --override=--train.loss_chunk_size=4096")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    tiny = args.size == "tiny"
    cuda = torch.cuda.is_available()
    args.seq = args.seq or (128 if tiny else 2048)
    args.chunk = args.chunk or (32 if tiny else 1024)
    args.granularity = args.granularity or (64 if tiny else 1024)
    args.max_seq = args.max_seq or (2048 if tiny else 262_144)
    if args.budget_gib is None:
        args.budget_gib = torch.cuda.mem_get_info()[1] / 2**30 if cuda else 0.5

    if args.probe:
        print("RESULT " + json.dumps(probe(args, json.loads(args.probe))), flush=True)
        return

    levers_ = {} if args.no_levers else lever_table(args)
    best, probes = max_context(args) if args.max_context else (None, [])
    device = "cuda" if cuda else "cpu"
    prov = record("memory_levers.py", device)
    text = report(args, prov, device, levers_, best, probes)
    print("\n" + text)
    if args.no_write:
        return
    write_result(RESULTS / f"memory-levers-{device}-{args.size}",
                 {"device": device, "device_name": torch.cuda.get_device_name(0) if cuda else "cpu", **prov,
                  "setup": {k: v for k, v in vars(args).items() if k not in ("probe", "no_write")},
                  "levers": levers_, "max_context": best, "probes": probes}, text)


if __name__ == "__main__":
    main()
