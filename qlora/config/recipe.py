"""A recipe file read into a `Config`, `--section.key=value` overrides applied to it, and the fields described for help.

A recipe is a Python file that defines `config = Config(...)`. Overrides look like `--train.lr=1e-4`; each is parsed
to the field's declared type, and an unknown key is an error that names the closest real key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import os
import re
import sys
import textwrap
import traceback
import types
import typing
from pathlib import Path

from qlora.config.config import PATHS, Config, check_all
from qlora.errors import ConfigError, came_of_a_signal, check_ascii_number, repeated_notes

# Names that transformers' TrainingArguments and peft's LoraConfig use for our keys: suggested before spelling matches.
ALIASES = {"learning_rate": "lr", "max_steps": "steps", "per_device_train_batch_size": "batch_size",
           "gradient_accumulation_steps": "grad_accum", "lora_r": "r", "rank": "r", "lora_alpha": "alpha",
           "lora_dropout": "dropout", "target_modules": "targets", "max_length": "max_seq_len",
           "seq_len": "max_seq_len", "output_dir": "dir", "warmup": "warmup_steps", "lr_scheduler_type": "schedule"}


def field_docs(section: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), by field name: the section's own and
    those it inherits from the levers (qlora/levers/*/settings.py)."""
    docs: dict[str, str] = {}
    for cls in reversed(section.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        docs.update({node.target.id: inspect.cleandoc(doc.value.value)
                     for node, doc in zip(body, body[1:], strict=False)
                     if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                     and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                     and isinstance(doc.value.value, str)})
    return docs


def describe(config: Config, width: int = 100) -> str:
    """Every field as `section.key: type = value` and its docstring, for `--help` after a recipe: each section's own
    fields first, then its levers'."""
    lines = []
    for section in dataclasses.fields(config):
        obj = getattr(config, section.name)
        docs, own = field_docs(type(obj)), type(obj).__dict__.get("__annotations__", {})
        for f in sorted(dataclasses.fields(obj), key=lambda f: f.name not in own):
            lines.append(f"  {section.name}.{f.name}: {f.type} = {getattr(obj, f.name)!r}")
            lines += textwrap.wrap(docs.get(f.name, ""), width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def resolve_paths(cfg: Config) -> Config:
    """`cfg` with each of PATHS that names an existing local file or folder made absolute (a hub id stays as it is),
    and a leading ~ of output.dir expanded."""
    for section, name in PATHS:
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            setattr(getattr(cfg, section), name, str(Path(value).expanduser().resolve()))
    # The run directory need not exist yet, but its ~ is the home folder as theirs is: a shell expands none after
    # `--output.dir=`, and the run went to a folder named ~ in the working directory (which `rm -r ~` then takes).
    cfg.output.dir = os.path.expanduser(cfg.output.dir)
    return cfg


def load_recipe(path: str | Path) -> Config:
    """Execute a recipe file and return its `config`."""
    path = Path(path)
    if not path.is_file():
        # A pipe (`<(...)`: /dev/fd/63) or a device exists: "not found" sent the user looking for a file that is there.
        problem = ("is a directory" if path.is_dir() else "is not a regular file (a pipe or a device)" if path.exists()
                   else "not found")
        raise ConfigError(f"recipe {path} {problem}: pass the path of a recipe file such as recipes/tiny.py")
    if path.suffix != ".py":  # importlib finds no loader for any other name, and would fail in its own words
        raise ConfigError(f"recipe {path} is not a .py file: a recipe is Python; rename it to {path.stem}.py")
    spec = importlib.util.spec_from_file_location(f"qlora_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    # As Python runs a script: the module registered while it runs (a dataclass defined under `from __future__ import
    # annotations` looks its module up there) and its folder first on the path (a sibling module imports).
    sys.modules[spec.name], folder = module, str(path.resolve().parent)
    sys.path.insert(0, folder)
    dtype = _default_dtype()
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        line = f":{err.lineno}" if err.lineno else ""  # none for a NUL byte
        raise ConfigError(f"{path}{line}: syntax error: {err.msg}") from err
    except SystemExit as err:  # sys.exit() in a recipe: a recipe describes a run, it does not end the command
        raise ConfigError(f"{_recipe_line(path, err)}: the recipe called exit({_shown(err.code)}): a recipe only "
                          "builds `config`") from None
    except BrokenPipeError:  # its print() to a stdout whose reader left (`| head`): the command's to end
        raise
    except KeyboardInterrupt as err:
        if came_of_a_signal():  # Ctrl-C or SIGTERM while it ran: the command's to end
            raise
        raise ConfigError(f"{_recipe_line(path, err)}: the recipe raised {_shown(err)}, not a Ctrl-C: a recipe only "
                          "builds `config`") from None
    except BaseException as err:  # a failed check, a NameError, an unknown keyword...: the recipe's line
        raise ConfigError(f"{_recipe_line(path, err)}: {_recipe_error(err)}") from err
    finally:
        sys.modules.pop(spec.name, None)
        if folder in sys.path:  # a recipe may have replaced sys.path, or removed its own folder from it
            sys.path.remove(folder)
    if _default_dtype() != dtype:  # restored, and refused: it is no setting the run records
        set_to = _default_dtype()
        sys.modules["torch"].set_default_dtype(getattr(sys.modules["torch"], dtype.removeprefix("torch.")))
        raise ConfigError(f"{path}: the recipe set torch's default dtype to {set_to}, which every tensor the run "
                          "creates would take (the adapters, the optimizer state) whatever quant.compute_dtype says: "
                          "remove the call, and set quant.compute_dtype")
    try:
        config = getattr(module, "config", None)
    except Exception as err:  # noqa: BLE001  a module-level __getattr__ of the recipe's own
        raise ConfigError(f"{path}: reading its `config` raised {type(err).__name__}: a recipe defines `config = "
                          "Config(...)` at module level") from err
    if config is None:
        raise ConfigError(f"{path} defines no `config = Config(...)`: add one at module level (see recipes/tiny.py)")
    if not isinstance(config, Config):  # `config = {...}`: "defines no config" sent the user looking for a missing one
        raise ConfigError(f"{path} defines `config` of type {type(config).__name__}, not a Config: build it with "
                          "`config = Config(...)` (see recipes/tiny.py)")
    try:  # a recipe is plain Python: it may change its config after building it (`config.train = None`)
        return check_all(config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err} (set after the recipe built its Config: change it inside Config(...))") \
            from None


def _default_dtype() -> str:
    """torch's default dtype, without importing torch where nothing has (its default is then float32)."""
    torch = sys.modules.get("torch")
    return str(torch.get_default_dtype()) if torch is not None else "torch.float32"


def _recipe_line(path: Path, err: BaseException) -> str:
    """`path:line` of the recipe's own line that `err` was raised from, or `path` where no frame is the recipe's."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f"{path}:{frames[-1].lineno}" if frames else str(path)


def _shown(value: object) -> str:
    """repr(value) for the one line: cut to 200 characters (sys.exit's whole text came out, 100,000 characters of
    it), and a type name where its own __repr__ fails."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001  a recipe's object whose __repr__ raises
        return f"<{type(value).__name__} object>"
    return text if len(text) <= 200 else f"{text[:200]}..."


def _recipe_error(err: BaseException) -> str:
    try:
        text = str(err)
    except Exception:  # noqa: BLE001  an exception whose own __str__ fails
        return f"{type(err).__name__} (its message cannot be shown)"
    if isinstance(err, ConfigError):
        return text
    unknown = re.match(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", text)
    classes = {cls.__name__: cls for cls in (Config, *typing.get_type_hints(Config).values())}
    section = unknown and classes.get(unknown.group(1))
    if section is Config:
        names = ", ".join(f.name for f in dataclasses.fields(Config))
        return f"Config has no section {unknown.group(2)!r}: use {names}"
    if isinstance(section, type) and dataclasses.is_dataclass(section):
        name = section.__name__.removesuffix("Config").lower()
        known = [f"{name}.{f.name}" for f in dataclasses.fields(section)]
        return f"unknown key {name}.{unknown.group(2)}: {_hint(f'{name}.{unknown.group(2)}', known)}"
    if not text and isinstance(err, MemoryError):  # `x = [0] * 10**12`: Python's own, of no words
        return "MemoryError: the recipe asked for more memory than the host has: a recipe only builds `config`"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _hint(key: str, known: list[str]) -> str:
    """The closest real key: a transformers/peft name's equivalent first, then the nearest spelling."""
    alias = ALIASES.get(key.rsplit(".", 1)[-1])
    close = [k for k in known if k.endswith(f".{alias}")] or difflib.get_close_matches(key, known, 1, 0.4)
    return f"did you mean {close[0]}?" if close else "see the fields in qlora/config/model.py and qlora/config/run.py"


def override_key(item: str) -> str:
    """The field an override sets: `--train.batch_size=8` -> train.batch_size."""
    return item[2:].split("=", 1)[0]


def apply_overrides(config: Config, overrides: list[str], check: bool = True) -> Config:
    """Apply `--section.key=value` overrides, each parsed to the field's type, then re-run every check (unless not
    `check`: a recipe a resume reads, whose run's own values the overrides are checked against)."""
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    known = [f"{s}.{f.name}" for s, obj in sections.items() for f in dataclasses.fields(obj)]
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form --section.key=value, e.g. --train.lr=1e-4")
        key, raw = item[2:].split("=", 1)
        if "." not in key:  # `--overwrite=1`, `--steps=3`: no section
            same = [k for k in known if k.endswith(f".{key}")]
            raise ConfigError(f"--{key}={raw} sets no key: " + (f"did you mean --{same[0]}={raw}?" if same else
                              f"a flag takes no value (write --{key}), a setting is --section.key=value"))
        if key not in known:
            raise ConfigError(f"unknown key --{key}: {_hint(key, known).replace('mean ', 'mean --')}")
        section, name = key.split(".", 1)
        obj = sections[section]
        hints = typing.get_type_hints(type(obj))
        setattr(obj, name, _parse(raw, hints[name], key))
    return check_all(config) if check else config  # overrides must pass the same checks as the recipe


def _parse(raw: str, annotation: object, key: str) -> object:
    """Parse a command-line string to `annotation` (bool, int, float, str, list[str], or X | None)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _parse(raw, inner[0], key)
    if annotation is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--{key}={raw}: expected true or false")
    if annotation in (int, float):
        check_ascii_number(f"--{key}", raw)
        try:
            return annotation(raw)
        except ValueError:
            raise ConfigError(f"--{key}={raw}: expected {annotation.__name__}, e.g. --{key}=1") from None
    if typing.get_origin(annotation) is list:
        return _parse_list(raw, key)
    return raw


def _parse_list(raw: str, key: str) -> list[str]:
    """`a,b`, or the list as --help and run_config.json show it: `['a', 'b']` (`[a,b]` once a shell took the quotes).
    Each part was taken as a name, brackets and quotes and all, and refused only after the base had loaded."""
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    parts = [part.strip() for part in text.split(",")]
    parts = [p[1:-1].strip() if len(p) > 1 and p[0] == p[-1] and p[0] in "'\"" else p for p in parts]
    odd = [p for p in parts if any(c in p for c in "[]'\"")]
    if odd:
        raise ConfigError(f"--{key}={raw}: {odd[0]!r} is no name: give names separated by commas, "
                          f"e.g. --{key}=NAME,NAME")
    return [p for p in parts if p]


def split_args(argv: list[str], usage: str) -> tuple[str, list[str], list[str]]:
    """Split argv into the recipe path, flags (--resume, ...) and overrides (--section.key=value). A key given twice
    with other values takes the last, as a base command line followed by a case's own is written (`$BASE
    --train.lr=2e-4`), and says so: it took it without a word, and a key repeated by mistake trained the run at a
    value the user did not see."""
    if not argv or argv[0].startswith("-"):
        raise ConfigError(f"no recipe given: {usage}")
    flags = [a for a in argv[1:] if a.startswith("--") and "=" not in a]
    for flag in flags:  # a key, not a flag: no command has a flag with a dot
        if "." in flag:
            raise ConfigError(f"{flag} has no value: write {flag}=VALUE")
    overrides = [a for a in argv[1:] if a not in flags]
    given: dict[str, list[str]] = {}
    for item in overrides:
        if item.startswith("--"):  # anything else apply_overrides refuses
            given.setdefault(f"--{override_key(item)}", []).append(item)
    for line in repeated_notes(given):
        print(line)
    return argv[0], flags, overrides


def parse_args(argv: list[str], usage: str) -> tuple[Config, list[str]]:
    """Split argv into recipe path, flags (--resume, ...) and overrides; return the config and the flags."""
    recipe, flags, overrides = split_args(argv, usage)
    return apply_overrides(load_recipe(recipe), overrides), flags
