"""LoRA adapters, our own: wrap a frozen linear layer (bitsandbytes `Linear4bit` or `nn.Linear`), add a low-rank update.

    h = W0 x + (alpha / r) * B A dropout(x)

A is Kaiming-uniform and B is zero, so a fresh adapter leaves the model exactly as it was (LoRA paper, sec. 4.1).
Saved adapters use PEFT's file format and key names, so `peft.PeftModel.from_pretrained(base, dir)` loads them as is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from qlora.base.bnb import bnb
from qlora.base.load import DTYPES
from qlora.config import LoRAConfig
from qlora.config.model import check_rank
from qlora.errors import ConfigError, json_trouble
from qlora.partial import save_tensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # the compute dtypes' names, as recipes spell them
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> our model: the two wrappers PEFT puts around the base
# What PEFT reads from adapter_config.json, beyond r, alpha and target_modules, to build the model it loads an adapter
# into, as save_adapter writes it (None: null or empty; a key absent is PEFT's default). eval and a merge here rebuild
# the run from run_config.json, so an edit of one passed them while PEFT loaded the adapter into another model.
AS_SAVED = {"peft_type": "LORA", "bias": "none", "modules_to_save": None, "rank_pattern": None, "alpha_pattern": None,
            "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None}


class LoRALinear(nn.Module):
    """A frozen base linear layer plus a trainable rank-r update; the base is wrapped, never subclassed."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        # PEFT's names (lora_A / lora_B as nn.Linear) keep the state dict keys identical to a PEFT adapter's.
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=dtype)
        # nn.Linear's own init, as in PEFT, drawn from the CPU generator wherever the base lies: the same seed gives
        # the same adapters on any device, and with the base held on the host (train.stream_base) as on the card.
        start = torch.empty(r, base_layer.in_features)
        nn.init.kaiming_uniform_(start, a=math.sqrt(5))
        with torch.no_grad():
            self.lora_A.weight.copy_(start)
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.fuse_add = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        # Cast the input to the adapter dtype (peft/tuners/lora/bnb.py): the 4-bit layer may hand back another dtype.
        down = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))
        if self.fuse_add and writable(result):  # train.fuse_lora_add (qlora/levers/speed/)
            return self.add_in_place(result, down)
        return result + (self.lora_B(down) * self.scaling).to(result.dtype)

    def add_in_place(self, result: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """result += scaling * down B^T, written into result's own memory by one GEMM (beta = 1): the update never
        exists as a tensor of its own, forward or backward."""
        flat = result.view(-1, result.shape[-1])
        flat.addmm_(down.reshape(-1, down.shape[-1]).to(result.dtype), self.lora_B.weight.t().to(result.dtype),
                    alpha=self.scaling)
        return result

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into a 16/32-bit base weight; a 4-bit weight would be re-quantised and lose quality."""
        self._require_dense("merge")
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._require_dense("unmerge")
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

    def _require_dense(self, what: str) -> None:
        if isinstance(self.base_layer, bnb.nn.Linear4bit):
            raise ValueError(f"cannot {what} into a 4-bit layer: merge onto dequantised weights with qlora.merge")


def writable(result: torch.Tensor) -> bool:
    """Whether autograd lets `result` be added to in place. Not a view made inside a custom autograd Function:
    bitsandbytes' MatMul4Bit returns F.linear's output, which with a bias (Qwen2's q/k/v) is a view of addmm's, and
    writing it raised "Output 0 of View is a view and is being modified inplace" at the first step."""
    custom = isinstance(result.grad_fn, torch.autograd.function.BackwardCFunction)
    return result.is_contiguous() and not (custom and result._is_view())


def linear_names(model: nn.Module) -> list[str]:
    """Full names of every linear layer in the model except the output head."""
    out_head = model.get_output_embeddings()
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, bnb.nn.Linear4bit)) and module is not out_head]


def target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Resolve `lora.targets` (all-linear, or name suffixes like q_proj) to the full names of the layers to adapt."""
    candidates = linear_names(model)
    if targets == ["all-linear"]:
        return candidates
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in candidates})

    def named(name: str, target: str) -> bool:  # by its last part (q_proj) or in full
        return name.rsplit(".", 1)[-1] == target or name == target

    # Every entry names layers: one that names none (a misspelling, `[q_proj` of a bracketed list, all-linear beside
    # others) would train fewer layers than asked without a word.
    unmatched = [t for t in targets if not any(named(name, t) for name in candidates)]
    if unmatched:
        alone = " (all-linear stands alone)" if "all-linear" in unmatched else ""
        raise ConfigError(f"lora.targets={','.join(targets)}: {unmatched[0]!r} matches no linear layer{alone}: "
                          f"use all-linear, or some of {','.join(suffixes)} separated by commas")
    return [name for name in candidates if any(named(name, t) for t in targets)]


def attach_lora(model: nn.Module, cfg: LoRAConfig, dtype: torch.dtype) -> list[str]:
    """Freeze the model, wrap every targeted linear layer in `LoRALinear`, and return the wrapped names."""
    for param in model.parameters():
        param.requires_grad_(False)
    names = target_names(model, cfg.targets)
    check_rank(cfg.r, {name: (model.get_submodule(name).in_features, model.get_submodule(name).out_features)
                       for name in names}, "layer {}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg.r, cfg.alpha, cfg.dropout, dtype))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), "only adapters may train"
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's key names (`base_model.model.<layer>.lora_A.weight`)."""
    return {f"{PEFT_PREFIX}{name}.{part}.weight": getattr(layer, part).weight.detach().contiguous()
            for name, layer in lora_layers(model).items() for part in ("lora_A", "lora_B")}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights into the model's LoRA layers, after checking every name, shape and value: a mismatch or a
    nan raises ValueError with the model untouched."""
    layers = lora_layers(model)
    expected = {f"{PEFT_PREFIX}{name}.{part}.weight": getattr(layer, part).weight
                for name, layer in layers.items() for part in ("lora_A", "lora_B")}
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state))[:3], sorted(set(state) - set(expected))[:3]
        raise ValueError(f"adapter does not match this model's LoRA layers (missing {missing}, unexpected {extra}): "
                         "was it trained with other lora.targets or another base?")
    for key, weight in expected.items():
        if state[key].shape != weight.shape:
            raise ValueError(f"adapter tensor {key} has shape {tuple(state[key].shape)}, this model's "
                             f"{tuple(weight.shape)}: was it trained with another lora.r or another base?")
        if not state[key].is_floating_point():  # copy_ would cast int or bool values without a word
            raise ValueError(f"adapter tensor {key} is {str(state[key].dtype).removeprefix('torch.')}, not floating "
                             "point: the adapter is broken")
        if not torch.isfinite(state[key]).all():
            raise ValueError(f"adapter tensor {key} holds nan or inf: the adapter is broken")
    with torch.no_grad():
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                getattr(layer, part).weight.copy_(state[f"{PEFT_PREFIX}{name}.{part}.weight"])


def save_adapter(model: nn.Module, cfg: LoRAConfig, base_path: str, out_dir: Path,
                 metadata: dict[str, str] | None = None) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` in PEFT's format (`metadata` in the latter's header,
    which PEFT does not read, with the dtype the adapter trained in: `trained_dtype`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(lora_layers(model))
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        # Suffixes, as PEFT matches them against the end of each module name.
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names}),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    state = {k: v.to("cpu") for k, v in adapter_state_dict(model).items()}
    dtype = DTYPE_NAMES.get(next(iter(state.values())).dtype)
    save_tensors(state, out_dir / ADAPTER_WEIGHTS, {**(metadata or {}), **({"dtype": dtype} if dtype else {})})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")


def read_adapter_config(run_dir: Path) -> dict:
    """adapter_config.json, checked for what eval, generate and a merge read from it (rank and alpha; no DoRA), and
    for what PEFT builds the model it loads the adapter into from (target_modules, against the adapter file beside
    it, and AS_SAVED)."""
    path = run_dir / ADAPTER_CONFIG
    try:
        adapter_cfg = json.loads(path.read_text(encoding="utf-8"))
    # ValueError: not UTF-8, not JSON, or an integer of over 4,300 digits; RecursionError: arrays nested too deep
    except (OSError, ValueError, RecursionError) as err:
        reason = err.strerror if isinstance(err, OSError) else json_trouble(err)
        raise ConfigError(f"{path} is unreadable ({reason}): restore it from the run (its checkpoint-N directories "
                          "hold copies)") from None
    numbers = [adapter_cfg.get(k) if isinstance(adapter_cfg, dict) else None for k in ("r", "lora_alpha")]
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0 for n in numbers):
        raise ConfigError(f"{path} lacks a positive r and lora_alpha: restore it from the run (its checkpoint-N "
                          "directories hold copies)")
    if adapter_cfg.get("use_dora") or adapter_cfg.get("use_rslora") or adapter_cfg.get("fan_in_fan_out"):
        raise ConfigError(f"{path}: DoRA, rsLoRA and fan_in_fan_out adapters are not ours to merge")
    edited = [k for k, v in AS_SAVED.items() if k in adapter_cfg and (adapter_cfg[k] or None) != v]
    if edited:
        raise ConfigError(f"{path}: its {edited[0]} is not what the run saved, so PEFT would load the adapter into "
                          "another model than it trained in: restore it from the run (its checkpoint-N directories "
                          "hold copies)")
    targets, found = adapter_cfg.get("target_modules"), _targets(run_dir / ADAPTER_WEIGHTS)
    if found and not (isinstance(targets, list) and sorted(set(map(str, targets))) == found):
        # Either file may be the one changed: an adapter file of fewer layers is named by what loads it too.
        raise ConfigError(f"{path}: its target_modules {str(targets)[:80]} are not the layers {ADAPTER_WEIGHTS} "
                          f"beside it holds {found}, so PEFT would load the adapter into another model than it "
                          "trained in: restore both from the run (its checkpoint-N directories hold copies)")
    return adapter_cfg


def _targets(weights: Path) -> list[str]:
    """The module names (q_proj, ...) the adapter file holds pairs for, as save_adapter lists them in target_modules;
    none for a file that does not read or holds none (what loads it names the damage)."""
    try:
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
    except Exception:
        return []
    return sorted({k.rsplit(".", 3)[-3] for k in keys if k.endswith((".lora_A.weight", ".lora_B.weight"))})


def trained_dtype(run_dir: Path) -> str:
    """The compute dtype the run trained in (bf16, fp16 or fp32), read off its saved adapter, which is kept in it: its
    base was loaded, and quantised, in that dtype. run_config.json may say auto: bf16 on CUDA, fp32 on the CPU.

    An adapter cast since (to fp16, to halve it) would rebuild another NF4 base: 5% of a tiny run's merged weights a
    quantisation step off, its check passing against that same base. The header's dtype, written with it, refuses it.
    """
    path = Path(run_dir) / ADAPTER_WEIGHTS
    with safe_open(str(path), "pt") as f:
        dtype, recorded = f.get_tensor(next(iter(f.keys()))).dtype, (f.metadata() or {}).get("dtype")
    name = DTYPE_NAMES[dtype]
    if recorded is not None and recorded != name:
        raise ConfigError(f"{path} holds the adapter as {name}, but the run trained, and saved it, in {recorded} (its "
                          "header says), the dtype its base was quantised in: restore it from the run (its "
                          "checkpoint-N directories hold copies)")
    return name


def load_adapter(model: nn.Module, adapter_dir: Path) -> None:
    load_adapter_state_dict(model, load_file(str(adapter_dir / ADAPTER_WEIGHTS)))


def merge_all(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_all(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()
