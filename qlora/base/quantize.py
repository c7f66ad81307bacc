"""One linear layer into and out of 4 bits, as the recipe's `quant` section says, and layers of a loaded model rebuilt
from the checkpoint's 16-bit weights.

transformers' 4-bit loader quantises every linear layer but the output head, in blocks of 64 (bitsandbytes'
default): `BitsAndBytesConfig` exposes neither the block size nor a per-layer choice beyond skipping modules by name.
So the load stays transformers' own, and the layers a recipe wants otherwise (`quant.keep_16bit`, a `quant.blocksize`
other than 64, LoftQ's shifted weights) are read again from the checkpoint, one tensor at a time, and swapped in. The
extra memory is one layer's 16-bit weight, whatever the model's size.

Every 4-bit weight here is made by `params4bit`, the call transformers' loader makes (bitsandbytes `Params4bit`,
quantised on its first move to a device), so a layer rebuilt here with the default settings is the loader's to the bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from safetensors import safe_open
from torch import nn

from qlora.base.bnb import bnb
from qlora.base.build import weight_locations
from qlora.config import QuantConfig
from qlora.errors import ConfigError

LOADER_BLOCKSIZE = 64  # what transformers' 4-bit load quantises with (bitsandbytes' Params4bit default)


def params4bit(weight: torch.Tensor, quant: QuantConfig, device: torch.device | str,
               module: nn.Module | None = None) -> bnb.nn.Params4bit:
    """`weight` quantised on `device` with the recipe's type, block size and double quant."""
    # .to(device) on an unquantised Params4bit quantises it (bitsandbytes nn/modules.py, Params4bit.to).
    return bnb.nn.Params4bit(weight, requires_grad=False, blocksize=quant.blocksize,
                             compress_statistics=quant.double_quant, quant_type=quant.quant_type,
                             quant_storage=torch.uint8, module=module).to(device)


def linear4bit(weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantConfig,
               dtype: torch.dtype, cls: type[bnb.nn.Linear4bit] | None = None) -> bnb.nn.Linear4bit:
    """A frozen `Linear4bit` (or subclass `cls`) holding `weight` quantised on its own device, computing in `dtype`."""
    out_features, in_features = weight.shape
    layer = (cls or bnb.nn.Linear4bit)(in_features, out_features, bias=bias is not None, compute_dtype=dtype,
                              compress_statistics=quant.double_quant, quant_type=quant.quant_type,
                              quant_storage=torch.uint8, device="meta")
    layer.weight = params4bit(weight, quant, weight.device, module=layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(weight.device), requires_grad=False)
    # bitsandbytes' bf16 CPU kernel repacks the weight in place, with no backward (model.keep_cpu_weights_exact).
    layer.support_avx512bf16_for_cpu = False
    return layer


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen `nn.Linear` holding `weight` as it is (the dtype and device the load gave it)."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(weight.device), requires_grad=False)
    return layer


def dequantize(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    """The weight a `Linear4bit` computes with, in fp32."""
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def roundtrip(weight: torch.Tensor, quant: QuantConfig, load_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`weight` as the 4-bit model holds it: cast to the load dtype (as transformers casts each checkpoint tensor),
    quantised as `params4bit` does, dequantised to fp32 exactly. bitsandbytes dequantises to the dtype it quantised
    from (QuantState.dtype): from a bf16 load, that would round each code x absmax to bf16 first."""
    param = params4bit(weight.to(load_dtype), quant, device)
    state = copy.copy(param.quant_state)
    state.dtype = torch.float32
    return bnb.functional.dequantize_4bit(param.data, state)


def quant_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """A 4-bit weight's packed storage and every tensor of its quantisation state (absmax, code tables, and the
    nested state of double quant)."""
    state = param.quant_state
    out = [param, state.absmax, state.code, getattr(state, "offset", None)]
    if getattr(state, "state2", None) is not None:
        out += [state.state2.absmax, state.state2.code]
    return [t for t in out if isinstance(t, torch.Tensor)]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as stored: 4-bit ones packed, with their quantisation state; tied ones once."""
    seen, total = set(), 0
    for param in model.parameters():
        tensors = quant_tensors(param) if getattr(param, "quant_state", None) is not None else [param]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def rebuild_from_checkpoint(model: nn.Module, base_path: str, names: list[str], dtype: torch.dtype,
                            make: Callable[[str, torch.Tensor, nn.Module], nn.Module]) -> None:
    """Replace each named layer by `make(name, weight, old_layer)`, where `weight` is the layer's tensor from the
    checkpoint cast to `dtype` on the layer's device, as the loader casts it. One tensor is read at a time."""
    where = weight_locations(base_path)
    for name in names:
        key = f"{name}.weight"
        if key not in where:
            raise ConfigError(f"{base_path} has no tensor {key}: the layer cannot be rebuilt from the checkpoint")
        old = model.get_submodule(name)
        with safe_open(where[key], "pt") as f:
            weight = f.get_tensor(key)
        if not weight.is_floating_point():
            raise ConfigError(f"{key} in {base_path} is stored as {weight.dtype}, already quantised: there is no "
                              "16-bit weight to rebuild the layer from")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(name, weight.to(old.weight.device, dtype), old))
        del old, weight
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
