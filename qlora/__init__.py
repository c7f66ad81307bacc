"""QLoRA fine-tuning: NF4 base, our LoRA, paged AdamW, memory reports."""

import os
import signal
import sys

if sys.argv[:1] == ["-m"]:  # `python -m qlora.<command>`: runpy imports this package before the command's imports
    # Ctrl-C, SIGTERM and SIGHUP are held (blocked) from this first line until the command's handlers are in place,
    # then delivered to them: a Ctrl-C while qlora.cli was imported, or logging before it, was a KeyboardInterrupt
    # traceback, and a SIGTERM ended the process without a word (measured: 30-55 ms of a loaded CPU's start-up).
    # Before this line only the interpreter's own start-up (its site module) is exposed.
    _held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    try:
        from qlora.cli import catch_early_signals

        catch_early_signals()  # a Ctrl-C, SIGTERM or SIGHUP while torch loads ends in one line
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, _held)

import logging  # noqa: E402 (its import is 5-15 ms of the start-up: after the signals are caught)

# PyTorch's caching allocator in expandable segments unless the user chose a setting: without them the H200 battery of
# 2026-12-04 found the 70B step reserving 1.4 GiB (8B: 0.9 GiB) beyond the tensors it held, blocks freed in the wrong
# sizes. Read when CUDA first allocates, so set at import, before any of it; a process whose CUDA runs already keeps
# its own.
if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

# bitsandbytes 0.50 logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels` package (a hub
# download) is missing. Its bf16 CPU kernel is never used here (model.keep_cpu_weights_exact turns that path off), and
# the line would be a second line under every one-line error, so it is silenced before anything imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

if sys.argv[:1] == ["-m"]:
    from qlora.commands import answer_help_early
    from qlora.console import fill_closed_streams, quiet_libraries

    fill_closed_streams()  # `>&-`: their lines go nowhere, and the run goes on
    answer_help_early()  # `--help` is answered (and the process ends) before the command imports torch
    quiet_libraries()  # before transformers is imported: its progress bars only on a terminal
