"""The 4-bit base streamed from host memory (train.stream_base): the losses, gradients and adapter of the base held
whole, and every byte as loaded after the round trip. A synthetic tiny Llama of five layers: more than the two slots,
so every slot is refilled in the forward and again in the backward."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from support import assert_same, build, cuda_only, loss_and_grads
from test_crash import assert_same_run
from torch import nn
from transformers import LlamaConfig

from qlora.base.build import TINY_LLAMA
from qlora.base.quantize import linear4bit
from qlora.config import Config, apply_overrides
from qlora.errors import ConfigError
from qlora.levers.stream_base.stream import LayerStream, travelling
from qlora.train import main  # before fake_gpu: bitsandbytes picks its backend at import

LAYERS = 5


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The tiny Llama's shape with five decoder layers, synthetic weights (the same for every build: one seed)."""
    path = tmp_path_factory.mktemp("tiny5") / "config.json"
    LlamaConfig(vocab_size=259, **{**TINY_LLAMA, "num_hidden_layers": LAYERS}).to_json_file(path)
    return ["--model.synthetic=true", f"--model.config_json={path}"]


@pytest.mark.parametrize(("device", "checkpointing"), [("cpu", True), ("cpu", False),
                                                      pytest.param("cuda", True, marks=cuda_only)])
def test_streamed_base_keeps_loss_and_grads(tiny_config: Config, batch: dict, deep: list[str], device: str,
                                            checkpointing: bool) -> None:
    """Two steps with a forward without gradients between them (an evaluation, which leaves other layers in the
    slots): the loss and gradients of the base held whole, with checkpointed layers (recomputed in the backward) and
    without (their saved views of the weight read in the backward). Bitwise on CPU; on CUDA (side stream, events,
    pinned memory) within bf16's tolerance, as its attention backward need not add in one order."""
    flags = [*deep, f"--train.gradient_checkpointing={str(checkpointing).lower()}", f"--train.device={device}"]
    plain, streamed = build(tiny_config, *flags), build(tiny_config, *flags, "--train.stream_base=true")
    assert all(p.device.type == device for p in streamed.parameters())
    exact = dict(rtol=0, atol=0) if device == "cpu" else {}
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    first = loss_and_grads(streamed, batch), loss_and_grads(plain, batch)
    with torch.no_grad():
        torch.testing.assert_close(streamed(**inputs).logits, plain(**inputs).logits, **exact)
    second = loss_and_grads(streamed, batch), loss_and_grads(plain, batch)
    assert_same(*first, **exact)
    assert_same(*second, **exact)


def test_a_streamed_run_trains_the_same_adapter(deep: list[str], tmp_path: Path) -> None:
    """qlora.train end to end, two steps of two micro-batches with evaluations before, between and after: the
    adapter and every logged loss, gradient norm and evaluation bitwise those of the base held whole."""
    args = ["recipes/tiny.py", *deep, "--train.steps=2", "--train.batch_size=4", "--train.grad_accum=2",
            "--train.eval_every=1", "--train.eval_batches=1", "--train.log_every=1"]
    for name, extra in (("plain", []), ("streamed", ["--train.stream_base=true"])):
        assert main([*args, f"--output.dir={tmp_path / name}", *extra]) == 0
    assert_same_run(tmp_path / "streamed", tmp_path / "plain")


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8).cpu()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_nf4_bytes_survive_the_round_trip_bit_for_bit(tiny_config: Config, deep: list[str], device: str) -> None:
    """Host to device and back: every travelling byte of every layer as the base held whole has it; and a 4-bit
    weight holding every bf16 bit pattern, its 254 NaNs among them (a float copy that canonicalises them changes
    the weight: bitsandbytes issue 1945)."""
    flags = [*deep, f"--train.device={device}"]
    plain, streamed = build(tiny_config, *flags), build(tiny_config, *flags, "--train.stream_base=true")
    stream = streamed.layer_stream
    for i, (whole, streaming) in enumerate(zip(plain.get_decoder().layers, streamed.get_decoder().layers,
                                               strict=True)):
        stream.bring(i)  # the compute stream waits for the copy; reading back is queued after it
        expected, got = travelling(whole), travelling(streaming)
        assert len(got) == len(expected) == 3 * 7  # packed weight, absmax, nested absmax of q k v o gate up down
        for (owner, name), (mine, mine_name) in zip(expected, got, strict=True):
            assert torch.equal(as_bytes(getattr(mine, mine_name)), as_bytes(getattr(owner, name))), (i, name)
    layer = linear4bit(torch.randn(512, 512, device=device), None, tiny_config.quant, torch.float32)
    patterns = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.uint8)  # 512 x 512 / 2 bytes
    layer.weight.data.view(-1).copy_(patterns)
    LayerStream(nn.ModuleList([nn.Sequential(layer)]), torch.device(device)).bring(0)
    assert layer.weight.device.type == device and torch.equal(as_bytes(layer.weight), patterns)


def test_stream_base_refuses_what_it_cannot_stream(tiny_config: Config) -> None:
    for flags, says in ((["--quant.method=lora"], "quant.method=lora loads a 16-bit one"),
                        (["--train.checkpoint_every=2"], "set --train.checkpoint_every=1"),
                        (["--train.shard_base=true"], "turn one of them off")):
        with pytest.raises(ConfigError, match=says):
            apply_overrides(copy.deepcopy(tiny_config), ["--train.stream_base=true", *flags])
