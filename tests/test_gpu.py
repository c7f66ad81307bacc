"""The CUDA path on a real GPU, tiny shapes: what tests/test_cuda_path.py, test_master.py and test_benchmarks.py check
on the CPU, where the CPU cannot stand in (device bytes, the caching allocator, bf16 adapters on CUDA, autocast).
CUDA only: skipped where no GPU is visible. `bash benchmarks/gpu.sh` runs these first."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: device memory, the caching allocator and bf16 adapters on CUDA",
                allow_module_level=True)

from qlora.adapters.master import MasterWeights  # noqa: E402
from qlora.base.build import ensure_checkpoint  # noqa: E402
from qlora.config import Config, apply_overrides  # noqa: E402
from qlora.data.batches import collate  # noqa: E402
from qlora.errors import ConfigError
from qlora.levers.cpu_embeddings.embedding import embeddings_to_cpu  # noqa: E402
from qlora.train import train  # noqa: E402
from qlora.training.assemble import build_model, prepare
from qlora.training.optimizer import build_optimizer, stepped_params
from qlora.training.step import forward_backward

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import memory_levers  # noqa: E402
import throughput  # noqa: E402


def on_cuda(cfg: Config, *overrides: str) -> Config:
    return apply_overrides(cfg, ["--train.device=cuda", *overrides])


def test_embeddings_to_cpu_frees_the_table_on_the_card(tiny_config: Config) -> None:
    model = build_model(on_cuda(tiny_config))["model"]
    table = model.get_input_embeddings().weight
    size = table.numel() * table.element_size()
    del table
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    assert embeddings_to_cpu(model, torch.device("cuda")) == size  # `cuda` vs the table's `cuda:0`: still counted
    assert size <= before - torch.cuda.memory_allocated() < size + 512  # the allocator rounds blocks to 512 B


def test_offload_that_cannot_pin_its_inputs_is_refused_before_a_step(tiny_config: Config) -> None:
    # 2 layers x 2^30 tokens x 128 x 2 B: two 256 GiB pinned blocks, more than any host here.
    cfg = on_cuda(tiny_config, "--train.offload_activations=true", "--data.max_seq_len=1073741824")
    with pytest.raises(ConfigError, match=r"train.offload_activations would pin 4,096.0 GiB of host memory .* "
                                          r"this host has .* GiB available: set --train.offload_budget_gib="):
        build_model(cfg)


def test_each_process_on_the_host_pins_its_inputs_within_its_share(tiny_config: Config,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The check after loading weighs this process's share of the host (Ranks.local_size, torchrun's
    LOCAL_WORLD_SIZE): a host whose available memory holds the pinned inputs once and four fifths over takes them
    for one process, and refuses them for each of two, naming the share. Ranks of 2 on this one card: the check
    comes before anything is distributed."""
    from qlora.levers.checkpoints.memory import pinned_need
    from qlora.training.distributed import Ranks

    cfg = on_cuda(tiny_config, "--train.offload_activations=true", "--data.max_seq_len=65536")
    need = pinned_need(cfg.train, 2, cfg.train.batch_size * 65536 * 128 * 2)  # 2 layers x hidden 128 in bf16
    monkeypatch.setattr("qlora.memory.preflight.available_bytes", lambda: 2 * need)  # this_host: room 1.8 x need
    build_model(cfg)
    two = Ranks(rank=0, size=2, local_rank=0, local_size=2, device=torch.device("cuda", 0))
    with pytest.raises(ConfigError, match=r"and this host's .* GiB available, shared by 2 processes: .* GiB each: "
                                          r"set --train.offload_budget_gib="):
        build_model(cfg, ranks=two)


def test_the_cache_is_emptied_before_the_paged_state_is_allocated(tiny_config: Config) -> None:
    """What the hook is for: memory the backward freed goes back to the driver before the paged state asks for
    pages. Read from the driver (free memory on the card), whatever the allocator's mode: with expandable segments,
    qlora's default since the H200 battery, a freed block stays mapped in its segment until the cache is emptied,
    and `memory_reserved` then follows the mapped pages rather than whole segments."""
    run = prepare(on_cuda(tiny_config))
    optimizer = build_optimizer([p for p in run["model"].parameters() if p.requires_grad], tiny_config)
    inner = optimizer.inner if isinstance(optimizer, MasterWeights) else optimizer
    free = []
    inner.register_step_pre_hook(lambda opt, args, kwargs: free.append(torch.cuda.mem_get_info()[0]))
    batch = {k: v.cuda() for k, v in collate(run["train_rows"][:4], run["tokenizer"].pad_token_id).items()}
    forward_backward(run["model"].train(), [batch])
    freed = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda").fill_(1)  # cached, unused: 256 MiB
    del freed
    torch.cuda.synchronize()
    before = torch.cuda.mem_get_info()[0]
    optimizer.step()
    assert free[0] - before >= 255 * 2**20  # handed back by the hook that ran first (allocator pages: 2 MiB)
    assert inner.state


def test_bf16_adapters_on_cuda_lose_no_small_update(tiny_config: Config) -> None:
    run = prepare(on_cuda(tiny_config, "--train.lr=2e-5", "--train.optimizer=adamw"))
    model = run["model"].train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params[0].dtype == torch.bfloat16
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    optimizer = build_optimizer(params, tiny_config)
    start = [p.detach().clone() for p in stepped_params(optimizer)]
    batch = {k: v.cuda() for k, v in collate(run["train_rows"][:4], run["tokenizer"].pad_token_id).items()}
    forward_backward(model, [batch])
    optimizer.step()
    for p, w0, param in zip(stepped_params(optimizer), start, params, strict=True):
        assert p.dtype == torch.float32
        assert (p.detach() != w0).float().mean() > 0.99
        torch.testing.assert_close(param.detach(), p.detach().to(torch.bfloat16), rtol=0, atol=0)


def test_a_cuda_run_saves_and_resumes(tiny_config: Config, tmp_path: Path) -> None:
    cfg = on_cuda(tiny_config)
    cfg.train.steps, cfg.train.save_every = 4, 2
    whole = train(cfg)
    state = torch.load(tmp_path / "run" / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert isinstance(state["rng"]["cuda"], torch.Tensor)  # this GPU's generator, not a list of every GPU's
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "run" / "checkpoint-2", resumed_dir / "checkpoint-2")
    cfg.output.dir = str(resumed_dir)
    resumed = train(cfg, resume=True)
    assert resumed["after"]["eval_loss"] == pytest.approx(whole["after"]["eval_loss"], rel=1e-2)


def test_standard_stack_on_cuda_checkpoints_wraps_and_autocasts(tiny_config: Config) -> None:
    from peft.tuners.lora.bnb import Linear4bit
    from transformers.modeling_layers import GradientCheckpointingLayer

    config_json = Path(ensure_checkpoint(tiny_config)) / "config.json"
    cfg = throughput.base_config("tiny", ["--train.device=cuda", "--model.synthetic=true",
                                          f"--model.config_json={config_json}"])
    model, step, device = throughput.build_standard(cfg, "kbit")
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and all(m.gradient_checkpointing for m in layers)
    assert all(isinstance(m, Linear4bit) for name, m in model.named_modules() if name.endswith("q_proj"))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
             for name, m in model.named_modules() if name.endswith("o_proj")]
    step(throughput.synthetic_batch(model.config.vocab_size, 2, 64, device))
    for hook in hooks:
        hook.remove()
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)


def test_transformers_offload_probe_on_cuda_keeps_the_loss(tiny_config: Config) -> None:
    from qlora.training.loss import loss_sum

    batch = throughput.synthetic_batch(259, 2, 64, torch.device("cuda"))
    losses = []
    for offload in (False, True):
        model = build_model(on_cuda(tiny_config))["model"].train()
        if offload:
            memory_levers.hf_offload(model)
        losses.append(float(loss_sum(model, batch)))
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


@pytest.mark.parametrize("name", ["PagedAdamW32bit", "PagedAdamW8bit"])
def test_a_resumed_paged_optimizer_keeps_its_state_paged(name: str) -> None:
    """bitsandbytes' load_state_dict deep-copies the state into ordinary host memory that keeps the `is_paged` mark
    (so its to_gpu leaves it there); the resume pages it again (qlora/training/optimizer.py repage), with the same
    values and the same next step. Paged means a buffer bitsandbytes allocated in managed memory (its page manager
    holds each), not a tensor marked so."""
    import bitsandbytes as bnb

    from qlora.training.restore import load_optimizer

    def stepped(p: torch.nn.Parameter, optimizer: torch.optim.Optimizer) -> None:
        p.grad = torch.ones_like(p) * 1e-3
        optimizer.step()

    first = torch.nn.Parameter(torch.randn(1024, 512, device="cuda"))  # over bitsandbytes' 1e5 elements: paged
    opt = getattr(bnb.optim, name)([first], lr=1e-3)
    stepped(first, opt)
    assert all(getattr(v, "is_paged", False) for v in opt.state[first].values() if v.shape == first.shape)
    second = torch.nn.Parameter(first.detach().clone())
    resumed = getattr(bnb.optim, name)([second], lr=1e-3)
    load_optimizer(resumed, opt.state_dict())
    big = [k for k, v in resumed.state[second].items() if isinstance(v, torch.Tensor) and v.shape == second.shape]
    paged = {t.data_ptr() for t in resumed.page_mng.paged_tensors}
    assert big and all(resumed.state[second][k].data_ptr() in paged for k in big)
    assert not {resumed.state[second][k].data_ptr() for k in big} & {opt.state[first][k].data_ptr() for k in big}
    for k in big:
        torch.testing.assert_close(resumed.state[second][k], opt.state[first][k], rtol=0, atol=0)
    stepped(first, opt)
    stepped(second, resumed)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
