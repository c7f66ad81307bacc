"""Speed levers (reuse_dequant, fuse_lora_add, fuse_lora, dequant_once, compile): loss and gradients of the plain
path."""

from __future__ import annotations

import pytest
import torch
from support import SCALED_LORA, CountOps, assert_same, build, loss_and_grads

from qlora.config import Config, apply_overrides
from qlora.errors import ConfigError


def dequantisations(model: torch.nn.Module, batch: dict) -> tuple[int, tuple]:
    with CountOps() as ops:
        result = loss_and_grads(model, batch)
    # bitsandbytes' forward dequantises inside gemm_4bit; its backward and DequantLinear4bit call dequantize_4bit.
    return ops.calls.get("bitsandbytes.gemm_4bit.default", 0) + ops.calls.get(
        "bitsandbytes.dequantize_4bit.default", 0), result


def test_reuse_dequant_keeps_grads_and_saves_a_third_of_dequantisations(tiny_config: Config, batch: dict) -> None:
    import bitsandbytes as bnb

    plain_model = build(tiny_config)
    n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in plain_model.modules())  # 7 projections x 2 layers
    plain_count, plain = dequantisations(plain_model, batch)
    reuse_count, reused = dequantisations(build(tiny_config, "--train.reuse_dequant=true"), batch)
    assert_same(reused, plain)
    assert (plain_count, reuse_count) == (3 * n_4bit, 2 * n_4bit)  # forward, recompute, backward -> no backward


def test_reuse_dequant_needs_checkpointing(tiny_config: Config) -> None:
    with pytest.raises(ConfigError, match="reuse_dequant"):
        apply_overrides(tiny_config, ["--train.gradient_checkpointing=false", "--train.reuse_dequant=true"])


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_fuse_lora_add_keeps_loss_and_grads(tiny_config: Config, batch: dict, method: str) -> None:
    plain = loss_and_grads(build(tiny_config, f"--quant.method={method}"), batch)
    model = build(tiny_config, f"--quant.method={method}", "--train.fuse_lora_add=true")
    with CountOps() as ops:
        fused = loss_and_grads(model, batch)
    assert_same(fused, plain)
    assert ops.calls.get("aten.addmm_.default", 0) >= 14  # the in-place path ran (forward and recompute)


@pytest.mark.parametrize("what", ["lora", "layers"])
def test_compile_keeps_loss_and_grads(tiny_config: Config, batch: dict, what: str) -> None:
    from qlora.levers.speed.kernels import compile_model

    torch._dynamo.reset()
    plain = loss_and_grads(build(tiny_config), batch)
    model = build(tiny_config)
    # aot_eager traces and partitions forward/backward like inductor but skips code generation, which takes
    # minutes on two CPU cores; the trainer's switch uses inductor.
    assert compile_model(model, what, backend="aot_eager") > 0
    assert_same(loss_and_grads(model, batch), plain)


# The fused paths (fused.py) reorder sums (the adapter's input gradient added into the base's by one addmm), so they
# equal the plain path to fp32 rounding, not bitwise.
FUSED_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "dropout"), [("qlora", "0.1"), ("qlora", "0"), ("lora", "0.1")])
def test_fuse_lora_keeps_loss_and_grads(tiny_config: Config, batch: dict, method: str, dropout: str) -> None:
    overrides = (f"--quant.method={method}", f"--lora.dropout={dropout}")
    plain = loss_and_grads(build(tiny_config, *overrides), batch)
    model = build(tiny_config, *overrides, "--train.fuse_lora=true")
    with CountOps() as ops:
        fused = loss_and_grads(model, batch)
    assert_same(fused, plain, **FUSED_TOL)
    adapters = 14  # 7 projections x 2 layers
    # The update added in place in the forward and its recompute; with no dropout the input gradients too.
    assert ops.calls.get("aten.addmm_.default", 0) == 2 * adapters + (adapters if dropout == "0" else 0)


@pytest.mark.parametrize(("method", "lever"), [("qlora", "fuse_lora"), ("qlora", "fuse_lora_add"),
                                               ("qlora", "dequant_once"), ("qlora", "reuse_dequant"),
                                               ("lora", "fuse_lora"), ("lora", "fuse_lora_add")])
def test_fused_paths_keep_biases_and_the_scaling(tiny_config: Config, batch: dict, unlike_tiny, lever: str,
                                                 method: str) -> None:
    """The tiny recipe has alpha = r (scaling 1) and no biases: a fused node or a kept dequantised weight without its
    bias, or the fused node without alpha/r in the forward, in the adapter's input gradient or in B's gradient,
    passed the tests above; and fuse_lora_add on a 4-bit layer with a bias raised at the first step
    (lora.writable)."""
    overrides = (*unlike_tiny("biased"), f"--quant.method={method}", *SCALED_LORA)
    plain = loss_and_grads(build(tiny_config, *overrides), batch)
    assert_same(loss_and_grads(build(tiny_config, *overrides, f"--train.{lever}=true"), batch), plain, **FUSED_TOL)


def test_dequant_once_dequantises_each_weight_once_for_the_run(tiny_config: Config, batch: dict) -> None:
    import bitsandbytes as bnb

    plain_model = build(tiny_config)
    n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in plain_model.modules())
    plain = loss_and_grads(plain_model, batch)
    model = build(tiny_config, "--train.dequant_once=true")
    with CountOps() as ops:
        first, second = loss_and_grads(model, batch), loss_and_grads(model, batch)  # two micro-batches (or steps)
    assert_same(first, plain)
    assert_same(second, plain)
    dequantised = ops.calls.get("bitsandbytes.dequantize_4bit.default", 0) + ops.calls.get(
        "bitsandbytes.gemm_4bit.default", 0)
    assert dequantised == n_4bit  # plain: 3 x n_4bit per micro-batch (forward, recompute, backward)
    # With fuse_lora as well, the fused node reads the same kept weights.
    both = build(tiny_config, "--train.dequant_once=true", "--train.fuse_lora=true")
    with CountOps() as ops:
        assert_same(loss_and_grads(both, batch), plain, **FUSED_TOL)
    assert ops.calls.get("bitsandbytes.dequantize_4bit.default", 0) == n_4bit


def test_the_dequantised_weights_are_counted_by_the_estimate(tiny_config: Config) -> None:
    """The layer backward holds the largest dequantised weight (gate/up/down: 131,072 B in fp32), a whole layer's
    with reuse_dequant (589,824 B), none with dequant_once, whose copies of every layer are counted with the weights
    (2 x 589,824 B). The estimate without reuse_dequant's layer, or with dequant_once's transient weight as well as
    its copies, passed a test that compared the copies with their own formula."""
    from qlora.memory.arch import load_arch
    from qlora.memory.estimate import estimate

    arch = load_arch(tiny_config)
    plain = estimate(tiny_config, arch, "qlora", "cpu")
    reuse = estimate(apply_overrides(tiny_config, ["--train.reuse_dequant=true"]), arch, "qlora", "cpu")
    assert (reuse.peak_phase, reuse.peak_bytes - plain.peak_bytes) == ("layer_backward", 589_824 - 131_072)
    once = estimate(apply_overrides(tiny_config, ["--train.reuse_dequant=false", "--train.dequant_once=true"]), arch,
                    "qlora", "cpu")
    assert once.components["unquantized_weights"] - plain.components["unquantized_weights"] == 2 * 589_824
    assert (once.peak_phase, once.peak_bytes - plain.peak_bytes) == ("layer_backward", 2 * 589_824 - 131_072)
    with pytest.raises(ConfigError, match="train.dequant_once keeps every dequantised weight"):
        apply_overrides(tiny_config, ["--train.reuse_dequant=true"])


def test_a_4bit_head_is_left_to_bitsandbytes_by_reuse_dequant_and_dequant_once(tiny_config: Config,
                                                                               batch: dict) -> None:
    """quant.quantize_lm_head asked for the head's memory back: its weight saved from the end of the forward to the
    loss backward (reuse_dequant) or kept in 16 bits for the run (dequant_once) is V h e on the card that the
    estimate does not count (1.0 GiB for Llama-3.1-8B in bf16, 2.1 GiB for 70B). Every other 4-bit layer is still
    dequantised once fewer per step, or kept: the 2 layers' 589,824 B of fp32 copies the estimate counts."""
    import bitsandbytes as bnb

    from qlora.levers.speed.memory import kept_dequantised_bytes
    from qlora.memory.arch import load_arch

    head = "--quant.quantize_lm_head=true"
    plain_model = build(tiny_config, head)
    assert isinstance(plain_model.get_output_embeddings(), bnb.nn.Linear4bit)
    layers_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in plain_model.modules()) - 1  # 14, the head left out
    plain_count, plain = dequantisations(plain_model, batch)
    reuse_count, reused = dequantisations(build(tiny_config, head, "--train.reuse_dequant=true"), batch)
    assert_same(reused, plain)
    assert plain_count - reuse_count == layers_4bit  # the head is dequantised again for its backward
    model = build(tiny_config, head, "--train.dequant_once=true")
    assert_same(loss_and_grads(model, batch), plain)
    kept = [m.dequantised for m in model.modules() if getattr(m, "dequantised", None) is not None]
    assert len(kept) == layers_4bit
    arch = load_arch(tiny_config)
    assert sum(w.numel() * w.element_size() for w in kept) == kept_dequantised_bytes(arch.linear_shapes, arch.layers,
                                                                                      4) == 2 * 589_824


def test_fuse_lora_leaves_adapters_in_another_dtype_than_the_input_to_the_plain_path() -> None:
    """An input in another dtype than the adapters (a layer before handing back its own dtype: LoRALinear.forward's
    cast) is the plain path's, which casts it: the fused node multiplies the two as they come, and would raise at the
    first step. Every test above runs in fp32 alone, where the guard is never needed."""
    from qlora.adapters.lora import LoRALinear
    from qlora.levers.speed.fused import fuse_lora

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 8, dtype=torch.bfloat16).requires_grad_(False), r=4, alpha=8,
                       dropout=0.0, dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B.weight)  # B starts at zero: the update would add nothing
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    plain = layer(x)
    plain.sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    assert fuse_lora(layer) == 1
    for t in (x, layer.lora_A.weight, layer.lora_B.weight):
        t.grad = None
    fused = layer(x)
    fused.sum().backward()
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)
    for grad, t in zip(grads, (x, layer.lora_A.weight, layer.lora_B.weight), strict=True):
        torch.testing.assert_close(t.grad, grad, rtol=0, atol=0)


@pytest.mark.parametrize(("what", "modules"), [("lora", 14), ("layers", 4)])
def test_the_compile_switch_compiles_what_it_names(tiny_config: Config, what: str, modules: int,
                                                   capsys: pytest.CaptureFixture) -> None:
    """train.compile reaches the model through apply_speed_levers, which the case above passes by (it calls
    compile_model itself): the switch compiling nothing for one target passed it. torch.compile is lazy, so this
    builds the model alone: 7 adapters x 2 layers, or attention and MLP x 2 layers."""
    model = build(tiny_config, f"--train.compile={what}")
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == modules
    assert f"train.compile={what}: {modules} modules" in capsys.readouterr().out
