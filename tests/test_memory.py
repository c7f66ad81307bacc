"""The memory estimator against real tensors, the profiler, synthetic weights and the report CLI (tiny Llama, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora.config import Config, apply_overrides, load_recipe
from qlora.lora import attach_lora
from qlora.memory.arch import load_arch
from qlora.memory.estimate import compute_bytes, estimate, layer_bytes_per_token, nf4_bytes
from qlora.memory.profiler import PhaseTracker, tensor_categories
from qlora.model import compute_dtype, load_base

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def tiny(*overrides: str) -> Config:
    return apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), list(overrides))


def test_nf4_double_quant_costs_4_127_bits_per_parameter():
    n = 8192 * 28672  # a Llama-70B MLP weight
    assert nf4_bytes(n) * 8 / n == pytest.approx(4.127, abs=5e-4)  # QLoRA paper, sec. 3


def test_llama31_parameter_counts_from_config_json():
    # Published sizes of Llama-3.1: 8,030,261,248 and 70,553,706,496 parameters.
    for recipe, params in (("llama8b", 8_030_261_248), ("llama70b", 70_553_706_496)):
        assert load_arch(load_recipe(ROOT / "recipes" / f"{recipe}.py")).params == params


def test_compute_dtype_mirrors_the_loader():
    for setting in ("auto", "bf16", "fp16", "fp32"):
        cfg = tiny(f"--quant.compute_dtype={setting}")
        for device in ("cpu", "cuda"):
            assert compute_bytes(cfg, device)[1] == compute_dtype(cfg.quant, torch.device(device)).itemsize


@pytest.mark.parametrize(("method", "compute"), [("qlora", "fp32"), ("lora", "fp32"), ("full", "fp32"),
                                                  ("qlora", "bf16"), ("lora", "bf16")])
def test_weights_adapters_and_optimizer_state_match_the_real_model(method, compute):
    """The estimator's static components equal the bytes of the loaded tiny model's tensors, to the byte; bf16
    adapters add their fp32 masters to the optimizer state and keep fp32 gradients."""
    cfg = tiny(f"--quant.method={method}", f"--quant.compute_dtype={compute}")
    model, _, _ = load_base(cfg, CPU)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        attach_lora(model, cfg.lora, compute_dtype(cfg.quant, CPU))
    from qlora.train import build_optimizer, stepped_params

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    for p in stepped_params(optimizer):
        p.grad = torch.zeros_like(p)
    optimizer.step()
    real = tensor_categories(model, optimizer)
    est = estimate(cfg, load_arch(cfg), method, "cpu").components
    for key in ("quantized_weights", "unquantized_weights", "adapters", "optimizer_state"):
        assert est[key] == real[key], key
    assert real["gradients"] == sum(p.numel() for p in params) * 4


def saved_bytes_of_layer(cfg: Config, method: str, dtype: torch.dtype) -> int:
    """Bytes of new tensors autograd saves in decoder layer 1's forward (no checkpointing), each storage once."""
    model, _, _ = load_base(cfg, CPU)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        attach_lora(model, cfg.lora, dtype)
    known = {p.untyped_storage().data_ptr() for p in model.parameters()}
    known |= {t.untyped_storage().data_ptr() for p in model.parameters() if hasattr(p, "quant_state")
              for t in (p.quant_state.absmax, p.quant_state.code)}
    counted, inside = {}, [False]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            known.add(ptr)
            if inside[0]:
                counted[ptr] = t.untyped_storage().nbytes()
        return t

    layer = model.model.layers[1]
    layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    ids = torch.randint(0, 259, (cfg.train.batch_size, cfg.data.max_seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(counted.values())


@pytest.mark.parametrize("method,compute,dropout", [("qlora", "fp32", 0.0), ("qlora", "bf16", 0.0),
                                                    ("lora", "bf16", 0.1), ("full", "fp32", 0.0),
                                                    ("full", "bf16", 0.0)])
def test_layer_activation_formula_matches_saved_tensors(method, compute, dropout):
    cfg = tiny(f"--quant.method={method}", f"--quant.compute_dtype={compute}", f"--lora.dropout={dropout}",
               "--train.batch_size=2", "--data.max_seq_len=32", "--train.gradient_checkpointing=false")
    dtype = compute_dtype(cfg.quant, CPU)
    per_token, _ = layer_bytes_per_token(load_arch(cfg), method, cfg, dtype.itemsize)
    assert saved_bytes_of_layer(cfg, method, dtype) == per_token * 2 * 32


def measure(recipe: str, method: str, tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / f"{method}.json"
    subprocess.run([sys.executable, "-m", "qlora.memory.measure", recipe, f"--quant.method={method}", f"--out={out}",
                    *overrides], check=True, cwd=ROOT, capture_output=True)
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_estimate_within_10_percent_of_measured_peak_on_cpu(method, tmp_path):
    """Real steps of recipes/tiny.py in a fresh process: its peak resident memory against the estimate."""
    # Rows of 512 tokens: at the recipe's 128 the whole peak is ~13 MiB and ~1 MiB of Python objects the estimator
    # does not model is 7% of it (measured -6.6%); at 512 activations dominate and the estimate is within ~2%.
    got = measure("recipes/tiny.py", method, tmp_path, "--data.max_seq_len=512")
    cfg = tiny(f"--quant.method={method}", "--data.max_seq_len=512")
    est = estimate(cfg, load_arch(cfg), method, "cpu").peak_bytes
    assert set(got["phases"]) >= {"loaded", "lora_attached", "first_forward", "backward", "optimizer_step", "steady"}
    assert abs(est / got["measured_peak_bytes"] - 1) <= 0.10, (est, got["measured_peak_bytes"])
    # The measured weights are the model's own tensors: the estimate's to the byte.
    assert got["measured_components"]["quantized_weights"] == estimate(cfg, load_arch(cfg), method,
                                                                       "cpu").components["quantized_weights"]


def test_committed_smollm2_report_agrees_with_the_estimator():
    """memory_reports/ holds SmolLM2 measured on CPU; today's estimator must still be within 10% of it."""
    recipe = ROOT / "recipes" / "smollm2_135m.py"
    if not recipe.exists():
        pytest.skip("recipes/smollm2_135m.py is not in this tree")
    report = json.loads((ROOT / "memory_reports" / "smollm2_135m-cpu.json").read_text())
    cfg = load_recipe(recipe)
    cfg = apply_overrides(cfg, [a for a in report["command"].split()[4:] if a.startswith("--") and "=" in a])
    arch = load_arch(cfg)
    for method in ("qlora", "lora"):
        measured = report["methods"][method]["measured_peak_bytes"]
        est = estimate(apply_overrides(cfg, [f"--quant.method={method}"]), arch, method, "cpu").peak_bytes
        assert abs(est / measured - 1) <= 0.10, (method, est, measured)


def test_llama70b_estimate_from_config_alone(tmp_path):
    """The acceptance figures: QLoRA 70B at 2048 tokens between 36 and 48 GB, full fine-tuning above 700 GB."""
    proc = subprocess.run([sys.executable, "-m", "qlora.memory", "recipes/llama70b.py", "--json",
                           f"--out-dir={tmp_path}"], check=True, cwd=ROOT, capture_output=True, text=True)
    report = json.loads(proc.stdout)
    assert report["device"] == "none" and report["estimate_for"] == "cuda" and not report["measured"]
    methods = report["methods"]
    assert 36e9 <= methods["qlora"]["estimated_peak_bytes"] <= 48e9
    assert methods["full"]["estimated_peak_bytes"] > 700e9
    for entry in methods.values():
        assert entry["measured_peak_bytes"] is None
        assert sum(entry["components"].values()) == entry["estimated_peak_bytes"]
    md = (tmp_path / "llama70b-none.md").read_text()
    assert "Estimate only" in md and report["command"] in md and "bitsandbytes" in md
    assert (tmp_path / "llama70b-none.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_synthetic_weights_have_the_loaded_model_layout(method):
    cfg = tiny(f"--quant.method={method}")
    real, _, _ = load_base(cfg, CPU)
    cfg.model.synthetic, cfg.model.config_json = True, str(Path(cfg.model.path) / "config.json")
    synthetic, tokenizer, _ = load_base(cfg, CPU)
    layout = {n: (type(p), p.dtype, p.shape) for n, p in real.named_parameters()}
    assert {n: (type(p), p.dtype, p.shape) for n, p in synthetic.named_parameters()} == layout
    assert tensor_categories(synthetic) == tensor_categories(real)
    assert synthetic.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.1)
    attach_lora(synthetic, cfg.lora, torch.float32)
    ids = torch.tensor([tokenizer.encode("hello")])
    synthetic(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for n, p in synthetic.named_parameters() if p.requires_grad)


def test_training_run_writes_memory_json(tiny_config, capsys):
    from qlora.train import train

    tiny_config.train.steps = 2
    train(tiny_config)
    summary = json.loads((Path(tiny_config.output.dir) / "memory.json").read_text())
    assert {"loaded", "lora_attached", "first_forward", "backward", "optimizer_step", "steady"} <= set(
        summary["phases"])
    assert summary["peak_phase"] in ("first_forward", "backward", "optimizer_step", "steady")
    est = estimate(tiny_config, load_arch(tiny_config), "qlora", "cpu")
    assert summary["estimated_peak_bytes"] == est.peak_bytes
    assert summary["peak_by_category"]["adapters"] == est.components["adapters"]
    assert "memory: peak" in capsys.readouterr().out


def test_phase_tracker_keeps_the_larger_peak_of_a_repeated_phase():
    tracker = PhaseTracker(CPU)
    big = torch.ones(16, 2**20)  # 64 MiB, touched
    del big
    first = tracker.mark("steady")["allocated"]
    tracker.mark("steady")
    assert tracker.phases["steady"] >= first >= 32 * 2**20



ALLOCATOR_PROBE = """
import resource, sys, torch
from qlora.config import apply_overrides, load_recipe
from qlora.memory.profiler import glibc_returns_freed_memory

if sys.argv[1] == "measure":
    glibc_returns_freed_memory()  # as qlora.memory.measure does, before anything is allocated
else:
    from qlora.train import train

    train(apply_overrides(load_recipe("recipes/tiny.py"), ["--train.steps=1", "--train.eval_every=0",
                                                           "--train.eval_batches=1", f"--output.dir={sys.argv[2]}"]))

def faults_per_alloc():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        torch.ones(2**18)  # 1 MiB, freed at once
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50

faults_per_alloc()  # settles glibc's dynamic mmap threshold at 1 MiB
print(faults_per_alloc())
"""


def test_training_keeps_the_fast_allocator_and_measurement_sets_the_exact_one(tmp_path):
    """A training run leaves glibc's allocator as it is: a freed 1 MiB tensor's pages are reused, not faulted in
    again; the exact-peak setting of `qlora.memory --measure` faults in all 256 of them (~1.7x CPU time per step)."""
    faults = {}
    for mode in ("train", "measure"):
        proc = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, mode, str(tmp_path / "run")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        faults[mode] = float(proc.stdout.split()[-1])
    assert faults["measure"] >= 200 and faults["train"] < 10, faults
