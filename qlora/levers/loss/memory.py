"""What the loss's backward holds beyond the layers, by how the head and cross-entropy run: all at once, in chunks, or
fused by liger-kernel. (The final norm and the labels are the loss's own: qlora/memory/activations.py.)"""

from __future__ import annotations

import math

from qlora.levers.lever import RunConfig


def logits_bytes(cfg: RunConfig, method: str, device: str, positions: int, vocab: int, hidden: int,
                 e: int) -> tuple[int, str]:
    """(bytes, formula) of the logits' part of the loss backward for `positions` predicted positions (N)."""
    t, N, V, h = cfg.train, positions, vocab, hidden
    if t.liger_ce and device == "cuda":  # fused: chunks of ~N h / V tokens' logits, the input gradients
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(N / math.ceil(V / h)))))
        return 2 * chunk * V * e + N * h * e, f"2 c V e + N h e (liger chunks of c={chunk})"
    n = min(N, t.loss_chunk_size) if t.loss_chunk_size > 0 else N
    # Log-softmax keeps fp32 log-probs; its backward holds them with the incoming and outgoing fp32 gradients.
    total, formula = 12 * n * V, f"12 {'min(N, chunk)' if t.loss_chunk_size > 0 else 'N'} V"
    if method == "full" or t.loss_chunk_size > 0:  # lm_head's input: its weight gradient, or the chunks, keep it
        total, formula = total + N * h * e, formula + " + N h e"
    return total, formula
