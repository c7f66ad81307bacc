"""The output head in NF4 (quantize_lm_head): it computes with its dequantised weight, refuses a tied table, and
saves what the estimate says."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from support import ROOT, build, cuda_only, loss_and_grads

from qlora.config import Config, QuantConfig, apply_overrides, load_recipe
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


def test_quantized_lm_head_refuses_tied_embeddings(tiny_config: Config, unlike_tiny) -> None:
    from qlora.levers.lm_head.head import quantize_lm_head

    model = build(tiny_config)
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    with pytest.raises(ConfigError, match="ties lm_head"):
        quantize_lm_head(model, tiny_config.quant, torch.float32)
    # A tied base (Qwen2's small models, Llama 3.2's) as the trainer loads it: one line, naming the key.
    with pytest.raises(ConfigError, match=r"^quant.quantize_lm_head: this model ties lm_head[^\n]*$"):
        build(tiny_config, *unlike_tiny("qwen2-tied"), "--quant.quantize_lm_head=true")


def test_quantized_lm_head_keeps_the_heads_bias(tiny_config: Config, batch: dict) -> None:
    """No base the tests build has a biased head, so a quantised head that lost its bias (not copied, or not added
    after the sliced matmul) passed every other test."""
    import bitsandbytes as bnb

    from qlora.levers.lm_head.head import quantize_lm_head

    model = build(tiny_config)
    head = model.get_output_embeddings()
    bias = torch.randn(head.out_features, generator=torch.Generator().manual_seed(0))
    head.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    quantize_lm_head(model, tiny_config.quant, torch.float32)
    head = model.get_output_embeddings()
    with torch.no_grad():
        hidden = target_hidden(model, batch)[0]
        w = bnb.functional.dequantize_4bit(head.weight, head.weight.quant_state)
        torch.testing.assert_close(head(hidden), hidden @ w.T + bias)


def test_quantized_lm_head_saves_what_the_estimate_says(tiny_config: Config) -> None:
    """quant.quantize_lm_head on CPU: the loaded model's weights, to the byte, with and without the NF4 head."""
    for cfg in (tiny_config, apply_overrides(copy.deepcopy(tiny_config), ["--quant.quantize_lm_head=true"])):
        real = tensor_categories(load_model(cfg, torch.device("cpu"))[0])
        est = estimate(cfg, load_arch(cfg), "qlora", "cpu").components
        for key in ("quantized_weights", "unquantized_weights"):
            assert est[key] == real[key], (cfg.quant.quantize_lm_head, key)


def test_the_loss_counts_the_slice_of_the_head_dequantised_at_once() -> None:
    """The 70B recipe's NF4 head (V=128,256, h=8,192, bf16) in the loss's backward: its column slice, 1,024 columns
    (256 MiB over V rows x 2 bytes, in whole blocks of 64), dequantised beside its packed bytes and absmax, and every
    block's absmax in fp32: 0.40 GB that the loss holds beyond a 16-bit head's."""
    V, h, cols = 128_256, 8_192, 1_024
    slice_ = V * cols * 2 + V * cols // 2 + V * (cols // 64) * 4
    head = load_recipe(ROOT / "recipes" / "llama70b.py")
    assert head.quant.quantize_lm_head
    plain = apply_overrides(copy.deepcopy(head), ["--quant.quantize_lm_head=false"])
    loss = [estimate(cfg, load_arch(cfg), "qlora", "cuda").phases["loss_backward"] for cfg in (head, plain)]
    assert loss[0] - loss[1] == slice_ + V * h // 64 * 4


def test_the_memory_report_gives_an_nf4_head_to_qlora_alone() -> None:
    """The memory report estimates a qlora recipe for lora and full fine-tuning too, whose 16-bit bases keep a 16-bit
    head: their columns must not list quant.quantize_lm_head among the levers, nor count it."""
    head = load_recipe(ROOT / "recipes" / "llama70b.py")
    plain = apply_overrides(copy.deepcopy(head), ["--quant.quantize_lm_head=false"])
    for method in ("lora", "full"):
        got, expected = (estimate(cfg, load_arch(cfg), method, "cuda") for cfg in (head, plain))
        assert (got.levers, got.peak_bytes) == (expected.levers, expected.peak_bytes), method
    assert estimate(head, load_arch(head), "qlora", "cuda").levers != estimate(plain, load_arch(plain), "qlora",
                                                                                "cuda").levers


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("slice_bytes", [4096, 2**30], ids=["several slices", "one slice"])
def test_the_head_dequantised_a_slice_at_a_time_computes_as_bitsandbytes_does(
        tiny_config: Config, batch: dict, monkeypatch: pytest.MonkeyPatch, double_quant: bool,
        slice_bytes: int) -> None:
    """The logits and their input gradient as bitsandbytes' whole-weight matmul gives them, from the same weights to
    the bit, with no more than SLICE_BYTES of the head dequantised at once (the tiny head: 259 x 128 in fp32, 4 KiB
    slices of 8 rows and of 64 columns)."""
    import bitsandbytes as bnb

    from qlora.levers.lm_head import head as sliced
    from qlora.levers.lm_head import memory

    model = build(tiny_config, "--quant.quantize_lm_head=true", f"--quant.double_quant={str(double_quant).lower()}")
    head = model.get_output_embeddings()
    assert type(head) is sliced.NF4Head and head.weight.quant_state.nested == double_quant
    monkeypatch.setattr(memory, "SLICE_BYTES", slice_bytes)
    dequantised = []
    monkeypatch.setattr(sliced, "_dequantised", lambda *args, f=sliced._dequantised: dequantised.append(f(*args))
                        or dequantised[-1])
    with torch.no_grad():
        hidden = target_hidden(model, batch)[0]
    got, expected = (hidden.clone().requires_grad_(True) for _ in range(2))
    out, reference = head(got), bnb.nn.Linear4bit.forward(head, expected)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    rows = list(dequantised)
    dequantised.clear()
    upstream = torch.randn_like(out)
    out.backward(upstream)
    reference.backward(upstream)
    torch.testing.assert_close(got.grad, expected.grad, rtol=1e-6, atol=1e-6)
    whole = bnb.functional.dequantize_4bit(head.weight, head.weight.quant_state)
    cols = dequantised
    assert torch.equal(torch.cat(rows), whole) and torch.equal(torch.cat(cols, dim=1), whole)
    assert len(rows) == (33 if slice_bytes == 4096 else 1) and len(cols) == (2 if slice_bytes == 4096 else 1)
    assert max(w.numel() * w.element_size() for w in rows + cols) <= max(slice_bytes, 259 * 64 * 4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only, id="on_cuda")])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_every_blocksize_is_sliced_as_bitsandbytes_packs_it(monkeypatch: pytest.MonkeyPatch, device: str,
                                                           double_quant: bool, blocksize: int) -> None:
    """Every quant.blocksize the config allows, on bitsandbytes' CPU kernels and its CUDA ones (the sliced head has
    run only the CPU's): each slice cut from the packed bytes and absmax dequantises to bitsandbytes' whole weight
    bit for bit. 48 x 8,192 in bf16 with 256 KiB slices: 3 of 16 rows; 4 of 2,720 columns (blocks of 32, the last
    32 wide) down to 2,048, or 2 of one 4,096 block."""
    import bitsandbytes as bnb

    from qlora.base.quantize import linear4bit
    from qlora.levers.lm_head import head as sliced
    from qlora.levers.lm_head import memory

    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(48, 8192, generator=generator) * 0.02).to(device, torch.bfloat16)
    quant = QuantConfig(blocksize=blocksize, double_quant=double_quant)
    head = linear4bit(weight, None, quant, torch.bfloat16, sliced.NF4Head)
    monkeypatch.setattr(memory, "SLICE_BYTES", 16 * 8192 * 2)
    dequantised = []
    monkeypatch.setattr(sliced, "_dequantised", lambda *args, f=sliced._dequantised: dequantised.append(f(*args))
                        or dequantised[-1])
    x = (torch.randn(3, 5, 8192, generator=generator)).to(device, torch.bfloat16)
    got, expected = (x.clone().requires_grad_(True) for _ in range(2))
    out, reference = head(got), bnb.nn.Linear4bit.forward(head, expected)
    rows = list(dequantised)
    dequantised.clear()
    upstream = torch.randn(out.shape, generator=generator).to(device, out.dtype)
    out.backward(upstream)
    reference.backward(upstream)
    whole = bnb.functional.dequantize_4bit(head.weight, head.weight.quant_state)
    assert len(rows) == 3 and len(dequantised) == (2 if blocksize == 4096 else 4)
    assert torch.equal(torch.cat(rows), whole) and torch.equal(torch.cat(dequantised, dim=1), whole)
    # The same dot products, in bf16 through other matmul shapes: as close as bf16 rounding leaves them.
    torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.grad, expected.grad, rtol=2e-2, atol=2e-2)


@cuda_only
def test_on_cuda_llama3s_head_is_never_dequantised_whole() -> None:
    """Llama-3's head (128,256 x 8,192, 1.96 GiB in bf16) over a 256-token chunk of the loss, forward and backward:
    bitsandbytes' forward holds its whole dequantised weight; ours at most a slice of it, with the same numbers."""
    import bitsandbytes as bnb

    from qlora.base.quantize import linear4bit
    from qlora.levers.lm_head.head import NF4Head

    weight = torch.randn(128256, 8192, dtype=torch.bfloat16, device="cuda") * 0.02
    head = linear4bit(weight, None, QuantConfig(), torch.bfloat16, NF4Head)
    del weight
    torch.cuda.empty_cache()
    peaks, results = [], []
    for forward in (head.forward, functools.partial(bnb.nn.Linear4bit.forward, head)):
        x = (torch.randn(256, 8192, dtype=torch.bfloat16, device="cuda")).requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        out = forward(x)
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - start)
        results.append((out.detach(), x.grad))
        del out, x
    (ours, ours_grad), (theirs, their_grad) = results
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours_grad, their_grad, rtol=2e-2, atol=2e-1)
    assert peaks[0] < 0.6 * 2**30 < 1.9 * 2**30 < peaks[1], [p / 2**30 for p in peaks]


def test_a_bf16_runs_nf4_head_is_read_back_in_fp32_exactly(tmp_path) -> None:
    """load_run_fp32 is the reference merge and the GGUF export are checked against: a run that trained in bf16 (its
    base loaded and quantised in bf16, as on CUDA), computing in fp32 with each 4-bit weight dequantised to code x
    absmax in fp32. The NF4 head dequantises its slices in its quant state's dtype: left at bf16, the reference's
    logits were rounded (on the tiny base within merge's tolerance, so no merge could tell)."""
    import bitsandbytes as bnb

    from qlora.train import train
    from qlora.training.assemble import load_run_fp32

    cfg = load_recipe(ROOT / "recipes" / "tiny.py")
    cfg.data.train, cfg.data.eval = str(ROOT / cfg.data.train), str(ROOT / cfg.data.eval)
    cfg.output.dir, cfg.quant.compute_dtype, cfg.quant.quantize_lm_head = str(tmp_path / "run"), "bf16", True
    cfg.train.steps, cfg.train.eval_every, cfg.train.eval_before = 1, 0, False
    train(cfg)
    _, model, _, _ = load_run_fp32(tmp_path / "run")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert model.get_output_embeddings() in layers
    for layer in layers:
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
        state = copy.copy(layer.weight.quant_state)
        state.dtype = torch.float32
        exact = bnb.functional.dequantize_4bit(layer.weight.data, state)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ exact.T, rtol=1e-6, atol=1e-6)
    state.dtype = torch.bfloat16
    rounded = bnb.functional.dequantize_4bit(layer.weight.data, state).float()
    assert not torch.allclose(x @ rounded.T, x @ exact.T, rtol=1e-6, atol=1e-6)  # what bf16 would round away
