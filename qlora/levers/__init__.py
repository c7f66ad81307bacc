"""Switches that trade compute for memory or memory for speed, each a recipe field (`train.*`, `model.*`).

    offload.py  checkpointed layer inputs in pinned CPU memory; input embeddings in CPU memory
    speed.py    reuse of dequantised weights, fused LoRA add, torch.compile
"""
