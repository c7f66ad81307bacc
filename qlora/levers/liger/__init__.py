"""liger-kernel's fused RMSNorm, SwiGLU and RoPE on each decoder layer (train.liger_kernels), CUDA only."""
