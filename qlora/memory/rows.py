"""The tokenised rows' host memory, from the data files' sizes before a row is read: the trainer holds every row as
int32 arrays (qlora/data/tokens.py) from before the base loads to the run's end, beside whatever else the host keeps.
"""

from __future__ import annotations

from pathlib import Path

from qlora.config import Config

# Bytes of tokenised rows held (data.tokens.held_bytes) per byte of the data files, SmolLM2's tokenizer: the demo's
# data (recipes/data/destination, 1,650 chat rows of ~57 tokens, 310 KB) 4.33 x, 4.78 x packed; a synthetic chat file
# (20,000 rows of ~674 tokens of sentences from docs/, 44 MB) 2.60 x, 3.64 x packed; 200,000 chat rows of ~395 tokens
# (381 MiB) 1.7 x, 2.5 x packed. A short row weighs its dict and arrays (~360 bytes) more, so the demo's, the most,
# is counted: a file of long rows, or rows cut by data.max_seq_len, holds less. A byte-level vocabulary (the tiny
# Llama's: a token a byte) holds more, 6.3 x (50,000 rows of 12-word lists); a Parquet file's compression is not undone.
HELD_PER_FILE_BYTE = 4.4
HELD_PER_FILE_BYTE_PACKED = 4.8


def rows_bytes(cfg: Config) -> tuple[int, str]:
    """(bytes, formula) of the tokenised rows of data.train and data.eval, a file that is not there (or a hub
    dataset) counted as none, and said so."""
    files = [(key, Path(path)) for key, path in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval))
             if path]
    sizes = {key: path.stat().st_size for key, path in files if path.is_file()}
    ratio = HELD_PER_FILE_BYTE_PACKED if cfg.data.pack else HELD_PER_FILE_BYTE
    held = int(ratio * sum(sizes.values()))
    formula = f"{ratio:g} x the data files' {sum(sizes.values()) / 2**20:,.1f} MiB" + \
        (" (packed)" if cfg.data.pack else "") + ": tokenised rows, int32 arrays"
    if missing := [key for key, _ in files if key not in sizes]:
        formula += f" ({' and '.join(missing)} not a local file: not counted)"
    return held, formula
