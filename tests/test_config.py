"""Recipes and command-line overrides: typed parsing, checks, and errors that name the key and the fix."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from qlora.config import apply_overrides, load_recipe, parse_args, resolve_paths
from qlora.errors import ConfigError

TINY = "recipes/tiny.py"


def test_overrides_are_parsed_to_the_field_types():
    cfg = apply_overrides(load_recipe(TINY), ["--train.lr=1e-4", "--train.steps=7", "--lora.targets=q_proj,v_proj",
                                              "--train.gradient_checkpointing=false", "--data.eval=none"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.train.gradient_checkpointing is False
    assert cfg.data.eval is None


def test_an_unknown_key_suggests_the_closest_real_one():
    with pytest.raises(ConfigError, match=r"unknown key --train.learning_rate.*did you mean --train.lr\?"):
        apply_overrides(load_recipe(TINY), ["--train.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"did you mean --train.warmup_steps\?"):
        apply_overrides(load_recipe(TINY), ["--train.warmup_step=3"])
    with pytest.raises(ConfigError, match=r"did you mean --lora.alpha\?"):
        apply_overrides(load_recipe(TINY), ["--lora.alpah=8"])


@pytest.mark.parametrize(("override", "message"), [
    ("--train.steps=ten", r"--train.steps=ten: expected int"),
    ("--train.gradient_checkpointing=maybe", r"expected true or false"),
    ("--lora.r=0", r"lora.r=0 must be a positive integer"),
    ("--lora.alpha=-1", r"lora.alpha=-1.0 must be positive"),
    ("--lora.dropout=1", r"lora.dropout=1.0 must lie in \[0, 1\)"),
    ("--train.lr=0", r"train.lr=0.0 must be positive"),
    ("--data.max_seq_len=0", r"data.max_seq_len=0 must be positive"),
    ("--train.steps=-3", r"train.steps=-3 must be a positive integer"),
    ("--quant.method=int8", r"quant.method='int8' is not one of qlora, lora, full"),
    ("train.lr=1", r"not of the form --section.key=value"),
    ("--train.tile_size=-1", r"train.tile_size=-1 must not be negative"),
    ("--train.tile_projections=true", r"train.tile_projections tiles by train.tile_size, which is 0"),
    ("--train.tile_norms=true", r"train.tile_norms tiles by train.tile_size, which is 0: set "
                                r"--train.tile_size=4096, or --train.tile_norms=false$"),
    ("--train.checkpoint_every=0", r"train.checkpoint_every=0 must be at least 1"),
    ("--train.offload_budget_gib=8", r"train.offload_budget_gib limits train.offload_activations"),
    ("--train.offload_budget_gib=-1", r"train.offload_budget_gib=-1.0 must be >= 0"),
])
def test_bad_values_are_refused_with_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_recipe(TINY), [override])


def test_the_shortest_max_seq_len_that_learns_a_token_is_taken():
    """Two tokens learn one (the second, from the first): max_seq_len=1 is refused, and a bound at 3 refused 2 too."""
    assert apply_overrides(load_recipe(TINY), ["--data.max_seq_len=2"]).data.max_seq_len == 2


def test_tiles_off_on_a_recipe_with_both_tile_switches_names_both_in_one_line():
    """--train.tile_size=0 on the 8B recipe: one line for the two switches that tile by it, not one per attempt."""
    with pytest.raises(ConfigError, match=r"^train.tile_projections and train.tile_norms tile by train.tile_size, "
                                          r"which is 0: set --train.tile_size=4096, or "
                                          r"--train.tile_projections=false --train.tile_norms=false$"):
        apply_overrides(load_recipe("recipes/llama8b.py"), ["--train.tile_size=0"])
    cfg = apply_overrides(load_recipe("recipes/llama8b.py"), ["--train.tile_size=0",
                                                                    "--train.tile_projections=false",
                                                                    "--train.tile_norms=false"])
    assert cfg.train.tile_size == 0


def test_recipe_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.py")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match=r"empty.py defines no `config = Config\(...\)`"):
        load_recipe(empty)
    as_dict = tmp_path / "as_dict.py"  # it defines one, of another type: it was said to define none
    as_dict.write_text("config = {'train': {'lr': 1e-3}}\n")
    with pytest.raises(ConfigError, match=r"as_dict.py defines `config` of type dict, not a Config: build it with "):
        load_recipe(as_dict)
    bad = tmp_path / "bad.py"
    bad.write_text("from qlora.config import *\nconfig = Config(model=ModelConfig(path='x'), data=DataConfig(train='y',"
                   " max_seq_len=-1))\n")
    with pytest.raises(ConfigError, match=r"bad.py:2: data.max_seq_len=-1"):
        load_recipe(bad)


@pytest.mark.parametrize("raw", ["q_proj,v_proj", "['q_proj', 'v_proj']", "[q_proj,v_proj]", '["q_proj","v_proj"]'])
def test_a_list_is_read_as_names_or_as_help_shows_it(raw):
    """--help shows lora.targets as ['all-linear']; given so (or as a shell leaves it, [q_proj,v_proj]), each part was
    a name, brackets and quotes and all, refused only after the base had loaded ("['q_proj'" matches no layer)."""
    assert apply_overrides(load_recipe(TINY), [f"--lora.targets={raw}"]).lora.targets == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"""^--lora.targets=\['q_proj': "\['q_proj'" is no name: give names """):
        apply_overrides(load_recipe(TINY), ["--lora.targets=['q_proj'"])


@pytest.mark.parametrize(("value", "message"), [
    ("'q_proj'", r"lora.targets='q_proj' is a str: set it to a list of strings such as \['q_proj', 'v_proj'\]$"),
    ("('q_proj',)", r"lora.targets=\('q_proj',\) is a tuple: set it to a list of strings"),
])
def test_a_list_of_another_type_is_named_as_a_list(tmp_path, value, message):
    """The type named was the list's element type's: "lora.targets='q_proj' is a str: set it to a string"."""
    recipe = tmp_path / "recipe.py"
    recipe.write_text("from qlora.config import *\nconfig = Config(model=ModelConfig(path='m'), "
                      f"data=DataConfig(train='t.jsonl'), lora=LoRAConfig(targets={value}))\n")
    with pytest.raises(ConfigError, match=r"recipe.py:2: " + message):
        load_recipe(recipe)


def test_a_recipe_that_is_a_pipe_is_not_said_to_be_missing(tmp_path):
    """`python -m qlora.train <(...)` names /dev/fd/63, which exists: it was 'not found'."""
    os.mkfifo(tmp_path / "recipe.py")
    with pytest.raises(ConfigError, match=r"recipe.py is not a regular file \(a pipe or a device\)"):
        load_recipe(tmp_path / "recipe.py")


def test_a_run_directory_under_home_is_there():
    """`--output.dir=~/runs/x` (a shell expands no ~ after `=`) wrote to a folder named ~ in the working directory,
    where model.path and data.train expand theirs."""
    cfg = resolve_paths(apply_overrides(load_recipe(TINY), ["--output.dir=~/runs/x"]))
    assert cfg.output.dir == str(Path.home() / "runs" / "x")
    assert resolve_paths(load_recipe(TINY)).output.dir == "runs/tiny"  # a relative one stays as it is


def test_parse_args_separates_flags_from_overrides():
    cfg, flags = parse_args([TINY, "--resume", "--train.steps=2"], "usage")
    assert flags == ["--resume"] and cfg.train.steps == 2
    with pytest.raises(ConfigError, match="no recipe given"):
        parse_args(["--train.steps=2"], "usage")


@pytest.mark.parametrize("module", ["qlora.config.__main__", "qlora.report.memory"])
def test_a_key_without_its_value_is_named_so_by_every_command_that_reads_a_recipe(capsys, module):
    """`qlora.config RECIPE --train.lr` (or `--train.lr 1e-4`, the value a word of its own) said 'unknown flag
    --train.lr', as did qlora.memory and qlora.report.measure, sending the user to look for a flag; qlora.train said
    what was wrong. split_args, which they all read the command line with, says it."""
    main = __import__(module, fromlist=["main"]).main
    for argv in ([TINY, "--train.lr"], [TINY, "--train.lr", "1e-4"]):
        assert main(argv) == 2
        assert capsys.readouterr().err == "error: --train.lr has no value: write --train.lr=VALUE\n"


@pytest.mark.parametrize("parser", ["merge", "export", "eval", "generate"])
def test_a_flag_of_a_command_given_twice_takes_the_last_and_says_so(parser, capsys):
    """argparse took the last without a word: `qlora.merge RUN --out A --out B` wrote B. It says which stands now, on
    stderr (stdout may be the command's answer), as a recipe's key does; the same value twice says nothing."""
    from qlora.commands import PARSERS

    flag = {"merge": "--out", "export": "--gguf", "eval": "--json", "generate": "--prompt"}[parser]
    args = PARSERS[f"qlora.{parser}"]().parse_args(["run", f"{flag}=a", f"{flag}", "b", f"{flag}=b"])
    assert str(getattr(args, flag[2:])) == "b"
    assert capsys.readouterr().err == f"{flag} is given 3 times: the last, {flag}=b, stands (not {flag}=a, {flag}=b)\n"
    PARSERS[f"qlora.{parser}"]().parse_args(["run", f"{flag}=a", f"{flag}=a"])
    assert capsys.readouterr().err == ""


def test_a_key_given_twice_on_the_command_line_takes_the_last_and_says_so(capsys):
    """`--train.lr=1e-4 ... --train.lr=2e-4` trained at 2e-4 without a word. The last still stands (a base command
    line, then a case's own: the tests and benchmarks/quality.py write them so), and the line says which."""
    cfg, _ = parse_args([TINY, "--train.lr=1e-4", "--resume", "--train.steps=3", "--train.lr=2e-4"], "usage")
    assert (cfg.train.lr, cfg.train.steps) == (2e-4, 3)
    assert capsys.readouterr().out == ("--train.lr is given 2 times: the last, --train.lr=2e-4, stands (not "
                                       "--train.lr=1e-4)\n")
    parse_args([TINY, "--train.lr=1e-4", "--train.lr=1e-4", "--lora.r=4"], "usage")  # the same value: nothing to say
    assert capsys.readouterr().out == ""


def test_only_rank_0_notes_a_repeated_key(capsys, monkeypatch):
    """Under torchrun every process printed the repeated key's note: split_args ran before the ranks but 0 went
    quiet, so 8 processes said it 8 times."""
    import transformers

    from qlora.train import main

    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)  # launch.quiet sets it; this test's alone
    verbosity = transformers.utils.logging.get_verbosity()
    try:
        assert main([TINY, "--train.lr=1e-4", "--train.lr=2e-4", "--no-such-flag"]) == 2
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    assert capsys.readouterr().out == ""  # (rank 0 names the unknown flag)


def test_a_recipe_runs_as_python_runs_a_script(tmp_path):
    """A dataclass of its own under `from __future__ import annotations` (dataclasses looks the module up in
    sys.modules: 'NoneType' object has no attribute '__dict__') and a module beside it (ModuleNotFoundError)."""
    (tmp_path / "knobs.py").write_text("STEPS = 3\n")
    (tmp_path / "recipe.py").write_text(
        "from __future__ import annotations\n\nfrom dataclasses import dataclass\n\nimport knobs\n\n"
        "from qlora.config import Config, DataConfig, ModelConfig, TrainConfig\n\n\n@dataclass\nclass Extra:\n"
        "    warmup: int = 2\n\n\nconfig = Config(model=ModelConfig(path='m'), data=DataConfig(train='t.jsonl'),\n"
        "                train=TrainConfig(steps=knobs.STEPS, warmup_steps=Extra().warmup))\n")
    cfg = load_recipe(tmp_path / "recipe.py")
    assert (cfg.train.steps, cfg.train.warmup_steps) == (3, 2)
    assert str(tmp_path) not in sys.path and "qlora_recipe_recipe" not in sys.modules  # as they were


RECIPE = "from qlora.config import *\nconfig = Config(model=ModelConfig(path='m'), data=DataConfig(train='t'))\n"


@pytest.mark.parametrize(("code", "message"), [
    ("class E:\n    def __repr__(self):\n        raise ValueError\nsys.exit(E())",
     r"recipe.py:5: the recipe called exit\(<E object>\): a recipe only builds `config`$"),
    ("sys.exit('x' * 100000)", r"recipe.py:2: the recipe called exit\('x{199}\.\.\.\): a recipe only builds"),
], ids=["its repr raises", "a long text"])
def test_a_recipe_that_exits_is_named_at_its_line_in_one_short_line(tmp_path, code, message):
    """exit() of an object whose repr raises ended in a traceback (ValueError, in the handler), and one of a long text
    came out whole, a line of 100,000 characters."""
    (tmp_path / "recipe.py").write_text(f"import sys\n{code}\n")
    with pytest.raises(ConfigError, match=message):
        load_recipe(tmp_path / "recipe.py")


@pytest.mark.parametrize(("code", "message"), [
    ("x = [0] * 10**12", r"recipe.py:1: MemoryError: the recipe asked for more memory than the host has: a recipe "
                         r"only builds `config`$"),
    ("raise ValueError", r"recipe.py:1: ValueError$")], ids=["out of memory", "no message"])
def test_a_recipe_error_of_no_message_ends_in_no_colon(tmp_path, code, message):
    """An exception of no words ended the line in 'MemoryError: ', a colon and nothing after it."""
    (tmp_path / "recipe.py").write_text(f"{code}\n")
    with pytest.raises(ConfigError, match=message):
        load_recipe(tmp_path / "recipe.py")


def test_a_recipe_may_replace_sys_path(tmp_path):
    """Its folder, put first on sys.path while it runs, was removed afterwards with list.remove: a recipe that had
    replaced sys.path (or dropped its folder) ended in ValueError: list.remove(x): x not in list."""
    (tmp_path / "recipe.py").write_text("import sys\nsys.path = sys.path[1:]\n" + RECIPE)
    assert load_recipe(tmp_path / "recipe.py").model.path == "m"


def test_a_recipe_that_changes_torch_default_dtype_is_refused_and_undone(tmp_path):
    """torch.set_default_dtype(torch.float64) in a recipe made the run's own tensors float64 while it said "compute
    float32": measured on the tiny recipe, step 2's loss 5.7077 against 5.7061."""
    import torch

    (tmp_path / "recipe.py").write_text("import torch\ntorch.set_default_dtype(torch.float64)\n" + RECIPE)
    with pytest.raises(ConfigError, match=r"^.*recipe.py: the recipe set torch's default dtype to torch.float64, "
                                          r"which every tensor the run creates would take .*: remove the call"):
        load_recipe(tmp_path / "recipe.py")
    assert torch.get_default_dtype() == torch.float32
