"""The benchmarks measure what they say: the standard stack is what Hugging Face users run, the lever probes work on
the transformers of the GPU image, and the max-context search is bounded. Tiny shapes on the CPU."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora.base.build import ensure_checkpoint
from qlora.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks are scripts, not a package
import lever_costs  # noqa: E402
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
    # The stack's paged AdamW, as Trainer(optim="paged_adamw_32bit") builds it, says on a CPU that it runs unpaged.
    cpu = pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU")
    try:
        with cpu if device.type == "cpu" else contextlib.nullcontext():
            step(throughput.synthetic_batch(model.config.vocab_size, 2, 32, device))
    finally:
        for hook in hooks:
            hook.remove()
    assert {what for what, _ in seen} == {"q_proj lora_A", "o_proj input"}
    assert all(dtype == torch.bfloat16 for _, dtype in seen), seen


# --- memory_levers.py: transformers' offload on the GPU image's transformers, and a bounded search ---

def test_transformers_offload_probe_works_without_the_transformers_5_23_method(tiny_config, monkeypatch) -> None:
    """transformers 5.17 (the GPU image) has no activation_checkpointing_enable(offload=True): the probe wraps each
    checkpoint in save_on_cpu itself, and the loss and gradients stay those of plain checkpointing."""
    from transformers import PreTrainedModel

    from qlora.training.assemble import build_model
    from qlora.training.loss import loss_sum

    def loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss = loss_sum(model.train(), batch)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    def built() -> torch.nn.Module:
        model = build_model(tiny_config)["model"]
        with torch.no_grad():  # a non-zero B, so that every adapter gets a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        return model

    batch = throughput.synthetic_batch(259, 2, 64, torch.device("cpu"))
    plain = loss_and_grads(built(), batch)
    model = built()
    monkeypatch.delattr(PreTrainedModel, "activation_checkpointing_enable", raising=False)  # absent before 5.23
    entered = []
    real_save_on_cpu = torch.autograd.graph.save_on_cpu
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", lambda **kw: entered.append(kw) or real_save_on_cpu(**kw))
    memory_levers.hf_offload(model)
    offloaded = loss_and_grads(model, batch)
    assert len(entered) == model.config.num_hidden_layers  # every layer's checkpoint, in the forward
    torch.testing.assert_close(offloaded[0], plain[0])
    for got, expected in zip(offloaded[1], plain[1], strict=True):
        torch.testing.assert_close(got, expected)


def limit_search(limit: int, start: int, max_probes: int = 99, **kw: object) -> tuple[tuple, list[int]]:
    asked: list[int] = []

    def fits(seq: int) -> bool | None:
        if len(asked) >= max_probes:
            return None
        asked.append(seq)
        return seq <= limit

    return memory_levers.search_max_context(fits, start, granularity=256, max_seq=262_144, **kw), asked


@pytest.mark.parametrize("limit", [700, 5_000, 31_000, 150_000])
@pytest.mark.parametrize("start", [2048, 30_000])
def test_max_context_search_brackets_the_limit_within_its_precision_in_few_probes(limit: int, start: int) -> None:
    (lo, hi), asked = limit_search(limit, start, growth=2.0)
    assert lo <= limit < hi
    assert hi - lo <= max(256, lo / 16)
    assert len(asked) <= 12 and len(set(asked)) == len(asked)


def test_max_context_search_from_a_close_estimate_costs_a_few_probes() -> None:
    (lo, hi), asked = limit_search(100_000, 92_000)  # an estimate 8% short
    assert lo <= 100_000 < hi and hi - lo <= lo / 16
    assert len(asked) <= 4, asked


def test_max_context_search_stops_when_told_and_at_its_bounds() -> None:
    (lo, hi), asked = limit_search(150_000, 2048, max_probes=3, growth=2.0)
    assert len(asked) == 3 and (lo, hi) == (asked[-1], None)  # cut short: what it knows, not a guess
    assert limit_search(10**9, 2048)[0] == (262_144, None)  # everything fits: up to --max-seq
    assert limit_search(100, 2048)[0] == (None, 256)  # nothing fits: down to one granularity step


def test_benchmark_parents_never_initialise_cuda(tmp_path, fake_gpu) -> None:
    """Where torch sees a GPU, the parent processes read its name from nvidia-smi and leave the budget to the
    children (real processes, on this CPU): a context of their own would count in every child's peak."""
    memory_levers.main(["--size=tiny", "--levers=baseline", f"--out-dir={tmp_path}", "--probe-steps=1"])
    report = (tmp_path / "memory-levers-cuda-tiny.md").read_text()
    assert "| baseline (checkpointing only) | 0." in report
    throughput.main(["--size=tiny", "--stacks=ours", "--steps=1", "--warmup=0", f"--out-dir={tmp_path}"])
    assert "| ours | " in (tmp_path / "throughput-cuda-tiny.md").read_text()


def test_max_context_search_steps_at_least_one_granularity() -> None:
    (lo, hi), asked = limit_search(1000, 256)  # 256 x 1.25 rounds back to 256: the step must still move
    assert lo <= 1000 < hi and asked[:2] == [256, 512]


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu: one child, round-robin", "gpu: a child per configuration"])
def test_lever_costs_measure_the_batch_shape_against_one_row(tmp_path: Path, request: pytest.FixtureRequest,
                                                             gpu: bool) -> None:
    """The batch shape's figure is 2 - t(2 rows) / t(1 row) against checkpointing alone, its step running two rows;
    with a GPU each configuration is a process of its own (the children run on this CPU: the small size is CPU)."""
    import json

    if gpu:
        request.getfixturevalue("fake_gpu")
    assert lever_costs.main(["--size=small", "--seq=64", "--steps=1", "--warmup=0", f"--out-dir={tmp_path}",
                             "--only=plain,train.gradient_checkpointing,train.batch_size"]) == 0
    found = json.loads((tmp_path / f"lever-costs-{'cuda' if gpu else 'cpu'}-small.json").read_text())
    results, costs = found["results"], found["costs"]
    one, two = results["train.gradient_checkpointing"]["step_s"], results["train.batch_size"]["step_s"]
    assert costs["train.batch_size"] == pytest.approx(2 - two / one)
    assert costs["train.gradient_checkpointing"] == pytest.approx((one - results["plain"]["step_s"])
                                                                  / results["plain"]["step_s"])
    if gpu:  # throughput.measure's record: the step ran two rows
        assert results["train.batch_size"]["rows"] == 2 and results["plain"]["rows"] == 1


@pytest.mark.parametrize("size", ["8b", "70b", "70b-24gb", "8b-6gb"])
def test_probes_and_stacks_measure_the_levers_they_name_not_the_plans(size: str) -> None:
    """The big recipes leave their levers to train.plan=fastest, which picks others for the card it finds (on an
    H200: every memory lever off). A lever probe, a max-context probe with the parent's plan for an emulated card, and
    the `ours` stack measure the levers as they are given; the plan's stacks plan."""
    import argparse

    assert throughput.base_config(size, []).train.plan == "fastest"
    args = argparse.Namespace(size=size, override=[], seq=2048, rank=None, batch=1)
    given = memory_levers.probe_config(args, {"recipe": True, "overrides": ["--train.loss_chunk_size=512"]})
    assert given.train.plan == "recipe" and given.train.loss_chunk_size == 512 and not given.data.pack
    baseline = memory_levers.probe_config(args, {"name": "baseline"})
    assert baseline.train.plan == "recipe" and baseline.train.gradient_checkpointing
    assert throughput.stack_config(args, throughput.STACKS["ours"]).train.plan == "recipe"
    assert throughput.stack_config(args, throughput.STACKS["ours-fastest"]).train.plan == "fastest"
    batched = throughput.stack_config(args, throughput.STACKS["ours-batched"]).train
    assert batched.plan == "fastest" and batched.plan_batch


@pytest.mark.parametrize(("script", "args", "line"), [
    ("quality.py", ["recipes/tiny.py", "--methods=foo"], "error: --methods: unknown foo; use some of "),
    ("quant_screen.py", ["recipes/missing.py"], "error: recipe "),
    ("memory_levers.py", ["--size=tiny", "--levers=zzz", "--out-dir={tmp}"], "error: --levers zzz: use all or some "),
    ("lever_costs.py", ["--size=huge"], "error: argument --size: invalid choice: 'huge' "),
], ids=["its own check", "a recipe's", "its own line", "argparse's"])
def test_a_benchmark_ends_bad_input_as_every_command_does(tmp_path, script, args, line) -> None:
    """One line and exit 2 (docs/failures.md), through qlora.cli.run: they ended in exit 1 with the line alone
    (raise SystemExit(message)), a traceback (a recipe's ConfigError), or argparse's usage above its error."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), *(a.format(tmp=tmp_path) for a in args)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(line), result.stderr
