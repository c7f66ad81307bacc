"""The kernel table (benchmarks/kernel_table.py) from a real CPU profile of our step on the tiny Llama: every family
the step has is found, the families add up to the profiled time, a lever that removes dequantisation removes its row,
the SDPA backend that ran is named; and throughput.py's two MFU conventions."""

from __future__ import annotations

import ctypes
import gc
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qlora.config import Config, apply_overrides

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks are scripts, not a package
import throughput  # noqa: E402
from kernel_table import FAMILIES, table_text  # noqa: E402


@pytest.fixture(autouse=True)
def _return_freed_memory() -> None:
    """A profile's record is large and freed at the end: hand its pages back to the OS, or the resident-set baseline of
    a later test in this process (tests/test_memory.py's memory.json) starts above what that test's run will use."""
    yield
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def profile(cfg: Config, steps: int = 1) -> tuple[dict, torch.nn.Module]:
    model, step, device = throughput.build_ours(cfg)
    batch = throughput.synthetic_batch(model.config.vocab_size, 2, 48, device)
    step(batch)  # the first step builds the optimizer state (and dequant_once's copies)
    return throughput.profiled(step, batch, steps, cfg.lora.r, None), model


@pytest.fixture
def cfg(tiny_config: Config) -> Config:
    return apply_overrides(tiny_config, ["--lora.r=8", "--lora.alpha=8"])  # r differs from every base dimension


def test_every_family_of_our_step_is_found_and_they_add_up(cfg: Config) -> None:
    found, _ = profile(cfg)
    table = found["kernels"]
    assert set(table) == set(FAMILIES)
    for family in ("dequantisation", "base matmuls", "LoRA matmuls", "attention", "norms/activations", "loss",
                   "optimizer"):
        assert table[family] > 0, (family, table)
    assert table["host copies"] == 0  # a CPU device copies nothing between host and card
    # No operator of the step's work lands in `other` (its share of the time is no test: on a loaded machine the
    # autograd engine's own time between operators, which it holds, passed half of a tiny step's)
    work = re.compile(r"^aten::(mm|addmm|bmm|matmul|linear|_?softmax|log_softmax|.*rms_norm|silu|.*cross_entropy.*|"
                      r"nll_loss.*|.*scaled_dot_product.*|embedding_dense_backward)$|gemm|dequantize", re.I)
    assert found["other_ops"] and not [name for name in found["other_ops"] if work.search(name)], found["other_ops"]
    assert sum(found["other_ops"].values()) <= table["other"] * (1 + 1e-9)
    assert found["sdpa"] and set(found["sdpa"]) <= {"flash", "math"}  # what torch's CPU SDPA has
    lines = table_text({"ours": table}, {"ours": 12.5})
    assert lines[0] == "| family | ours |" and lines[-2].startswith("| total, every stream | ")
    assert lines[-1] == "| step, wall clock | 12.5 ms |"


def test_dequant_once_empties_the_dequantisation_row_and_eager_attention_has_no_sdpa(cfg: Config) -> None:
    once, _ = profile(apply_overrides(cfg, ["--train.dequant_once=true"]))
    assert once["kernels"]["dequantisation"] == 0  # the copies were made in the step before the record
    eager, _ = profile(apply_overrides(cfg, ["--model.attn_implementation=eager"]))
    assert eager["sdpa"] == {} and eager["kernels"]["attention"] == 0


def test_mfu_conventions(cfg: Config) -> None:
    model, _, _ = throughput.build_ours(cfg)
    c, n = model.config, throughput.base_parameters(model)
    six_n, useful = throughput.flops_per_token(model, n, 2048)
    table = c.vocab_size * c.hidden_size  # the input embeddings: looked up, never multiplied
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert six_n == 6 * n
    assert useful == 4 * (n - (0 if c.tie_word_embeddings else table)) + \
        12 * c.num_hidden_layers * c.num_attention_heads * head_dim * 2049 / 2


@pytest.mark.parametrize(("ops", "kernel", "expected"), [
    (["aten::copy_"], "Memcpy HtoD (Pinned -> Device)", "host copies"),
    (["bitsandbytes::dequantize_4bit"], "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>", "dequantisation"),
    (["aten::_scaled_dot_product_flash_attention"], "flash_fwd_kernel", "attention"),
    (["Fast_RMS_Layernorm"], "_rms_layernorm_forward", "norms/activations"),  # Unsloth's Triton kernels
    (["LoRA_MLP"], "_DWf_DW_dfg_kernel", "norms/activations"),
    (["LigerRMSNormFunction"], "_rms_norm_forward_kernel", "norms/activations"),
    (["Optimizer.step#PagedAdamW.step", "bitsandbytes::optimizer_update_32bit"], "kOptimizer32bit2State", "optimizer"),
])
def test_cuda_kernel_names_land_in_their_families(ops: list[str], kernel: str, expected: str) -> None:
    """Device kernels by the names CUDA libraries give them, under the operators that launch them (outermost first)."""
    from kernel_table import family

    event = None
    for name in ops:
        event = SimpleNamespace(name=name, cpu_parent=event, input_shapes=[])
    assert family(event, 16, kernel) == expected


def fake_profile(cuda: bool) -> SimpleNamespace:
    """Two steps' record, times in microseconds as torch.profiler gives them: the optimizer 400, a base projection
    (linear 20 of its own over mm 600, in 128 x 128), an adapter's mm 100 (its side of rank 8), SDPA's flash forward
    200 and backward 300, a mul 40, an index 10. On CUDA each operator launches one kernel of 1.5x its CPU time, and a
    copy launches a 500 us copy to the host and a 300 us one from it."""
    def op(name: str, us: float, shapes: list | None = None, parent: object = None, kernel: str = "kernel",
           total: float | None = None) -> SimpleNamespace:
        kernels = [SimpleNamespace(name=kernel, duration=1.5 * us)] if cuda else []
        return SimpleNamespace(name=name, self_cpu_time_total=us, cpu_time_total=total or us, input_shapes=shapes or [],
                               cpu_parent=parent, kernels=kernels, device_type=torch.autograd.DeviceType.CPU)

    linear = op("aten::linear", 20, [[48, 128], [128, 128]], total=620)
    events = [op("Optimizer.step#AdamW.step", 400), linear, op("aten::mm", 600, [[48, 128], [128, 128]], linear),
              op("aten::mm", 100, [[48, 8], [8, 128]]), op("aten::_scaled_dot_product_flash_attention", 200),
              op("aten::_scaled_dot_product_flash_attention_backward", 300), op("aten::mul", 40),
              op("aten::index", 10)]
    if cuda:
        copy = op("aten::copy_", 0)
        copy.kernels = [SimpleNamespace(name="Memcpy DtoH (Device -> Pinned)", duration=500),
                        SimpleNamespace(name="Memcpy HtoD (Pinned -> Device)", duration=300)]
        events[-1].kernels[0].name = "index_elementwise_kernel"  # an elementwise kernel of an `other` operator
        events.append(copy)
    return SimpleNamespace(events=lambda: events)


def test_the_table_sums_each_operators_own_time_per_step_in_its_family() -> None:
    """CPU: self time / 1,000 / 2 steps: optimizer 0.2 ms, base matmuls (20 + 600) 0.31, LoRA 0.05, attention
    (200 + 300) 0.25, norms/activations 0.02, other 0.005; a parent's total time (620 holding its mm's 600) would
    count the mm twice. CUDA: the kernels' device time, 1.5x, and the copies (500 + 300) / 1,000 / 2 = 0.4 ms."""
    from kernel_table import kernel_table, sdpa_backends

    cpu = {"optimizer": 0.2, "base matmuls": 0.31, "LoRA matmuls": 0.05, "attention": 0.25, "norms/activations": 0.02,
           "other": 0.005}
    assert kernel_table(fake_profile(False), 8, 2) == pytest.approx({**dict.fromkeys(FAMILIES, 0.0), **cpu})
    on_device = {k: 1.5 * v for k, v in cpu.items()} | {"norms/activations": 0.03 + 0.0075, "other": 0.0,
                                                         "host copies": 0.4}
    assert kernel_table(fake_profile(True), 8, 2) == pytest.approx({**dict.fromkeys(FAMILIES, 0.0), **on_device})
    assert sdpa_backends(fake_profile(False)) == {"flash": 1}  # its backward is the same call, not another


def test_the_table_text_gives_each_family_its_share_of_the_total() -> None:
    lines = table_text({"ours": {"base matmuls": 3.0, "other": 1.0}, "theirs": {"attention": 2.0}})
    assert "| base matmuls | 3.0 ms (75%) | 0.0 ms (0%) |" in lines  # 3 of the 4 ms
    assert "| other | 1.0 ms (25%) | 0.0 ms (0%) |" in lines
    assert "| attention | 0.0 ms (0%) | 2.0 ms (100%) |" in lines
    assert lines[-1] == "| total, every stream | 4.0 ms | 2.0 ms |"
