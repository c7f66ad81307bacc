"""The memory estimator against real tensors, the profiler, synthetic weights and the report CLI (tiny Llama, CPU)."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import architecture, estimated, measure

from qlora.adapters.lora import attach_lora
from qlora.base.build import build_tiny, config_json_path
from qlora.base.load import compute_dtype, load_base, load_tokenizer
from qlora.base.sliding_window import block_size, reach
from qlora.config import Config, apply_overrides, load_recipe
from qlora.data.batches import batch_rows
from qlora.data.splits import load_splits
from qlora.levers.tiling.tiles import tile_layers
from qlora.memory import window
from qlora.memory.activations import layer_backward, layer_terms
from qlora.memory.arch import load_arch
from qlora.memory.estimate import compute_bytes, estimate
from qlora.memory.profiler import PhaseTracker, one_line
from qlora.memory.readings import tensor_categories
from qlora.memory.terms import Tally, count_trained, nf4_bytes, trainable_tensors

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


# The counts of the hub's config.json files that matter here, and each model's published total (its safetensors).
PUBLISHED = {
    "Qwen2.5-72B": (dict(model_type="qwen2", hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
                    72_706_203_648),
    "Mistral-7B-v0.3": (dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                             tie_word_embeddings=False), 7_248_023_552),
    "gemma-3-1b": (dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144), 999_885_952),
    # transformers' Phi3ForCausalLM from these on the meta device counts the same (and its 3.8B and 14B are these).
    "Phi-3-mini-4k-instruct": (dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                    sliding_window=2047, tie_word_embeddings=False), 3_821_079_552),
    "Phi-3-medium-4k-instruct": (dict(model_type="phi3", hidden_size=5120, intermediate_size=17920,
                                      num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
                                      vocab_size=32064, sliding_window=2047, tie_word_embeddings=False),
                                 13_960_238_080),
    # Phi-4-mini: Phi-3's layers, tied embeddings, and rotary on 3/4 of each head (counted the same: below).
    "Phi-4-mini-instruct": (dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                 num_attention_heads=24, num_key_value_heads=8, vocab_size=200064,
                                 partial_rotary_factor=0.75, sliding_window=262144, tie_word_embeddings=True),
                            3_836_021_760),
}


@pytest.mark.parametrize("model", PUBLISHED)
def test_other_architectures_parameter_counts_from_config_json(model, tmp_path):
    """Exact: Qwen2's q/k/v biases (819,200 in Qwen2.5-72B) and Gemma 3's extra norms (73,216 in Gemma-3-1B) were
    left out; Phi-3's fused qkv_proj and gate_up_proj were refused."""
    config, params = PUBLISHED[model]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_arch(tiny(f"--model.config_json={tmp_path / 'config.json'}")).params == params


def test_compute_dtype_mirrors_the_loader():
    for setting in ("auto", "bf16", "fp16", "fp32"):
        cfg = tiny(f"--quant.compute_dtype={setting}")
        for device in ("cpu", "cuda"):
            assert compute_bytes(cfg, device)[1] == compute_dtype(cfg.quant, torch.device(device)).itemsize


@pytest.mark.parametrize(("method", "compute", "build", "optimizer"), [
    *[(*case, "paged_adamw_32bit") for case in (
        ("qlora", "fp32", "tiny-llama"), ("lora", "fp32", "tiny-llama"), ("full", "fp32", "tiny-llama"),
        ("qlora", "bf16", "tiny-llama"), ("lora", "bf16", "tiny-llama"),
        *[(method, "fp32", build) for build in ("tiny-llama-tied", "tiny-qwen2", "tiny-mistral", "tiny-gemma3",
                                                "tiny-phi3") for method in ("qlora", "full")])],
    # The other optimizers: torch AdamW's moments in the dtype of what it steps (bf16 adapters' fp32 masters), the
    # 8-bit state with 32-bit state for tensors under 4,096 elements (the tiny Llama's k/v B) and its two maps.
    *[("qlora", compute, "tiny-llama", optimizer) for compute in ("fp32", "bf16")
      for optimizer in ("adamw", "paged_adamw_8bit")],
    ("full", "fp32", "tiny-llama", "adamw"), ("full", "fp32", "tiny-llama", "paged_adamw_8bit")])
def test_weights_adapters_and_optimizer_state_match_the_real_model(method, compute, build, optimizer):
    """The estimator's static components equal the bytes of the loaded tiny model's tensors, to the byte; bf16
    adapters add their fp32 masters to the optimizer state and keep fp32 gradients. On each tiny architecture."""
    cfg = tiny(f"--quant.method={method}", f"--quant.compute_dtype={compute}", *architecture(build),
               f"--train.optimizer={optimizer}")
    model, _, _ = load_base(cfg, CPU)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        attach_lora(model, cfg.lora, compute_dtype(cfg.quant, CPU))
    from qlora.training.optimizer import build_optimizer, stepped_params

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    for p in stepped_params(optimizer):
        p.grad = torch.zeros_like(p)
    optimizer.step()
    real = tensor_categories(model, optimizer)
    est = estimate(cfg, load_arch(cfg), method, "cpu").components
    for key in ("quantized_weights", "unquantized_weights", "adapters", "optimizer_state"):
        assert est[key] == real[key], key
    arch, e = load_arch(cfg), compute_bytes(cfg, "cpu")[1]
    per_grad = count_trained(Tally(), cfg, tuple(trainable_tensors(arch, method, cfg)), method, "cpu", e)[0]
    assert real["gradients"] == sum(p.numel() for p in params) * per_grad == sum(p.numel() for p in params) * 4


def test_paged_state_is_the_cards_though_its_tensor_says_cpu():
    """bitsandbytes wraps a paged buffer's managed pointer with torch.frombuffer, so the state tensor's device is `cpu`
    and it carries `is_paged`: on a CUDA device it is optimizer state outside the allocator, not host memory. (The H200
    battery of 2026-12-04 found the paged state dropped as host memory; a host tensor without the flag still is.)"""
    import bitsandbytes as bnb

    model = torch.nn.Linear(512, 512, bias=False)
    optimizer = bnb.optim.PagedAdamW32bit(model.parameters(), lr=1e-3)
    model(torch.randn(4, 512)).sum().backward()
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):  # its state all the same
        optimizer.step()
    state = optimizer.state[model.weight]
    state["state1"].is_paged = True  # as bitsandbytes.functional.get_paged marks its buffers on CUDA
    cats = tensor_categories(model, optimizer, torch.device("cuda"))
    assert cats["outside_allocator"] == cats["optimizer_state"] == 4 * 512 * 512  # state2 unmarked: host memory



def saved_bytes_of_layer(cfg: Config, method: str, dtype: torch.dtype) -> int:
    """Bytes of new tensors autograd saves in decoder layer 1's forward (no checkpointing), each storage once."""
    model, _, _ = load_base(cfg, CPU)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        attach_lora(model, cfg.lora, dtype)
    if cfg.train.tile_size:
        tile_layers(model, cfg.train.tile_size, cfg.train.tile_projections, cfg.train.tile_norms)
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


@pytest.mark.parametrize("build,method,compute,dropout,tiles", [
    *[("tiny-llama", *case) for case in (
        ("qlora", "fp32", 0.0, ""), ("qlora", "bf16", 0.0, ""), ("qlora", "fp32", 0.1, ""), ("lora", "bf16", 0.1, ""),
        ("full", "fp32", 0.0, ""), ("full", "bf16", 0.0, ""),
        # Sequence tiles (train.tile_size): the MLP, then the projections too, keep only their inputs.
        ("qlora", "fp32", 0.0, "mlp"), ("qlora", "fp32", 0.1, "mlp"), ("qlora", "bf16", 0.1, "all"),
        ("qlora", "fp32", 0.0, "all"),
        # ... and the norms (train.tile_norms): each keeps its input, not an fp32 copy.
        ("qlora", "bf16", 0.0, "norms"), ("qlora", "bf16", 0.1, "all+norms"), ("qlora", "fp32", 0.0, "all+norms"))],
    # Phi-3: SDPA keeps qkv_proj's whole output (its V a view of it), o_proj's input is a copy of SDPA's output.
    *[("tiny-phi3", *case) for case in (
        ("qlora", "fp32", 0.0, ""), ("qlora", "bf16", 0.1, ""), ("full", "fp32", 0.0, ""),
        ("qlora", "fp32", 0.0, "all"), ("qlora", "bf16", 0.1, "all+norms"))]])
def test_layer_activation_formula_matches_saved_tensors(build, method, compute, dropout, tiles):
    norms = tiles.endswith("norms")
    cfg = tiny(*architecture(build), f"--quant.method={method}", f"--quant.compute_dtype={compute}",
               f"--lora.dropout={dropout}", "--train.batch_size=2", "--data.max_seq_len=32",
               "--train.gradient_checkpointing=false",
               f"--train.tile_size={16 if tiles else 0}", f"--train.tile_projections={tiles.startswith('all')}",
               f"--train.tile_norms={norms}")
    dtype = compute_dtype(cfg.quant, CPU)
    arch = load_arch(cfg)
    layer = layer_terms(arch, method, cfg, dtype.itemsize, "cpu", tiled=bool(tiles),
                        tiled_projections=tiles.startswith("all"), tiled_norms=norms)
    # A tiled input norm keeps the layer's input itself, which the checkpoint plan counts: new to this layer here.
    layer_input = arch.hidden * dtype.itemsize if norms else 0
    assert saved_bytes_of_layer(cfg, method, dtype) == (layer.saved + layer_input) * 2 * 32


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_estimate_within_10_percent_of_measured_peak_on_cpu(method, cli, tmp_path):
    """Real steps of recipes/tiny.py in a fresh process: its peak resident memory against the estimate."""
    # Rows of 512 tokens: at the recipe's 128 the whole peak is ~13 MiB and ~1 MiB of Python objects the estimator
    # does not model is 7% of it (measured -6.6%); at 512 activations dominate and the estimate is within ~2%.
    got = measure(cli, "recipes/tiny.py", method, tmp_path, "--data.max_seq_len=512")
    cfg = tiny(f"--quant.method={method}", "--data.max_seq_len=512")
    est = estimate(cfg, load_arch(cfg), method, "cpu").peak_bytes
    assert set(got["phases"]) >= {"loaded", "lora_attached", "first_forward", "backward", "optimizer_step", "steady"}
    assert abs(est / got["measured_peak_bytes"] - 1) <= 0.10, (est, got["measured_peak_bytes"])
    # The measured weights are the model's own tensors: the estimate's to the byte.
    assert got["measured_components"]["quantized_weights"] == estimate(cfg, load_arch(cfg), method,
                                                                       "cpu").components["quantized_weights"]


@pytest.mark.parametrize("chunk", [0, 256])
def test_the_loss_term_within_3_percent_of_a_measured_step_on_cpu(chunk, cli, tmp_path):
    """The head and cross-entropy's backward (levers/loss/memory.py: 12 N V, or 12 min(N, chunk) V + N h e in chunks)
    against real steps, on a tiny Llama whose vocabulary of 32,768 makes the logits most of the peak: at 1,024 tokens
    measured 418.6 MiB unchunked (estimated 419.0) and 131.9 in chunks of 256 (131.9). The plan picker's
    train.loss_chunk_size stands on it; the tiny recipe's 259 tokens never showed it."""
    build_tiny("llama", {"vocab_size": 32768}, tmp_path / "base")
    shape = (f"--model.path={tmp_path / 'base'}", "--model.build=", "--data.max_seq_len=1024", "--train.batch_size=1",
             f"--train.loss_chunk_size={chunk}")
    got = measure(cli, "recipes/tiny.py", "qlora", tmp_path / "run", "--runs=2", *shape)["measured_peak_bytes"]
    cfg = tiny(*shape)
    est = estimate(cfg, load_arch(cfg), "qlora", "cpu").peak_bytes
    assert abs(est / got - 1) <= 0.03, (est / 2**20, got / 2**20)


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
    """The acceptance figures: QLoRA 70B at 2048 tokens between 36 and 40 GB on the card (issue 13); full fine-tuning
    above 700 GB, card and host (its optimizer state waits in host memory with the recipe's optimizer_on_cpu)."""
    proc = subprocess.run([sys.executable, "-m", "qlora.memory", "recipes/llama70b.py", "--json",
                           f"--out-dir={tmp_path}"], check=True, cwd=ROOT, capture_output=True, text=True)
    report = json.loads(proc.stdout)
    assert report["device"] == "none" and report["estimate_for"] == "cuda" and not report["measured"]
    methods = report["methods"]
    assert 36e9 <= methods["qlora"]["estimated_peak_bytes"] <= 40e9
    assert methods["full"]["estimated_peak_bytes"] + methods["full"]["host_bytes"] > 700e9
    for entry in methods.values():
        assert entry["measured_peak_bytes"] is None
        assert sum(entry["components"].values()) == entry["estimated_peak_bytes"]
    md = (tmp_path / "llama70b-none.md").read_text()
    assert "Estimate only" in md and report["command"] in md and "bitsandbytes" in md
    assert (tmp_path / "llama70b-none.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_synthetic_weights_have_the_loaded_model_layout(method, capsys):
    cfg = tiny(f"--quant.method={method}")
    real, _, _ = load_base(cfg, CPU)
    cfg.model.synthetic, cfg.model.config_json = True, str(Path(cfg.model.path) / "config.json")
    capsys.readouterr()
    synthetic, tokenizer, _ = load_base(cfg, CPU)
    # Said before the minutes a CPU takes for 8B (it was silent), and how long it took
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"drawing {load_arch(cfg).params:,} random weights for ")
    assert out[-1].startswith("drawn in ")
    layout = {n: (type(p), p.dtype, p.shape) for n, p in real.named_parameters()}
    assert {n: (type(p), p.dtype, p.shape) for n, p in synthetic.named_parameters()} == layout
    assert tensor_categories(synthetic) == tensor_categories(real)
    assert synthetic.model.embed_tokens.weight.std().item() == pytest.approx(real.config.initializer_range, rel=0.1)
    attach_lora(synthetic, cfg.lora, torch.float32)
    ids = torch.tensor([tokenizer.encode("hello")])
    synthetic(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for n, p in synthetic.named_parameters() if p.requires_grad)


def test_synthetic_weights_of_a_tied_config_share_the_head_with_the_embeddings(tmp_path):
    """transformers leaves them apart under init_empty_weights: a synthetic SmolLM2 or Llama-3.2-1B held the head
    twice, V h more than the model it stands for (and than the estimate, which counted them tied)."""
    cfg = tiny("--quant.method=lora")
    config = json.loads((Path(cfg.model.path) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    cfg.model.synthetic, cfg.model.config_json = True, str(tmp_path / "config.json")
    synthetic, _, _ = load_base(cfg, CPU)
    assert synthetic.lm_head.weight is synthetic.model.embed_tokens.weight
    assert sum(p.numel() for p in synthetic.parameters()) == load_arch(cfg).params


def test_a_sharded_base_keeps_a_tied_table_whole_on_every_process():
    """qlora/base/shard.py leaves a tied embedding table out of fully_shard (the head uses it outside the decoder):
    each of 2 processes holds all V h of it beside its half of the norms, as a process of one does."""
    cfg = tiny(*architecture("tiny-llama-tied"), "--train.shard_base=true")
    arch = load_arch(cfg)
    L, h, V, e = 2, 128, 259, 4  # the tiny Llama's config.json, fp32 on the CPU
    assert (arch.layers, arch.hidden, arch.vocab, arch.tied) == (L, h, V, True)
    half = estimate(cfg, arch, "qlora", "cpu", gpus=2).components["unquantized_weights"]
    assert half == V * h * e + -(-(2 * L + 1) * h * e // 2) + arch.buffer_bytes


def test_several_processes_sum_the_gradients_a_bucket_at_a_time():
    """Data parallel on 2 processes adds to the update one bucket of the gradients being summed, at most 25 MiB
    (qlora/training/distributed.py BUCKET_BYTES), not every gradient at once: the 8B recipe's adapters have 84
    million."""
    cfg = llama("llama8b")
    arch = load_arch(cfg)
    one, two = (estimate(cfg, arch, "qlora", "cuda", gpus=n).phases["optimizer_step"] for n in (1, 2))
    assert two - one == 25 * 2**20


@pytest.mark.parametrize(("fields", "line"), [
    # StarCoder2's MLP has no gate: its activations are not linear_shapes'.
    (dict(model_type="starcoder2"), r"config.json is a starcoder2 model: the estimator knows the layers of llama, "),
    # Phi-3's residual dropout, off in its own configs, would keep masks the estimate does not count.
    (dict(model_type="phi3", resid_pdrop=0.1), r"config.json has resid_pdrop=0.1: the estimator does not count "),
    # Values it reads, each a traceback (TypeError, ZeroDivisionError, OverflowError) or a silent miscount before.
    (dict(num_hidden_layers=10**30), r"num_hidden_layers=10{30}, beyond any decoder's \(the estimator takes up to "),
    (dict(model_type=["llama"]), r'model_type=\["llama"\], not a name: write the model\'s type as a string'),
    (dict(tie_word_embeddings="false"), r'tie_word_embeddings="false": write true or false'),
    (dict(model_type="mistral", sliding_window="4096"), r'sliding_window="4096": write the tokens a layer attends '),
    (dict(model_type="mistral", sliding_window=0), r"sliding_window=0: write the tokens a layer attends to: a "),
    (dict(model_type="gemma3_text", sliding_window_pattern=0), r"sliding_window_pattern=0: write every how many "),
    (dict(model_type="qwen2", use_sliding_window=True, max_window_layers=None), r"max_window_layers=null: write "),
    (dict(model_type="qwen2", use_sliding_window="yes"), r'use_sliding_window="yes": write true or false'),
    (dict(model_type="mistral", sliding_window=16, layer_types=["sliding_attention"] * 99),
     r"layer_types=\[.*: write a list of num_hidden_layers=\d+ entries, each"),
])
def test_the_estimator_refuses_what_it_does_not_count_or_cannot_read(fields, line, tmp_path):
    cfg = tiny()
    config = json.loads((Path(cfg.model.path) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **fields}))
    cfg.model.config_json = str(tmp_path / "config.json")
    with pytest.raises(ValueError, match=line):
        load_arch(cfg)


def test_training_run_writes_memory_json(tiny_config, capsys):
    import ctypes

    from qlora.train import train

    # This worker process ran other tests: memory they freed, still held by malloc, would take the run's first steps
    # without raising the resident set (the line then says so; see the next test). Handed back to the OS first.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    tiny_config.train.steps = 2
    train(tiny_config)
    summary = json.loads((Path(tiny_config.output.dir) / "memory.json").read_text())
    assert {"loaded", "lora_attached", "first_forward", "backward", "optimizer_step", "steady"} <= set(
        summary["phases"])
    assert summary["peak_phase"] in ("first_forward", "backward", "optimizer_step", "steady")
    # The estimate is for the batches the run met: its rows padded to the longest of its micro-batches.
    tokenizer = load_tokenizer(str(ROOT / tiny_config.model.path))
    rows, _ = load_splits(tiny_config.data, tokenizer, tiny_config.train.seed)
    t = tiny_config.train
    longest = max(len(rows[i]["input_ids"]) for step in range(t.steps)
                  for i in batch_rows(len(rows), t.batch_size, t.seed, step))
    assert longest < tiny_config.data.max_seq_len  # so the test tells the run's shape from the recipe's worst case
    assert summary["estimated_for"] == {"batch_size": t.batch_size, "seq_len": longest}
    cfg = apply_overrides(copy.deepcopy(tiny_config), [f"--data.max_seq_len={longest}"])
    est = estimate(cfg, load_arch(cfg), "qlora", "cpu")
    assert summary["estimated_peak_bytes"] == est.peak_bytes
    assert summary["peak_by_category"]["adapters"] == est.components["adapters"]
    assert "memory: peak resident set" in capsys.readouterr().out
    # The progress bar's and the metrics' peak is memory.json's training peak so far: at the last step, the same.
    logged = [json.loads(line) for line in (Path(tiny_config.output.dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in logged if "peak_gib" in row]
    assert steps[-1]["peak_gib"] == summary["peak_bytes"] / 2**30 > 0
    assert [row["peak_gib"] for row in steps] == sorted(row["peak_gib"] for row in steps)


SUMMARY = {"peak_bytes": 600 * 2**20, "estimated_peak_bytes": 660 * 2**20, "peak_phase": "backward",
           "estimated_for": {"batch_size": 8, "seq_len": 61},
           "peak_by_category": {"quantized_weights": 100 * 2**20, "activations": 500 * 2**20}}


def test_a_cuda_peak_by_category_adds_up_to_the_cards_peak():
    """On CUDA the peak is the allocator's reserve + memory outside it + the context, and the categories counted the
    allocated bytes: what the allocator held in no tensor (1.38 GiB of the 70B's 38.25 on the H200) was in no
    category, so the report's measured bar stopped short of the peak written over it. The record is a CUDA mark's,
    its figures set by hand: the categories must sum to the peak."""
    tracker = PhaseTracker(torch.device("cpu"))
    tracker.device = torch.device("cuda", 0)
    mib = 2**20
    tracker.phases = {"backward": 900 * mib + 50 * mib + 500 * mib}
    tracker.records = {"backward": {"allocated": 700 * mib, "reserved": 900 * mib, "outside_allocator": 50 * mib,
                                    "cuda_context": 500 * mib, "categories": {"quantized_weights": 400 * mib,
                                                                              "optimizer_state": 50 * mib},
                                    "activations": 700 * mib + 50 * mib - 450 * mib}}
    summary = tracker.summary()
    assert summary["peak_by_category"]["allocator_cache"] == 200 * mib
    assert sum(summary["peak_by_category"].values()) == summary["peak_bytes"] == 1450 * mib
    assert "allocator cache 0.20 GiB" in one_line({**summary, "device": "cuda:0"})


def test_a_run_whose_resident_set_never_rose_says_so_and_where_to_measure():
    line = one_line({**SUMMARY, "device": "cpu", "peak_bytes": 0})
    assert "never rose above its level before loading" in line and "--measure" in line, line
    assert one_line({**SUMMARY, "peak_bytes": None}) == "memory: no training step was recorded"


def test_closing_memory_line_compares_like_with_like_on_cuda_and_says_what_each_is_on_cpu():
    cuda = one_line({**SUMMARY, "device": "cuda:0"})
    assert cuda.startswith("memory: peak 0.59 GiB in backward on cuda:0") and cuda.endswith(
        "estimated 0.64 GiB for batches of 8 x 61 tokens (+10%)")
    cpu = one_line({**SUMMARY, "device": "cpu"})
    # Process memory against tensors: no percentage, and each figure says what it is.
    assert "%" not in cpu and "peak resident set 0.59 GiB above the start" in cpu, cpu
    assert "activations and the rest 0.49 GiB" in cpu and "the estimate, 0.64 GiB for batches of 8 x 61 tokens, " \
        "counts tensors and the rows only" in cpu, cpu
    assert len(cpu) <= 240 and len(cuda) <= 240  # was ~560: one line, not a paragraph
    # A category under 1% of the peak is left out: a CPU peak's 0-byte CUDA context, 3 MiB of gradients in 600 MiB.
    small = one_line({**SUMMARY, "device": "cpu", "peak_by_category": {
        **SUMMARY["peak_by_category"], "gradients": 3 * 2**20, "adapters": 6 * 2**20, "cuda_context": 0}})
    assert "adapters 6.0 MiB" in small and "gradients" not in small and "context" not in small, small


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
from qlora.memory.readings import glibc_returns_freed_memory

if sys.argv[1] == "measure":
    glibc_returns_freed_memory()  # as qlora.report.measure does, before anything is allocated
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

# --- issue 13: each lever's CPU saving against the estimator's, long context, and the longest context ---

@pytest.mark.parametrize("lever", ["--train.offload_activations=true", "--train.optimizer_on_cpu=true",
                                   "--model.embeddings_on_cpu=true"])
def test_cuda_only_levers_do_not_lower_a_cpu_estimate(lever):
    """On a CPU device these levers change nothing in the trainer, so the estimate must not claim a saving there;
    on CUDA they move bytes from the device to the host (Llama-3.1-8B, from its config.json)."""
    off = ["--train.offload_activations=false", "--train.optimizer_on_cpu=false", "--model.embeddings_on_cpu=false"]
    plain, with_lever = llama("llama8b", *off), llama("llama8b", *off, lever)
    arch = load_arch(plain)
    on_cpu = estimate(with_lever, arch, "qlora", "cpu")
    assert on_cpu.peak_bytes == estimate(plain, arch, "qlora", "cpu").peak_bytes
    assert not on_cpu.host and on_cpu.levers == estimate(plain, arch, "qlora", "cpu").levers
    on_cuda, before = estimate(with_lever, arch, "qlora", "cuda"), estimate(plain, arch, "qlora", "cuda")
    assert on_cuda.peak_bytes < before.peak_bytes and on_cuda.host_bytes > before.host_bytes


@pytest.mark.parametrize("norms", [False, True])
def test_estimate_within_10_percent_at_long_context_on_cpu(measured, norms):
    """8192 tokens with every CPU lever on (tiles, projections, LoRA dropout; then norms): a real step against the
    estimate."""
    overrides = ("--data.max_seq_len=8192", "--train.batch_size=1", "--lora.dropout=0.1", "--train.tile_size=1024",
                 "--train.tile_projections=true", f"--train.tile_norms={norms}")
    got, est = measured(*overrides), estimated(*overrides)
    assert abs(est / got - 1) <= 0.10, (est / 2**20, got / 2**20)


def test_estimate_counts_the_sliding_window_blocks_on_cpu(measured):
    """tiny-mistral (window 16) at 4,096 tokens: past its window SDPA attends block by block (qlora/base/
    sliding_window.py), which keeps the blocks' outputs joined into o_proj's input, T q e, and one block mask: 2.1 MiB
    of 50 measured, where the dense b x s x s mask it replaced cost 82. Within 10%
    as at long context; the window's terms exactly those two. Within the window, nothing."""
    overrides = (*architecture("tiny-mistral"), "--data.max_seq_len=4096", "--train.batch_size=1")
    got, est = measured(*overrides), estimated(*overrides)
    assert abs(est / got - 1) <= 0.10, (est / 2**20, got / 2**20)
    for tokens in (4096, 16):
        cfg = tiny(*overrides, f"--data.max_seq_len={tokens}")
        arch = load_arch(cfg)
        unwindowed = dataclasses.replace(arch, window=None, windowed_layers=0)
        windowed, whole = (estimate(cfg, a, "qlora", "cpu").peak_bytes for a in (arch, unwindowed))
        q, block = arch.heads * arch.head_dim, 256  # fp32: 4 bytes; blocks of 256 queries, 16 keys before each
        assert windowed - whole == (tokens * q * 4 + block * (16 + block) * 4 if tokens > 16 else 0), tokens


@pytest.mark.parametrize("pack", [False, True])
def test_layers_past_the_window_keep_the_joined_outputs_only_where_documents_do_not(pack):
    """Without checkpointing every layer's saved tensors are counted, the windowed layers' with the blocks' outputs
    joined into o_proj's input (T q e); a layer attending to the whole row keeps none, unless the row is packed and
    attends by document (its documents' outputs are joined too). A model with 1 of its 2 layers windowed: less by T q e
    than both windowed, or the same where packed (counting the copy for those layers there too, mutant W4, survived
    every test)."""
    overrides = (*architecture("tiny-mistral"), "--data.max_seq_len=4096", "--train.batch_size=1",
                 "--train.gradient_checkpointing=false", f"--data.pack={str(pack).lower()}")
    cfg = tiny(*overrides)
    arch = load_arch(cfg)
    assert arch.windowed_layers == arch.layers == 2
    one = dataclasses.replace(arch, windowed_layers=1)
    both, mixed = (estimate(cfg, a, "qlora", "cpu").peak_bytes for a in (arch, one))
    q = arch.heads * arch.head_dim
    assert both - mixed == (0 if pack else 4096 * q * 4)



@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_a_windowed_layer_on_cuda_keeps_k_and_v_repeated_to_every_query_head(device):
    """tiny-mistral (4 query heads, 2 K/V heads of 32, window 16) at 4,096 tokens in bf16, no checkpointing, 1 of its
    2 layers windowed against both: a windowed layer keeps the blocks' joined outputs, T q e, and on CUDA K and V
    repeated to every query head for the R + B = 16 + 256 keys of each block of 256, 2 T e (ceil(q (R + B) / B) - kv)
    = 2 x 4,096 x 2 x (136 - 64); on the CPU (enable_gqa) none (mutants W6a, W6b: half of it, or none, survived every
    test). With a K/V head per query head nothing is repeated, and the note says so (W5a, W7a, W7b)."""
    cfg = tiny(*architecture("tiny-mistral"), "--data.max_seq_len=4096", "--train.batch_size=1",
               "--quant.compute_dtype=bf16", "--train.gradient_checkpointing=false")
    arch = load_arch(cfg)
    assert (arch.heads, arch.kv_heads, arch.head_dim, arch.window, arch.windowed_layers) == (4, 2, 32, 16, 2)
    both, mixed = (estimate(cfg, a, "qlora", device).phases["loss_backward"]
                   for a in (arch, dataclasses.replace(arch, windowed_layers=1)))
    assert both - mixed == 4096 * (128 * 2 + (2 * 2 * (136 - 64) if device == "cuda" else 0))
    assert ("K and V repeated" in window.note(cfg, arch, device)) == (device == "cuda")
    heads = dataclasses.replace(arch, kv_heads=arch.heads)
    assert layer_terms(heads, "qlora", cfg, 2, device).attention == 2 * (2 * 128 + 2 * 128) + 4 * 4
    assert "K and V repeated" not in window.note(cfg, heads, device)
    assert ("memory-efficient kernel, not measured on a GPU" in window.note(cfg, heads, device)) == (device == "cuda")


@pytest.mark.parametrize(("build", "per_token"), [("tiny-mistral", 704), ("tiny-gemma3", 2256)])
def test_sdpa_backward_on_cuda_counts_the_blocks_kernel_and_where_some_layers_attend_the_row_the_larger(build,
                                                                                                      per_token):
    """At 4,096 tokens in bf16, no checkpointing, the MLP and norms in tiles of 64, SDPA's backward is a layer's peak
    on CUDA: T (h e + q e + dq dk dv + buffers - (the second norm's h e + o_proj's r e + its input q e)). tiny-mistral
    (q 128, kv 64, every layer windowed): the blocks run the memory-efficient kernel, whose buffers are a block's, so
    dq, dk and dv, 2 (128 + 2 x 64), and dq's pieces joined, 2 x 128: 256 + 256 + 512 + 256 - 576 = 704; with
    FlashAttention-2's buffers (mutant W8: the row's kernel) 1,488. tiny-gemma3 (q 192, kv 96, 1 of 2 layers windowed):
    its full layer runs flash, whose dk and dv at every query head, fp32 dq and row sums, 2 (2 x 192) + 4 x 192 + 16,
    outweigh the blocks' 2 x 192: 256 + 384 + 768 + 1,552 - 704 = 2,256; the blocks' alone (W9: the larger of the two
    dropped or the smaller taken) 1,088."""
    cfg = tiny(*architecture(build), "--data.max_seq_len=4096", "--train.batch_size=1", "--quant.compute_dtype=bf16",
               "--train.gradient_checkpointing=false", "--train.tile_size=64", "--train.tile_norms=true",
               "--model.sdpa_backend=flash")
    arch = load_arch(cfg)
    assert (arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.hidden, cfg.lora.r) == \
        ((128, 64) if build == "tiny-mistral" else (192, 96)) + (128, 32)
    _, at, formula = layer_backward(arch, "qlora", cfg, 2, "cuda", 4096)
    assert at == 4096 * per_token and "at the SDPA backward" in formula
    # The formula names the kernel counted: the blocks' where it is theirs, the full layers' flash where that is larger
    # (it said "efficient" for tiny-gemma3, whose figure was flash's).
    assert f"SDPA's gradients and buffers ({'efficient' if build == 'tiny-mistral' else 'flash'})" in formula


def test_a_tile_as_long_as_the_micro_batch_runs_untiled():
    """tile_size equal to the micro-batch's tokens is one tile: the modules run as they are, and the estimate counts
    them so (mutant A12: tiling.tiled's `<` as `<=` counted a tile's working set there)."""
    plain, one_tile = (tiny("--data.max_seq_len=1024", "--train.batch_size=1", f"--train.tile_size={n}")
                       for n in (0, 1024))
    arch = load_arch(plain)
    assert layer_backward(arch, "qlora", one_tile, 4, "cpu", 1024) == layer_backward(arch, "qlora", plain, 4, "cpu",
                                                                                      1024)


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_partial_rotary_saves_what_the_layer_formula_counts(compute, tmp_path):
    """Phi-4-mini rotates 3/4 of each head (partial_rotary_factor 0.75), the rest passed through and joined by a
    cat: autograd keeps the same bytes as with the whole head rotated, the formula's, to the byte."""
    config = json.loads(config_json_path(tiny(*architecture("tiny-phi3"))).read_text())
    rope = {**config.get("rope_parameters", {}), "partial_rotary_factor": 0.75}  # where transformers 5 reads it
    config |= {"partial_rotary_factor": 0.75, "rope_parameters": rope}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = tiny(*architecture("tiny-phi3"), "--model.synthetic=true", f"--model.config_json={tmp_path / 'config.json'}",
               f"--quant.compute_dtype={compute}", "--train.batch_size=2", "--data.max_seq_len=32",
               "--train.gradient_checkpointing=false")
    model, _, _ = load_base(cfg, CPU)
    assert model.model.rotary_emb.inv_freq.numel() * 2 == load_arch(cfg).head_dim * 3 // 4  # rotated: 3/4
    dtype = compute_dtype(cfg.quant, CPU)
    layer = layer_terms(load_arch(cfg), "qlora", cfg, dtype.itemsize, "cpu", tiled=False, tiled_projections=False,
                        tiled_norms=False)
    assert saved_bytes_of_layer(cfg, "qlora", dtype) == layer.saved * 2 * 32


def phi3_windowed(directory: Path) -> Path:
    """tiny-phi3's config.json with a sliding window of 16 tokens, as Phi-3-mini and -medium attend within 2,047 (the
    built checkpoint has none): read by the estimate, and by the trainer with synthetic weights."""
    config = json.loads(config_json_path(tiny(*architecture("tiny-phi3"))).read_text())
    (directory / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    return directory / "config.json"


@pytest.mark.parametrize("tokens", [1024, 8192])
def test_estimate_counts_phi3_on_cpu(measured, tokens):
    """tiny-phi3 (one qkv_proj, one gate_up_proj) was refused by the estimator, so a Phi-3 run had no check before
    loading, no --max-context and no train.plan=fastest. Real steps against the estimate, within 10% as the other
    architectures' (measured 14.1 and 104.7 MiB, estimated 15.1 and 106.3)."""
    overrides = (*architecture("tiny-phi3"), f"--data.max_seq_len={tokens}", "--train.batch_size=1")
    got, est = measured(*overrides), estimated(*overrides)
    assert abs(est / got - 1) <= 0.10, (est / 2**20, got / 2**20)


def test_estimate_counts_phi3s_sliding_window_on_cpu(measured, tmp_path):
    """Phi-3 past its window at 4,096 tokens (synthetic weights from tiny-phi3's config with a window of 16): within
    10% (measured 52.9 MiB, estimated 54.4). The window adds the blocks' mask alone: o_proj's input is a copy of
    SDPA's output with or without it."""
    overrides = (*architecture("tiny-phi3"), "--model.synthetic=true", f"--model.config_json={phi3_windowed(tmp_path)}",
                 "--data.max_seq_len=4096", "--train.batch_size=1")
    got, est = measured(*overrides), estimated(*overrides)
    assert abs(est / got - 1) <= 0.10, (est / 2**20, got / 2**20)
    cfg = tiny(*overrides)
    arch = load_arch(cfg)
    assert (arch.window, arch.windowed_layers) == (16, 2)
    whole = estimate(cfg, dataclasses.replace(arch, window=None, windowed_layers=0), "qlora", "cpu")
    tensors = whole.peak_bytes - whole.components.get("tokenised_rows", 0)  # as `estimated` counts them
    assert est - tensors == block_size(16) * (reach(16) + block_size(16)) * 4


def evaluated(formula: str, **symbols: int) -> float:
    """A formula as the estimate prints it (products written side by side: 2q, e(...), 4nh) at `symbols`."""
    python, prev = "", ""
    for token in re.findall(r"\d+|[A-Za-z]+|[()+\-*/]", formula):
        if prev and (prev[-1].isalnum() or prev == ")") and (token[0].isalnum() or token == "("):
            python += "*"
        python, prev = python + str(symbols.get(token, token)), token
    return eval(python)  # digits, the symbols' values and operators only


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_printed_attention_term_of_a_windowed_layer_is_its_number(device):
    """On CUDA with grouped-query attention a window's blocks save K and V repeated to every query head (1a69f6f):
    the number counted them, the printed formula still read e(2q + 2kv) + 4nh, 288 bytes a token short of it on
    tiny-mistral in bf16 (784 for 1,072)."""
    cfg = tiny(*architecture("tiny-mistral"), "--quant.compute_dtype=bf16")
    arch, e = load_arch(cfg), 2
    formula = layer_backward(arch, "qlora", cfg, e, device, cfg.data.max_seq_len)[2]
    term = formula[formula.index("e(2q"):formula.index("+ 4nh") + len("+ 4nh")]
    symbols = dict(e=e, q=arch.heads * arch.head_dim, kv=arch.kv_heads * arch.head_dim, nh=arch.heads,
                   B=block_size(arch.window), R=reach(arch.window))
    assert evaluated(term, **symbols) == layer_terms(arch, "qlora", cfg, e, device).attention, term


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_printed_attention_term_of_phi3_is_its_number(device, tmp_path):
    """Phi-3's SDPA keeps qkv_proj's whole output, its V a view of it: e(q + kv) beyond a Llama's e(2q + 2kv) + 4nh
    (on the CPU, and on CUDA without a window); on CUDA a window's blocks repeat K and V to every query head for
    tiny-phi3's grouped heads, copies, and the output is not kept."""
    for config in (None, phi3_windowed(tmp_path)):
        cfg = tiny(*architecture("tiny-phi3"), *([f"--model.config_json={config}"] if config else []))
        arch, e = load_arch(cfg), 4
        formula = layer_backward(arch, "qlora", cfg, e, device, cfg.data.max_seq_len)[2]
        whole = device == "cpu" or config is None
        end = formula.index(" (V a view") if whole else formula.index("+ 4nh") + len("+ 4nh")
        assert ("V a view" in formula) == whole, formula
        symbols = dict(e=e, q=arch.heads * arch.head_dim, kv=arch.kv_heads * arch.head_dim, nh=arch.heads,
                       B=block_size(16), R=reach(16))
        term = formula[formula.index("e(2q"):end]
        assert evaluated(term, **symbols) == layer_terms(arch, "qlora", cfg, e, device).attention, term


def test_the_printed_attention_term_of_an_eager_layer_is_its_number():
    """Eager attention saves q, K and V at every head and its output, 4 q e a token (its scores apart): the printed
    formula read SDPA's e(2q + 2kv) + 4nh, 272 bytes a token from it on the tiny Llama in bf16."""
    cfg = tiny("--model.attn_implementation=eager", "--quant.compute_dtype=bf16")
    arch, e = load_arch(cfg), 2
    formula = layer_backward(arch, "qlora", cfg, e, "cpu", cfg.data.max_seq_len)[2]
    term = formula[formula.index("8h + 8 + ") + len("8h + 8 + "):formula.index(" (eager")]
    assert evaluated(term, e=e, q=arch.heads * arch.head_dim) == layer_terms(arch, "qlora", cfg, e, "cpu").attention, \
        formula


@pytest.mark.parametrize(("config", "window"), [
    (dict(model_type="mistral", sliding_window=4096), (4096, 32)),  # Mistral-7B-v0.1
    (dict(model_type="mistral", sliding_window=None), (None, 0)),  # v0.2 and later
    (dict(model_type="gemma3_text", sliding_window=512, sliding_window_pattern=6), (512, 27)),  # every 6th global
    (dict(model_type="gemma3_text", sliding_window=512, layer_types=["sliding_attention", "full_attention"] * 16),
     (512, 16)),
    (dict(model_type="qwen2", sliding_window=131072, use_sliding_window=False), (None, 0)),  # Qwen2.5's
    (dict(model_type="llama"), (None, 0)),
    (dict(model_type="phi3", sliding_window=2047), (2047, 32)),  # Phi-3-mini and -medium
    (dict(model_type="phi3"), (None, 0)),  # Phi3Config's default
    # below 0 transformers makes every layer windowed, not more layers than the model has
    (dict(model_type="qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=-5), (64, 32)),
    # layers from max_window_layers on: Qwen2Config's layer_types has 4 of 32 sliding
    (dict(model_type="qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=28), (64, 4)),
])
def test_the_sliding_window_is_read_as_transformers_reads_it(config, window, tmp_path):
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4, vocab_size=100)
    (tmp_path / "config.json").write_text(json.dumps({**shape, **config}))
    arch = load_arch(tiny(f"--model.config_json={tmp_path / 'config.json'}"))
    assert (arch.window, arch.windowed_layers) == window


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma", "gemma3_text", "phi3"])
def test_a_head_tied_or_not_where_config_json_does_not_say_is_transformers_default(kind, tmp_path):
    """Gemma's configuration classes tie the head by default, the others' not: a config.json without
    tie_word_embeddings counts the head (V h, 1 GiB of Llama-3.1-8B's in bf16) as transformers builds it."""
    from transformers import CONFIG_MAPPING

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    (tmp_path / "config.json").write_text(json.dumps({**shape, "model_type": kind}))
    arch = load_arch(tiny(f"--model.config_json={tmp_path / 'config.json'}"))
    assert arch.tied == CONFIG_MAPPING[kind]().tie_word_embeddings


def llama(name: str, *overrides: str) -> Config:
    return apply_overrides(load_recipe(ROOT / "recipes" / f"{name}.py"), list(overrides))


def test_llama70b_as_shipped_fits_40_gb_and_the_context_targets():
    """Issue 13's targets, estimated for one card (GiB as given) and a 128 GiB host: the 70B recipe's step at 2048
    tokens <= 40 GB with the CUDA context; 70B >= 100K tokens and 8B >= 350K on an 80 GB card, taken here as the
    smaller 80e9 bytes."""
    from qlora.memory.context import max_context

    cfg = llama("llama70b")
    est = estimate(cfg, load_arch(cfg), "qlora", "cuda")
    assert est.peak_bytes <= 40e9 and est.components["cuda_context"] > 0
    assert est.host_bytes <= 128 * 2**30
    for name, target in (("llama70b", 100_000), ("llama8b", 350_000)):
        tokens, limit, levers = max_context(llama(name), int(80e9), 128 * 2**30)
        assert tokens >= target and limit in ("card", "host") and levers, (name, tokens)


def assert_the_trainer_pins_it(cfg: Config, arch, est, host: int) -> None:  # noqa: ANN001 (Arch, Estimate)
    """The trainer's own check before the first step (qlora/levers/checkpoints/) passes the plan on a host of
    `host` bytes, whose available memory is then taken as the host less the process's allowance and its embeddings."""
    from qlora.levers.checkpoints.memory import check_pinned_memory
    from qlora.memory.preflight import host_share

    available = host - est.host.get("runtime", 0) - est.host.get("embeddings", 0)
    if cfg.train.offload_activations and cfg.train.gradient_checkpointing:
        check_pinned_memory(arch.layers, cfg.train, cfg.data.max_seq_len, arch.hidden, 2, host_share(available))


def test_probes_of_the_max_context_search_run_the_plan_the_trainer_accepts():
    """The GPU battery's max-context probes (benchmarks/memory_levers.py): at each length the estimator's plan for
    that length, card and host, which the trainer's pinned-memory check lets through. On the H200 of 2026-12-04 every
    70B probe (134K to 262K tokens) ran the recipe's own plan and was refused before a step."""
    from qlora.memory.context import probe_overrides

    cfg, gpu, host = llama("llama70b"), int(139.8 * 2**30), 126 * 2**30
    arch = load_arch(cfg)
    for tokens in (2048, 54_784, 134_144, 209_664, 262_144):
        overrides = probe_overrides(cfg, tokens, gpu, host)
        assert overrides[0] == f"--data.max_seq_len={tokens}"
        planned_cfg = apply_overrides(copy.deepcopy(cfg), overrides)
        est = estimate(planned_cfg, arch, "qlora", "cuda")
        assert est.host_bytes <= host, tokens
        assert_the_trainer_pins_it(planned_cfg, arch, est, host)
        if tokens >= 134_144:  # 80 inputs of 2 GiB and more: only a plan keeps them from the host
            assert any(o.startswith(("--train.checkpoint_every=", "--train.offload_budget_gib=")) for o in overrides)


def test_max_context_is_the_longest_that_fits_card_and_host():
    from qlora.memory.context import GRANULARITY, fit_context, fitting_plan
    from qlora.memory.preflight import fits

    cfg = llama("llama70b")
    arch = load_arch(cfg)
    for gpu, host in ((80 * 2**30, 128 * 2**30), (48 * 2**30, 128 * 2**30), (80 * 2**30, 48 * 2**30)):
        fit = fit_context(cfg, gpu, host)
        assert fit.estimate.peak_bytes <= gpu and fit.estimate.host_bytes <= host
        assert fitting_plan(cfg, arch, fit.tokens + GRANULARITY, gpu, host) is None  # one step more fits no plan
        # The plan's overrides reproduce it on the recipe, estimated the ordinary way, and the trainer's check before
        # loading (the allocator's margin included) takes it: an offload budget printed rounded down to 0.01 GiB
        # pinned one layer input fewer, and the 70B step at 177,152 tokens came to 82.6 GiB of the 80.
        again = estimate(apply_overrides(copy.deepcopy(cfg), fit.overrides), arch, "qlora", "cuda")
        assert again.peak_bytes <= gpu and again.host_bytes <= host and fits(again, gpu, host)
        assert_the_trainer_pins_it(apply_overrides(copy.deepcopy(cfg), fit.overrides), arch, again, host)
    # A small host: the layer inputs the card cannot take must wait somewhere, and that limits the context.
    small = fit_context(cfg, 80 * 2**30, 48 * 2**30)
    assert small.limit == "host" and small.tokens < fit_context(cfg, 80 * 2**30, 128 * 2**30).tokens
    # Without room for the process itself nothing fits; a card below the weights fits nothing either.
    assert fit_context(cfg, 80 * 2**30, 2**30).tokens == 0
    assert fit_context(cfg, 24 * 2**30, 128 * 2**30).tokens == 0


def test_the_longest_context_is_found_past_the_tiles_where_a_shorter_row_does_not_fit():
    """Rows up to train.tile_size run untiled and need more than a row just past it: the estimate falls where the
    tiles begin. A plain bisection over the lengths stopped below that drop (8B with tiles of 32,768 on 16 GiB:
    27,648 tokens where 35,840 fit); the search and the check before loading take each side apart."""
    from qlora.memory.context import GRANULARITY, fit_context, fitting_plan
    from qlora.memory.preflight import fitting

    cfg = llama("llama8b", "--train.tile_size=32768")
    arch, gpu, host = load_arch(cfg), 16 * 2**30, 125 * 2**30
    fit = fit_context(cfg, gpu, host)
    fitting_rows = [k * GRANULARITY for k in range(1, 64) if fitting_plan(cfg, arch, k * GRANULARITY, gpu, host)]
    assert fit.tokens == max(fitting_rows) > cfg.train.tile_size and fit.limit == "card"
    assert any(n not in fitting_rows for n in range(GRANULARITY, fit.tokens, GRANULARITY))  # the drop is there
    longest, _ = fitting(apply_overrides(copy.deepcopy(cfg), ["--data.max_seq_len=40960"]), arch, "cuda", gpu, host)
    assert cfg.train.tile_size < longest <= fit.tokens + GRANULARITY
    # Past the drop nothing fits: the search goes back to the untiled side.
    assert 0 < fit_context(cfg, 11 * 2**30, host).tokens <= cfg.train.tile_size


def test_a_card_that_holds_rows_shorter_than_the_granularity_names_them():
    """A card between the 8B step at 512 and at 1024 tokens: the search in steps of 1024 found 0 tokens, as if no row
    fit, where the recipe's own shorter rows did (SmolLM2's 128-token rows on a card of their estimate: 0). Below the
    granularity it searches in steps of 64: the longest such row fits and one step more does not."""
    from qlora.memory.context import GRANULARITY, fit_context, fitting_plan
    from qlora.memory.preflight import STEP, needs

    cfg = llama("llama8b")
    arch, host = load_arch(cfg), 128 * 2**30
    gpu = needs(estimate(apply_overrides(copy.deepcopy(cfg), ["--data.max_seq_len=512"]), arch, "qlora", "cuda"))[0]
    assert fitting_plan(cfg, arch, GRANULARITY, gpu, host) is None
    fit = fit_context(cfg, gpu, host)
    assert 512 <= fit.tokens < GRANULARITY and fit.tokens % STEP == 0
    assert fit.overrides[0] == f"--data.max_seq_len={fit.tokens}"
    assert fitting_plan(cfg, arch, fit.tokens + STEP, gpu, host) is None



def test_a_row_found_below_the_granularity_is_said_to_be_searched_so(tmp_path, capsys):
    """--max-context's report names the finer step the row was found in: the JSON (fine_granularity), its
    assumption and the markdown's shape line; a reader of 'in steps of 1024 tokens' alone took 576 for a misprint."""
    from qlora.memory.context import GRANULARITY, fit_context
    from qlora.memory.preflight import STEP, needs
    from qlora.report.memory import main

    cfg = llama("llama8b")
    gpu = needs(estimate(apply_overrides(copy.deepcopy(cfg), ["--data.max_seq_len=512"]), load_arch(cfg), "qlora",
                         "cuda"))[0]
    assert main(["recipes/llama8b.py", "--max-context", "--gpu-gib", repr(gpu / 2**30), "--host-gib=128", "--json",
                 f"--out-dir={tmp_path}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["rows"][0]["tokens"] == fit_context(cfg, gpu, 128 * 2**30).tokens < GRANULARITY
    assert report["granularity"] == GRANULARITY and report["fine_granularity"] == STEP
    assert any(f"in steps of {GRANULARITY} tokens (of {STEP} where none fits) whose" in a
               for a in report["assumptions"]), report["assumptions"]
    assert f"lengths in steps of {GRANULARITY} tokens (of {STEP} where none fits)\n" in \
        (tmp_path / "llama8b-max-context.md").read_text()


def test_max_context_says_what_ends_a_row():
    """A card no row fits because the host cannot hold its part says so, not the card's figure; a row that fits at
    the search's last length says the search ended it."""
    from qlora.memory.context import LONGEST, context_report
    from qlora.report.markdown import context_lines

    report = context_report(llama("llama70b"), [48, 24], 1)
    report["recipe"] = "recipes/llama70b.py"
    lines = context_lines(report)
    assert "48 GiB card:         0 tokens, limited by the host (the host would need " in lines[1]
    assert "limited by the card (weights, adapters and context alone take" in lines[2]
    assert lines[2].endswith("GiB; --train.stream_base=true keeps the 4-bit base in host memory)")
    tiny = context_report(load_recipe(ROOT / "recipes" / "tiny.py"), [10_000], 100_000)
    assert tiny["rows"][0]["tokens"] == LONGEST and tiny["rows"][0]["limit"] == "search"
    assert "limited by the search (the search ends there; " in context_lines(tiny)[1]


def test_max_context_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qlora.memory", "recipes/llama8b.py", "--max-context", "--gpu-gib",
                           "24,80", "--host-gib=128", f"--out-dir={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    report = json.loads((tmp_path / "llama8b-max-context.json").read_text())
    assert [row["gpu_gib"] for row in report["rows"]] == [24, 80]
    for row in report["rows"]:
        assert f"{row['tokens']:,} tokens, limited by the {row['limit']}" in proc.stdout
    assert "levers: offload_activations" in proc.stdout and "Estimate only" in (tmp_path / "llama8b-max-context.md"
                                                                                 ).read_text()
    for args, message in ((["--gpu-gib=0"], "--gpu-gib '0': use sizes in GiB above 0.5"),
                          (["--host-gib=64"], "--host-gib sizes the host beside the card --gpu-gib names, or the "
                                              "cards of --max-context: add --gpu-gib N or --max-context"),
                          (["--gpu-gib=24,48"], "--gpu-gib 24,48: the report is drawn against one card"),
                          (["--gpu-gib=24", "--measure"], "--gpu-gib draws the estimate against a card of that size"),
                          (["--gpu-gib=24", "--train.device=cpu"], "--gpu-gib sizes CUDA cards and the recipe trains "
                                                                   "on the CPU (train.device=cpu)")):
        bad = subprocess.run([sys.executable, "-m", "qlora.memory", "recipes/llama8b.py", *args] +
                             (["--max-context"] if args == ["--gpu-gib=0"] else []) + [f"--out-dir={tmp_path}"],
                             cwd=ROOT, capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["llama70b", "llama8b"])
def test_committed_llama_reports_agree_with_the_estimator(name):
    """memory_reports/ holds estimate-only reports and the longest-context table for the shipped recipes: they
    must be what today's estimator says (regenerate with the command each one names)."""
    from qlora.memory.context import max_context

    cfg = llama(name)
    report = json.loads((ROOT / "memory_reports" / f"{name}-none.json").read_text())
    assert report["device"] == "none" and not report["measured"]
    assert report["methods"]["qlora"]["estimated_peak_bytes"] == estimate(cfg, load_arch(cfg), "qlora",
                                                                          "cuda").peak_bytes
    table = json.loads((ROOT / "memory_reports" / f"{name}-max-context.json").read_text())
    for row in table["rows"]:
        tokens, limit, _ = max_context(cfg, int(row["gpu_gib"] * 2**30), int(table["host_gib"] * 2**30))
        assert (row["tokens"], row["limit"]) == (tokens, limit), row["gpu_gib"]


@pytest.mark.parametrize(("override", "line"), [
    ("--quant.compute_dtype=fp16", "error: quant.compute_dtype=fp16: this trainer has no loss scaling"),
    ("--lora.r=5000", "error: lora.r=5000 exceeds the smaller side of each decoder layer's k_proj (1024 x 4096): use "
                      "a rank up to 1024"),
])
@pytest.mark.parametrize("flags", [[], ["--max-context"]])
def test_the_memory_tool_refuses_what_the_trainer_would(capsys, override, line, flags):
    """It estimated both (8B at r=5000: 225 GiB, and a context to train it with) for runs the trainer refuses."""
    from qlora.report.memory import main

    assert main(["recipes/llama8b.py", override, *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(line)


@pytest.mark.parametrize("name", ["model.safetensors", "model.gguf"])
def test_the_memory_tool_refuses_a_model_path_that_is_a_file(capsys, tmp_path, name):
    """It said there was no config.json at model.safetensors/config.json and to set model.config_json."""
    from qlora.report.memory import main

    (tmp_path / name).write_bytes(b"weights")
    assert main(["recipes/tiny.py", f"--model.path={tmp_path / name}", "--model.build=none"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: model.path={tmp_path / name} is a file, not a checkpoint directory: point it at the directory "
        "holding config.json and the weights")


def test_the_memory_tool_shows_the_plan_the_trainer_would_choose_for_a_card_named(capsys, tmp_path):
    """The 8B and 70B recipes leave their levers to the trainer (train.plan=fastest): the report of the recipe's
    levers is the least it needs, and --gpu-gib N shows the plan a run on that card takes, as qlora.train chooses it
    (qlora/memory/plan.py, plan_for), with every method estimated with it; train.plan_gib caps it there too."""
    from qlora.memory.plan import plan_for
    from qlora.memory.preflight import available_on
    from qlora.report.memory import main

    assert main(["recipes/llama8b.py", "--methods=qlora"]) == 0
    assert "--gpu-gib N [--host-gib H] shows them for a card" in capsys.readouterr().out
    for extra, card, checkpointing in (([], 80, False), (["--train.plan_gib=14"], 14, True)):
        assert main(["recipes/llama8b.py", "--gpu-gib", "80", "--host-gib=64", "--json", *extra,
                     f"--out-dir={tmp_path}"]) == 0
        out = capsys.readouterr()
        report = json.loads(out.out)
        cfg = llama("llama8b", *extra)
        # --host-gib=64 is the host's size: the trainer there finds it less the process's and the OS's available
        host = available_on(64 * 2**30)
        plan, lines = plan_for(cfg, "cuda", 80 * 2**30, "a card of 80 GiB (--gpu-gib)",
                               (host, f"a host of 64 GiB (--host-gib) has {host / 2**30:.2f} GiB available"))
        assert report["plan"]["chose"] == cfg.train.plan_chose and report["plan"]["lines"] == lines
        assert plan.estimate.card_bytes <= card * 2**30 and out.err.startswith(lines[0])
        qlora = report["methods"]["qlora"]
        assert qlora["estimated_peak_bytes"] == plan.estimate.peak_bytes and qlora["fits"]
        assert report["device_memory"] == "a card of 80 GiB (--gpu-gib)" and report["estimate_for"] == "cuda"
        assert lines[0] in (tmp_path / "llama8b-none.md").read_text()
        assert report["settings"]["gradient_checkpointing"] is checkpointing  # the recipe's is on


def test_out_dir_takes_its_value_after_a_space_as_the_other_flags_do(tmp_path):
    from qlora.report.memory import main

    assert main(["recipes/tiny.py", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "tiny-none.json").is_file()


def test_a_card_of_exactly_a_lengths_estimate_takes_that_length_and_no_more():
    """The 8B recipe without checkpointing (one plan a length): on a card of exactly the step's estimate at 20,480
    tokens, with the allocator's margin, --max-context says 20,480, limited by the card; 1,024 tokens more do not
    fit, and a card a byte smaller takes 19,456."""
    from qlora.memory.context import fit_context, planned

    cfg = llama("llama8b", "--train.gradient_checkpointing=false", "--train.offload_activations=false")
    host = 128 * 2**30
    card = estimate(planned(cfg, 20_480, 1, None), load_arch(cfg), "qlora", "cuda").card_bytes
    fit = fit_context(cfg, card, host)
    assert (fit.tokens, fit.limit, fit.estimate.card_bytes) == (20_480, "card", card)
    assert fit_context(cfg, card - 1, host).tokens == 19_456


@pytest.mark.parametrize("flags", [["--gpu-gib=40", "--gpu-gib", "80"], ["--gpus=2", "--gpus=3"]])
def test_a_flag_given_twice_with_other_values_says_the_last_stands(capsys, flags):
    """As a recipe key given twice: the second took over without a word, and the report was of a card not meant."""
    from qlora.report.memory import main

    assert main(["recipes/llama70b.py", *flags]) == 0
    last = flags[-1] if "=" in flags[-1] else f"{flags[-2]}={flags[-1]}"
    assert capsys.readouterr().out.splitlines()[0] == (f"{last.split('=')[0]} is given 2 times: the last, {last}, "
                                                      f"stands (not {flags[0]})")
