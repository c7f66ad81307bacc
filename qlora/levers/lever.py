"""What every lever declares, so that the config, the estimate and the trainer read one definition of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# A run's Config. The levers' fields are part of it (the sections in qlora/config/model.py and run.py inherit them), so
# a lever cannot import its type: it reads the sections by name.
RunConfig = Any


class LeverFields:
    """What a lever's fields dataclass inherits: its section runs `check_fields` on it as it is set."""

    def check_fields(self) -> None:
        """The rules on the lever's own fields, raised as ConfigError; none unless the lever says so."""


def no_rule(cfg: RunConfig) -> None:
    """A lever without rules across sections."""


@dataclass(frozen=True)
class Lever:
    """One switch of a recipe that trades compute for memory, or memory for speed."""

    name: str
    """Its main field, as a recipe spells it: train.tile_size, model.embeddings_on_cpu, ..."""
    kind: str
    """memory (saves memory, costs time or precision) or speed (saves time, may cost memory)."""
    active: Callable[[RunConfig, str, str], bool]
    """(config, method, device) -> whether it changes anything for that method on that device ("cuda" or "cpu"):
    the trainer applies it and the estimate counts it exactly then."""
    effect: Callable[[RunConfig, str], str]
    """(config, method) -> what it does, as start-up and the estimate's lever list say it."""
    check: Callable[[RunConfig], None] = no_rule
    """Rules across sections (with the method, other levers, several processes), raised as ConfigError; rules on its
    own fields are checked by its fields' `check_fields` as the section is set."""
    holds_memory: bool = False
    """A speed lever that holds memory the estimate counts where it acts (train.dequant_once, train.reuse_dequant):
    the estimate's lever list names it beside the memory levers."""
