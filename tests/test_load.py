"""The base as load_base holds it, against the checkpoint's own files: which layers are 4-bit and how bitsandbytes
quantises them, which stay in the compute dtype, and the tokenizer's pad token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from qlora.base.build import ensure_checkpoint
from qlora.base.load import DTYPES, load_base, load_tokenizer
from qlora.config import Config, apply_overrides

CPU = torch.device("cpu")


@pytest.mark.parametrize(("quant_type", "double_quant", "compute"), [("nf4", True, "fp32"), ("fp4", False, "bf16")])
def test_the_layers_are_bitsandbytes_own_quantisation_of_the_checkpoint(tiny_config: Config, quant_type: str,
                                                                        double_quant: bool, compute: str) -> None:
    """Every decoder projection 4-bit: bitsandbytes' own quantize_4bit of the checkpoint's weight in the compute dtype,
    at quant.quant_type and quant.double_quant; everything else (norms, embeddings, lm_head) the checkpoint's tensor
    in the compute dtype."""
    cfg = apply_overrides(tiny_config, [f"--quant.quant_type={quant_type}", f"--quant.compute_dtype={compute}",
                                        f"--quant.double_quant={str(double_quant).lower()}"])
    model, _, path = load_base(cfg, CPU)
    dtype, stored = DTYPES[compute], load_file(Path(path) / "model.safetensors")
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit == {n.removesuffix(".weight") for n in stored if n.endswith("_proj.weight")}
    for name in four_bit:
        layer = model.get_submodule(name)
        state = layer.weight.quant_state
        assert (layer.compute_dtype, state.quant_type, state.nested) == (dtype, quant_type, double_quant), name
        packed, reference = bnbF.quantize_4bit(stored[f"{name}.weight"].to(dtype), blocksize=64, quant_type=quant_type,
                                               compress_statistics=double_quant)
        torch.testing.assert_close(bnbF.dequantize_4bit(layer.weight.data, state),
                                   bnbF.dequantize_4bit(packed, reference), rtol=0, atol=0)
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    kept = {n: p for n, p in model.named_parameters() if n.removesuffix(".weight") not in four_bit}
    assert set(kept) == set(stored) - {f"{n}.weight" for n in four_bit}
    for name, p in kept.items():
        torch.testing.assert_close(p, stored[name].to(dtype), rtol=0, atol=0)


def test_the_tokenizer_pads_with_its_own_pad_token_else_its_eos(tiny_config: Config, tmp_path: Path) -> None:
    path = Path(ensure_checkpoint(tiny_config))
    assert load_tokenizer(str(path)).pad_token == AutoTokenizer.from_pretrained(path).pad_token == "<|endoftext|>"
    shutil.copytree(path, tmp_path / "no_pad")
    config = json.loads((tmp_path / "no_pad" / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (tmp_path / "no_pad" / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(tmp_path / "no_pad").pad_token is None
    assert load_tokenizer(str(tmp_path / "no_pad")).pad_token == "<|im_end|>"


def test_a_checkpoints_own_model_code_not_run_is_said_as_it_loads(tiny_config: Config, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """The tiny checkpoint with an auto_map naming its own model class: transformers' Llama loads in its place, and
    load_base says so (qlora.base.model_dir.unrun_code), once."""
    copy = tmp_path / "own-code"
    shutil.copytree(ensure_checkpoint(tiny_config), copy)
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (copy / "config.json").write_text(json.dumps(config))
    load_base(apply_overrides(tiny_config, [f"--model.path={copy}", "--model.build=none"]), CPU)
    assert capsys.readouterr().out.count("ships model code of its own (config.json's auto_map: modeling_x.XForCausalLM)"
                                         ", which is not run: transformers' own llama is loaded") == 1
