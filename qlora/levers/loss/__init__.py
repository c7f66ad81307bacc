"""The head and cross-entropy without all logits at once (train.loss_chunk_size, train.liger_ce): a chunk of positions
at a time under checkpointing, or liger-kernel's fused kernel on CUDA. The fp32 logits of 2048 x 128K are 1 GiB."""
