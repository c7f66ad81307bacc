"""QLoRA fine-tuning: NF4 base, our LoRA, paged AdamW, memory reports."""

import logging
import sys

# bitsandbytes 0.50 logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels` package (a hub
# download) is missing. Its bf16 CPU kernel is never used here (model.keep_cpu_weights_exact turns that path off), and
# the line would be a second line under every one-line error, so it is silenced before anything imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

if sys.argv[:1] == ["-m"]:  # `python -m qlora.<command>`: runpy imports this package before the command's imports
    from qlora.cli import catch_early_signals
    from qlora.commands import answer_help_early
    from qlora.console import quiet_libraries

    catch_early_signals()  # a Ctrl-C or SIGTERM while torch loads ends in one line, not a traceback
    answer_help_early()  # `--help` is answered (and the process ends) before the command imports torch
    quiet_libraries()  # before transformers is imported: its progress bars only on a terminal
