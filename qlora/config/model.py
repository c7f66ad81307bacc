"""The sections that say what is trained: the base model (`model`), how its weights are held (`quant`) and the adapter
(`lora`). Each field has its type, default and docstring, and is checked as it is set: a wrong value is a
`ConfigError` that names the key and the fix.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from qlora.config.fields import check_lever_fields, check_types
from qlora.errors import ConfigError
from qlora.levers import FIELDS

METHODS = ("qlora", "lora", "full")
# Attention kernels transformers offers for our models, and the package each needs beyond torch.
ATTENTION = {"sdpa": None, "eager": None, "flash_attention_2": "flash_attn"}
# SDPA's CUDA kernel: torch's own choice, FlashAttention-2, or cuDNN's (qlora/base/attention.py).
SDPA_BACKENDS = ("auto", "flash", "cudnn")
# The trainer refuses it before loading (qlora/training/assemble.py), and qlora.memory before estimating.
FP16_ON_CUDA = ("quant.compute_dtype=fp16: this trainer has no loss scaling, so small fp16 gradients would underflow "
                "to zero on CUDA: use --quant.compute_dtype=bf16 (or auto), or fp32 on a GPU without bf16")


def check_rank(r: int, sides: dict[str, tuple[int, int]], layer: str) -> None:
    """Refuse a rank beyond the smaller side of the narrowest of the layers `sides` gives (in, out) for: it adds
    parameters, never expressiveness, and an absurd one would only fail later, allocating its matrices. `layer`
    words a layer's name for the message ("layer {}")."""
    narrowest = min(sides, key=lambda name: min(sides[name]))
    if r > min(sides[narrowest]):
        raise ConfigError(f"lora.r={r} exceeds the smaller side of {layer.format(narrowest)} ({sides[narrowest][1]} x "
                          f"{sides[narrowest][0]}): use a rank up to {min(sides[narrowest])}, e.g. "
                          f"--lora.r={min(16, min(sides[narrowest]))}")


@dataclass
class ModelConfig(*FIELDS["model"]):
    path: str = ""
    """Hub id or local directory of a Hugging Face checkpoint."""
    build: str | None = None
    """Name of a builder in `qlora.base.build.BUILDERS` that writes the checkpoint at `path` once if it is missing."""
    synthetic: bool = False
    """Random weights quantised straight to NF4 from `config_json` alone: measures memory without a download."""
    config_json: str | None = None
    """A local `config.json` for `synthetic` (the hub cannot be reached)."""
    trust_remote_code: bool = False
    """Run Python code shipped with the checkpoint. Off unless the recipe asks: it executes arbitrary code."""
    allow_pickle: bool = False
    """Load pytorch_model.bin (a pickle) when the checkpoint has no safetensors. Off: unpickling can run code."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa (default), eager or flash_attention_2."""
    sdpa_backend: str = "auto"
    """SDPA's kernel on CUDA: auto (torch's choice: cuDNN's on H100/H200/B200, FlashAttention-2 on other cards), flash
    or cudnn. Their backward needs different buffers; the estimate counts the one that runs. Whatever it says, packed
    rows run FlashAttention-2, and a sliding window shorter than the rows the memory-efficient kernel (its blocks carry
    a mask)."""

    def __post_init__(self) -> None:
        check_types(self)
        if not self.path:
            raise ConfigError("model.path is empty: set it to a hub id or a local checkpoint directory")
        if self.attn_implementation not in ATTENTION:
            raise ConfigError(f"model.attn_implementation={self.attn_implementation!r}: use "
                              f"{', '.join(ATTENTION)}")
        package = ATTENTION[self.attn_implementation]
        if package and importlib.util.find_spec(package) is None:  # found here, not minutes later by transformers
            raise ConfigError(f"model.attn_implementation={self.attn_implementation} needs the {package} package, "
                              f"which is not installed: pip install {package.replace('_', '-')} (CUDA only), or "
                              "use --model.attn_implementation=sdpa")
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise ConfigError(f"model.sdpa_backend={self.sdpa_backend!r}: use {', '.join(SDPA_BACKENDS)}")
        if self.sdpa_backend != "auto" and self.attn_implementation != "sdpa":
            raise ConfigError(f"model.sdpa_backend={self.sdpa_backend} picks a kernel of SDPA, and "
                              f"model.attn_implementation={self.attn_implementation}: set --model.sdpa_backend=auto, "
                              "or --model.attn_implementation=sdpa")
        check_lever_fields(self, "model")


@dataclass
class QuantConfig(*FIELDS["quant"]):
    method: str = "qlora"
    """qlora: NF4 base + LoRA; lora: 16-bit base + LoRA; full: 16-bit base, every weight trains (no LoRA)."""
    quant_type: str = "nf4"
    """bitsandbytes 4-bit type for qlora: nf4 (QLoRA paper, sec. 3) or fp4."""
    double_quant: bool = True
    """Quantise the quantisation constants too: 0.37 bits/param saved (QLoRA paper, sec. 3)."""
    compute_dtype: str = "auto"
    """auto: bf16 on CUDA, fp32 on CPU (a bf16 matmul is 18-66x slower than fp32 on our CPUs:
    benchmarks/results/bf16-matmul-cpu.md)."""
    blocksize: int = 64
    """Weights per 4-bit block, each with its own scale (absmax): 64 as in the QLoRA paper and transformers' load.
    32 rounds each weight against a scale fitted to fewer neighbours, for 1/8 bit more per parameter with double
    quant (+3% of the 4-bit bytes); bitsandbytes >= 0.49 supports it on CPU and CUDA. Layers are re-read from the
    checkpoint and quantised again after loading (qlora/base/quantize.py). qlora only."""
    keep_16bit_budget: float = 0.0
    """Keep the linear layers whose 4-bit rounding costs the most in 16-bit, within this share of extra base-weight
    bytes: 0.05 = at most 5% more than the 4-bit base. The cost is measured on calibration batches of the training
    data (qlora/training/sensitivity.py); the chosen layers go into keep_16bit. 0 = off. qlora only."""
    keep_16bit: list[str] = field(default_factory=list)
    """Full names of linear layers to keep in 16-bit (model.layers.3.mlp.down_proj, ...). When empty and
    keep_16bit_budget is set, the trainer fills it with the layers it chose, so run_config.json records them and eval,
    generate and merge load the same base."""
    calibration_rows: int = 64
    """Training rows (drawn by seed) on which keep_16bit_budget measures each layer's cost."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.method not in METHODS:
            raise ConfigError(f"quant.method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"quant.quant_type={self.quant_type!r}: use nf4 or fp4")
        if self.compute_dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"quant.compute_dtype={self.compute_dtype!r}: use auto, bf16, fp16 or fp32")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"quant.blocksize={self.blocksize}: bitsandbytes quantises 4-bit weights in blocks of "
                              "32, 64 (the default), 128, ... 4096, e.g. --quant.blocksize=32")
        if not 0 <= self.keep_16bit_budget < 1:  # also refuses nan
            raise ConfigError(f"quant.keep_16bit_budget={self.keep_16bit_budget} must lie in [0, 1): the share of "
                              "extra base-weight bytes, e.g. --quant.keep_16bit_budget=0.05 for at most 5% more")
        if self.calibration_rows <= 0:
            raise ConfigError(f"quant.calibration_rows={self.calibration_rows} must be positive, e.g. 64")
        if self.method != "qlora" and (self.keep_16bit_budget or self.keep_16bit or self.blocksize != 64):
            raise ConfigError(f"quant.keep_16bit_budget, quant.keep_16bit and quant.blocksize shape a 4-bit base, "
                              f"but quant.method={self.method} loads none: leave them at 0, [] and 64")
        check_lever_fields(self, "quant")


@dataclass
class LoRAConfig:
    r: int = 16
    """Adapter rank."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / r) B A x."""
    dropout: float = 0.05
    """Dropout on the adapter's input only."""
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module name suffixes to adapt (q_proj, ...), or all-linear: every linear layer but lm_head, found in the
    model."""
    init: str = "zero"
    """zero: B = 0, training starts at the base as loaded (LoRA paper, sec. 4.1). loftq (quant.method=qlora only):
    B A starts as the rank-r part of each layer's NF4 rounding error, read from the 16-bit checkpoint
    (qlora/adapters/loftq.py)."""
    loftq_iters: int = 1
    """LoftQ's alternating steps (Li et al. 2023, alg. 1): each after the first quantises W minus the last
    correction again and fits the correction anew. 1 keeps the ordinary 4-bit load as the base. More change the base
    to NF4(W - correction): the run saves the correction's factors (loftq_shifts.safetensors) and eval, generate,
    merge and --resume rebuild that base from them; PEFT alone cannot."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.init not in ("zero", "loftq"):
            raise ConfigError(f"lora.init={self.init!r}: use zero or loftq")
        if self.loftq_iters < 1:
            raise ConfigError(f"lora.loftq_iters={self.loftq_iters} must be at least 1, e.g. --lora.loftq_iters=3")
        if self.loftq_iters > 1 and self.init != "loftq":
            raise ConfigError(f"lora.loftq_iters={self.loftq_iters} needs lora.init=loftq: set --lora.init=loftq or "
                              "--lora.loftq_iters=1")
        if self.r <= 0:
            raise ConfigError(f"lora.r={self.r} must be a positive integer, e.g. --lora.r=16")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha={self.alpha} must be positive, e.g. --lora.alpha=16")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout={self.dropout} must lie in [0, 1), e.g. --lora.dropout=0.05")
        if not self.targets:
            raise ConfigError("lora.targets is empty: use all-linear or module names such as q_proj,v_proj")
