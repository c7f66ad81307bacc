"""Checkpoints and the final adapter: written atomically, read back with every file checked.

Every write is atomic. A checkpoint is written into `.tmp-checkpoint-<step>/`, flushed to disk, then renamed to
`checkpoint-<step>/`, so a directory of that name is always complete and a run killed mid-save leaves only a `.tmp-`
directory that resume ignores (and the next start removes). Old checkpoints are renamed away before they are deleted,
so a half-deleted one is never taken for complete either. The final adapter files are written the same way, each
renamed over its predecessor. A failed save (disk full) removes its own `.tmp-` directory and leaves every earlier
checkpoint as it was.

A checkpoint can still be damaged afterwards (a file truncated by a copy, deleted, or replaced): `--resume` reads
every file of the newest one and checks names, shapes and values before using any of it, and falls back to the newest
one that is whole (`resume_latest`), saying which and why; the run directory (qlora/training/rundir.py) then renames the
damaged ones aside for inspection.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qlora.adapters.lora import load_adapter, save_adapter
from qlora.config import Config
from qlora.config.run import OPTIMIZERS
from qlora.errors import DISK_FULL, EXIT_SAVE, ConfigError, Stop
from qlora.partial import ordinary_modes
from qlora.training.optimizer import keeps_masters, repage, stepped_params

STATE = "trainer_state.pt"
OPTIMIZER = "optimizer.pt"
FULL_WEIGHTS = "trainable.safetensors"
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
PATTERN = re.compile(r"^checkpoint-(\d+)$")


class SaveError(Stop):
    """A checkpoint or the adapter could not be written; the message says which, why, and what is intact."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_SAVE, message)


class Unusable(Exception):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong with it."""


def rng_state(device: torch.device) -> dict:
    """The generators a resumed run must continue: Python's, the CPU's and, on a CUDA run, its own GPU's only. A CPU
    run never touches CUDA (in a forked process that would fail; on a shared machine another process owns the other
    GPUs)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and device.type == "cuda":
        if isinstance(cuda, list):  # checkpoints written before this: every visible GPU's, by index
            cuda = cuda[device.index or 0]
        torch.cuda.set_rng_state(cuda, device)


def run_device(model: torch.nn.Module) -> torch.device:
    """Where the run trains: the device of its trainable parameters."""
    return next(p for p in model.parameters() if p.requires_grad).device


def save_weights(model: torch.nn.Module, cfg: Config, base_path: str, out_dir: Path) -> None:
    """The trained weights: a PEFT adapter for LoRA methods, every trainable tensor for full fine-tuning."""
    if cfg.quant.method == "full":
        state = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, str(out_dir / FULL_WEIGHTS), metadata={"format": "pt"})
    else:
        save_adapter(model, cfg.lora, base_path, out_dir)
    ordinary_modes(out_dir)  # safetensors writes its files 0600: the run's files are ordinary ones, as its others


def load_weights(model: torch.nn.Module, cfg: Config, ckpt: Path) -> None:
    """Load the weights saved in `ckpt`; on ValueError (names, shapes, nan) or OSError the model is as it was."""
    if cfg.quant.method == "full":
        state = load_file(str(ckpt / FULL_WEIGHTS))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state))[:3], sorted(set(state) - set(params))[:3]
            raise ValueError(f"{FULL_WEIGHTS} does not hold this model's weights (missing {missing}, unexpected "
                             f"{extra})")
        for name, tensor in state.items():
            if tensor.shape != params[name].shape or not torch.isfinite(tensor).all():
                raise ValueError(f"{FULL_WEIGHTS}: {name} has another shape than this model's, or holds nan/inf")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
    else:
        load_adapter(model, ckpt)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (the renames in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_cause(err: BaseException) -> OSError | None:
    """The OSError behind `err`: torch.save reports a full disk as "unexpected pos 704 vs 598", caused by one."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _reason(err: BaseException) -> str:
    """The root cause in words."""
    if (cause := _os_cause(err)) is not None:
        return cause.strerror
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def _fix(err: BaseException, run_dir: Path) -> str:
    """What to do about a failed save, by its cause: only a full disk is helped by freeing space."""
    code = getattr(_os_cause(err), "errno", None)
    if code in DISK_FULL:
        return "free some space"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {run_dir} writable"
    return "remove the cause"


def _torch_save(obj: object, path: Path) -> None:
    with open(path, "wb") as f:  # through a Python file, so a failed write surfaces as its OSError (ENOSPC, ...)
        torch.save(obj, f)


def _intact(run_dir: Path) -> str:
    latest = list_checkpoints(run_dir)
    return f"{latest[-1]} is intact" if latest else "there is no earlier checkpoint"


def remove_checkpoint(path: Path) -> None:
    """Delete a directory by first renaming it out of the checkpoint namespace: never half-deleted under its name. A
    link (a checkpoint moved to another disk) is removed, never what it points at: rmtree refuses a link, and the
    `.trash-` link it left failed the next start ("cannot be written (None)")."""
    if path.is_symlink():
        path.unlink()
        return
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, cfg: Config, base_path: str,
                    optimizer: torch.optim.Optimizer, scheduler: object, extra: dict) -> Path:
    """Write checkpoint-<step> atomically and keep only the newest `train.keep_checkpoints`."""
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_weights(model, cfg, base_path, tmp)
        _torch_save(optimizer.state_dict(), tmp / OPTIMIZER)
        _torch_save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(run_device(model)), **extra},
                    tmp / STATE)
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        if final.exists():  # a re-save of the same step: the old one goes only once the new one is whole
            remove_checkpoint(final)
        os.replace(tmp, final)
        _fsync(run_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception):
            raise SaveError(f"could not write checkpoint-{step} in {run_dir} ({_reason(err)}); {_intact(run_dir)}: "
                            f"{_fix(err, run_dir)}, then continue with --resume") from err
        raise  # KeyboardInterrupt, SystemExit: the .tmp- directory is gone, the rest untouched
    prune(run_dir, cfg.train.keep_checkpoints, final)
    return final


def prune(run_dir: Path, keep: int, newest: Path | None = None) -> None:
    """Delete the oldest complete checkpoints beyond the newest `keep`; `newest` (the one just written, or resumed
    from) is kept whatever else is. A resume calls it too: a kill between a checkpoint's rename and this pruning
    leaves one checkpoint too many, and a run resumed at its last step writes no checkpoint that would prune it."""
    others = [p for p in list_checkpoints(run_dir) if p != newest]
    for old in others[:max(0, len(others) - (keep - 1 if newest is not None else keep))]:
        remove_checkpoint(old)


def save_final(model: torch.nn.Module, cfg: Config, base_path: str, run_dir: Path) -> None:
    """The trained adapter at the top of the run dir; each file replaces its predecessor in one rename."""
    tmp = run_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_weights(model, cfg, base_path, tmp)
        files = sorted(tmp.iterdir(), key=lambda f: f.suffix == ".json")  # weights first, then the config
        for file in files:
            _fsync(file)
        for file in files:
            os.replace(file, run_dir / file.name)
        _fsync(run_dir)
    except Exception as err:
        raise SaveError(f"could not write the adapter to {run_dir} ({_reason(err)}); {_intact(run_dir)}: "
                        f"{_fix(err, run_dir)}, then rerun with --resume to write it") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every `checkpoint-<step>` directory, complete or not, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in checkpoint_dirs(run_dir) if (p / STATE).is_file() and (p / OPTIMIZER).is_file()]


def intact_line(run_dir: Path) -> str:
    """What an interrupted command says of `run_dir` (qlora.errors.Session.intact): its newest complete checkpoint."""
    latest = list_checkpoints(run_dir)
    return f"{latest[-1]} is intact" if latest else "no checkpoint was written"


def recorded(run_dir: Path, key: str) -> tuple[Path | None, object]:
    """What the newest readable checkpoint of `run_dir` (or `run_dir` itself, a checkpoint-N) recorded under `key`,
    as stored, and that checkpoint; (None, None) where no checkpoint, or one written before `key` was recorded."""
    for ckpt in [run_dir] if (run_dir / STATE).is_file() else reversed(list_checkpoints(run_dir)):
        try:
            return ckpt, _read(ckpt, STATE).get(key)
        except Unusable:  # a damaged checkpoint says nothing: the one before may
            continue
    return None, None


def recorded_rows(run_dir: Path) -> object:
    """The training and held-out row counts the newest readable checkpoint recorded (`recorded`), or None."""
    return recorded(run_dir, "rows")[1]


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
        raise Unusable(f"{name} is unreadable ({_reason(err)})") from err
    if not isinstance(value, dict):
        raise Unusable(f"{name} holds a {type(value).__name__}, not a state dict")
    return value


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
    if not isinstance(state.get("config", {}), dict):
        raise Unusable(f"{STATE}: config is not the run's settings (a dict of sections)")
    if not isinstance(state.get("rng_ranks", []), list):
        raise Unusable(f"{STATE}: rng_ranks is not a list of the processes' RNG states")


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
        raise Unusable(f"{weights} is unusable ({_reason(err)})") from err
    try:
        if optimizer_state is not None:
            load_optimizer(optimizer, optimizer_state)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], run_device(model))
    except Exception as err:  # well-formed files whose contents still do not fit (a state from another version)
        raise Unusable(f"its optimizer, scheduler or RNG state does not fit this run ({_reason(err)})") from err
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
                          "again with --overwrite")
    return None, {}, []
