"""Synthetic weights: any architecture from its config.json, with random weights quantised straight to NF4.

Measures the memory of Llama-3.1 8B and 70B without downloading them. The model is built on the meta device
(accelerate's `init_empty_weights`: no memory at all), then made real one weight at a time on the target device:
each linear layer's weight is drawn in the compute dtype and quantised to NF4 at once (bitsandbytes `Params4bit`,
the same call transformers' loader makes), so the 16-bit model never exists, only one 16-bit weight at a time (at
most 28672 x 8192 x 2 B = 470 MB for 70B). Embeddings, lm_head and norms stay in the compute dtype, as the loader
leaves them; for lora and full every weight does.

Values: normal(0, initializer_range) for linear layers and embeddings, ones for norms, zeros for biases, as
transformers initialises a fresh model. The outputs are meaningless; the shapes, dtypes and memory are the model's.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from qlora.base.attention import implementation
from qlora.base.bnb import bnb
from qlora.base.quantize import linear4bit
from qlora.config import Config
from qlora.console import announce, progress, since
from qlora.errors import ConfigError


def _nf4_linear(linear: nn.Linear, cfg: Config, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator, std: float, place: torch.device) -> bnb.nn.Linear4bit:
    """A `Linear4bit` with the shape of meta `linear`, its random weight drawn on `device` and quantised there, then
    kept on `place` (its quantisation state with it)."""
    weight = torch.empty(linear.out_features, linear.in_features, dtype=dtype, device=device)
    weight.normal_(0.0, std, generator=generator)
    bias = torch.zeros(linear.out_features, dtype=dtype, device=device) if linear.bias is not None else None
    layer = linear4bit(weight, bias, cfg.quant, dtype)
    return layer if place == device else layer.to(place)


def quantize_linears(model: nn.Module, cfg: Config, dtype: torch.dtype, device: torch.device,
                     generator: torch.Generator, std: float, place: torch.device | None = None) -> list[str]:
    """Swap every meta `nn.Linear` but the output head and those in quant.keep_16bit for an NF4 layer made on
    `device` and kept on `place` (default: `device`); return the names swapped (the kept ones are made real in the
    compute dtype by `materialise`)."""
    head = model.get_output_embeddings()
    swaps = [(parent, name, f"{parent_name}.{name}" if parent_name else name)
             for parent_name, parent in list(model.named_modules()) for name, child in list(parent.named_children())
             if type(child) is nn.Linear and child is not head]
    swaps = [(parent, name, full) for parent, name, full in swaps if full not in cfg.quant.keep_16bit]
    # ~100 ns a weight on one CPU core: 70B's 560 layers take about 2 hours, 8B's 224 over 10 minutes
    for parent, name, _ in progress(swaps, len(swaps), "quantise", "layer"):
        setattr(parent, name, _nf4_linear(getattr(parent, name), cfg, dtype, device, generator, std, place or device))
    return [full for _, _, full in swaps]


def materialise(model: nn.Module, dtype: torch.dtype, device: torch.device, generator: torch.Generator,
                std: float) -> None:
    """Give every parameter still on the meta device real values on `device`; tied weights stay tied."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            if id(param) not in made:
                data = torch.empty(param.shape, dtype=dtype, device=device)
                if isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight":
                    data.normal_(0.0, std, generator=generator)
                elif name == "bias":
                    data.zero_()
                else:  # norm weights
                    data.fill_(1.0)
                made[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
            setattr(module, name, made[id(param)])
        for name, buf in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buf.to(device)  # rotary tables: computed on CPU at construction


def load_synthetic(cfg: Config, device: torch.device, dtype: torch.dtype,
                   place: torch.device | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase, str]:
    """The architecture of `cfg.model.config_json` with random weights on `device`: NF4 linear layers for qlora,
    every weight in `dtype` otherwise. `place`: where the weights are kept instead, drawn on `device` all the same
    (the NF4 layers quantised there one at a time and moved at once), so they are the values a load onto `device`
    draws. Returns the model, a byte-level tokenizer and the config's directory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.base.build import byte_tokenizer, config_json_path
    from qlora.base.model_dir import check_config_file

    if not cfg.model.config_json:
        raise ConfigError("model.synthetic=true needs model.config_json: the path of the model's config.json")
    path = config_json_path(cfg)
    if not path.is_file():
        raise ConfigError(f"model.config_json={cfg.model.config_json}: no such file; point it at a config.json")
    check_config_file(path, f"model.config_json={path}")
    try:  # the file itself: its directory's config.json may be another
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as err:  # not JSON, no model_type, an unknown architecture
        raise ConfigError(f"model.config_json={path} is not a usable config.json ({str(err).splitlines()[0]}): point "
                          "it at a model's config.json") from err
    config.use_cache = False  # the KV cache only costs memory in training
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) real, on CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=implementation(cfg.model.attn_implementation),
                                                 trust_remote_code=cfg.model.trust_remote_code)
    # It was silent for the minutes a CPU takes (8B: over 10), the bar in quantize_linears too
    started = announce(f"drawing {sum(p.numel() for p in model.parameters()):,} random weights for {path} "
                       f"({cfg.quant.method}, {str(dtype).removeprefix('torch.')}) onto {device}")
    if getattr(config, "tie_word_embeddings", False):  # under init_empty_weights transformers leaves them apart
        model.tie_weights()
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    std = getattr(config, "initializer_range", 0.02)
    if cfg.quant.method == "qlora":
        quantize_linears(model, cfg, dtype, device, generator, std, place)
        # What transformers' bitsandbytes loader marks a 4-bit model with: peft reads it to checkpoint the layers
        # (prepare_model_for_kbit_training) and to wrap Linear4bit in its bnb LoRA layer.
        model.is_loaded_in_4bit = model.is_quantized = True
        model.quantization_method = "bitsandbytes"
    materialise(model, dtype, device, generator, std)
    if place is not None and place != device:  # drawn on `device` like the rest (the same values), kept on `place`
        model.to(place)
    print(f"drawn in {since(started)}")
    return model, byte_tokenizer(), str(path.parent)
