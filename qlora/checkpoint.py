"""The run directory: checkpoints, the final adapter, run_config.json, and the check that a run dir is ours to use.

Every write is atomic. A checkpoint is written into `.tmp-checkpoint-<step>/`, flushed to disk, then renamed to
`checkpoint-<step>/`, so a directory of that name is always complete and a run killed mid-save leaves only a `.tmp-`
directory that resume ignores (and the next start removes). Old checkpoints are renamed away before they are deleted,
so a half-deleted one is never taken for complete either. The final adapter files are written the same way, each
renamed over its predecessor. A failed save (disk full) removes its own `.tmp-` directory and leaves every earlier
checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qlora.cli import DISK_FULL, EXIT_SAVE, Stop
from qlora.config import Config, ConfigError
from qlora.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter

STATE = "trainer_state.pt"
OPTIMIZER = "optimizer.pt"
FULL_WEIGHTS = "trainable.safetensors"
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
PATTERN = re.compile(r"^checkpoint-(\d+)$")
# What makes two runs the same run: the base and its quantisation, and the adapters' shape. Anything else (steps, lr)
# may change on --resume.
IDENTITY = ("model.path", "quant.method", "quant.quant_type", "lora.r", "lora.alpha", "lora.targets")


class SaveError(Stop):
    """A checkpoint or the adapter could not be written; the message says which, why, and what is intact."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_SAVE, message)


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


def load_weights(model: torch.nn.Module, cfg: Config, ckpt: Path) -> None:
    if cfg.quant.method == "full":
        state = load_file(str(ckpt / FULL_WEIGHTS))
        params = dict(model.named_parameters())
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


def _reason(err: BaseException) -> str:
    """The root cause in words: torch.save reports a full disk as "unexpected pos 704 vs 598", caused by an OSError."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def _torch_save(obj: object, path: Path) -> None:
    with open(path, "wb") as f:  # through a Python file, so a failed write surfaces as its OSError (ENOSPC, ...)
        torch.save(obj, f)


def _intact(run_dir: Path) -> str:
    latest = list_checkpoints(run_dir)
    return f"{latest[-1]} is intact" if latest else "there is no earlier checkpoint"


def _remove(path: Path) -> None:
    """Delete a directory by first renaming it out of the checkpoint namespace: never half-deleted under its name."""
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
            _remove(final)
        os.replace(tmp, final)
        _fsync(run_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception):
            raise SaveError(f"could not write checkpoint-{step} in {run_dir} ({_reason(err)}); {_intact(run_dir)}: "
                            "free some space, then continue with --resume") from err
        raise  # KeyboardInterrupt, SystemExit: the .tmp- directory is gone, the rest untouched
    for old in list_checkpoints(run_dir)[:-cfg.train.keep_checkpoints]:
        _remove(old)
    return final


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
        raise SaveError(f"could not write the adapter to {run_dir} ({_reason(err)}); {_intact(run_dir)}: free some "
                        "space, then rerun with --resume to write it") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := PATTERN.match(p.name)) and (p / STATE).is_file() and (p / OPTIMIZER).is_file()]
    return [p for _, p in sorted(found)]


def load_checkpoint(ckpt: Path, model: torch.nn.Module, cfg: Config, optimizer: torch.optim.Optimizer,
                    scheduler: object) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `ckpt`; return the trainer state (step, ...)."""
    try:
        load_weights(model, cfg, ckpt)
    except (OSError, ValueError) as err:  # another base, other lora.targets, or a damaged file
        raise ConfigError(f"{ckpt} does not fit this model ({str(err).splitlines()[0]}): resume with the recipe "
                          "that wrote it, or use --overwrite to start over") from err
    # weights_only: a checkpoint is data, never code (torch.load's pickle would run whatever it holds).
    optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True))
    state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"], run_device(model))
    return state


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _same_path(a: object, b: object) -> bool:
    norm = [os.path.abspath(os.path.expanduser(p)) if isinstance(p, str) and os.path.exists(p) else p for p in (a, b)]
    return norm[0] == norm[1]


def check_run_dir(run_dir: Path, cfg: Config, resume: bool, overwrite: bool) -> None:
    """Refuse an output dir that holds another run, or a run that would be started over by mistake. Reads only."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output.dir and --overwrite discards it: pass one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output.dir={run_dir} is a file: point output.dir at a directory")
    if overwrite or not run_dir.is_dir():
        return
    latest = list_checkpoints(run_dir)
    saved_path = run_dir / RUN_CONFIG
    if saved_path.is_file():
        try:
            saved = _flat(json.loads(saved_path.read_text()))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{saved_path} is unreadable ({err}): use another output.dir, or --overwrite") from err
        ours = _flat(cfg.to_dict())
        keys = [k for k in IDENTITY if not (k.startswith("lora.") and cfg.quant.method == "full")]
        differ = [f"{k}={saved.get(k)!r}, this recipe {ours[k]!r}" for k in keys
                  if not (_same_path(saved.get(k), ours[k]) if k == "model.path" else saved.get(k) == ours[k])]
        if differ:
            raise ConfigError(f"output.dir={run_dir} holds another run ({'; '.join(differ)}): use another "
                              "output.dir, or --overwrite to replace that run")
        if resume:
            changed = [f"{k} {saved[k]!r} -> {ours[k]!r}" for k in ours if k in saved and saved[k] != ours[k]]
            if changed:
                print(f"resuming with changed settings: {', '.join(changed)}")
    if latest and not resume:
        raise ConfigError(f"output.dir={run_dir} already holds a run (up to {latest[-1].name}): pass --resume to "
                          "continue it, or --overwrite to start over")


def start_run(run_dir: Path, cfg: Config, overwrite: bool) -> None:
    """The first write of a run, once every input is validated: clear a replaced run, record the config."""
    try:
        if overwrite and run_dir.is_dir():
            for path in run_dir.iterdir():
                if PATTERN.match(path.name):
                    _remove(path)  # renamed first: a kill mid-delete never leaves a partial checkpoint-N
                elif path.name in (RUN_CONFIG, METRICS, ADAPTER_WEIGHTS, ADAPTER_CONFIG, FULL_WEIGHTS, "memory.json"):
                    path.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        for path in run_dir.iterdir():  # what a killed run left half-written: never read, so only in the way
            if path.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        tmp = run_dir / f".tmp-{RUN_CONFIG}"
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        os.replace(tmp, run_dir / RUN_CONFIG)
    except OSError as err:
        if err.errno in DISK_FULL:
            raise  # not the user's choice of directory: reported as a full disk, exit 5
        raise ConfigError(f"output.dir={run_dir} cannot be written ({err.strerror}): choose another output.dir") \
            from err
