"""Load the base model: NF4 with double quantisation (qlora), or 16-bit (lora, full), on one device.

Checkpoints that are built rather than downloaded (the tiny random Llama, SmolLM2 converted from its GGUF) are written
once by a builder into the cache and then loaded like any Hugging Face checkpoint, so every method takes one path.
"""

from __future__ import annotations

import os
import pickle
import re

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from qlora.base.attention import implementation
from qlora.base.bnb import bnb
from qlora.base.build import ensure_checkpoint, hub_unreachable, looks_like_hub_id, not_a_directory
from qlora.base.model_dir import check_model_dir, check_vocab, unrun_code
from qlora.base.quantize import (
    LOADER_BLOCKSIZE,
    dense_linear,
    linear4bit,
    rebuild_from_checkpoint,
    weight_bytes,
)
from qlora.base.stored_weights import check_kept_layers, damaged
from qlora.config import Config, QuantConfig
from qlora.console import announce, since
from qlora.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

def resolve_device(name: str, asked: str = "train.device=cuda", fix: str = "use --train.device=cpu or auto"
                   ) -> torch.device:
    """`name` (cuda, cpu or auto) as a device; a CUDA device no GPU backs is refused in one line naming where it was
    `asked` for and the `fix` there."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{asked} but no CUDA GPU is visible: {fix}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def compute_dtype(quant: QuantConfig, device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp32 on CPU, where a bf16 matmul is 18-66x slower (1024x576x1536 under load:
    benchmarks/results/bf16-matmul-cpu.md)."""
    if quant.compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[quant.compute_dtype]


def quantization_config(quant: QuantConfig, dtype: torch.dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_storage=torch.uint8)


def load_error(path: str, err: Exception) -> str:
    """One line for a checkpoint transformers could not load: the cause in the user's terms, and the fix."""
    if "trust_remote_code" in str(err):
        return (f"model.path={path} ships its own Python code (an auto_map in its config.json or "
                "tokenizer_config.json): read that code, then set --model.trust_remote_code=true to run it")
    has_pickle = any(os.path.isfile(os.path.join(path, name))
                     for name in ("pytorch_model.bin", "pytorch_model.bin.index.json"))
    if isinstance(err, OSError) and has_pickle:
        return (f"model.path={path} has only pickle weights (pytorch_model.bin), and unpickling can run code: "
                "convert them to safetensors, or set --model.allow_pickle=true if you trust the checkpoint")
    if isinstance(err, SafetensorError):
        return damaged(f"model.path={path}", err)
    if isinstance(err, pickle.UnpicklingError):  # torch.load(weights_only=True) met a global that is no tensor
        # torch's own text advises allowlisting the global, or its first line loading with weights_only=False, the one
        # thing not to do with weights: name what it refused alone. A file pickle.dump wrote (protocol 4 and up, not
        # torch.save's 2) stops at its first frame, operand 149, before any global.
        found = re.search(r"GLOBAL ([\w.]+)|Unsupported operand (\d+)", str(err))
        why = (f"the Python global {found.group(1)}" if found and found.group(1) else
               f"pickle operand {found.group(2)}, which torch's weights-only reader does not take" if found else
               "what torch's weights-only reader does not take")
        return (f"model.path={path}: its pytorch_model.bin holds more than tensors ({why}), which unpickling would "
                "run, so it was not loaded: convert a copy you trust to safetensors")
    return (f"model.path={path} could not be loaded ({str(err).splitlines()[0]}): "
            "check the path, or download the checkpoint first")


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(load_error(path, err).replace("could not be loaded", "has no usable tokenizer")) from err
    if tokenizer.pad_token is None:  # Llama-3 has none; padding is masked out of the loss anyway
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:  # a TypeError in the first batch's collate otherwise
        raise ConfigError(f"model.path={path}: its tokenizer names no eos_token nor pad_token, which end and pad "
                          "each example: set eos_token in its tokenizer_config.json to the model's end-of-text token")
    return tokenizer


def keep_cpu_weights_exact(model: torch.nn.Module) -> None:
    """Stop bitsandbytes (0.50) repacking 4-bit weights for its bf16 CPU kernel on the first no-grad forward.

    That repack (`_convert_weight_packed_for_cpu`) rewrites the weight in place for a kernel with no backward: after
    one evaluation, no gradient flows back through the frozen base, so adapters below the top layer stop learning
    (SmolLM2 stayed at loss 6-8 after an eval before training). It also computes in bf16 (logits drift by ~4e-3).
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base(cfg: Config, device: torch.device,
              place: torch.device | None = None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    """Load the base model for `cfg.quant.method` to compute on `device`; return it, its tokenizer and its path.

    `place`, when given, is where the weights are loaded instead: a base that several processes will shard is loaded
    into CPU memory, and each process moves only its shard to `device` (shard.py); a base
    streamed from host memory (train.stream_base) likewise. Synthetic weights are still drawn and quantised on
    `device`, one at a time, and moved to `place` at once (bitsandbytes quantises on one CPU core at ~100 ns a
    weight here: two hours for 70B's)."""
    dtype = compute_dtype(cfg.quant, device)
    if cfg.model.synthetic:  # drawn and quantised on `device`, kept on `place`
        from qlora.base.synthetic import load_synthetic

        model, tokenizer, path = load_synthetic(cfg, device, dtype, place)
        keep_cpu_weights_exact(model)
        return model, tokenizer, path
    device = place or device
    path = ensure_checkpoint(cfg)
    offline = None
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise ConfigError(not_a_directory(path))
        if not looks_like_hub_id(path):
            raise ConfigError(f"model.path={path} does not exist: point it at a checkpoint directory or a hub id")
        offline = hub_unreachable()  # with no network: fail at once, not after ~25 s of retries
    else:
        config = check_model_dir(path, f"model.path={path}", cfg.model.trust_remote_code)
        check_kept_layers(cfg.quant.keep_16bit, path)
        if not cfg.model.trust_remote_code and (note := unrun_code(config, f"model.path={path}")):
            print(note)
    kwargs = dict(dtype=dtype, device_map={"": device},
                  attn_implementation=implementation(cfg.model.attn_implementation),
                  trust_remote_code=cfg.model.trust_remote_code,
                  # None lets transformers fall back to pytorch_model.bin, a pickle: only when the recipe opts in.
                  use_safetensors=None if cfg.model.allow_pickle else True,
                  # transformers 5.25 swaps layers for hub kernels by default (it installs the `kernels` package),
                  # and again at every train()/eval(), undoing the forwards the levers give a module (a tiled or
                  # liger-kernel RMSNorm; 5.24 and before: off unless asked). The levers choose kernels here.
                  use_kernels=False)
    if cfg.quant.method == "qlora":
        kwargs["quantization_config"] = quantization_config(cfg.quant, dtype)
    started = announce(f"loading {path}{checkpoint_size(path)} as {load_form(cfg, dtype)} onto {device}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError, pickle.UnpicklingError) as err:  # "not a usable checkpoint"
        if offline:
            raise ConfigError(f"model.path={path} is not a local directory, and the hub cannot be reached ({offline}) "
                              "nor holds it in its local cache: download it first, or point model.path at a local "
                              "copy") from err
        raise ConfigError(load_error(path, err)) from err
    print(f"loaded in {since(started)}")
    model.config.use_cache = False  # the KV cache only costs memory in training
    keep_cpu_weights_exact(model)
    if cfg.quant.method == "qlora":
        rebuild_base(model, cfg, path, dtype)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    check_vocab(model.get_input_embeddings().num_embeddings, tokenizer, f"model.path={path}")
    return model, tokenizer, path


def checkpoint_size(path: str) -> str:
    """` (270 MB of safetensors)` for a local checkpoint, for the loading line; empty for a hub id."""
    files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")] \
        if os.path.isdir(path) else []
    size = sum(map(os.path.getsize, files))
    return f" ({size / 1e9:.1f} GB of safetensors)" if size >= 1e9 else \
        f" ({size / 1e6:.1f} MB of safetensors)" if files else ""


def load_form(cfg: Config, dtype: torch.dtype) -> str:
    """How the base is held: `NF4 + double quant, fp32 compute` or `bf16`."""
    name = str(dtype).removeprefix("torch.")
    if cfg.quant.method != "qlora":
        return name
    return f"{cfg.quant.quant_type.upper()}{' + double quant' if cfg.quant.double_quant else ''}, {name} compute"


def rebuild_base(model: torch.nn.Module, cfg: Config, path: str, dtype: torch.dtype) -> None:
    """The 4-bit layers the recipe wants other than transformers' load made them, re-read from the checkpoint one
    at a time: quant.keep_16bit in the load dtype, and every other one at quant.blocksize when that is not 64."""
    quantized = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    unknown = [name for name in cfg.quant.keep_16bit if name not in quantized]
    if unknown:
        raise ConfigError(f"quant.keep_16bit names {unknown[0]}, which is not a 4-bit linear layer of {path}: "
                          f"use full names such as {quantized[0]}")
    keep = [name for name in quantized if name in set(cfg.quant.keep_16bit)]
    if keep:
        before = weight_bytes(model)
        keep_16bit(model, path, keep, dtype)
        print(f"quant.keep_16bit: {len(keep)} linear layers in {str(dtype).removeprefix('torch.')}, base weights "
              f"+{(weight_bytes(model) - before) / 2**20:,.2f} MiB ({100 * (weight_bytes(model) / before - 1):+.1f}%)")
    if cfg.quant.blocksize != LOADER_BLOCKSIZE:
        before = weight_bytes(model)
        rebuild_from_checkpoint(model, path, [name for name in quantized if name not in keep], dtype,
                                lambda _, weight, old: linear4bit(weight, old.bias, cfg.quant, dtype))
        print(f"quant.blocksize={cfg.quant.blocksize}: {len(quantized) - len(keep)} layers quantised again from "
              f"the checkpoint, base weights {100 * (weight_bytes(model) / before - 1):+.1f}%")


def keep_16bit(model: torch.nn.Module, path: str, names: list[str], dtype: torch.dtype) -> None:
    """Put the named 4-bit layers back in 16-bit: their checkpoint weights cast to `dtype`, as a 16-bit load holds
    them (bit-identical to quant.method=lora's layers)."""
    rebuild_from_checkpoint(model, path, names, dtype, lambda _, weight, old: dense_linear(weight, old.bias))
