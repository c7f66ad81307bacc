"""How a run's watch (qlora/training/guard.py) hears SIGINT, SIGTERM, SIGHUP and a reader that left, in this process:
what it installs, what it says, the stop it gives and what it puts back; and how a skipped step names its rows. The
runs that end so are in tests/test_crash.py and tests/test_console.py (minutes); these call the guard itself."""

from __future__ import annotations

import errno
import io
import math
import os
import pty
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from tqdm import tqdm

from qlora.config import Config
from qlora.data.batches import batch_rows
from qlora.errors import Session
from qlora.training.guard import RunGuard, WatchedStdout, data_position

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture(autouse=True)
def undecided(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop decides the command's ending (Session.ended): put back after, for the tests that follow in-process."""
    monkeypatch.setattr(Session, "ended", None)


@pytest.fixture
def heard() -> list[int]:
    """The handlers a command had before the loop (cli.py's): each records its signal here; put back after."""
    got: list[int] = []
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, frame: got.append(signum))
    yield got
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_the_watch_stops_after_the_step_in_flight_and_puts_back_what_it_replaced(
        tiny_config: Config, heard: list[int], capfd: pytest.CaptureFixture) -> None:
    handlers, stdout = {sig: signal.getsignal(sig) for sig in SIGNALS}, sys.stdout
    with RunGuard(tiny_config) as watch:
        watch.catch_signals()
        assert isinstance(sys.stdout, WatchedStdout)
        watch.bar = bar = tqdm(total=4, file=io.StringIO())
        signal.raise_signal(signal.SIGTERM)
        assert watch.signal == signal.SIGTERM and heard == []  # heard, not acted on: the step goes on
        assert capfd.readouterr().err == ("\nSIGTERM: stopping after the step in flight, with a checkpoint (SIGTERM "
                                          "again stops at once)\n")
        signal.raise_signal(signal.SIGTERM)  # the second acts at once, as the command's own handler has it
        assert heard == [signal.SIGTERM]
        stop = watch.stopped_by_signal(3, Path("run/checkpoint-3"))
        assert (stop.code, str(stop)) == (143, "stopped by SIGTERM after step 3; run/checkpoint-3 holds it: continue "
                                               "with --resume")
        stop = watch.stopped_by_signal(0, None)
        assert (stop.code, str(stop)) == (143, "stopped by SIGTERM before the first step; no checkpoint was written: "
                                               "run the command again to start")
    assert {sig: signal.getsignal(sig) for sig in SIGNALS} == handlers and sys.stdout is stdout
    assert bar.disable  # closed: its line ended before the stop's
    signal.raise_signal(signal.SIGINT)  # after the run, the command's own handler again
    assert heard == [signal.SIGTERM, signal.SIGINT]


def test_a_signal_met_as_a_stop_unwinds_leaves_the_stops_line(tiny_config: Config,
                                                              capfd: pytest.CaptureFixture) -> None:
    """kill -9 of torchrun: rank 0 stopped for the SIGTERM another rank passed on (Ranks.agree_signal), then its own
    launcher watch's SIGTERM came as the stop unwound, was raised in its place, and the run ended "stopped by SIGTERM;
    .../checkpoint-5 is intact" (tests/test_distributed.py's kill -9 case, 1 of 15 tries)."""
    from qlora.cli import run

    def stopped(argv: list[str]) -> None:
        try:
            with RunGuard(tiny_config) as watch:
                watch.catch_signals()
                watch.signal = signal.SIGTERM  # as agree_signal sets it: this process heard none itself
                raise watch.stopped_by_signal(5, Path("run/checkpoint-5"))
        finally:  # as launch.joined's, which takes the process group down: the command's own handler again
            signal.raise_signal(signal.SIGTERM)  # the launcher watch's

    assert run(stopped, []) == 143
    assert capfd.readouterr().err == ("stopped by SIGTERM after step 5; run/checkpoint-5 holds it: continue with "
                                      "--resume\n")


def test_a_process_that_does_not_speak_for_the_run_hears_a_signal_without_a_word(
        tiny_config: Config, heard: list[int], capfd: pytest.CaptureFixture) -> None:
    with RunGuard(tiny_config, main=False) as watch:
        watch.catch_signals()
        signal.raise_signal(signal.SIGINT)
        assert watch.signal == signal.SIGINT and heard == []
    assert capfd.readouterr().err == ""


def test_sighup_is_heard_unless_ignored_and_a_signal_while_loading_is_kept(
        tiny_config: Config, heard: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # under nohup: not the trainer's to stop
    with RunGuard(tiny_config) as watch:
        watch.catch_signals()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and watch.signal is None
    signal.raise_signal(signal.SIGTERM)  # a run that heard none puts back the command's handlers too
    assert heard == [signal.SIGTERM]
    signal.signal(signal.SIGHUP, lambda signum, frame: heard.append(signum))
    # A Ctrl-C that came while a library loaded, and that the library caught and went on from (qlora/cli.py)
    monkeypatch.setattr(Session, "signal", signal.SIGINT)
    with RunGuard(tiny_config) as watch:
        watch.catch_signals()
        assert watch.signal == signal.SIGINT
        signal.raise_signal(signal.SIGHUP)
        assert watch.signal == signal.SIGHUP and heard == [signal.SIGTERM]


def test_a_reader_that_left_stops_the_run_as_sigpipe_or_sighup_after_any_signal_before(tiny_config: Config) -> None:
    def reader_gone(make: Callable[[], io.TextIOWrapper], already: int | None = None) -> int | None:
        """A line written to, then flushed on, a stream whose reader `make` closes; the signal the watch then has."""
        watch = RunGuard(tiny_config)
        watch.signal = already
        stream = make()
        out = WatchedStdout(stream, watch)
        assert out.write("a line\n") == len("a line\n")  # line-buffered: written through, into the closed pipe
        out.write("more")
        out.flush()
        out.write("and more\n")  # into /dev/null from then on
        stream.close()
        return watch.signal

    def pipe() -> io.TextIOWrapper:  # `| head` that has its lines
        read, write = os.pipe()
        os.close(read)
        return open(write, "w", buffering=1)

    def terminal() -> io.TextIOWrapper:  # a terminal closed: EIO
        main, follower = pty.openpty()
        os.close(main)
        return open(follower, "w", buffering=1)

    def buffered_pipe() -> io.TextIOWrapper:  # the reader leaves between a write and its flush
        read, write = os.pipe()
        os.close(read)
        return open(write, "w")

    assert reader_gone(pipe) == signal.SIGPIPE
    assert reader_gone(buffered_pipe) == signal.SIGPIPE
    assert reader_gone(terminal) == signal.SIGHUP
    assert reader_gone(pipe, signal.SIGTERM) == signal.SIGTERM  # the first to come decides the exit status
    with open("/dev/full", "w") as full:  # a disk full is no reader gone: the error it is
        out = WatchedStdout(full, RunGuard(tiny_config))
        out.write("x")
        with pytest.raises(OSError) as err:
            out.flush()
        assert err.value.errno == errno.ENOSPC
        full.buffer.raw.close()  # the line it kept would only fail again on closing


def test_a_skipped_step_names_its_micro_batches_and_their_rows() -> None:
    def rows(*indices: int) -> str:
        return ", ".join(map(str, sorted(r for i in indices for r in batch_rows(20, 2, 0, i))))

    # train.grad_accum=1: one micro-batch a step
    assert data_position(5, 1, 20, 2, 0) == f"micro-batch 5 (rows {rows(5)} of the training split)"
    assert data_position(5, 2, 20, 2, 0) == f"micro-batches 5-6 (rows {rows(5, 6)} of the training split)"


def test_the_shape_an_out_of_memory_report_names_is_the_steps_longest_micro_batch(tiny_config: Config) -> None:
    """The report's 'micro-batch R rows x T tokens', and the width its suggestions scale from where the estimator has
    no model: the first micro-batch's, whatever ran out (a step of 8 x 30 then 8 x 60 tokens was reported as 8 x 30)."""
    import torch

    from qlora.training.oom import oom_report

    watch = RunGuard(tiny_config)
    micro = [{"input_ids": torch.zeros(8, width, dtype=torch.long)} for width in (30, 60, 45)]
    watch.at("the forward and backward", 6, micro)
    assert watch.batch_shape == (8, 60)
    tiny_config.train.grad_accum = 3
    report = oom_report(MemoryError(), tiny_config, torch.device("cpu"), watch.phase, watch.step, watch.batch_shape,
                        None)
    assert report.startswith("out of memory in the forward and backward of step 7, micro-batch 8 rows x 60 tokens "
                             "(the step's longest): MemoryError")
    watch.at("the optimizer step", 6)
    assert watch.batch_shape is None


@pytest.mark.parametrize("stop", ["eval", "diverged"])
def test_a_base_that_gives_nan_names_resume_where_a_checkpoint_holds_the_run(tiny_config: Config, tmp_path: Path,
                                                                             stop: str) -> None:
    """A base whose logits are non-finite: with fp32 compute the newest checkpoint can go on (an overflow in the
    compute dtype), yet the line said 'then start again with --overwrite' whatever the run held, advice that deletes
    its checkpoints. With one, it names it and --resume; with none, --overwrite as before."""
    from qlora.training.guard import diverged, non_finite_eval

    def line() -> str:
        return str(non_finite_eval(tiny_config, 3, float("nan"), base_fails=True) if stop == "eval" else
                   diverged(tiny_config, 3, 2, "micro-batch 2", base_fails=True))

    tiny_config.output.dir = str(tmp_path)
    assert "try --quant.compute_dtype=fp32, then start again with --overwrite" in line()
    (tmp_path / "checkpoint-2").mkdir()
    for name in ("trainer_state.pt", "optimizer.pt"):
        (tmp_path / "checkpoint-2" / name).touch()
    assert f"try --quant.compute_dtype=fp32 and continue from {tmp_path / 'checkpoint-2'} with --resume, or check " \
           "model.path and start again with --overwrite" in line(), line()


def test_a_diverged_evaluation_names_the_checkpoint_of_a_relative_output_dir_as_it_is(
        tiny_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The line's sentence after 'not written as the result.' was capitalised by its first letter, and with a relative
    output.dir (the tiny recipe's runs/tiny) that letter is the path's: it named Runs/x/checkpoint-2, no folder."""
    from qlora.training.guard import non_finite_eval

    monkeypatch.chdir(tmp_path)
    tiny_config.output.dir = "runs/x"
    (tmp_path / "runs" / "x" / "checkpoint-2").mkdir(parents=True)
    for name in ("trainer_state.pt", "optimizer.pt"):
        (tmp_path / "runs" / "x" / "checkpoint-2" / name).touch()
    line = str(non_finite_eval(tiny_config, 2, float("nan")))
    assert "result. runs/x/checkpoint-2 is the newest checkpoint: continue from it with --resume" in line, line
    assert "result. Start again with a lower train.lr (--overwrite)" in str(non_finite_eval(tiny_config, 4, math.nan))


def test_a_final_evaluation_that_fails_names_the_way_to_an_earlier_checkpoint_that_keeps_it(
        tiny_config: Config, tmp_path: Path) -> None:
    """The last step's checkpoint holds the adapter that failed, so the line said 'start again with a lower train.lr
    (--overwrite)', which deletes the earlier good checkpoints train.save_every kept too. With one, it names the move
    that sets the newest aside and --resume from the earlier one; the move it names leaves that one the newest that
    --resume takes. Without one, --overwrite as before."""
    import shlex

    from qlora.training.checkpoint import list_checkpoints
    from qlora.training.guard import non_finite_eval

    run = Path(tiny_config.output.dir)
    (run / "checkpoint-4").mkdir(parents=True)
    for name in ("trainer_state.pt", "optimizer.pt"):
        (run / "checkpoint-4" / name).touch()
    assert str(non_finite_eval(tiny_config, 4, math.nan)).endswith("Start again with a lower train.lr (--overwrite)")
    (run / "checkpoint-2").mkdir()
    for name in ("trainer_state.pt", "optimizer.pt"):
        (run / "checkpoint-2" / name).touch()
    line = str(non_finite_eval(tiny_config, 4, math.nan))
    said = f"{run / 'checkpoint-4'} holds this adapter, {run / 'checkpoint-2'} an earlier one: set the newest aside"
    assert said in line and "continue from checkpoint-2 with --resume and a lower train.lr" in line, line
    move = shlex.split(line.split("(mv ", 1)[1].split(")", 1)[0])
    assert move == [str(run / "checkpoint-4"), str(run / "checkpoint-4.damaged")]
    (run / "checkpoint-4").rename(move[1])
    assert list_checkpoints(run) == [run / "checkpoint-2"]


@pytest.mark.parametrize("stop", ["weights", "eval", "diverged"])
def test_a_stop_for_its_numbers_names_the_earlier_checkpoint_before_overwrite(tiny_config: Config, stop: str) -> None:
    """A stop before the last step said 'or start again with --overwrite if that one has diverged too', which deletes
    the earlier checkpoints train.save_every and train.keep_checkpoints kept too. With one, it names the move that sets
    the newest aside and the earlier one to continue from; the move it names leaves that one the newest --resume takes.
    With the newest alone, --overwrite as before."""
    import shlex

    from qlora.training.checkpoint import list_checkpoints
    from qlora.training.guard import diverged, non_finite_eval, non_finite_weights

    def line() -> str:
        return str(non_finite_weights(tiny_config, 3) if stop == "weights" else
                   non_finite_eval(tiny_config, 3, math.nan) if stop == "eval" else
                   diverged(tiny_config, 3, 2, "micro-batch 2"))

    run = Path(tiny_config.output.dir)
    for name in ("checkpoint-2", "checkpoint-1"):
        (run / name).mkdir(parents=True)
        for held in ("trainer_state.pt", "optimizer.pt"):
            (run / name / held).touch()
        if name == "checkpoint-2":
            assert line().endswith(f"{run / name} is the newest checkpoint: continue from it with --resume and a lower "
                                   "train.lr, or start again with --overwrite if that one has diverged too"), line()
    assert line().endswith(f"{run / 'checkpoint-2'} is the newest checkpoint: continue from it with --resume and a "
                           f"lower train.lr; if it has diverged too, set it aside (mv {run / 'checkpoint-2'} "
                           f"{run / 'checkpoint-2.damaged'}) and continue from checkpoint-1 the same way, or start "
                           "again (--overwrite, which deletes every checkpoint)"), line()
    move = shlex.split(line().split("(mv ", 1)[1].split(")", 1)[0])
    (run / "checkpoint-2").rename(move[1])
    assert list_checkpoints(run) == [run / "checkpoint-1"]
