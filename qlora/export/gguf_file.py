"""The GGUF file: a run merged and streamed into llama.cpp's layout for its architecture (architecture.py).

    W = W0 + (alpha / r) B A        qlora.merge's fold: W0 as the run trained on it (dequantised NF4, LoftQ shifts)

The layout is llama.cpp's (convert_hf_to_gguf.py, LlamaModel and Qwen2Model): tensor names from gguf's
TensorNameMap for the architecture; in llama's, the rows of q_proj and k_proj permuted within each head, since
transformers' rotary embedding turns dimension i with i + d/2 and llama.cpp's llama with i + 1; norms and other
vectors in F32, the matrices in --type (gguf's quantisers). The metadata holds the hyperparameters, the tokenizer
the run trained with (tokenizer.py) and its chat template.

The file is streamed: the tensor infos are planned from the safetensors headers, the header, metadata and infos
written, then each base tensor is read, merged, quantised and appended in turn, so memory holds one tensor, not the
model (for a 70B, its largest, the 4.2 GB fp32 embedding, and what quantising it takes). It is written aside, as a
hidden `.OUT.gguf.partial-PID-*` that the next export to the same path removes if a kill left it, checked (check.py)
and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from qlora.base.build import checkpoint_shards
from qlora.base.load import load_tokenizer
from qlora.config import Config
from qlora.console import announce, progress, since
from qlora.errors import ConfigError, Stop
from qlora.export.architecture import Layout, check_exportable, head_dim, rope
from qlora.export.tokenizer import add_tokenizer
from qlora.merge.fold import MergeSource, folding, merge_source
from qlora.partial import name_output, new_folders, ordinary_modes, partial_prefix, remove_abandoned, rename_new

Q = gguf.GGMLQuantizationType
TYPES = {"f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16), "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
         "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}

class Planned(NamedTuple):
    """One tensor of the file: where it comes from, what it is called there, its shape and type."""

    source: str
    shard: Path
    name: str
    shape: tuple[int, ...]
    qtype: Q


def plan(base: str, config: PretrainedConfig, layout: Layout, kind: str) -> list[Planned]:
    """Every tensor of the file, in the checkpoint's order, from the safetensors headers alone."""
    names = gguf.get_tensor_name_map(layout.arch, config.num_hidden_layers)
    qtype = TYPES[kind][0]
    planned = []
    for shard in checkpoint_shards(Path(base)):
        with safe_open(str(shard), "pt") as f:
            for source in f.keys():
                if source.endswith("rotary_emb.inv_freq"):  # recomputed from rope_theta by every reader
                    continue
                name = names.get_name(source, try_suffixes=(".weight", ".bias"))
                if name is None:
                    arch = gguf.MODEL_ARCH_NAMES[layout.arch]
                    raise ConfigError(f"{shard}: tensor {source} has no place in llama.cpp's {arch} layout: the "
                                      f"checkpoint is not a plain {layout.family} model")
                shape = tuple(f.get_slice(source).get_shape())
                planned.append(Planned(source, shard, name, shape, tensor_type(name, shape, qtype)))
    if rope(config)["rope_type"] == "llama3":
        planned.append(Planned("", Path(), gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                               (head_dim(config) // 2,), Q.F32))
    return planned


def tensor_type(name: str, shape: tuple[int, ...], qtype: Q) -> Q:
    """As llama.cpp's converter: vectors and norms in F32; matrices in `qtype`, or F16 where a row does not split
    into its blocks. q4_0 keeps the embedding and output head at 8 bits, as llama.cpp's quantize keeps them above 4
    (it uses Q6_K, which gguf's Python quantisers lack)."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    if qtype == Q.Q4_0 and name.split(".")[0] in ("token_embd", "output"):
        qtype = Q.Q8_0
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return Q.F16
    return qtype


def interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q_proj or k_proj rows from transformers' rotary layout to llama.cpp's: in each head, the dimensions rotated
    together, i and i + d/2, become neighbours 2i and 2i + 1 (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def llama3_rope_factors(config: PretrainedConfig) -> torch.Tensor:
    """Llama 3.1's rotary frequency divisors (1 for short wavelengths, `factor` for long ones, smooth between), the
    rope_freqs tensor llama.cpp reads for rope_type llama3."""
    params, dim = rope(config), head_dim(config)
    freqs = 1.0 / params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    factor, low, high = params.get("factor", 8.0), params.get("low_freq_factor", 1.0), params.get("high_freq_factor",
                                                                                                     4.0)
    context = params.get("original_max_position_embeddings", 8192)
    wavelength = 2 * math.pi / freqs
    smooth = (context / wavelength - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelength < context / high, 1.0, torch.where(wavelength > context / low, factor, blended)) \
        .float()


def add_hyperparameters(writer: gguf.GGUFWriter, config: PretrainedConfig, kind: str, name: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    params = rope(config)
    writer.add_rope_freq_base(params["rope_theta"])
    if params["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(params["factor"])
    writer.add_file_type(TYPES[kind][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def encode(tensor: torch.Tensor, qtype: Q) -> np.ndarray:
    """A merged tensor (already in the 16-bit type it is stored as, else fp32) as the bytes of `qtype`."""
    if qtype == Q.BF16:
        return tensor.contiguous().view(torch.int16).numpy()
    if qtype in (Q.F16, Q.F32):
        return tensor.contiguous().numpy()
    return gguf.quants.quantize(tensor.contiguous().numpy(), qtype)


def write_tensor(writer: gguf.GGUFWriter, data: np.ndarray, out: Path) -> None:
    """Append one tensor's bytes. numpy's tofile checks the free space itself and reports a full disk as an OSError
    without an errno ("Not enough free space to write ..."): raised as the ENOSPC it is (exit 5, one line)."""
    try:
        writer.write_tensor_data(data)
    except OSError as err:
        if err.errno is None and "free space" in str(err):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from err
        raise


FOLD_DTYPES = {Q.F16: torch.float16, Q.BF16: torch.bfloat16}  # others are folded in fp32, then quantised


def write_gguf(source: MergeSource, config: PretrainedConfig, layout: Layout, tokenizer: PreTrainedTokenizerBase,
               out: Path, kind: str, check: Callable[[Path], object] | None = None) -> dict:
    """Stream the merged model into `out`: infos planned first, then one tensor at a time. `check` is run on the file
    while it still has its hidden name, so `out` appears only once checked: a kill in the check leaves no unchecked
    file under the name llama.cpp would load (a file the check finds too far is renamed all the same, for
    inspection)."""
    planned = plan(source.base, config, layout, kind)
    total = sum(math.prod(gguf.quant_shape_to_byte_shape(p.shape, p.qtype)) for p in planned)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    started = announce(f"exporting {source.run_dir} merged onto {source.onto} to {out} as {kind} ({len(planned)} "
                       f"tensors, {total / 1e6:.1f} MB)")
    with new_folders(out.parent):  # removed again if the export fails
        remove_abandoned(out)  # what an export killed before its rename left: a whole model's size each
        fd, tmp = tempfile.mkstemp(prefix=partial_prefix(out), suffix=".gguf", dir=out.parent)  # transformers reads
        # a GGUF file by that suffix
        os.close(fd)
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[layout.arch])
        try:
            add_hyperparameters(writer, config, kind, source.run_dir.resolve().name)
            pre = add_tokenizer(writer, tokenizer, source.base, config.vocab_size)
            for p in planned:
                writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), math.prod(
                    gguf.quant_shape_to_byte_shape(p.shape, p.qtype)), raw_dtype=p.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with folding(source) as (fold, merged):
                for p in progress(planned, len(planned), "export", "tensor"):
                    if not p.source:  # the one tensor not in the checkpoint: Llama 3's rotary factors
                        tensor = llama3_rope_factors(config)
                    else:
                        with safe_open(str(p.shard), "pt") as f:  # memory-mapped: opening it per tensor costs nothing
                            tensor = fold(p.source, f.get_tensor(p.source), FOLD_DTYPES.get(p.qtype, torch.float32))
                    if layout.interleave and p.source.endswith(("q_proj.weight", "q_proj.bias")):
                        tensor = interleave_rotary(tensor, heads)
                    elif layout.interleave and p.source.endswith(("k_proj.weight", "k_proj.bias")):
                        tensor = interleave_rotary(tensor, kv_heads)
                    write_tensor(writer, encode(tensor, p.qtype), out)
            writer.close()
            ordinary_modes(Path(tmp))  # mkstemp's file is private; the model is an ordinary file
            print(f"wrote {len(planned)} tensors ({len(merged)} with the adapter folded in), "
                  f"{Path(tmp).stat().st_size / 1e6:.1f} MB, pre-tokenizer {pre} ({since(started)})")
            try:
                if check is not None:
                    check(Path(tmp))
            except Stop:
                rename_new(tmp, out, "--gguf")  # too far from the trained model: kept for inspection, as said
                raise
            rename_new(tmp, out, "--gguf")
        except BaseException as err:
            with contextlib.suppress(OSError):  # on a full disk, flushing what was buffered fails too
                writer.close()
            Path(tmp).unlink(missing_ok=True)
            name_output(err, tmp, out)
            raise
    print(f"wrote {out}")
    return {"gguf": str(out), "type": kind, "tensors": len(planned), "merged_layers": len(merged),
            "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - started, 1)}


def export(run_dir: Path, out: Path, kind: str = "f16", device: str | None = None,
           check: Callable[[Path], object] | None = None, cfg: Config | None = None) -> dict:
    """Merge the run's adapter onto its base as it trained and write it to `out` as a `kind` GGUF file (`check`: run
    on the file before it takes that name, write_gguf). `cfg`: the run's run_config.json as read_run_config read it
    already."""
    source = merge_source(Path(run_dir), device=device, cfg=cfg)
    trust = source.cfg.model.trust_remote_code
    config = AutoConfig.from_pretrained(source.base, trust_remote_code=trust)
    tokenizer = load_tokenizer(source.base, trust)
    layout = check_exportable(config, tokenizer, source.base)
    return write_gguf(source, config, layout, tokenizer, Path(out), kind, check)


