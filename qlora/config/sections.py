"""The typed recipe: one `Config` of six sections (model, quant, lora, data, train, output), each field with its type,
default and docstring, checked as it is set: a wrong value is a `ConfigError` that names the key and the fix.

The fields of each memory or speed lever are declared in its folder under qlora/levers/ and joined into their section
here (qlora/levers/__init__.py lists them); the section checks them with the rest.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from qlora.errors import ConfigError
from qlora.levers import FIELDS, check_levers

METHODS = ("qlora", "lora", "full")
PLANS = ("recipe", "fastest")  # train.plan: the levers as set, or the fastest that fit (qlora/memory/plan.py)
# Attention kernels transformers offers for our models, and the package each needs beyond torch.
ATTENTION = {"sdpa": None, "eager": None, "flash_attention_2": "flash_attn"}
# SDPA's CUDA kernel: torch's own choice, FlashAttention-2, or cuDNN's (qlora/base/attention.py).
SDPA_BACKENDS = ("auto", "flash", "cudnn")

# Names that transformers' TrainingArguments and peft's LoraConfig use for our keys: suggested before spelling matches.
ALIASES = {"learning_rate": "lr", "max_steps": "steps", "per_device_train_batch_size": "batch_size",
           "gradient_accumulation_steps": "grad_accum", "lora_r": "r", "rank": "r", "lora_alpha": "alpha",
           "lora_dropout": "dropout", "target_modules": "targets", "max_length": "max_seq_len",
           "seq_len": "max_seq_len", "output_dir": "dir", "warmup": "warmup_steps", "lr_scheduler_type": "schedule"}


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
            wanted = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            origin = typing.get_origin(wanted[0]) or wanted[0]
            raise ConfigError(f"{name}.{f.name}={value!r} is a {type(value).__name__}: set it to "
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


# The trainer refuses it before loading (qlora/training/assemble.py), and qlora.memory before estimating.
FP16_ON_CUDA = ("quant.compute_dtype=fp16: this trainer has no loss scaling, so small fp16 gradients would underflow "
                "to zero on CUDA: use --quant.compute_dtype=bf16 (or auto), or fp32 on a GPU without bf16")
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw")  # train.optimizer's choices


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
    or cudnn. Their backward needs different buffers; the estimate counts the one that runs."""

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
    """auto: bf16 on CUDA, fp32 on CPU (a bf16 matmul is ~40x slower than fp32 on our CPUs)."""
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


@dataclass
class DataConfig:
    train: str = ""
    """Local JSONL/JSON/Parquet/CSV file, or a hub dataset id."""
    eval: str | None = None
    """Held-out file; when None, `eval_fraction` of `train` is split off by seed."""
    eval_fraction: float = 0.05
    """Share of `train` held out when `eval` is not given."""
    format: str = "auto"
    """messages (chat, loss on assistant turns), instruction (instruction/input/output), text, or auto-detect."""
    max_seq_len: int = 2048
    """Rows are truncated to this many tokens."""
    pack: bool = False
    """Pack rows into max_seq_len rows; position ids restart per document and attention never crosses documents."""

    def __post_init__(self) -> None:
        check_types(self)
        if not self.train:
            raise ConfigError("data.train is empty: set it to a data file or a hub dataset id")
        if self.format not in ("auto", "messages", "instruction", "text"):
            raise ConfigError(f"data.format={self.format!r}: use auto, messages, instruction or text")
        if self.max_seq_len <= 0:
            raise ConfigError(f"data.max_seq_len={self.max_seq_len} must be positive, e.g. --data.max_seq_len=2048")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must lie in (0, 1), e.g. 0.05")


@dataclass
class TrainConfig(*FIELDS["train"]):
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 1
    """Rows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate."""
    schedule: str = "cosine"
    """cosine or constant, after linear warmup."""
    warmup_steps: int = 10
    """Steps of linear warmup to the peak lr (step k at (k+1)/(warmup_steps+1) of it)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay on the trained parameters."""
    max_grad_norm: float = 1.0
    """Clip the adapters' gradient norm to this; 0 turns clipping off."""
    optimizer: str = "paged_adamw_32bit"
    """paged_adamw_32bit or paged_adamw_8bit (bitsandbytes), or adamw (torch)."""
    gradient_checkpointing: bool = True
    """Recompute each decoder layer in the backward (non-reentrant) instead of keeping its activations."""
    eval_every: int = 50
    """Evaluate on the held-out split every this many steps (and at the end); 0 = only at the end."""
    eval_before: bool = True
    """Also evaluate before the first step, for the closing "before -> after" line; false saves one evaluation (on
    the demo ~30 s of CPU, the time of ~5 training steps)."""
    eval_batches: int = 0
    """Cap on held-out batches per evaluation; 0 = the whole split."""
    log_every: int = 1
    """Write the step's loss, lr, grad norm, tokens/s and peak memory to metrics.jsonl every this many steps."""
    save_every: int = 0
    """Write checkpoint-<step>/ every this many steps; 0 = only at the end."""
    keep_checkpoints: int = 2
    """Older checkpoints beyond this many are deleted."""
    seed: int = 0
    """Seeds the adapters' initialisation, dropout, the batch order and the held-out split."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cuda or cpu."""
    max_bad_steps: int = 3
    """Steps with a non-finite loss or gradient that are skipped before the run stops."""
    shard_base: bool = False
    """Several processes (torchrun): shard the frozen base across them with FSDP2's fully_shard, so each holds about
    1/N of it (qlora/training/distributed.py). Off: each process holds the whole model (data parallel).
    Adapters are whole on every process either way."""
    dist_timeout: int = 600
    """Several processes: seconds one waits in a collective for the others before the run stops (exit 6). Bounds the
    wait for a process that hangs; one that dies is noticed within a second."""
    plan: str = "recipe"
    """recipe: the memory and speed levers as the recipe sets them. fastest: before loading, the trainer picks for the
    card and host it finds the combination of levers (each off, or as the recipe sets it, or at its usual setting)
    that costs least time by the cost table (qlora/memory/costs.py) and whose estimate fits with the allocator's
    margin, prints it and why, and records it here (plan_chose) and in the levers' fields (qlora/memory/plan.py)."""
    plan_keep: list[str] = field(default_factory=list)
    """With plan=fastest: levers left as the recipe sets them, whatever the card (e.g. train.compile). A lever set on
    the command line of qlora.train is added here."""
    plan_gib: float = 0.0
    """With plan=fastest: the most device memory the plan may use, in GiB (with the allocator's margin; on a CPU
    device with the process's libraries and malloc's free lists, preflight.process_margin); 0 = the card's (on a CPU
    device, the host's available memory)."""
    plan_chose: list[str] = field(default_factory=list)
    """Filled by the trainer with plan=fastest: the overrides it applied to the recipe's levers, for the record."""
    plan_from: list[str] = field(default_factory=list)
    """Filled by the trainer with plan=fastest: the recipe's values of the levers the plan changed, as overrides. A
    resume restores them before it plans again, so a run resumed on another card is planned from the recipe."""
    plan_batch: bool = False
    """With plan=fastest: the batch shape is the plan's too. The rows per step (batch_size x grad_accum) stay; the plan
    runs them as micro-batches of any size that divides them (fewer, larger ones where the card holds them and the
    cost table says they save time; smaller ones where the card needs it). The loss (summed over the step's target
    tokens, divided by their count) and the schedule are unchanged (qlora/memory/plan.py). Setting batch_size or
    grad_accum on the command line keeps the shape."""

    def __post_init__(self) -> None:
        check_types(self)
        for key in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be a positive integer, e.g. "
                                  f"--train.{key}=1")
        for key in ("warmup_steps", "eval_every", "eval_batches", "save_every", "max_bad_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must not be negative, e.g. --train.{key}=0")
        if not self.lr > 0:  # nan and inf are refused by check_types
            raise ConfigError(f"train.lr={self.lr} must be positive, e.g. --train.lr=2e-4")
        for key in ("weight_decay", "max_grad_norm"):  # AdamW refuses a negative decay; a negative clip flips gradients
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must not be negative, e.g. --train.{key}="
                                  f"{getattr(TrainConfig, key)}")
        if not 0 <= self.seed < 2**32:  # torch seeds are 64-bit, and batch order mixes the seed with the epoch
            raise ConfigError(f"train.seed={self.seed} must lie in [0, 2**32), e.g. --train.seed=0")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.schedule={self.schedule!r}: use cosine or constant")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer={self.optimizer!r}: use paged_adamw_32bit, paged_adamw_8bit or adamw")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"train.device={self.device!r}: use auto, cuda or cpu")
        if self.dist_timeout <= 0:
            raise ConfigError(f"train.dist_timeout={self.dist_timeout} must be a positive number of seconds, "
                              "e.g. --train.dist_timeout=600")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints={self.keep_checkpoints} must be at least 1")
        if self.plan not in PLANS:
            raise ConfigError(f"train.plan={self.plan!r}: use {' or '.join(PLANS)}")
        if not self.plan_gib >= 0:
            raise ConfigError(f"train.plan_gib={self.plan_gib} must be >= 0 (0 = the whole card), e.g. "
                              "--train.plan_gib=14")
        if self.plan_batch and self.plan != "fastest":
            raise ConfigError("train.plan_batch leaves the batch shape to train.plan=fastest: set "
                              "--train.plan=fastest, or --train.plan_batch=false")
        if self.plan_keep and self.plan != "fastest":
            raise ConfigError("train.plan_keep names the levers train.plan=fastest leaves alone: set "
                              "--train.plan=fastest, or leave train.plan_keep empty")
        check_lever_fields(self, "train")

@dataclass
class OutputConfig:
    dir: str = "runs/default"
    """Run directory: adapter, checkpoints, metrics.jsonl, memory.json."""

    def __post_init__(self) -> None:
        check_types(self)
        if not self.dir:
            raise ConfigError("output.dir is empty: set it to the run directory, e.g. --output.dir=runs/mine")


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        check_sections(self)
        if self.train.shard_base and self.quant.keep_16bit_budget and not self.quant.keep_16bit:
            raise ConfigError("quant.keep_16bit_budget measures each layer on the whole base before train.shard_base "
                              "shards it, which every process would do on its CPU copy: choose the layers in a "
                              "single-process run and pass its quant.keep_16bit (run_config.json), or "
                              "--quant.keep_16bit_budget=0")
        if self.train.shard_base and self.quant.method == "full":
            raise ConfigError("train.shard_base shards a frozen base, but quant.method=full trains every weight: "
                              "use --train.shard_base=false (data parallel) or quant.method qlora or lora")
        if self.lora.init == "loftq" and (self.quant.method != "qlora" or self.model.synthetic):
            raise ConfigError("lora.init=loftq corrects the rounding of a 4-bit base loaded from 16-bit weights: "
                              f"with quant.method={self.quant.method}"
                              f"{' and model.synthetic=true' if self.model.synthetic else ''} there is none; "
                              "set --lora.init=zero")
        sections = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in self.train.plan_keep:
            section, _, name = key.partition(".")
            if section not in sections or name not in {f.name for f in dataclasses.fields(sections[section])}:
                raise ConfigError(f"train.plan_keep names {key!r}, which is no field: name levers as a recipe spells "
                                  "them, e.g. --train.plan_keep=train.offload_activations")
        check_levers(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_sections(config: Config) -> None:
    """Each section of `config` is of its section's type."""
    for f in dataclasses.fields(config):
        if not isinstance(getattr(config, f.name), section := typing.get_type_hints(Config)[f.name]):
            raise ConfigError(f"Config({f.name}=...) must be a {section.__name__}(...), "
                              f"not a {type(getattr(config, f.name)).__name__}")


def check_all(config: Config) -> Config:
    """Every check a Config passed when it was built, again, now that its fields may have changed: the sections'
    types first (a section set to None has no checks of its own), then each section, then the sections together."""
    check_sections(config)
    for prefix, obj in [("", config)] + [(f"{f.name}.", getattr(config, f.name)) for f in dataclasses.fields(config)]:
        known = [f.name for f in dataclasses.fields(obj)]
        for name in vars(obj):  # `config.train.stepz = 3`: Python takes any attribute, and the run would ignore it
            if name not in known and not name.startswith("_"):
                close = difflib.get_close_matches(name, known, n=1)
                raise ConfigError(f"unknown key {prefix}{name}" + (f": did you mean {prefix}{close[0]}?" if close
                                                                    else f"; {prefix or 'a config'} has {known}"))
    for f in dataclasses.fields(config):
        getattr(config, f.name).__post_init__()
    config.__post_init__()
    return config


def config_from_dict(raw: object, source: str) -> Config:
    """A Config from its `to_dict()` form (a run's run_config.json), checked as a recipe is; `source` names it."""
    sections = typing.get_type_hints(Config)
    if not isinstance(raw, dict) or not all(isinstance(raw.get(name, {}), dict) for name in sections):
        raise ConfigError(f"{source} is not a run config (a JSON object of sections model, data, ...): restore it, "
                          "or start the run again with --overwrite")
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{source} has no section {unknown[0]!r} in this version of qlora: restore the file")
    try:
        return Config(**{name: sections[name](**raw[name]) for name in sections if name in raw})
    except TypeError as err:  # a key this version of Config does not know, or a missing section
        raise ConfigError(f"{source} does not fit this version of qlora.config ({err})") from None
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def read_config_json(path: Path) -> Config:
    """The Config a run recorded in `path` (its run_config.json)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else str(err)
        raise ConfigError(f"{path} is unreadable ({reason}): restore it, or start the run again with --overwrite") \
            from None
    return config_from_dict(raw, str(path))
