"""`python -m qlora.config RECIPE.py [overrides]`: print the resolved config as JSON."""

from __future__ import annotations

import contextlib
import json
import sys

from qlora.cli import require_stdout, run
from qlora.commands import CONFIG, help_text, wants_help
from qlora.config import parse_args, resolve_paths
from qlora.errors import ConfigError


def print_resolved(argv: list[str]) -> None:
    if wants_help(argv):
        print(help_text("qlora.config", argv), end="")
        return
    require_stdout("the resolved config")
    usage = CONFIG.usage
    with contextlib.redirect_stdout(sys.stderr):  # a recipe's own prints: stdout is the JSON a script reads
        cfg, flags = parse_args(argv, usage)
    if flags:
        raise ConfigError(f"unknown flag {flags[0]}: {usage}")
    print(json.dumps(resolve_paths(cfg).to_dict(), indent=2))  # as qlora.train records it in run_config.json
    if cfg.train.plan == "fastest":  # the levers are then the card's, chosen as the run starts
        print("train.plan=fastest: qlora.train chooses the levers above for the card and host it finds, and records "
              "its choice in run_config.json; python -m qlora.memory RECIPE --gpu-gib N shows it for a card",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return run(print_resolved, argv)


if __name__ == "__main__":
    sys.exit(main())
