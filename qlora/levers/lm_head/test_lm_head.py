"""The output head in NF4 (quantize_lm_head): it computes with its dequantised weight, refuses a tied table, and
saves what the estimate says."""

from __future__ import annotations

import copy

import pytest
import torch
from support import build, loss_and_grads

from qlora.config import Config, apply_overrides
from qlora.errors import ConfigError
from qlora.memory.arch import load_arch
from qlora.memory.estimate import estimate
from qlora.memory.readings import tensor_categories
from qlora.training.assemble import load_model
from qlora.training.loss import target_hidden


def test_quantized_lm_head_computes_with_its_dequantised_weight(tiny_config: Config, batch: dict) -> None:
    import bitsandbytes as bnb

    plain = build(tiny_config)
    model = build(tiny_config, "--quant.quantize_lm_head=true")
    head = model.get_output_embeddings()
    assert isinstance(head, bnb.nn.Linear4bit) and not any(p.requires_grad for p in head.parameters())
    with torch.no_grad():
        hidden, _, _ = target_hidden(model, batch)
        w = bnb.functional.dequantize_4bit(head.weight, head.weight.quant_state)
        torch.testing.assert_close(head(hidden), hidden @ w.T)
        # NF4 moves each head weight by up to ~1/16 of its block's absmax.
        assert (w - plain.get_output_embeddings().weight).abs().max() > 0
    # Stated tolerance, for this random tiny model (measured in brackets): the summed loss within 1% of the 16-bit
    # head's (0.04%); all adapter gradients together within 15% relative error (8.8%), each tensor's gradient
    # pointing the same way to cosine >= 0.98 (0.990).
    quantised, reference = loss_and_grads(model, batch), loss_and_grads(plain, batch)
    torch.testing.assert_close(quantised[0], reference[0], rtol=1e-2, atol=0)
    flat_q, flat_r = (torch.cat([g.flatten() for g in grads[1].values()]) for grads in (quantised, reference))
    assert (flat_q - flat_r).norm() <= 0.15 * flat_r.norm()
    for name, grad in reference[1].items():
        assert torch.cosine_similarity(quantised[1][name].flatten(), grad.flatten(), dim=0) >= 0.98, name


def test_quantized_lm_head_refuses_tied_embeddings(tiny_config: Config) -> None:
    from qlora.levers.lm_head.head import quantize_lm_head

    model = build(tiny_config)
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    with pytest.raises(ConfigError, match="ties lm_head"):
        quantize_lm_head(model, tiny_config.quant, torch.float32)


def test_quantized_lm_head_saves_what_the_estimate_says(tiny_config: Config) -> None:
    """quant.quantize_lm_head on CPU: the loaded model's weights, to the byte, with and without the NF4 head."""
    for cfg in (tiny_config, apply_overrides(copy.deepcopy(tiny_config), ["--quant.quantize_lm_head=true"])):
        real = tensor_categories(load_model(cfg, torch.device("cpu"))[0])
        est = estimate(cfg, load_arch(cfg), "qlora", "cpu").components
        for key in ("quantized_weights", "unquantized_weights"):
            assert est[key] == real[key], (cfg.quant.quantize_lm_head, key)
