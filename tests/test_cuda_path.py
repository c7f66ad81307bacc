"""The CUDA path, checked on the CPU: what is refused before a GPU is touched, pinned host memory for activation
offload, and the cache handed back before the paged optimizer allocates its state. The same code on a real GPU:
tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from qlora.config import Config, ConfigError, apply_overrides
from qlora.data import collate
from qlora.levers.checkpoints import check_pinned_memory, pinned_need
from qlora.train import build_model, build_optimizer, forward_backward, prepare, stepped_params

GIB = 2**30


def test_fp16_compute_on_cuda_is_refused_before_the_gpu_is_touched(tiny_config: Config, fake_gpu: None) -> None:
    cfg = apply_overrides(tiny_config, ["--train.device=cuda", "--quant.compute_dtype=fp16"])
    with pytest.raises(ConfigError, match=r"quant.compute_dtype=fp16: .*no loss scaling.*--quant.compute_dtype=bf16"):
        build_model(cfg)


def test_pinned_need_is_each_offloaded_layer_input_at_its_exact_size(tiny_config: Config) -> None:
    # Llama-70B at 100,000 tokens: each layer input is 1.53 GiB in bf16, pinned as exactly that (offload.pinned_buffer:
    # torch's pinned allocator would round each up to 2 GiB, and keep smaller blocks for rows of other lengths).
    train = tiny_config.train
    train.batch_size = 1
    assert pinned_need(80, train, 100_000, 8192, 2) == 80 * 100_000 * 8192 * 2
    train.checkpoint_every = 3  # every third layer keeps its input: 27 of 80
    assert pinned_need(80, train, 100_000, 8192, 2) == 27 * 100_000 * 8192 * 2
    train.offload_budget_gib = 20.0  # 13 inputs fit in 20 GiB: the other 14 stay on the device
    assert pinned_need(80, train, 100_000, 8192, 2) == 13 * 100_000 * 8192 * 2


def test_offload_that_cannot_pin_its_inputs_is_refused_with_the_budget_that_fits(tiny_config: Config) -> None:
    available = 130 * GIB  # 117 GiB of room: the 122 GiB of inputs do not fit
    train = tiny_config.train
    train.batch_size = 1
    with pytest.raises(ConfigError) as refused:
        check_pinned_memory(80, train, 100_000, 8192, 2, available)
    message = str(refused.value)
    assert message.startswith("train.offload_activations would pin 122.1 GiB of host memory (80 layer inputs of 1 x")
    assert "but 130.0 GiB is available: set --train.offload_budget_gib=117.0 (the other inputs stay" in message
    assert "\n" not in message
    train.offload_budget_gib = 117.0  # what it names does fit
    check_pinned_memory(80, train, 100_000, 8192, 2, available)
    train.offload_budget_gib, train.checkpoint_every = 0.0, 2  # as does keeping every other input
    check_pinned_memory(80, train, 100_000, 8192, 2, available)


def test_the_cache_is_emptied_once_before_the_paged_state_exists(tiny_config: Config,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run = prepare(tiny_config)
    optimizer = build_optimizer([p for p in run["model"].parameters() if p.requires_grad], tiny_config)
    states = []  # how many parameters had optimizer state each time the cache was emptied
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as after a CUDA forward and backward
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: states.append(len(optimizer.state)))
    batch = run["train_rows"][:2]
    for _ in range(2):
        forward_backward(run["model"].train(), [collate(batch, run["tokenizer"].pad_token_id)])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert states == [0]
    assert len(optimizer.state) == len(stepped_params(optimizer))


@pytest.mark.parametrize("env, expected", [({}, ("expandable_segments:True", None)),
                                           ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:256"},
                                            ("max_split_size_mb:256", None)),
                                           ({"PYTORCH_ALLOC_CONF": "backend:native"}, (None, "backend:native"))])
def test_the_allocator_gets_expandable_segments_unless_the_user_chose(env: dict, expected: tuple) -> None:
    """Set when qlora is imported (CUDA reads it at its first allocation); a user's own setting, under either name
    torch reads, stays as it is."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    code = "import os, qlora; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'), os.environ.get('PYTORCH_ALLOC_CONF'))"
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(v) for v in expected]
