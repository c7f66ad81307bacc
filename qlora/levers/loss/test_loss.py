"""The head and cross-entropy in chunks (loss_chunk_size) or fused by liger-kernel (liger_ce): the loss and gradients
of computing all logits at once."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from support import SCALED_LORA, assert_same, build, loss_and_grads

from qlora.config import Config
from qlora.training.loss import loss_sum


@pytest.mark.parametrize("chunk_size", [1, 7, 32])
def test_chunked_loss_matches_unchunked(tiny_config: Config, batch: dict, chunk_size: int) -> None:
    model = build(tiny_config)
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert n_targets > chunk_size  # otherwise loss_sum takes the one-chunk path and nothing is compared
    assert_same(loss_and_grads(model, batch, chunk_size), loss_and_grads(model, batch, 0))


def test_the_chunks_are_the_models_own_logits_on_a_tied_biased_head(tiny_config: Config, batch: dict,
                                                                    unlike_tiny) -> None:
    """The loss runs the head itself after the decoder (training/loss.py's target_hidden), not the model's forward:
    on the tied Qwen2 (r=8, alpha=24), its head given a bias (no base the tests build has one), the summed loss and
    gradients of transformers' own logits, whole and in chunks. The tests above compare the lever with the same
    target_hidden, so hidden states taken one position off passed them."""
    import torch.nn.functional as F

    # Without dropout: the model's forward and the loss's draw their masks from different random states.
    model = build(tiny_config, *unlike_tiny("qwen2-tied"), *SCALED_LORA, "--lora.dropout=0")
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight
    head.bias = torch.nn.Parameter(torch.randn(head.out_features, generator=torch.Generator().manual_seed(0)),
                                   requires_grad=False)
    model.zero_grad(set_to_none=True)
    labels = batch["labels"][:, 1:]
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1][labels != -100]
    loss = F.cross_entropy(logits.float(), labels[labels != -100], reduction="sum")
    loss.backward()
    own = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for chunk_size in (0, 7):
        assert_same(loss_and_grads(model, batch, chunk_size), own, rtol=1e-5, atol=1e-5)


def test_the_training_step_makes_the_logits_in_chunks(tiny_config: Config, batch: dict) -> None:
    """forward_backward hands train.loss_chunk_size down to the head: never more than that many positions' logits at
    once, in the forward or the checkpointed recompute, and the loss and gradients of all at once. A step that took
    every logit at once computes the same numbers, so only the head's widths tell the lever is off."""
    from qlora.training.step import forward_backward

    model = build(tiny_config)
    whole = forward_backward(model, [batch])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    widest = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: widest.append(i[0].shape[0]))
    chunked = forward_backward(model, [batch], chunk_size=7)
    hook.remove()
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert max(widest) == 7 and sum(widest) == 2 * n_targets  # each chunk run twice: forward, then recompute
    assert chunked == pytest.approx(whole, rel=1e-6)
    with torch.no_grad():  # the step's loss is the mean over the target tokens, not over every position
        assert whole == pytest.approx(float(loss_sum(model, batch)) / n_targets, rel=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7)


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
