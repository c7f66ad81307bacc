"""`python -m qlora.export RUN_DIR --gguf OUT.gguf`: the command (the export: gguf_file.py, its check: check.py)."""

from __future__ import annotations

import logging
import sys

from qlora.cli import run
from qlora.commands import export_parser
from qlora.console import quiet_libraries
from qlora.data.files import read_rows
from qlora.errors import ConfigError, check_writable
from qlora.export.check import check_export, held_out_source
from qlora.export.gguf_file import export
from qlora.training.assemble import read_run_config
from qlora.training.rundir import run_owned


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    quiet_libraries()
    logging.getLogger("gguf").setLevel(logging.ERROR)  # the writer's and SpecialVocab's notes: said here, or moot
    out = args.gguf
    check_writable(out, "--gguf")
    if out.suffix != ".gguf":
        raise ConfigError(f"--gguf={out} does not end in .gguf, the name llama.cpp, Ollama and LM Studio look for: "
                          f"use {out.with_suffix('.gguf').name}")
    if out.exists():
        raise ConfigError(f"--gguf={out} exists: choose another path or delete it")
    # Once: a missing run is named before anything loads (or run_owned resolves it), and the run checked here is the
    # run exported and the check's reference
    cfg = read_run_config(args.run_dir)
    if (top := run_owned(out, args.run_dir)) is not None:  # a checkpoint, which the run may rename or remove
        raise ConfigError(f"--gguf={out} lies in the run's own {top}, which its training reads, renames or removes: "
                          f"choose a path outside it, e.g. {args.run_dir.resolve()}.gguf")
    if args.rows < 1:
        raise ConfigError(f"--rows={args.rows}: the check needs at least one held-out row, e.g. --rows=32")
    if not args.skip_check:  # the data the check reads, found missing or malformed before the export, not after it
        read_rows(*held_out_source(cfg, args.run_dir))
    check = None if args.skip_check else (
        lambda path: check_export(args.run_dir, out, args.type, args.rows, path=path, cfg=cfg))
    export(args.run_dir, out, args.type, args.device, check, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
