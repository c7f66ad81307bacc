"""The train and held-out splits: the rows as the files hold them (read before a base is loaded), then tokenised,
with the held-out rows carved from data.train by seed where data.eval is not given."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from qlora.config import DataConfig
from qlora.data.files import read_rows
from qlora.data.labels import check_rows, detect_format, tokenize_rows
from qlora.errors import ConfigError


def read_splits(cfg: DataConfig) -> tuple[str, list[dict], list[dict] | None]:
    """(format, train rows, held-out rows or None) as the files hold them, before any tokenizer: what a trainer reads
    before it loads a base, so that a missing file or a bad line costs no load of minutes."""
    splits = [(source, key, read_rows(source, key)) for source, key in ((cfg.train, "data.train"),
                                                                        (cfg.eval, "data.eval")) if source]
    fmt = detect_format(splits[0][2], cfg.train) if cfg.format == "auto" else cfg.format
    for _, _, rows in splits:
        check_rows(rows, fmt)
    # Said here, before a base loads: the step check after this read a train split of none as too few for the
    # processes ("launch at most 0 process(es)" for one process).
    n = len(splits[0][2])
    if len(splits) == 1 and n <= (n_eval := held_out_count(n, cfg.eval_fraction)):
        raise ConfigError(f"{cfg.train}: its {n} row(s) are too few to hold out {n_eval} (data.eval_fraction="
                          f"{cfg.eval_fraction:g}) and train on the rest: give a held-out file as data.eval, or add "
                          "rows")
    return fmt, splits[0][2], splits[1][2] if len(splits) > 1 else None


def held_out_count(n_rows: int, fraction: float) -> int:
    """The rows carved from data.train for held-out scoring when data.eval is not given."""
    return max(1, round(n_rows * fraction))


def training_rows_at_most(cfg: DataConfig, read: tuple[str, list[dict], list[dict] | None]) -> int:
    """The training rows read_splits' rows can give: tokenising drops rows, packing merges them, and n less the rows
    held out never falls as n rises, so their count can only be this or fewer (exactly this, unpacked, where none is
    dropped)."""
    n = len(read[1])
    return n if read[2] is not None else n - held_out_count(n, cfg.eval_fraction)


def load_splits(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                read: tuple[str, list[dict], list[dict] | None] | None = None) -> tuple[list[dict], list[dict]]:
    """Tokenised train and held-out examples (of `read`, read_splits' rows, when given); the held-out split is carved
    from train by seed when not given."""
    fmt, rows, held_rows = read or read_splits(cfg)
    train = tokenize_rows(rows, fmt, tokenizer, cfg.train, cfg.max_seq_len)
    if held_rows is not None:
        held = tokenize_rows(held_rows, fmt, tokenizer, cfg.eval, cfg.max_seq_len)
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = held_out_count(len(train), cfg.eval_fraction)
        if n_eval >= len(train):
            raise ConfigError(f"{cfg.train}: {len(train)} rows are too few to hold out {n_eval}: give data.eval")
        train, held = [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]]
    seen = repeated(train, held)
    if seen:
        print(f"{cfg.eval or cfg.train}: {seen} of {len(held)} held-out rows are also training rows (within "
              f"max_seq_len={cfg.max_seq_len}): their loss reads what was learned by heart; remove the duplicates")
    return train, held


def repeated(train: list[dict], held: list[dict]) -> int:
    """How many held-out examples are token for token a training example. A duplicated row lands on both sides of a
    seeded split, and a held-out file is often cut from the training one; either makes the held-out loss a
    memorisation score. Rows are compared by a hash of their ids: a set of the ids themselves would hold the data
    twice."""
    trained = {hash(tuple(ex["input_ids"])) for ex in train}
    return sum(hash(tuple(ex["input_ids"])) in trained for ex in held)
