"""The sections that say how the run goes: the data it reads (`data`), the training loop (`train`) and where it writes
(`output`). Each field has its type, default and docstring, and is checked as it is set: a wrong value is a
`ConfigError` that names the key and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora.config.fields import check_lever_fields, check_types
from qlora.errors import ConfigError
from qlora.levers import FIELDS

PLANS = ("recipe", "fastest")  # train.plan: the levers as set, or the fastest that fit (qlora/memory/plan.py)
FP32_TINY = 2.0**-126  # torch.finfo(torch.float32).tiny, without importing torch for --help
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw")  # train.optimizer's choices
# Below it, a gradient clipped to this norm has elements under AdamW's eps of 1e-8 in any adapter of 10^4 or more
# weights (1e-6 / sqrt(1e4)): the step is eps-dominated, and 1e-30 trained the tiny recipe not at all.
MIN_CLIP = 1e-6


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
        if self.max_seq_len == 1:  # refused after the base loaded, as if the data were at fault
            raise ConfigError("data.max_seq_len=1 leaves no token to learn (each is learned from the tokens before "
                              "it): set it to 2 or more, e.g. --data.max_seq_len=2048")
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
    1/N of it (qlora/base/shard.py). Off: each process holds the whole model (data parallel).
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
    """Filled by the trainer with plan=fastest: the overrides it applied to the recipe's levers (just
    --train.plan=fastest where it kept them as they are); a resume keeps them where they still fit."""
    plan_from: list[str] = field(default_factory=list)
    """Filled by the trainer with plan=fastest: the recipe's values of the levers the plan changed, as overrides. A
    resume restores them, keeps plan_chose where it still fits, and otherwise plans again from the recipe."""
    plan_batch: bool = False
    """With plan=fastest: the batch shape is the plan's too. The rows per step (batch_size x grad_accum) stay; the plan
    runs them as micro-batches of any size that divides them (fewer, larger ones where the card holds them and the
    cost table says they save time; smaller ones where the card needs it). The loss (summed over the step's target
    tokens, divided by their count) and the schedule are unchanged (qlora/memory/candidates.py). Setting batch_size or
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
        if self.lr < FP32_TINY:  # 1e-300 trained nothing and exited 0: the optimizers compute the update in float32
            raise ConfigError(f"train.lr={self.lr} is below float32's smallest normal number ({FP32_TINY:.2g}), so "
                              "each update rounds to nothing and the run would train nothing: e.g. --train.lr=2e-4")
        for key in ("weight_decay", "max_grad_norm"):  # AdamW refuses a negative decay; a negative clip flips gradients
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must not be negative, e.g. --train.{key}="
                                  f"{getattr(TrainConfig, key)}")
        if 0 < self.max_grad_norm < MIN_CLIP:
            raise ConfigError(f"train.max_grad_norm={self.max_grad_norm:g} clips the adapters' gradient below AdamW's "
                              "eps (1e-8 per element), so the updates shrink to nothing and the run trains nothing: "
                              f"set it to 0 (off) or at least {MIN_CLIP:g}, e.g. --train.max_grad_norm=1.0")
        if self.lr * self.weight_decay >= 1:  # AdamW's decoupled decay: each step multiplies a weight by 1 - lr x decay
            raise ConfigError(f"train.weight_decay={self.weight_decay:g} x train.lr={self.lr:g} = "
                              f"{self.lr * self.weight_decay:g} is not below 1, so each step would flip or zero the "
                              "adapters (AdamW multiplies them by 1 - lr x decay): set train.weight_decay below "
                              f"{1 / self.lr:g}, e.g. --train.weight_decay=0.01")
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
