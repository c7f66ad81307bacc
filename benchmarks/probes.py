"""Measurements that each run in a child process of their own, bounded in time, kept as soon as they finish.

A benchmark on a borrowed GPU runs in commands of at most ten minutes: a probe that hangs must not take the rest
with it, and a command cut short must leave every probe that finished. So each probe is a child process (a clean
allocator, an honest peak) killed with its process group when it outlives its timeout; its result is appended to
`<stem>.probes.jsonl` the moment it is known; and a rerun with the same setup reads that file and measures only
what is missing (`--fresh` starts over). The parent never touches CUDA: a context of its own would be counted in
every child's device-wide figures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUT_SHORT = 3  # exit status of a benchmark that stopped at its --deadline: run it again to go on from its log


def run_child(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run `cmd` in a process group of its own; return the JSON after the last `RESULT ` line of its stdout, or
    {"error": ...}. Past `timeout` seconds the whole group is killed: {"error": "timed out ...", "timed_out": True}.
    A SIGTERM to this process (benchmarks/gpu.py at the end of its budget) kills the child's group first: a probe
    left running would hold the GPU."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True, env=env)

    def stop(signum: int, frame: object) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s", "timed_out": True}
    finally:
        signal.signal(signal.SIGTERM, previous)
    found = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and found:
        return json.loads(found[-1].removeprefix("RESULT "))
    tail = (out + err).strip().splitlines()[-12:]
    print("\n".join(f"   | {line}" for line in tail), flush=True)
    if "out of memory" in err.lower() or "OutOfMemoryError" in err:
        return {"error": "out of memory", "oom": True}
    return {"error": tail[-1] if tail else f"exit {proc.returncode}"}


class ProbeLog:
    """`path` (JSON lines): each finished probe's key, result and seconds, under the setup it was measured with."""

    def __init__(self, path: Path, setup: dict, fresh: bool = False) -> None:
        self.path, self.setup = path, setup
        self.done: dict[str, dict] = {}
        if fresh and path.exists():
            path.unlink()
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: measured again
                    continue
                if entry.get("setup") == setup:
                    self.done[entry["key"]] = entry

    def get(self, key: str) -> dict | None:
        entry = self.done.get(key)
        return entry["result"] if entry else None

    def put(self, key: str, result: dict, seconds: float) -> None:
        entry = {"key": key, "setup": self.setup, "result": result, "seconds": round(seconds, 1)}
        self.done[key] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def longest(self) -> float:
        return max((e["seconds"] for e in self.done.values()), default=0.0)


class Deadline:
    """The time left of a run's `budget` seconds (None: unbounded). A probe starts only when the longest one so far
    would still finish, and its timeout is what is left."""

    def __init__(self, budget: float | None) -> None:
        self.end = None if budget is None else time.monotonic() + budget
        self.hit = False
        """A probe was left out or stopped for lack of time."""

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def allows(self, expected: float) -> bool:
        if self.left() > max(expected, 1.0):
            return True
        self.hit = True
        return False


def measured(log: ProbeLog, deadline: Deadline, key: str, cmd: list[str], probe_timeout: float,
             env: dict[str, str] | None = None) -> dict | None:
    """The probe `key`: from the log, or run now and logged; None when the deadline leaves no room for it."""
    known = log.get(key)
    if known is not None:
        print(f"   {key}: from {log.path.name}: {known}", flush=True)
        return known
    if not deadline.allows(min(probe_timeout, log.longest())):
        print(f"   {key}: not run, {deadline.left():.0f} s left of the deadline", flush=True)
        return None
    started, limit = time.monotonic(), min(probe_timeout, deadline.left())
    result = run_child(cmd, limit, env)
    seconds = time.monotonic() - started
    if result.get("timed_out") and limit < probe_timeout:  # cut by the deadline, not too slow: a rerun tries again
        print(f"   {key}: stopped at the deadline after {seconds:.0f} s", flush=True)
        deadline.hit = True
        return None
    log.put(key, result, seconds)
    print(f"   {key}: {result} ({seconds:.0f} s)", flush=True)
    return result


def child_command(script: str, argv: list[str]) -> list[str]:
    """`python benchmarks/<script> ARGV` with this interpreter."""
    return [sys.executable, str(ROOT / "benchmarks" / script), *argv]
