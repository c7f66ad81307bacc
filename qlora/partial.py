"""Outputs written aside and renamed into place, and what a killed writer left of them; safetensors files written so
that a failed write is the OSError it is (`save_tensors`).

A checkpoint built from GGUF, a merged model, a GGUF export and a memory report are each written under a hidden name
beside their path (`.NAME.partial-PID-...`, `.NAME.building-PID`), then renamed: the path holds the whole output or
the earlier one, never half of one. A kill -9 runs no cleanup, so the hidden copy stays: a whole model's size each
(140 GB for a 70B merge). The pid in its name tells a later writer a copy of a live process, which it keeps, from
one of a process that is gone, which it removes and names.

The rename of a new file never replaces one that appeared while it was written (`rename_new`), and the folders a
writer creates for its output are removed again if it fails (`new_folders`). The files of one memory report are
written aside together and renamed one after another, the .json last (`write_together`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from qlora.errors import ConfigError

if TYPE_CHECKING:
    import torch

NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK)  # vfat, some FUSE and network mounts
TAKEN = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)  # what a rename onto a name in use meets


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file (`metadata` in its header beside "format"), with a failed write (a full disk, a
    read-only one) raised as the OSError it is, naming `path`: safetensors reports it as a SafetensorError whose text
    ends in "(os error 28)", which ended a merge in a traceback, and a checkpoint in `remove the cause` where the fix
    is to free some space."""
    # imported here: qlora.base.build imports this module, and `--help` answers before torch is imported
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    except SafetensorError as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from err


def sync(path: Path | str) -> None:
    """Flush a file's data, or a directory's entries (the renames in it), to disk; where the file system cannot
    (EINVAL: some FUSE and network mounts for a directory), the write stands as it is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def sync_tree(path: Path | str) -> None:
    """`sync` a file, or a directory with everything in it, before a rename names it whole: the kernel may write a
    rename to disk before the data it names (ext4 with delalloc, xfs), so after a power cut the name could stand on
    a file of zeros or half of one, which a kill -9 alone never leaves. Checkpoints did it; merges, exports, reports
    and eval results did not."""
    if os.path.isdir(path) and not os.path.islink(path):
        for child in os.scandir(path):
            sync_tree(child.path)
    sync(path)


def write_aside(path: Path, data: str | bytes | dict[str, torch.Tensor], hidden: str | None = None) -> None:
    """Write `data` (text, bytes, or tensors as a safetensors file) under a hidden name beside `path` (through a
    symlink, to its target, as write_text would), then rename it into place: a kill leaves the earlier file whole,
    never half of one. `hidden`: that name, where another than `.NAME.partial-PID` is looked for (a run directory's
    `.tmp-NAME`, which the next run removes)."""
    target = path.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(hidden or f".{target.name}.partial-{os.getpid()}")
    try:
        if isinstance(data, dict):
            save_tensors(data, tmp)
        else:
            tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")
        sync(tmp)
        os.replace(tmp, target)
        sync(target.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        name_output(err, tmp, path)
        raise


def rename_new(tmp: Path | str, out: Path, flag: str) -> None:
    """Give the whole output `tmp` (a file or a directory) the name `out`, which must still be free (for a directory:
    free or an empty directory). Checked as the command started, it may have been taken since (another export to the
    same path, minutes in), and os.replace would overwrite a file there. A hard link takes a name only if it is free,
    and rename(2) puts a directory only where nothing, or an empty directory, is; where the file system has no hard
    links, the name is checked again just before."""
    sync_tree(tmp)
    try:
        if os.path.isdir(tmp):
            os.rename(tmp, out)
            sync(Path(out).parent)
            return
        try:
            os.link(tmp, out)
        except OSError as err:
            if err.errno not in NO_HARD_LINKS:
                raise
            if os.path.lexists(out):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(out)) from None
            os.replace(tmp, out)
            sync(Path(out).parent)
            return
        os.unlink(tmp)
        sync(Path(out).parent)
    except OSError as err:
        if err.errno in TAKEN:
            raise ConfigError(f"{flag}={out} appeared while this command wrote it (another command writing the same "
                              "path?): it is left as it is; choose another path, or delete it and run again") from None
        raise


@contextlib.contextmanager
def new_folders(folder: Path) -> Iterator[None]:
    """Create `folder` and the parents it lacks for the block; if the block fails, remove those it created that are
    still empty: a command that wrote nothing leaves no empty folder behind (--out-dir on a full disk did)."""
    made = []
    for path in (folder, *folder.parents):  # deepest first; from the first that exists up, all exist
        if os.path.lexists(path):
            break
        made.append(path)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for path in made:
            with contextlib.suppress(OSError):  # no longer empty: another writer's now
                path.rmdir()
        raise


def write_together(out_dir: Path, writers: dict[str, Callable[[Path], object]]) -> None:
    """Write each file of a report (its name -> a function that writes it at a path) under a hidden temporary name in
    out_dir, then rename them into place, in the order given; on failure remove the temporaries.

    The files are one report: written in place, a kill (the plot takes most of the time) would leave a new .json
    beside an old .md, or a 0-byte .png. Written aside, a kill while writing leaves the old set as it was, and only a
    kill between the renames (microseconds) can mix them. The .json goes last: it is the record a tool reads, with the
    command that made it, so a .json is never newer than the .md and .png beside it.
    """
    for name in writers:  # met at its rename, a directory failed the report after the files before it were renamed
        if (out_dir / name).is_dir() and not (out_dir / name).is_symlink():  # a link is replaced, as a file is
            raise ConfigError(f"{out_dir / name} is a directory, where the report writes its {Path(name).suffix} "
                              "file: move it away, or choose another --out-dir")
    with new_folders(out_dir):  # removed again if the report fails (a full disk left it empty)
        for stem in {Path(name).stem for name in writers}:
            remove_abandoned(out_dir / stem)  # a killed report's temporaries
        # The suffix stays last: matplotlib picks the image format from it.
        temps = {name: out_dir / f".{Path(name).stem}.partial-{os.getpid()}{Path(name).suffix}" for name in writers}
        name = None
        try:
            for name, write in writers.items():
                write(temps[name])
                sync(temps[name])
            for name, tmp in temps.items():
                os.replace(tmp, out_dir / name)
            sync(out_dir)
        except BaseException as err:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)
            if name is not None:
                name_output(err, temps[name], out_dir / name)
            raise


def name_output(err: BaseException, hidden: Path | str, out: Path) -> None:
    """Make an OSError met while writing `hidden` (the hidden copy of `out`, or a file inside it) name `out`, the path
    the user gave: the hidden copy is gone by the time the line is read, and a write the disk refused as the file was
    closed (a full disk) names no file at all ("could not write a file")."""
    if isinstance(err, OSError) and (err.filename is None or str(err.filename).startswith(str(hidden))):
        err.filename = str(out)


def partial_prefix(out: Path) -> str:
    """The start of the hidden name `out` is written under until it is whole: `.NAME.partial-PID-`, then mkdtemp's
    or mkstemp's random tail."""
    return f".{out.name}.partial-{os.getpid()}-"


def remove_abandoned(out: Path, kind: str = "partial") -> None:
    """Remove the hidden copies of `out` (`.NAME.KIND-PID...`, and what a writer inside one named after it) whose
    process is gone, saying so; a live one's is kept.

    A process alive in another pid namespace (another container writing into the same directory) looks gone here, as
    would one on another machine sharing the filesystem: those cases are not supported. A reused pid keeps a
    leftover one more time, which is the safe side."""
    if not out.parent.is_dir():
        return
    tail = r"(-.+|\..+)" + ("?" if kind == "building" else "")  # mkdtemp's, or a report's suffix; a build has none
    pattern = re.compile(rf"\.+{re.escape(out.name)}\.{kind}-([0-9]+){tail}")
    for path in sorted(out.parent.iterdir()):
        found = pattern.fullmatch(path.name)
        if found is None or int(found[1]) == 0 or process_alive(int(found[1])):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except FileNotFoundError:
            continue  # another writer removed it first
        except OSError as err:
            print(f"could not remove {path.name} left by a run that was killed ({err.strerror}): delete it to free "
                  "its space")
            continue
        print(f"removed {path.name} left by a run that was killed")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: delivers nothing, only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # OverflowError: beyond any pid
        return False
    except PermissionError:
        return True  # another user's process
    return True


def ordinary_modes(path: Path) -> None:
    """Give `path` (a file, or a directory and the files in it) the mode open() or mkdir() would: 0644 and 0755 under
    the usual umask of 022. mkdtemp and mkstemp make them private, and safetensors writes its files 0600."""
    umask = os.umask(0o022)  # reading the umask means setting it: put it back at once
    os.umask(umask)
    for item in [path, *path.iterdir()] if path.is_dir() else [path]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
