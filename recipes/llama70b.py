"""Llama-3.1-70B, QLoRA r=16 on every linear layer, 2048 tokens, batch 1: the one-GPU budget of issues 3 and 4.

Weights: `synthetic=True` builds the architecture from recipes/configs/llama-3.1-70b/config.json (a copy of the
hub's) with random weights quantised straight to NF4 layer by layer, so memory can be measured without the 140 GB
download. To train the real model, point `path` at a local copy of meta-llama/Llama-3.1-70B and set synthetic=False.

    python -m qlora.memory recipes/llama70b.py            # the estimate, from config.json alone, in seconds
    python -m qlora.memory recipes/llama70b.py --max-context --gpu-gib 24,48,80 --host-gib 128  # longest context
    python -m qlora.memory recipes/llama70b.py --measure  # on a GPU: real steps on synthetic weights

Memory levers (issue 13), each on because it pays, by the estimate for one 80 GB card and a 128 GiB host (a step at
2048 tokens, in GB; the longest context on 48 / 80 GiB cards, in tokens, with the allocator's margin that issue 22's
H200 rows showed). All on: 38.7 GB, 53,248 / 177,152. Each off alone: offload_activations 41.3 GB, 26,624 / 95,232;
optimizer_on_cpu 42.0 GB, 44,032 / 167,936; embeddings_on_cpu 40.8 GB, 45,056 / 168,960; quantize_lm_head 40.3 GB,
47,104 / 171,008; loss_chunk_size 1024 instead of 256 38.9 GB; tile_size (and with it the other tile switches)
17,408 / 63,488 tokens; tile_projections 41,984 / 139,264 tokens; tile_norms 33,792 / 115,712 tokens. The tile
switches change nothing at 2048 tokens (one tile).

Which of them a run uses is the trainer's: train.plan="fastest" (issue 24, qlora/memory/plan.py). The levers above are
what a 48 GiB card needs for the longest rows, and `python -m qlora.memory` (the estimate, --max-context, --measure)
reads them as they stand; before loading, the trainer keeps of them only what the card it finds needs, the cheapest by
the cost table (qlora/memory/costs.py) first, and prints why. quantize_lm_head changes the numbers, so it is the
recipe's, not the plan's. By the estimate, with 120 GiB of host memory available, at 2048 tokens: a 48 or 80 GiB card
keeps checkpointing alone (45.0 GiB; +39% of a plain step by the table); an H200 (139.8 GiB) drops it too (120.0 GiB,
+0%). At 32,768 tokens a 48 GiB card keeps checkpointing, loss chunks and offloaded layer inputs and streams the base
from host memory (train.stream_base, issue 25: 30.6 GiB, +90%), an 80 GiB one checkpointing, loss chunks and offloaded
layer inputs (62.7 GiB, +60%), an H200 checkpointing alone (129.3 GiB, +39%). The NF4 weights alone exceed 24 GiB, so
there the base is streamed: with checkpointing at 2048 tokens (12.9 GiB, 38.9 GiB pinned in host memory, +69%), and
tiles, loss chunks and offloaded layer inputs besides at 32,768 (22.2 GiB, +153%). Streaming's +30% is the table's
assumption until a GPU measures it. --train.plan=recipe runs every lever as set.
train.plan_batch=True leaves it the batch shape as well: the 16 rows of a step may run as fewer, larger
micro-batches where the card holds them (docs/speed.md), once a GPU has measured the fixed part of a micro-batch
for the cost table; until then the trainer runs 1 x 16 as set and says so.
"""

from qlora.config import Config, DataConfig, LoRAConfig, ModelConfig, OutputConfig, QuantConfig, TrainConfig

config = Config(
    # The input embeddings (2.1 GB in bf16) stay in host memory; only each step's looked-up vectors are copied over.
    model=ModelConfig(path="meta-llama/Llama-3.1-70B", synthetic=True,
                      config_json="recipes/configs/llama-3.1-70b/config.json", embeddings_on_cpu=True),
    # lm_head in NF4 too: 0.54 GB instead of 2.1 GB, for quantisation error in the logits (tests/test_levers.py).
    quant=QuantConfig(quantize_lm_head=True),
    # The demo chat task; with synthetic weights the byte-level tokenizer stands in for Llama-3's.
    data=DataConfig(train="recipes/data/destination/train.jsonl", eval="recipes/data/destination/heldout.jsonl",
                    max_seq_len=2048),
    # r=16, alpha=16 on all linear layers (QLoRA paper, sec. 4: adapters on every layer are what match 16-bit
    # fine-tuning); dropout 0.05 as the paper used for its 33B and 65B models.
    lora=LoRAConfig(r=16, alpha=16, dropout=0.05),
    # 1 row x 16 accum x 2048 tokens = 32,768 tokens/step at most. The loss runs 256 positions at a time, so the
    # fp32 logits of all 2047 positions (2047 x 128256 x 4 B = 1.05 GB, three such buffers in the backward) never
    # exist at once: 0.39 GB for a chunk's three. Layer inputs wait in pinned host memory (2.7 GB at 2048 tokens);
    # the optimizer state and the fp32 masters (2.5 GB) live there from the start; the MLP and the attention
    # projections and the norms run 4096 tokens at a time once rows are longer (a norm then keeps its bf16 input,
    # not an fp32 copy). CUDA only: 70B in fp32 on a CPU would need ~300 GB.
    # train.plan="fastest": of these levers the trainer keeps those the card it finds needs (the docstring).
    train=TrainConfig(steps=100, batch_size=1, grad_accum=16, lr=1e-4, warmup_steps=10, loss_chunk_size=256,
                      offload_activations=True, optimizer_on_cpu=True, tile_size=4096, tile_projections=True,
                      tile_norms=True, plan="fastest", plan_batch=True, eval_every=50, eval_batches=20, device="cuda"),
    output=OutputConfig(dir="runs/llama70b"),
)
