"""`python -m qlora.export RUN_DIR --gguf OUT.gguf [--type f16|bf16|q8_0|q4_0]`: the trained model as one GGUF file,
the format llama.cpp, Ollama and LM Studio run, checked against the run before it is called good.

    W = W0 + (alpha / r) B A        qlora.merge's fold: W0 as the run trained on it (dequantised NF4, LoftQ shifts)

The layout is llama.cpp's for Llama-style models (convert_hf_to_gguf.py, LlamaModel): tensor names from gguf's
TensorNameMap; the rows of q_proj and k_proj permuted within each head, since transformers' rotary embedding turns
dimension i with i + d/2 and llama.cpp's with i + 1; norms and other vectors in F32, the matrices in --type (gguf's
quantisers). The metadata holds the hyperparameters, the tokenizer the run trained with (byte-level BPE vocabulary,
merges, special tokens) and its chat template.

The file is streamed: the tensor infos are planned from the safetensors headers, the header, metadata and infos
written, then each base tensor is read, merged, quantised and appended in turn, so memory holds one tensor, not the
model (for a 70B, its largest, the 4.2 GB fp32 embedding, and what quantising it takes). It is written aside, as a
hidden `.OUT.gguf.partial-PID-*` that the next export to the same path removes if a kill left it, and renamed into
place.

Then it checks itself. transformers reads the file back (its own GGUF loader, tokenizer and chat template included,
given back the rotary scaling and biases that loader drops: base.convert.read_gguf):
the file's template must render a held-out conversation exactly as the trained tokenizer does, and its tokenizer give
the same ids on held-out text. Held-out rows go through the trained model (assemble.load_run_fp32: the run as it
trained, adapter on its NF4 base, computing in fp32) and through the exported one; the mean KL divergence per token
and the top-1 agreement must lie within BOUNDS for the type (--skip-check skips this, for a model too big to load
twice). A file that fails its check is kept for inspection and the command exits 1, as qlora.merge does for a merge
beyond its tolerance.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from qlora.base.build import checkpoint_shards
from qlora.base.convert import read_gguf
from qlora.base.load import load_tokenizer
from qlora.cli import run
from qlora.commands import export_parser
from qlora.config import Config
from qlora.console import announce, progress, quiet_libraries, since
from qlora.data.batches import collate
from qlora.data.files import read_rows
from qlora.data.labels import load_splits, render_chat
from qlora.errors import ConfigError, Stop, check_writable
from qlora.merge.fold import MergeSource, folding, merge_source
from qlora.partial import ordinary_modes, partial_prefix, remove_abandoned
from qlora.training.assemble import load_run_fp32, read_run_config
from qlora.training.checkpoint import RUN_CONFIG

Q = gguf.GGMLQuantizationType
TYPES = {"f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16), "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
         "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}


class Bound(NamedTuple):
    kl: float
    """Largest mean KL(trained || exported) per token, in nats."""
    top1: float
    """Smallest share of positions where both models' most likely next token is the same."""


# What docs/after-training.md ("Exporting to GGUF") states. Measured on the demo (SmolLM2-135M, 32 held-out rows):
# f16 7.8e-6 nats/token and 100% top-1, bf16 3.3e-4 and 99.6%, q8_0 1.4e-2 and 94.0%, q4_0 2.4 and 38%; each bound
# leaves room for other runs and rows, yet stays below what a file without the adapter scores (KL ~0.1, top-1 ~88% on
# short runs of the demo). The 16-bit types only round the merged weights (2^-11 relative in f16, 2^-8 in bf16); q8_0
# rounds each block of 32 to 8 bits, a step a tenth of NF4's. q4_0 puts NF4's levels, densest near zero where most
# weights are, onto a uniform grid of 16 steps: the bound is what a usable 4-bit file scores, and the demo's is outside
# it.
BOUNDS = {"f16": Bound(0.001, 0.99), "bf16": Bound(0.005, 0.98), "q8_0": Bound(0.03, 0.90), "q4_0": Bound(0.15, 0.85)}

ARCHITECTURES = {"LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA}
# What a refused model can do instead: llama.cpp's own converter covers more architectures, scalings and tokenizers.
CONVERT_INSTEAD = "merge it with python -m qlora.merge and convert that with llama.cpp's convert_hf_to_gguf.py"
ROPE_TYPES = ("default", "linear", "llama3")

# llama.cpp picks its pre-tokenizer (how text is split before BPE) by a hash of the ids a tokenizer gives CHECK_TEXT
# (convert_hf_to_gguf.py, get_vocab_base_pre; llama.cpp PR 6920). The Llama-style families this trainer's recipes use.
PRE_TOKENIZERS = {"0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
                  "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm"}  # SmolLM, SmolLM2
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) "
              "\U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 "
              "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
              "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
              "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
              "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
              "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
              "make it, 'D you like some tea? We'Ve a'lL")

# A tokenizer trained anew on a known pre-tokenizer has ids, so a hash, of its own: named by its definition in
# tokenizer.json instead, where that is the very split llama.cpp's pre-tokenizer of that name makes (llama-vocab.cpp:
# llama-bpe splits by Llama 3's regex, then maps bytes). Without a name llama.cpp falls back to its default split, whose
# first rule cuts at every punctuation mark ("it's" as it ' s, where Llama 3's split keeps 's): other tokens than the
# run trained on.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPECS = {"llama-bpe": [{"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated",
                                      "invert": False},
                                     {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}


class Planned(NamedTuple):
    """One tensor of the file: where it comes from, what it is called there, its shape and type."""

    source: str
    shard: Path
    name: str
    shape: tuple[int, ...]
    qtype: Q


def check_exportable(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, base: str) -> None:
    """Refuse, in one line, what this export does not write correctly: other architectures, rotary scalings other
    than none, linear and Llama 3's, activations other than SiLU, tokenizers other than byte-level BPE with merges."""
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{base} is a {arch}: the GGUF export writes {', '.join(ARCHITECTURES)} models only (Llama "
                          f"1-3, SmolLM); {CONVERT_INSTEAD}")
    if rope(config)["rope_type"] not in ROPE_TYPES:
        raise ConfigError(f"{base} scales its rotary embedding by {rope(config)['rope_type']!r}: the export writes "
                          f"{', '.join(ROPE_TYPES)} only; {CONVERT_INSTEAD}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"{base} uses hidden_act={config.hidden_act!r}: llama.cpp's llama architecture is SiLU only; "
                          "run the merged checkpoint (python -m qlora.merge) with transformers instead")
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if tokenizer.is_fast else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(spec.get(
            "pre_tokenizer")):
        raise ConfigError(f"the tokenizer of {base} is not a byte-level BPE one (as Llama 3's and SmolLM's are): "
                          f"SentencePiece-style tokenizers (Llama 2, Mistral) are not exported yet; {CONVERT_INSTEAD}")
    if not model.get("merges"):  # gguf's writer refuses an empty array, and llama.cpp a BPE file without merges
        raise ConfigError(f"the tokenizer of {base} is byte-level BPE without merges (one token per byte), which "
                          "llama.cpp cannot load: export a model whose tokenizer learned merges")


def rope(config: PretrainedConfig) -> dict:
    """The rotary settings, as transformers 5 (rope_parameters) or 4 (rope_theta, rope_scaling) holds them."""
    params = {**(getattr(config, "rope_scaling", None) or {}), **(getattr(config, "rope_parameters", None) or {})}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    return params


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def plan(base: str, config: PretrainedConfig, kind: str) -> list[Planned]:
    """Every tensor of the file, in the checkpoint's order, from the safetensors headers alone."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    qtype = TYPES[kind][0]
    planned = []
    for shard in checkpoint_shards(Path(base)):
        with safe_open(str(shard), "pt") as f:
            for source in f.keys():
                if source.endswith("rotary_emb.inv_freq"):  # recomputed from rope_theta by every reader
                    continue
                name = names.get_name(source, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ConfigError(f"{shard}: tensor {source} has no place in llama.cpp's llama layout: the "
                                      "checkpoint is not a plain Llama")
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


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, base: str, vocab_size: int) -> str:
    """The byte-level BPE vocabulary as llama.cpp's converter lists it (get_vocab_base): one entry per embedding
    row, rows without a token as padding, added tokens as CONTROL when special (or spelled <|...|>) and USER_DEFINED
    otherwise; merges, special token ids and the add-bos flag from the checkpoint's files (gguf.SpecialVocab); the
    chat template the run trained with. Returns the pre-tokenizer's name, or a note when llama.cpp will not know it."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if i in added:
            if not added[i].normalized:  # llama.cpp takes added tokens as already normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    pre = PRE_TOKENIZERS.get(sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()) or pre_by_definition(
        tokenizer)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(base, load_merges=True, n_vocab=vocab_size)
    special.chat_template = tokenizer.chat_template  # the one the run rendered its data with
    special.add_to_gguf(writer, quiet=True)
    return pre or "unknown to llama.cpp (it will split text by its default rules; transformers reads it as trained)"


def pre_by_definition(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The llama.cpp pre-tokenizer whose split the tokenizer's own pre_tokenizer is (PRE_TOKENIZER_SPECS), or None.
    Offsets are left out of the comparison (trim_offsets): they do not change the tokens."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    steps = [{k: v for k, v in step.items() if k != "trim_offsets"} for step in steps]
    return next((name for name, known in PRE_TOKENIZER_SPECS.items() if steps == known), None)


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


def write_gguf(source: MergeSource, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, out: Path,
               kind: str, check: Callable[[Path], object] | None = None) -> dict:
    """Stream the merged model into `out`: infos planned first, then one tensor at a time. `check` is run on the file
    while it still has its hidden name, so `out` appears only once checked: a kill in the check leaves no unchecked
    file under the name llama.cpp would load (a file the check finds too far is renamed all the same, for
    inspection)."""
    planned = plan(source.base, config, kind)
    total = sum(math.prod(gguf.quant_shape_to_byte_shape(p.shape, p.qtype)) for p in planned)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    started = announce(f"exporting {source.run_dir} merged onto {source.onto} to {out} as {kind} ({len(planned)} "
                       f"tensors, {total / 1e6:.1f} MB)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)  # what an export killed before its rename left: a whole model's size each
    fd, tmp = tempfile.mkstemp(prefix=partial_prefix(out), suffix=".gguf", dir=out.parent)  # transformers reads
    # a GGUF file by that suffix
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
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
                if p.source.endswith(("q_proj.weight", "q_proj.bias")):
                    tensor = interleave_rotary(tensor, heads)
                elif p.source.endswith(("k_proj.weight", "k_proj.bias")):
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
            os.replace(tmp, out)  # too far from the trained model: kept for inspection, as the line says
            raise
        os.replace(tmp, out)
    except BaseException as err:
        with contextlib.suppress(OSError):  # on a full disk, flushing what was buffered fails too
            writer.close()
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename in (None, tmp):
            err.filename = str(out)  # name the file the user asked for, not its hidden copy, which is gone
        raise
    print(f"wrote {out}")
    return {"gguf": str(out), "type": kind, "tensors": len(planned), "merged_layers": len(merged),
            "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - started, 1)}


def export(run_dir: Path, out: Path, kind: str = "f16", device: str | None = None,
           check: Callable[[Path], object] | None = None) -> dict:
    """Merge the run's adapter onto its base as it trained and write it to `out` as a `kind` GGUF file (`check`: run
    on the file before it takes that name, write_gguf)."""
    source = merge_source(Path(run_dir), device=device)
    trust = source.cfg.model.trust_remote_code
    config = AutoConfig.from_pretrained(source.base, trust_remote_code=trust)
    tokenizer = load_tokenizer(source.base, trust)
    check_exportable(config, tokenizer, source.base)
    return write_gguf(source, config, tokenizer, Path(out), kind, check)


# For data without conversations: any turns exercise the template, which is code.
CONVERSATION = [{"role": "user", "content": "Where does the 9 am flight from Oslo go?"},
                {"role": "assistant", "content": "Rome."}]


def check_template(trained: PreTrainedTokenizerBase, exported: PreTrainedTokenizerBase, conversations: list[list[dict]],
                   out: Path) -> str:
    """The file's chat template renders each conversation (whole, and up to its last turn with the assistant's
    header) as the trained tokenizer does, and the file's tokenizer turns each rendering into the same ids."""
    if not trained.chat_template:
        return "no chat template to compare (the run's tokenizer has none)"
    if not exported.chat_template:
        raise Stop(1, f"{out} holds no chat template, though the run trained with one: do not use it")
    characters, conversations = 0, conversations or [CONVERSATION]
    for i, messages in enumerate(conversations):
        for turns, prompt in ((messages, False), (messages[:-1], True)):
            if not turns:
                continue
            ours = render_chat(trained, turns, f"held-out conversation {i + 1}", add_generation_prompt=prompt)
            theirs = render_chat(exported, turns, f"{out}, held-out conversation {i + 1}", add_generation_prompt=prompt)
            if ours != theirs:
                k = next((j for j, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                         min(len(ours), len(theirs)))
                raise Stop(1, f"the chat template in {out} renders held-out conversation {i + 1} otherwise than the "
                              f"trained tokenizer: {theirs[k:k + 30]!r} where it had {ours[k:k + 30]!r} (character "
                              f"{k}): do not use the file")
            for special in (False, True):  # as the data was tokenised, and as a runtime adds its bos
                ids = (t.encode(ours, add_special_tokens=special) for t in (trained, exported))
                if next(ids) != next(ids):
                    raise Stop(1, f"the tokenizer in {out} splits held-out conversation {i + 1} into other tokens "
                                  "than the trained one: do not use the file")
            characters += len(ours)
    return f"{len(conversations)} held-out conversation(s) render identically ({characters} characters), same ids"


@torch.no_grad()
def divergence(trained: torch.nn.Module, exported: torch.nn.Module, examples: list[dict], pad_id: int,
               batch_size: int = 8) -> dict:
    """Mean and largest KL(trained || exported) per token, in nats, and the share of positions whose most likely next
    token agrees, over every position of `examples`."""
    kl_sum = kl_max = agree = positions = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        mask = batch["attention_mask"].bool()
        logits = [m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                  .logits.float()[mask] for m in (trained, exported)]
        log_p, log_q = (x.log_softmax(-1) for x in logits)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
        agree += int((logits[0].argmax(-1) == logits[1].argmax(-1)).sum())
        positions += int(mask.sum())
    return {"kl_mean": kl_sum / positions, "kl_max": kl_max, "top1": agree / positions, "positions": positions}


def read_back(out: Path, path: Path | None = None) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    """The file's tokenizer and model as transformers' own GGUF loader reads them (fp32, CPU), from `path` when it
    does not have its name `out` yet; a file it cannot read fails its check (Stop, exit 1)."""
    try:
        tokenizer, model = read_gguf(path or out, dtype=torch.float32, device_map={"": "cpu"})
    except Exception as err:  # noqa: BLE001  any way the reader fails is the file's failure
        raise Stop(1, f"transformers cannot read {out} back ({type(err).__name__}: {str(err).strip()[:200]}): the "
                      "file is kept for inspection, but do not use it") from err
    return tokenizer, model.eval()


def outside_bound(out: Path, kind: str, scores: dict) -> str:
    """The line for a file further from the trained model than its type's bound: by how much, and the types with
    tighter bounds to export instead."""
    bound = BOUNDS[kind]
    finer = [t for t, b in BOUNDS.items() if b.kl < bound.kl]
    names = ", ".join(finer[:-1]) + " or " + finer[-1] if len(finer) > 1 else "".join(finer)
    instead = f"export with --type {names} instead" if finer else "report it: f16 only rounds the weights"
    return (f"{out} is further from the trained model than docs/after-training.md bounds {kind} (mean KL "
            f"{scores['kl_mean']:.2e} nats/token against at most {bound.kl:g}, top-1 agreement "
            f"{100 * scores['top1']:.2f}% against at least {100 * bound.top1:g}%): the file is kept for inspection, "
            f"but do not use it; {instead}")


def check_export(run_dir: Path, out: Path, kind: str, rows: int = 32,
                 trained: tuple[Config, torch.nn.Module, PreTrainedTokenizerBase] | None = None,
                 exported: tuple[PreTrainedTokenizerBase, torch.nn.Module] | None = None, refuse: bool = True,
                 path: Path | None = None) -> dict:
    """Read `out` back with transformers and hold it to the run: the chat template and tokenizer, then KL and top-1
    agreement on `rows` held-out rows against BOUNDS[kind]. `trained` (the run's config, model and tokenizer from
    load_run_fp32) and `exported` (read_back's) are passed by a caller that holds them already. Raises Stop (exit 1)
    beyond the bound, or with `refuse=False` (a benchmark) says so in the result. `path`: where the file is read
    from, when it does not have its name `out` yet."""
    out = Path(out)
    announce(f"checking {out}: transformers reads it back; its chat template and tokenizer against the run's, then "
             f"{rows} held-out rows through the trained model and the file, both on CPU in fp32")
    cfg, model, tokenizer = trained or load_run_fp32(Path(run_dir))[:3]
    exported_tokenizer, exported_model = exported or read_back(out, path)
    conversations = [r["messages"] for r in read_rows(*held_out_source(cfg, run_dir))
                     if isinstance(r.get("messages"), list)][:rows]
    template = check_template(tokenizer, exported_tokenizer, conversations, out)
    print(f"chat template and tokenizer: {template}")
    examples = load_splits(cfg.data, tokenizer, cfg.train.seed)[1][:rows]
    scores = divergence(model, exported_model, examples, tokenizer.pad_token_id)
    bound = BOUNDS[kind]
    within = scores["kl_mean"] <= bound.kl and scores["top1"] >= bound.top1
    print(f"{out} against the trained model, {len(examples)} held-out rows ({scores['positions']} positions): mean KL "
          f"{scores['kl_mean']:.2e} nats/token (largest {scores['kl_max']:.2e}), top-1 agreement "
          f"{100 * scores['top1']:.2f}%: {'within' if within else 'OUTSIDE'} the {kind} bound (KL <= {bound.kl:g}, "
          f"agreement >= {100 * bound.top1:g}%)")
    if not within and refuse:
        raise Stop(1, outside_bound(out, kind, scores))
    return {**scores, "rows": len(examples), "template": template, "bound": bound._asdict(), "within": within,
            "type": kind}


def held_out_source(cfg: Config, run_dir: Path) -> tuple[str, str]:
    """The file the check reads its held-out conversations from, and the setting of the run that names it."""
    key = "data.eval" if cfg.data.eval else "data.train"
    return cfg.data.eval or cfg.data.train, f"{key} in {Path(run_dir) / RUN_CONFIG}, or export with --skip-check"


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    quiet_libraries()
    logging.getLogger("gguf").setLevel(logging.ERROR)  # the writer's and SpecialVocab's notes: said here, or moot
    out = args.gguf
    check_writable(out, "--gguf")
    if out.suffix != ".gguf":
        raise ConfigError(f"--gguf={out} does not end in .gguf, the name llama.cpp, Ollama and LM Studio look for: "
                          f"use {out.with_suffix('.gguf').name}")
    if out.exists():
        raise ConfigError(f"--gguf={out} exists: choose another path or delete it")
    if args.rows < 1:
        raise ConfigError(f"--rows={args.rows}: the check needs at least one held-out row, e.g. --rows=32")
    cfg = read_run_config(args.run_dir)  # a missing run is named before anything loads
    if not args.skip_check:  # the data the check reads, found missing or malformed before the export, not after it
        read_rows(*held_out_source(cfg, args.run_dir))
    check = None if args.skip_check else lambda path: check_export(args.run_dir, out, args.type, args.rows, path=path)
    export(args.run_dir, out, args.type, args.device, check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
