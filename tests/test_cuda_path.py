"""The CUDA path, checked on the CPU: what is refused before a GPU is touched, pinned host memory for activation
offload, and the cache handed back before the paged optimizer allocates its state. The same code on a real GPU:
tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from qlora.config import Config, ConfigError, apply_overrides
from qlora.data import collate
from qlora.levers.offload import check_pinned_memory, pinned_need
from qlora.train import build_model, build_optimizer, forward_backward, prepare, stepped_params

GIB = 2**30


def test_fp16_compute_on_cuda_is_refused_before_the_gpu_is_touched(tiny_config: Config, fake_gpu: None) -> None:
    cfg = apply_overrides(tiny_config, ["--train.device=cuda", "--quant.compute_dtype=fp16"])
    with pytest.raises(ConfigError, match=r"quant.compute_dtype=fp16: .*no loss scaling.*--quant.compute_dtype=bf16"):
        build_model(cfg)


def test_pinned_need_rounds_each_layer_input_up_to_a_power_of_two() -> None:
    # Llama-70B at 100,000 tokens: each layer input is 1.53 GiB in bf16, a 2 GiB pinned block.
    assert pinned_need(80, 100_000, 8192, 2, one_shape=True) == 80 * 2 * GIB
    assert pinned_need(80, 100_000, 8192, 2, one_shape=False) == 2 * 80 * 2 * GIB
    assert pinned_need(80, 65_536, 8192, 2, one_shape=True) == 80 * GIB  # exactly a power of two: no rounding


def test_offload_that_cannot_pin_its_inputs_is_refused_with_what_fits() -> None:
    available = 150 * GIB  # 135 GiB of room: the 122 GiB of inputs fit, their 160 GiB of pinned blocks do not
    assert 80 * 100_000 * 8192 * 2 < 0.9 * available
    with pytest.raises(ConfigError) as refused:
        check_pinned_memory(80, 1, 100_000, 8192, 2, True, available)
    message = str(refused.value)
    assert message.startswith("train.offload_activations would pin up to 160.0 GiB of host memory (80 layer inputs")
    assert "but 150.0 GiB is available: use --data.max_seq_len=65536 or less" in message
    assert "\n" not in message
    check_pinned_memory(80, 1, 65_536, 8192, 2, True, available)  # what it names does fit
    with pytest.raises(ConfigError):
        check_pinned_memory(80, 1, 65_537, 8192, 2, True, available)  # and is the longest that does
    with pytest.raises(ConfigError, match=r"use --data.max_seq_len=32768 or less, or --data.pack=true"):
        check_pinned_memory(80, 1, 65_536, 8192, 2, False, available)  # unpacked rows: other lengths cached too


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
