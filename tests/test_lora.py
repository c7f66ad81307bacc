"""LoRA on the tiny Llama: zero init, merge parity, only adapters train, NF4 error."""

from __future__ import annotations

import copy
import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from support import architecture

from qlora.adapters.lora import LoRALinear, attach_lora, lora_layers, merge_all, save_adapter, target_names, unmerge_all
from qlora.base.build import TINY_ARCHITECTURES
from qlora.base.load import load_base
from qlora.config import apply_overrides
from qlora.errors import ConfigError


def tokens(n_rows: int = 2, width: int = 24) -> torch.Tensor:
    return torch.randint(0, 259, (n_rows, width), generator=torch.Generator().manual_seed(0))


def randomise_b(model: torch.nn.Module) -> None:
    """A trained-looking adapter: B is zero at init, which would make every parity check trivial."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_zero_initialised_adapter_leaves_outputs_unchanged(tiny_config, method):
    tiny_config.quant.method = method
    model, _, _ = load_base(tiny_config, torch.device("cpu"))
    model.eval()
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
        attach_lora(model, tiny_config.lora, torch.float32)
        after = model(x).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # ...and the adapter is not inert: a non-zero B moves the outputs.
    randomise_b(model)
    with torch.no_grad():
        assert (model(x).logits - before).abs().max() > 1e-3


@pytest.mark.parametrize("build", list(TINY_ARCHITECTURES))
def test_every_linear_layer_but_lm_head_is_adapted(tiny_config, build):
    cfg = apply_overrides(tiny_config, architecture(build))
    model, _, _ = load_base(cfg, torch.device("cpu"))
    names = attach_lora(model, cfg.lora, torch.float32)
    kinds = {name.rsplit(".", 1)[-1] for name in names}
    # Phi-3 fuses q/k/v into one layer and gate/up into another: each is adapted whole, as PEFT's all-linear does.
    expected = ({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if build == "tiny-phi3" else
                {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    assert kinds == expected
    assert len(names) == len(expected) * model.config.num_hidden_layers
    assert not isinstance(model.get_output_embeddings(), LoRALinear)
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in lora_layers(model).values())
    left = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit))
            and ".lora_" not in n and not n.endswith(".base_layer")]
    assert left == ["lm_head"]


def test_only_adapters_require_grad_and_change(tiny_config):
    model, _, _ = load_base(tiny_config, torch.device("cpu"))
    attach_lora(model, tiny_config.lora, torch.float32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    x = tokens()
    model(x, labels=x).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param.detach(), frozen[name]), name
    assert any(not torch.equal(p.detach(), adapters[n]) for n, p in model.named_parameters() if n in adapters)


def test_merge_and_unmerge_on_a_16bit_base(tiny_config):
    tiny_config.quant.method = "lora"
    model, _, _ = load_base(tiny_config, torch.device("cpu"))
    attach_lora(model, tiny_config.lora, torch.float32)
    randomise_b(model)
    model.eval()
    x = tokens()
    with torch.no_grad():
        unmerged = model(x).logits
        merge_all(model)
        merged = model(x).logits
        unmerge_all(model)
        restored = model(x).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(restored, unmerged, rtol=1e-5, atol=1e-5)


def test_merge_into_4bit_is_refused(tiny_config):
    model, _, _ = load_base(tiny_config, torch.device("cpu"))
    attach_lora(model, tiny_config.lora, torch.float32)
    with pytest.raises(ValueError, match="4-bit"):
        merge_all(model)


def test_targets_by_suffix_and_an_unmatched_target(tiny_config):
    model, _, _ = load_base(tiny_config, torch.device("cpu"))
    names = target_names(model, ["q_proj", "v_proj"])
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    assert target_names(model, ["model.layers.1.mlp.down_proj"]) == ["model.layers.1.mlp.down_proj"]  # in full
    with pytest.raises(ConfigError, match="matches no linear layer.*q_proj"):
        target_names(model, ["query"])


def test_lora_math_matches_the_formula():
    base = torch.nn.Linear(16, 8, bias=False)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0, dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16)
    expected = x @ base.weight.T + (8 / 4) * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_a_fresh_adapter_and_its_dropout_are_peft_s(dropout):
    """At one seed PEFT's LoRA layer draws the same A (Kaiming-uniform, a=sqrt(5)) and zero B; with B set, both give
    the same output in training (the same dropout mask, with the update added by train.fuse_lora_add's GEMM too) and
    in evaluation (no dropout)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = torch.nn.Linear(16, 12, bias=False)
    torch.manual_seed(0)
    ours = LoRALinear(base, r=4, alpha=8, dropout=dropout, dtype=torch.float32)
    torch.manual_seed(0)
    theirs = PeftLinear(base, "default", LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout), r=4, lora_alpha=8)
    torch.testing.assert_close(ours.lora_A.weight, theirs.lora_A["default"].weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.lora_B.weight, theirs.lora_B["default"].weight, rtol=0, atol=0)
    with torch.no_grad():
        b = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
        ours.lora_B.weight.copy_(b)
        theirs.lora_B["default"].weight.copy_(b)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    for training, fused in ((True, False), (True, True), (False, False)):  # fused: train.fuse_lora_add's GEMM
        ours.train(training)
        theirs.train(training)
        ours.fuse_add = fused
        torch.manual_seed(3)
        got = ours(x)
        torch.manual_seed(3)
        torch.testing.assert_close(got, theirs(x), rtol=1e-6, atol=1e-6)


def test_peft_loads_an_adapter_of_alpha_other_than_r_with_equal_logits(tiny_config, tmp_path):
    """The tiny recipe has alpha = r, where a scale read or written as alpha, r or 1 goes unseen: here alpha/r = 3."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = apply_overrides(tiny_config, ["--quant.method=lora", "--lora.r=8", "--lora.alpha=24",
                                        "--lora.targets=q_proj,down_proj"])
    model, _, base_path = load_base(cfg, torch.device("cpu"))
    attach_lora(model, cfg.lora, torch.float32)
    randomise_b(model)
    save_adapter(model, cfg.lora, base_path, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                       str(tmp_path / "adapter")).eval()
    model.eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_nf4_double_quant_error_is_in_the_expected_range():
    """NF4 on N(0, 1) weights, blocksize 64: relative RMS error about 0.095 (QLoRA's NF4 is near-optimal for normal
    data; plain 4-bit uniform is about 0.12). Double quant adds almost nothing: its constants are 8-bit."""
    weight = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    errors = {}
    for nested in (False, True):
        packed, state = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=nested)
        restored = bnbF.dequantize_4bit(packed, state)
        errors[nested] = ((restored - weight).pow(2).mean().sqrt() / weight.pow(2).mean().sqrt()).item()
        assert packed.numel() == weight.numel() // 2  # two 4-bit codes per byte
    assert 0.07 < errors[False] < 0.12, errors
    assert abs(errors[True] - errors[False]) < 0.005, errors


@pytest.mark.parametrize("flag", ["use_dora", "use_rslora", "fan_in_fan_out"])
def test_an_adapter_config_of_another_lora_variant_is_refused(tmp_path, flag):
    """DoRA scales each column, rsLoRA by alpha/sqrt(r), fan_in_fan_out stores B A transposed: eval, generate and a
    merge that took them for plain LoRA would run or fold another model than PEFT's."""
    from qlora.adapters.lora import ADAPTER_CONFIG, read_adapter_config

    config = {"r": 8, "lora_alpha": 16, "use_dora": False, "use_rslora": False, "fan_in_fan_out": False}
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    assert read_adapter_config(tmp_path)["lora_alpha"] == 16
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, flag: True}))
    with pytest.raises(ConfigError, match="DoRA, rsLoRA and fan_in_fan_out adapters are not ours to merge"):
        read_adapter_config(tmp_path)


def test_train_seed_alone_draws_the_adapters(tiny_config) -> None:
    """build_model seeds torch with train.seed before the adapters are drawn: the same seed the same A whatever the
    process drew before (a notebook, a second run in one process), another seed another A. Unseeded, or seeded after
    the adapters, train.seed changed nothing a fresh process draws and two runs of one seed differed in one process."""
    from qlora.training.assemble import build_model

    def adapters(seed: int, before: int) -> dict:
        torch.manual_seed(before)
        torch.rand(7)
        cfg = apply_overrides(copy.deepcopy(tiny_config), [f"--train.seed={seed}"])
        model = build_model(cfg)["model"]
        return {name: layer.lora_A.weight.detach().clone() for name, layer in lora_layers(model).items()}

    first, again, other = adapters(0, before=1), adapters(0, before=2), adapters(1, before=1)
    assert first and first.keys() == again.keys() == other.keys()
    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0)
        assert not torch.equal(other[name], first[name]), name
