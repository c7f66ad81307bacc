"""Which models the GGUF export writes, in llama.cpp's layout for their architecture, and the one-line refusal of the
rest: architectures, rotary scalings, activations and tokenizers it does not write correctly.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import gguf
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from qlora.errors import ConfigError


class Layout(NamedTuple):
    """How llama.cpp stores one transformers architecture (convert_hf_to_gguf.py's class for it)."""

    arch: gguf.MODEL_ARCH
    """llama.cpp's architecture: the file's tensor names and metadata keys."""
    interleave: bool
    """q and k rows permuted within each head (LlamaModel.undo_permute): llama.cpp's llama architecture rotates
    dimension i with i + 1, transformers with i + d/2. Its qwen2 rotates as transformers does (NEOX), unpermuted."""
    rope_types: tuple[str, ...]
    """The rotary scalings llama.cpp runs in it: linear is a key every architecture reads, Llama 3's rope_freqs a
    tensor only the llama architecture loads (its qwen2 would count one tensor too many and refuse the file)."""
    family: str
    """The models a refusal names as written: the architecture alone says little to a user."""


ARCHITECTURES = {
    "LlamaForCausalLM": Layout(gguf.MODEL_ARCH.LLAMA, True, ("default", "linear", "llama3"), "Llama 1-3, SmolLM"),
    # llama.cpp's converter writes Mistral as a Llama (LlamaModel): the same layers, and no key for its window
    "MistralForCausalLM": Layout(gguf.MODEL_ARCH.LLAMA, True, ("default", "linear", "llama3"),
                                 "Mistral without a sliding window"),
    "Qwen2ForCausalLM": Layout(gguf.MODEL_ARCH.QWEN2, False, ("default", "linear"), "Qwen2, Qwen2.5"),
}
# What a refused model can do instead: llama.cpp's own converter covers more architectures, scalings and tokenizers.
CONVERT_INSTEAD = "merge it with python -m qlora.merge and convert that with llama.cpp's convert_hf_to_gguf.py"


def layout(config: PretrainedConfig) -> Layout | None:
    """llama.cpp's layout for the checkpoint's architecture, or None where the export writes none."""
    return ARCHITECTURES.get((getattr(config, "architectures", None) or ["?"])[0])


def check_exportable(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, base: str) -> Layout:
    """llama.cpp's layout for the checkpoint, refusing in one line what this export does not write correctly: other
    architectures, a sliding window llama.cpp would not keep, rotary scalings other than the layout's, activations
    other than SiLU, tokenizers other than byte-level BPE with merges."""
    arch, found = (getattr(config, "architectures", None) or ["?"])[0], layout(config)
    if found is None:
        families = ", ".join(f"{name} ({known.family})" for name, known in ARCHITECTURES.items())
        raise ConfigError(f"{base} is a {arch}: the GGUF export writes {families} models only; {CONVERT_INSTEAD}")
    name = gguf.MODEL_ARCH_NAMES[found.arch]
    if window := binding_window(config):
        raise ConfigError(f"{base} attends within a sliding window of {window} tokens (sliding_window, in a context "
                          f"of {config.max_position_embeddings}), which llama.cpp's {name} architecture does not "
                          "store: it would attend past the window, as the run never did; run the merged checkpoint "
                          "(python -m qlora.merge) with transformers instead")
    if rope(config)["rope_type"] not in found.rope_types:
        raise ConfigError(f"{base} scales its rotary embedding by {rope(config)['rope_type']!r}: the export writes "
                          f"{', '.join(found.rope_types)} for llama.cpp's {name} architecture; {CONVERT_INSTEAD}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"{base} uses hidden_act={config.hidden_act!r}: llama.cpp's {name} architecture is SiLU "
                          "only; run the merged checkpoint (python -m qlora.merge) with transformers instead")
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if tokenizer.is_fast else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(spec.get(
            "pre_tokenizer")):
        raise ConfigError(f"the tokenizer of {base} is not a byte-level BPE one (as Llama 3's and SmolLM's are): "
                          f"SentencePiece-style tokenizers (Llama 2, Mistral) are not exported yet; {CONVERT_INSTEAD}")
    if not model.get("merges"):  # gguf's writer refuses an empty array, and llama.cpp a BPE file without merges
        raise ConfigError(f"the tokenizer of {base} is byte-level BPE without merges (one token per byte), which "
                          "llama.cpp cannot load: export a model whose tokenizer learned merges")
    return found


def binding_window(config: PretrainedConfig) -> int | None:
    """The sliding window the model's layers attend within, where it is shorter than the context: Mistral's
    sliding_window (v0.1: 4,096 of 32,768; v0.2 on: none), Qwen2's where use_sliding_window gave layers one
    (transformers leaves sliding_window None otherwise). llama.cpp's llama and qwen2 read no window."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return window if window < config.max_position_embeddings else None


def rope(config: PretrainedConfig) -> dict:
    """The rotary settings, as transformers 5 (rope_parameters) or 4 (rope_theta, rope_scaling) holds them."""
    params = {**(getattr(config, "rope_scaling", None) or {}), **(getattr(config, "rope_parameters", None) or {})}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    return params


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
