"""The output head in NF4 (quant.quantize_lm_head): ~3/4 of V h e saved (1.5 GiB for Llama-70B) for quantisation
error in the logits; dequantised a slice at a time to compute (head.py), never whole."""
