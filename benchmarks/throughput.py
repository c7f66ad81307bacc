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
    ours        training.assemble.build_model with the recipe's levers as they stand (train.plan=recipe: AS_SET),
                loss_sum, the recipe's optimizer, same clip
    ours-lora16 ours on a 16-bit base (quant.method=lora): the QLoRA-vs-LoRA step-time ratio of issue 5
    ours-fastest ours with train.plan=fastest: the levers the trainer picks for this card (qlora/memory/plan.py)
    ours-fastest-fused, ours-fastest-14gib-fused  the same plans with train.fuse_lora and train.dequant_once (whole
                card) or train.reuse_dequant (14 GiB) set, which the plan keeps until a GPU has measured their cost
    ours-batched ours-fastest with the batch shape left to the plan too (train.plan_batch): a step is one micro-batch
                of the rows the plan chose (of the recipe's rows a step), not --batch (not in the default --stacks)
    ours-streamed  ours with the 4-bit base streamed from host memory (train.stream_base): its step time against
                the base resident, issue 25's <= 1.3 (not in the default --stacks)
    unsloth     Unsloth's FastLanguageModel (load_in_4bit, get_peft_model with its gradient checkpointing) on a
                16-bit checkpoint of the same architecture written first (Unsloth loads from files; throughput does
                not depend on the weights' values), the same batch, rank, alpha, dropout, optimizer and clip. It runs
                from its own site folder (--unsloth-site: unsloth 2026.10 pins transformers <= 5.17, datasets < 5,
                trl <= 1.15); where it cannot run, its row says precisely why

The batch is random token ids with every token a label, so both stacks do the same work. MFU in two conventions:
  - "MFU 6N": 6N FLOPs per token (forward 2N, recompute 2N, input-gradient backward 2N; no weight gradients for a
    frozen base), N = every base parameter, embeddings included, as issue 5's bound does (~16K tok/s for 8B at 790
    TFLOP/s); attention left out;
  - "useful MFU" (issue 24's convention): only the work a step must do: 4 N' FLOPs per token (forward 2N', input
    gradients 2N'; N' = the parameters that multiply, every base parameter but the input embedding table) plus
    attention, 12 L d (s + 1) / 2 per token (QK^T and PV forward, 4 s d, their input gradients 8 s d, causal: half the
    keys on average; d = heads x head_dim); recomputation earns no credit, so a plan without checkpointing is not
    penalised. LoRA's own FLOPs (under 1% at r=16) count in neither.

--profile=N records N more steps of each stack under torch.profiler and adds a kernel table (benchmarks/kernel_table.py:
time per kernel family) and the SDPA backend that ran; each record's trace goes to <out-dir>/traces/ (a gzipped Chrome
trace for Perfetto or chrome://tracing; ignored by git; the GPU battery brings them back in traces.tar.gz).

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
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probes import CUT_SHORT, Deadline, ProbeLog, child_command, measured  # noqa: E402  (sibling scripts)
from provenance import gpu, header, record, write_result  # noqa: E402

from qlora import cli  # noqa: E402  (one line and its exit status for each ending)

if TYPE_CHECKING:  # the hints only: qlora is imported where used, to keep --help fast
    from qlora.config import Config

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
          "ours-fastest": ["--train.plan=fastest"], "unsloth": None,
          # The plan with the batch shape left to it (train.plan_batch): its micro-batch of the recipe's rows a step,
          # timed as one micro-batch and its optimizer step like the others. Every other stack runs --batch rows.
          "ours-batched": ["--train.plan=fastest", "--train.plan_batch=true"],
          # Issue 24's target is 2x the standard stack's tokens/s at no more than its peak: 14.89 GiB on the H200 of
          # 2026-12-04 (benchmarks/results/throughput-cuda-8b.md), so the plan gets 14 GiB.
          "ours-fastest-14gib": ["--train.plan=fastest", "--train.plan_gib=14"],
          # The plan with our fused paths set (the plan keeps a speed lever as set until the GPU's lever-costs item
          # has measured it, qlora/memory/costs.py): what the plan reaches once they pay. On a big card every weight
          # dequantised once for the run; within 14 GiB (no room for a 16-bit copy) once fewer per step.
          "ours-fastest-fused": ["--train.plan=fastest", "--train.fuse_lora=true", "--train.dequant_once=true"],
          "ours-fastest-14gib-fused": ["--train.plan=fastest", "--train.plan_gib=14", "--train.fuse_lora=true",
                                       "--train.reuse_dequant=true"],
          # Issue 25: the same recipe with its 4-bit base streamed from host memory (train.stream_base).
          "ours-streamed": ["--train.stream_base=true"]}
UNSLOTH_SITE = "/tmp/qlora-unsloth-site"  # benchmarks/gpu.py installs .whl/unsloth/*.whl there
LEVERS = {  # --levers: ours with one speed lever on
    "ours+reuse_dequant": ["--train.reuse_dequant=true"],
    "ours+fuse_lora_add": ["--train.fuse_lora_add=true"],
    "ours+compile_lora": ["--train.compile=lora"],
    "ours+compile_layers": ["--train.compile=layers"],
    "ours+liger_ce": ["--train.liger_ce=true"],
    "ours+liger_kernels": ["--train.liger_kernels=true"],
    "ours+fuse_lora": ["--train.fuse_lora=true"],
    "ours+dequant_once": ["--train.dequant_once=true"],
}


# --- configuration shared with benchmarks/memory_levers.py ---

# The recipe's levers as they stand. The 8B and 70B recipes leave their levers to train.plan=fastest, which would
# choose others for the card it finds (on an H200 every memory lever off): a stack or a probe measures the levers it
# names, and a stack that measures the plan says --train.plan=fastest after these.
AS_SET = ["--train.plan_batch=false", "--train.plan=recipe"]

def base_config(size: str, overrides: list[str]) -> Config:
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
    table = getattr(model.get_input_embeddings(), "table", None)  # qlora.levers.cpu_embeddings.embedding.CPUEmbedding
    return n + (table.numel() if table is not None else 0)


def reset_peak(device: torch.device) -> None:
    from qlora.memory import readings

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    readings.reset_peak(device)


def card_peak(device: torch.device) -> dict[str, float]:
    """Peak since the last reset, in GiB. CUDA: what a user compares with the card (issue 4): PyTorch's peak
    reserved + memory outside its allocator (CUDA context, cuBLAS workspaces, NCCL) read now from the driver.
    CPU: the process's peak resident set."""
    from qlora.memory import readings

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        outside = (total - free) - torch.cuda.memory_reserved(device)  # this process only on a dedicated card
        reserved = torch.cuda.max_memory_reserved(device)
        return {"peak_gib": (reserved + outside) / 2**30, "reserved_gib": reserved / 2**30,
                "allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30, "outside_gib": outside / 2**30}
    return {"peak_gib": readings.peak_bytes(device) / 2**30}


# --- the stacks ---

def build_ours(cfg: Config, adjust: Callable[[torch.nn.Module], None] | None = None
               ) -> tuple[torch.nn.Module, Callable, torch.device]:
    """Our trainer's model, optimizer and step; `adjust` may change the model first (memory_levers.py uses it)."""
    from qlora.base.load import resolve_device
    from qlora.memory.plan import use_plan
    from qlora.training.assemble import build_model
    from qlora.training.loss import loss_sum
    from qlora.training.optimizer import build_optimizer, stepped_params

    if cfg.train.plan == "fastest":  # as qlora.train does before loading: the levers for this card and host
        use_plan(cfg, resolve_device(cfg.train.device))
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


def hf_step(model: torch.nn.Module, params: list, optimizer: torch.optim.Optimizer, device: torch.device,
            dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], float]:
    """The step of transformers' Trainer over `model`'s own loss: the forward under autocast in `dtype` (none in fp32),
    the backward outside it, clip at 1.0, the optimizer's step."""

    def step(batch: dict[str, torch.Tensor]) -> float:
        with torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext():
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def build_standard(cfg: Config, prep: str) -> tuple[torch.nn.Module, Callable, torch.device]:
    """What a Hugging Face user runs: the 4-bit base as transformers' loader leaves it (for synthetic weights the same
    Linear4bit layers, marked as the loader marks them), peft's prepare_model_for_kbit_training (it upcasts every
    other weight to fp32 and, seeing a 4-bit model, checkpoints every decoder layer, non-reentrant), get_peft_model
    (peft's bitsandbytes Linear4bit LoRA layer on every linear layer), and the step of Trainer / SFTTrainer with
    bf16=True (the forward and loss under torch.autocast in bf16, the backward outside it), optim="paged_adamw_32bit"
    and max_grad_norm=1.0. The base load is shared with ours, so both train one model."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qlora.base.load import compute_dtype, load_base, resolve_device
    from qlora.training.assemble import checkpoint_every_layer

    device = resolve_device(cfg.train.device)
    cfg.quant.quantize_lm_head = cfg.model.embeddings_on_cpu = False  # our levers, not the standard stack's
    model, _, _ = load_base(cfg, device)
    if prep == "kbit":
        # peft 0.22 renamed the argument after transformers 5.23's rename, and warns at the old name; 0.21 (the
        # lower bound) knows only the old one.
        named = "activation_checkpointing_kwargs" if "activation_checkpointing_kwargs" in \
            inspect.signature(prepare_model_for_kbit_training).parameters else "gradient_checkpointing_kwargs"
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                **{named: {"use_reentrant": False}})
    else:
        checkpoint_every_layer(model)
        model.enable_input_require_grads()
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=cfg.train.lr)
    # Trainer(bf16=True) autocasts where the recipe computes in bf16 (CUDA); an fp32 run (CPU) has nothing to cast.
    dtype = compute_dtype(cfg.quant, device)

    return model, hf_step(model, params, optimizer, device, dtype), device


def unsloth_checkpoint(cfg: Config, device: torch.device) -> Path:
    """A 16-bit checkpoint of the recipe's architecture with random weights, for Unsloth, which loads from files:
    made on the device (fast), written once per machine beside the results (runs/ by default), with the byte-level
    tokenizer our synthetic runs use."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.base.build import byte_tokenizer, config_json_path

    source = Path(config_json_path(cfg))
    path = ROOT / "runs" / "unsloth-checkpoints" / source.parent.name
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    config = AutoConfig.from_pretrained(source.parent)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return path


def build_unsloth(cfg: Config, seq: int) -> tuple[torch.nn.Module, Callable, torch.device]:
    """Unsloth as its notebooks run it: FastLanguageModel.from_pretrained(load_in_4bit=True) (its NF4 load with double
    quant), get_peft_model on the seven projections with use_gradient_checkpointing="unsloth" (its offloaded
    checkpointing), and the step of the other stacks: model(labels=...).loss, backward, clip 1.0, paged AdamW 32-bit.
    Unsloth patches its fast LoRA kernels in only with lora_dropout=0 (it says so on loading); the recipe's dropout is
    kept, as for the other stacks: --override=--lora.dropout=0 measures every stack without it."""
    import bitsandbytes as bnb

    try:  # first of what touches transformers: unsloth patches it and peft as it is imported
        from unsloth import FastLanguageModel
    except Exception as err:  # a missing wheel, or a version it refuses: said as it is, with where it looked
        raise RuntimeError(f"unsloth could not be imported from --unsloth-site ({os.environ.get('PYTHONPATH')}): "
                           f"{type(err).__name__}: {err}") from err

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = unsloth_checkpoint(cfg, device)
    model, _ = FastLanguageModel.from_pretrained(model_name=str(path), max_seq_length=seq, dtype=torch.bfloat16,
                                                 load_in_4bit=True, full_finetuning=False)
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth", random_state=0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=cfg.train.lr)

    return model, hf_step(model, params, optimizer, device, torch.float32), device


def flops_per_token(model: torch.nn.Module, n_params: int, seq: int) -> tuple[float, float]:
    """(6N, useful) FLOPs per token, the module docstring's two conventions."""
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    table = model.get_input_embeddings()
    table = getattr(table, "table", None) if getattr(table, "weight", None) is None else table.weight
    tied = getattr(config, "tie_word_embeddings", False)
    matmul = n_params - (0 if tied or table is None else table.numel())
    attention = 12 * layers * heads * head_dim * (seq + 1) / 2
    return 6 * n_params, 4 * matmul + attention


def profiled(step: Callable, batch: dict, steps: int, rank: int, trace: Path | None) -> dict:
    """`steps` more steps under torch.profiler: the kernel table (ms per step by family) and the SDPA backend."""
    from kernel_table import kernel_table, sdpa_backends, unclassified

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) * 1e3 / steps
    if trace is not None:
        import gzip
        import shutil

        trace.parent.mkdir(parents=True, exist_ok=True)
        raw = trace.with_suffix("")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    return {"kernels": kernel_table(prof, rank, steps), "other_ops": unclassified(prof, rank, steps),
            "sdpa": sdpa_backends(prof), "profiled_steps": steps, "profiled_step_ms": wall_ms}


def stack_config(args: argparse.Namespace, extra: list[str]) -> Config:
    """A stack's recipe: the levers as set, then --override and the stack's own (ours-fastest: the plan's)."""
    return base_config(args.size, [*AS_SET, *args.override, *extra] + ([f"--lora.r={args.rank}"] if args.rank else []))


def measure(args: argparse.Namespace, name: str, extra: list[str]) -> dict:
    """Build one stack, run warmup + timed steps on the synthetic batch, return its figures."""
    cfg = stack_config(args, extra)
    torch.manual_seed(0)
    if name == "unsloth":
        model, step, device = build_unsloth(cfg, args.seq)
    elif name == "standard":
        model, step, device = build_standard(cfg, args.standard_prep)
    else:
        model, step, device = build_ours(cfg)
    n_params = base_parameters(model)
    vocab = model.get_input_embeddings().num_embeddings
    rows = cfg.train.batch_size if cfg.train.plan_batch else args.batch  # ours-batched: the plan's micro-batch
    batch = synthetic_batch(vocab, rows, args.seq, device)
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
    tokens = rows * args.seq
    result = {"step_s": step_s, "tokens_per_s": tokens / step_s, "rows": rows, "n_params": n_params, "losses": losses,
              **card_peak(device)}
    six_n, useful = flops_per_token(model, n_params, args.seq)
    if args.peak_tflops:
        result["mfu"] = six_n * result["tokens_per_s"] / (args.peak_tflops * 1e12)
        result["useful_mfu"] = useful * result["tokens_per_s"] / (args.peak_tflops * 1e12)
    result["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["plan_chose"] = cfg.train.plan_chose
    if args.profile:
        trace = Path(args.out_dir) / "traces" / f"{name}-{device.type}-{args.size}.json.gz"  # ignored by git
        result.update(profiled(step, batch, args.profile, cfg.lora.r, trace))
    return result


# --- the run: one child process per stack, then the table ---

def ratios(results: dict[str, dict]) -> dict[str, float]:
    """The ratios issue 24 sets targets for, for each of our stacks that ran (as shipped, and the plan's)."""
    ok = {k: v for k, v in results.items() if "error" not in v}
    out = {}
    for ours in ("ours", "ours-fastest", "ours-fastest-14gib", "ours-fastest-fused", "ours-fastest-14gib-fused",
                 "ours-batched"):
        if ours in ok and "standard" in ok:
            out[f"tokens_per_s {ours}/standard (target >= 2.0)"] = ok[ours]["tokens_per_s"] / \
                ok["standard"]["tokens_per_s"]
            out[f"peak {ours}/standard (target <= 1.0)"] = ok[ours]["peak_gib"] / ok["standard"]["peak_gib"]
        if ours in ok and "unsloth" in ok:
            out[f"tokens_per_s {ours}/unsloth (target > 1.0)"] = ok[ours]["tokens_per_s"] / \
                ok["unsloth"]["tokens_per_s"]
            out[f"peak {ours}/unsloth"] = ok[ours]["peak_gib"] / ok["unsloth"]["peak_gib"]
    if "ours" in ok and "ours-streamed" in ok:
        out["step time ours streamed/resident base (target <= 1.3)"] = ok["ours-streamed"]["step_s"] / \
            ok["ours"]["step_s"]
    if "ours" in ok and "ours-lora16" in ok:
        key = "step time ours QLoRA/ours 16-bit LoRA (target <= 1.1)"
        out[key] = ok["ours"]["step_s"] / ok["ours-lora16"]["step_s"]
    for name in ok:
        if name.startswith("ours+") and "ours" in ok:
            out[f"tokens_per_s {name}/ours"] = ok[name]["tokens_per_s"] / ok["ours"]["tokens_per_s"]
    return out


def report(args: argparse.Namespace, prov: dict, device: str, device_name: str, results: dict, rat: dict) -> str:
    from kernel_table import table_text

    lines = header(f"Throughput: {args.size} on {device_name} ({device})", prov, device,
                   "CPU run at a tiny size: it shows the benchmark works end to end; its numbers say nothing about "
                   "GPU speed or memory.")
    lines += [f"batch {args.batch} x seq {args.seq}, {args.warmup} warmup + {args.steps} timed steps (median), "
              f"peak over the steps; MFU against {args.peak_tflops or 'n/a'} TFLOP/s: 6N FLOPs per token, and "
              "useful (4N' + attention, no credit for recompute; the docstring of benchmarks/throughput.py)", "",
              "| stack | tokens/s | step s | peak GiB | MFU 6N | useful MFU | SDPA backend |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:160]} | | | | | |")
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
            useful = f"{100 * r['useful_mfu']:.1f}%" if "useful_mfu" in r else "n/a"
            sdpa = ", ".join(f"{k} x{v}" for k, v in r.get("sdpa", {}).items()) or ("not profiled" if "kernels" not in r
                                                                                    else "none seen")
            shown = name if r.get("rows", args.batch) == args.batch else f"{name} ({r['rows']} rows a step)"
            lines.append(f"| {shown} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['peak_gib']:.2f} | {mfu} | "
                         f"{useful} | {sdpa} |")
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in rat.items()]
    chosen = {name: r["plan_chose"] for name, r in results.items() if r.get("plan_chose")}
    if chosen:
        lines += ["", "train.plan=fastest chose: " + "; ".join(f"{n}: {' '.join(c)}" for n, c in chosen.items())]
    tables = {name: r["kernels"] for name, r in results.items() if "kernels" in r}
    if tables:
        steps = next(r["profiled_steps"] for r in results.values() if "kernels" in r)
        walls = {name: r["profiled_step_ms"] for name, r in results.items() if "profiled_step_ms" in r}
        lines += ["", f"Kernel time per step by family ({'device' if device == 'cuda' else 'CPU operator'} time, "
                  f"{steps} profiled steps after the timed ones; benchmarks/kernel_table.py):", "",
                  *table_text(tables, walls)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """0 when every stack was measured; CUT_SHORT when the deadline left some out (a rerun measures only those)."""
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="record N more steps of each stack under torch.profiler: the kernel table, SDPA backend")
    parser.add_argument("--unsloth-site", default=UNSLOTH_SITE,
                        help="site folder with unsloth and the versions it pins (before the others on its path)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; write no report")
    parser.add_argument("--tag", default="", help="added to the report's name (throughput-DEVICE-SIZE-TAG.md), so "
                        "that runs of one size with other settings keep their own reports")
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
    stem = Path(args.out_dir) / (f"throughput-{device}-{args.size}{'-levers' if args.levers else ''}"
                                 + (f"-{args.tag}" if args.tag else ""))
    setup = {"size": args.size, "seq": args.seq, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
             "rank": args.rank, "standard_prep": args.standard_prep, "peak_tflops": args.peak_tflops,
             "overrides": args.override, "profile": args.profile}
    log, deadline = ProbeLog(stem.with_suffix(".probes.jsonl"), setup, args.fresh), Deadline(args.deadline)
    prov = record("throughput.py", device, argv)
    results: dict[str, dict] = {}
    passed = [f"--size={args.size}", f"--seq={args.seq}", f"--batch={args.batch}", f"--steps={args.steps}",
              f"--warmup={args.warmup}", f"--standard-prep={args.standard_prep}",
              *([f"--rank={args.rank}"] if args.rank else []),
              *([f"--peak-tflops={args.peak_tflops}"] if args.peak_tflops else []), f"--profile={args.profile}",
              f"--out-dir={args.out_dir}",
              *[f"--override={o}" for o in args.override]]
    for name in names:
        print(f"== {name}", flush=True)
        env = None
        if name == "unsloth":  # its pinned versions first on the path, ours after
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [args.unsloth_site, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
        result = measured(log, deadline, name, child_command("throughput.py", ["--child", name, *passed]),
                          args.probe_timeout, env=env)
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
    sys.exit(cli.run(main))
