"""The safetensors headers of a model directory against its config.json (qlora/base/stored_weights.py), called
directly: the cases its mutation testing found no test for (h58); the refusals through the CLI are in
test_bad_input.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from qlora.base.build import BUILDERS, INDEX, ensure_checkpoint
from qlora.base.stored_weights import check_kept_layers, check_weights
from qlora.config import load_recipe
from qlora.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def tiny_copy(out: Path) -> tuple[Path, dict]:
    """A copy of the tiny Llama at `out` without its weights, and the weights."""
    tiny = Path(ensure_checkpoint(load_recipe(ROOT / "recipes" / "tiny.py")))
    shutil.copytree(tiny, out, ignore=shutil.ignore_patterns("model.safetensors"))
    return out, load_file(tiny / "model.safetensors")


def test_a_tied_checkpoint_that_stores_its_head_too_passes(tmp_path: Path) -> None:
    """Some tied checkpoints store lm_head.weight beside the embedding it shares: the model has no parameter of its
    own for it, and transformers ties it; it is no tensor the config has no place for."""
    BUILDERS["tiny-llama-tied"](tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in weights
    save_file({**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()},
              tmp_path / "model.safetensors")
    check_weights(tmp_path, "model.path=m")


def test_weights_stored_without_the_base_models_prefix_are_checked_under_it(tmp_path: Path) -> None:
    """`layers.0...` for `model.layers.0...` (transformers adds the prefix on load): checked as the model's own names,
    so a shape the config disagrees with is refused as it is for names with the prefix."""
    path, weights = tiny_copy(tmp_path / "m")
    save_file({k.removeprefix("model."): v for k, v in weights.items()}, path / "model.safetensors")
    check_weights(path, "model.path=m")
    save_file({k.removeprefix("model."): v[:, :64].contiguous() if k == "model.embed_tokens.weight" else v
               for k, v in weights.items()}, path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"config.json makes model.embed_tokens.weight \(embed_tokens.weight in "
                                          r"the file\) \[259, 128\], but model.safetensors holds it as \[259, 64\]"):
        check_weights(path, "model.path=m")


# Meta's own names for Llama's weights (its consolidated checkpoints), which transformers' loader does not map.
META_NAMES = {"model.embed_tokens.": "tok_embeddings.", "model.layers.": "layers.", "lm_head.": "output.",
              ".self_attn.q_proj.": ".attention.wq.", ".self_attn.k_proj.": ".attention.wk.",
              ".self_attn.v_proj.": ".attention.wv.", ".self_attn.o_proj.": ".attention.wo.",
              ".mlp.gate_proj.": ".feed_forward.w1.", ".mlp.down_proj.": ".feed_forward.w2.",
              ".mlp.up_proj.": ".feed_forward.w3.", ".input_layernorm.": ".attention_norm.",
              ".post_attention_layernorm.": ".ffn_norm."}


def test_weights_in_a_scheme_the_loader_does_not_map_are_refused(tmp_path: Path) -> None:
    """Most names unmatched were taken for a scheme transformers' conversions map, for any model: a Llama in Meta's
    names passed, the loader's report listed them all unexpected and missing, the base loaded at random and the run
    ended in a bitsandbytes AssertionError (exit 1). A model the loader only renames for is refused in one line."""
    path, weights = tiny_copy(tmp_path / "m")

    def meta(name: str) -> str:
        for ours, theirs in META_NAMES.items():
            name = name.replace(ours, theirs)
        return name

    save_file({meta(k): v for k, v in weights.items()}, path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"^model.path=m: most tensors of its safetensors files are named "
                                          r"otherwise than transformers loads LlamaForCausalLM by \(layers.0.attention"
                                          r".w.\.weight where it expects model.embed_tokens.weight\): the weights are "
                                          r"in another format; use the model's Hugging Face \(transformers\) "
                                          r"checkpoint$"):
        check_weights(path, "model.path=m")


def test_a_tensor_the_config_has_no_place_for_is_named_with_the_shard_holding_it(tmp_path: Path) -> None:
    """Sharded: the line names the shard that holds the stray tensor, not another of the checkpoint's files."""
    path, weights = tiny_copy(tmp_path / "m")
    names = list(weights)
    first = {n: weights[n] for n in names[:len(names) // 2]}
    second = {n: weights[n] for n in names[len(names) // 2:]}
    save_file({**first, "model.layers.9.mlp.up_proj.weight": weights["model.layers.0.mlp.up_proj.weight"].clone()},
              path / "model-00001-of-00002.safetensors")
    save_file(second, path / "model-00002-of-00002.safetensors")
    weight_map = {**dict.fromkeys([*first, "model.layers.9.mlp.up_proj.weight"], "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(second, "model-00002-of-00002.safetensors")}
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ConfigError, match=r"model.path=m: model-00001-of-00002.safetensors holds "
                                          r"model.layers.9.mlp.up_proj.weight, which the model config.json describes "
                                          r"has no place for \(transformers would drop it, 1 tensor\(s\) in all\)"):
        check_weights(path, "model.path=m")


@pytest.mark.parametrize("name", ["model.norm", "model.layers.0.input_layernorm"])
def test_a_kept_layer_that_is_a_norm_is_refused_from_the_headers(name: str) -> None:
    """quant.keep_16bit names linear layers: a norm's weight is stored too, but as a vector, no matrix."""
    tiny = ensure_checkpoint(load_recipe(ROOT / "recipes" / "tiny.py"))
    check_kept_layers(["model.layers.0.mlp.down_proj"], tiny)
    with pytest.raises(ConfigError, match=rf"quant.keep_16bit names {name}, which is not a linear layer of "):
        check_kept_layers([name], tiny)


def test_the_model_compared_with_is_built_without_memory_for_its_weights(tmp_path: Path) -> None:
    """The model whose shapes the headers are compared with is built on the meta device: a config.json of a model
    far past the host's memory (here 2^40 embedding rows, 512 TiB) over small weights gets its line, where a build
    in memory fails to allocate and leaves the weights unchecked."""
    path, weights = tiny_copy(tmp_path / "m")
    save_file(weights, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": 2**40}))
    with pytest.raises(ConfigError, match=r"config.json makes model.embed_tokens.weight \[1099511627776, 128\], but "
                                          r"model.safetensors holds it as \[259, 128\]"):
        check_weights(path, "model.path=m")


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
    # A line about a renamed tensor names it as the file does too: no embed_out.weight is called lm_head there.
    save_file({**weights, "embed_out.weight": weights["embed_out.weight"][:32]}, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"config.json makes lm_head.weight \(embed_out.weight in the file\) \[64, "
                                          r"32\], but model.safetensors holds it as \[32, 32\]"):
        check_weights(tmp_path, "model.path=m")
