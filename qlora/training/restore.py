"""Checkpoints read back: every file of one checked before any of it is used, and `--resume` from the newest usable.

A checkpoint can be damaged after it was written (qlora/training/checkpoint.py writes it whole: a file truncated by a
copy, deleted, or replaced): `--resume` reads every file of the newest one and checks names, shapes and values before
using any of it, and falls back to the newest one that is whole (`resume_latest`), saying which and why; the run
directory (qlora/training/rundir.py) then renames the damaged ones aside for inspection. Every file is read with
torch.load(weights_only=True): a checkpoint is data, never code.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import torch

from qlora.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from qlora.config import Config
from qlora.config.run import OPTIMIZERS
from qlora.errors import OVERWRITE_ON_RESUME, ConfigError
from qlora.training.checkpoint import (
    FULL_WEIGHTS,
    OPTIMIZER,
    PATTERN,
    STATE,
    checkpoint_dirs,
    load_weights,
    root_cause,
    run_device,
    set_rng_state,
    weights_file,
)
from qlora.training.optimizer import keeps_masters, repage, stepped_params


class Unusable(Exception):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong with it."""


def recorded(run_dir: Path, key: str) -> tuple[Path | None, object]:
    """The newest readable checkpoint of `run_dir` (or `run_dir` itself, a checkpoint-N) and what it recorded under
    `key`, as stored: (None, None) where there is none, (that checkpoint, None) for one written before `key` was
    recorded (whose name a refusal may give: runconfig._same_config). The record is its trainer_state.pt's: a
    checkpoint that lost its optimizer.pt (which eval, generate, export and merge never read) still holds it, and
    passed over, run_config.json was checked against an older one's, or not at all."""
    for ckpt in [run_dir] if (run_dir / STATE).is_file() else reversed(checkpoint_dirs(run_dir)):
        try:
            return ckpt, _read(ckpt, STATE).get(key)
        except Unusable:  # a damaged checkpoint says nothing: the one before may
            continue
    return None, None


def unrecorded(run_dir: Path) -> str | None:
    """Why `recorded` found nothing in `run_dir` (or `run_dir` itself, a checkpoint-N) that wrote checkpoints: each
    one's trainer_state.pt, damaged or gone, named with what is wrong, newest first; None where none is."""
    ckpts = [run_dir] if PATTERN.match(run_dir.name) else reversed(checkpoint_dirs(run_dir))
    reasons = []
    for ckpt in ckpts:
        try:
            _read(ckpt, STATE)
        except Unusable as err:
            reasons.append(f"{ckpt / STATE}{str(err).removeprefix(STATE)}")
    return "; ".join(reasons) or None


def require_weights(run_dir: Path, weights: str) -> None:
    """Refuse a RUN_DIR (or checkpoint-N) without its weights file, naming a fix that exists: "pass one of its
    checkpoint-N directories" was said to a run killed before its first checkpoint, and to a checkpoint-N itself.
    The checkpoint-N offered need not be whole: eval, generate, export and merge read its weights (and their config)
    and the run's run_config.json, not its optimizer.pt or trainer_state.pt."""
    path, ckpt = run_dir / weights, PATTERN.match(run_dir.name)
    if path.is_file():
        return
    needs = (weights, ADAPTER_CONFIG) if weights == ADAPTER_WEIGHTS else (weights,)
    ckpts = checkpoint_dirs(run_dir.parent if ckpt else run_dir)
    kept = [c for c in ckpts if all((c / n).is_file() for n in needs)]
    if path.exists():
        why = "is not a file"
    else:
        why = "not found: " + ("the checkpoint lost it since it was written" if ckpt else "the run has not finished")
    if kept:
        use = f"pass {kept[-1]} instead"
    elif ckpts:
        use = "no checkpoint of the run holds one: restore it, or train the run again"
    else:
        use = "it stopped before its first checkpoint, so nothing was trained to use: train it again"
    raise ConfigError(f"{path} {why}; {use}")


def _refused(err: pickle.UnpicklingError) -> str:
    """What weights_only refused, from torch's message: its last line only pointed at the documentation, and the rest
    advises weights_only=False, which would run the file's code."""
    text = " ".join(str(err).split("WeightsUnpickler error:", 1)[-1].split())
    return text.split("Check the documentation")[0].split(". ")[0].strip(" .") or "not plain data"


def _read(ckpt: Path, name: str) -> dict:
    # weights_only: a checkpoint is data, never code (torch.load's pickle would run whatever it holds).
    try:
        with warnings.catch_warnings():  # torch's warning of a pickle protocol it may not read: two lines of noise
            warnings.simplefilter("ignore", UserWarning)
            value = torch.load(ckpt / name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a pickle that is not plain data: never run
        raise Unusable(f"{name} is unreadable (torch.load(weights_only=True) refused it: {_refused(err)}; a "
                       "checkpoint holds tensors and plain data, never code)") from err
    except Exception as err:  # missing, truncated, not a torch file
        raise Unusable(f"{name} is unreadable ({root_cause(err)})") from err
    if not isinstance(value, dict):
        raise Unusable(f"{name} holds a {type(value).__name__}, not a state dict")
    return value


def trainer_state(ckpt: Path) -> dict | None:
    """`ckpt`'s trainer_state.pt, checked as a resume checks it; None where it is gone or damaged."""
    try:
        state = _read(ckpt, STATE)
        _check_state(state, ckpt)
    except Unusable:
        return None
    return state


def restorable(run_dir: Path, cfg: Config) -> tuple[Path | None, dict]:
    """The newest checkpoint of `run_dir` whose files `resume_latest` gets past before it needs the model, and its
    trainer state: a trainer_state.pt that passes its checks, an optimizer.pt torch can open (where the run keeps its
    optimizer), `cfg`'s weights file whole by its header. A refusal before loading (runconfig.resume_config:
    train.steps below its step) judges by it, as the restore falls back past a newer damaged one: judged by the
    newest trainer_state.pt, --train.steps=3 was refused of a run whose checkpoint-4 had its adapter cut short, which
    the restore resumes from checkpoint-3. Shapes and values need the model: the restore may still pass over the one
    named here, and then judges by the one it uses (progress.resume_progress). (None, {}) where none is."""
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        if (state := trainer_state(ckpt)) is None:
            continue
        try:
            if state.get("optimizer", cfg.train.optimizer) == cfg.train.optimizer:
                with warnings.catch_warnings():  # mmap: the zip's directory is read, not the moments
                    warnings.simplefilter("ignore", UserWarning)
                    torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True, mmap=True)
            _covered(ckpt / weights_file(cfg))
        except Exception:  # any file the restore would find unusable passes this checkpoint over
            continue
        return ckpt, state
    return None, {}


def _covered(path: Path) -> None:
    """Raise unless the safetensors file at `path` is as long as its header says: safe_open took a file cut to half
    its length, which load_file then refused ("incomplete metadata, file not fully covered")."""
    size = path.stat().st_size
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 0 < length <= size - 8:
            raise ValueError(f"{path.name}: a header of {length} bytes in a file of {size}")
        header = json.loads(f.read(length))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + length + end:
        raise ValueError(f"{path.name} holds {size} bytes, its header {8 + length + end}")


def _check_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer) -> None:
    """Raise Unusable unless `saved` is a state of `optimizer`'s parameters with finite moments: torch checks only the
    group sizes, and a moment of another shape would fail at the next step, after the run directory was written."""
    if "masters" in saved:  # adapters/master.py: the fp32 copies of 16-bit adapters, beside the inner optimizer's state
        masters, ours = saved["masters"], stepped_params(optimizer)
        if not isinstance(masters, list) or [getattr(m, "shape", None) for m in masters] != [p.shape for p in ours]:
            raise Unusable(f"{OPTIMIZER} holds fp32 master weights of other shapes than this model's adapters")
        if not all(torch.isfinite(m).all() for m in masters):
            raise Unusable(f"{OPTIMIZER} holds fp32 master weights with nan or inf")
        saved = saved.get("inner", {})
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != [
            len(g["params"]) for g in optimizer.param_groups]:
        raise Unusable(f"{OPTIMIZER} is the state of other parameters than this model's adapters")
    ours = stepped_params(optimizer)
    params = dict(zip((i for g in groups for i in g["params"]), ours, strict=True))
    for index, state in saved.get("state", {}).items():
        if index not in params:
            raise Unusable(f"{OPTIMIZER} holds state for parameter {index}, which this model does not have")
        # bitsandbytes keeps its moments one level down, under __bnb_optimizer_quant_state__
        nested = [v.items() for v in state.values() if isinstance(v, dict)]
        for name, value in [*state.items(), *(item for items in nested for item in items)]:
            if not isinstance(value, torch.Tensor):
                continue
            if name in ("exp_avg", "exp_avg_sq", "state1", "state2") and value.shape != params[index].shape:
                raise Unusable(f"{OPTIMIZER}: {name} of parameter {index} has shape {tuple(value.shape)}, not "
                               f"{tuple(params[index].shape)}")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise Unusable(f"{OPTIMIZER}: {name} of parameter {index} holds nan or inf")


def _count(value: object, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _check_state(state: dict, ckpt: Path) -> None:
    """Raise Unusable unless trainer_state.pt holds what a resume reads, of the types it reads, for the step its
    folder is named after: a checkpoint renamed, or edited, would continue another point of the run."""
    if not _count(state.get("step")) or not isinstance(state.get("scheduler"), dict) \
            or not isinstance(state.get("rng"), dict):
        raise Unusable(f"{STATE} lacks the step, scheduler or RNG state of a checkpoint")
    if (m := PATTERN.match(ckpt.name)) and int(m.group(1)) != state["step"]:
        raise Unusable(f"{STATE} holds step {state['step']}, not the {m.group(1)} its folder is named after")
    for key, least in (("bad_steps", 0), ("metrics_bytes", 0), ("micro_batch", 0), ("batch_size", 1), ("longest", 0)):
        if key in state and not _count(state[key], least):
            raise Unusable(f"{STATE}: {key}={state[key]!r} is not an integer >= {least}")
    first = state.get("first_eval", {})
    if not isinstance(first, dict) or (first and not all(
            isinstance(first.get(k), int | float) and not isinstance(first.get(k), bool)
            for k in ("eval_loss", "eval_exact_match"))):
        raise Unusable(f"{STATE}: first_eval={first!r} is not the scores of an evaluation")
    if state.get("optimizer", "adamw") not in OPTIMIZERS:
        raise Unusable(f"{STATE}: optimizer={state['optimizer']!r} is no optimizer this trainer builds")
    if "rows" in state and not (isinstance(state["rows"], list) and len(state["rows"]) == 2 and
                                all(_count(n, 1) for n in state["rows"])):
        raise Unusable(f"{STATE}: rows={state['rows']!r} is not the training and held-out row counts")
    if not (isinstance(state.get("rows_sha256", []), list) and all(
            isinstance(h, str | None) for h in state.get("rows_sha256", []))):
        raise Unusable(f"{STATE}: rows_sha256={state['rows_sha256']!r} is not the fingerprints of the rows")
    if not isinstance(state.get("config_json_sha256"), str | None):
        raise Unusable(f"{STATE}: config_json_sha256={state['config_json_sha256']!r} is not the fingerprint of a "
                       "config.json")
    if not isinstance(state.get("config", {}), dict):
        raise Unusable(f"{STATE}: config is not the run's settings (a dict of sections)")
    if not isinstance(state.get("rng_ranks", []), list):
        raise Unusable(f"{STATE}: rng_ranks is not a list of the processes' RNG states")
    if not isinstance(state.get("ended_line", ""), str):
        raise Unusable(f"{STATE}: ended_line is not the training line of a run's last step")


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load `saved` into `optimizer`. A state with fp32 masters (16-bit adapters, qlora/adapters/master.py: a run on
    CUDA) into an optimizer that keeps none (the run resumed with fp32 adapters: on the CPU, or with
    --quant.compute_dtype=fp32) gives the inner optimizer's state, and the masters, the fp32 weights the 16-bit
    adapter was rounded from, become the adapters."""
    if "masters" not in saved or keeps_masters(optimizer):  # those read either format
        optimizer.load_state_dict(saved)
    else:
        optimizer.load_state_dict(saved["inner"])
        with torch.no_grad():
            for param, master in zip(stepped_params(optimizer), saved["masters"], strict=True):
                param.copy_(master)
    repage(optimizer)


def load_checkpoint(ckpt: Path, model: torch.nn.Module, cfg: Config, optimizer: torch.optim.Optimizer,
                    scheduler: object) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `ckpt`; return the trainer state (step, ...).

    Every file is read and checked before any is applied; Unusable names the first that fails. The optimizer state
    is kept only if the checkpoint was written with the same train.optimizer (the state of one is no state of another:
    the optimizer then starts afresh, and the returned state says so under "optimizer_restarted").
    """
    state = _read(ckpt, STATE)
    _check_state(state, ckpt)
    same_optimizer = state.get("optimizer", cfg.train.optimizer) == cfg.train.optimizer
    optimizer_state = _read(ckpt, OPTIMIZER) if same_optimizer else None
    if optimizer_state is not None:
        _check_optimizer_state(optimizer_state, optimizer)
    try:
        load_weights(model, cfg, ckpt)  # checks every name, shape and value before it copies one
    except Exception as err:  # missing, truncated (SafetensorError), another shape, nan
        weights = FULL_WEIGHTS if cfg.quant.method == "full" else "the adapter"
        raise Unusable(f"{weights} is unusable ({root_cause(err)})") from err
    try:
        if optimizer_state is not None:
            load_optimizer(optimizer, optimizer_state)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], run_device(model))
    except Exception as err:  # well-formed files whose contents still do not fit (a state from another version)
        raise Unusable(f"its optimizer, scheduler or RNG state does not fit this run ({root_cause(err)})") from err
    if not same_optimizer:
        state["optimizer_restarted"] = state["optimizer"]
    return state


def resume_latest(run_dir: Path, model: torch.nn.Module, cfg: Config, optimizer: torch.optim.Optimizer,
                  scheduler: object) -> tuple[Path | None, dict, list[tuple[Path, str]]]:
    """Restore the newest usable checkpoint: (its path or None if there is none, its trainer state, and the newer
    ones that were unusable, each with the reason). Raises ConfigError when checkpoints exist and none is usable."""
    damaged: list[tuple[Path, str]] = []
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        try:
            return ckpt, load_checkpoint(ckpt, model, cfg, optimizer, scheduler), damaged
        except Unusable as err:
            damaged.append((ckpt, str(err)))
    if damaged:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise ConfigError(f"no checkpoint in {run_dir} can be resumed from ({reasons}): restore one, or start "
                          f"again with {OVERWRITE_ON_RESUME}")
    return None, {}, []
