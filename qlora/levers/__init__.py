"""Memory and speed levers: recipe switches that trade compute for memory, or memory for speed. One folder each:

    settings.py   its recipe fields (a dataclass its section of Config inherits), their rules, and its `Lever`
                  records: when it acts and what it does, as start-up and the estimate say it
    memory.py     what it changes in the estimate (qlora/memory/ reads it)
    <name>.py     what it does to the model or the step (the trainer runs it)
    test_*.py     its tests

settings.py and memory.py are plain Python: the config and the estimator read them without torch. Adding a lever is
its folder, its records in `LEVERS` and its fields in `FIELDS` below, and its hook in qlora/levers/apply.py.

    checkpoints      train.offload_activations, offload_budget_gib, checkpoint_every: where checkpointed layer
                     inputs wait (pinned host memory; only every k-th kept, the rest replayed)
    tiling           train.tile_size, tile_projections, tile_norms: the MLP, projections and norms in sequence
                     tiles
    loss             train.loss_chunk_size, liger_ce: logits a chunk at a time, or liger-kernel's fused loss
    host_optimizer   train.optimizer_on_cpu: optimizer state and fp32 masters in host memory
    lm_head          quant.quantize_lm_head: the output head in NF4
    cpu_embeddings   model.embeddings_on_cpu: the input embedding table in host memory
    speed            train.reuse_dequant, dequant_once, fuse_lora_add, fuse_lora, compile: fewer dequantisations, a
                     fused add or a fused adapted layer, torch.compile
    liger            train.liger_kernels: liger-kernel's RMSNorm, SwiGLU and RoPE (CUDA)
    stream_base      train.stream_base: the 4-bit decoder layers in pinned host memory, two at a time on the device
"""

from __future__ import annotations

from qlora.levers.checkpoints.settings import LEVERS as CHECKPOINTS
from qlora.levers.checkpoints.settings import CheckpointFields
from qlora.levers.cpu_embeddings.settings import LEVERS as CPU_EMBEDDINGS
from qlora.levers.cpu_embeddings.settings import CPUEmbeddingFields
from qlora.levers.host_optimizer.settings import LEVERS as HOST_OPTIMIZER
from qlora.levers.host_optimizer.settings import HostOptimizerFields
from qlora.levers.lever import Lever, RunConfig
from qlora.levers.liger.settings import LEVERS as LIGER
from qlora.levers.liger.settings import LigerFields
from qlora.levers.lm_head.settings import LEVERS as LM_HEAD
from qlora.levers.lm_head.settings import LMHeadFields
from qlora.levers.loss.settings import LEVERS as LOSS
from qlora.levers.loss.settings import LossFields
from qlora.levers.speed.settings import LEVERS as SPEED
from qlora.levers.speed.settings import SpeedFields
from qlora.levers.stream_base.settings import LEVERS as STREAM_BASE
from qlora.levers.stream_base.settings import StreamFields
from qlora.levers.tiling.settings import LEVERS as TILING
from qlora.levers.tiling.settings import TilingFields

LEVERS: tuple[Lever, ...] = (*CHECKPOINTS, *TILING, *LOSS, *HOST_OPTIMIZER, *LM_HEAD, *CPU_EMBEDDINGS, *SPEED,
                             *LIGER, *STREAM_BASE)

# The fields each section of Config inherits from the levers, in the order --help lists them.
FIELDS: dict[str, tuple[type, ...]] = {
    "model": (CPUEmbeddingFields,),
    "quant": (LMHeadFields,),
    "train": (CheckpointFields, TilingFields, HostOptimizerFields, LossFields, SpeedFields, LigerFields,
              StreamFields),
}


def in_effect(cfg: RunConfig, method: str, device: str, kind: str) -> list[str]:
    """What each lever of `kind` (memory or speed) does where it acts for `method` on `device`, as its `effect` says
    it: the estimate's lever list (memory) and the trainer's start-up line (speed)."""
    return [lever.effect(cfg, method) for lever in LEVERS if lever.kind == kind and lever.active(cfg, method, device)]


def counted(cfg: RunConfig, method: str, device: str) -> list[str]:
    """The levers whose memory the estimate counts where they act: every memory lever, then the speed levers that
    hold memory (`Lever.holds_memory`), each as its `effect` says it, a speed lever marked as one."""
    return in_effect(cfg, method, device, "memory") + \
        [f"{lever.effect(cfg, method)} (a speed lever: the memory it holds is counted)" for lever in LEVERS
         if lever.kind == "speed" and lever.holds_memory and lever.active(cfg, method, device)]


def check_levers(cfg: RunConfig) -> None:
    """Every lever's rules across sections (qlora.config.Config runs them once its sections are set)."""
    for lever in LEVERS:
        lever.check(cfg)
