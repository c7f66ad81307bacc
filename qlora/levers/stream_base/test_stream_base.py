"""The 4-bit base streamed from host memory (train.stream_base): the losses, gradients and adapter of the base held
whole, every byte as loaded after the round trip, the estimate's terms as the streamer pins, holds and moves them,
and the refusal of a host that cannot pin the base. A synthetic tiny Llama of five layers: more than the two slots,
so every slot is refilled in the forward and again in the backward."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from support import CUDA_SAME, assert_same, build, cuda_only, loss_and_grads
from test_crash import assert_same_run
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig

from qlora.base.build import TINY_LLAMA
from qlora.base.quantize import linear4bit
from qlora.config import Config, apply_overrides, load_recipe
from qlora.errors import ConfigError
from qlora.eval import evaluate_run
from qlora.levers.stream_base.stream import LayerStream, in_backward, travelling
from qlora.memory.arch import load_arch
from qlora.memory.estimate import estimate
from qlora.memory.preflight import check_fits, needs
from qlora.report.memory import main as memory_main
from qlora.train import main  # before fake_gpu: bitsandbytes picks its backend at import
from qlora.training.assemble import load_run

ROOT = Path(__file__).resolve().parents[3]
GIB = 2**30
LAYERS = 5


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The tiny Llama's shape with five decoder layers, synthetic weights (the same for every build: one seed)."""
    path = tmp_path_factory.mktemp("tiny5") / "config.json"
    LlamaConfig(vocab_size=259, **{**TINY_LLAMA, "num_hidden_layers": LAYERS}).to_json_file(path)
    return ["--model.synthetic=true", f"--model.config_json={path}"]


@pytest.mark.parametrize(("device", "checkpointing"), [("cpu", True), ("cpu", False),
                                                      pytest.param("cuda", True, marks=cuda_only),
                                                      pytest.param("cuda", False, marks=cuda_only)])
def test_streamed_base_keeps_loss_and_grads(tiny_config: Config, batch: dict, deep: list[str], device: str,
                                            checkpointing: bool) -> None:
    """Two steps with a forward without gradients between them (an evaluation, which leaves other layers in the
    slots): the loss and gradients of the base held whole, with checkpointed layers (recomputed in the backward) and
    without (their saved views of the weight read in the backward). Bitwise on CPU; within bf16's tolerance on CUDA
    (side stream, events, pinned memory)."""
    flags = [*deep, f"--train.gradient_checkpointing={str(checkpointing).lower()}", f"--train.device={device}"]
    plain, streamed = build(tiny_config, *flags), build(tiny_config, *flags, "--train.stream_base=true")
    assert all(p.device.type == device for p in streamed.parameters())
    exact = dict(rtol=0, atol=0) if device == "cpu" else CUDA_SAME
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


def test_a_streamed_run_is_read_back_streamed(deep: list[str], tmp_path: Path) -> None:
    """eval, generate and merge's check read a finished run back with load_run: a streamed run's base streamed again
    (on a card it was streamed to fit), once, each layer's copy started by one hook, and scoring what training
    scored. The levers' last hook left out, or run twice, gave the same losses on the CPU."""
    assert main(["recipes/tiny.py", *deep, "--train.steps=1", "--train.eval_every=1", "--train.eval_batches=1",
                 f"--output.dir={tmp_path}", "--train.stream_base=true"]) == 0
    _, model, _, _ = load_run(tmp_path, "cpu")
    stream = model.layer_stream
    assert len(stream.host) == LAYERS
    assert all(len(layer._forward_pre_hooks) == 1 for layer in model.get_decoder().layers)
    # every travelling tensor a view of a device slot, as the streamer made it: a second streamer's pinned copy not
    slots = {s.untyped_storage().data_ptr() for s in stream.slots}
    layers = model.get_decoder().layers
    assert all(getattr(owner, name).untyped_storage().data_ptr() in slots
               for layer in layers for owner, name in travelling(layer))
    final = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()][-1]
    assert evaluate_run(tmp_path)["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_each_layer_computes_beside_the_next_one_it_needs(tiny_config: Config, batch: dict, deep: list[str],
                                                          checkpointing: bool) -> None:
    """What the device slots hold as each layer runs: in the forward that layer and the next (its copy started
    before this one computes), in the backward that layer and the one before. On CPU the copies are synchronous, so
    a streamer that stopped prefetching (each layer then copied as it is about to run, on CUDA nothing overlapped)
    or fetched the wrong neighbour still gave the same losses."""
    model = build(tiny_config, *deep, "--train.stream_base=true",
                  f"--train.gradient_checkpointing={str(checkpointing).lower()}")
    stream, seen = model.layer_stream, []

    def forward(i: int, module: nn.Module, args: tuple, output: object) -> None:
        if in_backward():  # a checkpointed layer's recompute: its backward's slots are checked below
            return
        seen.append(("forward", i, set(stream.occupant)))
        out = output[0] if isinstance(output, tuple) else output
        # Registered after the streamer's own hook on this tensor, so it runs after the streamer brought layer i in.
        out.register_hook(lambda grad: seen.append(("backward", i, set(stream.occupant))))

    for i, layer in enumerate(model.get_decoder().layers):  # after the streamer's hooks, so they run after them
        layer.register_forward_hook(functools.partial(forward, i))
    for _ in range(2):  # the second step starts from the slots the first one's backward left
        loss_and_grads(model, batch)
    last = LAYERS - 1
    expected = [("forward", i, {i, i + 1 if i < last else i - 1}) for i in range(LAYERS)] + \
               [("backward", i, {i, i - 1 if i > 0 else 1}) for i in reversed(range(LAYERS))]
    assert seen == expected * 2


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
    # Kept until the bytes are read: its host buffer is the copy's source.
    one = LayerStream(nn.ModuleList([nn.Sequential(layer)]), torch.device(device))
    one.bring(0)
    if device == "cuda":
        torch.cuda.synchronize()
    assert layer.weight.device.type == device and torch.equal(as_bytes(layer.weight), patterns)
    del one


class CopiedInto(TorchDispatchMode):
    """Bytes copied into the given tensors' storages while active (autograd's engine carries the mode into the
    backward, where the streamer's hooks copy too)."""

    def __init__(self, targets: list[torch.Tensor]) -> None:
        super().__init__()
        self.ptrs = {t.untyped_storage().data_ptr() for t in targets}
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        if func is torch.ops.aten.copy_.default and args[0].untyped_storage().data_ptr() in self.ptrs:
            self.bytes += args[0].numel() * args[0].element_size()
        return func(*args, **(kwargs or {}))


def test_estimate_counts_what_the_streamer_pins_holds_and_moves(tiny_config: Config, batch: dict,
                                                                 deep: list[str]) -> None:
    """The estimator's terms against the streamer measured on CPU: the host buffer's bytes (pinned on CUDA), the
    device's two slots, the code tables left beside them, and the bytes copied into the slots in a step once
    training runs."""
    cfg = apply_overrides(tiny_config, [*deep, "--train.device=cpu", "--train.stream_base=true"])
    arch = load_arch(cfg)
    on_cpu, on_cuda = estimate(cfg, arch, "qlora", "cpu"), estimate(cfg, arch, "qlora", "cuda")
    model = build(tiny_config, *deep, "--train.stream_base=true")
    stream, layers = model.layer_stream, model.get_decoder().layers
    assert on_cuda.host["streamed_base"] == on_cpu.streamed.host_bytes == stream.buffer.numel()
    # Every travelling tensor of every layer is a view of one of the two slots: the device's share of the base.
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for layer in layers for owner, name in travelling(layer) for t in [getattr(owner, name)]}
    assert len(held) == 2
    assert sum(held.values()) == on_cpu.components["gathered_weights"] == on_cuda.components["gathered_weights"]
    # What stays of the 4-bit weights besides: their code tables and offsets, the CUDA estimate's quantized_weights.
    states = [owner for layer in layers for owner, name in travelling(layer) if name == "data"]
    tables = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for w in states
              for t in (w.quant_state.code, w.quant_state.offset, w.quant_state.state2.code)}
    assert sum(tables.values()) == on_cuda.components["quantized_weights"]
    # On a CPU device the base is the process's memory wherever it waits, and the slots come on top of it.
    plain = estimate(apply_overrides(cfg, ["--train.stream_base=false"]), arch, "qlora", "cpu")
    assert on_cpu.peak_bytes - plain.peak_bytes == on_cpu.components["gathered_weights"]
    loss_and_grads(model, batch)  # the first step starts with empty slots
    before = stream.moved_bytes
    with CopiedInto(stream.slots) as copied:
        loss_and_grads(model, batch)
    assert copied.bytes == stream.moved_bytes - before == on_cuda.streamed.moved_bytes
    assert on_cuda.streamed.moved_bytes == 2 * (LAYERS - 2) * on_cuda.streamed.layer_bytes


@pytest.mark.parametrize(("layers", "flags"), [(LAYERS, ["--quant.double_quant=false"]), (1, [])])
def test_the_estimate_counts_the_streamer_without_double_quant_and_with_one_layer(
        tiny_config: Config, tmp_path: Path, layers: int, flags: list[str]) -> None:
    """Without double quantisation each absmax is fp32 (4 bytes a block) and no nested one travels; one decoder layer
    has one device slot. The host buffer, the device's slots and the plan's line are the streamer's (with double
    quantisation and five layers only, an absmax counted a byte a block, or two slots for one layer, passed)."""
    path = tmp_path / "config.json"
    LlamaConfig(vocab_size=259, **{**TINY_LLAMA, "num_hidden_layers": layers}).to_json_file(path)
    shape = ["--model.synthetic=true", f"--model.config_json={path}", *flags]
    cfg = apply_overrides(copy.deepcopy(tiny_config), [*shape, "--train.device=cpu", "--train.stream_base=true"])
    est = estimate(cfg, load_arch(cfg), "qlora", "cuda")
    stream = build(tiny_config, *shape, "--train.stream_base=true").layer_stream
    assert est.host["streamed_base"] == stream.buffer.numel()
    assert est.components["gathered_weights"] == sum(slot.numel() for slot in stream.slots)
    assert f", {len(stream.slots)} on the device;" in est.streamed.describe()


def test_layers_kept_in_16_bit_are_left_out_of_the_pinned_base(tiny_config: Config, deep: list[str]) -> None:
    """quant.keep_16bit layers of the decoder stay on the device and never travel: the host buffer the estimate
    counts is the streamer's, without them (counted in, a host that fits the base would be refused)."""
    kept = ["--quant.keep_16bit=model.layers.0.mlp.down_proj,model.layers.3.self_attn.q_proj"]
    cfg = apply_overrides(tiny_config, [*deep, *kept, "--train.device=cpu", "--train.stream_base=true"])
    stream = build(tiny_config, *deep, *kept, "--train.stream_base=true").layer_stream
    est = estimate(cfg, load_arch(cfg), "qlora", "cuda")
    whole = estimate(apply_overrides(copy.deepcopy(cfg), ["--quant.keep_16bit="]), load_arch(cfg), "qlora", "cuda")
    assert est.host["streamed_base"] == stream.buffer.numel() < whole.host["streamed_base"]


def test_stream_base_refuses_what_it_cannot_stream(tiny_config: Config) -> None:
    for flags, says in ((["--quant.method=lora"], "quant.method=lora loads a 16-bit one"),
                        (["--train.checkpoint_every=2"], "set --train.checkpoint_every=1"),
                        (["--train.shard_base=true"], "turn one of them off"),
                        (["--train.dequant_once=true"], "set --train.dequant_once=false")):
        with pytest.raises(ConfigError, match=says):
            apply_overrides(copy.deepcopy(tiny_config), ["--train.stream_base=true", *flags])


def test_a_host_that_cannot_pin_the_streamed_base_is_refused_in_one_line(
        fake_gpu: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """recipes/llama70b_24gb.py on a 24 GiB card (fake_gpu: nothing may touch CUDA) with 32 GiB of host memory
    available: exit 2 and one line before anything loads; with 48 GiB the check lets it through."""
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=24 * GIB, name="a 24 GiB card"))
    monkeypatch.setattr("qlora.memory.preflight.available_bytes", lambda: 32 * GIB)  # the check's and the plan's
    out = tmp_path / "run"
    assert main(["recipes/llama70b_24gb.py", f"--output.dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not out.exists(), err
    assert err[0].startswith("error: train.stream_base keeps the 4-bit base in pinned host memory: the plan keeps "
                             "40.82 GiB there (32.89 GiB of it the base) and this host has 32.00 GiB available"), err
    cfg = load_recipe(ROOT / "recipes" / "llama70b_24gb.py")
    assert check_fits(cfg, torch.device("cuda"), device_bytes=24 * GIB, host_bytes=48 * GIB) is not None
    # 35 GiB holds the base (32.89) but not the optimizer state and embeddings kept beside it (38.32 in all), which
    # no shorter row shrinks: the same line, not advice to shorten rows (a check of the base alone gave that)
    with pytest.raises(ConfigError, match="^train.stream_base keeps the 4-bit base in pinned host memory"):
        check_fits(cfg, torch.device("cuda"), device_bytes=24 * GIB, host_bytes=35 * GIB)


def test_max_context_plans_the_streamed_70b_on_a_24_gib_card(capsys: pytest.CaptureFixture) -> None:
    """python -m qlora.memory recipes/llama70b_24gb.py --max-context --gpu-gib 24: a plan that keeps every layer
    input (no checkpoint_every, which the streamer refuses), its base streamed, within the card."""
    assert memory_main(["recipes/llama70b_24gb.py", "--max-context", "--gpu-gib", "24"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if "24 GiB card:" in line)
    tokens = int(row.split("card:")[1].split("tokens")[0].replace(",", ""))
    assert tokens >= 2048 and "train.checkpoint_every" not in "\n".join(lines)
    # 2 (80 - 2) layers of 420.9 MiB cross per micro-batch: 68.9e9 bytes, at 25e9 bytes a second (GB, not GiB).
    assert ("base streamed: 80 layers of 420.9 MiB in pinned host memory (32.89 GiB), 2 on the device; 68.9 GB copied "
            "per micro-batch, 2.75 s at 25 GB/s") in [line.strip() for line in lines]


def test_the_fastest_plan_never_replays_layers_of_a_streamed_base(tiny_config: Config, deep: list[str]) -> None:
    """train.plan=fastest on a CPU device (where the plan searches checkpoint_every itself, not through
    context.plans): on cards just below the step that keeps every layer input, it never picks checkpoint_every > 1
    beside train.stream_base, which the lever's rules refuse (a run so planned trained, and its run_config.json then
    refused eval, generate and --resume)."""
    from qlora.memory.plan import choose

    cfg = apply_overrides(copy.deepcopy(tiny_config), [*deep, "--train.stream_base=true", "--train.plan=fastest",
                                                       "--data.max_seq_len=4096", "--train.batch_size=1"])
    whole = needs(estimate(cfg, load_arch(cfg), "qlora", "cpu"))[0]  # what the check counts: process_margin beside
    for share in (1.0, 0.98, 0.97, 0.9):
        plan = choose(cfg, "cpu", int(whole * share), None)
        if plan is not None:
            assert plan.settings["train.checkpoint_every"] == 1, (share, plan.settings)
            apply_overrides(copy.deepcopy(cfg), plan.overrides(cfg))  # the rules take what the plan chose


def test_several_processes_are_refused_before_anything_loads(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """torchrun's WORLD_SIZE=2: exit 2 and one line before the processes join and each loads the whole base into
    host memory (the streamer's own check comes after the load)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    assert main(["recipes/tiny.py", "--train.stream_base=true", f"--output.dir={out}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == ("error: train.stream_base streams one process's base, and this run has 2 "
                                    "processes: run one, or shard the base over them with --train.stream_base=false "
                                    "--train.shard_base=true"), captured.err
    assert "loading" not in captured.out and not out.exists()
    fix = captured.err.split("shard the base over them with ")[1].split()  # taken by the config as it stands
    apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), ["--train.stream_base=true", *fix])


RANK = """import sys, torch.distributed as dist, torch
from qlora.errors import ConfigError
from qlora.levers.stream_base.stream import stream_base
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=int(sys.argv[2]), world_size=2)
try:
    stream_base(torch.nn.Module(), torch.device("cpu"))  # refused before the model is read
except ConfigError as err:
    print(err)
dist.destroy_process_group()
"""


def test_the_streamer_refuses_a_group_of_several_processes_itself(tmp_path: Path) -> None:
    """The check after loading, for a caller that joined the processes without qlora.train's check before it: the
    same line, with its fix, on each of 2 ranks of a real gloo group."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path / "store"), str(rank)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    said = [rank.communicate(timeout=120) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), said
    assert [out for out, _ in said] == ["train.stream_base streams one process's base, and this run has 2 processes: "
                                        "run one, or shard the base over them with --train.stream_base=false "
                                        "--train.shard_base=true\n"] * 2, said
