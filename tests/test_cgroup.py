"""The host memory a container's limit leaves (qlora/memory/cgroup.py): read from real /proc and /sys trees of each
layout laid out under tmp_path, and once end to end, a run in a memory cgroup smaller than its step refused in one
line where this process may make one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora.memory.cgroup import ROOT, Limit, directories, memory_limit
from qlora.memory.readings import available_bytes, total_bytes

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
V1_NONE = "9223372036854771712"  # what v1 writes for no limit
MOUNTS = {"v1": "35 31 0:32 {root} /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n",
          "v2": "41 31 0:38 {root} /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n"}


def host(tmp: Path, kind: str, path: str, levels: dict[str, tuple[str, int, int]], mount_root: str = "/",
         total: int = 1024 * GIB, available: int = 900 * GIB) -> Path:
    """A root with /proc/meminfo, /proc/self/{cgroup,mountinfo} and a memory cgroup tree: `levels` maps each
    directory under the mount to (limit, usage, inactive file bytes)."""
    proc = tmp / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {total // 1024} kB\nMemAvailable: {available // 1024} kB\n")
    (proc / "self" / "cgroup").write_text(f"4:memory:{path}\n0::/\n" if kind == "v1" else f"0::{path}\n")
    (proc / "self" / "mountinfo").write_text(
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n" + MOUNTS[kind].format(root=mount_root))
    top = tmp / "sys/fs/cgroup" / ("memory" if kind == "v1" else "")
    files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file") if kind == "v1" else \
        ("memory.max", "memory.current", "inactive_file")
    for directory, (limit, usage, inactive) in levels.items():
        d = top / directory
        d.mkdir(parents=True, exist_ok=True)
        (d / files[0]).write_text(limit + "\n")
        (d / files[1]).write_text(f"{usage}\n")
        (d / "memory.stat").write_text(f"anon {usage - inactive}\n{files[2]} {inactive}\nactive_file 0\n")
    return tmp


def test_a_v2_job_leaves_its_limit_less_what_it_uses_beyond_page_cache_it_could_drop(tmp_path: Path) -> None:
    """A 64 GiB job on a 1 TiB node: the check weighs the job's room, not the node's MemAvailable."""
    root = host(tmp_path, "v2", "/job/step", {"": ("max", 500 * GIB, 0), "job": (str(64 * GIB), 20 * GIB, 4 * GIB),
                                               "job/step": ("max", 10 * GIB, 2 * GIB)})
    assert memory_limit(root) == Limit(64 * GIB, 48 * GIB)
    assert available_bytes(root) == 48 * GIB and total_bytes(root) == 64 * GIB


def test_the_tightest_of_the_cgroup_and_its_ancestors_bounds_it_in_v1(tmp_path: Path) -> None:
    root = host(tmp_path, "v1", "/slurm/uid_0/job_7", {
        "": (V1_NONE, 700 * GIB, 0), "slurm": (str(100 * GIB), 95 * GIB, GIB),
        "slurm/uid_0": (V1_NONE, 30 * GIB, GIB), "slurm/uid_0/job_7": (str(64 * GIB), 10 * GIB, GIB)})
    # The job's own limit is the least, but its parent's parent has only 100 - (95 - 1) = 6 GiB of room left.
    assert memory_limit(root) == Limit(64 * GIB, 6 * GIB)
    assert available_bytes(root) == 6 * GIB


def test_inside_a_container_namespace_the_mount_is_the_cgroup_itself(tmp_path: Path) -> None:
    """Docker without a cgroup namespace: /proc/self/cgroup names /docker/ID, and the mount's root is that path, so
    its files are at the mount point, not under /sys/fs/cgroup/memory/docker/ID."""
    root = host(tmp_path, "v1", "/docker/abc", {"": (str(2 * GIB), GIB, 0)}, mount_root="/docker/abc")
    assert memory_limit(root) == Limit(2 * GIB, GIB) and available_bytes(root) == GIB


def test_a_cgroup_outside_the_namespaces_mount_is_read_at_the_mount(tmp_path: Path) -> None:
    """A process moved out of a namespace's cgroup sees its path relative to that namespace (`0::/../other`): the
    mount is as near as it can read, never a directory above it."""
    root = host(tmp_path, "v2", "/../other", {"": (str(2 * GIB), GIB, 0)})
    (tmp_path / "sys/fs/other").mkdir(parents=True)
    for name, value in (("memory.max", GIB // 2), ("memory.current", 0)):  # outside the mount: not this process's
        (tmp_path / "sys/fs/other" / name).write_text(f"{value}\n")
    assert memory_limit(root) == Limit(2 * GIB, GIB)


@pytest.mark.parametrize("kind,limit", [("v2", "max"), ("v1", V1_NONE), ("v1", str(2**62))])
def test_no_limit_leaves_meminfo(tmp_path: Path, kind: str, limit: str) -> None:
    root = host(tmp_path, kind, "/user.slice", {"user.slice": (limit, GIB, 0)})
    assert memory_limit(root) is None
    assert available_bytes(root) == 900 * GIB and total_bytes(root) == 1024 * GIB


def test_a_level_unreadable_is_no_limit_and_room_is_never_below_zero(tmp_path: Path) -> None:
    root = host(tmp_path, "v2", "/a/b", {"a": (str(4 * GIB), 5 * GIB, 0), "a/b": (str(GIB), GIB // 2, 0)})
    assert memory_limit(root) == Limit(GIB, 0)  # a's usage past its limit (swap, a reclaim under way): no room
    (root / "sys/fs/cgroup/a/memory.current").unlink()
    (root / "sys/fs/cgroup/a/b/memory.max").write_text("garbage\n")
    assert memory_limit(root) is None and available_bytes(root) == 900 * GIB
    (root / "proc/self/mountinfo").unlink()
    assert memory_limit(root) is None


def made_cgroup(tmp_path: Path) -> Path:
    """A child of this process's memory cgroup with a limit of 1 GiB (v1 or v2), or skip with why not."""
    if os.geteuid() != 0:
        pytest.skip("making a memory cgroup needs root")
    why = "no memory cgroup hierarchy mounted"
    for v1, limit in ((True, "memory.limit_in_bytes"), (False, "memory.max")):
        found = directories(ROOT, v1)
        if not found:
            continue
        child = found[0] / f"qlora-test-{os.getpid()}"
        try:
            child.mkdir()
            (child / limit).write_text(str(GIB))
            return child
        except OSError as err:  # read-only, or v2 without the memory controller delegated to this cgroup
            why = f"{'v1' if v1 else 'v2'}: {err}"
            if child.exists():
                child.rmdir()
    pytest.skip(f"no writable memory cgroup here ({why})")


def run_in_cgroup(tmp_path: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository, in a memory cgroup of 1 GiB made for it (made_cgroup)."""
    child = made_cgroup(tmp_path)
    try:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
                              preexec_fn=lambda: (child / "cgroup.procs").write_text(str(os.getpid())))
    finally:
        child.rmdir()


def test_a_run_in_a_cgroup_smaller_than_its_step_is_refused_in_one_line(tmp_path: Path) -> None:
    """The tiny recipe at 8,192 tokens (its check wants ~3 GiB) in a 1 GiB cgroup of a host with ~20 GiB available:
    exit 2 and one line naming the limit. Reading /proc/meminfo alone passed it: it loaded and ran (its rows, ~60
    tokens, never fill 8,192), where a step that fills its rows meets the cgroup's OOM killer and SIGKILL."""
    got = run_in_cgroup(tmp_path, "qlora.train", "recipes/tiny.py", "--data.max_seq_len=8192", "--train.steps=2",
                        f"--output.dir={tmp_path / 'run'}")
    err = got.stderr.strip().splitlines()
    assert got.returncode == 2 and len(err) == 1, (got.returncode, got.stderr[-2000:])
    assert "GiB available within its memory cgroup's limit of 1.00 GiB (python -m qlora.memory" in err[0], err
    assert not (tmp_path / "run").exists()


def test_the_memory_report_on_cpu_is_drawn_against_the_cgroups_limit(tmp_path: Path) -> None:
    """`python -m qlora.memory RECIPE --train.device=cpu` drew a report in a 1 GiB cgroup against the whole machine's
    MemTotal (24 GiB here), and so said fits for steps the trainer there refuses."""
    got = run_in_cgroup(tmp_path, "qlora.memory", "recipes/tiny.py", "--methods=qlora", "--train.device=cpu",
                        "--data.max_seq_len=16384", "--json")
    assert got.returncode == 0, got.stderr[-2000:]
    report = json.loads(got.stdout)
    assert report["device_memory_bytes"] == GIB, report["device_memory"]
    assert report["device_memory"] == "this machine's memory cgroup's limit (1.00 GiB)"
    assert report["methods"]["qlora"]["fits"] is False and "[does not fit]" in got.stderr
