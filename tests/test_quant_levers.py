"""The base's quantisation levers on the tiny Llama: layers kept in 16-bit by measured sensitivity
(quant.keep_16bit_budget), smaller 4-bit blocks (quant.blocksize)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file
from support import architecture
from torch import nn

from qlora import eval as run_eval
from qlora.base.build import ensure_checkpoint
from qlora.base.load import keep_16bit, keep_cpu_weights_exact, load_base, load_tokenizer
from qlora.base.quantize import dequantize, roundtrip, weight_bytes
from qlora.config import Config, apply_overrides, load_recipe
from qlora.data.labels import IGNORE
from qlora.errors import ConfigError
from qlora.memory.arch import load_arch
from qlora.memory.estimate import estimate
from qlora.memory.profiler import estimated_peak
from qlora.memory.readings import tensor_categories
from qlora.memory.terms import nf4_bytes
from qlora.merge.checkpoint import merge, merge_error
from qlora.merge.fold import quantized_modules
from qlora.train import train
from qlora.training.assemble import checkpoint_every_layer, load_run
from qlora.training.loss import loss_sum
from qlora.training.sensitivity import calibration_batches, candidates, choose, input_output_moments, layer_costs

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def tiny(*overrides: str) -> Config:
    return apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), list(overrides))


def checkpoint_weights(cfg: Config) -> dict[str, torch.Tensor]:
    return load_file(str(Path(cfg.model.path) / "model.safetensors"))


def moments_and_costs(cfg: Config, checkpointing: bool) -> tuple[nn.Module, dict, list]:
    model, tokenizer, path = load_base(cfg, CPU)
    if checkpointing:
        checkpoint_every_layer(model)
    moments = input_output_moments(model, calibration_batches(cfg, tokenizer), candidates(model))
    return model, moments, layer_costs(model, path, moments, torch.float32)


def test_moments_are_the_same_with_and_without_checkpointing() -> None:
    """A checkpointed layer runs twice (forward, then recompute in the backward); it must be counted once."""
    cfg = tiny()
    _, plain, costs = moments_and_costs(cfg, checkpointing=False)
    model, checkpointed, _ = moments_and_costs(cfg, checkpointing=True)
    assert all(p.grad is None for p in model.parameters())  # only activations' gradients were made
    assert set(plain) == set(checkpointed) and len(plain) == 14
    for name in plain:
        for ours, theirs in zip(plain[name], checkpointed[name], strict=True):
            assert ours.abs().sum() > 0, name
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=0)
    assert all(c.cost > 0 and c.extra_bytes > 0 for c in costs)


def direct_moments(model: nn.Module, batches: list[dict], names: list[str]) -> dict[str, tuple]:
    """input_output_moments written out: each layer's inputs and outputs kept whole, the gradients of the summed loss
    at the outputs taken by autograd.grad, and the squares summed over the real tokens (a padded position's input is
    not one the rows give; its output gradient is zero, as nothing attends to it)."""
    sums, seen = {}, {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen[name] = (args[0].detach(), out)
        return hook

    for batch in batches:
        seen.clear()
        hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
        hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
        try:
            loss = loss_sum(model, batch, 0)
        finally:
            for hook in hooks:
                hook.remove()
        grads = torch.autograd.grad(loss, [seen[n][1] for n in names])
        real = batch["attention_mask"].float()[..., None]
        for n, grad in zip(names, grads, strict=True):
            x2, g2 = (seen[n][0].square() * real).sum((0, 1)), grad.square().sum((0, 1))
            sums[n] = (sums[n][0] + x2, sums[n][1] + g2) if n in sums else (x2, g2)
    return sums


def test_moments_costs_and_extra_bytes_are_the_formula_computed_directly() -> None:
    """Every survivor of a mutation pass went unseen by the tests above: padding counted in E[x^2], |x| or |g| for
    their squares, |W - Q| for its square in the cost, the calibration batches one short, and a 16-bit layer's extra
    bytes counted at fp32 or without the 4-bit state it frees. Each is checked against the docstring's formula,
    computed here from whole tensors, bitsandbytes' own dequantisation and the loader's bytes."""
    cfg = tiny("--quant.calibration_rows=5", "--train.batch_size=2")
    model, tokenizer, path = load_base(cfg, CPU)
    batches = calibration_batches(cfg, tokenizer)
    assert len(batches) == 3 and any((b["attention_mask"] == 0).any() for b in batches)  # 5 rows of 2: padded
    names = candidates(model)
    ours = input_output_moments(model, batches, names)
    for p in model.parameters():
        p.requires_grad_(False)
    direct = direct_moments(model, batches, names)
    for n in names:
        for mine, theirs in zip(ours[n], direct[n], strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-9)
    weights = load_file(str(Path(path) / "model.safetensors"))
    for cost in layer_costs(model, path, ours, torch.float32):
        layer = model.get_submodule(cost.name)
        delta = weights[f"{cost.name}.weight"].float() - bnb.functional.dequantize_4bit(
            layer.weight.data, layer.weight.quant_state).float()
        x2, g2 = direct[cost.name]
        assert cost.cost == pytest.approx(0.5 * float((g2[:, None] * delta.square() * x2[None, :]).sum()), rel=1e-4)
    name = names[0]
    before = weight_bytes(model)
    (extra,) = [c.extra_bytes for c in layer_costs(model, path, {name: ours[name]}, torch.bfloat16)]
    keep_16bit(model, path, [name], torch.bfloat16)
    assert extra == weight_bytes(model) - before


@torch.no_grad()
def logit_error(model: nn.Module, reference: nn.Module, batches: list[dict]) -> float:
    """Squared distance of the model's logits from the 16-bit model's at the calibration targets' positions."""
    total = 0.0
    for b in batches:
        ours, theirs = (m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                        for m in (model, reference))
        targets = b["labels"][:, 1:] != IGNORE  # the logits at t predict the token at t + 1
        total += float((ours - theirs)[:, :-1][targets].square().sum())
    return total


def test_the_cost_ranks_layers_by_what_restoring_them_gives_back() -> None:
    """The layer the estimate ranks first, restored alone to 16-bit, brings the logits at the training targets closer
    to the 16-bit model's than the one it ranks last: the estimate measures where rounding matters to the output. (On
    a random model the loss itself is no measure: rounding moves it either way at first order.)"""
    cfg = tiny()
    model, _, costs = moments_and_costs(cfg, checkpointing=False)
    path = cfg.model.path
    batches = calibration_batches(cfg, load_tokenizer(path))
    reference, _, _ = load_base(tiny("--quant.method=lora"), CPU)
    nf4 = logit_error(model.eval(), reference.eval(), batches)
    ranked = sorted(costs, key=lambda c: c.cost, reverse=True)
    gains = []
    for layer in (ranked[0], ranked[-1]):
        restored, _, _ = load_base(cfg, CPU)
        keep_16bit(restored, path, [layer.name], torch.float32)
        gains.append(nf4 - logit_error(restored.eval(), reference, batches))
    assert gains[0] > 0 and gains[0] > 5 * abs(gains[1]), gains


def test_choose_spends_the_budget_by_cost_per_byte() -> None:
    from qlora.training.sensitivity import LayerCost

    costs = [LayerCost("a", 10.0, 100), LayerCost("b", 9.0, 30), LayerCost("c", 1.0, 50), LayerCost("d", 0.0, 1)]
    assert [c.name for c in choose(costs, 140)] == ["b", "a"]  # b first (0.3 per byte), then a fits; c does not
    assert [c.name for c in choose(costs, 99)] == ["b", "c"]  # a no longer fits; c does; d gives nothing
    assert choose(costs, 0) == []


def test_kept_layers_are_exactly_the_16bit_ones_within_the_budget(tiny_config: Config, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    tiny_config.quant.keep_16bit_budget = 0.15
    tiny_config.train.steps = 3
    result = train(tiny_config)
    out = capsys.readouterr().out
    run_dir = Path(tiny_config.output.dir)
    kept = json.loads((run_dir / "run_config.json").read_text())["quant"]["keep_16bit"]
    assert kept and "quant.keep_16bit_budget=0.15" in out and all(f"  {name}: " in out for name in kept)

    # eval, generate and merge rebuild the run from run_config.json: the same mixed base, the same numbers.
    cfg, model, _, _ = load_run(run_dir)
    assert cfg.quant.keep_16bit == kept
    weights = checkpoint_weights(cfg)
    bases = {name: layer.base_layer for name, layer in model.named_modules() if hasattr(layer, "base_layer")}
    assert {name for name, base in bases.items() if type(base) is nn.Linear} == set(kept)
    assert all(isinstance(base, bnb.nn.Linear4bit) for name, base in bases.items() if name not in kept)
    for name in kept:  # the checkpoint's weights, as a 16-bit load holds them
        torch.testing.assert_close(bases[name].weight, weights[f"{name}.weight"].float(), rtol=0, atol=0)
    again = run_eval.evaluate_run(run_dir)
    assert {key: again[key] for key in result["after"]} == result["after"]

    # The budget: what the kept layers add to the 4-bit base's weights.
    plain, _, _ = load_base(tiny(), CPU)
    mixed, _, _ = load_base(cfg, CPU)
    assert 0 < weight_bytes(mixed) - weight_bytes(plain) <= 0.15 * weight_bytes(plain)
    # The estimator counts the chosen layers to the byte, and the run's memory.json carries its figure for them.
    est = estimate(cfg, load_arch(cfg), "qlora", "cpu")
    real = tensor_categories(mixed)
    assert {k: est.components[k] for k in real if k.endswith("_weights")} == \
        {k: v for k, v in real.items() if k.endswith("_weights")}
    # memory.json's estimate (at the longest row the run padded to) is the one for the chosen layers, below the one
    # that counts the whole budget.
    memory = json.loads((run_dir / "memory.json").read_text())
    by_length = {estimated_peak(cfg, CPU, n): n for n in range(1, cfg.data.max_seq_len + 1)}
    assert memory["estimated_peak_bytes"] in by_length
    budget_only = apply_overrides(copy.deepcopy(cfg), ["--quant.keep_16bit="])  # it sets the copy in place
    assert estimated_peak(budget_only, CPU, by_length[memory["estimated_peak_bytes"]]) > \
        memory["estimated_peak_bytes"]
    assert memory["peak_by_category"]["unquantized_weights"] == real["unquantized_weights"]

    # The merge takes the kept layers as they are and dequantises the rest.
    info = merge(run_dir, tmp_path / "merged", dtype=torch.float32)
    assert quantized_modules(cfg.model.path, cfg) == set(bases) - set(kept)
    assert merge_error(run_dir, tmp_path / "merged")["vs adapter on 4-bit base"]["within_tolerance"]
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    layer = model.get_submodule(kept[0])
    torch.testing.assert_close(merged[f"{kept[0]}.weight"], weights[f"{kept[0]}.weight"].float() +
                               layer.delta_weight(), rtol=0, atol=1e-6)
    assert info["merged_layers"] == len(bases)


def test_peft_loads_the_adapter_onto_the_mixed_base(tiny_config: Config) -> None:
    """The adapter format is unchanged: PEFT loads it onto transformers' own 4-bit load that skips the kept layers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_config.quant.keep_16bit_budget = 0.15
    tiny_config.train.steps = 3
    train(tiny_config)
    run_dir = Path(tiny_config.output.dir)
    cfg, ours, _, _ = load_run(run_dir)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=[*cfg.quant.keep_16bit, "lm_head"])
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, quantization_config=quant, dtype=torch.float32,
                                                device_map={"": "cpu"})
    keep_cpu_weights_exact(base)
    theirs = PeftModel.from_pretrained(base, str(run_dir)).eval()
    x = torch.randint(0, 259, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)


def test_a_resumed_run_keeps_the_layers_chosen_at_its_start(tiny_config: Config, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    tiny_config.quant.keep_16bit_budget = 0.15
    tiny_config.train.steps, tiny_config.train.save_every = 2, 1
    whole = train(tiny_config)
    kept = json.loads((Path(tiny_config.output.dir) / "run_config.json").read_text())["quant"]["keep_16bit"]
    # The first run's directory cut back to its first checkpoint; the choice in it is then changed by hand, so only
    # reading it (not measuring again) keeps the changed layers.
    import shutil

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(Path(tiny_config.output.dir) / "checkpoint-1", resumed / "checkpoint-1")
    shutil.copy(Path(tiny_config.output.dir) / "run_config.json", resumed / "run_config.json")
    capsys.readouterr()
    cfg = tiny_config
    cfg.output.dir, cfg.quant.keep_16bit = str(resumed), []
    assert train(cfg, resume=True)["after"] == whole["after"]
    assert "as chosen when the run started" in capsys.readouterr().out
    assert json.loads((resumed / "run_config.json").read_text())["quant"]["keep_16bit"] == kept


@pytest.mark.parametrize("overrides", [["--quant.blocksize=32"], ["--quant.double_quant=false"],
                                       ["--quant.keep_16bit=model.layers.0.mlp.down_proj,model.layers.1.self_attn.q_proj"],
                                       ["--quant.keep_16bit_budget=0.05"]])
def test_the_estimate_counts_kept_layers_and_block_size(overrides: list[str]) -> None:
    """The estimator's weights equal the loaded model's to the byte; a budget alone is counted in full."""
    cfg = tiny(*overrides)
    est = estimate(cfg, load_arch(cfg), "qlora", "cpu").components
    if cfg.quant.keep_16bit_budget:
        plain = estimate(tiny(), load_arch(cfg), "qlora", "cpu").components
        weights = plain["quantized_weights"] + plain["unquantized_weights"]
        assert est["unquantized_weights"] - plain["unquantized_weights"] == int(0.05 * weights)
        return
    real = tensor_categories(load_base(cfg, CPU)[0])
    for key in ("quantized_weights", "unquantized_weights"):
        assert est[key] == real[key], key


def test_smaller_blocks_are_the_loaders_rounding_at_that_size_and_closer_to_16bit() -> None:
    cfg = tiny("--quant.blocksize=32")
    model, _, _ = load_base(cfg, CPU)
    plain, _, _ = load_base(tiny(), CPU)
    weights = checkpoint_weights(cfg)
    errors = {32: 0.0, 64: 0.0}
    for name, layer in model.named_modules():
        if not isinstance(layer, bnb.nn.Linear4bit):
            continue
        assert layer.weight.quant_state.blocksize == 32
        held, w16 = dequantize(layer), weights[f"{name}.weight"].float()
        torch.testing.assert_close(held, roundtrip(w16, cfg.quant, torch.float32, CPU), rtol=0, atol=0)  # merge's
        errors[32] += float((held - w16).square().sum())
        errors[64] += float((dequantize(plain.get_submodule(name)) - w16).square().sum())
    assert errors[32] < 0.95 * errors[64], errors
    assert nf4_bytes(128 * 256, blocksize=32) > nf4_bytes(128 * 256)


def test_layers_rebuilt_from_a_bf16_checkpoint_are_cast_and_biased_as_the_loader_makes_them(tmp_path: Path) -> None:
    """The tiny Qwen2 (q/k/v biases, drawn here: its builder leaves them zero) saved in bf16 and loaded to compute in
    fp32 (CPU): transformers casts each tensor to fp32 before quantising, so the layers read back from the checkpoint
    are cast too, and keep their biases. The one kept in 16-bit holds the checkpoint's bf16 values and bias in fp32
    (not a bf16 layer in an fp32 model), those quantised again at blocksize 32 are the rounding of the fp32 weight,
    dequantising to fp32, beside their bias. An uncast rebuild, or one that dropped the bias, kept every test on the
    tiny Llama's fp32 checkpoint, which has no biases, green."""
    qwen2 = tiny(*architecture("tiny-qwen2"))
    source = Path(ensure_checkpoint(qwen2))
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (tmp_path / item.name).symlink_to(item)
    generator = torch.Generator().manual_seed(0)
    weights = {k: (torch.randn(v.shape, generator=generator) if k.endswith(".bias") else v).to(torch.bfloat16)
               for k, v in checkpoint_weights(qwen2).items()}
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    kept = "model.layers.0.self_attn.q_proj"
    cfg = tiny(f"--model.path={tmp_path}", "--model.build=none", "--quant.blocksize=32", f"--quant.keep_16bit={kept}")
    model, _, _ = load_base(cfg, CPU)
    layer = model.get_submodule(kept)
    assert layer.weight.dtype == torch.float32
    torch.testing.assert_close(layer.weight, weights[f"{kept}.weight"].float(), rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, weights[f"{kept}.bias"].float(), rtol=0, atol=0)
    for name, layer in model.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            w = weights[f"{name}.weight"].float()
            torch.testing.assert_close(dequantize(layer), roundtrip(w, cfg.quant, torch.float32, CPU), rtol=0, atol=0)
            bias = weights.get(f"{name}.bias")
            assert (layer.bias is None) == (bias is None), name
            if bias is not None:
                torch.testing.assert_close(layer.bias, bias.float(), rtol=0, atol=0)
    assert model(torch.randint(0, 200, (1, 8))).logits.dtype == torch.float32


def test_bad_settings_are_refused_with_the_key_and_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"quant.blocksize=48: .* --quant.blocksize=32"):
        tiny("--quant.blocksize=48")
    with pytest.raises(ConfigError, match=r"quant.keep_16bit_budget=1.5 must lie in \[0, 1\)"):
        tiny("--quant.keep_16bit_budget=1.5")
    with pytest.raises(ConfigError, match="quant.method=lora loads none"):
        tiny("--quant.method=lora", "--quant.keep_16bit_budget=0.05")
    with pytest.raises(ConfigError, match="keep_16bit names model.layers.9.mlp.up_proj, which is not a linear"):
        load_base(tiny("--quant.keep_16bit=model.layers.9.mlp.up_proj"), CPU)


def test_quality_benchmark_holds_a_variant_to_the_gap_target() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    def runs(*losses: float, em: float = 0.9, base: int = 100) -> dict[int, dict]:
        return {seed: {"eval_loss": loss, "eval_exact_match": em, "base_bytes": base, "base_bytes_cuda": base}
                for seed, loss in enumerate(losses)}

    lora, qlora = runs(0.06, 0.05), runs(0.12, 0.11)
    half = quality.improvement(lora, qlora, runs(0.09, 0.08, base=105))
    assert half["gap_closed"] == pytest.approx(0.5) and half["paired_gap_closed"] == pytest.approx([0.5, 0.5])
    assert half["meets_target"] and half["weights_rel"]["base_bytes"] == pytest.approx(0.05)
    assert not quality.improvement(lora, qlora, runs(0.09, 0.08, base=111))["meets_target"]  # > 10% more weights
    assert not quality.improvement(lora, qlora, runs(0.09, 0.08, em=0.8))["meets_target"]  # loses exact match
    assert not quality.improvement(lora, qlora, runs(0.10, 0.09))["meets_target"]  # a third of the gap


def test_quality_benchmark_reuses_a_run_that_chose_its_layers(tiny_config: Config) -> None:
    """--reuse compares the recipe's config with the run's: the layers a budget chose are the run's, not a change."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    tiny_config.quant.keep_16bit_budget, tiny_config.train.steps = 0.15, 2
    train(tiny_config)
    run_dir = Path(tiny_config.output.dir)
    run_dir.with_suffix(".log").write_text("trainable 1 of 2 parameters\n")
    again = tiny("--quant.keep_16bit_budget=0.15", "--train.steps=2", "--train.eval_every=0", "--train.log_every=1")
    assert quality.finished_with(run_dir, again)
    assert not quality.finished_with(run_dir, tiny("--quant.keep_16bit_budget=0.1", "--train.steps=2",
                                                   "--train.eval_every=0", "--train.log_every=1"))
    base = quality.base_weights(run_dir)
    assert base["base_bytes"] > 0 and base["base_bytes_cuda"] > 0


def test_the_screen_scores_each_untrained_base_against_the_16bit_one(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quant_screen

    quant_screen.main(["recipes/tiny.py", "--methods", "qlora,qlora-keep10", "--rows", "8",
                       "--results", str(tmp_path)])
    result = json.loads((tmp_path / "quant-screen-cpu.json").read_text())["methods"]
    assert "kl" not in result["lora"] and result["qlora"]["kl"] > 0
    assert result["qlora-keep10"]["kept_16bit"] and result["qlora-keep10"]["base_bytes"] > result["qlora"]["base_bytes"]
    assert "| QLoRA (NF4 + double quant) |" in (tmp_path / "quant-screen-cpu.md").read_text()


def test_quality_benchmark_takes_untrained_pairs_from_an_earlier_result() -> None:
    """--earlier: the pairs not trained here come from the earlier result (without base-weight bytes of their own
    unless a run of the method was trained here); a pair trained both times is kept from here and set side by side."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    def run(loss: float, base: int | None = None) -> dict:
        weights = {"base_bytes": base, "base_bytes_cuda": base} if base else {}
        return {**weights, "eval_loss": loss, "eval_exact_match": 0.9, "before": {"eval_loss": 4.0}}

    runs = {"lora": {0: run(0.06, 500)}, "qlora": {0: run(0.12, 100)}, "qlora-keep10": {0: run(0.09, 110)}}
    earlier = {"date": "2026-11-23T21:52:50+00:00", "command": "python benchmarks/quality.py", "versions": {},
               "runs": {"lora": {"0": run(0.0683), "1": run(0.0494)}, "qlora": {"1": run(0.1228)},
                        "qlora-loftq": {"0": run(0.0956)}}}
    taken = quality.take_earlier(runs, earlier)
    assert taken["taken"] == [["lora", 1], ["qlora", 1], ["qlora-loftq", 0]]
    assert taken["compared"] == [{"method": "lora", "seed": 0, "eval_loss": [0.06, 0.0683],
                                  "eval_exact_match": [0.9, 0.9]}]
    assert runs["lora"][0]["eval_loss"] == 0.06 and runs["lora"][1]["eval_loss"] == 0.0494
    assert runs["qlora"][1]["base_bytes"] == 100 and runs["qlora-loftq"][0]["base_bytes"] is None
    loftq = quality.improvement(runs["lora"], runs["qlora"], runs["qlora-loftq"])
    assert loftq["weights_rel"]["base_bytes"] is None and not loftq["meets_target"]
