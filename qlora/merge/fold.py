"""The merge's math and what it folds onto what: each base tensor as the merged model holds it.

    W = W0 + (alpha / r) B A        in fp32, then rounded once to the output dtype (bf16 by default)

W0 is, by default, the base weight as the adapter saw it in training: quantised to NF4 (with double quant) exactly as
the 4-bit load does and dequantised back, so the merged model computes what the adapter model computed (layers the run
kept in 16-bit, quant.keep_16bit, are taken as they are; quant.blocksize is followed). With
--base-16bit PATH, W0 is the original 16-bit weight instead: closer to the unquantised model, further from what the
adapter was trained against. The merged weight is never quantised again: NF4's rounding (steps of ~1/8 of a block's
absmax) is far coarser than a LoRA update, so re-quantising erases it (transformers 31293, peft 2321 and 1043).
Rounding to bf16 is to nearest, or stochastic where W0 is already bf16, where nearest would erase it too
(`round_stochastic`). qlora.merge writes the result as a checkpoint (checkpoint.py), qlora.export as a GGUF file.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from qlora.adapters.loftq import load_shifts, shifted
from qlora.adapters.lora import ADAPTER_WEIGHTS, PEFT_PREFIX, read_adapter_config, trained_dtype
from qlora.base.bnb import bnb
from qlora.base.build import checkpoint_shards, ensure_checkpoint, local_checkpoint
from qlora.base.load import DTYPES, quantization_config, resolve_device
from qlora.base.model_dir import check_model_dir
from qlora.base.quantize import roundtrip
from qlora.config import Config
from qlora.errors import ConfigError
from qlora.training.assemble import read_run_adapter_config, read_run_config
from qlora.training.restore import require_weights


def quantized_modules(base_path: str, cfg: Config) -> set[str]:
    """Names of the layers the 4-bit load holds in NF4: those transformers' own quantizer converts, plus the output
    head under quant.quantize_lm_head (qlora/levers/lm_head/head.py: quantize_lm_head), less those in quant.keep_16bit.

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
    weight (0.18% of |W| in the SmolLM2 runs, under bf16's ~0.4% step), so rounding W0 + update to nearest hands back
    W0 for most entries (62% there) and loses 18% of the update along it: the merged logits drifted 7% of their range
    from the adapter model's, the held-out loss 10%. Stochastic rounding keeps the update in expectation (0.9%, 1.5%;
    benchmarks/results/merge-cpu.md).
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


def read_scaling(run_dir: Path, cfg: Config) -> float:
    """alpha / r of the run's adapter, after checking it is an adapter this merge knows how to fold."""
    if cfg.quant.method == "full":
        raise ConfigError(f"{run_dir} is a full fine-tuning run (quant.method=full): it has no adapter to merge")
    if cfg.model.synthetic:
        raise ConfigError(f"{run_dir} trained on synthetic weights (model.synthetic=true): there is no base to merge")
    require_weights(run_dir, ADAPTER_WEIGHTS)
    adapter_cfg = read_run_adapter_config(run_dir, cfg)  # an edited one would merge at another scale than trained
    return adapter_cfg["lora_alpha"] / adapter_cfg["r"]


def check_adapter(run_dir: Path, adapter_cfg: dict, shards: list[Path]) -> None:
    """Every adapter pair fits a weight of the base, at the rank adapter_config.json says, with finite values, and
    every layer its target_modules name has one: checked from the safetensors headers (and the adapter's small
    tensors) before a single merged shard is written."""
    rank, targets = adapter_cfg["r"], adapter_cfg.get("target_modules")
    shapes = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    path, stored = run_dir / ADAPTER_WEIGHTS, set()
    try:
        with safe_open(str(path), "pt") as adapter:
            names = adapter.keys()
            keys = set(names)
            if not any(key.endswith(".lora_A.weight") for key in names):
                raise ConfigError(f"{path} holds no adapter layers (no lora_A weights): restore it from the run (its "
                                  "checkpoint-N directories hold copies)")
            # A layer without its pair would be merged as the base alone, without a word (eval and generate refuse
            # it as they load the adapter): one whose A or B is gone, or whose pair is.
            modules = {key.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0] for key in keys}
            paired = {module for module in modules if {f"{PEFT_PREFIX}{module}.lora_{ab}.weight" for ab in "AB"}
                      <= keys}
            # Only in the stacks of layers the run adapted: a multimodal base's vision tower has q_proj layers too.
            stacks = {module.split(".layers.")[0] for module in paired if ".layers." in module}
            linear = (name.removesuffix(".weight") for name, shape in shapes.items() if len(shape) == 2)
            named = {name for name in linear if isinstance(targets, list) and name.rsplit(".", 1)[-1] in targets and
                     name.split(".layers.")[0] in stacks}
            missing = sorted((modules | named) - paired)
            if missing:
                raise ConfigError(f"{path} lacks the adapter pair (lora_A and lora_B) of {missing[0]} ({len(missing)} "
                                  "layer(s) in all) that the run trained: restore it from the run (its checkpoint-N "
                                  "directories hold copies)")
            for key in names:
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
                stored |= {a.dtype, b.dtype}
                # A run keeps its adapter in the dtype it trained in, which the fold reads back (trained_dtype) as
                # the dtype its base was loaded and quantised in: another one (float64) has no such dtype.
                if len(stored) > 1 or not stored <= set(DTYPES.values()):
                    raise ConfigError(f"{path}: the adapter of {module} is stored as {a.dtype} / {b.dtype}, where a "
                                      "run saves its whole adapter in the one dtype it trained in (bf16, fp16 or "
                                      "fp32): restore it from the run")
                if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise ConfigError(f"{path}: the adapter of {module} holds nan or inf: there is nothing to merge")
    except ConfigError:
        raise
    except Exception as err:  # damaged (SafetensorError)
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
    trained: str
    """The dtype the run trained in, and its base was loaded and quantised in (trained_dtype)."""


def merge_source(run_dir: Path, base_16bit: str | None = None, device: str | None = None,
                 cfg: Config | None = None) -> MergeSource:
    """The run's adapter and the base it folds onto, each checked: a finished, finite adapter that fits the base.
    `cfg`: its run_config.json as read_run_config read it already."""
    run_dir = Path(run_dir)
    cfg = cfg or read_run_config(run_dir)
    scaling = read_scaling(run_dir, cfg)
    if base_16bit is not None and cfg.lora.init == "loftq":
        raise ConfigError(f"{run_dir} started its adapter as a correction of NF4 rounding (lora.init=loftq), so it "
                          "belongs on the dequantised base, where it was trained: drop --base-16bit")
    base = str(local_checkpoint(base_16bit or ensure_checkpoint(cfg)))
    check_model_dir(base, f"--base-16bit={base}" if base_16bit else f"the run's base {base}",
                    cfg.model.trust_remote_code)
    check_adapter(run_dir, read_adapter_config(run_dir), checkpoint_shards(Path(base)))
    trained = trained_dtype(run_dir)  # an adapter cast since it was saved: refused before anything is written
    # A qlora adapter trained against NF4 weights: rebuild those, unless told to use the 16-bit originals.
    dequantise = cfg.quant.method == "qlora" and base_16bit is None
    double = " with double quant" if cfg.quant.double_quant else ""
    onto = (f"the dequantised {cfg.quant.quant_type.upper()}{double} base of {base} (what the adapter trained on)"
            if dequantise else f"the original 16-bit weights of {base}")
    return MergeSource(run_dir, cfg, base, dequantise, scaling, resolve_device(device or cfg.train.device), onto,
                       trained)


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
    load_dtype = DTYPES[source.trained]
    quantized = quantized_modules(source.base, cfg) if source.dequantise else set()
    # lora.loftq_iters > 1: the base was quantised from W minus LoftQ's last correction (qlora.adapters.loftq.shifted).
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

