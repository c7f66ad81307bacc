"""What liger-kernel's norm, SwiGLU and RoPE change in the estimate: nothing is added. Its RMSNorm saves the input
and one rstd per row where PyTorch's saves fp32 copies, and its SwiGLU recomputes silu(gate) in the backward instead
of keeping it, so the plain path's terms (qlora/memory/activations.py) are an upper bound for it."""
