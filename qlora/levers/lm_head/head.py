"""The output head in NF4 (quant.quantize_lm_head): quantised from its 16-bit weight as the base loads."""

from __future__ import annotations

import torch

from qlora.base.quantize import linear4bit, quant_tensors
from qlora.config import QuantConfig
from qlora.errors import ConfigError
from qlora.levers.lever import RunConfig


def quantize_lm_head(model: torch.nn.Module, quant: QuantConfig, dtype: torch.dtype,
                     device: torch.device | None = None) -> int:
    """Replace the 16-bit output head with a `Linear4bit` quantised from it, as transformers would quantise it if
    it did not skip the head; return the bytes saved. The head is frozen in LoRA methods, so only storage changes.
    `device`: where to quantise it and keep it, when not where it is (a base streamed from host memory)."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ConfigError(f"quant.quantize_lm_head expects a 16-bit nn.Linear head, found {type(head).__name__}")
    if head.weight is model.get_input_embeddings().weight:
        raise ConfigError("quant.quantize_lm_head: this model ties lm_head to the input embeddings, so quantising "
                          "the head would add a copy, not save one: set --quant.quantize_lm_head=false")
    weight = head.weight.detach().to(device or head.weight.device)
    bias = head.bias.detach().to(weight.device, copy=True) if head.bias is not None else None
    # Quantised on the head's own device (or `device`), so no CPU round trip.
    q = linear4bit(weight, bias, quant, dtype)
    model.set_output_embeddings(q)
    before = weight.numel() * weight.element_size()
    after = sum(t.numel() * t.element_size() for t in quant_tensors(q.weight))
    on_cuda = weight.is_cuda
    del weight, head
    if on_cuda:  # the old head is unreferenced now: hand its memory back (a CPU run never initialises CUDA)
        torch.cuda.empty_cache()
    return before - after


def apply(model: torch.nn.Module, cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> None:
    """The trainer's hook as the base loads (quant.method other than qlora is refused by its rules)."""
    if cfg.quant.quantize_lm_head:
        # A base kept off the device (train.stream_base: in host memory) has its head quantised where it will be.
        saved = quantize_lm_head(model, cfg.quant, dtype, device)
        print(f"quant.quantize_lm_head: lm_head in {cfg.quant.quant_type}, {saved / 2**20:,.1f} MiB saved")
