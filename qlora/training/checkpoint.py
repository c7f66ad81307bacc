"""Checkpoints and the final adapter, written atomically; the weights and random state each in the one form it is
read back in (`load_weights`, `set_rng_state`); which checkpoints a run directory holds.

Every write is atomic. A checkpoint is written into `.tmp-checkpoint-<step>/`, flushed to disk (with the run's
run_config.json, metrics.jsonl and LoftQ shifts, which a resume reads with it), then renamed to `checkpoint-<step>/`,
so a directory of that name is always complete and a run killed mid-save leaves only a `.tmp-` directory that resume
ignores (and the next start removes). Old checkpoints are renamed away before they are deleted,
so a half-deleted one is never taken for complete either. The final adapter files are written the same way, each
renamed over its predecessor. A failed save (disk full) removes its own `.tmp-` directory and leaves every earlier
checkpoint as it was.

What a checkpoint holds is read back, every file checked, by qlora/training/restore.py.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qlora.adapters.loftq import SHIFTS
from qlora.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from qlora.config import Config
from qlora.errors import EXIT_SAVE, ROOM_FIX, ConfigError, Stop
from qlora.partial import ordinary_modes, save_tensors, sync

STATE = "trainer_state.pt"
OPTIMIZER = "optimizer.pt"
FULL_WEIGHTS = "trainable.safetensors"
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
PATTERN = re.compile(r"^checkpoint-(\d+)$")
# All a checkpoint of ours holds (save_checkpoint). Hugging Face's Trainer writes checkpoint-N/ folders too, with
# trainer_state.json, optimizer.pt and adapter_model.safetensors: taken for a damaged one of ours, --overwrite deleted
# it, and a run beside it said "pass --resume to continue it".
CHECKPOINT_FILES = (STATE, OPTIMIZER, ADAPTER_WEIGHTS, ADAPTER_CONFIG, FULL_WEIGHTS)
# What a file browser leaves in a folder it shows (macOS Finder; its ._NAME twins on a drive of another format;
# Windows Explorer): a checkpoint of ours that holds one is ours still.
BROWSER_FILES = re.compile(r"\.DS_Store|\._.+|Thumbs\.db|desktop\.ini")


class SaveError(Stop):
    """A checkpoint or the adapter could not be written; the message says which, why, and what is intact."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_SAVE, message)


def rng_state(device: torch.device) -> dict:
    """The generators a resumed run must continue: the CPU's and, on a CUDA run, its own GPU's only. A CPU run never
    touches CUDA (in a forked process that would fail; on a shared machine another process owns the other GPUs).
    Python's `random` is none of them: nothing in a run draws from it (tests/test_resume.py)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])  # Python's, in a checkpoint written before it was dropped, is left unread
    cuda = state.get("cuda")
    if cuda is not None and device.type == "cuda":
        if isinstance(cuda, list):  # checkpoints written before this: every visible GPU's, by index
            cuda = cuda[device.index or 0]
        torch.cuda.set_rng_state(cuda, device)


def run_device(model: torch.nn.Module) -> torch.device:
    """Where the run trains: the device of its trainable parameters."""
    return next(p for p in model.parameters() if p.requires_grad).device


def save_weights(model: torch.nn.Module, cfg: Config, base_path: str, out_dir: Path, step: int) -> None:
    """The trained weights: a PEFT adapter for LoRA methods, every trainable tensor for full fine-tuning; the step
    they are of in the file's header (`weights_step`)."""
    metadata = {"step": str(step)}
    if cfg.quant.method == "full":
        state = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_tensors(state, out_dir / FULL_WEIGHTS, metadata)
    else:
        save_adapter(model, cfg.lora, base_path, out_dir, metadata)
    ordinary_modes(out_dir)  # safetensors writes its files 0600: the run's files are ordinary ones, as its others


def weights_file(cfg: Config) -> str:
    """The name of the trained weights' file `save_weights` writes for `cfg`'s method."""
    return FULL_WEIGHTS if cfg.quant.method == "full" else ADAPTER_WEIGHTS


def weights_step(path: Path) -> int | None:
    """The step the weights file `path` was saved at; None for one written before it was recorded, or unreadable
    (its loading says why)."""
    try:
        with safe_open(str(path), "pt") as f:
            step = (f.metadata() or {}).get("step", "")
    except Exception:  # a damaged file: left to the load that names it
        return None
    return int(step) if step.isdigit() else None


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


def _os_cause(err: BaseException) -> OSError | None:
    """The OSError behind `err`: torch.save reports a full disk as "unexpected pos 704 vs 598", caused by one."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def root_cause(err: BaseException) -> str:
    """The root cause in words."""
    if (cause := _os_cause(err)) is not None:
        return cause.strerror
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def _fix(err: BaseException, run_dir: Path) -> str:
    """What to do about a failed save, by its cause: only a full disk is helped by freeing space (a file-size limit,
    by raising it)."""
    code = getattr(_os_cause(err), "errno", None)
    if code in ROOM_FIX:
        return ROOM_FIX[code]
    if code == errno.EROFS:
        return f"remount the file system of {run_dir} read-write"
    if code in (errno.EACCES, errno.EPERM):
        return f"make {run_dir} writable"
    return "remove the cause"


def torch_save(obj: object, path: Path) -> None:
    """torch.save of `obj` to `path` (tests replace it with a write the system refuses)."""
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
        save_weights(model, cfg, base_path, tmp, step)
        torch_save(optimizer.state_dict(), tmp / OPTIMIZER)
        torch_save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(run_device(model)), **extra},
                   tmp / STATE)
        # With it, what a resume from it reads beside it: run_config.json, metrics.jsonl to the length it records
        # (a power cut could keep the checkpoint yet lose those lines, and --resume refuses a file cut short), and
        # the LoftQ shifts its base was quantised with (without them no reload rebuilds that base).
        beside = [run_dir / name for name in (RUN_CONFIG, METRICS, SHIFTS) if (run_dir / name).is_file()]
        for file in [*tmp.iterdir(), *beside]:
            sync(file)
        sync(tmp)
        if final.exists():  # a re-save of the same step: the old one goes only once the new one is whole
            remove_checkpoint(final)
        os.replace(tmp, final)
        sync(run_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception):
            raise SaveError(f"could not write checkpoint-{step} in {run_dir} ({root_cause(err)}); {_intact(run_dir)}: "
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


def save_final(model: torch.nn.Module, cfg: Config, base_path: str, run_dir: Path, step: int) -> None:
    """The trained adapter at the top of the run dir, of `step`; each file replaces its predecessor in one rename."""
    tmp = run_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_weights(model, cfg, base_path, tmp, step)
        files = sorted(tmp.iterdir(), key=lambda f: f.suffix == ".json")  # weights first, then the config
        for file in files:
            sync(file)
        for file in files:
            os.replace(file, run_dir / file.name)
        sync(run_dir)
    except Exception as err:
        raise SaveError(f"could not write the adapter to {run_dir} ({root_cause(err)}); {_intact(run_dir)}: "
                        f"{_fix(err, run_dir)}, then rerun with --resume to write it") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_ours(ckpt: Path) -> None:
    """Refuse a folder under a checkpoint's name (checkpoint-N, or one set aside as damaged) that this trainer did not
    write, before a run resumes, sets aside, prunes or deletes it as its own: one holding a name ours never hold, or
    without our trainer_state.pt in a directory without our run_config.json. Ours, damaged since (a file cut short or
    removed), pass."""
    try:
        names = sorted(p.name for p in ckpt.iterdir())
    except OSError as err:
        raise ConfigError(f"{ckpt} cannot be read ({err.strerror or err}): make it readable, move it out of "
                          f"{ckpt.parent}, or use another output.dir") from err
    other = [name for name in names if name not in CHECKPOINT_FILES and not BROWSER_FILES.fullmatch(name)]
    if other:
        why = f"it holds {', '.join(other[:3])}{', ...' if len(other) > 3 else ''}, which ours never hold"
    elif STATE not in names and not (ckpt.parent / RUN_CONFIG).is_file():
        why = f"it holds no {STATE}, and no {RUN_CONFIG} lies beside it"
    else:
        return
    raise ConfigError(f"{ckpt} is another tool's checkpoint, not this trainer's ({why}), which a run here would set "
                      f"aside or delete as its own: move it out of {ckpt.parent}, or use another output.dir")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every `checkpoint-<step>` directory, complete or not, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in checkpoint_dirs(run_dir) if (p / STATE).is_file() and (p / OPTIMIZER).is_file()]


def intact_line(run_dir: Path, replacing: bool = False) -> str:
    """What an interrupted command says of `run_dir` (qlora.errors.Session.intact): its newest complete checkpoint.
    `replacing`: --overwrite, before the old run is cleared (rundir.start_run): its checkpoints are not this run's, and
    "intact: continue with --resume" would continue it, not start this one."""
    latest = list_checkpoints(run_dir)
    if latest and replacing:
        return f"nothing of this run was written, and the run it replaces ({latest[-1]} the newest) is as it was"
    return f"{latest[-1]} is intact" if latest else "no checkpoint was written"
