"""`python -m qlora.merge RUN_DIR --out DIR`: a trained adapter folded into a plain bf16 Hugging Face checkpoint.

    fold.py         W = W0 + (alpha / r) B A: W0 as the run trained on it, the adapter checked against it first
    checkpoint.py   the merged checkpoint, shard by shard, checked against the adapter model, then renamed into place
    __main__.py     the command: its flags and its ending
"""
