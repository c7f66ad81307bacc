"""Llama-3.1-70B on one 24 GB card (RTX 3090/4090, L4 class): recipes/llama70b.py as it stands, with the 4-bit base
streamed from host memory (issue 25), QLoRA r=16 on every linear layer, 2048 tokens, batch 1.

    python -m qlora.memory recipes/llama70b_24gb.py            # the estimate, from config.json alone, in seconds
    python -m qlora.memory recipes/llama70b_24gb.py --max-context --gpu-gib 12,24 --host-gib 128  # longest context
    bash benchmarks/gpu.sh OUT --part 7 --items stream-tests,stream-70b  # on a GPU: the measured rows (below: none yet)

train.stream_base keeps every decoder layer's packed weights and absmax in pinned host memory (80 x 420.9 MiB = 32.9
GiB) and the card two of them (0.82 GiB) instead of all (33.4 GiB): each layer is copied in on a side stream while
the one before it computes, in the forward and again in the backward, 2 x 78 layers = 68.9 GB per micro-batch, 2.75 s
at 25 GB/s (PCIe 4.0 x16). A step of 1 x 4096 tokens computes ~2.2 PFLOP (8 x 68.5e9 linear weights x 4096: forward,
recompute, backward), ~15 s on a 4090 at 150 TFLOP/s, so the copies hide behind the compute from about a thousand
tokens a row up (a layer's forward at T tokens computes 2 x 0.86e9 x T FLOPs while its 0.44 GB arrive).

Estimates only, nothing here measured yet (qlora/memory/estimate.py, with the allocator's margin that issue 22's H200
rows showed; a 128 GiB host): a step at 2048 tokens needs 4.50 GiB of the card and 46.8 GiB of the host (the base
32.9, the optimizer 3.5, the embeddings 2.0, the layer inputs 2.5, the process 6.0); the longest context on a 12 / 24
GiB card is 36,864 / 67,584 tokens (18,432 / 27,648 with a 64 GiB host, which then limits: the layer inputs it pins).
Each lever off alone, at 2048 tokens and on 12 / 24 GiB cards: stream_base 36.6 GiB, nothing fits;
offload_activations 6.93 GiB, 5,120 / 13,312; optimizer_on_cpu 7.55 GiB, 25,600 / 66,560; embeddings_on_cpu 6.45 GiB,
28,672 / 67,584; quantize_lm_head 5.95 GiB, 30,720 / 67,584; tile_projections 26,624 / 64,512; tile_norms 23,552 /
56,320; tile_size (and with it the other tile switches) 12,288 / 29,696; loss_chunk_size 1024 instead of 256
4.71 GiB. train.checkpoint_every stays 1: the streamer follows
the backward's order, which a group's replay would break (its rules refuse it).

A real checkpoint (synthetic=False) is quantised on the CPU as it loads into host memory, which for 70B takes long;
synthetic weights are drawn and quantised on the GPU one at a time and moved to host memory at once.
"""

from pathlib import Path

from qlora.config import apply_overrides, load_recipe

# recipes/llama70b.py as it stands (its levers, data, adapters and schedule), with one switch more: the base streamed.
# 1 row x 16 accum x 2048 tokens = 32,768 tokens/step at most; 16 x 68.9 GB cross the link per optimizer step.
config = apply_overrides(load_recipe(Path(__file__).with_name("llama70b.py")),
                         ["--train.stream_base=true", "--output.dir=runs/llama70b_24gb"])
