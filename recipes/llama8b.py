"""Llama-3.1-8B, QLoRA r=16 on every linear layer, 2048 tokens, batch 1: the small-GPU budget of issues 3 and 4.

Weights: `synthetic=True` builds the architecture from recipes/configs/llama-3.1-8b/config.json (a copy of the
hub's) with random weights quantised straight to NF4 layer by layer, so memory can be measured without the 16 GB
download. To train the real model, point `path` at a local copy of meta-llama/Llama-3.1-8B and set synthetic=False.

    python -m qlora.memory recipes/llama8b.py            # the estimate, from config.json alone, in seconds
    python -m qlora.memory recipes/llama8b.py --max-context --gpu-gib 24,48,80 --host-gib 128  # longest context
    python -m qlora.memory recipes/llama8b.py --measure  # on a GPU: real steps on synthetic weights

Memory levers (issue 13), each on because it pays, by the estimate for a 128 GiB host (the longest context on 24 /
48 / 80 GiB cards, in tokens, with the allocator's margin that issue 22's H200 rows showed). All on: 147,456 /
342,016 / 567,296. Each off alone: offload_activations 94,208 / 219,136 / 387,072; tile_size (and with it the other
tile switches) 50,176 / 118,784 / 208,896; tile_projections 114,688 / 267,264 / 459,776; tile_norms 96,256 / 224,256 /
394,240; embeddings_on_cpu 139,264 / 334,848 / 560,128. Left off: quantize_lm_head (no gain here, error in the logits)
and optimizer_on_cpu (150,528 / 346,112 / 571,392: 1-2%, for a host round trip and a CPU update per step).

Which of them a run uses is the trainer's: train.plan="fastest" (issue 24, qlora/memory/plan.py). The levers above are
what the longest rows on a 24 GiB card need, and `python -m qlora.memory` (the estimate, --max-context, --measure)
reads them as they stand; before loading, the trainer keeps of them (and of optimizer_on_cpu) only what the card it
finds needs, the cheapest by the cost table (qlora/memory/costs.py) first, and prints why. By the estimate, with 120 GiB
of host memory available, at 2048 tokens: within 14 GiB (--train.plan_gib=14, the standard stack's measured peak) it
keeps checkpointing alone (10.3 GiB; +39% of a plain step by the table); a 24 GiB card drops checkpointing and keeps
the embeddings and the optimizer in host memory (24.0 GiB, +11%); 48 GiB and more drop every memory lever (25.4 GiB,
+0%). At 65,536 tokens a 24 GiB card keeps checkpointing, tiles, loss chunks and offloaded layer inputs (21.7 GiB,
+123%), an 80 GiB one checkpointing and loss chunks (45.1 GiB, +55%), an H200 (139.8 GiB) checkpointing alone
(119.7 GiB, +39%).
--train.plan=recipe runs every lever as set.
train.plan_batch=True leaves it the batch shape as well: the 16 rows of a step may run as fewer, larger
micro-batches where the card holds them (docs/speed.md), once a GPU has measured the fixed part of a micro-batch
for the cost table; until then the trainer runs 1 x 16 as set and says so.
"""

from qlora.config import Config, DataConfig, LoRAConfig, ModelConfig, OutputConfig, TrainConfig

config = Config(
    # The input embeddings (1.05 GB in bf16) stay in host memory; only each step's looked-up vectors are copied over.
    model=ModelConfig(path="meta-llama/Llama-3.1-8B", synthetic=True,
                      config_json="recipes/configs/llama-3.1-8b/config.json", embeddings_on_cpu=True),
    # The demo chat task; with synthetic weights the byte-level tokenizer stands in for Llama-3's.
    data=DataConfig(train="recipes/data/destination/train.jsonl", eval="recipes/data/destination/heldout.jsonl",
                    max_seq_len=2048),
    # r=16, alpha=16 on all linear layers (QLoRA paper, sec. 4: adapters on every layer are what match 16-bit
    # fine-tuning); dropout 0.05 (the paper used 0.1 for 7B and 13B, 0.05 above).
    lora=LoRAConfig(r=16, alpha=16, dropout=0.05),
    # 1 row x 16 accum x 2048 tokens = 32,768 tokens/step at most. The loss runs 1024 positions at a time, so the
    # fp32 logits of all 2047 positions (2047 x 128256 x 4 B = 1.05 GB, three such buffers in the backward) never
    # exist at once. Layer inputs wait in pinned host memory; the MLP, the attention projections and the norms run
    # 4096 tokens at a time once rows are longer (a norm then keeps its bf16 input, not an fp32 copy). CUDA only: 8B
    # in fp32 on a CPU would need ~40 GB.
    # train.plan="fastest": of these levers the trainer keeps those the card it finds needs (the docstring).
    train=TrainConfig(steps=100, batch_size=1, grad_accum=16, lr=1e-4, warmup_steps=10, loss_chunk_size=1024,
                      offload_activations=True, tile_size=4096, tile_projections=True, tile_norms=True,
                      plan="fastest",
                      plan_batch=True, eval_every=50, eval_batches=20, device="cuda"),
    output=OutputConfig(dir="runs/llama8b"),
)
