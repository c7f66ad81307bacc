"""The commands after training (qlora.eval, qlora.generate, qlora.merge) and beside it (qlora.memory, qlora.config),
given what a hostile user gives them: each ends in one line on stderr and exit 2, never a traceback, and writes
nothing. Real processes, forked from one that imported them once (tests/forked_cli.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qlora.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from qlora.base.build import TINY_LLAMA, byte_tokenizer
from qlora.config import load_recipe
from qlora.errors import ConfigError
from qlora.generate import read_prompt
from qlora.training.assemble import read_run_config
from qlora.training.checkpoint import OPTIMIZER, list_checkpoints
from qlora.training.rundir import LOCK

TINY = "recipes/tiny.py"
TINY_R = load_recipe(Path(__file__).resolve().parent.parent / TINY).lora.r


@pytest.fixture(scope="module")
def finished(cli, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step tiny run (copied, never changed, by each case)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = cli.run([TINY, "--train.steps=2", "--train.eval_every=0", "--train.eval_batches=1",
                      f"--output.dir={out}"])
    assert result.status == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a wider MLP: the tiny run's adapter does not fit it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("other-base")
    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{**TINY_LLAMA, "intermediate_size": 192})
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def edit_json(name: str, change: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    def setup(run: Path, other: Path) -> None:
        raw = json.loads((run / name).read_text())
        change(raw)
        (run / name).write_text(json.dumps(raw))
    return setup


def write(name: str, content: bytes | None) -> Callable[[Path, Path], None]:
    """Put `content` at `name` in the run (None: delete it)."""
    def setup(run: Path, other: Path) -> None:
        (run / name).unlink()
        if content is not None:
            (run / name).write_bytes(content)
    return setup


def lower_rank(run: Path, other: Path) -> None:
    """The adapter file of a rank-4 run in a directory whose run_config.json says the recipe's rank."""
    tensors = load_file(str(run / ADAPTER_WEIGHTS))
    cut = {k: (v[:4] if ".lora_A." in k else v[:, :4]).contiguous() for k, v in tensors.items()}
    save_file(cut, str(run / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def truncated_adapter(run: Path, other: Path) -> None:
    """The adapter file cut in its tensor data, as a full disk or a killed copy leaves it."""
    data = (run / ADAPTER_WEIGHTS).read_bytes()
    (run / ADAPTER_WEIGHTS).write_bytes(data[:len(data) // 2])


def nan_adapter(run: Path, other: Path) -> None:
    tensors = load_file(str(run / ADAPTER_WEIGHTS))
    for value in tensors.values():
        value.fill_(float("nan"))
    save_file(tensors, str(run / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def on_other_base(run: Path, other: Path) -> None:
    raw = json.loads((run / "run_config.json").read_text())
    raw["model"]["path"], raw["model"]["build"] = str(other), None
    (run / "run_config.json").write_text(json.dumps(raw))


def int_adapter(run: Path, other: Path) -> None:
    """The adapter's tensors re-saved as int32, names and shapes unchanged."""
    tensors = load_file(str(run / ADAPTER_WEIGHTS))
    save_file({k: v.to(torch.int32) for k, v in tensors.items()}, str(run / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def f64_adapter(run: Path, other: Path) -> None:
    """The adapter's tensors re-saved as float64, a dtype no run trains in (merge read its base's dtype off it)."""
    tensors = load_file(str(run / ADAPTER_WEIGHTS))
    save_file({k: v.double() for k, v in tensors.items()}, str(run / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def fp16_adapter(run: Path, other: Path) -> None:
    """The adapter of a run in fp32 re-saved as fp16, its header kept (halving the file, as a user might): merge read
    the dtype its base was quantised in off it, and rebuilt another NF4 base (5% of the weights a step off)."""
    with safe_open(str(run / ADAPTER_WEIGHTS), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(run / ADAPTER_WEIGHTS))
    save_file({k: v.half() for k, v in tensors.items()}, str(run / ADAPTER_WEIGHTS), metadata=metadata)


def edit_adapter_config(**changes: object) -> Callable[[Path, Path], None]:
    def setup(run: Path, other: Path) -> None:
        config = json.loads((run / ADAPTER_CONFIG).read_text())
        (run / ADAPTER_CONFIG).write_text(json.dumps({**config, **changes}))
    return setup


def noop(run: Path, other: Path) -> None:
    pass


def a_file(name: str, text: str = "the user's own file\n") -> Callable[[Path, Path], None]:
    def setup(run: Path, other: Path) -> None:
        (run.parent / name).write_text(text)
    return setup


def in_run(name: str, text: str = "the user's own notes\n") -> Callable[[Path, Path], None]:
    def setup(run: Path, other: Path) -> None:
        (run / name).write_text(text)
    return setup


def held_out_copy(run: Path, other: Path) -> None:
    shutil.copy("recipes/data/tiny/heldout.jsonl", run.parent / "held.jsonl")


def held_out_header_alone(run: Path, other: Path) -> None:
    """The run's data.eval pointed at a CSV file of its header alone."""
    (run.parent / "held.csv").write_text("instruction,output\n")
    edit_json("run_config.json", lambda c: c["data"].update(eval=str(run.parent / "held.csv")))(run, other)


def a_fifo(name: str) -> Callable[[Path, Path], None]:
    def setup(run: Path, other: Path) -> None:
        os.mkfifo(run.parent / name)
    return setup


def a_dir(name: str) -> Callable[[Path, Path], None]:
    def setup(run: Path, other: Path) -> None:
        (run.parent / name).mkdir()
    return setup


def before_first_checkpoint(run: Path, other: Path) -> None:
    """What a run killed before its first checkpoint leaves: its run_config.json, no weights, no checkpoint-N."""
    (run / ADAPTER_WEIGHTS).unlink()
    shutil.rmtree(run / "checkpoint-2")


def a_dir_for_the_adapter(run: Path, other: Path) -> None:
    (run / ADAPTER_WEIGHTS).unlink()
    (run / ADAPTER_WEIGHTS).mkdir()


# (id, module, arguments: {run} is a finished run's copy, {tmp} its parent; setup; the one line must match this)
CASES = [
    # its folder's run_config.json was read, then the adapter beside the file was "not found: the run has not finished"
    ("merge: RUN_DIR a file", "qlora.merge", ["{run}/run_config.json", "--out={tmp}/m"], noop,
     r"RUN_DIR .*run/run_config.json is a file: pass the training output directory it lies in"),
    ("eval: no run", "qlora.eval", ["{tmp}/nothing"], noop, r"nothing/run_config.json not found: RUN_DIR must be a "
                                                            r"training output directory"),
    ("eval: run config cut short", "qlora.eval", ["{run}"], write("run_config.json", b'{"model": {'),
     r"run_config.json is unreadable \(Expecting"),
    ("eval: run config a list", "qlora.eval", ["{run}"], write("run_config.json", b"[]"), r"is not a run config"),
    ("eval: adapter config a list", "qlora.eval", ["{run}"], write(ADAPTER_CONFIG, b"[]"),
     r"adapter_config.json lacks a positive r and lora_alpha"),
    ("eval: adapter config of another alpha", "qlora.eval", ["{run}"], edit_adapter_config(lora_alpha=1),
     r"adapter_config.json says r=\d+, lora_alpha=1 but run_config.json lora.r=\d+, lora.alpha="),
    # PEFT loads the adapter into the model these build, where eval and a merge rebuild the run from run_config.json
    # and passed: an edit of one loaded it into another model there than it trained in
    ("eval: adapter config of other target modules", "qlora.eval", ["{run}"],
     edit_adapter_config(target_modules=["q_proj", "v_proj"]),
     r"adapter_config.json: its target_modules \['q_proj', 'v_proj'\] are not the layers adapter_model.safetensors "
     r"beside it holds \['down_proj', .*\], so PEFT would load the adapter into another model than it trained in: "
     r"restore both from the run \(its checkpoint-N directories hold copies\)$"),
    ("merge: adapter config with an alpha pattern", "qlora.merge", ["{run}", "--out={tmp}/m", "--skip-check"],
     edit_adapter_config(alpha_pattern={"q_proj": 64}), r"adapter_config.json: its alpha_pattern is not what the run "
                                                        r"saved"),
    ("eval: adapter stored as int32", "qlora.eval", ["{run}"], int_adapter, r"is int32, not floating point"),
    ("merge: adapter stored as int32", "qlora.merge", ["{run}", "--out={tmp}/m"], int_adapter,
     r"is stored as torch.int32 / torch.int32, not floating point"),
    ("merge: adapter stored as float64", "qlora.merge", ["{run}", "--out={tmp}/m"], f64_adapter,
     r"is stored as torch.float64 / torch.float64, where a run saves its whole adapter in the one dtype it trained in "
     r"\(bf16, fp16 or fp32\): restore it from the run$"),
    ("merge: adapter cast to fp16 since", "qlora.merge", ["{run}", "--out={tmp}/m", "--skip-check"], fp16_adapter,
     r"adapter_model.safetensors holds the adapter as fp16, but the run trained, and saved it, in fp32 \(its header "
     r"says\), the dtype its base was quantised in: restore it from the run \(its checkpoint-N directories hold "
     r"copies\)$"),
    ("eval: run config invalid value", "qlora.eval", ["{run}"],
     edit_json("run_config.json", lambda c: c["lora"].update(r=0)), r"run_config.json: lora.r=0 must be a positive"),
    ("eval: run config unknown key", "qlora.eval", ["{run}"],
     edit_json("run_config.json", lambda c: c["train"].update(stepz=1)),
     r"run_config.json has an unknown key train.stepz \(did you mean train.steps\?\): restore the file$"),
    ("eval: run config nested too deeply", "qlora.eval", ["{run}"], write("run_config.json", b"[" * 100000),
     r"run_config.json is unreadable \(nested too deeply\): restore it"),
    ("merge: run config integer of 5,000 digits", "qlora.merge", ["{run}", "--out={tmp}/m"],
     write("run_config.json", b'{"lora": {"r": ' + b"1" * 5000 + b"}}"),
     r"run_config.json is unreadable \(Exceeds the limit \(4300 digits\) for integer string conversion: value has "
     r"5000 digits\): restore it"),
    ("eval: adapter config nested too deeply", "qlora.eval", ["{run}"], write(ADAPTER_CONFIG, b"[" * 100000),
     r"adapter_config.json is unreadable \(nested too deeply\): restore it from the run"),
    ("merge: adapter config integer of 5,000 digits", "qlora.merge", ["{run}", "--out={tmp}/m"],
     write(ADAPTER_CONFIG, b'{"r": ' + b"1" * 5000 + b"}"), r"adapter_config.json is unreadable \(Exceeds the limit"),
    ("eval: adapter of another rank", "qlora.eval", ["{run}"], lower_rank,
     r"adapter_model.safetensors does not fit the run's base .*tiny-llama\S* \(adapter tensor .* has shape \(4, 128\), "
     rf"this model's \({TINY_R}, 128\): was it trained with another lora.r or another base\?\)"),
    ("eval: adapter for another base", "qlora.eval", ["{run}"], on_other_base,
     r"adapter_model.safetensors does not fit the run's base .*other-base.* has shape .*, this model's"),
    ("eval: adapter holds nan", "qlora.eval", ["{run}"], nan_adapter, r"holds nan or inf: the adapter is broken"),
    ("eval: adapter cut short", "qlora.eval", ["{run}"], write(ADAPTER_WEIGHTS, b"\x08\x00\x00\x00\x00\x00\x00\x00{"),
     r"adapter_model.safetensors is unreadable \(Error while deserializing header: .*\): restore it from the run "
     r"\(its checkpoint-N directories hold copies\)$"),
    ("generate: adapter cut short", "qlora.generate", ["{run}", "--prompt=hi"], truncated_adapter,
     r"adapter_model.safetensors is unreadable \(Error while deserializing header: .*\): restore it from the run"),
    ("eval: --json is a directory", "qlora.eval", ["{run}", "--json={tmp}/out"], a_dir("out"),
     r"--json=.*out is a directory: give the path of a file"),
    # renamed over: as root, --json=/dev/zero left a 208-byte file where the device was
    ("eval: --json is a fifo", "qlora.eval", ["{run}", "--json={tmp}/pipe"], a_fifo("pipe"),
     r"--json=.*pipe is not a regular file \(a pipe or a device\), which writing would replace: give the path of a "
     r"file$"),
    ("eval: --json under a file", "qlora.eval", ["{run}", "--json={tmp}/out/x.json"], a_file("out"),
     r"--json=.*out/x.json cannot be created: .*out is a file"),
    ("eval: --json is the run's config", "qlora.eval", ["{run}", "--json={run}/run_config.json"], noop,
     r"--json=.*run_config.json is the run's own run_config.json: writing it would damage the run; choose another "
     r"path, e.g. .*run/eval.json"),
    ("eval: --json is the run's metrics", "qlora.eval", ["{run}", "--json={run}/metrics.jsonl"], noop,
     r"is the run's own metrics.jsonl"),
    ("eval: --json is the adapter", "qlora.eval", ["{run}", f"--json={{run}}/{ADAPTER_WEIGHTS}"], noop,
     rf"is the run's own {ADAPTER_WEIGHTS}"),
    ("eval: --json in a checkpoint", "qlora.eval", ["{run}", "--json={run}/checkpoint-2/eval.json"], noop,
     r"is the run's own checkpoint-2"),
    # the path it offered, RUN/checkpoint-2/eval.json, lay in the checkpoint too
    ("eval: --json in the checkpoint given as the run", "qlora.eval",
     ["{run}/checkpoint-2", "--json={run}/checkpoint-2/e.json"], noop,
     r"is the run's own checkpoint-2: writing it would damage the run; choose another path, e.g. .*/run/eval.json$"),
    ("eval: --json is the user's file in the run", "qlora.eval", ["{run}", "--json={run}/notes.json"],
     in_run("notes.json"), r"notes.json is a file in the run .* that qlora.eval did not write: writing it would "
                           r"destroy it"),
    ("eval: --json is the user's file outside the run", "qlora.eval", ["{run}", "--json={tmp}/notes.json"],
     a_file("notes.json"), r"--json=.*/notes.json is a file that qlora.eval did not write: writing it would destroy "
                           r"it; choose another path"),
    ("eval: --json is the --data file", "qlora.eval", ["{run}", "--data={tmp}/held.jsonl", "--json={tmp}/held.jsonl"],
     held_out_copy, r"--json=.*held.jsonl is the data file .*held.jsonl: writing it would destroy the data"),
    ("eval: --data missing", "qlora.eval", ["{run}", "--data={tmp}/none.jsonl"], noop, r"data file .*none.jsonl not "
                                                                                       r"found"),
    ("eval: --data empty", "qlora.eval", ["{run}", "--data={tmp}/empty.jsonl"], a_file("empty.jsonl", ""),
     r"empty.jsonl holds no rows: add data, or check --data$"),
    ("eval: --data an empty JSON array", "qlora.eval", ["{run}", "--data={tmp}/empty.json"],
     a_file("empty.json", "[]\n"), r"empty.json holds no rows: add data, or check --data$"),
    ("eval: bad --device", "qlora.eval", ["{run}", "--device=tpu"], noop,
     r"argument --device: invalid choice: 'tpu' .*\(usage: python -m qlora.eval "),
    # an empty path was ".": "--json=. is a directory", "--out . exists and is not empty", "./run_config.json"
    ("eval: empty --json", "qlora.eval", ["{run}", "--json="], noop, r"argument --json: the path is empty: give one "
                                                                      r"\(usage: python -m qlora.eval "),
    # it was looked up on the hub: "data source '' is neither a local file nor a reachable hub dataset"
    ("eval: empty --data", "qlora.eval", ["{run}", "--data="], noop,
     r"argument --data: the data source is empty: give a data file or a hub dataset id \(usage: python -m qlora.eval "),
    ("merge: empty --out", "qlora.merge", ["{run}", "--out="], noop, r"argument --out: the path is empty: give one"),
    ("export: empty --gguf", "qlora.export", ["{run}", "--gguf="], noop, r"argument --gguf: the path is empty"),
    ("generate: empty run dir", "qlora.generate", ["", "--prompt=hi"], noop, r"argument run_dir: the path is empty"),
    ("eval: no arguments", "qlora.eval", [], noop, r"the following arguments are required: run_dir \(usage: "),
    ("eval: unknown flag", "qlora.eval", ["{run}", "--bogus"], noop, r"unrecognized arguments: --bogus"),
    ("generate: no new tokens", "qlora.generate", ["{run}", "--max-new-tokens=0", "--prompt=hi"], noop,
     r"--max-new-tokens=0 must be positive"),
    ("generate: nan temperature", "qlora.generate", ["{run}", "--temperature=nan", "--prompt=hi"], noop,
     r"--temperature=nan must be a finite number >= 0"),
    ("generate: temperature below 1e-4", "qlora.generate", ["{run}", "--temperature=1e-320", "--prompt=hi"], noop,
     r"--temperature=1e-320 is below 0.0001, where sampling is greedy decoding"),
    # accepted, it printed random bytes (all tokens as likely), and past float32's range the logits became 0 or nan
    ("generate: temperature 1e300", "qlora.generate", ["{run}", "--temperature=1e300", "--prompt=hi"], noop,
     r"--temperature=1e\+300 is above 10, where every token is all but equally likely and the text is noise: use 0 "
     r"to decode greedily, or 0.0001 to 10 "),
    ("generate: prompt not UTF-8", "qlora.generate", ["{run}", "--prompt=caf\udce9"], noop,
     r"--prompt: not UTF-8 text \('\\udce9'\): give the prompt as UTF-8"),
    ("generate: tokens not a number", "qlora.generate", ["{run}", "--max-new-tokens=ten"], noop,
     r"argument --max-new-tokens: invalid int value: 'ten'"),
    ("generate: empty prompt", "qlora.generate", ["{run}", "--prompt="], noop, r"--prompt is empty"),
    ("generate: adapter of another rank", "qlora.generate", ["{run}", "--prompt=hi"], lower_rank,
     r"does not fit the run's base"),
    ("merge: --out is a file", "qlora.merge", ["{run}", "--out={tmp}/merged"], a_file("merged"),
     r"--out=.*merged is a file: give a directory"),
    ("merge: --out under a file", "qlora.merge", ["{run}", "--out={tmp}/merged/here"], a_file("merged"),
     r"--out=.*merged/here cannot be created: .*merged is a file"),
    ("merge: --out a checkpoint's name in the run", "qlora.merge", ["{run}", "--out={run}/checkpoint-9"], noop,
     r"--out .*run/checkpoint-9 is the run's own checkpoint-9, which its training reads, renames or removes: choose a "
     r"directory outside the run, e.g. .*run-merged$"),
    ("merge: --out a leftover's name in the run", "qlora.merge", ["{run}", "--out={run}/.tmp-final"], noop,
     r"is the run's own .tmp-final, which its training"),
    ("merge: --out in a checkpoint given as the run", "qlora.merge",
     ["{run}/checkpoint-2", "--out={run}/checkpoint-2/m"], noop, r"is the run's own checkpoint-2, which its training"),
    ("export: --gguf in a checkpoint", "qlora.export", ["{run}", "--gguf={run}/checkpoint-2/m.gguf"], noop,
     r"--gguf=.*run/checkpoint-2/m.gguf lies in the run's own checkpoint-2, which its training reads, renames or "
     r"removes: choose a path outside it, e.g. .*run.gguf$"),
    ("export: held-out file a CSV of its header alone", "qlora.export", ["{run}", "--gguf={tmp}/m.gguf"],
     held_out_header_alone, r"held.csv holds no rows: add data, or check data.eval in .*run/run_config.json, or "
                            r"export with --skip-check$"),
    ("merge: no --out", "qlora.merge", ["{run}"], noop, r"the following arguments are required: --out"),
    ("merge: zero shard size", "qlora.merge", ["{run}", "--out={tmp}/m", "--max-shard-size=0"], noop,
     r"--max-shard-size='0' must be more than 0 bytes"),
    ("merge: adapter config cut short", "qlora.merge", ["{run}", "--out={tmp}/m"], write(ADAPTER_CONFIG, b'{"r": '),
     r"adapter_config.json is unreadable \(Expecting"),
    ("merge: adapter config missing", "qlora.merge", ["{run}", "--out={tmp}/m"], write(ADAPTER_CONFIG, None),
     r"adapter_config.json is unreadable \(No such file"),
    ("merge: adapter config rank 0", "qlora.merge", ["{run}", "--out={tmp}/m"],
     edit_json(ADAPTER_CONFIG, lambda c: c.update(r=0)), r"adapter_config.json lacks a positive r and lora_alpha"),
    ("merge: adapter of another rank", "qlora.merge", ["{run}", "--out={tmp}/m"], lower_rank,
     rf"adapter_model.safetensors: the adapter of .* \(B \(\d+, 4\), A \(4, \d+\)\) does not fit rank {TINY_R}"),
    ("merge: onto another base", "qlora.merge", ["{run}", "--out={tmp}/m", "--base-16bit={other}"], noop,
     rf"the adapter of model.layers.0.mlp.* does not fit rank {TINY_R} on the base weight"),
    ("merge: adapter holds nan", "qlora.merge", ["{run}", "--out={tmp}/m"], nan_adapter, r"holds nan or inf: there is "
                                                                                        r"nothing to merge"),
    ("merge: missing 16-bit base", "qlora.merge", ["{run}", "--out={tmp}/m", "--base-16bit={tmp}/none"], noop,
     r"base .*none not found: give the directory holding its config.json and weights$"),
    ("merge: 16-bit base a file", "qlora.merge", ["{run}", "--out={tmp}/m", "--base-16bit={run}/run_config.json"],
     noop, r"base .*run_config.json is a file, not a checkpoint directory: give the directory holding its config.json "
           r"and weights$"),
    ("memory: --out-dir is a file", "qlora.memory", [TINY, "--out-dir={tmp}/report"], a_file("report"),
     r"--out-dir=.*report is a file: give a directory"),
    ("eval: a run killed before its first checkpoint", "qlora.eval", ["{run}"], before_first_checkpoint,
     r"run/adapter_model.safetensors not found: the run has not finished; it stopped before its first checkpoint, so "
     r"nothing was trained to use: train it again$"),
    ("generate: a checkpoint that lost its adapter", "qlora.generate", ["{run}/checkpoint-2", "--prompt=dog"],
     write(f"checkpoint-2/{ADAPTER_WEIGHTS}", None), r"checkpoint-2/adapter_model.safetensors not found: the "
     r"checkpoint lost it since it was written; no checkpoint of the run holds one: restore it, or train the run "
     r"again$"),
    ("merge: a directory for the adapter", "qlora.merge", ["{run}", "--out={tmp}/m"], a_dir_for_the_adapter,
     r"run/adapter_model.safetensors is not a file; pass .*run/checkpoint-2 instead$"),
    ("memory: a directory at a report's name", "qlora.memory", [TINY, "--out-dir={tmp}"], a_dir("tiny-none.json"),
     r"tiny-none.json is a directory, where the report writes its .json file: move it away, or choose another "
     r"--out-dir$"),
    ("memory: --out-dir in a run's checkpoint", "qlora.memory", [TINY, "--out-dir={run}/checkpoint-2/report"], noop,
     r"--out-dir=.*run/checkpoint-2/report lies in the run .*run's own checkpoint-2, which its training reads, renames "
     r"or removes: choose a directory outside it$"),
    ("memory: empty --out-dir", "qlora.memory", [TINY, "--out-dir="], noop, r"--out-dir= is empty"),
    ("memory: unknown method", "qlora.memory", [TINY, "--methods=qlora,int8"], noop, r"--methods 'qlora,int8': use"),
    ("memory: an empty method", "qlora.memory", [TINY, "--methods=qlora,,lora"], noop,  # read as qlora,lora: unsaid
     r"--methods 'qlora,,lora' has an empty item \(two commas together, or one at an end\): give a method between "
     r"each two commas, e.g. --methods=qlora,lora,full$"),
    ("memory: bad override", "qlora.memory", [TINY, "--lora.r=-1", "--out-dir={tmp}/r"], noop, r"lora.r=-1 must be"),
    ("memory: malformed config_json", "qlora.memory", [TINY, "--model.synthetic=true",
                                                       "--model.config_json={tmp}/config.json", "--out-dir={tmp}/r"],
     a_file("config.json"), r"config.json is not a readable config.json"),
    ("memory: config_json a fifo", "qlora.memory", [TINY, "--model.synthetic=true",
                                                   "--model.config_json={tmp}/pipe", "--out-dir={tmp}/r"],
     a_fifo("pipe"), r"model.config_json=.*pipe is not a regular file \(a pipe or a device\): point it at a model's "
                     r"config.json$"),
    ("memory: config_json a list", "qlora.memory", [TINY, "--model.synthetic=true", "--model.config_json={tmp}/c.json",
                                                    "--out-dir={tmp}/r"], a_file("c.json", "[1]"),
     r"c.json: config.json holds a JSON list, not an object"),
    ("train: synthetic, config_json a list", "qlora.train",
     [TINY, "--model.synthetic=true", "--model.config_json={tmp}/c.json", "--output.dir={tmp}/o"],
     a_file("c.json", "[1]"), r"model.config_json=.*c.json: config.json holds a JSON list, not an object"),
    ("measure: no runs", "qlora.report.measure", [TINY, "--out={tmp}/m.json", "--runs=0"], noop,
     r"--runs=0: give a whole number of at least 1"),
    ("memory: --gpus a superscript digit", "qlora.memory", [TINY, "--gpus=\u00b2"], noop,
     r"--gpus='\\xb2': write numbers in ASCII digits \(0-9\), without '_'$"),
    ("memory: --gpus 10**23", "qlora.memory", [TINY, f"--gpus={10**23}"], noop, r"--gpus '1000+': give the number"),
    ("memory: --gpus of 5000 digits", "qlora.memory", [TINY, "--gpus=" + "9" * 5000], noop, r"--gpus '9{20}':"),
    ("memory: infinite card", "qlora.memory", [TINY, "--max-context", "--gpu-gib=inf"], noop,
     r"--gpu-gib 'inf': use sizes in GiB above 0.5 \(a CUDA context, or a process holding torch, takes that alone\) "
     r"and up to 1048576"),
    # read as 24,48 and 24: a size left out by a slip, and a card evaluated twice, went unsaid
    ("memory: an empty card size", "qlora.memory", [TINY, "--max-context", "--gpu-gib=24,,48"], noop,
     r"--gpu-gib '24,,48' has an empty item \(two commas together, or one at an end\): give a size between each two "
     r"commas, e.g. --gpu-gib=24,48,80$"),
    ("memory: a card size given twice", "qlora.memory", [TINY, "--max-context", "--gpu-gib=24,24.0"], noop,
     r"--gpu-gib '24,24.0' names 24 GiB twice: give each size once, e.g. --gpu-gib=24,48,80$"),
    ("memory: host beyond a pebibyte", "qlora.memory", [TINY, "--max-context", "--host-gib=1e300"], noop,
     r"--host-gib '1e300': use sizes in GiB above 0.5 .* and up to 1048576, e.g. --host-gib=128$"),
    # drawn, planned for and tabled: "0.001 GiB card: 0 tokens"
    ("memory: a card smaller than a CUDA context", "qlora.memory", [TINY, "--train.device=cuda", "--gpu-gib=0.001"],
     noop, r"--gpu-gib '0.001': use sizes in GiB above 0.5 \(a CUDA context, .*e.g. --gpu-gib=24,48,80$"),
    ("memory: a host of a CUDA context", "qlora.memory",
     [TINY, "--train.device=cuda", "--max-context", "--gpu-gib=24", "--host-gib=0.5"], noop,
     r"--host-gib '0.5': use sizes in GiB above 0.5 "),
    ("measure: steps a superscript digit", "qlora.report.measure", [TINY, "--out={tmp}/m.json", "--steps=\u00b2"],
     noop, r"--steps='\\xb2': write numbers in ASCII digits \(0-9\), without '_'$"),
    ("measure: steps not a number", "qlora.report.measure", [TINY, "--out={tmp}/m.json", "--steps=two"], noop,
     r"--steps=two: give a whole number of at least 1"),
    ("measure: --out is a directory", "qlora.report.measure", [TINY, "--out={tmp}/out"], a_dir("out"),
     r"--out=.*out is a directory: give the path of a file"),
    ("measure: --out under a file", "qlora.report.measure", [TINY, "--out={tmp}/notes/m.json"], a_file("notes"),
     r"--out=.*notes/m.json cannot be created: .*notes is a file"),
    ("measure: empty --out", "qlora.report.measure", [TINY, "--out="], noop, r"--out= is empty: give the path"),
    # the `written:` line (the adapter's, the report's) split in two at the newline: a script reading it got two paths
    ("train: newline in output.dir", "qlora.train", [TINY, "--train.steps=1", "--output.dir={tmp}/a\nb"], noop,
     r"^error: output.dir='.*/a\\nb' holds a control character \(a newline or a tab\), which would split the line "
     r"that names it: choose a path without one$"),
    ("memory: newline in --out-dir", "qlora.memory", [TINY, "--out-dir={tmp}/a\nb"], noop,
     r"--out-dir='.*/a\\nb' holds a control character"),
    ("eval: tab in --json", "qlora.eval", ["{run}", "--json={tmp}/a\tb.json"], noop,
     r"--json='.*/a\\tb.json' holds a control character"),
    ("config: a flag", "qlora.config", [TINY, "--resume"], noop, r"unknown flag --resume"),
    ("config: seed beyond 64 bits", "qlora.config", [TINY, "--train.seed=18446744073709551616"], noop,
     r"train.seed=18446744073709551616 does not fit in 64 bits"),
]


@pytest.mark.parametrize(("module", "args", "setup", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_to_a_command_is_one_line_and_exit_2(cli, finished, other_base, tmp_path, module, args, setup,
                                                        pattern):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    setup(run, other_base)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    argv = [a.replace("{run}", str(run)).replace("{tmp}", str(tmp_path)).replace("{other}", str(other_base))
            for a in args]
    result = cli.run(argv, module=module)
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # no loading bar in a log either
    assert result.status == 2, result.stderr
    assert lines and "Traceback" not in result.stderr, result.stderr
    # qlora.generate's stdout is the text it makes: what loading said before the refusal is on stderr, above it
    said = [line for line in lines[:-1] if module != "qlora.generate" or line.startswith("error")]
    assert not said, result.stderr
    assert lines[-1].startswith("error: ") and re.search(pattern, lines[-1]), lines[-1]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written, nothing removed


NUMBERS = [("qlora.config", [TINY, "--train.steps={}"]), ("qlora.config", [TINY, "--train.lr={}"]),
           ("qlora.memory", [TINY, "--train.device=cuda", "--gpu-gib={}"]),
           ("qlora.memory", [TINY, "--train.device=cuda", "--gpu-gib=24", "--host-gib={}"]),
           ("qlora.memory", [TINY, "--gpus={}"]), ("qlora.generate", ["{tmp}", "--max-new-tokens={}"]),
           ("qlora.generate", ["{tmp}", "--temperature={}"]),
           ("qlora.export", ["{tmp}", "--gguf={tmp}/m.gguf", "--rows={}"]),
           ("qlora.report.measure", [TINY, "--out={tmp}/m.json", "--steps={}"]),
           ("qlora.report.snapshot", ["{tmp}/s.pickle", "--min-mib={}"])]


@pytest.mark.parametrize(("text", "read"), [("\u0663", "3"), ("1_0", "10")], ids=["Arabic-Indic digit", "underscore"])
@pytest.mark.parametrize(("module", "args"), NUMBERS, ids=[f"{m} {a[-1].split('=')[0]}" for m, a in NUMBERS])
def test_a_number_of_other_digits_or_with_underscores_is_refused_in_one_line_by_every_command(
        cli, tmp_path, module, args, text, read):
    """int() and float() read '\u0663' as 3 and '1_0' as 10: --gpus, measure's --steps and WORLD_SIZE refused them,
    an override, qlora.memory's sizes and the commands' --rows or --temperature took them without a word."""
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{}", text) for a in args]
    result = cli.run(argv, module=module)
    flag = argv[-1].split("=", 1)[0]
    assert result.status == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {flag}={text!a}: write numbers in ASCII digits (0-9), without '_' (Python reads it as {read})"
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_eval_of_a_run_whose_held_out_loss_is_nan_does_not_succeed(cli, finished, tmp_path):
    """As training never ends in success with a nan held-out loss, neither does a later evaluation of the run."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    silent_nan = ("import qlora.training.step\n"
                  "qlora.training.step.eval_stats = lambda *a, **k: (float('nan'), 1, 0, 1)\n")
    result = cli.run([str(run)], module="qlora.eval", prelude=silent_nan)
    assert result.status == 3, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"error: the held-out loss of {run} is nan: its weights give "
                                                      "non-finite logits on this data")


def test_generate_still_answers(cli, finished):
    """The checks above refuse bad input only: a plain prompt still gets its tokens, alone on stdout (`> out.txt` held
    the loading lines above the text)."""
    result = cli.run([str(finished), "--prompt=dog moon red", "--max-new-tokens=4"], module="qlora.generate")
    assert result.status == 0, result.stderr
    assert result.stderr.startswith("loading ") and "\nloaded in " in result.stderr, result.stderr
    assert "loading" not in result.stdout and "loaded in" not in result.stdout, result.stdout
    assert result.stdout.endswith("\n") and result.stdout.count("\n") <= 4, result.stdout  # 4 tokens: the text
    result = cli.run([str(finished), "--prompt=dog moon red", "--max-new-tokens=4", "--format=instruction"],
                     module="qlora.generate")
    assert result.status == 0, result.stderr


@pytest.mark.parametrize(("module", "args"), [("qlora.generate", ["--prompt=dog", "--max-new-tokens=1"]),
                                              ("qlora.eval", []), ("qlora.eval", ["--json={tmp}/eval.json"]),
                                              ("qlora.merge", ["--out={tmp}/m"]),
                                              ("qlora.merge", ["--out={tmp}/m", "--skip-check"])])
def test_eval_generate_and_merge_read_the_run_config_once(cli, finished, tmp_path, module, args):
    """Each read the run's run_config.json, and its newest checkpoint's record of it, twice (generate for the data's
    format, eval for its rows and --json once more), then again to load; merge four times (before --out, for what it
    folds, for its check and the check's reference). What was checked and what loaded could be two files, a run
    extended in between. (qlora.export: tests/test_export.py, on a run whose tokenizer it can write.)"""
    reads = tmp_path / "reads"
    count = ("import qlora.training.assemble as assemble\nread = assemble.read_config_json\n"
             f"def counted(path):\n    open({str(reads)!r}, 'a').write(f'{{path}}\\n')\n    return read(path)\n"
             "assemble.read_config_json = counted\n")
    result = cli.run([str(finished), *(a.replace("{tmp}", str(tmp_path)) for a in args)], module=module,
                     prelude=count)
    assert result.status == 0, result.stderr
    assert reads.read_text() == f"{finished / 'run_config.json'}\n"


def test_a_prompt_is_rendered_as_the_rows_the_run_trained_on(tmp_path, capsys):
    """Every prompt was wrapped in the chat template where the tokenizer has one: a run trained on text rows, or on
    instruction rows (the Alpaca prompt), was prompted in a form it never trained on."""
    from qlora.config import DataConfig
    from qlora.data.labels import ALPACA_PROMPT
    from qlora.generate import render, trained_format

    tokenizer = byte_tokenizer()
    assert tokenizer.chat_template  # else every format would render the prompt as it is
    rows = {"messages": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "instruction": {"instruction": "a", "output": "b"}, "text": {"text": "a b"}}
    for fmt, row in rows.items():
        (tmp_path / f"{fmt}.jsonl").write_text(json.dumps(row) + "\n")
        assert trained_format(DataConfig(train=str(tmp_path / f"{fmt}.jsonl"))) == fmt
    assert trained_format(DataConfig(train=str(tmp_path / "text.jsonl"), format="instruction")) == "instruction"
    assert render(tokenizer, "dog moon", "text") == "dog moon"
    assert render(tokenizer, "dog moon", "instruction") == ALPACA_PROMPT.format(instruction="dog moon")
    assert render(tokenizer, "dog moon", "messages") == tokenizer.apply_chat_template(
        [{"role": "user", "content": "dog moon"}], tokenize=False, add_generation_prompt=True)
    assert trained_format(DataConfig(train=str(tmp_path / "gone.jsonl"))) == "messages"
    assert "the run's data format is unknown (data file" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "pattern"), [
    (["--max-new-tokens=100000", "--prompt=hi"], r"--max-new-tokens=100000 exceeds the model's context of 1024 tokens "
                                                 r"\(max_position_embeddings\): use at most 1024$"),
    (["--prompt=" + "red dog sun " * 400, "--max-new-tokens=4"],
     r"--prompt: the prompt is \d+ tokens \(rendered as messages rows\), and with --max-new-tokens=4 it exceeds the "
     r"model's context of 1024 tokens \(max_position_embeddings\): shorten it to at most 1020 tokens")],
    ids=["more new tokens", "a longer prompt"])
def test_generate_refuses_what_the_context_cannot_hold_before_loading(cli, finished, args, pattern):
    """Both were refused once the base had loaded (minutes for a 70B): the context is in the base's config.json."""
    result = cli.run([str(finished), *args], module="qlora.generate")
    assert result.status == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert re.match(r"error: " + pattern, result.stderr), result.stderr


def test_a_hub_base_is_found_in_the_local_cache_before_loading(finished, tmp_path, monkeypatch):
    """A run on a hub id: its config.json is read from the hub's local cache, never the network; a base not there is
    left to the load."""
    import huggingface_hub.constants

    from qlora.generate import check_before_loading, local_base

    cfg = read_run_config(finished)
    repo = tmp_path / "hub" / "models--someone--tiny"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    shutil.copy(Path(cfg.model.path) / "config.json", repo / "snapshots" / "abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg.model.path, cfg.model.build = "someone/tiny", None
    assert local_base(cfg) == repo / "snapshots" / "abc"
    with pytest.raises(ConfigError, match=r"^--max-new-tokens=2000 exceeds the model's context of 1024 tokens"):
        check_before_loading(cfg, 2000, None, "messages")
    cfg.model.path = "someone/other"
    assert local_base(cfg) is None
    check_before_loading(cfg, 2000, None, "messages")


def test_generate_with_stdin_closed_and_no_prompt_says_so_before_loading(cli, tmp_path):
    """`qlora.generate RUN <&-` loaded the run, then ended in AttributeError: 'NoneType' object has no attribute
    'isatty' (Python leaves sys.stdin None for a closed descriptor 0)."""
    result = cli.run([str(tmp_path)], module="qlora.generate", prelude="import sys\nsys.stdin = None\n")
    assert result.status == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith("error: no --prompt, and stdin is closed: give --prompt TEXT, or pipe "
                                            "prompts to stdin (usage: python -m qlora.generate"), result.stderr
    assert "loading" not in result.stdout


def test_eval_reads_every_row_of_its_data_before_the_run_loads(cli, finished, tmp_path):
    """A row the run's format cannot score, last in --data, is named before the base loads (minutes for a 70B), as
    training names it."""
    rows = tmp_path / "held.jsonl"
    rows.write_text('{"text": "red dog"}\n{"text": "sun moon"}\n{"txt": "dog"}\n')
    result = cli.run([str(finished), f"--data={rows}"], module="qlora.eval")
    assert result.status == 2, result.stderr
    assert result.stderr.strip() == (f"error: {rows}:3: row lacks field(s) text that format 'text' needs: fix or "
                                     "delete that row")
    assert "loading " not in result.stdout and "building " not in result.stdout, result.stdout


def test_a_command_that_runs_alone_speaks_whatever_rank_the_environment_names(cli, finished, tmp_path):
    """Only qlora.train runs as one of several processes, rank 0 speaking for them: an eval in a job script that set
    RANK=1 (as torchrun sets it for its second process) exited 2 and printed nothing."""
    ranked = "import os\nos.environ.update(RANK='1', LOCAL_RANK='1', WORLD_SIZE='2')\n"
    result = cli.run([str(finished), f"--data={tmp_path / 'none.jsonl'}"], module="qlora.eval", prelude=ranked)
    assert result.status == 2 and result.stderr.startswith(f"error: data file {tmp_path / 'none.jsonl'} not found"), \
        result.stderr


def each_refuses(cli, run: Path, tmp_path: Path, line: str) -> None:
    """eval, merge and export of `run` each end in `line`, exit 2, writing nothing."""
    for module, args in [("qlora.eval", []), ("qlora.merge", [f"--out={tmp_path / 'm'}"]),
                         ("qlora.export", [f"--gguf={tmp_path / 'm.gguf'}"])]:
        result = cli.run([str(run), *args], module=module)
        assert result.status == 2, result.stderr
        assert result.stderr == f"error: {line}\n"


def test_a_run_being_trained_is_used_by_its_checkpoints(cli, finished, tmp_path):
    """A run being trained (its lock held: here by this test, as the trainer holds it from its first write to its
    end) has no final weights yet, or those of an earlier end where it was extended with --resume, which eval, merge
    and export took without a word. They are refused, naming its newest checkpoint, which is used as it is; so is
    one that lost its optimizer.pt, which they never read (complete ones only were named: "wait for its first")."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    newest = list_checkpoints(run)[-1]
    with open(run / LOCK, "w") as lock:
        lock.write("4242\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        for _ in range(2):
            each_refuses(cli, run, tmp_path, f"{run} is being trained now (pid 4242): its final weights are not where "
                         f"it has got to; pass {newest} to use its newest checkpoint, or wait for the run to end")
            assert cli.run([str(newest)], module="qlora.eval").status == 0
            (newest / OPTIMIZER).unlink(missing_ok=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_half_written_checkpoint_a_kill_left_is_no_run(cli, finished, tmp_path):
    """A `.tmp-checkpoint-N` folder, which a kill mid-save leaves and the next start clears, was taken as a
    checkpoint of the run: eval scored whatever half of it was there."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    half = run / ".tmp-checkpoint-9"
    shutil.copytree(list_checkpoints(run)[-1], half)
    each_refuses(cli, half, tmp_path, f"{half} is a folder the trainer writes before it renames it (a kill left it "
                 f"half written), not a checkpoint: pass {run} or one of its checkpoint-N")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


KILL_AT_FINAL_SAVE = """
import os, signal
import qlora.training.checkpoint as ckpt
ckpt.save_final = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # its last checkpoint written, not its adapter
"""


def test_a_run_extended_and_killed_is_used_by_its_checkpoints_not_its_earlier_adapter(cli, finished, tmp_path):
    """A finished run given more steps with --resume keeps the adapter of its earlier end until it ends again. Killed
    before that, its lock is gone, and eval, merge and export took that adapter without a word (measured on the tiny
    recipe: 8 steps extended to 12, killed after checkpoint-10, eval scored the adapter of step 8). They are refused
    as while it trains, naming its newest checkpoint, whole or not: one whose optimizer.pt was deleted (eval, merge
    and export never read it) was passed over for checkpoint-2, of the earlier end, and eval scored that adapter."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    result = cli.run([TINY, "--train.steps=3", "--train.eval_every=0", "--train.eval_batches=1", f"--output.dir={run}",
                      "--resume"], prelude=KILL_AT_FINAL_SAVE)
    assert result.status == -signal.SIGKILL, result.stderr
    newest = list_checkpoints(run)[-1]
    assert newest.name == "checkpoint-3"
    for _ in range(2):
        each_refuses(cli, run, tmp_path, f"{run} was extended past its adapter_model.safetensors (of an earlier end) "
                     f"and stopped at checkpoint-3: pass {newest} to use its newest checkpoint, or continue the run "
                     "with --resume to write its weights")
        (newest / OPTIMIZER).unlink(missing_ok=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_adapter_of_no_recorded_step_is_of_an_earlier_end_where_the_run_is_short_of_its_steps(cli, finished,
                                                                                                tmp_path):
    """An adapter written before each recorded its step: a run whose newest checkpoint is short of its train.steps
    (as an extension to 3 steps, stopped at its first checkpoint, leaves it) was extended past it."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    save_file(load_file(str(run / ADAPTER_WEIGHTS)), str(run / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = json.loads((run / "run_config.json").read_text())
    (run / "run_config.json").write_text(json.dumps({**config, "train": {**config["train"], "steps": 3}}))
    newest = list_checkpoints(run)[-1]
    each_refuses(cli, run, tmp_path, f"{run} was extended past its adapter_model.safetensors (of an earlier end) and "
                 f"stopped at {newest.name}: pass {newest} to use its newest checkpoint, or continue the run with "
                 "--resume to write its weights")
    config["train"]["steps"] = 2  # the run as it ended: its adapter is where it got to
    (run / "run_config.json").write_text(json.dumps(config))
    assert cli.run([str(run)], module="qlora.eval").status == 0


# In the child, before the command: the first write_text of a text holding MARK writes half of it, then the process
# dies (kill -9: no cleanup runs), as a kill in the middle of writing a file would leave it.
KILL_MID_WRITE = """
import os, pathlib, signal
write_text = pathlib.Path.write_text
def half_then_die(self, text, *args, **kwargs):
    if {mark!r} in text:
        write_text(self, text[:len(text) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return write_text(self, text, *args, **kwargs)
pathlib.Path.write_text = half_then_die
"""


def test_eval_json_is_written_whole_and_may_be_written_again(cli, finished, tmp_path):
    """The same `--json` twice is the same command run again (an earlier result may be replaced); a kill while it is
    written leaves the earlier result whole, never half of one."""
    out = tmp_path / "eval.json"
    argv = [str(finished), f"--json={out}"]
    assert cli.run(argv, module="qlora.eval").status == 0
    first = out.read_text()
    assert cli.run(argv, module="qlora.eval", prelude=KILL_MID_WRITE.format(mark="eval_loss")).status == -signal.SIGKILL
    assert out.read_text() == first
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for _ in range(2):  # inside the run too: its own earlier result is not the run's file
        result = cli.run([str(run), f"--json={run}/eval.json"], module="qlora.eval")
        assert result.status == 0, result.stderr
        assert json.loads((run / "eval.json").read_text())["eval_loss"] == json.loads(first)["eval_loss"]


def test_measure_out_is_written_whole(cli, tmp_path):
    out = tmp_path / "measured.json"
    out.write_text('{"an earlier": "measurement"}\n')
    result = cli.run([TINY, f"--out={out}", "--steps=1"], module="qlora.report.measure",
                     prelude=KILL_MID_WRITE.format(mark="measured_peak_bytes"))
    assert result.status == -signal.SIGKILL, result.stderr
    assert out.read_text() == '{"an earlier": "measurement"}\n'


KILL_IN_PLOT = """
import os, signal
import qlora.report.plot
def die_while_plotting(report, path):
    open(path, "wb").close()  # savefig has opened its file: a kill now left a 0-byte .png in place
    os.kill(os.getpid(), signal.SIGKILL)
qlora.report.plot.plot_report = die_while_plotting
"""


def test_a_memory_report_killed_while_written_leaves_the_earlier_report_whole(cli, tmp_path):
    result = cli.run([TINY, f"--out-dir={tmp_path}"], module="qlora.memory")
    assert result.status == 0, result.stderr
    report = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(report) == ["tiny-none.json", "tiny-none.md", "tiny-none.png"]
    result = cli.run([TINY, "--lora.r=16", f"--out-dir={tmp_path}"], module="qlora.memory", prelude=KILL_IN_PLOT)
    assert result.status == -signal.SIGKILL, result.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if not p.name.startswith(".")} == report


KILL_IN_CHECK = """
import os, signal
import qlora.training.assemble
def die(*args, **kwargs):  # the check loads the adapter model to compare with: the merge is written by now
    os.kill(os.getpid(), signal.SIGKILL)
qlora.training.assemble.load_run = die
"""


def test_a_merge_killed_in_its_check_leaves_no_out_and_the_next_one_cleans_up(cli, finished, tmp_path):
    """--out appears only once the merge is whole and checked; what a kill -9 left (no cleanup runs) is removed by the
    next merge to the same --out, and a partial of a live merge is not."""
    out = tmp_path / "merged"
    pid = cli.start([str(finished), f"--out={out}"], module="qlora.merge", prelude=KILL_IN_CHECK)
    assert cli.wait(pid).status == -signal.SIGKILL
    assert not out.exists()
    [killed] = tmp_path.glob(".merged.partial-*")
    assert killed.name.startswith(f".merged.partial-{pid}-") and (killed / "model.safetensors").is_file()
    live = tmp_path / f".merged.partial-{os.getpid()}-live"  # this test's own process: alive
    live.mkdir()

    result = cli.run([str(finished), f"--out={out}"], module="qlora.merge")
    assert result.status == 0, result.stderr
    assert f"removed {killed.name} left by a run that was killed\n" in result.stdout
    assert sorted(tmp_path.iterdir()) == [live, out]
    assert json.loads((out / "merge_info.json").read_text())["merge_error"]["vs adapter on 4-bit base"][
        "within_tolerance"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777, (out / "model.safetensors").stat().st_mode & 0o777) == (
        0o777 & ~umask, 0o666 & ~umask)  # as readable as any checkpoint: safetensors alone writes 0600


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is of a machine without a CUDA GPU")
def test_eval_on_cuda_without_a_gpu_names_its_own_flag(cli, finished):
    result = cli.run([str(finished), "--device=cuda"], module="qlora.eval")
    assert result.status == 2 and result.stderr.strip() == ("error: --device=cuda but no CUDA GPU is visible: pass "
                                                            "--device=cpu (or auto)"), result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is of a machine without a CUDA GPU")
def test_a_run_trained_on_cuda_read_back_without_a_gpu_says_so_and_the_flag(cli, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    config = json.loads((run / "run_config.json").read_text())
    config["train"]["device"] = "cuda"
    (run / "run_config.json").write_text(json.dumps(config))
    result = cli.run([str(run)], module="qlora.eval")
    assert result.status == 2, result.stderr
    assert result.stderr.strip() == (f"error: {run} trained with train.device=cuda, but no CUDA GPU is visible: pass "
                                     "--device=cpu (or auto)")
    assert cli.run([str(run), "--device=cpu"], module="qlora.eval").status == 0



def test_a_prompt_on_stdin_is_its_line_without_the_line_end_and_never_empty():
    """Windows' \\r\\n went to the model as part of the prompt; an empty --jsonl prompt was generated from, where
    --prompt= is refused."""
    assert read_prompt("reverse: red dog sun\r\n", jsonl=False, number=1) == "reverse: red dog sun"
    assert read_prompt("  def f(x): \t\n", jsonl=False, number=1) == "  def f(x): \t"  # its own blanks are its text
    assert read_prompt('{"prompt": "a\\nb"}\n', jsonl=True, number=2) == "a\nb"
    with pytest.raises(ConfigError, match=r"^stdin:3: the prompt is empty: give the text to complete$"):
        read_prompt('{"prompt": ""}\n', jsonl=True, number=3)
    # JSON that json.loads refuses otherwise than as malformed: a traceback, before
    with pytest.raises(ConfigError, match=r"^stdin:4: not JSON \(nested too deeply\): with --jsonl write each"):
        read_prompt("[" * 100000, jsonl=True, number=4)
    with pytest.raises(ConfigError, match=r"^stdin:5: not JSON \(Exceeds the limit \(4300 digits\) for integer"):
        read_prompt("1" * 5000, jsonl=True, number=5)
