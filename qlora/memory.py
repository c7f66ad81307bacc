"""Memory: peak bytes per named phase of a run.

CUDA: torch's allocator counters, reset at each phase. CPU: the process's peak resident set (VmHWM), which Linux
lets us reset by writing 5 to /proc/self/clear_refs.
"""

from __future__ import annotations

from pathlib import Path

import torch

PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_field(name: str) -> int:
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_bytes(device: torch.device) -> int:
    """Peak since the last reset: reserved bytes on CUDA, resident bytes on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    return _vm_field("VmHWM")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            CLEAR_REFS.write_text("5")
        except OSError:  # not Linux, or not permitted: the peak then spans the whole process
            pass


class PhaseTracker:
    """Records the peak of each named phase; a phase ends when the next is marked."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phases: dict[str, int] = {}
        reset_peak(device)

    def mark(self, phase: str) -> None:
        self.phases[phase] = max(self.phases.get(phase, 0), peak_bytes(self.device))
        reset_peak(self.device)
