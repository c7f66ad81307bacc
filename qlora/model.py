"""Load the base model: NF4 with double quantisation (qlora), or 16-bit (lora, full), on one device.

Checkpoints that are built rather than downloaded (the tiny random Llama, SmolLM2 converted from its GGUF) are written
once by a builder into the cache and then loaded like any Hugging Face checkpoint, so every method takes one path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import bitsandbytes as bnb
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from qlora.config import Config, ConfigError, QuantConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ChatML, as SmolLM2 uses it; the tiny tokenizer gets it so chat data trains the same way on both.
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# A small Llama: every kind of layer the big ones have (GQA attention, SwiGLU MLP, RMSNorm, RoPE), trains in seconds.
TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)


def cache_dir() -> Path:
    """Where built checkpoints live: $QLORA_CACHE, else ~/.cache/qlora."""
    return Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora")).expanduser()


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible: use --train.device=cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def compute_dtype(quant: QuantConfig, device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp32 on CPU, where a bf16 matmul is ~40x slower (1024x576x1536: 152 ms vs 23 ms forward)."""
    if quant.compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[quant.compute_dtype]


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + ChatML specials; needs no download or corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + len(specials), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML)


def build_tiny_llama(out_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA)
    torch.manual_seed(0)  # the same tiny base on every machine
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def build_smollm2(out_dir: Path) -> None:
    from qlora.convert import write_smollm2_checkpoint

    write_smollm2_checkpoint(out_dir)


BUILDERS: dict[str, Callable[[Path], None]] = {"tiny-llama": build_tiny_llama, "smollm2-135m-instruct": build_smollm2}


def ensure_checkpoint(cfg: Config) -> str:
    """Return the checkpoint path (or hub id), building it into place first when the recipe names a builder."""
    path = os.path.expanduser(cfg.model.path)
    if cfg.model.build is None:
        return path
    if cfg.model.build not in BUILDERS:
        raise ConfigError(f"model.build={cfg.model.build!r} is not one of {', '.join(BUILDERS)}")
    target = Path(path)
    if not (target / "config.json").is_file():
        print(f"building {cfg.model.build} into {target} (once; later runs reuse it)")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            BUILDERS[cfg.model.build](tmp)
            os.replace(tmp, target)  # atomic: a run killed mid-build never leaves a half checkpoint at `target`
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target.resolve())


def quantization_config(quant: QuantConfig, dtype: torch.dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_storage=torch.uint8)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # Llama-3 has none; padding is masked out of the loss anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def keep_cpu_weights_exact(model: torch.nn.Module) -> None:
    """Stop bitsandbytes (0.50) repacking 4-bit weights for its bf16 CPU kernel on the first no-grad forward.

    That repack (`_convert_weight_packed_for_cpu`) rewrites the weight in place and computes in bf16: eval then
    drifts from training by ~4e-3 on tiny-Llama logits, and training after an eval runs on the repacked weight.
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    """Load the base model for `cfg.quant.method` onto `device`; return it, its tokenizer and its path."""
    dtype = compute_dtype(cfg.quant, device)
    if cfg.model.synthetic:
        from qlora.synthetic import load_synthetic

        return load_synthetic(cfg, device, dtype)
    path = ensure_checkpoint(cfg)
    if not os.path.isdir(path) and os.path.sep in path:
        raise ConfigError(f"model.path={path} does not exist: point it at a checkpoint directory or a hub id")
    kwargs = dict(dtype=dtype, device_map={"": device}, attn_implementation=cfg.model.attn_implementation,
                  trust_remote_code=cfg.model.trust_remote_code, use_safetensors=True)
    if cfg.quant.method == "qlora":
        kwargs["quantization_config"] = quantization_config(cfg.quant, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ConfigError(f"model.path={path} could not be loaded ({str(err).splitlines()[0]}): "
                          "check the path, or download the checkpoint first") from err
    model.config.use_cache = False  # the KV cache only costs memory in training
    keep_cpu_weights_exact(model)
    return model, load_tokenizer(path, cfg.model.trust_remote_code), path
