"""Where checkpointed layer inputs wait for the backward (train.offload_activations, train.offload_budget_gib,
train.checkpoint_every): in pinned host memory, copied on a side stream behind the compute (CUDA), or only every k-th
kept and the rest replayed from their group's first. At 100K tokens of Llama-70B each input is 1.6 GiB, 131 GiB over
its 80 layers."""
