"""How a section's fields are checked as they are set: each value against its declared type (a recipe is plain Python,
so nothing else checks it), and the fields a section inherits from the levers by each lever's own rules.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from qlora.errors import ConfigError
from qlora.levers import FIELDS

TYPE_EXAMPLES = {bool: "true or false", int: "an integer such as 16", float: "a number such as 2e-4",
                 str: "a string", list: "a list of strings such as ['q_proj', 'v_proj']"}
INT64 = 2**63  # every integer setting ends up in a torch or numpy int64 somewhere (a seed, a step, a shape)


def check_types(section: object) -> None:
    """Raise if a field's value is not of its declared type, or is a number no setting can mean (nan, inf, an integer
    beyond 64 bits): a recipe is plain Python, so nothing else checks it."""
    name = type(section).__name__.removesuffix("Config").lower()  # LoRAConfig -> lora
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, hint = getattr(section, f.name), hints[f.name]
        if not _has_type(value, hint):
            # A union's first other member (str | None: str); any other hint itself (list[str]: not its str).
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            wanted = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
            origin = typing.get_origin(wanted[0]) or wanted[0]
            kind = type(value).__name__
            kind = f"{'an' if kind[0] in 'aeiouAEIOU' else 'a'} {kind}"  # an int, a str
            raise ConfigError(f"{name}.{f.name}={value!r} is {kind}: set it to "
                              f"{TYPE_EXAMPLES.get(origin, getattr(origin, '__name__', origin))}"
                              f"{' or None' if type(None) in typing.get_args(hint) else ''}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}.{f.name}={value} is not a finite number: set it to one, e.g. the default "
                              f"--{name}.{f.name}={f.default}")
        if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
            raise ConfigError(f"{name}.{f.name}={value} does not fit in 64 bits: set it to a sensible value, e.g. "
                              f"the default --{name}.{f.name}={f.default}")
        if isinstance(value, str) and "\0" in value:
            raise ConfigError(f"{name}.{f.name}={value!r} holds a NUL character: no path or name can")


def check_lever_fields(section: object, name: str) -> None:
    """The rules on the fields `section` inherits from the levers (each lever's `check_fields`)."""
    for fields in FIELDS[name]:
        fields.check_fields(section)


def _has_type(value: object, hint: object) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (int, float):  # an int is a fine float; a bool is neither, though Python calls it an int
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    return isinstance(value, hint) if isinstance(hint, type) else True
