"""`python -m qlora.merge RUN_DIR --out DIR [--base-16bit PATH]`: fold a trained adapter into a plain bf16 checkpoint
(checkpoint.py), its flags read and its ending said: exit 1 for a merge beyond its tolerance, kept for inspection."""

from __future__ import annotations

import re
import sys

from qlora.base.load import DTYPES
from qlora.cli import run
from qlora.commands import merge_parser
from qlora.console import quiet_libraries
from qlora.errors import ConfigError
from qlora.merge.checkpoint import merge


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count; decimal units as in transformers' max_shard_size."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if not match:
        raise ConfigError(f"--max-shard-size={text!r}: use a size such as 5GB or 500MB")
    number, unit, binary = match.groups()
    size = int(float(number) * (1024 if binary else 1000) ** " KMGT".index(unit or " "))
    if size <= 0:
        raise ConfigError(f"--max-shard-size={text!r} must be more than 0 bytes, e.g. 5GB")
    return size


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    args = merge_parser().parse_args(argv)
    quiet_libraries()
    info = merge(args.run_dir, args.out, args.base_16bit, DTYPES[args.dtype], parse_size(args.max_shard_size),
                 args.device, check=not args.skip_check)
    if "merge_error" in info and not next(iter(info["merge_error"].values()))["within_tolerance"]:
        print("error: the merged model is further from the adapter model than docs/after-training.md states",
              file=sys.stderr)
        return 1  # the merge is kept, its numbers in merge_info.json, for inspection
    return 0


if __name__ == "__main__":
    sys.exit(main())
