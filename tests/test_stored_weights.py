"""The safetensors headers of a model directory against its config.json (qlora/base/stored_weights.py), called
directly: the cases its mutation testing found no test for (h58); the refusals through the CLI are in
test_bad_input.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from qlora.base.stored_weights import check_weights
from qlora.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_a_gpt_neox_checkpoint_passes_under_the_names_transformers_loads_it_by(tmp_path: Path) -> None:
    """GPT-NeoX (Pythia) stores its head as embed_out.weight, which transformers renames lm_head.weight on load: it
    was refused as missing. Its checkpoints also store each layer's causal mask (attention.bias, masked_bias), which
    the model names in _keys_to_ignore_on_load_unexpected: no tensor the config has no place for; another is."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    masks = {"gpt_neox.layers.0.attention.bias": torch.ones(1, 1, 8, 8, dtype=torch.bool).tril(),
             "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9)}
    save_file({**weights, **masks}, tmp_path / "model.safetensors")
    check_weights(tmp_path, "model.path=m")
    save_file({**weights, **masks, "gpt_neox.layers.0.attention.scale": torch.tensor(1.0)},
              tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"holds gpt_neox.layers.0.attention.scale, which the model config.json "):
        check_weights(tmp_path, "model.path=m")

