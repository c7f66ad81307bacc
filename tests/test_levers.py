"""The levers together: they compose to the plain path's loss and gradients, refuse combinations that cannot work,
and on a GPU keep the numbers with their real side streams and pinned buffers. Each lever's own tests are in its
folder, qlora/levers/<lever>/test_<lever>.py."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from support import CUDA_SAME, assert_same, build, cuda_only, loss_and_grads

from qlora.config import Config, apply_overrides
from qlora.errors import ConfigError
from qlora.levers.checkpoints.layer_inputs import keep_layer_inputs
from qlora.levers.host_optimizer.optimizer import HostOptimizer
from qlora.levers.tiling.test_tiling import assert_tiles_as_close_in_bf16
from qlora.training.loss import loss_sum


def test_levers_compose(tiny_config: Config, batch: dict) -> None:
    # Every lever that leaves the numbers unchanged, at once: they wrap different things and must not interfere.
    plain = loss_and_grads(build(tiny_config), batch)
    model = build(tiny_config, "--train.reuse_dequant=true", "--train.fuse_lora_add=true",
                  "--model.embeddings_on_cpu=true", "--train.offload_activations=true")
    offload = keep_layer_inputs(model, torch.device("cpu"), offload=True, force=True)
    assert_same(loss_and_grads(model, batch, chunk_size=16), plain)
    assert offload.offloaded_bytes > 0


REFUSED = [
    (["--train.tile_size=512", "--train.compile=layers"], "torch.compile cannot trace the tiles"),
    (["--train.tile_size=512", "--train.tile_projections=true", "--train.compile=lora"], "inside a compiled adapter"),
    (["--train.tile_size=512", "--quant.method=full"], "train.tile_size is for adapters on a frozen base"),
    (["--train.checkpoint_every=2", "--train.gradient_checkpointing=false"], "train.checkpoint_every chooses"),
    (["--train.tile_size=512", "--train.shard_base=true"], "train.shard_base with train.tile_size: not supported"),
    (["--train.checkpoint_every=2", "--train.shard_base=true"], "with train.checkpoint_every: not supported"),
    (["--quant.quantize_lm_head=true", "--quant.method=lora"], "quant.quantize_lm_head needs quant.method=qlora"),
    (["--train.fuse_lora=true", "--train.fuse_lora_add=true"], "train.fuse_lora adds the update in place already"),
    (["--train.fuse_lora=true", "--train.compile=lora"], "train.fuse_lora with train.compile=lora"),
    (["--model.embeddings_on_cpu=true", "--train.shard_base=true"], "train.shard_base shards the embeddings"),
    (["--train.dequant_once=true", "--train.shard_base=true"], "train.shard_base with train.dequant_once"),
    # the levers' own values, and the rest of the combinations: none was quoted by a test (h28's note)
    (["--train.offload_budget_gib=-1"], "train.offload_budget_gib=-1.0 must be >= 0 (0 = no limit)"),
    (["--train.offload_budget_gib=4"], "train.offload_budget_gib limits train.offload_activations: set "
                                       "--train.offload_activations=true or --train.offload_budget_gib=0"),
    (["--train.checkpoint_every=0"], "train.checkpoint_every=0 must be at least 1 (every layer)"),
    (["--train.offload_activations=true", "--train.gradient_checkpointing=false"],
     "train.offload_activations offloads the checkpointed layer inputs: set --train.gradient_checkpointing=true"),
    (["--model.embeddings_on_cpu=true", "--quant.method=full"],
     "model.embeddings_on_cpu keeps a frozen table, but quant.method=full trains every weight"),
    (["--train.loss_chunk_size=-1"], "train.loss_chunk_size=-1 must not be negative"),
    (["--train.liger_ce=true", "--train.shard_base=true"], "train.shard_base with train.liger_ce: not supported"),
    (["--train.compile=all"], "train.compile='all': use none, lora or layers"),
    (["--train.compile=layers", "--train.shard_base=true"], "train.shard_base with train.compile: not supported"),
    (["--train.tile_size=-1"], "train.tile_size=-1 must not be negative"),
    (["--train.tile_projections=true", "--train.tile_size=0"],
     "train.tile_projections tiles by train.tile_size, which is 0: set --train.tile_size=4096, or "
     "--train.tile_projections=false"),
    (["--train.tile_projections=true", "--train.tile_norms=true", "--train.tile_size=0"],
     "train.tile_projections and train.tile_norms tile by train.tile_size, which is 0"),
    # compile=lora under FSDP as compile=layers (mutant S14: the rule narrowed to layers survived every test)
    (["--train.compile=lora", "--train.shard_base=true"], "train.shard_base with train.compile: not supported"),
    (["--train.reuse_dequant=true", "--train.gradient_checkpointing=false"], "train.reuse_dequant keeps dequantised"),
    (["--train.reuse_dequant=true", "--train.dequant_once=true"], "train.dequant_once keeps every dequantised"),
    (["--train.stream_base=true", "--quant.method=lora"], "quant.method=lora loads a 16-bit one"),
    (["--train.stream_base=true", "--train.dequant_once=true"], "train.stream_base keeps in host memory"),
    (["--train.stream_base=true", "--train.checkpoint_every=2"], "train.stream_base with train.checkpoint_every"),
    # quant.method=full as lora (mutants R4, R5: each rule narrowed to lora survived every test)
    (["--train.stream_base=true", "--quant.method=full"], "quant.method=full loads a 16-bit one"),
    (["--quant.quantize_lm_head=true", "--quant.method=full"], "quant.quantize_lm_head needs quant.method=qlora (got "
                                                               "'full')"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED)
def test_lever_combinations_that_cannot_work_are_refused(tiny_config: Config, overrides: list[str],
                                                         message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides(tiny_config, overrides)


def test_each_fix_a_refusal_names_is_accepted(tiny_config: Config) -> None:
    """Every --key=value a refusal offers as its fix, applied on top, is taken (mutants S27-S29: a fix naming the
    wrong value survived every test; tiles with projections under compile=lora named --train.tile_size=0, which
    train.tile_projections then refused in turn)."""
    taken = []
    for overrides, _ in REFUSED:
        with pytest.raises(ConfigError) as refused:
            apply_overrides(copy.deepcopy(tiny_config), overrides)
        for choice in re.split(r",? or ", str(refused.value)):  # "--a=x or --b=y --c=z": two fixes, the second both
            fix = re.findall(r"--[\w.]+=[^\s,)]+", choice)
            if not fix:
                continue
            try:
                apply_overrides(copy.deepcopy(tiny_config), [*overrides, *fix])
            except ConfigError as again:
                raise AssertionError(f"{overrides} + {fix}, the fix of {refused.value}: {again}") from None
            taken.append(fix)
    assert len(taken) >= 20, taken


@pytest.mark.parametrize("overrides", [
    ["--train.offload_activations=true", "--train.offload_budget_gib=4"],  # mutant S2: the budget refused always
    ["--train.tile_size=512", "--train.compile=lora"],  # mutant S22: tiles without projections in a compiled adapter
    ["--train.tile_size=512", "--train.tile_projections=true", "--train.compile=layers", "--train.compile=none"],
    ["--train.checkpoint_every=2", "--train.offload_activations=true", "--train.reuse_dequant=true"],
    ["--train.stream_base=true", "--train.fuse_lora=true", "--train.compile=layers"],
])
def test_lever_combinations_that_work_are_accepted(tiny_config: Config, overrides: list[str]) -> None:
    apply_overrides(tiny_config, overrides)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_no_lever_acts_on_a_recipe_that_sets_none(tiny_config: Config, device: str) -> None:
    """Every lever's default leaves the run as it is: on the CPU a default flipped to on changes nothing that the
    tests measure for most of them (liger, the host optimizer, offload), so it is held here, where the trainer and
    the estimate ask."""
    from qlora.levers import LEVERS

    assert [lever.name for lever in LEVERS for method in ("qlora", "lora", "full")
            if lever.active(tiny_config, method, device)] == []


def test_start_up_names_the_speed_levers_before_the_base_loads(tiny_config: Config, capsys) -> None:
    """A speed lever changes how the step computes, yet its `effect` was read by a test only: start-up said
    `train.fuse_lora on 14 adapters` once the base had loaded, and nothing for a lever that finds nothing to act on.
    A recipe with none prints as before; one that does nothing on this method or device (fuse_lora under full,
    liger_kernels on the CPU) is not named."""
    from qlora.levers.speed.settings import DEQUANT_ONCE, FUSE_LORA

    speed = ["--train.dequant_once=true", "--train.fuse_lora=true", "--train.liger_kernels=true"]
    build(tiny_config, *speed)
    lines = capsys.readouterr().out.splitlines()
    said = "; ".join(lever.effect(tiny_config, "qlora") for lever in (DEQUANT_ONCE, FUSE_LORA))
    assert lines[0] == f"speed levers: {said}" and lines[1].startswith("loading "), lines
    for overrides in ([], [*speed, "--quant.method=full"]):
        build(tiny_config, *overrides)
        assert "speed levers" not in capsys.readouterr().out, overrides



# Every memory lever on, as the memory report estimates one recipe for each method (qlora/report/memory.py): where
# each acts, the estimate's list names it; CUDA-only levers on CUDA only, frozen-base levers not under full, the NF4
# head and the streamed base under qlora only.
EVERY_MEMORY_LEVER = ["--train.offload_activations=true", "--train.checkpoint_every=2", "--train.tile_size=512",
                      "--train.loss_chunk_size=16", "--train.liger_ce=true", "--train.optimizer_on_cpu=true",
                      "--quant.quantize_lm_head=true", "--model.embeddings_on_cpu=true"]
ACTING = {
    ("qlora", "cuda"): ["offload_activations", "checkpoint_every=2", "tile_size=512", "loss_chunk_size=16", "liger_ce",
                        "optimizer_on_cpu", "quantize_lm_head", "embeddings_on_cpu"],
    ("qlora", "cpu"): ["checkpoint_every=2", "tile_size=512", "loss_chunk_size=16", "quantize_lm_head"],
    ("lora", "cuda"): ["offload_activations", "checkpoint_every=2", "tile_size=512", "loss_chunk_size=16", "liger_ce",
                       "optimizer_on_cpu", "embeddings_on_cpu"],
    ("lora", "cpu"): ["checkpoint_every=2", "tile_size=512", "loss_chunk_size=16"],
    ("full", "cuda"): ["offload_activations", "checkpoint_every=2", "loss_chunk_size=16", "liger_ce",
                       "optimizer_on_cpu"],
    ("full", "cpu"): ["checkpoint_every=2", "loss_chunk_size=16"],
}


@pytest.mark.parametrize(("method", "device"), list(ACTING))
def test_each_memory_lever_acts_for_its_methods_and_devices_only(tiny_config: Config, method: str,
                                                                 device: str) -> None:
    """Mutants A6, A8, A10, A11 (quantize_lm_head under lora, liger_ce on the CPU, stream_base under lora, tile_size
    under full: a lever's method or CUDA-only condition dropped from its `active`) survived every test."""
    from qlora.memory.arch import load_arch
    from qlora.memory.estimate import estimate

    cfg = apply_overrides(copy.deepcopy(tiny_config), EVERY_MEMORY_LEVER)
    assert [line.split(":")[0] for line in estimate(cfg, load_arch(cfg), method, device).levers] == \
        ACTING[method, device]
    streamed = apply_overrides(copy.deepcopy(tiny_config), ["--train.stream_base=true"])
    assert [line.split(":")[0] for line in estimate(streamed, load_arch(streamed), method, device).levers] == \
        (["stream_base"] if method == "qlora" else [])


@pytest.mark.parametrize("lever", ["dequant_once", "reuse_dequant"])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_estimate_names_the_speed_levers_whose_memory_it_counts(tiny_config: Config, lever: str,
                                                                    device: str) -> None:
    """train.dequant_once (every 16-bit copy kept) and train.reuse_dequant (a layer's) change the estimate's figure
    under qlora, yet its lever list named memory levers only: a report with either read as if the recipe set none.
    Named where they change the figure, marked as speed levers; a speed lever that holds nothing (fuse_lora) and
    either one under lora (no NF4 weight) are not."""
    from qlora.memory.arch import load_arch
    from qlora.memory.estimate import estimate

    cfg = apply_overrides(copy.deepcopy(tiny_config), [f"--train.{lever}=true", "--train.fuse_lora=true"])
    arch = load_arch(cfg)
    on, off = estimate(cfg, arch, "qlora", device), estimate(tiny_config, arch, "qlora", device)
    assert sum(on.components.values()) != sum(off.components.values())
    assert [line.split(":")[0] for line in on.levers] == [lever]
    assert on.levers[0].endswith("(a speed lever: the memory it holds is counted)")
    assert estimate(cfg, arch, "lora", device).levers == []


@cuda_only
def test_issue13_levers_on_cuda_keep_loss_and_grads(tiny_config: Config, batch: dict) -> None:
    """Tiles, every-k-th inputs offloaded into exact-size pinned buffers, and the optimizer in host memory, on the
    GPU: the numbers of the plain path (bf16 tiles as near an fp32 run as the plain path; the rest exact)."""
    from qlora.training.optimizer import build_optimizer

    batch = {k: v.cuda() for k, v in batch.items()}
    plain = build(tiny_config, "--train.device=cuda")
    reference = loss_and_grads(plain, batch)
    model = build(tiny_config, "--train.device=cuda", "--train.offload_activations=true",
                  "--train.checkpoint_every=2")
    store = model.model.layers[0]._gradient_checkpointing_func.func.__self__
    assert_same(loss_and_grads(model, batch), reference, **CUDA_SAME)
    assert store.slots and all(b.is_pinned() for b in store.slots)
    tiled = build(tiny_config, "--train.device=cuda", "--train.tile_size=16", "--train.tile_projections=true",
                  "--train.tile_norms=true")
    exact = loss_and_grads(build(tiny_config, "--train.device=cuda", "--quant.compute_dtype=fp32"), batch)
    assert_tiles_as_close_in_bf16(loss_and_grads(tiled, batch), reference, exact)
    cfg = apply_overrides(copy.deepcopy(tiny_config), ["--train.device=cuda", "--train.optimizer_on_cpu=true"])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    host = build_optimizer(list(params.values()), cfg)
    # Its fp32 masters, their gradients and the 16-bit gradients on their way: views of host buffers pinned at their
    # exact size.
    assert isinstance(host, HostOptimizer) and host.staged
    assert all(t.is_pinned() for t in host.masters + host.host_grads + list(host.staged.values()))
    plain_params = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    assert plain_params.keys() == params.keys()
    device_opt = build_optimizer(list(plain_params.values()),
                                 apply_overrides(copy.deepcopy(tiny_config), ["--train.device=cuda"]))
    assert not isinstance(device_opt, HostOptimizer)
    for m in (model, plain):  # not loss_and_grads: each optimizer's hooks move the gradients to its fp32 copies
        m.zero_grad(set_to_none=True)
        for _ in range(2):  # two micro-batches: the second backward's copies land on the first's sums
            loss_sum(m, batch).backward()
    assert all(p.grad is None for p in params.values()) and not any(h.grad.is_cuda for h in host.holders)
    for name, holder, master in zip(params, host.holders, device_opt.masters, strict=True):
        torch.testing.assert_close(holder.grad, master.grad.cpu(), **CUDA_SAME, msg=name)
        # Both steps from the same bits: AdamW's first step is lr x sign(g), which the two backwards' own rounding
        # (not bitwise on CUDA) could flip for a gradient near zero, by 2 lr.
        master.grad.copy_(holder.grad)
    host.step()
    device_opt.step()
    for name, p in plain_params.items():  # bitsandbytes' CPU and CUDA kernels on bf16 weights: the same update
        torch.testing.assert_close(params[name], p, rtol=1e-2, atol=1e-4, msg=name)


def test_a_pinned_buffer_stays_pinned_while_any_view_of_it_lives(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host optimizer keeps only typed views of its two pinned buffers: the registration must last as long as
    they do (it once ended with the temporary buffer object, so its copies ran from pageable memory). Each pinned
    buffer has pages of its own (cudaHostRegister refuses a page another registration holds). The driver's calls
    are recorded, not made: no GPU here."""
    import gc

    import torch.cuda._pin_memory_utils as driver

    from qlora.levers.pinned import PAGE, pinned_buffer, typed_views, views_size

    log: list[tuple] = []
    monkeypatch.setattr(driver, "pin_memory", lambda ptr, size: log.append(("pin", ptr, size)))
    monkeypatch.setattr(driver, "unpin_memory", lambda ptr: log.append(("unpin", ptr)))
    like = [torch.empty(3, 5, device="meta"), torch.empty(7, device="meta")]
    views = typed_views(pinned_buffer(views_size(like), True), like)
    other = pinned_buffer(100, True)
    gc.collect()
    (_, ptr, size), (_, other_ptr, other_size) = log
    assert [entry[0] for entry in log] == ["pin", "pin"] and ptr % PAGE == 0 == other_ptr % PAGE
    # Tensor.is_pinned asks the driver about the storage's first byte: it must be the first byte registered.
    assert views[0].untyped_storage().data_ptr() == ptr and other.untyped_storage().data_ptr() == other_ptr
    pages = set(range(ptr // PAGE, -(-(ptr + size) // PAGE)))
    assert not pages & set(range(other_ptr // PAGE, -(-(other_ptr + other_size) // PAGE)))
    views[0].fill_(1.0)  # still in use, still pinned
    del views
    gc.collect()
    assert log[2:] == [("unpin", ptr)]
    del other
    gc.collect()
    assert log[3:] == [("unpin", other_ptr)]
