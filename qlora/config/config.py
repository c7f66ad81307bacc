"""The typed recipe: one `Config` of six sections (model.py: model, quant, lora; run.py: data, train, output), checked
section by section as it is built and then as a whole; checked again after overrides (check_all); and read back from
the run_config.json a run recorded.

The fields of each memory or speed lever are declared in its folder under qlora/levers/ and joined into their section
(qlora/levers/__init__.py lists them); the section checks them with the rest.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from qlora.config.model import LoRAConfig, ModelConfig, QuantConfig
from qlora.config.run import DataConfig, OutputConfig, TrainConfig
from qlora.errors import ConfigError, json_trouble, start_over
from qlora.levers import check_levers

# The settings that name local files: absolute once resolved, so a run's run_config.json means the same files from any
# working directory (qlora.eval from elsewhere found no recipes/data/...), and a resume from elsewhere continues it.
PATHS = (("model", "path"), ("model", "config_json"), ("data", "train"), ("data", "eval"))


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        check_sections(self)
        check_encodable(self)
        if self.train.shard_base and self.quant.keep_16bit_budget and not self.quant.keep_16bit:
            raise ConfigError("quant.keep_16bit_budget measures each layer on the whole base before train.shard_base "
                              "shards it, which every process would do on its CPU copy: choose the layers in a "
                              "single-process run and pass its quant.keep_16bit (run_config.json), or "
                              "--quant.keep_16bit_budget=0")
        if self.train.shard_base and self.quant.method == "full":
            raise ConfigError("train.shard_base shards a frozen base, but quant.method=full trains every weight: "
                              "use --train.shard_base=false (data parallel) or quant.method qlora or lora")
        if self.lora.init == "loftq" and (self.quant.method != "qlora" or self.model.synthetic):
            raise ConfigError("lora.init=loftq corrects the rounding of a 4-bit base loaded from 16-bit weights: "
                              f"with quant.method={self.quant.method}"
                              f"{' and model.synthetic=true' if self.model.synthetic else ''} there is none; "
                              "set --lora.init=zero")
        sections = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in self.train.plan_keep:
            section, _, name = key.partition(".")
            if section not in sections or name not in {f.name for f in dataclasses.fields(sections[section])}:
                raise ConfigError(f"train.plan_keep names {key!r}, which is no field: name levers as a recipe spells "
                                  "them, e.g. --train.plan_keep=train.offload_activations")
        check_levers(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_sections(config: Config) -> None:
    """Each section of `config` is of its section's type."""
    for f in dataclasses.fields(config):
        if not isinstance(getattr(config, f.name), section := typing.get_type_hints(Config)[f.name]):
            raise ConfigError(f"Config({f.name}=...) must be a {section.__name__}(...), "
                              f"not a {type(getattr(config, f.name)).__name__}")


def check_all(config: Config) -> Config:
    """Every check a Config passed when it was built, again, now that its fields may have changed: the sections'
    types first (a section set to None has no checks of its own), then each section, then the sections together."""
    check_sections(config)
    for prefix, obj in [("", config)] + [(f"{f.name}.", getattr(config, f.name)) for f in dataclasses.fields(config)]:
        known = [f.name for f in dataclasses.fields(obj)]
        for name in vars(obj):  # `config.train.stepz = 3`: Python takes any attribute, and the run would ignore it
            if name not in known and not name.startswith("_"):
                close = difflib.get_close_matches(name, known, n=1)
                raise ConfigError(f"unknown key {prefix}{name}" + (f": did you mean {prefix}{close[0]}?" if close
                                                                    else f"; {prefix or 'a config'} has {known}"))
    for f in dataclasses.fields(config):
        getattr(config, f.name).__post_init__()
    config.__post_init__()
    return config


def check_encodable(config: Config) -> None:
    """Refuse a path setting the file system's encoding cannot write: under an ASCII locale (LC_ALL=C, UTF-8 mode off)
    a recipe's output.dir="runs/rün" ended in a UnicodeEncodeError traceback, and its data.train="données.jsonl" was
    "not found" (Path.exists() is False for it). One from the command line is always encodable: it came as bytes."""
    for section, name in (*PATHS, ("output", "dir")):
        value = getattr(getattr(config, section), name)
        try:
            os.fsencode(value) if isinstance(value, str) else None
        except UnicodeEncodeError:
            raise ConfigError(f"{section}.{name}={value!a} cannot be a file name under this locale's file system "
                              f"encoding ({sys.getfilesystemencoding()}): run under a UTF-8 locale (LC_ALL=C.UTF-8, "
                              "or PYTHONUTF8=1), or name an ASCII path") from None


def config_from_dict(raw: object, source: str, resume: bool = False) -> Config:
    """A Config from its `to_dict()` form (a run's run_config.json), checked as a recipe is; `source` names it.
    `resume`: read for --resume, which --overwrite then replaces."""
    sections = typing.get_type_hints(Config)
    if not isinstance(raw, dict) or not all(isinstance(raw.get(name, {}), dict) for name in sections):
        raise ConfigError(f"{source} is not a run config (a JSON object of sections model, data, ...): restore it, "
                          f"or start the run again with {start_over(resume)}")
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{source} has no section {unknown[0]!r} in this version of qlora: restore the file")
    for name in sections:  # a key edited in by hand: named, as a recipe's is, not as the TypeError of __init__
        known = [f.name for f in dataclasses.fields(sections[name])]
        for key in raw.get(name, {}):
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                raise ConfigError(f"{source} has an unknown key {name}.{key}"
                                  + (f" (did you mean {name}.{close[0]}?)" if close else "") + ": restore the file")
    try:
        return Config(**{name: sections[name](**raw[name]) for name in sections if name in raw})
    except TypeError as err:  # a missing section
        raise ConfigError(f"{source} does not fit this version of qlora.config ({err})") from None
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def read_config_json(path: Path, resume: bool = False) -> Config:
    """The Config a run recorded in `path` (its run_config.json); `resume`: read for --resume."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    # ValueError: not UTF-8, not JSON, or an integer of over 4,300 digits; RecursionError: arrays nested too deep
    except (OSError, ValueError, RecursionError) as err:
        reason = err.strerror if isinstance(err, OSError) else json_trouble(err)
        raise ConfigError(f"{path} is unreadable ({reason}): restore it, or start the run again with "
                          f"{start_over(resume)}") from None
    return config_from_dict(raw, str(path), resume)
