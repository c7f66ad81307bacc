"""What the optimizer in host memory takes there, and takes off the device."""

from __future__ import annotations


def host_bytes(state: int, trainable: int, update_temporaries: int, staged_bytes: int = 0) -> int:
    """Host bytes: the optimizer state, an fp32 master copy and an fp32 gradient per trained parameter (pinned), and
    the CPU update's temporaries; with one process, a pinned 16-bit copy of each gradient (`staged_bytes` per
    element) on its way from the backward. The device keeps only each parameter and, with several processes, its
    fp32 gradient until the step."""
    return state + (8 + staged_bytes) * trainable + update_temporaries


FORMULA = "+ 8 P_train (fp32 masters and their gradients, pinned) + the CPU update's temporaries (12 B x the largest " \
          "tensor)"
STAGED_FORMULA = "+ P_train e (each 16-bit gradient as the backward sums it, pinned)"
