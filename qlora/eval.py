"""`python -m qlora.eval RUN_DIR [--data FILE]`: reload a finished run and measure it on held-out data.

The numbers come from `qlora.train.evaluate` (loss per target token, perplexity, teacher-forced exact match of the
answers), on the held-out split the run itself used unless `--data` names another file: for the same run and data
they are the numbers training logged at its final eval.

`load_run` rebuilds a run's model from RUN_DIR alone (run_config.json + the saved weights); generate and merge use it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from qlora import checkpoint
from qlora.cli import EXIT_NONFINITE, Stop, check_writable, run
from qlora.commands import eval_parser
from qlora.config import Config, ConfigError, read_config_json
from qlora.console import quiet_libraries
from qlora.data import detect_format, load_splits, read_rows, tokenize_rows
from qlora.loftq import apply_shifts, load_shifts
from qlora.lora import ADAPTER_WEIGHTS, attach_lora
from qlora.model import compute_dtype, load_base, resolve_device
from qlora.train import announce_evaluation, evaluate


def read_run_config(run_dir: Path) -> Config:
    """The recipe a run trained with, from RUN_DIR/run_config.json (or its parent's, for RUN_DIR/checkpoint-N)."""
    candidates = (d / checkpoint.RUN_CONFIG for d in (run_dir, run_dir.parent))
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ConfigError(f"{run_dir / checkpoint.RUN_CONFIG} not found: RUN_DIR must be a training output directory "
                          "(the --output.dir of python -m qlora.train)")
    return read_config_json(path)


def load_run(run_dir: Path, device: str | None = None, compute: str | None = None, method: str | None = None,
             base_path: str | None = None) -> tuple[Config, torch.nn.Module, PreTrainedTokenizerBase, torch.device]:
    """Rebuild a run's trained model in eval mode: its base as it trained (NF4 for qlora), adapters loaded.

    `device`, `compute` (a quant.compute_dtype), `method` (qlora or lora: the same adapter on a 4-bit or a 16-bit
    base) and `base_path` (another copy of the base) override the run's own settings.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if device is not None:
        cfg.train.device = device
    if compute is not None:
        cfg.quant.compute_dtype = compute
    if method is not None:
        cfg.quant.method = method
        cfg.quant.quantize_lm_head &= method == "qlora"  # a 16-bit base keeps its 16-bit head
    if base_path is not None:
        cfg.model.path, cfg.model.build = base_path, None
    weights = checkpoint.FULL_WEIGHTS if cfg.quant.method == "full" else ADAPTER_WEIGHTS
    if not (run_dir / weights).is_file():
        raise ConfigError(f"{run_dir / weights} not found: the run has not finished; pass one of its "
                          "checkpoint-N directories instead")
    dev = resolve_device(cfg.train.device)
    model, tokenizer, path = load_base(cfg, dev)
    if cfg.quant.method == "qlora" and cfg.lora.init == "loftq" and cfg.lora.loftq_iters > 1:
        apply_shifts(model, cfg, path, load_shifts(run_dir))  # the base LoftQ's later steps quantised
    if cfg.quant.method != "full":
        attach_lora(model, cfg.lora, compute_dtype(cfg.quant, dev))
    try:
        checkpoint.load_weights(model, cfg, run_dir)  # checks names, shapes and values against the base
    except Exception as err:  # another rank or base than run_config.json says, a damaged file (SafetensorError), nan
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{run_dir / weights} does not fit the run's base {cfg.model.path} ({reason}): pass the "
                          "run directory that wrote it, untouched") from err
    model.eval()
    return cfg, model, tokenizer, dev


def evaluate_run(run_dir: Path, data: str | None = None, device: str | None = None) -> dict:
    """Held-out loss, perplexity and exact match of a finished run, on its own held-out split or on `data`."""
    rows = read_rows(data) if data is not None else None  # a missing file is found before the model loads
    cfg, model, tokenizer, dev = load_run(Path(run_dir), device)
    if data is None:
        # The split training held out: the same file, or the same seeded carve-out of the train file.
        _, examples = load_splits(cfg.data, tokenizer, cfg.train.seed)
        data = cfg.data.eval or f"{cfg.data.train} (held-out {cfg.data.eval_fraction:.0%}, seed {cfg.train.seed})"
    else:
        fmt = detect_format(rows, data) if cfg.data.format == "auto" else cfg.data.format
        examples = tokenize_rows(rows, fmt, tokenizer, data, cfg.data.max_seq_len)
    started = announce_evaluation(examples, cfg, f"of {data}")
    scores = evaluate(model, examples, cfg, tokenizer.pad_token_id, dev)
    return {**scores, "data": data, "rows": len(examples), "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    if args.json:
        check_writable(args.json, "--json")
    quiet_libraries()
    result = evaluate_run(args.run_dir, args.data, args.device)
    capped = " (capped by train.eval_batches)" if read_run_config(args.run_dir).train.eval_batches else ""
    print(f"{result['data']}: {result['rows']} rows{capped}")
    print(f"held-out loss {result['eval_loss']:.4f} | perplexity {result['eval_ppl']:.3f} | "
          f"exact match {100 * result['eval_exact_match']:.1f}% ({result['seconds']:g} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not math.isfinite(result["eval_loss"]):  # as training: a non-finite held-out loss never ends in success
        raise Stop(EXIT_NONFINITE, f"the held-out loss of {args.run_dir} is {result['eval_loss']}: its weights give "
                                   "non-finite logits on this data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
