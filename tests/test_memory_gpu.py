"""The memory profiler and estimator on CUDA: paged optimizer state outside PyTorch's allocator, and the estimate of
Llama-3.1-8B (synthetic NF4 weights) against real steps. CUDA only: skipped where no GPU is visible."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: paged optimizer buffers and the card-level peak exist only there",
                allow_module_level=True)

from qlora.config import apply_overrides, load_recipe  # noqa: E402
from qlora.memory.arch import load_arch  # noqa: E402
from qlora.memory.estimate import estimate  # noqa: E402
from qlora.memory.profiler import PhaseTracker  # noqa: E402
from qlora.memory.readings import tensor_categories  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_paged_optimizer_state_is_counted_outside_the_allocator():
    import bitsandbytes as bnb

    model = torch.nn.Linear(512, 512, bias=False, device="cuda")  # 262,144 weights: paged (>= 1e5)
    optimizer = bnb.optim.PagedAdamW32bit(model.parameters(), lr=1e-3)
    tracker = PhaseTracker(torch.device("cuda"))
    tracker.watch(model, optimizer)
    model(torch.randn(4, 512, device="cuda")).sum().backward()
    optimizer.step()
    record = tracker.mark("optimizer_step")
    assert tensor_categories(model, optimizer)["outside_allocator"] == 2 * 4 * 512 * 512
    assert record["outside_allocator"] == 2 * 4 * 512 * 512
    assert record["card_total"] >= record["reserved"] + record["outside_allocator"]
    if record["nvml_used_now"] is not None:  # nvidia-smi's figure covers at least what we account for
        assert record["nvml_used_now"] >= record["card_total_now"] * 0.95


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_llama8b_estimate_within_10_percent_of_measured(method, tmp_path):
    out = tmp_path / "measured.json"
    subprocess.run([sys.executable, "-m", "qlora.report.measure", "recipes/llama8b.py", f"--quant.method={method}",
                    f"--out={out}"], check=True, cwd=ROOT)
    got = json.loads(out.read_text())
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "llama8b.py"), [f"--quant.method={method}"])
    est = estimate(cfg, load_arch(cfg), method, "cuda")
    assert abs(est.peak_bytes / got["measured_peak_bytes"] - 1) <= 0.10, (est.peak_bytes, got)
    assert got["measured_components"]["quantized_weights"] == est.components["quantized_weights"]
