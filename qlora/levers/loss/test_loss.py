"""The head and cross-entropy in chunks (loss_chunk_size) or fused by liger-kernel (liger_ce): the loss and gradients
of computing all logits at once."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from support import assert_same, build, loss_and_grads

from qlora.config import Config


@pytest.mark.parametrize("chunk_size", [1, 7, 32])
def test_chunked_loss_matches_unchunked(tiny_config: Config, batch: dict, chunk_size: int) -> None:
    model = build(tiny_config)
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert n_targets > chunk_size  # otherwise loss_sum takes the one-chunk path and nothing is compared
    assert_same(loss_and_grads(model, batch, chunk_size), loss_and_grads(model, batch, 0))


def test_liger_ce_needs_the_package_or_falls_back(tiny_config: Config, capsys: pytest.CaptureFixture) -> None:
    # On CPU the switch is accepted and the PyTorch loss is used; liger-kernel itself is CUDA-only.
    build(tiny_config, "--train.liger_ce=true")
    assert "CUDA only" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="needs a CUDA GPU and liger-kernel")
def test_liger_ce_matches_pytorch_chunks_on_cuda(tiny_config: Config, batch: dict) -> None:
    batch = {k: v.cuda() for k, v in batch.items()}
    model = build(tiny_config, "--train.device=cuda")
    reference = loss_and_grads(model, batch, chunk_size=16)
    from qlora.levers.loss.chunks import use_liger_ce

    assert use_liger_ce(model)
    # bf16 logits from two different kernels: close, not bitwise.
    assert_same(loss_and_grads(model, batch), reference, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_the_held_out_loss_takes_the_logits_in_chunks_too(tiny_config: Config, batch: dict, chunk_size: int) -> None:
    """Evaluation (qlora.eval, the trainer's, the divergence probe) makes the logits train.loss_chunk_size target
    positions at a time, as training does: the same loss and exact matches, and never more positions at once."""
    from qlora.training.loss import eval_stats

    model = build(tiny_config).eval()
    whole = eval_stats(model, batch)
    widest = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: widest.append(i[0].shape[0]))
    chunked = eval_stats(model, batch, chunk_size)
    hook.remove()
    assert chunked[1:] == whole[1:] and whole[1] > chunk_size
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=0)
    assert max(widest) == chunk_size and sum(widest) == whole[1]
