"""`python -m qlora.train RECIPE.py [--section.key=value ...] [--resume]`: the training loop.

recipe -> base in NF4 -> LoRA on every linear layer -> data -> this loop -> adapter, metrics.jsonl, checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from qlora import checkpoint, memory
from qlora.config import Config, ConfigError, parse_args
from qlora.data import eval_batches, load_splits, micro_batches
from qlora.lora import attach_lora
from qlora.loss import eval_stats, loss_sum
from qlora.model import compute_dtype, load_base, resolve_device

USAGE = "python -m qlora.train RECIPE.py [--section.key=value ...] [--resume] [--overwrite] [--debug]"


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """bitsandbytes' paged AdamW over the trainable parameters only: its state pages to CPU under memory pressure."""
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.PagedAdamW32bit
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak lr, then cosine decay to zero at the last step (or constant)."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_backward(model: torch.nn.Module, micro: list[dict[str, torch.Tensor]], chunk_size: int = 0) -> float:
    """Forward and backward over one optimizer step's micro-batches; return the step's mean loss per target token.

    Each micro-batch's summed loss is divided by the target tokens of the whole accumulated batch, not its own
    (transformers PR 34191), so 4 micro-batches of 1 give the loss and gradients of 1 batch of 4.
    """
    n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    total = 0.0
    for batch in micro:
        loss = loss_sum(model, batch, chunk_size) / n_targets
        loss.backward()  # gradients accumulate in the trainable parameters
        total += float(loss.detach())
    return total


def evaluate(model: torch.nn.Module, examples: list[dict], cfg: Config, pad_id: int, device: torch.device) -> dict:
    """Held-out loss per target token, perplexity and exact-match accuracy of the answers."""
    was_training = model.training
    model.eval()
    loss = tokens = exact = rows = 0
    for i, batch in enumerate(eval_batches(examples, cfg.train.batch_size, pad_id)):
        if cfg.train.eval_batches and i >= cfg.train.eval_batches:
            break
        b_loss, b_tokens, b_exact, b_rows = eval_stats(model, to_device(batch, device))
        loss, tokens, exact, rows = loss + b_loss, tokens + b_tokens, exact + b_exact, rows + b_rows
    model.train(was_training)
    mean = loss / max(tokens, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50)), "eval_exact_match": exact / max(rows, 1)}


def prepare(cfg: Config) -> dict:
    """Load the base, attach adapters, read the data: everything the loop needs, as one dict."""
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    dtype = compute_dtype(cfg.quant, device)
    model, tokenizer, base_path = load_base(cfg, device)
    if cfg.quant.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        attach_lora(model, cfg.lora, dtype)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant: works with a frozen base whose inputs need no grad, and keeps dropout's RNG on recompute.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it; the GPU image may be 4.x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_rows, eval_rows = load_splits(cfg.data, tokenizer, cfg.train.seed)
    return dict(model=model, tokenizer=tokenizer, base_path=base_path, device=device, dtype=dtype,
                train_rows=train_rows, eval_rows=eval_rows)


def print_summary(cfg: Config, run: dict) -> None:
    """Derived quantities, once, before the first step."""
    model, t = run["model"], cfg.train
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # A 4-bit weight is stored packed two to a byte, so count its elements from the quant state's shape.
    total = sum(getattr(getattr(p, "quant_state", None), "shape", p).numel() for p in model.parameters())
    mean_len = sum(len(r["input_ids"]) for r in run["train_rows"]) / len(run["train_rows"])
    print(f"device {run['device']} | compute {str(run['dtype']).removeprefix('torch.')} | method {cfg.quant.method}")
    print(f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)")
    print(f"{t.batch_size} rows x {t.grad_accum} accum = {t.batch_size * t.grad_accum} rows/step, about "
          f"{t.batch_size * t.grad_accum * mean_len:,.0f} tokens/step (mean row {mean_len:.0f} tokens, "
          f"max {cfg.data.max_seq_len}); {len(run['train_rows'])} train rows, {len(run['eval_rows'])} held out")


def train(cfg: Config, resume: bool = False) -> dict:
    """Run the recipe; return the final metrics."""
    run_dir = Path(cfg.output.dir)
    run = prepare(cfg)
    model, device, tokenizer = run["model"], run["device"], run["tokenizer"]
    print_summary(cfg, run)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    step, first = 0, {}
    latest = checkpoint.list_checkpoints(run_dir)
    if resume and latest:
        state = checkpoint.load_checkpoint(latest[-1], model, cfg, optimizer, scheduler)
        step, first = state["step"], state.get("first_eval", {})
        print(f"resumed from {latest[-1]} at step {step}")
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", keep_through=step)
    if step == 0:
        first = evaluate(model, run["eval_rows"], cfg, tokenizer.pad_token_id, device)
        metrics_log.write({"step": 0, **first})
        print(f"before training: held-out loss {first['eval_loss']:.4f}, "
              f"exact match {100 * first['eval_exact_match']:.1f}%")

    t = cfg.train
    batches = micro_batches(run["train_rows"], t.batch_size, t.seed, tokenizer.pad_token_id, start=step * t.grad_accum)
    profiler = memory.PhaseTracker(device)
    model.train()
    bar = tqdm(total=t.steps, initial=step, desc="train", dynamic_ncols=True, disable=None)
    last = {}
    while step < t.steps:
        started = time.perf_counter()
        micro = [to_device(b, device) for _, b in (next(batches) for _ in range(t.grad_accum))]
        total_loss = forward_backward(model, micro, t.loss_chunk_size)
        # clip, step, schedule
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        profiler.mark("steady" if step > 1 else "first_step")

        # log
        seconds = time.perf_counter() - started
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        last = {"step": step, "loss": total_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                "tokens_per_s": tokens / seconds, "peak_gib": memory.peak_bytes(device) / 2**30}
        if step % t.log_every == 0 or step == t.steps:
            metrics_log.write(last)
        bar.set_postfix(loss=f"{total_loss:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{last['tokens_per_s']:.0f}",
                        mem=f"{last['peak_gib']:.2f}G")
        bar.update(1)

        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            metrics_log.write({"step": step, **evaluate(model, run["eval_rows"], cfg, tokenizer.pad_token_id, device)})
        if (t.save_every and step % t.save_every == 0) or step == t.steps:
            checkpoint.save_checkpoint(run_dir, step, model, cfg, run["base_path"], optimizer, scheduler,
                                       {"first_eval": first})
    bar.close()

    final = evaluate(model, run["eval_rows"], cfg, tokenizer.pad_token_id, device)
    metrics_log.write({"step": step, **final})
    checkpoint.save_weights(model, cfg, run["base_path"], run_dir)
    print(f"held-out loss {first['eval_loss']:.4f} -> {final['eval_loss']:.4f}, exact match "
          f"{100 * first['eval_exact_match']:.1f}% -> {100 * final['eval_exact_match']:.1f}%")
    print(f"adapter written to {run_dir}")
    return {"before": first, "after": final, "last_step": last}


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step and eval. On resume, lines past the checkpoint are dropped,
    since those steps are about to be run again."""

    def __init__(self, path: Path, keep_through: int) -> None:
        self.path = path
        kept = []
        if keep_through and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_through]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        cfg, flags = parse_args(argv, USAGE)
        unknown = [f for f in flags if f not in ("--resume", "--overwrite", "--debug")]
        if unknown:
            raise ConfigError(f"unknown flag {unknown[0]}: {USAGE}")
        train(cfg, resume="--resume" in flags)
    except ConfigError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
