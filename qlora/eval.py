"""`python -m qlora.eval RUN_DIR [--data FILE]`: reload a finished run and measure it on held-out data.

The numbers come from `qlora.training.step.evaluate` (loss per target token, perplexity, teacher-forced exact match
of the answers), on the held-out split the run itself used unless `--data` names another file: for the same run and data
they are the numbers training logged at its final eval.

`load_run` rebuilds a run's model from RUN_DIR alone (run_config.json + the saved weights); generate and merge use it.

`--json FILE` writes the numbers aside and renames them into place. It refuses a FILE that is the run's own (anything
the trainer writes in RUN_DIR, or any file there that is not an earlier result of qlora.eval) or data the evaluation
reads: the same command may run again over its own result, but never over what it measures.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from qlora.cli import run
from qlora.commands import eval_parser
from qlora.config import Config
from qlora.console import quiet_libraries
from qlora.data.files import read_rows
from qlora.data.labels import detect_format, load_splits, tokenize_rows
from qlora.data.pack import pack_examples
from qlora.errors import EXIT_NONFINITE, ConfigError, Stop, check_writable
from qlora.partial import write_aside
from qlora.training.assemble import load_run, read_run_config
from qlora.training.checkpoint import RUN_CONFIG
from qlora.training.restore import recorded_rows
from qlora.training.rundir import LEFTOVER, LOCK, RUN_DIRS, RUN_FILES
from qlora.training.step import announce_evaluation, evaluate

# The keys of evaluate_run's result, none of which a file of the trainer holds all of: how an earlier --json is known.
RESULT_KEYS = {"eval_loss", "eval_ppl", "eval_exact_match", "data", "rows"}


def evaluate_run(run_dir: Path, data: str | None = None, device: str | None = None) -> dict:
    """Held-out loss, perplexity and exact match of a finished run, on its own held-out split or on `data`."""
    # A missing or malformed file (--data, or the run's data.eval) is found before the model loads.
    source = data if data is not None else read_run_config(Path(run_dir)).data.eval
    key = "--data" if data is not None else f"data.eval in {Path(run_dir) / RUN_CONFIG}, or give --data FILE"
    rows = read_rows(source, key) if source is not None else None
    cfg, model, tokenizer, dev = load_run(Path(run_dir), device)
    if data is None and not cfg.data.eval:
        # The split training held out: the same seeded carve-out of the train file.
        train, examples = load_splits(cfg.data, tokenizer, cfg.train.seed)
        check_split(Path(run_dir), cfg, len(pack_examples(train, cfg.data.max_seq_len)) if cfg.data.pack
                    else len(train), len(examples))
        data = f"{cfg.data.train} (held-out {cfg.data.eval_fraction:.0%}, seed {cfg.train.seed})"
    else:  # `data`, or the run's held-out file (its train file is not read: tokenising it took as long as the rest)
        data = data if data is not None else cfg.data.eval
        fmt = detect_format(rows, data) if cfg.data.format == "auto" else cfg.data.format
        examples = tokenize_rows(rows, fmt, tokenizer, data, cfg.data.max_seq_len)
    started = announce_evaluation(examples, cfg, f"of {data}")
    scores = evaluate(model, examples, cfg, tokenizer.pad_token_id, dev)
    return {**scores, "data": data, "rows": len(examples), "seconds": round(time.perf_counter() - started, 1)}


def check_split(run_dir: Path, cfg: Config, n_train: int, n_eval: int) -> None:
    """Refuse a held-out split carved from a data.train that changed since the run: the split is a seeded permutation
    of the row count, so one row more or fewer holds out other rows, most of them trained on. The row counts the run
    recorded are in its checkpoints; without one there is nothing to compare with."""
    rows = recorded_rows(run_dir)
    if isinstance(rows, list) and rows != [n_train, n_eval]:
        raise ConfigError(f"{cfg.data.train} now gives {n_train} training and {n_eval} held-out rows, the run had "
                          f"{rows[0]} and {rows[1]}: the file changed, so the held-out split carved from it by seed "
                          "would hold rows the run trained on; restore the file, or pass --data FILE")


def is_result(path: Path) -> bool:
    """`path` holds an earlier result of qlora.eval: a small JSON object with RESULT_KEYS."""
    try:
        if path.stat().st_size > 2**20:
            return False
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(found, dict) and RESULT_KEYS <= found.keys()


def check_json_path(path: Path, run_dir: Path, data: str | None) -> None:
    """Refuse (exit 2) a --json that would overwrite the run's own files or the data the evaluation reads."""
    check_writable(path, "--json")
    fix = f"choose another path, e.g. {Path(run_dir) / 'eval.json'}"
    cfg = read_run_config(Path(run_dir))
    for source in (data, cfg.data.train, cfg.data.eval):
        if source and path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise ConfigError(f"--json={path} is the data file {source}: writing it would destroy the data; {fix}")
    target, run = path.resolve(), Path(run_dir).resolve()
    if not target.is_relative_to(run):
        return
    top = target.relative_to(run).parts[0]
    if top in RUN_FILES or top == LOCK or RUN_DIRS.match(top) or LEFTOVER.match(top):
        raise ConfigError(f"--json={path} is the run's own {top}: writing it would damage the run; {fix}")
    if path.exists() and not is_result(path):
        raise ConfigError(f"--json={path} is a file in the run {run_dir} that qlora.eval did not write: writing it "
                          f"would destroy it; {fix}")


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    if args.json:
        check_json_path(args.json, args.run_dir, args.data)
    quiet_libraries()
    result = evaluate_run(args.run_dir, args.data, args.device)
    capped = f" of {result['rows']} (capped by train.eval_batches)" if result["eval_rows"] < result["rows"] else ""
    print(f"{result['data']}: {result['eval_rows']} rows{capped}")
    print(f"held-out loss {result['eval_loss']:.4f} | perplexity {result['eval_ppl']:.3f} | "
          f"exact match {100 * result['eval_exact_match']:.1f}% ({result['seconds']:g} s)")
    if args.json:
        write_aside(args.json, json.dumps(result, indent=2) + "\n")
    if not math.isfinite(result["eval_loss"]):  # as training: a non-finite held-out loss never ends in success
        raise Stop(EXIT_NONFINITE, f"the held-out loss of {args.run_dir} is {result['eval_loss']}: its weights give "
                                   "non-finite logits on this data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
