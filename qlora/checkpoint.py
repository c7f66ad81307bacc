"""Checkpoints: `checkpoint-<step>/` with the trainable weights, optimizer, scheduler, RNG states and data position.

Each is written into a temporary directory, flushed to disk, then renamed into place: a directory named
`checkpoint-<step>` is always complete, and a run killed mid-save leaves only a `.tmp-` directory that resume ignores.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qlora.config import Config
from qlora.lora import load_adapter, save_adapter

STATE = "trainer_state.pt"
OPTIMIZER = "optimizer.pt"
FULL_WEIGHTS = "trainable.safetensors"
PATTERN = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(model: torch.nn.Module, cfg: Config, base_path: str, out_dir: Path) -> None:
    """The trained weights: a PEFT adapter for LoRA methods, every trainable tensor for full fine-tuning."""
    if cfg.quant.method == "full":
        state = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, str(out_dir / FULL_WEIGHTS), metadata={"format": "pt"})
    else:
        save_adapter(model, cfg.lora, base_path, out_dir)


def load_weights(model: torch.nn.Module, cfg: Config, ckpt: Path) -> None:
    if cfg.quant.method == "full":
        state = load_file(str(ckpt / FULL_WEIGHTS))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
    else:
        load_adapter(model, ckpt)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, cfg: Config, base_path: str,
                    optimizer: torch.optim.Optimizer, scheduler: object, extra: dict) -> Path:
    """Write checkpoint-<step> atomically and keep only the newest `train.keep_checkpoints`."""
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_weights(model, cfg, base_path, tmp)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), **extra}, tmp / STATE)
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (after a resume): swap it out only once the new one is whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-cfg.train.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(ckpt: Path, model: torch.nn.Module, cfg: Config, optimizer: torch.optim.Optimizer,
                    scheduler: object) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `ckpt`; return the trainer state (step, ...)."""
    load_weights(model, cfg, ckpt)
    # weights_only: a checkpoint is data, never code (torch.load's pickle would run whatever it holds).
    optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True))
    state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
