"""Which models the GGUF export writes, in llama.cpp's layout for their architecture, and the one-line refusal of the
rest: architectures, rotary scalings, activations and tokenizers it does not write correctly.
"""

from __future__ import annotations

import json

import gguf
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from qlora.errors import ConfigError

ARCHITECTURES = {"LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA}
# What a refused model can do instead: llama.cpp's own converter covers more architectures, scalings and tokenizers.
CONVERT_INSTEAD = "merge it with python -m qlora.merge and convert that with llama.cpp's convert_hf_to_gguf.py"
ROPE_TYPES = ("default", "linear", "llama3")


def check_exportable(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, base: str) -> None:
    """Refuse, in one line, what this export does not write correctly: other architectures, rotary scalings other
    than none, linear and Llama 3's, activations other than SiLU, tokenizers other than byte-level BPE with merges."""
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{base} is a {arch}: the GGUF export writes {', '.join(ARCHITECTURES)} models only (Llama "
                          f"1-3, SmolLM); {CONVERT_INSTEAD}")
    if rope(config)["rope_type"] not in ROPE_TYPES:
        raise ConfigError(f"{base} scales its rotary embedding by {rope(config)['rope_type']!r}: the export writes "
                          f"{', '.join(ROPE_TYPES)} only; {CONVERT_INSTEAD}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"{base} uses hidden_act={config.hidden_act!r}: llama.cpp's llama architecture is SiLU only; "
                          "run the merged checkpoint (python -m qlora.merge) with transformers instead")
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if tokenizer.is_fast else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(spec.get(
            "pre_tokenizer")):
        raise ConfigError(f"the tokenizer of {base} is not a byte-level BPE one (as Llama 3's and SmolLM's are): "
                          f"SentencePiece-style tokenizers (Llama 2, Mistral) are not exported yet; {CONVERT_INSTEAD}")
    if not model.get("merges"):  # gguf's writer refuses an empty array, and llama.cpp a BPE file without merges
        raise ConfigError(f"the tokenizer of {base} is byte-level BPE without merges (one token per byte), which "
                          "llama.cpp cannot load: export a model whose tokenizer learned merges")


def rope(config: PretrainedConfig) -> dict:
    """The rotary settings, as transformers 5 (rope_parameters) or 4 (rope_theta, rope_scaling) holds them."""
    params = {**(getattr(config, "rope_scaling", None) or {}), **(getattr(config, "rope_parameters", None) or {})}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    return params


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
