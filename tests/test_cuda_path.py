"""The CUDA path, checked on the CPU: what is refused before a GPU is touched, pinned host memory for activation
offload, and the cache handed back before the paged optimizer allocates its state. The same code on a real GPU:
tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from qlora.config import Config, apply_overrides
from qlora.data.batches import collate
from qlora.errors import ConfigError
from qlora.training.assemble import build_model, prepare
from qlora.training.optimizer import build_optimizer, empty_cache_before_state, stepped_params
from qlora.training.step import forward_backward

GIB = 2**30


def test_fp16_compute_on_cuda_is_refused_before_the_gpu_is_touched(tiny_config: Config, fake_gpu: None) -> None:
    cfg = apply_overrides(tiny_config, ["--train.device=cuda", "--quant.compute_dtype=fp16"])
    with pytest.raises(ConfigError, match=r"quant.compute_dtype=fp16: .*no loss scaling.*--quant.compute_dtype=bf16"):
        build_model(cfg)






def test_the_cache_is_emptied_once_before_the_paged_state_exists(tiny_config: Config,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run = prepare(tiny_config)
    optimizer = build_optimizer([p for p in run["model"].parameters() if p.requires_grad], tiny_config)
    # On CUDA the paged optimizer carries this hook (training/optimizer.py); on the CPU nothing pages, so the trainer
    # builds the plain class without it, and the test puts it on by hand (tests/test_gpu.py checks the real thing).
    optimizer.register_step_pre_hook(empty_cache_before_state)
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
