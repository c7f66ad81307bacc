"""The kernel table (benchmarks/kernel_table.py) from a real CPU profile of our step on the tiny Llama: every family
the step has is found, the families add up to the profiled time, a lever that removes dequantisation removes its row,
the SDPA backend that ran is named; and throughput.py's two MFU conventions."""

from __future__ import annotations

import ctypes
import gc
import re
import sys
from pathlib import Path

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
    from types import SimpleNamespace

    from kernel_table import family

    event = None
    for name in ops:
        event = SimpleNamespace(name=name, cpu_parent=event, input_shapes=[])
    assert family(event, 16, kernel) == expected
