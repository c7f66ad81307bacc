"""Tiny random Llama (2 layers, hidden 128, byte-level vocab of 259): the whole QLoRA path in seconds on CPU.

For tests and smoke runs; it learns to reverse three-word lists, nothing more.
"""

from qlora.build import cache_dir
from qlora.config import Config, DataConfig, LoRAConfig, ModelConfig, OutputConfig, TrainConfig

config = Config(
    # Built once from qlora.build.TINY_LLAMA with seed 0 and saved, so peft can load the same base by path.
    model=ModelConfig(path=str(cache_dir() / "tiny-llama"), build="tiny-llama"),
    data=DataConfig(train="recipes/data/tiny/train.jsonl", eval="recipes/data/tiny/heldout.jsonl", max_seq_len=128),
    lora=LoRAConfig(r=8, alpha=16, dropout=0.0),
    # 8 rows * 1 accum * ~45 tokens = ~360 tokens/step; 60 steps are ~2.4 epochs of the 200 rows.
    # device cpu even where a GPU is visible: the tests built on this recipe compare runs bitwise and at 1e-5 in
    # fp32, which a bf16 CUDA run cannot match (--train.device=cuda runs it on a GPU).
    train=TrainConfig(steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20, log_every=5, device="cpu"),
    output=OutputConfig(dir="runs/tiny"),
)
