"""The host memory a container's limit leaves this process: its memory cgroup's and each ancestor's, v1 or v2.

In a container or a cluster job with a memory limit (Docker --memory, Kubernetes, SLURM's cgroups: a 64 GiB job on a
1 TB node) /proc/meminfo shows the whole machine, and the kernel's OOM killer ends a process that outgrows the limit
with SIGKILL, no line. The check before loading (preflight.py) weighs the least of the two (readings.available_bytes).

Found as the JVM's container support finds it (openjdk hotspot os/linux/cgroupSubsystem_linux.cpp): the process's
cgroup path from /proc/self/cgroup (`0::/path` for v2, the line naming `memory` for v1), the hierarchy's mount from
/proc/self/mountinfo, whose root is the part of that path the mount already is (a container's namespace mounts its
own cgroup as the root). Room = limit - (usage - inactive file pages), the same reclaimable page cache that
MemAvailable counts as available and that the kernel drops before it kills. A file missing or unreadable is a level
with no limit known: the answer is never smaller for what could not be read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

ROOT = Path("/")
NO_LIMIT = 2**62  # v1 writes "no limit" as 9223372036854771712 (LONG_MAX rounded down to a page); anything this high


class Limit(NamedTuple):
    """The least of the limits over the cgroup and its ancestors, and the least room one of them leaves, in bytes."""
    limit: int
    room: int


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _stat(text: str | None, key: str) -> int:
    """One field of a memory.stat; 0 where it is absent, which only makes the room smaller."""
    found = re.search(rf"^{key} (\d+)$", text or "", re.M)
    return int(found.group(1)) if found else 0


def _number(text: str | None) -> int | None:
    """A limit or usage file's value; None where it is unreadable or says there is no limit ("max", or v1's huge)."""
    text = (text or "").strip()
    if not text.isdigit():
        return None
    value = int(text)
    return value if value < NO_LIMIT else None


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline or backslash in a path as an octal escape (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount(root: Path, v1: bool) -> tuple[str, str] | None:
    """(the hierarchy's root inside the cgroup tree, where it is mounted) for the memory controller's v1 hierarchy,
    or v2's unified one; None where it is not mounted."""
    for line in (_read(root / "proc/self/mountinfo") or "").splitlines():
        fields, _, after = line.partition(" - ")
        fields, after = fields.split(), after.split()
        if len(fields) < 5 or len(after) < 3:
            continue
        if (after[0] == "cgroup" and "memory" in after[2].split(",")) if v1 else after[0] == "cgroup2":
            return _unescape(fields[3]), _unescape(fields[4])
    return None


def directories(root: Path, v1: bool) -> list[Path]:
    """The directories of the process's memory cgroup and its ancestors up to the mount, innermost first."""
    path = None
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        _, controllers, rest = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if (v1 and "memory" in controllers.split(",")) or (not v1 and line.startswith("0::")):
            path = rest
    mount = _mount(root, v1)
    if path is None or mount is None:
        return []
    inside, mounted = mount
    # The part of the path below the mount's root; a path outside it (another namespace's, "/../x") is the mount.
    outside = inside != "/" and path != inside and not path.startswith(inside.rstrip("/") + "/")
    if outside or ".." in path.split("/"):
        path = inside
    below = path[len(inside):] if inside != "/" else path
    top = root / mounted.lstrip("/")
    here = top / below.strip("/") if below.strip("/") else top
    return [here, *[p for p in here.parents if p == top or top in p.parents]]


def _level(directory: Path, v1: bool) -> Limit | None:
    """One cgroup's limit and the room it leaves; None where it has none or a file could not be read."""
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file") if v1 else \
        ("memory.max", "memory.current", "inactive_file")
    limit, usage = _number(_read(directory / names[0])), _number(_read(directory / names[1]))
    if limit is None or usage is None:
        return None
    used = max(0, usage - _stat(_read(directory / "memory.stat"), names[2]))
    return Limit(limit, max(0, limit - used))


def memory_limit(root: Path = ROOT) -> Limit | None:
    """The least limit and room of the process's memory cgroup and its ancestors, v1 and v2 alike (a hybrid host has
    both; the memory controller is in one), with /proc and /sys read under `root`; None where no limit is known."""
    levels = [level for v1 in (True, False) for d in directories(root, v1) if (level := _level(d, v1))]
    if not levels:
        return None
    return Limit(min(level.limit for level in levels), min(level.room for level in levels))
