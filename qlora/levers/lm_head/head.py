"""The output head in NF4 (quant.quantize_lm_head): quantised from its 16-bit weight as the base loads, and
dequantised a slice at a time to compute.

bitsandbytes dequantises a 4-bit weight whole for each matmul and again for its input gradient: for Llama-3's head
(128,256 x 8,192) that is 2 GiB in bf16, alive in every chunk of the loss (estimated at the 70B recipe's peak, the
loss's backward: 2.45 GiB of activations, 1.96 GiB of them the head). `NF4Head` computes the logits a slice of the
vocabulary at a time and their input gradient a slice of the hidden size at a time, each slice dequantised from the
same packed bytes and absmax as bitsandbytes would (NF4 dequantises element by element: the same weights to the
bit), so at most SLICE_BYTES (memory.py) of the head is dequantised at once. Each logit and each input gradient is
still one whole dot product (over h, over V), as in the plain matmul.
"""

from __future__ import annotations

import torch

from qlora.base.bnb import bnb
from qlora.base.quantize import linear4bit, quant_tensors
from qlora.config import QuantConfig
from qlora.errors import ConfigError
from qlora.levers.lever import RunConfig
from qlora.levers.lm_head.memory import slice_steps


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
    q = linear4bit(weight, bias, quant, dtype, NF4Head)
    model.set_output_embeddings(q)
    before = weight.numel() * weight.element_size()
    after = sum(t.numel() * t.element_size() for t in quant_tensors(q.weight))
    on_cuda = weight.is_cuda
    del weight, head
    if on_cuda:  # the old head is unreferenced now: hand its memory back (a CPU run never initialises CUDA)
        torch.cuda.empty_cache()
    return before - after


def pieces(n: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(start + step, n)) for start in range(0, n, step)]


class NF4Head(bnb.nn.Linear4bit):
    """The NF4 output head, dequantised a slice at a time (the module docstring). Falls back to bitsandbytes'
    forward where its layout is not the packed one sliced here (a weight sharded by FSDP, repacked for a CPU kernel)
    and for one token (bitsandbytes' matrix-vector kernel dequantises nothing)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        qs = getattr(w, "quant_state", None)
        if type(w) is not bnb.nn.Params4bit or qs is None or w.dtype != torch.uint8 or len(qs.shape) != 2 \
                or qs.shape[1] % qs.blocksize or getattr(qs, "packing_format_for_cpu", False) \
                or x.numel() == x.shape[-1]:
            return super().forward(x)
        dtype = x.dtype
        x = x.to(self.compute_dtype or dtype)
        out = _SlicedMatmul.apply(x, w)
        return (out if self.bias is None else out + self.bias.to(out.dtype)).to(dtype)


def _absmax(qs: object) -> torch.Tensor:
    """Every block's absmax in fp32 (double quant's nested absmax dequantised, as bitsandbytes does)."""
    if qs.nested:
        return (bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
    return qs.absmax.float()


def _dequantised(w: torch.Tensor, absmax: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int],
                 dtype: torch.dtype) -> torch.Tensor:
    """The head's weight[rows, cols] in `dtype`: its packed bytes (two to a byte, row by row) and the absmax of its
    blocks (`blocksize` along a row) cut out and dequantised by bitsandbytes' own kernel."""
    qs = w.quant_state
    out_f, in_f = qs.shape
    (r0, r1), (c0, c1) = rows, cols
    packed = w.view(out_f, in_f // 2)[r0:r1, c0 // 2:c1 // 2].contiguous()
    blocks = absmax.view(out_f, in_f // qs.blocksize)[r0:r1, c0 // qs.blocksize:c1 // qs.blocksize].contiguous()
    weight = torch.ops.bitsandbytes.dequantize_4bit.default(packed.view(-1, 1), blocks.view(-1), qs.blocksize,
                                                           qs.quant_type, (r1 - r0, c1 - c0), qs.dtype)
    return weight.to(dtype)


class _SlicedMatmul(torch.autograd.Function):
    """x @ W.T for the frozen NF4 head W: the forward a slice of rows (vocabulary) at a time, the input gradient a
    slice of columns (hidden) at a time; no gradient for W."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.w = w
        out_f, in_f = w.quant_state.shape
        absmax = _absmax(w.quant_state)
        out = x.new_empty(*x.shape[:-1], out_f)
        step = slice_steps(out_f, in_f, x.element_size(), w.quant_state.blocksize)[0]
        for r0, r1 in pieces(out_f, step):
            out[..., r0:r1] = x @ _dequantised(w, absmax, (r0, r1), (0, in_f), x.dtype).t()
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.w
        out_f, in_f = w.quant_state.shape
        absmax = _absmax(w.quant_state)
        grad_x = grad.new_empty(*grad.shape[:-1], in_f)
        step = slice_steps(out_f, in_f, grad.element_size(), w.quant_state.blocksize)[1]
        for c0, c1 in pieces(in_f, step):
            grad_x[..., c0:c1] = grad @ _dequantised(w, absmax, (0, out_f), (c0, c1), grad.dtype)
        return grad_x, None


def apply(model: torch.nn.Module, cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> None:
    """The trainer's hook as the base loads (quant.method other than qlora is refused by its rules)."""
    if cfg.quant.quantize_lm_head:
        # A base kept off the device (train.stream_base: in host memory) has its head quantised where it will be.
        saved = quantize_lm_head(model, cfg.quant, dtype, device)
        print(f"quant.quantize_lm_head: lm_head in {cfg.quant.quant_type}, {saved / 2**20:,.1f} MiB saved")
