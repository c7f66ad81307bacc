"""`python -m qlora.train RECIPE.py [--section.key=value ...] [--resume]`: the training loop.

recipe -> base in NF4 -> LoRA on every linear layer -> data -> this loop -> adapter, metrics.jsonl, checkpoints.

The loop is read top to bottom: set up, resume, evaluate before, then per step forward and backward, clip and step,
log, evaluate, save or stop; then the final evaluation, the adapter and one memory line. Everything it calls is a
component under qlora/ (qlora/training/ for what only training needs: where the run stands and its progress bar in
progress.py, what stops it in guard.py) that never imports this file back.
"""

from __future__ import annotations

import difflib
import functools
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from qlora.adapters.loftq import save_shifts
from qlora.base.attention import use_kernel
from qlora.base.load import resolve_device
from qlora.cli import run
from qlora.commands import TRAIN, help_text, wants_help
from qlora.config import Config, apply_overrides, load_recipe, resolve_paths, split_args
from qlora.console import quiet_libraries, since
from qlora.data.batches import check_step_rows, eval_batches, micro_batches, resume_position
from qlora.errors import ConfigError, Session
from qlora.levers.stream_base.settings import check_processes
from qlora.memory.plan import keep_overridden, unplanned, use_plan
from qlora.memory.preflight import cpu_instead, say_fits
from qlora.memory.profiler import PhaseTracker
from qlora.training import checkpoint, distributed, guard, launch, runconfig, rundir
from qlora.training.assemble import prepare, print_summary
from qlora.training.metrics import MetricsLog, check_kept
from qlora.training.optimizer import build_optimizer, build_scheduler, stepped_params, updated_weights
from qlora.training.progress import Progress, finished, progress_bar, resume_progress, said_done, same_rows, show_step
from qlora.training.step import announce_evaluation, evaluate, forward_backward, to_device

USAGE, FLAGS = TRAIN.usage, TRAIN.flag_names


def train(cfg: Config, resume: bool = False, overwrite: bool = False, finished: tuple | None = None) -> dict:
    """Run the recipe; return the final metrics. A run that ends early raises Stop (qlora/training/guard.py: how).
    `finished`: this process's progress.finished (qlora.train --resume; several decide it once joined)."""
    # RunGuard turns an out-of-memory error anywhere below into a report; joined, a lost process into exit 6.
    with launch.joined(cfg) as ranks, guard.RunGuard(cfg, ranks.main, overwrite, ranks.several) as watch:
        if finished is not None and said_done(cfg, ranks, finished):  # nothing loaded or written: none to unlock
            return {}
        try:
            return _train(cfg, resume, overwrite, watch, ranks)
        finally:
            rundir.unlock(Path(cfg.output.dir))


def _train(cfg: Config, resume: bool, overwrite: bool, watch: guard.RunGuard, ranks: distributed.Ranks) -> dict:
    t, run_dir = cfg.train, Path(cfg.output.dir)
    run, optimizer, scheduler, progress, metrics, profiler = _start(cfg, resume, overwrite, watch, ranks)
    model, device, pad_id, n_rows = run["model"], run["device"], run["tokenizer"].pad_token_id, len(run["train_rows"])
    params = stepped_params(optimizer)  # what is clipped, stepped and (with several processes) summed

    def base_fails() -> bool:
        """Whether the first held-out batch gives a non-finite loss with the adapters off (every process: same rows)."""
        probe = to_device(next(eval_batches(run["eval_rows"], t.batch_size, pad_id)), device)
        return not guard.finite_held_out(model, probe, adapters=False, chunk_size=t.loss_chunk_size)

    def held_out(step: int, when: str, note: str = "") -> tuple[dict, float]:
        """Score the held-out rows, log them, refuse a non-finite loss; (scores, when it started)."""
        started = announce_evaluation(run["eval_rows"], cfg, when, note)
        scores = evaluate(model, run["eval_rows"], cfg, pad_id, device, ranks)
        metrics.write({"step": step, **scores})
        if not math.isfinite(scores["eval_loss"]):  # never the result of a run, whatever its weights
            # Before max_bad_steps is reached (train.eval_before=false, an early eval_every) a nan base meets an
            # evaluation first: tell it from a diverged adapter as the bad-step check does.
            raise guard.non_finite_eval(cfg, step, scores["eval_loss"], step > 0 and base_fails())
        return scores, started

    def scheduled_evaluation(step: int, every: int) -> None:
        """The evaluation every `every` steps (train.eval_every; the final one aside), logged and shown."""
        if every and step % every == 0 and step < t.steps:
            watch.at("an evaluation", step)
            scores, started = held_out(step, f"at step {step}")
            tqdm.write(f"step {step}: held-out loss {scores['eval_loss']:.4f}, exact match "
                       f"{100 * scores['eval_exact_match']:.1f}% ({since(started)})", file=sys.stdout)
            profiler.mark("evaluate")

    if progress.step == 0 and t.eval_before:
        watch.at("the evaluation before training", 0)
        progress.first_eval, started = held_out(0, "before training", "; --train.eval_before=false skips it")
        print(f"before training: held-out loss {progress.first_eval['eval_loss']:.4f}, "
              f"exact match {100 * progress.first_eval['eval_exact_match']:.1f}% ({since(started)})")
        profiler.mark("evaluate")
        if ranks.agree_signal(watch):  # no step is in flight: stop now rather than after one
            raise watch.stopped_by_signal(0, None)

    # Resumed past the last step of a shorter run: its final evaluation there is cut from metrics.jsonl with the rest
    # after its checkpoint. As straight through, and as its train.eval_every had it: that step ran under its settings.
    if progress.ended:
        scheduled_evaluation(progress.step, progress.ran.get("eval_every", t.eval_every))
        if ranks.agree_signal(watch):  # as before training: no step is in flight, and its checkpoint is there
            raise watch.stopped_by_signal(progress.step, run_dir / f"checkpoint-{progress.step}")

    # The next micro-batch (batch_size x processes rows): after the checkpoint's, from the same row if either changed.
    index = resume_position(progress.state, t.batch_size * ranks.size, n_rows, progress.step * t.grad_accum)
    batches = micro_batches(run["train_rows"], t.batch_size, t.seed, pad_id, start=index, rank=ranks.rank,
                            world=ranks.size)
    profiler.watch(model, optimizer)
    model.train()
    watch.bar = bar = progress_bar(cfg, progress.step, ranks)
    began = progress.step, time.perf_counter()  # the step lines' time left: this process's steps, not its loading
    # the run's earlier processes' peaks and longest micro-batch: the memory line and memory.json are the whole run's
    profiler.restore(progress.state.get("memory"))
    step, last, longest = progress.step, {}, progress.state.get("longest", 0)
    while step < t.steps:
        first_step, started = step == progress.step, time.perf_counter()
        indexed = [next(batches) for _ in range(t.grad_accum)]
        index, micro = indexed[-1][0] + 1, [to_device(b, device) for _, b in indexed]
        longest = max(longest, *(b["input_ids"].shape[1] for b in micro))  # the estimate is for this row length

        # forward and backward: the loss of the global batch, gradients summed over the processes
        watch.at("the forward and backward", step, micro)
        n_targets = ranks.global_targets(run["train_rows"], t.batch_size, t.seed, [i for i, _ in indexed])
        loss = forward_backward(model, micro, t.loss_chunk_size, profiler if first_step else None, n_targets)
        loss, tokens = ranks.sum_gradients(params, loss, sum(int(b["attention_mask"].sum()) for b in micro))
        profiler.mark("backward" if first_step else "steady")

        # clip, step (unless the loss or a gradient is inf/nan: skip the update), schedule
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        watch.at("the optimizer step", step)
        good = guard.finite(loss, grad_norm)
        if good:
            optimizer.step()
            if not guard.all_finite(updated_weights(optimizer)):  # a finite gradient, an update too large
                raise guard.non_finite_weights(cfg, step + 1)
        lr = optimizer.param_groups[0]["lr"]  # the one this step ran at, logged with it
        scheduler.step()  # a skipped step still counts: the schedule and the data move on past its batch
        profiler.mark("optimizer_step" if first_step else "steady")  # before zero_grad: the breakdown shows gradients
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if not good:
            progress.bad_steps += 1
            where = guard.data_position(indexed[0][0], t.grad_accum, n_rows, t.batch_size * ranks.size, t.seed)
            if ranks.main:  # every process skips the same step: the loss and gradients were summed
                print(f"step {step}: non-finite loss or gradient in {where}: skipped, no update "
                      f"({progress.bad_steps} of train.max_bad_steps={t.max_bad_steps})", file=sys.stderr)

        # log
        last = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens_per_s": tokens / (time.perf_counter() - started), "peak_gib": profiler.highest() / 2**30}
        if step % t.log_every == 0 or step == t.steps:
            logged = metrics.write(last)
        show_step(bar, last, t.steps, began)

        # evaluate
        scheduled_evaluation(step, t.eval_every)

        # save; stop if told to (by a signal heard until the checkpoint is written) or if too many steps were skipped
        stop_signal, too_many_bad = ranks.agree_signal(watch), not good and progress.bad_steps > t.max_bad_steps
        if too_many_bad:  # the adapter, not the data, if held-out rows fail too: a checkpoint of it is of no use
            probe = to_device(next(eval_batches(run["eval_rows"], t.batch_size, pad_id)), device)
            if not guard.finite_held_out(model, probe, chunk_size=t.loss_chunk_size):  # every process: same rows
                raise guard.diverged(cfg, step, progress.bad_steps, where, base_fails())
        if (t.save_every and step % t.save_every == 0) or step == t.steps or too_many_bad or stop_signal:
            watch.at("saving a checkpoint", step)
            extra = {"first_eval": progress.first_eval, "bad_steps": progress.bad_steps,
                     "metrics_bytes": metrics.size(), "micro_batch": index, "batch_size": t.batch_size * ranks.size,
                     "rows": [n_rows, len(run["eval_rows"])], "rows_sha256": run["rows_sha256"],
                     "config_json_sha256": run["config_json_sha256"], "config": cfg.to_dict(), "optimizer": t.optimizer,
                     "longest": longest, "memory": profiler.carried(), **ranks.rng_states(),
                     **({"ended_line": logged} if step == t.steps else {})}  # put back by check_kept
            saved = ranks.on_main(checkpoint.save_checkpoint, run_dir, step, model, cfg, run["base_path"], optimizer,
                                  scheduler, extra)
            stop_signal = stop_signal or ranks.agree_signal(watch)  # heard as it was written: it holds this step
        if too_many_bad:
            raise guard.too_many_bad_steps(step, progress.bad_steps, t.max_bad_steps, where, saved)
        if stop_signal:
            raise watch.stopped_by_signal(step, saved)
    bar.close()

    # the end: the final evaluation, the adapter, and one memory line (the peak by category, beside the estimate for
    # the longest micro-batch this run padded to; rank 0's with several processes). A signal heard until the adapter
    # is begun stops as after a step, with the last step's checkpoint (exit 130/143; --resume writes the adapter).
    last_checkpoint = run_dir / f"checkpoint-{step}" if step else None
    if ranks.agree_signal(watch):
        raise watch.stopped_by_signal(step, last_checkpoint)
    if step and progress.bad_steps >= step:  # within train.max_bad_steps, but no step updated the adapter
        raise guard.nothing_trained(step)
    watch.at("the final evaluation", step)
    final, started = held_out(step, "after training")
    if ranks.agree_signal(watch):
        raise watch.stopped_by_signal(step, last_checkpoint)
    watch.at(guard.FINAL_SAVE, step)  # a signal from here on lets the run end, done (guard.py)
    ranks.on_main(checkpoint.save_final, model, cfg, run["base_path"], run_dir, step)
    first = progress.first_eval
    if first:
        # train.eval_batches caps the rows in batches of train.batch_size, which a resume may change
        other = "" if first.get("eval_rows", final["eval_rows"]) == final["eval_rows"] else \
            f"; before on {first['eval_rows']} rows, after on {final['eval_rows']}: train.batch_size or " \
            "train.eval_batches changed since"
        print(f"held-out loss {first['eval_loss']:.4f} -> {final['eval_loss']:.4f}, exact match "
              f"{100 * first['eval_exact_match']:.1f}% -> {100 * final['eval_exact_match']:.1f}% ({since(started)}"
              f"{other})")
    else:  # train.eval_before=false
        print(f"held-out loss {final['eval_loss']:.4f}, exact match {100 * final['eval_exact_match']:.1f}% "
              f"({since(started)})")
    print(f"adapter written to {run_dir}")
    print(ranks.on_main(profiler.write, run_dir / rundir.MEMORY, cfg, longest or None, ranks.size))
    Session.ended = 0  # done: a signal as the command unwinds and exits leaves its status 0 (qlora/cli.py)
    return {"before": first, "after": final, "last_step": last}


def _start(cfg: Config, resume: bool, overwrite: bool, watch: guard.RunGuard,
           ranks: distributed.Ranks) -> tuple[dict, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, Progress,
                                              MetricsLog, PhaseTracker]:
    """Everything before the first step: the run dir checked (read only) and the plan against the card, the model and
    data, the optimizer and schedule, the newest intact checkpoint; then the run's first write and its metrics file.
    From here on SIGINT/SIGTERM stop the run at the end of a step, with a checkpoint."""
    t, run_dir = cfg.train, Path(cfg.output.dir)
    seen = rundir.check_run_dir(run_dir, cfg, resume, overwrite)
    if resume and not overwrite:
        launch.check_same_checkpoints(ranks, run_dir)
    no_gpu = t.device == "cuda" and not ranks.several and not torch.cuda.is_available()
    device = ranks.device if ranks.several else resolve_device(t.device, fix=cpu_instead(cfg) if no_gpu else "")
    use_kernel(cfg, device)  # SDPA's CUDA kernel as model.sdpa_backend asks
    if t.plan == "fastest":  # the levers for this card and host, printed and recorded before loading
        use_plan(cfg, device, ranks.size, ranks.local_size, ranks.least)
    # A step the estimate (with the allocator's margin) puts beyond the card, or the host, is refused before the base
    # is loaded, with the longest data.max_seq_len that fits; one that fits is said with its estimate.
    say_fits(cfg, device, ranks.size, ranks.local_size)
    profiler = PhaseTracker(resolve_device(t.device))  # before loading: on CPU its baseline is the process without it
    watch.device, watch.profiler = profiler.device, profiler  # for the report if memory runs out, loading included
    run = prepare(cfg, profiler, resuming=resume and bool(checkpoint.checkpoint_dirs(run_dir)), ranks=ranks)
    n_rows, watch.rows = len(run["train_rows"]), (run["train_rows"], run["eval_rows"])
    check_step_rows(t.batch_size, t.grad_accum, n_rows, ranks.size, cfg.data.pack)
    print_summary(cfg, run, ranks.size)
    optimizer = build_optimizer([p for p in run["model"].parameters() if p.requires_grad], cfg)
    scheduler = build_scheduler(optimizer, cfg)
    progress, damaged = resume_progress(cfg, run["model"], optimizer, scheduler, ranks) if resume else (Progress(), [])
    same_rows(cfg, progress.state, n_rows, len(run["eval_rows"]), run["rows_sha256"])
    # Rank 0 alone reads metrics.jsonl (it alone writes it), and on_main ends every process as rank 0 ended.
    kept = ranks.on_main(check_kept, run_dir / checkpoint.METRICS, progress.state.get("metrics_bytes", 0),
                         progress.step if progress.ended else 0, progress.state.get("ended_line", ""))
    # the first write: the run's config (model, data and checkpoint are checked by now, by every process)
    ranks.on_main(rundir.start_run, run_dir, cfg, overwrite, seen, damaged)
    # the old run cleared (--overwrite): from here on a checkpoint is this run's, to continue with --resume (_main)
    watch.replacing, Session.intact = False, Session.intact and functools.partial(checkpoint.intact_line, run_dir)
    if progress.step:  # a kill between a checkpoint's rename and its pruning left one too many (train.keep_checkpoints)
        ranks.on_main(checkpoint.prune, run_dir, t.keep_checkpoints, run_dir / f"checkpoint-{progress.step}")
    if run["loftq_shifts"]:
        ranks.on_main(save_shifts, run_dir, run["loftq_shifts"])
    # A run resumed past the last step of a shorter one: the training line logged there for being the last is none of
    # a run straight through, unless that run's train.log_every logged it (the step ran under its settings).
    unlogged = progress.step if progress.ended and progress.step < t.steps and \
        progress.step % progress.ran.get("log_every", t.log_every) else None
    metrics = MetricsLog(run_dir / checkpoint.METRICS, kept=kept, write=ranks.main, unlogged=unlogged)
    watch.catch_signals()
    return run, optimizer, scheduler, progress, metrics, profiler


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 when the run completes, else an exit status of qlora/errors.py with one line on stderr."""
    return run(_main, argv, ranked=True)


def _main(argv: list[str]) -> None:
    if wants_help(argv):  # `python -m qlora.train --help` is answered earlier, by qlora/__init__.py
        print(help_text("qlora.train", argv), end="")
        return
    quiet_libraries()  # for a run started in-process; `python -m qlora.train` did it before importing transformers
    ranks = launch.from_env()
    if not ranks.main:  # rank 0 speaks for the run, from its first line on (a repeated key's note too)
        launch.quiet()
    recipe, flags, overrides = split_args(argv, USAGE)
    resuming = "--resume" in flags and "--overwrite" not in flags
    # A resume's overrides change the run on disk, and resume_config checks them against its values (against the
    # recipe's, --lora.loftq_iters=3 on a run with lora.init=loftq was refused as needing lora.init=loftq, its own).
    cfg = resolve_paths(apply_overrides(load_recipe(recipe), overrides, check=not resuming))
    if unknown := [f for f in flags if f not in FLAGS]:
        close = difflib.get_close_matches(unknown[0], FLAGS, 1, 0.5)
        raise ConfigError(f"unknown flag {unknown[0]}: {f'did you mean {close[0]}? ' if close else ''}{USAGE}")
    if resuming:  # the run on disk, changed only where the rules allow; one finished is said, not loaded (progress.py)
        cfg = runconfig.resume_config(cfg, overrides)
        done = finished(cfg)  # before a plan changes cfg from its run_config.json; several processes, once joined
        if not ranks.several and said_done(cfg, ranks, done):
            return
    # Before the processes join and each loads the whole base into host memory: a streamed base is one process's.
    check_processes(cfg, ranks.size)
    if cfg.train.plan == "fastest":  # a lever set on the command line is the user's, not the plan's
        unplanned(cfg, overrides, Path(cfg.output.dir) / checkpoint.RUN_CONFIG if resuming else None)
        keep_overridden(cfg, overrides)
    # An interruption or a full disk from here on names what is intact (under --overwrite, the old run's: intact_line)
    Session.intact = functools.partial(checkpoint.intact_line, Path(cfg.output.dir), "--overwrite" in flags)
    train(cfg, resume="--resume" in flags, overwrite="--overwrite" in flags, finished=done if resuming else None)


if __name__ == "__main__":
    sys.exit(main())
