"""The 4-bit base streamed from host memory (train.stream_base): every decoder layer's packed weights and absmax in
pinned host memory, two layers on the device at a time, each copied on a side stream while the one before computes,
in the forward and again in the backward."""
