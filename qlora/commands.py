"""What every command accepts: its usage, flags and `--help`, from light imports only (no torch, no transformers).

`python -m qlora.<command> ... --help` is answered from here as the command starts, before it imports torch
(qlora/__init__.py calls `answer_help_early`), so help comes at once. The commands parse their own arguments with the
same definitions: the recipe commands (train, memory, config) with `RecipeCommand.flags`, the others (eval, generate,
merge, export) with the parsers below (qlora.cli.ArgumentParser: an error is one line and exit 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qlora.cli import ArgumentParser, run, running_command

HELP_FLAGS = ("-h", "--help")


@dataclass(frozen=True)
class RecipeCommand:
    """A command that takes a recipe and `--section.key=value` overrides, plus a few flags of its own."""

    usage: str
    about: str
    flags: dict[str, str]
    """Each flag as help shows it (`--out-dir=DIR`: one that takes a value names it) and what it does."""

    @property
    def flag_names(self) -> tuple[str, ...]:
        return tuple(f.split("=")[0].split(" ")[0] for f in self.flags)

    def help(self, argv: list[str]) -> str:
        """The help text; with a recipe among `argv`, also every field with its type, resolved value and docstring."""
        width = max(len(f) for f in [*self.flags, "--section.key=value"]) + 2
        rows = [("--section.key=value", "override a recipe field (parsed to the field's type and checked)"),
                *self.flags.items(), ("-h, --help", "this help; after RECIPE.py also every field with its type, "
                                                    "value and meaning")]
        flags = [f"  {f.ljust(width)}{what}" for f, what in rows]
        recipe = next((a for a in argv if not a.startswith("-")), None)
        if recipe is None:
            return "\n".join([f"usage: {self.usage}", "", self.about, "", *flags, "",
                              "With RECIPE.py, --help also lists the recipe's fields."]) + "\n"
        from qlora.config import apply_overrides, describe, load_recipe

        overrides = [a for a in argv if a.startswith("--") and "." in a.split("=", 1)[0]]
        config = apply_overrides(load_recipe(recipe), overrides)
        # The recipe's fields first: `RECIPE --help | head` shows what this recipe sets, not the flags every one takes.
        return "\n".join([f"usage: {self.usage}", "", f"fields of {recipe}, overrides applied (set any as "
                          "--section.key=value):", describe(config), "", self.about, "", *flags]) + "\n"


TRAIN = RecipeCommand(
    usage="python -m qlora.train RECIPE.py [--section.key=value ...] [--resume] [--overwrite] [--debug]",
    about="Fine-tune the recipe's base: NF4 (or 16-bit) weights, LoRA adapters, paged AdamW. The adapter, "
          "checkpoints,\nmetrics.jsonl, run_config.json and memory.json go to output.dir.",
    flags={"--resume": "continue the run in output.dir as its run_config.json records it (overrides: only "
                       "where safe, and said)",
           "--overwrite": "delete another run's checkpoints, adapter and metrics in output.dir, then start",
           "--debug": "show an error's traceback instead of its one line"})

MEMORY = RecipeCommand(
    usage="python -m qlora.memory RECIPE.py [--measure] [--methods qlora,lora,full] [--gpus N] [--json] "
          "[--out-dir=DIR] [--gpu-gib N [--host-gib 128]] [--max-context [--gpu-gib 24,48,80] [--host-gib 128]] "
          "[--section.key=value ...]",
    about="Peak memory of full fine-tuning, 16-bit LoRA and QLoRA for the recipe: estimated from config.json "
          "(seconds,\nnothing loaded), and measured with --measure. Prints the report; writes files only into "
          "--out-dir.",
    flags={"--measure": "also run 3 real training steps per method, each in a fresh process, and compare",
           "--methods LIST": "which methods, comma-separated (default qlora,lora,full)",
           "--gpus N": "also each method's peak per process of a run over N GPUs (torchrun): data parallel, and "
                       "for qlora and lora the base sharded (train.shard_base); estimated only",
           "--json": "print the whole report as JSON (the summary goes to stderr)",
           "--out-dir=DIR": "write <recipe>-<device>.md, .json and .png there (memory_reports/ holds the committed "
                         "ones)",
           "--max-context": "instead, the longest context that trains on each card size, and the overrides that "
                            "train it (estimated)",
           "--gpu-gib LIST": "the card sizes --max-context tries, in GiB (default 24,48,80); without it, the one "
                             "card the report is drawn against, and a recipe's train.plan=fastest chooses its levers "
                             "for it as qlora.train would there",
           "--host-gib N": "the host's memory in GiB (default 128), for --max-context and for the plan for "
                           "--gpu-gib's card alike: 6 GiB of it the process's and the OS's, the rest what the plan "
                           "may keep there",
           "--debug": "show an error's traceback instead of its one line"})

CONFIG = RecipeCommand(
    usage="python -m qlora.config RECIPE.py [--section.key=value ...]",
    about="Print the recipe's resolved config as JSON, overrides applied and checked.",
    flags={"--debug": "show an error's traceback instead of its one line"})

RECIPE_COMMANDS = {"qlora.train": TRAIN, "qlora.memory": MEMORY, "qlora.config": CONFIG}


def a_path(text: str) -> Path:
    """A path argument; an empty one is refused (as Path it was ".": --out= merged into the current directory's name,
    --json= said "--json=. is a directory")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty: give one")
    return Path(text)


def a_source(text: str) -> str:
    """A data file or hub dataset id; an empty one is refused (it was looked up on the hub: "data source '' is
    neither a local file nor a reachable hub dataset")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the data source is empty: give a data file or a hub dataset id")
    return text


def run_dir_parser(command: str, about: str,
                   device: str = "default: the run's train.device") -> ArgumentParser:
    """The part every command on a finished run shares: the run directory, and the device to use (`device`: its
    help)."""
    parser = ArgumentParser(prog=f"python -m {command}", description=about)
    parser.add_argument("run_dir", type=a_path, help="a training output directory (or one of its checkpoint-N)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help=device)
    # qlora.cli.run takes --debug off the command line before the parser sees it: listed here so that help says so.
    parser.add_argument("--debug", action="store_true", help="show an error's traceback instead of its one line")
    return parser


def eval_parser() -> ArgumentParser:
    parser = run_dir_parser("qlora.eval", "Reload a finished run and score it on held-out data: loss per target "
                                          "token, perplexity, exact match.")
    parser.add_argument("--data", type=a_source, help="held-out file to score instead of the run's own held-out split")
    parser.add_argument("--json", type=a_path, help="also write the numbers to this file")
    return parser


def generate_parser() -> ArgumentParser:
    parser = run_dir_parser("qlora.generate", "Talk to a trained adapter on its 4-bit base, unmerged; tokens are "
                                              "printed as they come.")
    parser.add_argument("--prompt", help="one prompt; without it, prompts are read from stdin until end of input")
    parser.add_argument("--jsonl", action="store_true",
                        help='each stdin line is a JSON string ("line one\\nline two") or an object with a "prompt" '
                             "field, so a prompt may hold newlines; without --jsonl each stdin line is one prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate per prompt at most "
                                                                         "(default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    parser.add_argument("--format", choices=["messages", "instruction", "text"],
                        help="render each prompt as the rows of this data format were (messages: a user turn in the "
                             "chat template; instruction: the Alpaca prompt; text: as it is); default: the format "
                             "the run trained on")
    return parser


def merge_parser() -> ArgumentParser:
    parser = run_dir_parser("qlora.merge", "Fold a trained adapter into a plain bf16 Hugging Face checkpoint.",
                            "where to quantise and merge; default: the run's train.device")
    parser.add_argument("--out", type=a_path, required=True, help="directory for the merged checkpoint (new or empty)")
    parser.add_argument("--base-16bit", metavar="PATH",
                        help="merge onto these original 16-bit weights instead of the dequantised NF4 base")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="dtype of the merged weights")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB (default)")
    parser.add_argument("--skip-check", action="store_true",
                        help="skip the merge-error check (it loads both models on CPU: too much for a huge model)")
    return parser


def export_parser() -> ArgumentParser:
    parser = run_dir_parser("qlora.export", "Write the trained model (adapter merged onto its base as it trained) as "
                                            "one GGUF file for llama.cpp, Ollama or LM Studio, then check it against "
                                            "the run.", "where to quantise and merge; default: the run's train.device")
    parser.add_argument("--gguf", type=a_path, required=True, help="the file to write, e.g. runs/mine.gguf (new)")
    parser.add_argument("--type", choices=("f16", "bf16", "q8_0", "q4_0"), default="f16",
                        help="type of the weight matrices (norms stay f32); default f16, the trained model to rounding")
    parser.add_argument("--rows", type=int, default=32, help="held-out rows the check runs through both models "
                                                                     "(default 32)")
    parser.add_argument("--skip-check", action="store_true",
                        help="skip reading the file back and comparing it with the trained model (it loads both on "
                             "CPU: too much for a huge model)")
    return parser


PARSERS: dict[str, Callable[[], ArgumentParser]] = {
    "qlora.eval": eval_parser, "qlora.generate": generate_parser, "qlora.merge": merge_parser,
    "qlora.export": export_parser}


def wants_help(argv: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)


def help_text(command: str, argv: list[str]) -> str:
    """`command`'s help (a recipe command's with the fields of the recipe in `argv`, if one is)."""
    if command in RECIPE_COMMANDS:
        return RECIPE_COMMANDS[command].help(argv)
    return PARSERS[command]().format_help()


def answer_help_early() -> None:
    """If this process is `python -m qlora.<command> ... --help`, print the help and exit now, before the command's
    module (and torch) is imported. A recipe that cannot be read ends in its one line, as the command would."""
    command = running_command()
    if command not in RECIPE_COMMANDS and command not in PARSERS or not wants_help(sys.argv[1:]):
        return

    def show(argv: list[str]) -> None:
        print(help_text(command, argv), end="")

    sys.exit(run(show))
