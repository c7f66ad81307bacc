"""The base model, frozen: where its files come from (build.py: built checkpoints, local directories, hub snapshots;
convert.py: SmolLM2's GGUF), loading it in NF4 or 16-bit (load.py), one layer into and out of 4 bits (quantize.py),
any architecture with random NF4 weights from its config.json (synthetic.py), the base sharded over several
processes (shard.py), and bitsandbytes imported without torch.compile's imports (bnb.py); a model directory checked
before it loads (model_dir.py), its weights against its config.json (stored_weights.py), and SDPA run one packed
document at a time (attention.py) and within a sliding window block by block (sliding_window.py)."""
