"""Llama-3.1-8B on a 6 GB card (RTX 2060 / 3060 laptop class): recipes/llama8b.py with the 4-bit base streamed from
host memory (issue 25) and three levers more, QLoRA r=16 on every linear layer, 2048 tokens, batch 1.

    python -m qlora.memory recipes/llama8b_6gb.py            # the estimate, from config.json alone, in seconds
    python -m qlora.memory recipes/llama8b_6gb.py --max-context --gpu-gib 4,6,8 --host-gib 128  # longest context
    bash benchmarks/gpu.sh OUT --part 7 --items stream-tests,stream-8b  # on a GPU: the measured row (below: none yet)

train.stream_base keeps every decoder layer's packed weights and absmax in pinned host memory (32 x 107.3 MiB = 3.35
GiB) and the card two of them (0.21 GiB): 2 x 30 layers = 6.8 GB copied per micro-batch, 0.27 s at 25 GB/s, behind a
layer's forward of 2 x 0.22e9 x T FLOPs. Without it the 8B base alone (3.4 GiB) leaves a 6 GB card no room for a
step at 2048 tokens.

Estimates only, nothing here measured yet (qlora/memory/estimate.py, with the allocator's margin that issue 22's H200
rows showed; a 128 GiB host, of which this plan takes 11.5 GiB): a step at 2048 tokens needs 2.91 GiB of the card;
the longest context on a 4 / 6 / 8 GiB card is 17,408 / 35,840 / 52,224 tokens. Each lever off alone, at 2048 tokens
and on 4 / 6 / 8 GiB cards: stream_base 6.06 GiB, 0 / 1,024 / 26,624; offload_activations 3.40 GiB, 3,072 / 10,240 /
17,408; optimizer_on_cpu 3.38 GiB, 11,264 / 31,744 / 48,128; embeddings_on_cpu 3.89 GiB, 3,072 / 27,648 / 44,032;
quantize_lm_head 3.14 GiB, 8,192 / 29,696 / 46,080; tile_projections 10,240 / 26,624 / 40,960; tile_norms 11,264 /
23,552 / 33,792; tile_size (and with it the other tile switches) 6,144 / 12,288 / 17,408; loss_chunk_size 1024
instead of 256 4.01 GiB (the NF4 head's dequantised weight and a chunk's logits at once), 1,024 / 35,840 / 52,224.
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
