"""Where a benchmark result came from: the command, the date, package versions, the qlora commit and the machine.

Every report in benchmarks/results/ opens with these, so a number can be traced to the run that produced it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "bitsandbytes", "peft", "safetensors", "liger-kernel")


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line that ran `script` (benchmarks/<script>), as a user would type it."""
    return shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def git_commit() -> str:
    """The short commit, marked when tracked files other than results (which a run rewrites) differ from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:  # no git on this machine (a GPU box given a copy of the tree)
            return ""

    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results",
                  ":!memory_reports")
    commit = git("rev-parse", "--short", "HEAD")
    return commit + (" + uncommitted changes" if commit and changed else "")


def versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on (absent ones left out), and the qlora commit."""
    found = {}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return {**found, "qlora": git_commit()}


def gpu() -> str:
    """The GPU's name and memory from nvidia-smi: a benchmark's parent process must not create a CUDA context of its
    own, which would count in its children's device-wide figures."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        out = []
    return out[0].strip() if out else "a CUDA GPU (nvidia-smi not found)"


def machine(device: str) -> str:
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text(encoding="utf-8").splitlines()
                    if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores, torch using {torch.get_num_threads()} threads" + \
        (f", {gpu()}" if device == "cuda" else "")


def record(script: str, device: str, argv: list[str] | None = None) -> dict[str, object]:
    """Taken once per run: the same values go into the report's header and its JSON."""
    return {"command": command(script, argv), "date": now(), "versions": versions(), "machine": machine(device)}


def header(title: str, prov: dict, device: str, cpu_caveat: str | None = None) -> list[str]:
    """A report's first lines from `record`: title, command, date, versions, machine, and on CPU what the numbers do
    not say."""
    lines = [f"# {title}", "", f"- command: `{prov['command']}`", f"- date: {prov['date']}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in prov['versions'].items())}",
             f"- machine: {prov['machine']}", ""]
    if device == "cpu" and cpu_caveat:
        lines += [cpu_caveat, ""]
    return lines


def write_result(stem: Path, result: dict, text: str, quiet: bool = False) -> None:
    """`stem`.json (the record) and `stem`.md (the report), each replaced whole (a kill mid-write leaves the last)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = {stem.with_suffix(".json"): json.dumps(result, indent=2) + "\n", stem.with_suffix(".md"): text}
    for path, content in files.items():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    if not quiet:
        print(f"wrote {stem}.json and .md")
