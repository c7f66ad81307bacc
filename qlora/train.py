"""`python -m qlora.train RECIPE.py [--section.key=value ...] [--resume]`: the training loop.

recipe -> base in NF4 -> LoRA on every linear layer -> data -> this loop -> adapter, metrics.jsonl, checkpoints.

The loop is read top to bottom: set up, resume, evaluate before, then per step forward and backward, clip and step,
log, evaluate, save or stop; then the final evaluation, the adapter and one memory line. Everything it calls is a
component under qlora/ (qlora/training/ for what only training needs) that never imports this file back.
"""

from __future__ import annotations

import difflib
import functools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from qlora.adapters.loftq import save_shifts
from qlora.base.attention import use_kernel
from qlora.base.load import resolve_device
from qlora.cli import run
from qlora.commands import TRAIN, help_text, wants_help
from qlora.config import Config, apply_overrides, load_recipe, resolve_paths, split_args
from qlora.console import announce, draws_bars, quiet_libraries, since, terminal_columns, widest_meter
from qlora.data.batches import eval_batches, micro_batches, resume_position
from qlora.errors import ConfigError, Session
from qlora.levers.stream_base.settings import check_processes
from qlora.memory.plan import fewer_rows, keep_overridden, reshaped, unplanned, use_plan
from qlora.memory.preflight import check_fits
from qlora.memory.profiler import PhaseTracker
from qlora.training import checkpoint, distributed, guard, rundir
from qlora.training.assemble import prepare, print_summary
from qlora.training.metrics import MetricsLog
from qlora.training.optimizer import (
    build_optimizer,
    build_scheduler,
    restart_from_weights,
    retarget,
    stepped_params,
    updated_weights,
)
from qlora.training.step import announce_evaluation, evaluate, forward_backward, to_device

USAGE, FLAGS = TRAIN.usage, TRAIN.flag_names


@dataclass
class Progress:
    """Where the run stands: what a checkpoint carries over to the process that resumes it."""

    step: int = 0
    first_eval: dict = field(default_factory=dict)
    """The held-out scores before training, for the closing "before -> after" line."""
    bad_steps: int = 0
    state: dict = field(default_factory=dict)
    """The resumed checkpoint's trainer state (data position, metrics length, RNG), or empty."""


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the recipe; return the final metrics. A run that ends early raises Stop (qlora/training/guard.py: how)."""
    # RunGuard turns an out-of-memory error anywhere below into a report; joined, a lost process into exit 6.
    with distributed.joined(cfg) as ranks, guard.RunGuard(cfg, ranks.main) as watch:
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

    if progress.step == 0 and t.eval_before:
        watch.at("the evaluation before training", 0)
        progress.first_eval, started = held_out(0, "before training", "; --train.eval_before=false skips it")
        print(f"before training: held-out loss {progress.first_eval['eval_loss']:.4f}, "
              f"exact match {100 * progress.first_eval['eval_exact_match']:.1f}% ({since(started)})")
        profiler.mark("evaluate")
        if ranks.agree_signal(watch):  # no step is in flight: stop now rather than after one
            raise watch.stopped_by_signal(0, None)

    # The next micro-batch (batch_size x processes rows): after the checkpoint's, from the same row if either changed.
    index = resume_position(progress.state, t.batch_size * ranks.size, n_rows, progress.step * t.grad_accum)
    batches = micro_batches(run["train_rows"], t.batch_size, t.seed, pad_id, start=index, rank=ranks.rank,
                            world=ranks.size)
    profiler.watch(model, optimizer)
    model.train()
    watch.bar = bar = _progress_bar(cfg, progress.step, ranks)
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
            metrics.write(last)
        _show_step(bar, last, t.steps, began)

        # evaluate
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            watch.at("an evaluation", step)
            scores, started = held_out(step, f"at step {step}")
            tqdm.write(f"step {step}: held-out loss {scores['eval_loss']:.4f}, exact match "
                       f"{100 * scores['eval_exact_match']:.1f}% ({since(started)})", file=sys.stdout)
            profiler.mark("evaluate")

        # save; stop if told to (a signal from here on waits for the next step) or if too many steps were skipped
        stop_signal, too_many_bad = ranks.agree_signal(watch), not good and progress.bad_steps > t.max_bad_steps
        if too_many_bad:  # the adapter, not the data, if held-out rows fail too: a checkpoint of it is of no use
            probe = to_device(next(eval_batches(run["eval_rows"], t.batch_size, pad_id)), device)
            if not guard.finite_held_out(model, probe, chunk_size=t.loss_chunk_size):  # every process: same rows
                raise guard.diverged(cfg, step, progress.bad_steps, where, base_fails())
        if (t.save_every and step % t.save_every == 0) or step == t.steps or too_many_bad or stop_signal:
            watch.at("saving a checkpoint", step)
            extra = {"first_eval": progress.first_eval, "bad_steps": progress.bad_steps,
                     "metrics_bytes": metrics.size(), "micro_batch": index, "batch_size": t.batch_size * ranks.size,
                     "rows": [n_rows, len(run["eval_rows"])],
                     "optimizer": t.optimizer, "longest": longest, "memory": profiler.carried(),
                     **ranks.rng_states()}
            saved = ranks.on_main(checkpoint.save_checkpoint, run_dir, step, model, cfg, run["base_path"], optimizer,
                                  scheduler, extra)
        if too_many_bad:
            raise guard.too_many_bad_steps(step, progress.bad_steps, t.max_bad_steps, where, saved)
        if stop_signal:
            raise watch.stopped_by_signal(step, saved)
    bar.close()

    # the end: the final evaluation, the adapter, and one memory line (the peak by category, beside the estimate for
    # the longest micro-batch this run padded to; rank 0's with several processes)
    # A signal heard while the last checkpoint was written, or during the final evaluation, stops here as it would
    # after a step: with that checkpoint (written at the last step), exit 130/143, and --resume writes the adapter.
    last_checkpoint = run_dir / f"checkpoint-{step}" if step else None
    if ranks.agree_signal(watch):
        raise watch.stopped_by_signal(step, last_checkpoint)
    watch.at("the final evaluation", step)
    final, started = held_out(step, "after training")
    if ranks.agree_signal(watch):
        raise watch.stopped_by_signal(step, last_checkpoint)
    ranks.on_main(checkpoint.save_final, model, cfg, run["base_path"], run_dir)
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
    print(ranks.on_main(profiler.write, run_dir / rundir.MEMORY, cfg, longest or None))
    return {"before": first, "after": final, "last_step": last}


def _start(cfg: Config, resume: bool, overwrite: bool, watch: guard.RunGuard,
           ranks: distributed.Ranks) -> tuple[dict, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, Progress,
                                              MetricsLog, PhaseTracker]:
    """Everything before the first step: the run dir checked (read only) and the plan against the card, the model and
    data, the optimizer and schedule, the newest intact checkpoint; then the run's first write and its metrics file.
    From here on SIGINT/SIGTERM stop the run at the end of a step, with a checkpoint."""
    t, run_dir = cfg.train, Path(cfg.output.dir)
    seen = rundir.check_run_dir(run_dir, cfg, resume, overwrite)
    device = ranks.device if ranks.several else resolve_device(t.device)
    use_kernel(cfg, device)  # SDPA's CUDA kernel as model.sdpa_backend asks
    if t.plan == "fastest":  # the levers for this card and host, printed and recorded before loading
        use_plan(cfg, device, ranks.size)
    # A step the estimate (with the allocator's margin) puts beyond the card, or the host, is refused before the base
    # is loaded, with the longest data.max_seq_len that fits.
    check_fits(cfg, device, ranks.size)
    profiler = PhaseTracker(resolve_device(t.device))  # before loading: on CPU its baseline is the process without it
    watch.device, watch.profiler = profiler.device, profiler  # for the report if memory runs out, loading included
    run = prepare(cfg, profiler, resuming=resume and bool(checkpoint.checkpoint_dirs(run_dir)), ranks=ranks)
    n_rows = len(run["train_rows"])
    if t.batch_size * ranks.size > n_rows and reshaped(cfg):  # the plan chose the shape before the rows were counted
        fewer_rows(cfg, n_rows // ranks.size)
    if t.batch_size * ranks.size > n_rows:
        raise ConfigError(f"train.batch_size={t.batch_size}{f' x {ranks.size} processes' if ranks.several else ''} "
                          f"exceeds the {n_rows} training rows{' (after packing)' if cfg.data.pack else ''}: use at "
                          f"most --train.batch_size={max(1, n_rows // ranks.size)}")
    print_summary(cfg, run, ranks.size)
    optimizer = build_optimizer([p for p in run["model"].parameters() if p.requires_grad], cfg)
    scheduler = build_scheduler(optimizer, cfg)
    progress, damaged = _resume(cfg, run["model"], optimizer, scheduler, ranks) if resume else (Progress(), [])
    same_rows(cfg, progress.state, n_rows, len(run["eval_rows"]))
    # the first write: the run's config (model, data and checkpoint are checked by now, by every process)
    ranks.on_main(rundir.start_run, run_dir, cfg, overwrite, seen, damaged)
    if progress.step:  # a kill between a checkpoint's rename and its pruning left one too many (train.keep_checkpoints)
        ranks.on_main(checkpoint.prune, run_dir, t.keep_checkpoints, run_dir / f"checkpoint-{progress.step}")
    if run["loftq_shifts"]:
        ranks.on_main(save_shifts, run_dir, run["loftq_shifts"])
    metrics = MetricsLog(run_dir / checkpoint.METRICS, keep_bytes=progress.state.get("metrics_bytes", 0),
                         write=ranks.main)
    watch.catch_signals()
    return run, optimizer, scheduler, progress, metrics, profiler


def _resume(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LambdaLR, ranks: distributed.Ranks) -> tuple[Progress, list[Path]]:
    """Load the newest intact checkpoint into the model, optimizer and scheduler (damaged newer ones are named and,
    once the run starts writing, set aside); the progress it carries and the damaged checkpoints."""
    run_dir = Path(cfg.output.dir)
    resumed, state, damaged = checkpoint.resume_latest(run_dir, model, cfg, optimizer, scheduler)
    for path, why in damaged if ranks.main else ():
        print(f"{path} is damaged ({why}): it is set aside as {rundir.aside_name(path).name} for inspection",
              file=sys.stderr)
    if resumed is None:
        print(f"no checkpoint in {run_dir} yet: starting at step 0")
        return Progress(state=state), [p for p, _ in damaged]
    progress = Progress(state["step"], state.get("first_eval", {}), state.get("bad_steps", 0), state)
    if progress.step > cfg.train.steps:
        raise ConfigError(f"train.steps={cfg.train.steps} is below step {progress.step}, where {resumed} stands: "
                          f"set --train.steps={progress.step} or more to continue")
    ranks.restore_rng(state)
    print(f"resumed from {resumed} at step {progress.step}" + (" (the newest usable checkpoint)" if damaged else ""))
    if "optimizer_restarted" in state:  # cfg's optimizer, fresh; its fp32 masters from the resumed weights
        restart_from_weights(optimizer)
        print(f"train.optimizer {state['optimizer_restarted']} -> {cfg.train.optimizer}: its state starts afresh")
    retarget(optimizer, scheduler, cfg)
    return progress, [p for p, _ in damaged]


def same_rows(cfg: Config, state: dict, n_train: int, n_eval: int) -> None:
    """Refuse to resume on other rows than the checkpoint's: the batch order and the held-out split are functions of
    the row count (data.batches.batch_rows), so a row more or less reorders the rest of the epoch and changes what the
    losses before and after compare. A shorter data.max_seq_len drops the rows whose learned part it cuts off."""
    rows = state.get("rows")
    if rows is None or rows == [n_train, n_eval]:  # a fresh run, or a checkpoint written before rows were recorded
        return
    raise ConfigError(f"the data now gives {n_train} training and {n_eval} held-out rows, the run trained on "
                      f"{rows[0]} and held out {rows[1]}: a data file changed, or data.max_seq_len="
                      f"{cfg.data.max_seq_len} keeps other rows than the run's length did (a row whose learned part "
                      "lies beyond it is dropped), which would reorder the rest of the epoch and the held-out set; "
                      "resume with the run's data and a data.max_seq_len that keeps the same rows (its "
                      "run_config.json has the one it trained with), or start a new run")


def _progress_bar(cfg: Config, step: int, ranks: distributed.Ranks) -> tqdm:
    """Rank 0's bar, or in a log a line per tenth of the run (the bar's frames would be noise there); loss and
    tokens/s are the global batch's. A terminal narrower than the bar's own figures gets the lines too: tqdm cuts its
    line at the edge, and on 20 columns `10/300` read `10/30`."""
    t = cfg.train
    desc = "train" if not ranks.several else f"train ({ranks.size} processes)"
    bar = tqdm(total=t.steps, initial=step, desc=desc, dynamic_ncols=True,
               disable=not (ranks.main and draws_bars(sys.stderr, widest_meter(t.steps, desc))))
    if bar.disable and step < t.steps:  # resumed after its last step (stopped in the final evaluation): none
        announce(f"training {t.steps - step} steps of {t.batch_size * t.grad_accum * ranks.size} rows")
    return bar


def _show_step(bar: tqdm, last: dict, steps: int, began: tuple[int, float]) -> None:
    """The step on the bar, or every tenth of the run a line with the same figures. Its time left, as the bar's, is
    from this process's steps so far (`began`: the first and when; evaluations and checkpoints count, loading not):
    the lines had none, and a run in a log said nothing of when it would end."""
    if not bar.disable:  # shown with the step's count: set_postfix's own redraw paired it with the step before
        fields = [f"loss={last['loss']:.4f}", f"lr={last['lr']:.2e}", f"tok_s={last['tokens_per_s']:.0f}",
                  f"mem={last['peak_gib']:.2f}G"]
        bar.set_postfix_str(_fitting(bar, fields, terminal_columns(sys.stderr)), refresh=False)
    bar.update(1)
    step = last["step"]
    if bar.disable and (step % max(1, steps // 10) == 0 or step == steps):
        first, started = began
        left = (time.perf_counter() - started) / (step - first) * (steps - step)
        print(f"step {step}/{steps}: loss {last['loss']:.4f}, lr {last['lr']:.2e}, "
              f"{last['tokens_per_s']:.0f} tokens/s, peak {last['peak_gib']:.2f} GiB, {tqdm.format_interval(left)} "
              "left", flush=True)


def _fitting(bar: tqdm, fields: list[str], columns: int) -> str:
    """The leading `fields` that fit whole beside the bar's own figures (after its next update) on a terminal `columns`
    wide. tqdm cuts its line at the edge, mid-number: on 80 columns `mem=0.09G` read `mem=0.0` and tokens/s was gone,
    on 90 `tok_s=` had no number."""
    meter = {**bar.format_dict, "n": bar.n + 1, "ncols": None, "bar_format": "{l_bar}{r_bar}"}
    for k in range(len(fields), 0, -1):
        postfix = ", ".join(fields[:k])
        if len(tqdm.format_meter(**{**meter, "postfix": postfix})) < columns:  # and a column of bar
            return postfix
    return ""


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 when the run completes, else an exit status of qlora/errors.py with one line on stderr."""
    return run(_main, argv)


def _main(argv: list[str]) -> None:
    if wants_help(argv):  # `python -m qlora.train --help` is answered earlier, by qlora/__init__.py
        print(help_text("qlora.train", argv), end="")
        return
    quiet_libraries()  # for a run started in-process; `python -m qlora.train` did it before importing transformers
    recipe, flags, overrides = split_args(argv, USAGE)
    cfg = resolve_paths(apply_overrides(load_recipe(recipe), overrides))
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise ConfigError(_flag_error(unknown[0]))
    if not distributed.from_env().main:  # rank 0 speaks for the run, from its first line on
        distributed.quiet()
    if "--resume" in flags and "--overwrite" not in flags:  # the run on disk, changed only where the rules allow
        cfg = rundir.resume_config(cfg, overrides)
    # Before the processes join and each loads the whole base into host memory: a streamed base is one process's.
    check_processes(cfg, distributed.from_env().size)
    if cfg.train.plan == "fastest":  # a lever set on the command line is the user's, not the plan's
        unplanned(cfg, overrides)
        keep_overridden(cfg, overrides)
    # An interruption or a full disk from here on names what is intact.
    Session.intact = functools.partial(checkpoint.intact_line, Path(cfg.output.dir))
    train(cfg, resume="--resume" in flags, overwrite="--overwrite" in flags)


def _flag_error(flag: str) -> str:
    if "." in flag:
        return f"{flag} has no value: write {flag}=VALUE"
    close = difflib.get_close_matches(flag, FLAGS, 1, 0.5)
    return f"unknown flag {flag}: {f'did you mean {close[0]}? ' if close else ''}{USAGE}"


if __name__ == "__main__":
    sys.exit(main())
