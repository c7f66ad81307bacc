"""Sequence tiles (train.tile_size, train.tile_projections, train.tile_norms): the MLP, and the attention projections
and the RMSNorms, run a few thousand tokens at a time forward and backward, so none of their seq x intermediate
tensors (a norm's: fp32 copies of the row) exists at full length; one more forward of the tiled modules per step."""
