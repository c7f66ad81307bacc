"""The recipe: a typed `Config` (config.py; its sections in model.py and run.py, their fields' types checked by
fields.py), read from a Python file and overridden from the command line (recipe.py); `python -m qlora.config
RECIPE.py` prints it resolved (__main__.py).

Recipes import what they build from here: `from qlora.config import Config, ModelConfig, DataConfig, ...`.
"""

from qlora.config.config import Config, check_all, config_from_dict, read_config_json
from qlora.config.model import METHODS, LoRAConfig, ModelConfig, QuantConfig
from qlora.config.recipe import (
    apply_overrides,
    describe,
    field_docs,
    load_recipe,
    override_key,
    parse_args,
    resolve_paths,
    split_args,
)
from qlora.config.run import DataConfig, OutputConfig, TrainConfig
from qlora.errors import ConfigError

__all__ = ["METHODS", "Config", "ConfigError", "DataConfig", "LoRAConfig", "ModelConfig", "OutputConfig", "QuantConfig",
           "TrainConfig", "apply_overrides", "check_all", "config_from_dict", "describe", "field_docs", "load_recipe",
           "override_key", "parse_args", "read_config_json", "resolve_paths", "split_args"]
