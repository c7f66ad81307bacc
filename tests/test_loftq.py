"""lora.init=loftq on the tiny Llama: the adapters start as the rank-r correction of the NF4 rounding."""

from __future__ import annotations

import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from qlora.adapters.loftq import SHIFTS, init_loftq, rank_r_factors
from qlora.adapters.lora import attach_lora, lora_layers
from qlora.base.load import load_base
from qlora.config import apply_overrides
from qlora.errors import ConfigError
from qlora.eval import evaluate_run
from qlora.merge.checkpoint import merge, merge_error
from qlora.train import train
from qlora.training.assemble import load_run


def test_rank_r_factors_give_the_truncated_svd() -> None:
    gen = torch.Generator().manual_seed(0)
    # A flat, noise-like spectrum (as NF4 rounding error is): the hard case for a randomised SVD.
    residual = torch.randn(96, 160, generator=gen)
    a, b = rank_r_factors(residual, r=8, scaling=2.0, seed=0)
    assert a.shape == (8, 160) and b.shape == (96, 8)
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    exact = (u[:, :8] * s[:8]) @ vh[:8]
    ours = 2.0 * b @ a
    exact_err, our_err = (residual - exact).norm(), (residual - ours).norm()
    assert our_err <= exact_err * 1.002, (our_err, exact_err)  # within 0.2% of the best rank-8 approximation
    # A matrix of rank r is reproduced exactly.
    low = torch.randn(96, 4, generator=gen) @ torch.randn(4, 160, generator=gen)
    a, b = rank_r_factors(low, r=4, scaling=0.5, seed=0)
    torch.testing.assert_close(0.5 * b @ a, low, rtol=1e-4, atol=1e-4)



def test_a_later_step_quantises_the_weight_less_the_correction() -> None:
    """LoftQ alg. 1: Q_t = NF4(W - scaling B A). With the sign turned every step still removes some error and every
    reload rebuilds the same base, so only the formula itself tells it apart."""
    from qlora.adapters.loftq import shifted

    gen = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(12, 16, generator=gen), torch.randn(4, 16, generator=gen), torch.randn(12, 4, generator=gen)
    torch.testing.assert_close(shifted(w, a, b, 2.0), w - 2.0 * b @ a)

def test_loftq_brings_each_layer_and_the_logits_closer_to_16bit(tiny_config) -> None:
    tiny_config.lora.r = 32
    dense, _, _ = load_base(apply_overrides(tiny_config, ["--quant.method=lora"]), torch.device("cpu"))
    tiny_config.quant.method = "qlora"
    model, _, base_path = load_base(tiny_config, torch.device("cpu"))
    attach_lora(model, tiny_config.lora, torch.float32)
    rng_before = torch.get_rng_state()
    held, _ = init_loftq(model, tiny_config, base_path)
    torch.testing.assert_close(torch.get_rng_state(), rng_before)  # dropout and data order are left alone
    assert 0.2 < held < 1
    for name, layer in lora_layers(model).items():
        w16 = dense.get_submodule(name).weight.float()
        base = layer.base_layer
        assert isinstance(base, bnb.nn.Linear4bit)
        q = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        assert (w16 - q - layer.delta_weight()).norm() < 0.95 * (w16 - q).norm(), name
    x = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        reference = dense(x).logits
        corrected = model(x).logits
        for layer in lora_layers(model).values():
            layer.lora_B.weight.zero_()
        plain = model(x).logits
    assert (corrected - reference).abs().mean() < 0.8 * (plain - reference).abs().mean()


def test_loftq_is_refused_without_a_4bit_base(tiny_config) -> None:
    with pytest.raises(ConfigError, match="lora.init=loftq .* quant.method=lora .* --lora.init=zero"):
        apply_overrides(tiny_config, ["--lora.init=loftq", "--quant.method=lora"])
    with pytest.raises(ConfigError, match="lora.init='gauss': use zero or loftq"):
        apply_overrides(tiny_config, ["--lora.init=gauss"])


def test_a_loftq_run_resumes_exactly_and_merges_onto_the_dequantised_base(tiny_config, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    tiny_config.lora.init = "loftq"
    tiny_config.train.steps = 2
    tiny_config.train.save_every = 1
    tiny_config.train.keep_checkpoints = 2
    whole = train(tiny_config)
    assert "lora.init=loftq: after 1 step(s) at rank" in capsys.readouterr().out
    run_dir = Path(tiny_config.output.dir)
    adapter = load_file(str(run_dir / "adapter_model.safetensors"))
    # A resumed run takes its adapters from the checkpoint, with no second pass over the base; the RNG must match.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(run_dir / "checkpoint-1", resumed_dir / "checkpoint-1")
    tiny_config.output.dir = str(resumed_dir)
    assert train(tiny_config, resume=True)["after"] == whole["after"]
    assert "lora.init=loftq" not in capsys.readouterr().out
    resumed = load_file(str(resumed_dir / "adapter_model.safetensors"))
    for key in adapter:
        torch.testing.assert_close(resumed[key], adapter[key], rtol=0, atol=0)

    with pytest.raises(ConfigError, match="drop --base-16bit"):
        merge(run_dir, tmp_path / "merged16", base_16bit=str(run_dir))
    info = merge(run_dir, tmp_path / "merged", dtype=torch.float32)
    assert info["base_weights"] == "dequantised-nf4"
    assert merge_error(run_dir, tmp_path / "merged")["vs adapter on 4-bit base"]["within_tolerance"]


def test_more_loftq_steps_remove_more_error_and_every_reload_rebuilds_that_base(tiny_config, tmp_path: Path) -> None:
    """lora.loftq_iters=3: base and adapters end closer to the 16-bit weights than after one step; the base differs
    from the ordinary load, and eval, resume and merge rebuild it from the saved shifts, to the bit."""
    tiny_config.lora.init, tiny_config.lora.r = "loftq", 8
    held = {}
    for steps in (1, 2, 3):
        tiny_config.lora.loftq_iters = steps
        model, _, base_path = load_base(tiny_config, torch.device("cpu"))
        attach_lora(model, tiny_config.lora, torch.float32)
        held[steps], shifts = init_loftq(model, tiny_config, base_path)
        assert len(shifts) == (0 if steps == 1 else 2 * 14)
    assert held[1] < held[2] < held[3] and held[3] > held[1] + 0.02, held  # each step counts: none is skipped

    tiny_config.train.steps, tiny_config.train.save_every = 2, 1
    whole = train(tiny_config)
    run_dir = Path(tiny_config.output.dir)
    assert (run_dir / SHIFTS).is_file()
    trained = {name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
               for name, m in load_run(run_dir)[1].named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    plain, _, _ = load_base(apply_overrides(tiny_config, ["--lora.loftq_iters=1"]), torch.device("cpu"))
    name = next(iter(trained))
    assert not torch.equal(trained[name], bnb.functional.dequantize_4bit(
        plain.get_submodule(name.removesuffix(".base_layer")).weight.data,
        plain.get_submodule(name.removesuffix(".base_layer")).weight.quant_state))
    again = evaluate_run(run_dir)
    assert {key: again[key] for key in whole["after"]} == whole["after"]  # the same base as in training
    load_run(run_dir / "checkpoint-1")  # a checkpoint's base is rebuilt from its run's shifts

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for item in ("checkpoint-1", "run_config.json", SHIFTS):
        copy = shutil.copytree if (run_dir / item).is_dir() else shutil.copy
        copy(run_dir / item, resumed / item)
    tiny_config.output.dir = str(resumed)
    assert train(apply_overrides(tiny_config, ["--lora.loftq_iters=3"]), resume=True)["after"] == whole["after"]

    merge(run_dir, tmp_path / "merged", dtype=torch.float32)
    assert merge_error(run_dir, tmp_path / "merged")["vs adapter on 4-bit base"]["within_tolerance"]
    (run_dir / SHIFTS).unlink()
    with pytest.raises(ConfigError, match=f"{SHIFTS} not found"):
        load_run(run_dir)


def test_a_bf16_run_of_several_loftq_steps_merges_to_its_adapter_model(tiny_config, tmp_path: Path) -> None:
    """A bf16 run (compute in bf16, as on CUDA) quantised each shifted layer from W - scaling B A cast to bf16; the
    merge's fp32 difference must be cast the same way before NF4, or other codes come out (measured on this run: the
    fp32 merge's logits 0.48 of 5.2 from the adapter model's, 91% top-1 agreement, where it is within 1e-5)."""
    tiny_config.lora.init, tiny_config.lora.r, tiny_config.lora.loftq_iters = "loftq", 8, 2
    tiny_config.quant.compute_dtype, tiny_config.train.steps = "bf16", 2
    train(tiny_config)
    run_dir = Path(tiny_config.output.dir)
    merge(run_dir, tmp_path / "merged", dtype=torch.float32)
    assert merge_error(run_dir, tmp_path / "merged")["vs adapter on 4-bit base"]["within_tolerance"]


def test_peft_loads_a_multi_step_loftq_adapter_onto_the_rebuilt_base(tiny_config) -> None:
    """lora.loftq_iters=3: the adapter files are PEFT's own; on transformers' 4-bit load with the saved shifts applied
    (apply_shifts) PEFT gives our logits, and without them it does not (the base really moved)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora.adapters.loftq import apply_shifts, load_shifts
    from qlora.base.load import keep_cpu_weights_exact

    tiny_config.lora.init, tiny_config.lora.loftq_iters, tiny_config.train.steps = "loftq", 3, 2
    train(tiny_config)
    run_dir = Path(tiny_config.output.dir)
    cfg, ours, _, _ = load_run(run_dir)
    x = torch.randint(0, 259, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = {}
    for shifted in (True, False):
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"])
        base = AutoModelForCausalLM.from_pretrained(cfg.model.path, quantization_config=quant, dtype=torch.float32,
                                                    device_map={"": "cpu"})
        keep_cpu_weights_exact(base)
        if shifted:
            apply_shifts(base, cfg, cfg.model.path, load_shifts(run_dir))
        with torch.no_grad():
            logits[shifted] = PeftModel.from_pretrained(base, str(run_dir)).eval()(x).logits
    with torch.no_grad():
        torch.testing.assert_close(logits[True], ours(x).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits[False], logits[True], rtol=1e-3, atol=1e-3)


def test_a_full_disk_under_the_shifts_names_them_and_leaves_no_half_copy(tmp_path: Path, monkeypatch) -> None:
    """save_shifts wrote its own copy aside: a disk that filled halfway through the file left the half copy,
    .tmp-loftq_shifts.safetensors, and the error named it rather than the file asked for. It is written as every file
    written aside is (partial.write_aside); the earlier file stays whole."""
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    from qlora.adapters.loftq import save_shifts

    def half(tensors: dict, path: str, metadata: dict | None = None) -> None:  # the disk fills halfway through it
        Path(path).write_bytes(safetensors.torch.save(tensors)[:100])
        raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error {errno.ENOSPC})")

    shifts = {"model.layers.0.mlp.up_proj.A": torch.ones(2, 4), "model.layers.0.mlp.up_proj.B": torch.ones(4, 2)}
    save_shifts(tmp_path, shifts)
    monkeypatch.setattr(safetensors.torch, "save_file", half)
    with pytest.raises(OSError) as caught:
        save_shifts(tmp_path, {name: 2 * value for name, value in shifts.items()})
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(tmp_path / SHIFTS))
    assert [p.name for p in tmp_path.iterdir()] == [SHIFTS]
    assert load_file(tmp_path / SHIFTS).keys() == shifts.keys()
    assert all(torch.equal(value, shifts[name]) for name, value in load_file(tmp_path / SHIFTS).items())
