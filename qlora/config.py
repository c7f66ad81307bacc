"""Typed recipe: one `Config` of six sections, loaded from a Python file and overridden from the command line.

A recipe is a Python file that defines `config = Config(...)`. Overrides look like `--train.lr=1e-4`; each is parsed
to the field's declared type, and an unknown key is an error that names the closest real key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import json
import math
import re
import sys
import textwrap
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

METHODS = ("qlora", "lora", "full")
# Attention kernels transformers offers for our models, and the package each needs beyond torch.
ATTENTION = {"sdpa": None, "eager": None, "flash_attention_2": "flash_attn"}

# Names that transformers' TrainingArguments and peft's LoraConfig use for our keys: suggested before spelling matches.
ALIASES = {"learning_rate": "lr", "max_steps": "steps", "per_device_train_batch_size": "batch_size",
           "gradient_accumulation_steps": "grad_accum", "lora_r": "r", "rank": "r", "lora_alpha": "alpha",
           "lora_dropout": "dropout", "target_modules": "targets", "max_length": "max_seq_len",
           "seq_len": "max_seq_len", "output_dir": "dir", "warmup": "warmup_steps", "lr_scheduler_type": "schedule"}


class ConfigError(ValueError):
    """A mistake in a recipe or an override; the message names the key and the fix."""


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


@dataclass
class ModelConfig:
    path: str = ""
    """Hub id or local directory of a Hugging Face checkpoint."""
    build: str | None = None
    """Name of a builder in `qlora.build.BUILDERS` that writes the checkpoint at `path` once if it is missing."""
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
    embeddings_on_cpu: bool = False
    """Keep the input embedding table in CPU memory; look tokens up there and send only their vectors to the device
    (saves vocab x hidden x 2 bytes: 1.0 GiB for Llama-3.1-8B, 2.1 GiB for 70B). Frozen methods only."""

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


@dataclass
class QuantConfig:
    method: str = "qlora"
    """qlora: NF4 base + LoRA; lora: 16-bit base + LoRA; full: 16-bit base, every weight trains (no LoRA)."""
    quant_type: str = "nf4"
    """bitsandbytes 4-bit type for qlora: nf4 (QLoRA paper, sec. 3) or fp4."""
    double_quant: bool = True
    """Quantise the quantisation constants too: 0.37 bits/param saved (QLoRA paper, sec. 3)."""
    compute_dtype: str = "auto"
    """auto: bf16 on CUDA, fp32 on CPU (a bf16 matmul is ~40x slower than fp32 on our CPUs)."""
    quantize_lm_head: bool = False
    """Store the (frozen) output head in NF4 as well: saves ~3/4 of vocab x hidden x 2 bytes (0.75 GiB for 8B,
    1.5 GiB for 70B) at the cost of quantisation error in the logits; its backward still dequantises it whole for a
    moment. qlora only; needs untied embeddings."""
    blocksize: int = 64
    """Weights per 4-bit block, each with its own scale (absmax): 64 as in the QLoRA paper and transformers' load.
    32 rounds each weight against a scale fitted to fewer neighbours, for 1/8 bit more per parameter with double
    quant (+3% of the 4-bit bytes); bitsandbytes >= 0.49 supports it on CPU and CUDA. Layers are re-read from the
    checkpoint and quantised again after loading (qlora/quantize.py). qlora only."""
    keep_16bit_budget: float = 0.0
    """Keep the linear layers whose 4-bit rounding costs the most in 16-bit, within this share of extra base-weight
    bytes: 0.05 = at most 5% more than the 4-bit base. The cost is measured on calibration batches of the training
    data (qlora/sensitivity.py); the chosen layers go into keep_16bit. 0 = off. qlora only."""
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
        if self.quantize_lm_head and self.method != "qlora":
            raise ConfigError(f"quant.quantize_lm_head needs quant.method=qlora (got {self.method!r}): "
                              "set --quant.quantize_lm_head=false")
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
    (qlora/loftq.py)."""
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
class TrainConfig:
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
    offload_activations: bool = False
    """Keep each checkpointed layer input in pinned CPU memory until the backward needs it (CUDA only)."""
    offload_budget_gib: float = 0.0
    """Pinned CPU memory the offloaded layer inputs may take; the inputs beyond it stay on the device. 0 = no limit.
    `python -m qlora.memory RECIPE --max-context` says what a host's memory allows."""
    checkpoint_every: int = 1
    """Keep the input of every k-th decoder layer only; the backward replays each group of k layers from its first
    input to get the others back: L/k + k layer inputs instead of L, for one more forward of k-1 layers in k."""
    tile_size: int = 0
    """Run each decoder layer's MLP this many tokens at a time, forward and backward (recomputing each tile), so none
    of its seq x intermediate tensors exists at full length; one more MLP forward per step. 0 = off."""
    tile_projections: bool = False
    """With tile_size: tile the attention's q/k/v/o projections too, which keeps LoRA dropout's dropped inputs and
    masks (seq x hidden each) out of memory; pays only with lora.dropout > 0."""
    optimizer_on_cpu: bool = False
    """Keep the optimizer state in CPU memory from the start and run the update there (parameters and gradients are
    copied over and back each step): the state never takes device memory. Changes nothing on a CPU device."""
    loss_chunk_size: int = 0
    """Compute lm_head + cross-entropy this many tokens at a time, never materialising all logits; 0 = all at once."""
    liger_ce: bool = False
    """CUDA: compute lm_head + cross-entropy with liger-kernel's fused linear cross-entropy (pip install liger-kernel)
    instead of the PyTorch chunks; needs a 16-bit lm_head. Falls back to PyTorch on CPU."""
    reuse_dequant: bool = False
    """Keep each NF4 weight dequantised in the recompute for its backward instead of dequantising it again: one
    dequantisation fewer per weight and step, one layer of 16-bit weights more at peak. Needs gradient_checkpointing."""
    fuse_lora_add: bool = False
    """Add the LoRA update into the base output in place (one addmm) instead of as a separate tensor and add."""
    compile: str = "none"
    """torch.compile: none, lora (each adapter's update) or layers (each decoder layer)."""
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
    1/N of it (qlora/distributed.py). Off: each process holds the whole model (data parallel). Adapters are whole on
    every process either way."""
    dist_timeout: int = 600
    """Several processes: seconds one waits in a collective for the others before the run stops (exit 6). Bounds the
    wait for a process that hangs; one that dies is noticed within a second."""

    def __post_init__(self) -> None:
        check_types(self)
        for key in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be a positive integer, e.g. "
                                  f"--train.{key}=1")
        for key in ("warmup_steps", "eval_every", "eval_batches", "save_every", "loss_chunk_size", "max_bad_steps",
                    "tile_size"):
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
        if self.optimizer not in ("paged_adamw_32bit", "paged_adamw_8bit", "adamw"):
            raise ConfigError(f"train.optimizer={self.optimizer!r}: use paged_adamw_32bit, paged_adamw_8bit or adamw")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"train.device={self.device!r}: use auto, cuda or cpu")
        if self.dist_timeout <= 0:
            raise ConfigError(f"train.dist_timeout={self.dist_timeout} must be a positive number of seconds, "
                              "e.g. --train.dist_timeout=600")
        if self.shard_base and (self.tile_size or self.checkpoint_every > 1):
            key = "tile_size" if self.tile_size else "checkpoint_every"
            raise ConfigError(f"train.shard_base with train.{key}: not supported together (the tiles' recompute and "
                              "the replayed layers run outside the decoder layers' FSDP hooks; untested): turn one "
                              "of them off")
        if self.shard_base and (self.liger_ce or self.compile != "none"):
            raise ConfigError(f"train.shard_base with train.{'liger_ce' if self.liger_ce else 'compile'}: not "
                              "supported together (the head's weight is sharded; compile is untested under FSDP): "
                              "turn one of them off")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints={self.keep_checkpoints} must be at least 1")
        if self.compile not in ("none", "lora", "layers"):
            raise ConfigError(f"train.compile={self.compile!r}: use none, lora or layers")
        if self.reuse_dequant and not self.gradient_checkpointing:
            raise ConfigError("train.reuse_dequant keeps dequantised weights until the backward, which without "
                              "checkpointing is every layer's: set --train.gradient_checkpointing=true or "
                              "--train.reuse_dequant=false")
        if self.offload_activations and not self.gradient_checkpointing:
            raise ConfigError("train.offload_activations offloads the checkpointed layer inputs: set "
                              "--train.gradient_checkpointing=true or --train.offload_activations=false")
        if not self.offload_budget_gib >= 0:
            raise ConfigError(f"train.offload_budget_gib={self.offload_budget_gib} must be >= 0 (0 = no limit)")
        if self.offload_budget_gib and not self.offload_activations:
            raise ConfigError("train.offload_budget_gib limits train.offload_activations: set "
                              "--train.offload_activations=true or --train.offload_budget_gib=0")
        if self.checkpoint_every < 1:
            raise ConfigError(f"train.checkpoint_every={self.checkpoint_every} must be at least 1 (every layer), "
                              "e.g. --train.checkpoint_every=2")
        if self.checkpoint_every > 1 and not self.gradient_checkpointing:
            raise ConfigError("train.checkpoint_every chooses which checkpointed layers keep their input: set "
                              "--train.gradient_checkpointing=true or --train.checkpoint_every=1")
        if self.tile_projections and not self.tile_size:
            raise ConfigError("train.tile_projections tiles by train.tile_size, which is 0: set "
                              "--train.tile_size=4096 or --train.tile_projections=false")
        if self.tile_size and self.compile == "layers" or self.tile_projections and self.compile == "lora":
            raise ConfigError(f"train.tile_size: torch.compile cannot trace the tiles inside a compiled "
                              f"{'layer' if self.compile == 'layers' else 'adapter'}: set --train.compile=none or "
                              "--train.tile_size=0")


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
        if self.train.shard_base and self.model.embeddings_on_cpu:
            raise ConfigError("train.shard_base shards the embeddings across the processes' devices; "
                              "model.embeddings_on_cpu keeps them in CPU memory: turn one of them off")
        if self.model.embeddings_on_cpu and self.quant.method == "full":
            raise ConfigError("model.embeddings_on_cpu keeps a frozen table, but quant.method=full trains every "
                              "weight: set --model.embeddings_on_cpu=false or use qlora/lora")
        if self.train.tile_size and self.quant.method == "full":
            raise ConfigError("train.tile_size is for adapters on a frozen base: with quant.method=full each tile "
                              "would add up full-size weight gradients: set --train.tile_size=0 or use qlora/lora")
        if self.lora.init == "loftq" and (self.quant.method != "qlora" or self.model.synthetic):
            raise ConfigError("lora.init=loftq corrects the rounding of a 4-bit base loaded from 16-bit weights: "
                              f"with quant.method={self.quant.method}"
                              f"{' and model.synthetic=true' if self.model.synthetic else ''} there is none; "
                              "set --lora.init=zero")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_sections(config: Config) -> None:
    """Each section of `config` is of its section's type."""
    for f in dataclasses.fields(config):
        if not isinstance(getattr(config, f.name), section := typing.get_type_hints(Config)[f.name]):
            raise ConfigError(f"Config({f.name}=...) must be a {section.__name__}(...), "
                              f"not a {type(getattr(config, f.name)).__name__}")


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


def field_docs(section: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), by field name."""
    body = ast.parse(textwrap.dedent(inspect.getsource(section))).body[0].body
    return {node.target.id: inspect.cleandoc(doc.value.value) for node, doc in zip(body, body[1:], strict=False)
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)}


def describe(config: Config, width: int = 100) -> str:
    """Every field as `section.key: type = value` and its docstring, for `--help` after a recipe."""
    lines = []
    for section in dataclasses.fields(config):
        obj = getattr(config, section.name)
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            lines.append(f"  {section.name}.{f.name}: {f.type} = {getattr(obj, f.name)!r}")
            lines += textwrap.wrap(docs.get(f.name, ""), width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def load_recipe(path: str | Path) -> Config:
    """Execute a recipe file and return its `config`."""
    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "not found"
        raise ConfigError(f"recipe {path} {problem}: pass the path of a recipe file such as recipes/tiny.py")
    if path.suffix != ".py":  # importlib finds no loader for any other name, and would fail in its own words
        raise ConfigError(f"recipe {path} is not a .py file: a recipe is Python; rename it to {path.stem}.py")
    spec = importlib.util.spec_from_file_location(f"qlora_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ConfigError(f"{path}:{err.lineno}: syntax error: {err.msg}") from err
    except SystemExit as err:  # sys.exit() in a recipe: a recipe describes a run, it does not end the command
        raise ConfigError(f"{path}: the recipe called exit({err.code!r}): a recipe only builds `config`") from None
    except Exception as err:  # a failed check, a NameError, an unknown keyword...: name the recipe's line, not ours
        frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        where = f"{path}:{frames[-1].lineno}" if frames else str(path)
        raise ConfigError(f"{where}: {_recipe_error(err)}") from err
    config = getattr(module, "config", None)
    if not isinstance(config, Config):
        raise ConfigError(f"{path} defines no `config = Config(...)`: add one at module level (see recipes/tiny.py)")
    try:  # a recipe is plain Python: it may change its config after building it (`config.train = None`)
        return check_all(config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err} (set after the recipe built its Config: change it inside Config(...))") \
            from None


def check_all(config: Config) -> Config:
    """Every check a Config passed when it was built, again, now that its fields may have changed: the sections'
    types first (a section set to None has no checks of its own), then each section, then the sections together."""
    check_sections(config)
    for f in dataclasses.fields(config):
        getattr(config, f.name).__post_init__()
    config.__post_init__()
    return config


def _recipe_error(err: Exception) -> str:
    if isinstance(err, ConfigError):
        return str(err)
    unknown = re.match(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(err))
    section = unknown and globals().get(unknown.group(1))
    if section is Config:
        sections = ", ".join(f.name for f in dataclasses.fields(Config))
        return f"Config has no section {unknown.group(2)!r}: use {sections}"
    if isinstance(section, type) and dataclasses.is_dataclass(section):
        name = section.__name__.removesuffix("Config").lower()
        known = [f"{name}.{f.name}" for f in dataclasses.fields(section)]
        return f"unknown key {name}.{unknown.group(2)}: {_hint(f'{name}.{unknown.group(2)}', known)}"
    return f"{type(err).__name__}: {err}"


def _hint(key: str, known: list[str]) -> str:
    """The closest real key: a transformers/peft name's equivalent first, then the nearest spelling."""
    alias = ALIASES.get(key.rsplit(".", 1)[-1])
    close = [k for k in known if k.endswith(f".{alias}")] or difflib.get_close_matches(key, known, 1, 0.4)
    return f"did you mean {close[0]}?" if close else "see the fields in qlora/config.py"


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply `--section.key=value` overrides, each parsed to the field's type, then re-run every check."""
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    known = [f"{s}.{f.name}" for s, obj in sections.items() for f in dataclasses.fields(obj)]
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form --section.key=value, e.g. --train.lr=1e-4")
        key, raw = item[2:].split("=", 1)
        if key not in known:
            raise ConfigError(f"unknown key --{key}: {_hint(key, known).replace('mean ', 'mean --')}")
        section, name = key.split(".", 1)
        obj = sections[section]
        hints = typing.get_type_hints(type(obj))
        setattr(obj, name, _parse(raw, hints[name], key))
    return check_all(config)  # overrides must pass the same checks as the recipe


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
        try:
            return annotation(raw)
        except ValueError:
            raise ConfigError(f"--{key}={raw}: expected {annotation.__name__}, e.g. --{key}=1") from None
    if typing.get_origin(annotation) is list:
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


def split_args(argv: list[str], usage: str) -> tuple[str, list[str], list[str]]:
    """Split argv into the recipe path, flags (--resume, ...) and overrides (--section.key=value)."""
    if not argv or argv[0].startswith("-"):
        raise ConfigError(f"no recipe given: {usage}")
    flags = [a for a in argv[1:] if a.startswith("--") and "=" not in a]
    return argv[0], flags, [a for a in argv[1:] if a not in flags]


def parse_args(argv: list[str], usage: str) -> tuple[Config, list[str]]:
    """Split argv into recipe path, flags (--resume, ...) and overrides; return the config and the flags."""
    recipe, flags, overrides = split_args(argv, usage)
    return apply_overrides(load_recipe(recipe), overrides), flags


def main(argv: list[str] | None = None) -> int:
    """`python -m qlora.config RECIPE.py [overrides]`: print the resolved config as JSON."""
    from qlora.cli import run

    return run(_print_resolved, argv)


def _print_resolved(argv: list[str]) -> None:
    from qlora.commands import CONFIG, help_text, wants_help

    if wants_help(argv):
        print(help_text("qlora.config", argv), end="")
        return
    usage = CONFIG.usage
    cfg, flags = parse_args(argv, usage)
    if flags:
        raise ConfigError(f"unknown flag {flags[0]}: {usage}")
    print(json.dumps(cfg.to_dict(), indent=2))


if __name__ == "__main__":  # run as qlora.config, so that recipes and this command share one Config class
    from qlora.config import main as config_main

    sys.exit(config_main())
