"""The benchmarks measure what they say: the standard stack is what Hugging Face users run, the lever probes work on
the transformers of the GPU image, and the max-context search is bounded. Tiny shapes on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from qlora.build import ensure_checkpoint
from qlora.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks are scripts, not a package
import memory_levers  # noqa: E402
import throughput  # noqa: E402


def synthetic_tiny(*overrides: str) -> list[str]:
    """The tiny Llama's architecture with synthetic NF4 weights, as the 8B and 70B benchmarks build theirs."""
    config_json = ensure_checkpoint(load_recipe(ROOT / "recipes" / "tiny.py"))
    return ["--model.synthetic=true", f"--model.config_json={config_json}/config.json", *overrides]


@pytest.fixture(scope="module")
def standard() -> tuple[torch.nn.Module, object, torch.device]:
    cfg = throughput.base_config("tiny", synthetic_tiny("--quant.compute_dtype=bf16", "--lora.dropout=0"))
    return throughput.build_standard(cfg, "kbit")


def test_standard_stack_checkpoints_every_decoder_layer(standard) -> None:
    from transformers.modeling_layers import GradientCheckpointingLayer

    model, _, _ = standard
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == model.config.num_hidden_layers
    assert all(layer.gradient_checkpointing for layer in layers)


def test_standard_stack_wraps_q_proj_in_peft_bnb_lora(standard) -> None:
    from peft.tuners.lora.bnb import Linear4bit

    model, _, _ = standard
    q_proj = {name: m for name, m in model.named_modules() if name.endswith("q_proj")}
    assert q_proj and all(isinstance(m, Linear4bit) for m in q_proj.values())


def test_standard_stack_in_bf16_computes_q_proj_and_attention_in_bf16(standard) -> None:
    """As Trainer(bf16=True): the adapters' matmuls and SDPA run in bf16, though prepare_model_for_kbit_training left
    the norms, embeddings and LoRA weights in fp32."""
    model, step, device = standard
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(("q_proj lora_A", out.dtype)))
             for name, m in model.named_modules() if name.endswith("q_proj.lora_A.default")]
    hooks += [m.register_forward_pre_hook(lambda mod, args: seen.append(("o_proj input", args[0].dtype)))
              for name, m in model.named_modules() if name.endswith("o_proj")]
    try:
        step(throughput.synthetic_batch(model.config.vocab_size, 2, 32, device))
    finally:
        for hook in hooks:
            hook.remove()
    assert {what for what, _ in seen} == {"q_proj lora_A", "o_proj input"}
    assert all(dtype == torch.bfloat16 for _, dtype in seen), seen
