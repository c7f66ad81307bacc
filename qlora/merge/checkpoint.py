"""The merged checkpoint: the base read one tensor at a time (safetensors' safe_open), folded (fold.py) and written
shard by shard, so merging a 70B model holds one tensor in memory beside the shard being filled; the base's config and
tokenizer beside it, and merge_info.json.

The result is checked before it is renamed to --out: max |logits merged - logits of the adapter model| over a fixed
prompt set, both on CPU in fp32 (--skip-check for models too big for that). So --out holds a merge only once it is
whole and checked; a killed merge leaves a hidden `.OUT.partial-PID-*` that the next merge to the same --out removes.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from qlora.base.build import INDEX, checkpoint_shards
from qlora.base.load import load_tokenizer
from qlora.config import Config
from qlora.console import announce, progress, since
from qlora.errors import ConfigError, check_writable
from qlora.generate import render
from qlora.merge.fold import folding, merge_source, read_scaling
from qlora.partial import (
    name_output,
    new_folders,
    ordinary_modes,
    partial_prefix,
    remove_abandoned,
    rename_new,
    save_tensors,
    write_aside,
)
from qlora.training.assemble import load_run_fp32, read_run_config
from qlora.training.rundir import run_owned

INFO = "merge_info.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
FLOAT_KINDS = ("F64", "F32", "F16", "BF16")  # safetensors dtype names of the tensors a merge casts

# The tolerance docs/after-training.md states, as a share of the largest |logit| on PROMPTS. fp32 output: exact up to
# summation order (measured 4e-6 on SmolLM2-135M). bf16/fp16 output: each merged weight is rounded once (relative
# error <= 2^-9 in bf16), which no 16-bit export avoids (measured on SmolLM2-135M: 1.8% for the default merge of a
# qlora run, 0.9% for a lora run; 7% for the latter with nearest rounding, see fold.round_stochastic).
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.03, "float16": 0.03}  # keyed by merge_info.json's "dtype"

# Short and varied: prose, code, a question, digits. The check compares every position's logits, not just the last.
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Where does the 9 am flight from Oslo go?",
           "reverse: dog moon red", "12 + 35 = "]


def plan_shards(shards: list[Path], dtype: torch.dtype, max_bytes: int) -> list[list[tuple[str, Path]]]:
    """Group the base tensors into output shards of at most `max_bytes` (a larger tensor gets a shard of its own).

    Sizes come from the safetensors headers alone, so the shard count, and with it every file name, is known before
    a single tensor is read.
    """
    groups, size = [[]], 0
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                info = f.get_slice(name)
                kind = info.get_dtype()
                # Floating tensors are written in `dtype`; others (integer buffers) keep their own width.
                width = dtype.itemsize if kind in FLOAT_KINDS else int(re.sub(r"\D", "", kind) or 8) // 8
                nbytes = torch.Size(info.get_shape()).numel() * width
                if groups[-1] and size + nbytes > max_bytes:
                    groups.append([])
                    size = 0
                groups[-1].append((name, shard))
                size += nbytes
    return groups


def copy_side_files(base: Path, out: Path, dtype: torch.dtype) -> None:
    """Config, generation config, tokenizer and chat template from the base; the config says the new dtype."""
    for item in base.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name != INDEX:
            shutil.copy2(item, out / item.name)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)  # the merged checkpoint is plain 16-bit, whatever the base was
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name  # transformers 5
    if "torch_dtype" in config:
        config["torch_dtype"] = name  # transformers 4
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_shards(shards: list[Path], out: Path, fold: Callable[[str, torch.Tensor], torch.Tensor],
                 dtype: torch.dtype, max_bytes: int) -> int:
    """Read every base tensor once, pass it through `fold`, write safetensors shards (+ index); return the bytes."""
    groups = plan_shards(shards, dtype, max_bytes)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)])
    weight_map, total = {}, 0
    announce(f"reading {sum(map(len, groups))} base tensors, folding in the adapter, writing {len(groups)} shard(s)")
    for k, (file_name, group) in enumerate(zip(names, groups, strict=True), 1):
        shard = {}
        for name, source in progress(group, len(group), f"shard {k}/{len(groups)}", "tensor"):
            with safe_open(str(source), "pt") as f:  # memory-mapped: opening it again per tensor costs nothing
                shard[name] = fold(name, f.get_tensor(name)).contiguous()
            weight_map[name] = file_name
            total += shard[name].numel() * shard[name].element_size()
        save_tensors(shard, out / file_name)
        del shard  # only this shard's tensors were ever held
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return total


def merge(run_dir: Path, out: Path, base_16bit: str | None = None, dtype: torch.dtype = torch.bfloat16,
          max_shard_bytes: int = 5 * 10**9, device: str | None = None, check: bool = False) -> dict:
    """Write the merged checkpoint into `out`; return what was done, with the check's numbers under "merge_error"
    when `check` (merge_error; a merge beyond its tolerance is kept all the same, for inspection).

    Built and checked in a hidden sibling (partial_prefix), then renamed to `out` as the very last step: `out` exists
    only whole, and with `check` only checked. A kill at any moment leaves `out` as it was, and the next run removes
    the killed run's partial (remove_abandoned).
    """
    run_dir, out = Path(run_dir), Path(out)
    cfg = read_run_config(run_dir)  # once: the run checked here is the run folded and the check's reference
    read_scaling(run_dir, cfg)  # a run that cannot be merged is named before --out
    check_writable(out, "--out", directory=True)
    if (top := run_owned(out, run_dir)) is not None:  # a resume would take it for a checkpoint, or remove it
        raise ConfigError(f"--out {out} is the run's own {top}, which its training reads, renames or removes: choose a "
                          f"directory outside the run, e.g. {run_dir.resolve()}-merged")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty: choose another directory or delete it")
    if out.exists():  # empty: the finished merge takes its place, by rename
        if out.resolve() == Path.cwd().resolve():
            raise ConfigError(f"--out {out} is the current directory, which the finished merge would replace: name "
                              f"it from outside (--out ../{Path.cwd().name}) or choose another")
        out = out.resolve()  # a link to an empty directory: the merge goes where it points, the link stays
    source = merge_source(run_dir, base_16bit, device, cfg)
    base = source.base
    started = announce(f"merging {run_dir} onto {source.onto}, written as {str(dtype).removeprefix('torch.')}")

    with new_folders(out.parent):  # removed again if the merge fails
        remove_abandoned(out)  # before writing: a 70B merge needs the space a killed one holds
        tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(out), dir=out.parent))
        try:
            with folding(source) as (fold, merged):
                total = write_shards(checkpoint_shards(Path(base)), tmp, lambda name, t: fold(name, t, dtype), dtype,
                                     max_shard_bytes)
            copy_side_files(Path(base), tmp, dtype)
            info = {"run_dir": str(run_dir.resolve()), "base": str(base), "merged_onto": source.onto,
                    "base_weights": "dequantised-nf4" if source.dequantise else "16bit",
                    "dtype": str(dtype).removeprefix("torch."), "scaling": source.scaling, "merged_layers": len(merged)}
            (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            if check:
                info["merge_error"] = merge_error(run_dir, tmp, cfg)  # records itself in tmp's merge_info.json
            ordinary_modes(tmp)
            rename_new(tmp, out, "--out")  # onto nothing, or the empty directory checked above
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            name_output(err, tmp, out)
            raise
    print(f"wrote {len(merged)} merged layers, {total / 1e9:.3f} GB, to {out} ({since(started)})")
    return info


@torch.no_grad()
def prompt_logits(model: torch.nn.Module, tokenizer: object) -> list[torch.Tensor]:
    """fp32 logits at every position of every prompt in PROMPTS, one prompt at a time (no padding to mask)."""
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(render(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
        out.append(model(input_ids=ids.to(model.device), use_cache=False).logits[0].float().cpu())
    return out


def merge_error(run_dir: Path, out: Path, cfg: Config | None = None) -> dict:
    """max |logits merged - logits of the adapter model| over PROMPTS, both on CPU in fp32.

    The reference is the adapter on the base it was merged onto, held to TOLERANCE: the 4-bit base for a default
    merge, the 16-bit base for --base-16bit (and then also, for information, the 4-bit base the adapter trained on,
    whose gap includes NF4's rounding). `cfg`: the run's run_config.json as the merge read it.
    """
    info = json.loads((Path(out) / INFO).read_text(encoding="utf-8"))
    # PyTorch's own layers, as the references run them (transformers 5.25 would swap in hub kernels by default)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map={"": "cpu"}, use_kernels=False)
    merged = prompt_logits(model, load_tokenizer(str(out)))
    del model
    cfg = cfg or read_run_config(Path(run_dir))
    references = [("4-bit", "qlora", None)] if info["base_weights"] == "dequantised-nf4" else [
        ("16-bit", "lora", info["base"])] + ([("4-bit", "qlora", None)] if cfg.quant.method == "qlora" else [])
    errors, tolerance = {}, TOLERANCE[info["dtype"]]
    for i, (label, method, base_path) in enumerate(references):
        announce(f"checking the merge: logits at every position of {len(PROMPTS)} prompts, merged model against the "
                 f"adapter on the {label} base, both on CPU in fp32 (--skip-check skips this)")
        _, ref_model, tokenizer, _ = load_run_fp32(run_dir, method, base_path, cfg)
        reference = prompt_logits(ref_model, tokenizer)
        del ref_model
        diff = max(float((m - r).abs().max()) for m, r in zip(merged, reference, strict=True))
        mean = float(torch.cat([(m - r).abs().flatten() for m, r in zip(merged, reference, strict=True)]).mean())
        agree = sum(int((m.argmax(-1) == r.argmax(-1)).sum()) for m, r in zip(merged, reference, strict=True))
        positions = sum(m.shape[0] for m in merged)
        scale = max(float(r.abs().max()) for r in reference)
        within = diff <= tolerance * scale if i == 0 else None  # only the base merged onto is held to it
        errors[f"vs adapter on {label} base"] = {"max_abs_logit_diff": diff, "mean_abs_logit_diff": mean,
                                                 "max_abs_logit": scale,
                                                 "argmax_agreement": agree / positions, "positions": positions,
                                                 "within_tolerance": within}
        verdict = "" if within is None else (f"; {'within' if within else 'OVER'} the tolerance of "
                                             f"{100 * tolerance:g}% of the largest logit")
        print(f"merge error vs the adapter on the {label} base: max |logit diff| {diff:.3e} (mean {mean:.1e}, logits "
              f"up to {scale:.1f}), same argmax at {agree}/{positions} positions{verdict}")
    info["merge_error"] = errors
    write_aside(Path(out) / INFO, json.dumps(info, indent=2) + "\n")  # a kill while writing leaves it as it was
    return errors

