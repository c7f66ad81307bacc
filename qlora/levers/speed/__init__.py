"""Speed levers (train.reuse_dequant, train.fuse_lora_add, train.compile): each NF4 weight dequantised once per layer
recompute and backward, the LoRA update added in place, torch.compile of adapters or layers."""
