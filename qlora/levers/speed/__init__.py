"""Speed levers (train.reuse_dequant, dequant_once, fuse_lora_add, fuse_lora, compile): each NF4 weight dequantised
once per layer recompute and backward, or once for the run; the LoRA update added in place, or the whole adapted
layer as one node; torch.compile of adapters or layers."""
