"""Compressed data files, refused with the command that unpacks them: by their name (train.jsonl.gz), or by their first
bytes under a data file's name (`gzip -c rows.jsonl > train.jsonl`), which was refused as "not UTF-8 ...: re-encode
the file as UTF-8" in a .jsonl or .csv file, and in pyarrow's words in a .parquet one."""

from __future__ import annotations

import re
from pathlib import Path

from qlora.errors import ConfigError

COMPRESSED = {".gz": "gunzip", ".bz2": "bunzip2", ".xz": "unxz", ".zst": "unzstd", ".zip": "unzip"}
# Each one's first bytes; bzip2's with its first block's (or end of stream's) magic, as a CSV header may begin "BZh1".
MAGIC = {rb"\x1f\x8b": ".gz", rb"BZh[1-9](1AY&SY|\x17rE8P\x90)": ".bz2", rb"\xfd7zXZ\x00": ".xz",
         rb"\x28\xb5\x2f\xfd": ".zst", rb"PK\x03\x04": ".zip"}


def refuse_compressed(path: Path, key: str, kinds: str) -> None:
    """Refuse `path` where its suffix or first bytes are a compressor's; `key` names the setting or flag that named
    it, `kinds` the file kinds it may point at instead."""
    if path.suffix.lower() in COMPRESSED:
        raise ConfigError(f"data file {path} is compressed: {COMPRESSED[path.suffix.lower()]} it and point {key} at "
                          f"the file it holds ({kinds})")
    try:
        with open(path, "rb") as f:
            head = f.read(10)
    except OSError:  # the readers name it
        return
    kind = next((kind for magic, kind in MAGIC.items() if re.match(magic, head)), None)
    if kind is not None:  # `gunzip FILE` refuses a name without its suffix: -c (unzip: -p) takes any
        tool = f"{COMPRESSED[kind]} {'-p' if kind == '.zip' else '-c'}"
        raise ConfigError(f"data file {path} is {kind} compressed, though named {path.suffix or 'without a suffix'}: "
                          f"unpack it ({tool} {path} > NEW{path.suffix}) and point {key} at the file it holds")
