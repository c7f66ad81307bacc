"""What the optimizer in host memory takes there, and takes off the device."""

from __future__ import annotations


def host_bytes(state: int, trainable: int, update_temporaries: int) -> int:
    """Host bytes: the optimizer state, an fp32 master copy and an fp32 gradient per trained parameter (pinned), and
    the CPU update's temporaries. The device keeps only each parameter and, until the step, its fp32 gradient."""
    return state + 8 * trainable + update_temporaries


FORMULA = "+ 8 P_train (fp32 masters and their gradients, pinned) + the CPU update's temporaries (12 B x the largest " \
          "tensor)"
