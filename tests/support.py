"""What the lever tests share: the trainer's model with live adapters, its loss and gradients, and exact comparison.

Each lever is switched on through the same `build_model` the trainer uses and compared with the plain path: exactly
(default assert_close tolerances) where the lever only moves or reorders the same arithmetic, and within a stated
tolerance where it changes the numbers (a quantised lm_head). The CUDA-only parts (side-stream copies, pinned memory,
liger-kernel) cannot run on the CPU; the offload hooks are exercised there with CPU-to-CPU copies instead.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from forked_cli import ForkedCLI
from tokenizers import processors
from torch.utils._python_dispatch import TorchDispatchMode

from qlora.adapters.lora import lora_layers
from qlora.base.build import TINY_ARCHITECTURES, build_tiny, cache_dir
from qlora.config import Config, apply_overrides, load_recipe
from qlora.memory.arch import load_arch
from qlora.memory.estimate import estimate
from qlora.report.recorder import record_steps
from qlora.training.assemble import build_model
from qlora.training.loss import loss_sum

ROOT = Path(__file__).resolve().parent.parent
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: side streams, pinned memory")


def architecture(build: str) -> list[str]:
    """Overrides that put recipes/tiny.py on the tiny base of `build`, a name in TINY_ARCHITECTURES (built once into
    the cache, as the recipe's own is); none for tiny-llama, the recipe's."""
    assert build in TINY_ARCHITECTURES, build
    return [] if build == "tiny-llama" else [f"--model.path={cache_dir() / build}", f"--model.build={build}"]


# Bases unlike the tiny recipe's Llama (no biases, untied, full attention), each built as build_tiny builds the tiny
# bases, with every bias drawn non-zero (transformers starts them at zero, where a path that dropped them would pass):
# biases on every linear layer (attention_bias, mlp_bias), Qwen2's q/k/v biases with tied embeddings, and Mistral's
# sliding window shorter than the batch's rows of 60 tokens.
UNLIKE_TINY: dict[str, tuple[str, dict]] = {
    "biased": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "mistral-window": ("mistral", dict(sliding_window=16)),
}
# Adapters with alpha != r (scaling 3) and dropout, where the recipe's have alpha = r (scaling 1) and none: a path
# that dropped alpha/r or the dropout would pass on the recipe.
SCALED_LORA = ("--lora.r=8", "--lora.alpha=24", "--lora.dropout=0.1")


def build_unlike_tiny(name: str, folder: Path) -> list[str]:
    """Build UNLIKE_TINY[name] into `folder`; the overrides that put recipes/tiny.py on it."""
    from transformers import AutoModelForCausalLM

    build_tiny(*UNLIKE_TINY[name], folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(folder)
    return [f"--model.path={folder}", "--model.build=none"]


def build(cfg: Config, *overrides: str) -> torch.nn.Module:
    """The trainer's model for `cfg` + overrides, in training mode, with every adapter's B non-zero (a fresh B is
    zero, which would leave A without gradient and the adapters without effect). On the CPU, in fp32, unless an
    override names another device: the comparisons below are exact. `cfg` itself stays as it was (apply_overrides
    changes the config it is given), so that builds side by side differ by their own overrides alone."""
    model = build_model(apply_overrides(copy.deepcopy(cfg), ["--train.device=cpu", *overrides]))["model"]
    generator = torch.Generator().manual_seed(1)
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)
    return model.train()


def loss_and_grads(model: torch.nn.Module, batch: dict, chunk_size: int = 0) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model, batch, chunk_size)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# The same step on CUDA in bf16, with the data moved or the weights brought in another way: within bf16's rounding,
# not bitwise, for the attention backward need not add in one order there. Wrong data misses by far more (a layer
# left out of its slot in the backward moved gradients by up to 2,400x on CPU).
CUDA_SAME = dict(rtol=2e-2, atol=1e-3)


def assert_same(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict], **tol: float) -> None:
    torch.testing.assert_close(a[0], b[0], **tol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **tol, msg=lambda m, n=name: f"{n}: {m}")


class CountOps(TorchDispatchMode):
    """Counts calls of each aten / bitsandbytes op below autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.calls[str(func)] = self.calls.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def measure(cli: ForkedCLI, recipe: str, method: str, out_dir: Path, *overrides: str) -> dict:
    """Real training steps of `recipe` in a fresh process (`python -m qlora.report.measure`, forked from the `cli`
    server, which imported qlora and ran nothing): its measured peak and phases."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{method}.json"
    done = cli.run([recipe, f"--quant.method={method}", f"--out={out}", *overrides], module="qlora.report.measure")
    assert done.status == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def estimated(*overrides: str) -> int:
    """The estimator's CPU peak for recipes/tiny.py with `overrides`, as a qlora run: what `measured` is held to. Its
    tensors: the tokenised rows (Python's int32 arrays, counted from the data files' sizes) are no tensor a recording
    or a step's measurement sees."""
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), list(overrides))
    est = estimate(cfg, load_arch(cfg), "qlora", "cpu")
    return est.peak_bytes - est.components.get("tokenised_rows", 0)


def recorded_and_estimated(*overrides: str) -> tuple[int, int]:
    """One training step of recipes/tiny.py with `overrides`, recorded tensor by tensor on the CPU
    (qlora/report/recorder.py): its peak, and the estimator's."""
    _, recorded = record_steps(apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), list(overrides)), 1)
    return recorded, estimated(*overrides)


def finished_run(recipe: str, out_dir: Path, lora: dict | None = None, **train_fields: object) -> tuple[Config, dict]:
    """A finished run of `recipe` (a path under recipes/) into `out_dir`, with `train_fields` set on its train section
    and `lora` on its lora section: its config and train()'s final metrics. Data paths are made absolute, so the run
    does not depend on the cwd."""
    from qlora.train import train

    cfg = load_recipe(ROOT / "recipes" / recipe)
    cfg.data.train, cfg.data.eval = str(ROOT / cfg.data.train), str(ROOT / cfg.data.eval)
    cfg.output.dir = str(out_dir)
    for key, value in train_fields.items():
        setattr(cfg.train, key, value)
    for key, value in (lora or {}).items():
        setattr(cfg.lora, key, value)
    return cfg, train(cfg)


def adding_bos(tokenizer: object) -> object:
    """A copy of `tokenizer` that puts its bos before every text of its own accord, as Llama 3's post-processor does."""
    adds = copy.deepcopy(tokenizer)
    adds.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    return adds
