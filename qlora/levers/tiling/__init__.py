"""Sequence tiles (train.tile_size, train.tile_projections): the MLP, and the attention projections, run a few thousand
tokens at a time forward and backward, so none of their seq x intermediate tensors exists at full length; one more
forward of the tiled modules per step."""
