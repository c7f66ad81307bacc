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

from qlora.cli import require_stdout, run
from qlora.commands import eval_parser
from qlora.config import Config, DataConfig
from qlora.console import quiet_libraries
from qlora.data.files import read_rows, rows_sha256
from qlora.data.labels import check_rows, detect_format, tokenize_rows
from qlora.data.pack import pack_examples
from qlora.data.splits import load_splits
from qlora.errors import EXIT_NONFINITE, ConfigError, Stop, check_writable
from qlora.partial import write_aside
from qlora.training.assemble import load_run, read_run_config
from qlora.training.checkpoint import RUN_CONFIG
from qlora.training.restore import recorded, unrecorded
from qlora.training.rundir import RUN_DIRS, run_owned
from qlora.training.step import announce_evaluation, evaluate

# The keys of evaluate_run's result, none of which a file of the trainer holds all of: how an earlier --json is known.
RESULT_KEYS = {"eval_loss", "eval_ppl", "eval_exact_match", "data", "rows"}


def evaluate_run(run_dir: Path, data: str | None = None, device: str | None = None, cfg: Config | None = None) -> dict:
    """Held-out loss, perplexity and exact match of a finished run, on its own held-out split or on `data`. `cfg`:
    its run_config.json as read_run_config read it already."""
    run_dir = Path(run_dir)
    # The rows are read, and the run's own checked to be the run's, before the model loads: a missing, malformed or
    # changed file is named first. Without data.eval the held-out split is carved from data.train's rows.
    if data is not None:
        source, key, counted = data, "--data", False
        rows = read_rows(source, key)
    cfg = cfg or read_run_config(run_dir)
    ran = cfg.data
    if data is None:
        source, key = ran.eval or ran.train, "data.eval" if ran.eval else "data.train"
        rows = read_rows(source, f"{key} in {run_dir / RUN_CONFIG}, or give --data FILE")
        counted = not same_held_out(run_dir, ran, source, rows)
    fmt = detect_format(rows, source) if ran.format == "auto" else ran.format
    check_rows(rows, fmt)
    cfg, model, tokenizer, dev = load_run(run_dir, device, cfg=cfg)
    if data is None and not cfg.data.eval:  # the split training held out: the same seeded carve-out
        train, examples = load_splits(cfg.data, tokenizer, cfg.train.seed, (fmt, rows, None))
        counts = [len(pack_examples(train, cfg.data.max_seq_len)) if cfg.data.pack else len(train), len(examples)]
        data = f"{cfg.data.train} (held-out {cfg.data.eval_fraction:.0%}, seed {cfg.train.seed})"
    else:  # `data`, or the run's held-out file (its train file is not read: tokenising it took as long as the rest)
        examples = tokenize_rows(rows, fmt, tokenizer, source, cfg.data.max_seq_len)
        counts, data = [None, len(examples)], source
    if counted:
        same_counts(run_dir, source, counts)
    started = announce_evaluation(examples, cfg, f"of {data}")
    scores = evaluate(model, examples, cfg, tokenizer.pad_token_id, dev)
    return {**scores, "data": data, "rows": len(examples), "seconds": round(time.perf_counter() - started, 1)}


def same_held_out(run_dir: Path, ran: DataConfig, source: str, rows: list[dict]) -> bool:
    """Refuse held-out rows other than those the run was evaluated on, by the sha256 of the rows its checkpoints
    record (as --resume does, progress.same_rows): a held-out file edited, or moved and pointed at in
    run_config.json, holds other rows; so does a data.train whose seeded split would then hold out rows the run
    trained on, even as many (two rows swapped). False where no checkpoint records them: `same_counts` decides."""
    _, recorded_sha = recorded(run_dir, "rows_sha256")
    if not (isinstance(recorded_sha, list) and len(recorded_sha) == 2):
        return False
    fix = "restore it, or pass --data FILE to score a file as it is"
    if (recorded_sha[1] is None) == bool(ran.eval):  # run_config.json's data.eval set or cleared since the run
        held = "its own data.eval file" if recorded_sha[1] is not None else "a seeded split of data.train"
        raise ConfigError(f"{run_dir / RUN_CONFIG} has data.eval={ran.eval or 'null'}, but the run held out {held}: "
                          f"{fix}")
    if rows_sha256(rows) != recorded_sha[bool(ran.eval)]:
        key, why = ("data.eval", "they are not the rows the run was evaluated on") if ran.eval else (
            "data.train", "the split carved from them by seed would hold out rows the run trained on")
        raise ConfigError(f"{key}={source} holds other rows than the run's (their sha256 differs), so {why}: {fix}")
    return True


def same_counts(run_dir: Path, source: str, counts: list[int | None]) -> None:
    """For a run whose checkpoints predate rows_sha256: refuse held-out rows of other counts than the run's (training
    rows too where the split is carved from them, `counts[0]`), and say that the counts alone decided."""
    ckpt, rows = recorded(run_dir, "rows")
    if not isinstance(rows, list):  # no checkpoint (an adapter alone): nothing to compare with
        if why := unrecorded(run_dir):  # or none readable: said, not skipped in silence
            print(f"{source} is not checked against the run's held-out rows (their sha256, which its checkpoint "
                  f"records): {why}")
        return
    if counts[0] is not None and rows != counts:
        raise ConfigError(f"{source} now gives {counts[0]} training and {counts[1]} held-out rows, the run had "
                          f"{rows[0]} and {rows[1]}: the file changed, so the held-out split carved from it by seed "
                          "would hold rows the run trained on; restore the file, or pass --data FILE")
    if counts[1] != rows[1]:
        raise ConfigError(f"{source} now gives {counts[1]} held-out rows, the run had {rows[1]}: the file changed, so "
                          "they are not the rows the run was evaluated on; restore the file, or pass --data FILE")
    print(f"{ckpt.name} holds no fingerprint of the run's rows (written before they were recorded): {source} is "
          "taken for the run's by its row counts alone")


def is_result(path: Path) -> bool:
    """`path` holds an earlier result of qlora.eval: a small JSON object with RESULT_KEYS."""
    try:
        if path.stat().st_size > 2**20:
            return False
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(found, dict) and RESULT_KEYS <= found.keys()


def check_json_path(path: Path, run_dir: Path, data: str | None, cfg: Config) -> None:
    """Refuse (exit 2) a --json that would overwrite the run's own files (of the run `cfg` read from `run_dir`) or the
    data the evaluation reads."""
    check_writable(path, "--json")
    run = Path(run_dir).parent if RUN_DIRS.match(Path(run_dir).name) else Path(run_dir)  # not in the checkpoint
    fix = f"choose another path, e.g. {run / 'eval.json'}"
    for source in (data, cfg.data.train, cfg.data.eval):
        if source and path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise ConfigError(f"--json={path} is the data file {source}: writing it would destroy the data; {fix}")
    if (top := run_owned(path, run_dir)) is not None:
        raise ConfigError(f"--json={path} is the run's own {top}: writing it would damage the run; {fix}")
    # Outside the run too: --json=notes.json replaced the user's file without a word. An empty one (mktemp's) is free.
    if path.exists() and path.stat().st_size and not is_result(path):
        where = f" in the run {run_dir}" if path.resolve().is_relative_to(Path(run_dir).resolve()) else ""
        raise ConfigError(f"--json={path} is a file{where} that qlora.eval did not write: writing it would destroy "
                          f"it; {fix}")


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    cfg = read_run_config(args.run_dir)  # once: the run --json is checked against is the run evaluated
    if args.json:
        check_json_path(args.json, args.run_dir, args.data, cfg)
    else:  # with --json FILE the file holds the numbers
        require_stdout("the evaluation's numbers", "give it a file or a pipe (> FILE), or write them with --json FILE")
    quiet_libraries()
    result = evaluate_run(args.run_dir, args.data, args.device, cfg)
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
