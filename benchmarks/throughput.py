"""Tokens/s, peak memory and MFU: our trainer against the standard stack, side by side, in one run (issue 5).

    python benchmarks/throughput.py --size 8b             # GPU: Llama-3.1-8B architecture, synthetic NF4, seq 2048
    python benchmarks/throughput.py --size tiny           # CPU: the tiny Llama, seconds (a smoke test, not a claim)
    python benchmarks/throughput.py --size 8b --levers    # also ours with each speed lever on its own

Stacks, each in its own process (clean allocator, honest peak), all on the same base load, batch, sequence length,
rank, alpha, dropout and targets (every linear layer but lm_head):
    standard    what Trainer / SFTTrainer run with bf16=True, gradient_checkpointing=True and
                optim="paged_adamw_32bit": the bitsandbytes NF4 double-quant model, peft's
                prepare_model_for_kbit_training (upcasts the non-4-bit weights to fp32, checkpoints every decoder
                layer, non-reentrant; --standard-prep none skips the upcast), peft's bnb Linear4bit LoRA layers,
                the forward and model(labels=...) loss under bf16 autocast (SDPA), bitsandbytes PagedAdamW32bit,
                grad-norm clip 1.0 (Trainer's default)
    ours        training.assemble.build_model with the recipe's levers, loss_sum, the recipe's optimizer, same clip
    ours-lora16 ours on a 16-bit base (quant.method=lora): the QLoRA-vs-LoRA step-time ratio of issue 5
    ours-streamed  ours with the 4-bit base streamed from host memory (train.stream_base): its step time against
                the base resident, issue 25's <= 1.3 (not in the default --stacks)

The batch is random token ids with every token a label, so both stacks do the same work. MFU counts 6N FLOPs per
token (forward 2N, recompute 2N, input-gradient backward 2N; no weight gradients for a frozen base), N = every base
parameter, embeddings included, as issue 5's bound does (~16K tok/s for 8B at 790 TFLOP/s). Attention FLOPs are
left out, so MFU reads low at long context.

Each stack gets at most --probe-timeout seconds and the run --deadline seconds; each stack's figures are appended to
<stem>.probes.jsonl as they come and the report is rewritten after each, and a rerun with the same settings measures
only the stacks missing (--fresh starts over). The parent never touches CUDA: its context would count in the
children's peaks.

Writes <out-dir>/throughput-<cpu|cuda>-<size>.{json,md} (default out-dir: benchmarks/results).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probes import CUT_SHORT, Deadline, ProbeLog, child_command, measured  # noqa: E402  (sibling scripts)
from provenance import gpu, header, record, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
H100_BF16_DENSE_TFLOPS = 790.0  # issue 5's figure for an H100's dense bf16 peak
SIZES = {  # recipe (when it exists), fallback config.json for a synthetic model, default seq, batch, timed steps
    "tiny": dict(recipe="recipes/tiny.py", config_json=None, seq=128, batch=2, steps=5),
    "8b": dict(recipe="recipes/llama8b.py", config_json="recipes/configs/llama-3.1-8b/config.json", seq=2048,
               batch=1, steps=10),
    "70b": dict(recipe="recipes/llama70b.py", config_json="recipes/configs/llama-3.1-70b/config.json", seq=2048,
                batch=1, steps=5),
    # Issue 25: the base streamed from host memory, for a 24 GB and a 6 GB card.
    "70b-24gb": dict(recipe="recipes/llama70b_24gb.py", config_json="recipes/configs/llama-3.1-70b/config.json",
                     seq=2048, batch=1, steps=5),
    "8b-6gb": dict(recipe="recipes/llama8b_6gb.py", config_json="recipes/configs/llama-3.1-8b/config.json",
                   seq=2048, batch=1, steps=10),
}
STACKS = {"standard": None, "ours": [], "ours-lora16": ["--quant.method=lora"],
          # Issue 25: the same recipe with its 4-bit base streamed from host memory (train.stream_base).
          "ours-streamed": ["--train.stream_base=true"]}
LEVERS = {  # --levers: ours with one speed lever on
    "ours+reuse_dequant": ["--train.reuse_dequant=true"],
    "ours+fuse_lora_add": ["--train.fuse_lora_add=true"],
    "ours+compile_lora": ["--train.compile=lora"],
    "ours+compile_layers": ["--train.compile=layers"],
    "ours+liger_ce": ["--train.liger_ce=true"],
}


# --- configuration shared with benchmarks/memory_levers.py ---

def base_config(size: str, overrides: list[str]):  # noqa: ANN201 (Config; imported lazily to keep --help fast)
    """The recipe for `size` with `overrides`; for 8b/70b a synthetic-weights config when the recipe is missing."""
    from qlora.config import Config, DataConfig, ModelConfig, apply_overrides, load_recipe

    spec = SIZES[size]
    if (ROOT / spec["recipe"]).is_file():
        cfg = load_recipe(ROOT / spec["recipe"])
    else:
        cfg = Config(model=ModelConfig(path=str(ROOT / Path(spec["config_json"]).parent), synthetic=True,
                                       config_json=str(ROOT / spec["config_json"])),
                     data=DataConfig(train=str(ROOT / "recipes/data/tiny/train.jsonl")))
    cfg.train.eval_every = 0
    return apply_overrides(cfg, overrides)


def synthetic_batch(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids, every token a label: the same work for every stack, with no padding."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device),
            "attention_mask": torch.ones_like(ids).to(device)}


def base_parameters(model: torch.nn.Module) -> int:
    """N: every base weight (4-bit ones counted by their unpacked shape, a CPU-resident embedding table included)."""
    n = sum(getattr(getattr(p, "quant_state", None), "shape", p).numel()
            for name, p in model.named_parameters() if "lora_" not in name)
    table = getattr(model.get_input_embeddings(), "table", None)  # qlora.offload.CPUEmbedding
    return n + (table.numel() if table is not None else 0)


def reset_peak(device: torch.device) -> None:
    from qlora.memory import profiler as memory

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    memory.reset_peak(device)


def card_peak(device: torch.device) -> dict[str, float]:
    """Peak since the last reset, in GiB. CUDA: what a user compares with the card (issue 4): PyTorch's peak
    reserved + memory outside its allocator (CUDA context, cuBLAS workspaces, NCCL) read now from the driver.
    CPU: the process's peak resident set."""
    from qlora.memory import profiler as memory

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        outside = (total - free) - torch.cuda.memory_reserved(device)  # this process only on a dedicated card
        reserved = torch.cuda.max_memory_reserved(device)
        return {"peak_gib": (reserved + outside) / 2**30, "reserved_gib": reserved / 2**30,
                "allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30, "outside_gib": outside / 2**30}
    return {"peak_gib": memory.peak_bytes(device) / 2**30}


# --- the stacks ---

def build_ours(cfg, adjust: Callable[[torch.nn.Module], None] | None = None  # noqa: ANN001
               ) -> tuple[torch.nn.Module, Callable, torch.device]:
    """Our trainer's model, optimizer and step; `adjust` may change the model first (memory_levers.py uses it)."""
    from qlora.training.assemble import build_model
    from qlora.training.loss import loss_sum
    from qlora.training.optimizer import build_optimizer, stepped_params

    run = build_model(cfg)
    model, device = run["model"].train(), run["device"]
    if adjust is not None:
        adjust(model)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    params = stepped_params(optimizer)

    def step(batch: dict[str, torch.Tensor]) -> float:
        n_targets = int((batch["labels"][:, 1:] != -100).sum())
        loss = loss_sum(model, batch, cfg.train.loss_chunk_size) / n_targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step, device


def build_standard(cfg, prep: str) -> tuple[torch.nn.Module, Callable, torch.device]:  # noqa: ANN001
    """What a Hugging Face user runs: the 4-bit base as transformers' loader leaves it (for synthetic weights the same
    Linear4bit layers, marked as the loader marks them), peft's prepare_model_for_kbit_training (it upcasts every
    other weight to fp32 and, seeing a 4-bit model, checkpoints every decoder layer, non-reentrant), get_peft_model
    (peft's bitsandbytes Linear4bit LoRA layer on every linear layer), and the step of Trainer / SFTTrainer with
    bf16=True (the forward and loss under torch.autocast in bf16, the backward outside it), optim="paged_adamw_32bit"
    and max_grad_norm=1.0. The base load is shared with ours, so both train one model."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qlora.base.load import compute_dtype, load_base, resolve_device

    device = resolve_device(cfg.train.device)
    cfg.quant.quantize_lm_head = cfg.model.embeddings_on_cpu = False  # our levers, not the standard stack's
    model, _, _ = load_base(cfg, device)
    kwargs = {"use_reentrant": False}
    if prep == "kbit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers 5.23 renamed it; 5.17 has the old name
        model.activation_checkpointing_enable(kwargs)
        model.enable_input_require_grads()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=cfg.train.lr)
    # Trainer(bf16=True) autocasts where the recipe computes in bf16 (CUDA); an fp32 run (CPU) has nothing to cast.
    dtype = compute_dtype(cfg.quant, device)

    def step(batch: dict[str, torch.Tensor]) -> float:
        with torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext():
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step, device


def measure(args: argparse.Namespace, name: str, extra: list[str]) -> dict:
    """Build one stack, run warmup + timed steps on the synthetic batch, return its figures."""
    cfg = base_config(args.size, [*args.override, *extra] + ([f"--lora.r={args.rank}"] if args.rank else []))
    torch.manual_seed(0)
    model, step, device = build_standard(cfg, args.standard_prep) if name == "standard" else build_ours(cfg)
    n_params = base_parameters(model)
    vocab = model.get_input_embeddings().num_embeddings
    batch = synthetic_batch(vocab, args.batch, args.seq, device)
    reset_peak(device)  # the peak below covers the steps, with the weights already in place
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        losses.append(step(batch))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    tokens = args.batch * args.seq
    result = {"step_s": step_s, "tokens_per_s": tokens / step_s, "n_params": n_params, "losses": losses,
              **card_peak(device)}
    if args.peak_tflops:
        result["mfu"] = 6 * n_params * result["tokens_per_s"] / (args.peak_tflops * 1e12)
    result["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return result


# --- the run: one child process per stack, then the table ---

def ratios(results: dict[str, dict]) -> dict[str, float]:
    ok = {k: v for k, v in results.items() if "error" not in v}
    out = {}
    if "ours" in ok and "standard" in ok:
        out["tokens_per_s ours/standard (target >= 1.5)"] = ok["ours"]["tokens_per_s"] / ok["standard"]["tokens_per_s"]
        out["peak ours/standard (target <= 1.0)"] = ok["ours"]["peak_gib"] / ok["standard"]["peak_gib"]
    if "ours" in ok and "ours-streamed" in ok:
        out["step time ours streamed/resident base (target <= 1.3)"] = ok["ours-streamed"]["step_s"] / \
            ok["ours"]["step_s"]
    if "ours" in ok and "ours-lora16" in ok:
        key = "step time ours QLoRA/ours 16-bit LoRA (target <= 1.2)"
        out[key] = ok["ours"]["step_s"] / ok["ours-lora16"]["step_s"]
    for name in ok:
        if name.startswith("ours+") and "ours" in ok:
            out[f"tokens_per_s {name}/ours"] = ok[name]["tokens_per_s"] / ok["ours"]["tokens_per_s"]
    return out


def report(args: argparse.Namespace, prov: dict, device: str, device_name: str, results: dict, rat: dict) -> str:
    lines = header(f"Throughput: {args.size} on {device_name} ({device})", prov, device,
                   "CPU run at a tiny size: it shows the benchmark works end to end; its numbers say nothing about "
                   "GPU speed or memory.")
    lines += [f"batch {args.batch} x seq {args.seq}, {args.warmup} warmup + {args.steps} timed steps (median), "
              f"peak over the steps; MFU against {args.peak_tflops or 'n/a'} TFLOP/s and 6N FLOPs/token", "",
              "| stack | tokens/s | step s | peak GiB | MFU |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | |")
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['peak_gib']:.2f} | {mfu} |")
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in rat.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """0 when every stack was measured; CUT_SHORT when the deadline left some out (a rerun measures only those)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seq", type=int, help="tokens per row (default: 128 tiny, 2048 otherwise)")
    parser.add_argument("--batch", type=int, help="rows per step (default: 2 tiny, 1 otherwise)")
    parser.add_argument("--steps", type=int, help="timed steps (default: 5 tiny, 10 8b, 5 70b)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, allocator, paging)")
    parser.add_argument("--rank", type=int, help="LoRA rank for every stack (default: the recipe's)")
    parser.add_argument("--stacks", default="standard,ours,ours-lora16", help="comma-separated, from: "
                        + ", ".join([*STACKS, *LEVERS]))
    parser.add_argument("--levers", action="store_true", help="add ours with each speed lever on its own")
    parser.add_argument("--standard-prep", choices=["kbit", "none"], default="kbit",
                        help="kbit: peft.prepare_model_for_kbit_training (the usual recipe); none: skip its upcast")
    parser.add_argument("--peak-tflops", type=float, help=f"device peak for MFU (default {H100_BF16_DENSE_TFLOPS} "
                        "on CUDA, i.e. an H100's dense bf16; none on CPU)")
    parser.add_argument("--override", action="append", default=[], metavar="--section.key=value",
                        help="recipe override for every stack, e.g. --override=--train.loss_chunk_size=4096")
    parser.add_argument("--probe-timeout", type=float, default=600, help="seconds one stack may take")
    parser.add_argument("--deadline", type=float, help="seconds for this whole run (default: none)")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where the report and the probe log go")
    parser.add_argument("--fresh", action="store_true", help="ignore stacks logged by an earlier run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; write no report")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    spec = SIZES[args.size]
    args.seq, args.batch, args.steps = args.seq or spec["seq"], args.batch or spec["batch"], args.steps or spec["steps"]
    cuda = torch.cuda.is_available()  # asks the driver: no CUDA context in this (parent) process
    if args.peak_tflops is None and cuda:
        args.peak_tflops = H100_BF16_DENSE_TFLOPS
    every = {**STACKS, **LEVERS}

    if args.child:
        result = measure(args, args.child, every[args.child] or [])
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    names = [n.strip() for n in args.stacks.split(",") if n.strip()] + (list(LEVERS) if args.levers else [])
    unknown = [n for n in names if n not in every]
    if unknown:
        parser.error(f"unknown stack {unknown[0]}: use {', '.join(every)}")
    if not cuda:
        names = [n for n in names if n != "ours+liger_ce"]  # liger-kernel is Triton: CUDA only
    device = "cuda" if cuda else "cpu"
    stem = Path(args.out_dir) / f"throughput-{device}-{args.size}{'-levers' if args.levers else ''}"
    setup = {"size": args.size, "seq": args.seq, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
             "rank": args.rank, "standard_prep": args.standard_prep, "peak_tflops": args.peak_tflops,
             "overrides": args.override}
    log, deadline = ProbeLog(stem.with_suffix(".probes.jsonl"), setup, args.fresh), Deadline(args.deadline)
    prov = record("throughput.py", device, argv)
    results: dict[str, dict] = {}
    passed = [f"--size={args.size}", f"--seq={args.seq}", f"--batch={args.batch}", f"--steps={args.steps}",
              f"--warmup={args.warmup}", f"--standard-prep={args.standard_prep}",
              *([f"--rank={args.rank}"] if args.rank else []),
              *([f"--peak-tflops={args.peak_tflops}"] if args.peak_tflops else []),
              *[f"--override={o}" for o in args.override]]
    for name in names:
        print(f"== {name}", flush=True)
        result = measured(log, deadline, name, child_command("throughput.py", ["--child", name, *passed]),
                          args.probe_timeout)
        results[name] = result if result is not None else {"error": "not run (deadline)"}
        names_seen = [r["device_name"] for r in results.values() if r.get("device_name")]
        device_name = names_seen[0] if names_seen else (gpu() if cuda else platform.machine())
        rat = ratios(results)
        text = report(args, prov, device, device_name, results, rat)
        if not args.no_write:
            write_result(stem, {"device": device, "device_name": device_name, **prov, "setup": setup,
                                "results": results, "ratios": rat}, text, quiet=True)
    print("\n" + text)
    if not args.no_write:
        print(f"wrote {stem}.json and .md")
    if deadline.hit:
        print(f"stopped at --deadline={args.deadline:.0f}: run the same command again to go on", flush=True)
        return CUT_SHORT
    return 0


if __name__ == "__main__":
    sys.exit(main())
