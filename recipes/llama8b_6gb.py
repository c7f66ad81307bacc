"""Llama-3.1-8B on a 6 GB card (RTX 2060 / 3060 laptop class): recipes/llama8b.py with the 4-bit base streamed from
host memory (issue 25) and three levers more, QLoRA r=16 on every linear layer, 2048 tokens, batch 1.

    python -m qlora.memory recipes/llama8b_6gb.py            # the estimate, from config.json alone, in seconds
    python -m qlora.memory recipes/llama8b_6gb.py --max-context --gpu-gib 4,6,8 --host-gib 128  # longest context
    bash benchmarks/gpu.sh OUT --part 7 --items stream-tests,stream-8b  # on a GPU: the measured row (below: none yet)

train.stream_base keeps every decoder layer's packed weights and absmax in pinned host memory (32 x 107.3 MiB = 3.35
GiB) and the card two of them (0.21 GiB): 2 x 30 layers = 6.8 GB copied per micro-batch, 0.27 s at 25 GB/s, behind a
layer's forward of 2 x 0.22e9 x T FLOPs. Without it the 8B base alone (3.4 GiB) leaves a 6 GB card (5.59 GiB) room for a
step of 2048 tokens and no longer (5.42 GiB by the estimate).

Estimates only, nothing here measured yet (qlora/memory/estimate.py, with the allocator's margin that issue 22's H200
rows showed; a 128 GiB host, of which this plan takes 11.5 GiB): a step at 2048 tokens needs 2.28 GiB of the card;
the longest context on a 4 / 6 / 8 GiB card is 17,408 / 35,840 / 52,224 tokens. Each lever off alone, at 2048 tokens
and on 4 / 6 / 8 GiB cards: stream_base 5.42 GiB, 0 / 3,072 / 26,624; offload_activations 2.76 GiB, 4,096 / 11,264 /
17,408; optimizer_on_cpu 2.88 GiB, 11,264 / 31,744 / 48,128; embeddings_on_cpu 3.26 GiB, 6,144 / 27,648 / 44,032;
quantize_lm_head 3.00 GiB, 9,216 / 29,696 / 46,080; tile_projections 11,264 / 26,624 / 40,960; tile_norms 12,288 /
23,552 / 33,792; tile_size (and with it the other tile switches) 6,144 / 12,288 / 17,408; loss_chunk_size 1024
instead of 256 3.38 GiB (a chunk's fp32 logits beside a slice of the NF4 head), 13,312 / 35,840 / 52,224.
"""

from pathlib import Path

from qlora.config import apply_overrides, load_recipe

# recipes/llama8b.py (its data, adapters and schedule; embeddings on the host, layer inputs offloaded, tiles of 4096
# tokens), with the base streamed and three levers more that pay on a card this small (the numbers above).
config = apply_overrides(load_recipe(Path(__file__).with_name("llama8b.py")), [
    "--train.stream_base=true",
    "--quant.quantize_lm_head=true",  # lm_head in NF4: 0.26 GB instead of 1.05 GB, for error in the logits
    "--train.optimizer_on_cpu=true",  # the optimizer state and fp32 masters (0.5 GiB) in pinned host memory
    "--train.loss_chunk_size=256",  # the NF4 head is dequantised beside one chunk's fp32 logits: smaller chunks
    "--output.dir=runs/llama8b_6gb",
])
