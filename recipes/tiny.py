"""Tiny random Llama (2 layers, hidden 128, byte-level vocab of 259): the whole QLoRA path in seconds on CPU.

For tests (which cut it to a few steps) and smoke runs. In its 300 steps (~30 s of wall time on 2 idle cores) it learns
to reverse lists of three words it never saw as a whole: held-out exact match goes from 0% to ~90% (the task:
recipes/data/make_reverse.py).
"""

from qlora.base.build import cache_dir
from qlora.config import Config, DataConfig, LoRAConfig, ModelConfig, OutputConfig, TrainConfig

config = Config(
    # Built once from qlora.base.build.TINY_LLAMA with seed 0 and saved, so peft can load the same base by path. "-v2":
    # weights drawn with std 0.1 (see TINY_LLAMA); a cache built before that keeps its own name.
    model=ModelConfig(path=str(cache_dir() / "tiny-llama-v2"), build="tiny-llama"),
    data=DataConfig(train="recipes/data/tiny/train.jsonl", eval="recipes/data/tiny/heldout.jsonl", max_seq_len=128),
    # Rank 32: copying a word from another position is the whole task, and rank 8 learned it about twice as slowly.
    lora=LoRAConfig(r=32, alpha=32, dropout=0.0),
    # 8 rows * 1 accum * ~45 tokens = ~360 tokens/step; 300 steps are 4 epochs of the 600 rows.
    # device cpu even where a GPU is visible: the tests built on this recipe compare runs bitwise and at 1e-5 in
    # fp32, which a bf16 CUDA run cannot match (--train.device=cuda runs it on a GPU).
    train=TrainConfig(steps=300, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=100, log_every=10, device="cpu"),
    output=OutputConfig(dir="runs/tiny"),
)
