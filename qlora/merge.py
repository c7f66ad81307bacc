"""`python -m qlora.merge RUN_DIR --out DIR [--base-16bit PATH]`: fold a trained adapter into a plain bf16 checkpoint.

    W = W0 + (alpha / r) B A        in fp32, then rounded once to the output dtype (bf16 by default)

W0 is, by default, the base weight as the adapter saw it in training: quantised to NF4 (with double quant) exactly as
the 4-bit load does and dequantised back, so the merged model computes what the adapter model computed (layers the run
kept in 16-bit, quant.keep_16bit, are taken as they are; quant.blocksize is followed). With
--base-16bit PATH, W0 is the original 16-bit weight instead: closer to the unquantised model, further from what the
adapter was trained against. The merged weight is never quantised again: NF4's rounding (steps of ~1/8 of a block's
absmax) is far coarser than a LoRA update, so re-quantising erases it (transformers 31293, peft 2321 and 1043).
Rounding to bf16 is to nearest, or stochastic where W0 is already bf16, where nearest would erase it too
(`round_stochastic`).

The base checkpoint is read one tensor at a time (safetensors' safe_open) and written shard by shard, so merging a
70B model holds one tensor in memory beside the shard being filled. The result is checked before it is renamed to
--out: max |logits merged - logits of the adapter model| over a fixed prompt set, both on CPU in fp32 (--skip-check for
models too big for that). So --out holds a merge only once it is whole and checked; a killed merge leaves a hidden
`.OUT.partial-PID-*` that the next merge to the same --out removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from qlora.adapters.loftq import load_shifts, shifted
from qlora.adapters.lora import ADAPTER_WEIGHTS, PEFT_PREFIX, read_adapter_config
from qlora.base.bnb import bnb
from qlora.base.build import INDEX, checkpoint_shards, ensure_checkpoint, local_checkpoint
from qlora.base.load import DTYPES, load_tokenizer, quantization_config, resolve_device
from qlora.base.model_dir import check_model_dir
from qlora.base.quantize import roundtrip
from qlora.cli import run
from qlora.commands import merge_parser
from qlora.config import Config
from qlora.console import announce, progress, quiet_libraries, since
from qlora.errors import ConfigError, check_writable
from qlora.generate import render
from qlora.partial import ordinary_modes, partial_prefix, remove_abandoned, write_aside
from qlora.training.assemble import load_run_fp32, read_run_adapter_config, read_run_config, trained_dtype

INFO = "merge_info.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
FLOAT_KINDS = ("F64", "F32", "F16", "BF16")  # safetensors dtype names of the tensors a merge casts

# The tolerance docs/after-training.md states, as a share of the largest |logit| on PROMPTS. fp32 output: exact up to
# summation order (measured 4e-6 on SmolLM2-135M). bf16/fp16 output: each merged weight is rounded once (relative
# error <= 2^-9 in bf16), which no 16-bit export avoids (measured on SmolLM2-135M: 1.8% for the default merge of a
# qlora run, 0.9% for a lora run; 7% for the latter with nearest rounding, see round_stochastic).
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.03, "float16": 0.03}  # keyed by merge_info.json's "dtype"

# Short and varied: prose, code, a question, digits. The check compares every position's logits, not just the last.
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Where does the 9 am flight from Oslo go?",
           "reverse: dog moon red", "12 + 35 = "]


def quantized_modules(base_path: str, cfg: Config) -> set[str]:
    """Names of the layers the 4-bit load holds in NF4: those transformers' own quantizer converts, plus the output
    head under quant.quantize_lm_head (qlora.model.quantize_lm_head), less those in quant.keep_16bit.

    Run on a weightless (meta) copy of the model, so it costs nothing and follows whatever transformers skips
    (the output head, tied weights, a model's fp32-only modules) without restating its rules here.
    """
    from transformers.quantizers import AutoHfQuantizer

    config = AutoConfig.from_pretrained(base_path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    head = model.get_output_embeddings()
    quantizer = AutoHfQuantizer.from_config(quantization_config(cfg.quant, torch.float32), pre_quantized=False)
    quantizer.preprocess_model(model, device_map={"": "cpu"})
    return {name for name, module in model.named_modules()
            if isinstance(module, bnb.nn.Linear4bit) or (module is head and cfg.quant.quantize_lm_head)} - \
        set(cfg.quant.keep_16bit)


def round_stochastic(x: torch.Tensor, dtype: torch.dtype, seed: int, chunk: int = 1 << 24) -> torch.Tensor:
    """fp32 `x` to `dtype`, each value rounded to its lower or upper neighbour with probability given by its distance
    to the other: unbiased, E[result] = x.

    Used where W0 already lies on the output grid (a bf16 base, merged to bf16). A LoRA update is small against its
    weight (~0.2% of |W| in the SmolLM2 runs, under bf16's ~0.4% step), so rounding W0 + update to nearest hands back
    W0 for most entries (62% there) and erases ~60% of the update: the merged logits drifted 7% of their range from
    the adapter model's, the held-out loss 10%. Stochastic rounding keeps the update in expectation (0.9%, 1.5%).
    A dequantised NF4 base lies off the grid, so nearest rounding is unbiased there and adds less noise: it is kept.
    Seeded per tensor, so a merge is reproducible whatever the shard layout.
    """
    generator = torch.Generator(device=x.device).manual_seed(seed)
    flat, out = x.reshape(-1), torch.empty(x.numel(), dtype=dtype, device=x.device)
    for start in range(0, flat.numel(), chunk):  # bounded temporaries, even for a 70B layer's 0.9 GB matrices
        part = flat[start:start + chunk]
        near = part.to(dtype)
        # The other representable neighbour of `part`, on its far side from `near`.
        far = torch.nextafter(near, torch.where(near.float() < part, torch.inf, -torch.inf).to(dtype))
        gap = far.float() - near.float()
        p_far = torch.where(gap != 0, (part - near.float()) / gap, 0.0)
        u = torch.rand(part.shape, generator=generator, device=x.device)
        out[start:start + chunk] = torch.where(u < p_far, far, near)
    return out.view(x.shape)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count; decimal units as in transformers' max_shard_size."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if not match:
        raise ConfigError(f"--max-shard-size={text!r}: use a size such as 5GB or 500MB")
    number, unit, binary = match.groups()
    size = int(float(number) * (1024 if binary else 1000) ** " KMGT".index(unit or " "))
    if size <= 0:
        raise ConfigError(f"--max-shard-size={text!r} must be more than 0 bytes, e.g. 5GB")
    return size


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
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)  # the merged checkpoint is plain 16-bit, whatever the base was
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name  # transformers 5
    if "torch_dtype" in config:
        config["torch_dtype"] = name  # transformers 4
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_shard(shard: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with a failed write (a full disk, a read-only one) raised as the OSError it is:
    safetensors reports it as a SafetensorError whose text ends in "(os error 28)", which would end in a traceback."""
    try:
        save_file(shard, str(path), metadata={"format": "pt"})
    except SafetensorError as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from err


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
        save_shard(shard, out / file_name)
        del shard  # only this shard's tensors were ever held
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return total


def read_scaling(run_dir: Path, cfg: Config) -> float:
    """alpha / r of the run's adapter, after checking it is an adapter this merge knows how to fold."""
    if cfg.quant.method == "full":
        raise ConfigError(f"{run_dir} is a full fine-tuning run (quant.method=full): it has no adapter to merge")
    if cfg.model.synthetic:
        raise ConfigError(f"{run_dir} trained on synthetic weights (model.synthetic=true): there is no base to merge")
    if not (run_dir / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"{run_dir / ADAPTER_WEIGHTS} not found: the run has not finished; pass one of its "
                          "checkpoint-N directories instead")
    adapter_cfg = read_run_adapter_config(run_dir, cfg)  # an edited one would merge at another scale than trained
    return adapter_cfg["lora_alpha"] / adapter_cfg["r"]


def check_adapter(run_dir: Path, rank: int, shards: list[Path]) -> None:
    """Every adapter pair fits a weight of the base, at the rank adapter_config.json says, with finite values: checked
    from the safetensors headers (and the adapter's small tensors) before a single merged shard is written."""
    shapes = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    path = run_dir / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), "pt") as adapter:
            if not any(key.endswith(".lora_A.weight") for key in adapter.keys()):
                raise ConfigError(f"{path} holds no adapter layers (no lora_A weights): restore it from the run (its "
                                  "checkpoint-N directories hold copies)")
            for key in adapter.keys():
                if not key.endswith(".lora_A.weight"):
                    continue
                module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
                a, b = adapter.get_tensor(key), adapter.get_tensor(key.replace(".lora_A.", ".lora_B."))
                base = shapes.get(f"{module}.weight")
                if base is None or a.shape[0] != rank or b.shape != (base[0], rank) or a.shape[1] != base[1]:
                    raise ConfigError(f"{path}: the adapter of {module} (B {tuple(b.shape)}, A {tuple(a.shape)}) does "
                                      f"not fit rank {rank} on the base weight {base}: was the run trained with "
                                      "another base or rank than its run_config.json says?")
                if not (a.is_floating_point() and b.is_floating_point()):  # folded in, they would be cast silently
                    raise ConfigError(f"{path}: the adapter of {module} is stored as {a.dtype} / {b.dtype}, not "
                                      "floating point: restore it from the run")
                if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise ConfigError(f"{path}: the adapter of {module} holds nan or inf: there is nothing to merge")
    except ConfigError:
        raise
    except Exception as err:  # damaged (SafetensorError), or an A without its B
        raise ConfigError(f"{path} is unreadable ({str(err).strip().splitlines()[0]}): restore it from the run") \
            from err


@dataclass(frozen=True)
class MergeSource:
    """What a merge folds onto what, read and checked from the run before a single base tensor is (qlora.merge and
    qlora.export alike)."""

    run_dir: Path
    cfg: Config
    base: str
    """The checkpoint W0 is read from: the run's base, or --base-16bit."""
    dequantise: bool
    """W0 = dequant(NF4(W)) as the 4-bit load held it (a qlora run), else the 16-bit weight as stored."""
    scaling: float
    device: torch.device
    onto: str
    """The base in words, for the announcement and merge_info.json."""


def merge_source(run_dir: Path, base_16bit: str | None = None, device: str | None = None) -> MergeSource:
    """The run's adapter and the base it folds onto, each checked: a finished, finite adapter that fits the base."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    scaling = read_scaling(run_dir, cfg)
    if base_16bit is not None and cfg.lora.init == "loftq":
        raise ConfigError(f"{run_dir} started its adapter as a correction of NF4 rounding (lora.init=loftq), so it "
                          "belongs on the dequantised base, where it was trained: drop --base-16bit")
    base = str(local_checkpoint(base_16bit or ensure_checkpoint(cfg)))
    check_model_dir(base, f"--base-16bit={base}" if base_16bit else f"the run's base {base}",
                    cfg.model.trust_remote_code)
    check_adapter(run_dir, read_adapter_config(run_dir)["r"], checkpoint_shards(Path(base)))
    # A qlora adapter trained against NF4 weights: rebuild those, unless told to use the 16-bit originals.
    dequantise = cfg.quant.method == "qlora" and base_16bit is None
    double = " with double quant" if cfg.quant.double_quant else ""
    onto = (f"the dequantised {cfg.quant.quant_type.upper()}{double} base of {base} (what the adapter trained on)"
            if dequantise else f"the original 16-bit weights of {base}")
    return MergeSource(run_dir, cfg, base, dequantise, scaling, resolve_device(device or cfg.train.device), onto)


Fold = Callable[[str, torch.Tensor, torch.dtype], torch.Tensor]


@contextmanager
def folding(source: MergeSource) -> Iterator[tuple[Fold, set[str]]]:
    """Yield `fold(name, tensor, dtype)`, the base tensor `name` as the merged model holds it in `dtype`, and the set
    of adapter layers folded so far.

    W0 (dequantised when the run was qlora, from W minus LoftQ's last correction where the run had one) + scaling *
    B A, in fp32, rounded once to `dtype`. Leaving the block checks that every adapter layer found its weight.
    """
    cfg, dev, scaling = source.cfg, source.device, source.scaling
    # What the run's load cast each tensor to (and quantised from): the dtype it trained in, not this machine's.
    load_dtype = DTYPES[trained_dtype(source.run_dir)]
    quantized = quantized_modules(source.base, cfg) if source.dequantise else set()
    # lora.loftq_iters > 1: the base was quantised from W minus LoftQ's last correction (qlora.loftq.shifted).
    shifts = (load_shifts(source.run_dir) if source.dequantise and cfg.lora.init == "loftq"
              and cfg.lora.loftq_iters > 1 else {})
    merged = set()
    with safe_open(str(source.run_dir / ADAPTER_WEIGHTS), "pt") as adapter:
        adapted = {k.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight") for k in adapter.keys()
                   if k.endswith(".lora_A.weight")}

        def fold(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            module = name.removesuffix(".weight")
            if not tensor.is_floating_point():
                return tensor
            if f"{module}.A" not in shifts:  # LoftQ's shifted layers are quantised from an fp32 difference below
                tensor = tensor.to(load_dtype)  # the value the run trained with (a 4-bit layer's before quantising)
            if name.endswith(".weight") and module in quantized:
                if f"{module}.A" in shifts:
                    tensor = shifted(tensor.to(dev, torch.float32), shifts[f"{module}.A"], shifts[f"{module}.B"],
                                     scaling)
                tensor = roundtrip(tensor, cfg.quant, load_dtype, dev)
            if name.endswith(".weight") and module in adapted:
                a = adapter.get_tensor(f"{PEFT_PREFIX}{module}.lora_A.weight").to(dev, torch.float32)
                b = adapter.get_tensor(f"{PEFT_PREFIX}{module}.lora_B.weight").to(dev, torch.float32)
                tensor = tensor.to(dev, torch.float32)
                # W0 already on the output grid (a bf16 base): nearest rounding would hand W0 back, see below.
                on_grid = dtype != torch.float32 and torch.equal(tensor.to(dtype).float(), tensor)
                tensor = tensor + scaling * (b @ a)
                merged.add(module)
                if on_grid:
                    return round_stochastic(tensor, dtype, seed=zlib.crc32(name.encode())).cpu()
            return tensor.to("cpu", dtype)

        yield fold, merged
    if merged != adapted:
        raise ConfigError(f"adapter layers {sorted(adapted - merged)[:3]} have no weight in {source.base}: "
                          "was the run trained on another base?")


def merge(run_dir: Path, out: Path, base_16bit: str | None = None, dtype: torch.dtype = torch.bfloat16,
          max_shard_bytes: int = 5 * 10**9, device: str | None = None, check: bool = False) -> dict:
    """Write the merged checkpoint into `out`; return what was done, with the check's numbers under "merge_error"
    when `check` (merge_error; a merge beyond its tolerance is kept all the same, for inspection).

    Built and checked in a hidden sibling (partial_prefix), then renamed to `out` as the very last step: `out` exists
    only whole, and with `check` only checked. A kill at any moment leaves `out` as it was, and the next run removes
    the killed run's partial (remove_abandoned).
    """
    run_dir, out = Path(run_dir), Path(out)
    read_scaling(run_dir, read_run_config(run_dir))  # a run that cannot be merged is named before --out
    check_writable(out, "--out", directory=True)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty: choose another directory or delete it")
    if out.exists():  # empty: the finished merge takes its place, by rename
        if out.resolve() == Path.cwd().resolve():
            raise ConfigError(f"--out {out} is the current directory, which the finished merge would replace: name "
                              f"it from outside (--out ../{Path.cwd().name}) or choose another")
        out = out.resolve()  # a link to an empty directory: the merge goes where it points, the link stays
    source = merge_source(run_dir, base_16bit, device)
    base = source.base
    started = announce(f"merging {run_dir} onto {source.onto}, written as {str(dtype).removeprefix('torch.')}")

    out.parent.mkdir(parents=True, exist_ok=True)
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
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
        if check:
            info["merge_error"] = merge_error(run_dir, tmp)  # records itself in tmp's merge_info.json
        ordinary_modes(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and str(err.filename or "").startswith(str(tmp)):
            err.filename = str(out)  # name the output the user gave, not its hidden copy, which is gone
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


def merge_error(run_dir: Path, out: Path) -> dict:
    """max |logits merged - logits of the adapter model| over PROMPTS, both on CPU in fp32.

    The reference is the adapter on the base it was merged onto, held to TOLERANCE: the 4-bit base for a default
    merge, the 16-bit base for --base-16bit (and then also, for information, the 4-bit base the adapter trained on,
    whose gap includes NF4's rounding).
    """
    info = json.loads((Path(out) / INFO).read_text())
    # PyTorch's own layers, as the references run them (transformers 5.25 would swap in hub kernels by default)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map={"": "cpu"}, use_kernels=False)
    merged = prompt_logits(model, load_tokenizer(str(out)))
    del model
    cfg = read_run_config(Path(run_dir))
    references = [("4-bit", "qlora", None)] if info["base_weights"] == "dequantised-nf4" else [
        ("16-bit", "lora", info["base"])] + ([("4-bit", "qlora", None)] if cfg.quant.method == "qlora" else [])
    errors, tolerance = {}, TOLERANCE[info["dtype"]]
    for i, (label, method, base_path) in enumerate(references):
        announce(f"checking the merge: logits at every position of {len(PROMPTS)} prompts, merged model against the "
                 f"adapter on the {label} base, both on CPU in fp32 (--skip-check skips this)")
        _, ref_model, tokenizer, _ = load_run_fp32(run_dir, method, base_path)
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


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    args = merge_parser().parse_args(argv)
    quiet_libraries()
    info = merge(args.run_dir, args.out, args.base_16bit, DTYPES[args.dtype], parse_size(args.max_shard_size),
                 args.device, check=not args.skip_check)
    if "merge_error" in info and not next(iter(info["merge_error"].values()))["within_tolerance"]:
        print("error: the merged model is further from the adapter model than docs/after-training.md states",
              file=sys.stderr)
        return 1  # the merge is kept, its numbers in merge_info.json, for inspection
    return 0


if __name__ == "__main__":
    sys.exit(main())
