"""`python -m qlora.train RECIPE.py [--section.key=value ...] [--resume]`: the training loop.

recipe -> base in NF4 -> LoRA on every linear layer -> data -> this loop -> adapter, metrics.jsonl, checkpoints.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from qlora import checkpoint, distributed, guard, rundir
from qlora.cli import Session, run
from qlora.commands import TRAIN, help_text, wants_help
from qlora.config import Config, ConfigError, apply_overrides, load_recipe, split_args
from qlora.console import announce, progress, quiet_libraries, since
from qlora.data import eval_batches, eval_rows, load_splits, micro_batches, resume_position
from qlora.levers.checkpoints import check_pinned_memory, keep_layer_inputs
from qlora.levers.offload import HostOptimizer
from qlora.levers.speed import apply_speed_levers
from qlora.levers.tiling import tile_layers
from qlora.loftq import apply_shifts, init_loftq, load_shifts, save_shifts
from qlora.lora import attach_lora
from qlora.loss import eval_stats, loss_sum, use_liger_ce
from qlora.master import MasterWeights, needs_masters
from qlora.memory.preflight import check_fits
from qlora.memory.profiler import PhaseTracker, available_bytes, peak_bytes
from qlora.model import compute_dtype, load_base, resolve_device
from qlora.pack import check_packing, pack_examples, packing_summary
from qlora.sensitivity import keep_sensitive_layers

USAGE, FLAGS = TRAIN.usage, TRAIN.flag_names


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only: bitsandbytes' paged one, whose state pages to CPU under memory
    pressure. 16-bit adapters train through fp32 master copies (qlora/master.py): clip and step
    `optimizer.param_groups`. With train.optimizer_on_cpu on CUDA, the masters, the state and the update live in host
    memory from the start (qlora/levers/offload.py)."""
    if cfg.train.optimizer_on_cpu:
        if any(p.is_cuda for p in params):
            return HostOptimizer(params, functools.partial(make_optimizer, cfg=cfg, paged=False))
        print("train.optimizer_on_cpu: the parameters are in CPU memory already: nothing to do")
    make = functools.partial(make_optimizer, cfg=cfg)
    return MasterWeights(params, make) if cfg.quant.method != "full" and needs_masters(params) else make(params)


def make_optimizer(tensors: list[torch.Tensor], cfg: Config, paged: bool = True) -> torch.optim.Optimizer:
    """The AdamW of train.optimizer over `tensors`: torch's, or bitsandbytes' with 32- or 8-bit moments, paged or
    not (a host optimizer's tensors are in CPU memory already)."""
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(tensors, lr=t.lr, weight_decay=t.weight_decay)
    import bitsandbytes as bnb

    if t.optimizer == "paged_adamw_8bit":
        cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    else:
        cls = bnb.optim.PagedAdamW32bit if paged else bnb.optim.AdamW32bit
    optimizer = cls(tensors, lr=t.lr, weight_decay=t.weight_decay)
    if paged:
        optimizer.register_step_pre_hook(empty_cache_before_state)
    return optimizer


def empty_cache_before_state(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """bitsandbytes allocates the paged state in the first step, right after the first backward, when PyTorch's
    cache still holds that backward's freed activations: hand them back to the driver first, so the state's pages
    find room on the card instead of thrashing at its edge."""
    if not optimizer.state and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def stepped_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """What the optimizer updates and whose gradients are clipped: the trainable parameters, or their fp32 masters
    (or, with train.optimizer_on_cpu, what holds their fp32 gradients on the device)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def retarget(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: Config) -> None:
    """After a resume: the lr, schedule and weight decay of `cfg`, not those the checkpoint's state dicts carry, from
    the resumed step on (so `--resume --train.lr=1e-4` trains at 1e-4). Unchanged settings give back the very same
    numbers: the lr is the schedule's own formula at the same step."""
    scheduler.base_lrs = [cfg.train.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["weight_decay"] = cfg.train.lr, cfg.train.weight_decay
        group["lr"] = cfg.train.lr * factor(scheduler.last_epoch)


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


def forward_backward(model: torch.nn.Module, micro: list[dict[str, torch.Tensor]], chunk_size: int = 0,
                     profiler: PhaseTracker | None = None, n_targets: int | None = None) -> float:
    """Forward and backward over one optimizer step's micro-batches; return the step's mean loss per target token.

    Each micro-batch's summed loss is divided by the target tokens of the whole accumulated batch, not its own
    (transformers PR 34191), so 4 micro-batches of 1 give the loss and gradients of 1 batch of 4. With several
    processes, `n_targets` is the target tokens of the global batch, of which `micro` is this process's share.
    """
    if n_targets is None:
        n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    total = 0.0
    for batch in micro:
        loss = loss_sum(model, batch, chunk_size) / n_targets
        if profiler is not None:  # the run's first forward: marked once, apart from its backward
            profiler.mark("first_forward")
            profiler = None
        loss.backward()  # gradients accumulate in the trainable parameters
        total += float(loss.detach())
    return total


def evaluate(model: torch.nn.Module, examples: list[dict], cfg: Config, pad_id: int, device: torch.device,
             ranks: distributed.Ranks | None = None) -> dict:
    """Held-out loss per target token, perplexity and exact-match accuracy of the answers (the batches shared
    among the processes of a run that has several)."""
    ranks = ranks or distributed.Ranks()
    was_training = model.training
    model.eval()
    loss = tokens = exact = rows = 0
    scored, size = eval_rows(examples, cfg.train.batch_size, cfg.train.eval_batches), cfg.train.batch_size
    n = -(-len(scored) // size)
    shared = ranks.share(eval_batches(scored, size, pad_id), n)
    for batch, counted in progress(shared, -(-n // ranks.size), "evaluate", "batch", show=ranks.main):
        b_loss, b_tokens, b_exact, b_rows = eval_stats(model, to_device(batch, device))
        if counted:
            loss, tokens, exact, rows = loss + b_loss, tokens + b_tokens, exact + b_exact, rows + b_rows
    loss, tokens, exact, rows = ranks.sum_values(loss, tokens, exact, rows)
    model.train(was_training)
    mean = loss / max(tokens, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50)), "eval_exact_match": exact / max(rows, 1)}


def announce_evaluation(examples: list[dict], cfg: Config, when: str, note: str = "") -> float:
    """The line before an evaluation: when, how many rows and batches; returns its start (console.announce)."""
    n, size = len(eval_rows(examples, cfg.train.batch_size, cfg.train.eval_batches)), cfg.train.batch_size
    return announce(f"evaluating {n} held-out rows {when} ({-(-n // size)} batches of {size}{note})")


def build_model(cfg: Config, profiler: PhaseTracker | None = None, resuming: bool = False,
                ranks: distributed.Ranks | None = None) -> dict:
    """Load the base, attach adapters, switch on checkpointing and the memory and speed levers the recipe asks for;
    with several processes, shard the base (train.shard_base)."""
    ranks = ranks or distributed.Ranks()
    torch.manual_seed(cfg.train.seed)
    check_packing(cfg)
    device = ranks.device if ranks.several else resolve_device(cfg.train.device)
    dtype = compute_dtype(cfg.quant, device)
    if dtype == torch.float16 and device.type == "cuda":
        raise ConfigError("quant.compute_dtype=fp16: this trainer has no loss scaling, so small fp16 gradients would "
                          "underflow to zero on CUDA: use --quant.compute_dtype=bf16 (or auto), or fp32 on a GPU "
                          "without bf16")
    # Also quant.quantize_lm_head and model.embeddings_on_cpu.
    model, tokenizer, base_path = load_base(cfg, device, place=ranks.base_place(cfg, device))
    if profiler is not None:
        profiler.watch(model)
        profiler.mark("loaded")
    if cfg.train.gradient_checkpointing:
        # Non-reentrant: works with a frozen base whose inputs need no grad, and keeps dropout's RNG on recompute.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.23 renamed it; 5.17 has the old name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.quant.method == "qlora" and cfg.quant.keep_16bit_budget and not cfg.quant.keep_16bit:
        # Chosen when the run starts; run_config.json records the choice for eval, generate, merge and --resume.
        cfg.quant.keep_16bit = keep_sensitive_layers(model, cfg, tokenizer, base_path, dtype, resuming)
    shifts = {}
    if cfg.lora.init == "loftq" and cfg.lora.loftq_iters > 1 and resuming:  # the base as the run quantised it
        apply_shifts(model, cfg, base_path, load_shifts(Path(cfg.output.dir)))
    if cfg.quant.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        attach_lora(model, cfg.lora, dtype)
        if cfg.lora.init == "loftq" and not resuming:  # a resumed run's adapters come from its checkpoint
            held, shifts = init_loftq(model, cfg, base_path)
            print(f"lora.init=loftq: after {cfg.lora.loftq_iters} step(s) at rank {cfg.lora.r}, base and adapters "
                  f"remove {100 * held:.1f}% of the plain NF4 rounding error (squared norm)")
    if cfg.train.gradient_checkpointing:
        if cfg.train.offload_activations and device.type == "cuda":  # refused now, not when pinning fails mid-run
            text = model.config.get_text_config()
            check_pinned_memory(text.num_hidden_layers, cfg.train, cfg.data.max_seq_len, text.hidden_size,
                                dtype.itemsize, available_bytes())
        keep_layer_inputs(model, device, cfg.train.offload_activations, cfg.train.checkpoint_every,
                          cfg.train.offload_budget_gib)
    if cfg.train.liger_ce:
        if device.type != "cuda":
            print("train.liger_ce: liger-kernel runs on CUDA only; using the PyTorch loss on this device")
        else:
            use_liger_ce(model)
    for lever in apply_speed_levers(model, cfg.train):
        print(f"train.{lever}")
    if cfg.train.tile_size:  # after the speed levers: a tile runs whatever forward a module has by now
        n = tile_layers(model, cfg.train.tile_size, cfg.train.tile_projections)
        print(f"train.tile_size={cfg.train.tile_size}: {n} modules run in sequence tiles")
    ranks.distribute(model, cfg, device)
    if profiler is not None:
        profiler.mark("lora_attached")
    return dict(model=model, tokenizer=tokenizer, base_path=base_path, device=device, dtype=dtype, loftq_shifts=shifts)


def prepare(cfg: Config, profiler: PhaseTracker | None = None, resuming: bool = False,
            ranks: distributed.Ranks | None = None) -> dict:
    """Load the base, attach adapters, read the data: everything the loop needs, as one dict."""
    run = build_model(cfg, profiler, resuming, ranks)
    train_rows, eval_rows = load_splits(cfg.data, run["tokenizer"], cfg.train.seed)
    if cfg.data.pack:  # held-out rows stay unpacked: exact match is scored per row
        packed = pack_examples(train_rows, cfg.data.max_seq_len)
        print(packing_summary(train_rows, packed, cfg.data.max_seq_len))
        train_rows = packed
    return dict(**run, train_rows=train_rows, eval_rows=eval_rows)


def print_summary(cfg: Config, run: dict, processes: int = 1) -> None:
    """Derived quantities, once, before the first step."""
    model, t = run["model"], cfg.train
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # A 4-bit weight is stored packed (two to a byte), so count its elements from the quant state's shape, which a
    # sharded one keeps on its module (qlora/distributed.py).
    packed = {id(m.weight): m.quant_state.shape for m in model.modules() if getattr(m, "quant_state", None) is not None}
    total = sum(packed.get(id(p), getattr(getattr(p, "quant_state", None), "shape", p)).numel()
                for p in model.parameters())
    mean_len = sum(len(r["input_ids"]) for r in run["train_rows"]) / len(run["train_rows"])
    print(f"device {run['device']} | compute {str(run['dtype']).removeprefix('torch.')} | method {cfg.quant.method}")
    print(f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)")
    paged = t.optimizer.startswith("paged") and run["device"].type == "cpu"
    print(f"optimizer {t.optimizer}{': on CPU nothing pages (bitsandbytes pages CUDA memory only)' if paged else ''}")
    rows = t.batch_size * t.grad_accum * processes
    print(f"{t.batch_size} rows x {t.grad_accum} accum{f' x {processes} processes' if processes > 1 else ''} = "
          f"{rows} rows/step, about {rows * mean_len:,.0f} tokens/step (mean row {mean_len:.0f} tokens, "
          f"max {cfg.data.max_seq_len}); {len(run['train_rows'])} train rows, {len(run['eval_rows'])} held out")


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the recipe; return the final metrics. A run that ends early raises guard.Stop (see qlora/guard.py)."""
    # RunGuard turns an out-of-memory error anywhere below into a report; joined, a lost process into exit 6.
    with distributed.joined(cfg) as ranks, guard.RunGuard(cfg) as watch:
        try:
            return _train(cfg, resume, overwrite, watch, ranks)
        finally:
            rundir.unlock(Path(cfg.output.dir))


def _train(cfg: Config, resume: bool, overwrite: bool, watch: guard.RunGuard, ranks: distributed.Ranks) -> dict:
    run_dir = Path(cfg.output.dir)
    rundir.check_run_dir(run_dir, cfg, resume, overwrite)  # reads only: a refused run leaves the dir as it was
    # A step the estimate (with the allocator's margin) puts beyond the card, or the host, is refused before the base
    # is loaded, with the longest data.max_seq_len that fits.
    check_fits(cfg, ranks.device if ranks.several else resolve_device(cfg.train.device), ranks.size)
    # Created before loading: on CPU its baseline is the resident memory before the model exists.
    profiler = PhaseTracker(resolve_device(cfg.train.device))
    watch.device, watch.profiler = profiler.device, profiler  # for the report if memory runs out, loading included
    run = prepare(cfg, profiler, resuming=resume and bool(checkpoint.checkpoint_dirs(run_dir)), ranks=ranks)
    model, device, tokenizer = run["model"], run["device"], run["tokenizer"]
    t, n_rows = cfg.train, len(run["train_rows"])
    if t.batch_size * ranks.size > n_rows:
        raise ConfigError(f"train.batch_size={t.batch_size}{f' x {ranks.size} processes' if ranks.several else ''} "
                          f"exceeds the {n_rows} training rows{' (after packing)' if cfg.data.pack else ''}: use at "
                          f"most --train.batch_size={max(1, n_rows // ranks.size)}")
    print_summary(cfg, run, ranks.size)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    params = stepped_params(optimizer)  # with several processes, their gradients are what is summed
    scheduler = build_scheduler(optimizer, cfg)

    step, first, bad_steps, state, damaged = 0, {}, 0, {}, []
    if resume:
        resumed, state, damaged = checkpoint.resume_latest(run_dir, model, cfg, optimizer, scheduler)
        for path, why in damaged if ranks.main else ():
            print(f"{path} is damaged ({why}): it is set aside as {rundir.aside_name(path).name} for inspection",
                  file=sys.stderr)
        if resumed is None:
            print(f"no checkpoint in {run_dir} yet: starting at step 0")
        else:
            step, first, bad_steps = state["step"], state.get("first_eval", {}), state.get("bad_steps", 0)
            if step > t.steps:
                raise ConfigError(f"train.steps={t.steps} is below step {step}, where {resumed} stands: set "
                                  f"--train.steps={step} or more to continue")
            ranks.restore_rng(state)
            print(f"resumed from {resumed} at step {step}" + (" (the newest usable checkpoint)" if damaged else ""))
            if "optimizer_restarted" in state:  # cfg's optimizer, fresh; its fp32 masters from the resumed weights
                if isinstance(optimizer, MasterWeights):
                    optimizer.copy_from_params()
                print(f"train.optimizer {state['optimizer_restarted']} -> {t.optimizer}: its state starts afresh")
            retarget(optimizer, scheduler, cfg)
    # The first write: model, data, config and checkpoint are checked (by every process).
    ranks.on_main(rundir.start_run, run_dir, cfg, overwrite, [p for p, _ in damaged])
    if run["loftq_shifts"]:
        ranks.on_main(save_shifts, run_dir, run["loftq_shifts"])
    metrics_log = MetricsLog(run_dir / checkpoint.METRICS, keep_bytes=state.get("metrics_bytes", 0),
                             write=ranks.main)
    watch.catch_signals()  # from here on, SIGINT/SIGTERM stop the run at the end of a step, with a checkpoint
    if step == 0 and cfg.train.eval_before:
        watch.at("the evaluation before training", 0)
        started = announce_evaluation(run["eval_rows"], cfg, "before training", "; --train.eval_before=false skips it")
        first = evaluate(model, run["eval_rows"], cfg, tokenizer.pad_token_id, device, ranks)
        metrics_log.write({"step": 0, **first})
        if not math.isfinite(first["eval_loss"]):
            raise guard.non_finite_eval(cfg, 0, first["eval_loss"])
        print(f"before training: held-out loss {first['eval_loss']:.4f}, "
              f"exact match {100 * first['eval_exact_match']:.1f}% ({since(started)})")
        profiler.mark("evaluate")
        if ranks.agree_signal(watch):  # no step is in flight: stop now rather than after one
            raise watch.stopped_by_signal(0, None)

    # The next micro-batch (batch_size x processes rows): after the checkpoint's, from the same row if either changed.
    index = resume_position(state, t.batch_size * ranks.size, n_rows, step * t.grad_accum)
    batches = micro_batches(run["train_rows"], t.batch_size, t.seed, tokenizer.pad_token_id, start=index,
                            rank=ranks.rank, world=ranks.size)
    profiler.watch(model, optimizer)
    model.train()
    # Rank 0's bar, or in a log a line per tenth of the run (the bar's frames would be noise there); loss and
    # tokens/s are the global batch's.
    watch.bar = bar = tqdm(total=t.steps, initial=step,
                           desc="train" if not ranks.several else f"train ({ranks.size} processes)",
                           dynamic_ncols=True, disable=None if ranks.main else True)
    if bar.disable:
        announce(f"training {t.steps - step} steps of {t.batch_size * t.grad_accum * ranks.size} rows")
    last, first_step, longest = {}, True, 0
    while step < t.steps:
        started = time.perf_counter()
        indexed = [next(batches) for _ in range(t.grad_accum)]
        index, micro = indexed[-1][0] + 1, [to_device(b, device) for _, b in indexed]
        watch.at("the forward and backward", step, micro)
        longest = max(longest, *(b["input_ids"].shape[1] for b in micro))  # the estimate is for this row length
        n_targets = ranks.global_targets(run["train_rows"], t.batch_size, t.seed, [i for i, _ in indexed])
        total_loss = forward_backward(model, micro, t.loss_chunk_size, profiler if first_step else None, n_targets)
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        total_loss, tokens = ranks.sum_gradients(params, total_loss, tokens)  # with several processes
        profiler.mark("backward" if first_step else "steady")
        # clip, step (unless the loss or a gradient is inf/nan: skip the update), schedule
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        watch.at("the optimizer step", step)
        good = guard.finite(total_loss, grad_norm)
        if good:
            optimizer.step()
            if not guard.all_finite(params):  # a finite gradient, an update too large: the weights are lost
                raise guard.non_finite_weights(cfg, step + 1)
        scheduler.step()  # a skipped step still counts: the schedule and the data move on past its batch
        profiler.mark("optimizer_step" if first_step else "steady")  # before zero_grad: the breakdown shows gradients
        optimizer.zero_grad(set_to_none=True)
        step += 1
        first_step = False
        if not good:
            bad_steps += 1
            where = guard.data_position(indexed[0][0], t.grad_accum, n_rows, t.batch_size * ranks.size, t.seed)
            if ranks.main:  # every process skips the same step: the loss and gradients were summed
                print(f"step {step}: non-finite loss or gradient in {where}: skipped, no update "
                      f"({bad_steps} of train.max_bad_steps={t.max_bad_steps})", file=sys.stderr)

        # log
        seconds = time.perf_counter() - started
        last = {"step": step, "loss": total_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                "tokens_per_s": tokens / seconds, "peak_gib": peak_bytes(device) / 2**30}
        if step % t.log_every == 0 or step == t.steps:
            metrics_log.write(last)
        bar.set_postfix(loss=f"{total_loss:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{last['tokens_per_s']:.0f}",
                        mem=f"{last['peak_gib']:.2f}G")
        bar.update(1)
        if bar.disable and (step % max(1, t.steps // 10) == 0 or step == t.steps):
            print(f"step {step}/{t.steps}: loss {total_loss:.4f}, lr {last['lr']:.2e}, "
                  f"{last['tokens_per_s']:.0f} tokens/s, peak {last['peak_gib']:.2f} GiB", flush=True)

        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            watch.at("an evaluation", step)
            started = announce_evaluation(run["eval_rows"], cfg, f"at step {step}")
            scores = evaluate(model, run["eval_rows"], cfg, tokenizer.pad_token_id, device, ranks)
            metrics_log.write({"step": step, **scores})
            if not math.isfinite(scores["eval_loss"]):
                raise guard.non_finite_eval(cfg, step, scores["eval_loss"])
            tqdm.write(f"step {step}: held-out loss {scores['eval_loss']:.4f}, exact match "
                       f"{100 * scores['eval_exact_match']:.1f}% ({since(started)})", file=sys.stdout)
            profiler.mark("evaluate")
        # save; stop if told to (a signal from here on waits for the next step) or if too many steps were skipped
        stop_signal, too_many_bad = ranks.agree_signal(watch), not good and bad_steps > t.max_bad_steps
        if too_many_bad:  # the adapter, not the data, if held-out rows fail too: a checkpoint of it is of no use
            probe = next(eval_batches(run["eval_rows"], t.batch_size, tokenizer.pad_token_id))
            if not guard.finite_held_out(model, to_device(probe, device)):  # every process: the same rows
                raise guard.diverged(cfg, step, bad_steps, where)
        if (t.save_every and step % t.save_every == 0) or step == t.steps or too_many_bad or stop_signal:
            watch.at("saving a checkpoint", step)
            extra = {"first_eval": first, "bad_steps": bad_steps, "metrics_bytes": metrics_log.size(),
                     "micro_batch": index, "batch_size": t.batch_size * ranks.size, "optimizer": t.optimizer,
                     **ranks.rng_states()}
            saved = ranks.on_main(checkpoint.save_checkpoint, run_dir, step, model, cfg, run["base_path"], optimizer,
                                  scheduler, extra)
        if too_many_bad:
            raise guard.too_many_bad_steps(step, bad_steps, t.max_bad_steps, where, saved)
        if stop_signal:
            raise watch.stopped_by_signal(step, saved)
    bar.close()

    watch.at("the final evaluation", step)
    started = announce_evaluation(run["eval_rows"], cfg, "after training")
    final = evaluate(model, run["eval_rows"], cfg, tokenizer.pad_token_id, device, ranks)
    metrics_log.write({"step": step, **final})
    if not math.isfinite(final["eval_loss"]):  # never the result of a run, whatever its weights
        raise guard.non_finite_eval(cfg, step, final["eval_loss"])
    ranks.on_main(checkpoint.save_final, model, cfg, run["base_path"], run_dir)
    if first:
        print(f"held-out loss {first['eval_loss']:.4f} -> {final['eval_loss']:.4f}, exact match "
              f"{100 * first['eval_exact_match']:.1f}% -> {100 * final['eval_exact_match']:.1f}% ({since(started)})")
    else:  # train.eval_before=false
        print(f"held-out loss {final['eval_loss']:.4f}, exact match {100 * final['eval_exact_match']:.1f}% "
              f"({since(started)})")
    print(f"adapter written to {run_dir}")
    # One line: the peak, by category, and the estimate for the longest micro-batch this run padded to (rank 0's,
    # with several processes).
    print(ranks.on_main(profiler.write, run_dir / rundir.MEMORY, cfg, longest or None))
    return {"before": first, "after": final, "last_step": last}


def finite_or_null(value: object) -> object:
    """A non-finite float (a diverged loss, an overflowing grad norm) as None: NaN and Infinity are not JSON, and a
    strict reader (jq, JavaScript, Go) refuses the whole line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step and eval, non-finite numbers as null. Each checkpoint records the
    file's length when it was saved; resuming from it cuts the file back to that length, dropping what was logged after
    the save (steps about to be run again, a final evaluation, a line cut short by a kill -9)."""

    def __init__(self, path: Path, keep_bytes: int = 0, write: bool = True) -> None:
        self.path, self.enabled = path, write  # only rank 0 of several processes writes
        if not write:
            return
        kept = path.read_bytes()[:keep_bytes] if keep_bytes and path.exists() else b""
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_bytes(kept)
        os.replace(tmp, path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")

    def size(self) -> int:
        return self.path.stat().st_size if self.enabled else 0


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 when the run completes, else an exit status of qlora/cli.py with one line on stderr."""
    return run(_main, argv)


def _main(argv: list[str]) -> None:
    if wants_help(argv):  # `python -m qlora.train --help` is answered earlier, by qlora/__init__.py
        print(help_text("qlora.train", argv), end="")
        return
    quiet_libraries()  # for a run started in-process; `python -m qlora.train` did it before importing transformers
    recipe, flags, overrides = split_args(argv, USAGE)
    cfg = apply_overrides(load_recipe(recipe), overrides)
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise ConfigError(_flag_error(unknown[0]))
    if "--resume" in flags and "--overwrite" not in flags:  # the run on disk, changed only where the rules allow
        cfg = rundir.resume_config(cfg, overrides)
    Session.run_dir = Path(cfg.output.dir)  # an interruption or a full disk from here on names what is intact
    train(cfg, resume="--resume" in flags, overwrite="--overwrite" in flags)


def _flag_error(flag: str) -> str:
    if "." in flag:
        return f"{flag} has no value: write {flag}=VALUE"
    close = difflib.get_close_matches(flag, FLAGS, 1, 0.5)
    return f"unknown flag {flag}: {f'did you mean {close[0]}? ' if close else ''}{USAGE}"


if __name__ == "__main__":
    sys.exit(main())
