"""The input embeddings in host memory (embeddings_on_cpu): loss and gradients unchanged, the device's table freed."""

from __future__ import annotations

import weakref

import pytest
import torch
from support import assert_same, build, loss_and_grads

from qlora.config import Config
from qlora.levers.cpu_embeddings.embedding import CPUEmbedding, embeddings_to_cpu


def test_embeddings_on_cpu_keep_loss_and_grads(tiny_config: Config, batch: dict) -> None:
    plain = loss_and_grads(build(tiny_config), batch)
    model = build(tiny_config, "--model.embeddings_on_cpu=true")
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, CPUEmbedding)
    assert not any(p is embedding.table for p in model.parameters())  # .to(device) must not move it back
    assert_same(loss_and_grads(model, batch), plain)


def test_embeddings_to_cpu_empties_the_cache_once_the_old_table_is_unreferenced(tiny_config: Config,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A CPU model told its device is CUDA: only the order of release and empty_cache is checked here (the bytes
    # freed on a real GPU: tests/test_gpu.py).
    model = build(tiny_config)
    old = weakref.ref(model.get_input_embeddings().weight)
    released = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(old() is None))
    assert embeddings_to_cpu(model, torch.device("cuda")) == 0  # the table was in CPU memory already
    assert released == [True]


def test_the_start_up_line_counts_the_table_on_the_host(tiny_config: Config, capsys: pytest.CaptureFixture) -> None:
    """A plain attribute, no parameter: the printed total had lost V h (26.6% trainable became 28.5%)."""
    from qlora.training.assemble import prepare, print_summary

    totals = []
    for flag in ("false", "true"):
        tiny_config.model.embeddings_on_cpu = flag == "true"
        print_summary(tiny_config, prepare(tiny_config))
        totals.append(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("trainable ")))
    assert totals[0] == totals[1] == "trainable 131,072 of 492,928 parameters (26.590%)"
