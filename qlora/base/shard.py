"""The frozen base sharded over the processes of a run (`train.shard_base`), with FSDP2's `fully_shard`.

Each decoder layer, the input embeddings and the head are a unit of their own and the rest of the decoder (final
norm, rotary tables) the root, so each process holds 1/N of the base and all-gathers one layer (and the next,
prefetched) at a time. FSDP shards floating-point tensors only, so each packed 4-bit weight is viewed as the compute
dtype: the same bytes, stored as `bnb_4bit_quant_storage` would store them (bitsandbytes PR 970, used by Answer.AI's
fsdp_qlora and HF's FSDP-QLoRA). The quantisation state (absmax, code tables) stays whole on its `Linear4bit`, where
bitsandbytes picks it up again when FSDP hands the layer a plain all-gathered tensor
(`fix_4bit_weight_quant_state_from_module`, as accelerate's FSDP2 path relies on). FSDP ignores the trainable
adapters: qlora/training/distributed.py sums their gradients as in data parallel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from qlora.base.bnb import bnb
from qlora.base.load import compute_dtype
from qlora.config import Config
from qlora.errors import ConfigError


def shard_base(model: nn.Module, cfg: Config, size: int, device: torch.device) -> None:
    """FSDP2 over the frozen base: each decoder layer, the input embeddings and the head a unit of their own, the
    decoder (final norm, rotary tables) the root. Adapters, and a head tied to the embeddings, stay whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    decoder, head, embed = model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise ConfigError(f"train.shard_base shards decoders with a .layers list; {type(decoder).__name__} has none: "
                          "use --train.shard_base=false")
    dtype = compute_dtype(cfg.quant, device)  # FSDP gathers a unit's tensors as one: one dtype for all of them
    before = base_bytes(model)
    store_packed_as(model, dtype)
    check_gathered_bytes(model)
    tied = head.weight is embed.weight
    # Whole on every rank: the adapters (summed like data parallel), and a tied table, which the head uses outside
    # the decoder's forward (FSDP would need both in one unit; a tied table is a small model's anyway).
    kept = {p for p in model.parameters() if p.requires_grad} | ({embed.weight} if tied else set())
    mesh = init_device_mesh(device.type, (size,))
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, ignored_params=kept)
    if not tied:
        fully_shard(embed, mesh=mesh, ignored_params=kept)
    fully_shard(decoder, mesh=mesh, ignored_params=kept)
    if not tied:
        # The loss calls the head outside the decoder, so it is a root of its own; freed after its forward and
        # gathered again for its backward, so it is whole only while the loss needs it.
        fully_shard(head, mesh=mesh, ignored_params=kept, reshard_after_forward=True)
    for p in kept:  # FSDP moved what it shards; the rest follows (a base loaded into CPU memory)
        p.data = p.data.to(device)
    held: list[object] = [None] * size
    dist.all_gather_object(held, base_bytes(model))
    print(f"train.shard_base: the frozen base sharded over {size} processes (FSDP2), "
          f"{', '.join(f'{b / 2**20:,.2f}' for b in held)} MiB per process of {before / 2**20:,.2f} MiB "
          f"(quantisation state whole on each{', embeddings tied to the head whole' if tied else ''})")


def store_packed_as(model: nn.Module, dtype: torch.dtype) -> None:
    """View each packed 4-bit weight as `dtype`, as bitsandbytes stores it under `quant_storage=dtype`: the same bytes
    (flattened, viewed, a column again), so outputs are bitwise unchanged."""
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or module.weight.dtype == dtype:
            continue
        weight = module.weight
        nbytes = weight.numel() * weight.element_size()
        if nbytes % dtype.itemsize:
            raise ConfigError(f"train.shard_base: a 4-bit weight of {nbytes} bytes cannot be stored as {dtype}: "
                              "use --train.shard_base=false")
        weight.data = weight.data.reshape(-1).view(dtype).reshape(-1, 1)
        weight.quant_storage = module.quant_storage = dtype
        # Where bitsandbytes looks when FSDP's all-gathered plain tensor has lost the Params4bit's own attribute
        # (quant.quantize_lm_head builds its Params4bit without a module, so it is not set there yet).
        module.quant_state = weight.quant_state


def byte_sum(t: torch.Tensor) -> int:
    return int(torch.sum(t.detach().reshape(-1).view(torch.uint8), dtype=torch.int64))


def check_gathered_bytes(model: nn.Module) -> None:
    """Check, at each 4-bit layer's first forward, that the weight FSDP all-gathered holds the bytes loaded. Packed
    nibbles viewed as a float dtype include NaN bit patterns (about 0.1% of bf16 elements), which a float copy
    that canonicalises NaNs would silently change (reported for FSDP2 on CUDA: bitsandbytes issue 1945; not seen
    with gloo on CPU, where the tests compare a sharded run bitwise with an unsharded one)."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            expected = byte_sum(module.weight)

            def first_forward(layer: nn.Module, args: tuple, expected: int = expected) -> None:
                layer.gathered_check.remove()
                if byte_sum(layer.weight) != expected:
                    raise ConfigError("train.shard_base: the 4-bit weights FSDP all-gathered differ from those loaded "
                                      "(a copy that canonicalises NaN bit patterns, bitsandbytes issue 1945?): train "
                                      "with --train.shard_base=false")

            module.gathered_check = module.register_forward_pre_hook(first_forward)


def base_bytes(model: nn.Module) -> int:
    """Bytes of the frozen base this process holds: its shard of each sharded tensor, the whole of the others, the
    buffers (rotary tables) and every 4-bit layer's quantisation state."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in [*(p for p in model.parameters() if not p.requires_grad), *model.buffers()]:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        state = module.quant_state if module.quant_state is not None else module.weight.quant_state
        parts = [state.absmax, state.code]
        if state.nested:
            parts += [state.state2.absmax, state.state2.code, state.offset]
        total += sum(t.numel() * t.element_size() for t in parts if t is not None)
    return total
