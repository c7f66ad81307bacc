"""The input embeddings in host memory (embeddings_on_cpu): loss and gradients unchanged, the device's table freed."""

from __future__ import annotations

import weakref

import pytest
import torch
from support import assert_same, build, loss_and_grads

from qlora.config import Config
from qlora.errors import ConfigError
from qlora.levers.cpu_embeddings.embedding import CPUEmbedding, embeddings_to_cpu


def test_embeddings_on_cpu_keep_loss_and_grads(tiny_config: Config, batch: dict) -> None:
    plain = loss_and_grads(build(tiny_config), batch)
    model = build(tiny_config, "--model.embeddings_on_cpu=true")
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, CPUEmbedding)
    assert not any(p is embedding.table for p in model.parameters())  # .to(device) must not move it back
    assert_same(loss_and_grads(model, batch), plain)


def test_a_scaled_embedding_keeps_its_scale_and_every_row_is_looked_up() -> None:
    """Gemma 3's embedding multiplies each row by sqrt(hidden) in its forward: the table on the host did not (6.6 of
    rows of ~1 apart at scale 4), so an untied model so built would train on other inputs than the model's. Every id
    is looked up as the module itself does, the table's last rows included."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    ids = torch.arange(259).view(7, 37)
    for module in (torch.nn.Embedding(259, 16, padding_idx=0), Gemma3TextScaledWordEmbedding(259, 16, 0, 4.0)):
        torch.testing.assert_close(CPUEmbedding(module, torch.device("cpu"))(ids), module(ids), rtol=0, atol=0)


def test_embeddings_on_cpu_refuse_what_they_cannot_hold(tiny_config: Config) -> None:
    """A head tied to the table needs it on the device anyway; an embedding whose forward does more than a lookup
    (and is not a scaled one) would lose it."""
    from support import architecture

    with pytest.raises(ConfigError, match=r"^model.embeddings_on_cpu: this model ties lm_head to the input "):
        build(tiny_config, *architecture("tiny-llama-tied"), "--model.embeddings_on_cpu=true")

    class Shifted(torch.nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) + 1

    model = build(tiny_config)
    model.set_input_embeddings(Shifted(259, model.config.hidden_size))
    with pytest.raises(ConfigError, match=r"but this model's Shifted computes more in its forward: set "):
        embeddings_to_cpu(model, torch.device("cpu"))


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


def test_a_scaled_embedding_is_taken_and_its_vectors_are_sent_to_the_device(tiny_config: Config) -> None:
    """Gemma's scaled embedding is a lookup times embed_scale, which CPUEmbedding keeps: embeddings_to_cpu must take
    it, not refuse it as a forward that computes more. The looked-up vectors go to the model's device (meta here, the
    one device besides the CPU on every machine): left in CPU memory, they meet a first layer on the GPU."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    model = build(tiny_config)
    hidden = model.config.hidden_size
    model.set_input_embeddings(Gemma3TextScaledWordEmbedding(259, hidden, 0, hidden**0.5))
    assert embeddings_to_cpu(model, torch.device("meta")) == 0
    embedding = model.get_input_embeddings()
    vectors = embedding(torch.arange(259).view(7, 37))
    assert (vectors.device.type, vectors.shape, embedding.table.device.type) == ("meta", (7, 37, hidden), "cpu")
