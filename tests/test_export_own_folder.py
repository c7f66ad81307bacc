"""The GGUF export (qlora/export/) of runs trained from a user's own Hugging Face folder, as a user makes one: a tiny
LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM saved with save_pretrained beside a byte-level BPE tokenizer
trained here on its family's split (Llama 3's, for Mistral too; Qwen2's), with its special tokens and chat template.
Each folder varies what the demo does not: the architecture, rotary scaling (linear, Llama 3.1's rope_freqs) and
base, biases, tied embeddings, GQA, a sliding window, a 16-bit dtype, a vocabulary padded beyond the tokenizer's.

transformers' GGUF loader drops rotary scaling and biases, which llama.cpp runs: read back as it is, the check held
correct files to a model llama.cpp never runs (qlora.base.convert.what_transformers_drops). The trained tokenizer has
its own ids, so llama.cpp's hash of them names no pre-tokenizer: its split is named by its definition instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from safetensors import safe_open
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from qlora.base.build import CHATML
from qlora.base.convert import special_tokens_as_written
from qlora.config import apply_overrides, load_recipe
from qlora.errors import ConfigError
from qlora.export.architecture import check_exportable
from qlora.export.check import BOUNDS, check_export, read_back
from qlora.export.gguf_file import export, tensor_type
from qlora.export.tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT, pre_by_definition

ROOT = Path(__file__).resolve().parent.parent
ROWS = 8
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_TEMPLATE = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
                   "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def trained_bpe(split: str, specials: list[str]) -> Tokenizer:
    """Byte-level BPE trained on the repo's data with the pre-tokenizer `split`, specials after the learned vocabulary
    (as Llama 3's and Qwen2's). Not on its docs: each edit of them made another tokenizer, so another trained run,
    whose f16 read-back may flip a near tie (one of 168 argmaxes, after a docs change)."""
    corpus = [line for path in sorted(ROOT.glob("recipes/data/*/*.jsonl")) for line in path.read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1000, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(specials)
    return tok


def llama3_style_tokenizer(split: str = LLAMA3_SPLIT) -> PreTrainedTokenizerFast:
    """Llama 3's split, specials and template, bos added by the post-processor."""
    tok = trained_bpe(split, SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
        ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   chat_template=LLAMA3_TEMPLATE)


def qwen2_style_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2's split, specials and ChatML template; no bos, as Qwen2 has none."""
    return PreTrainedTokenizerFast(tokenizer_object=trained_bpe(QWEN2_SPLIT, QWEN2_SPECIALS), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML)


FOLDERS = {
    "linear rope, untied, fp32": dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "llama3 rope, tied, GQA, bf16, padded vocab": dict(
        tie_word_embeddings=True, num_key_value_heads=1, dtype="bfloat16", pad=24,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 256, "rope_theta": 500000.0}),
    "attention and MLP biases, fp16": dict(attention_bias=True, mlp_bias=True, dtype="float16"),
    # Qwen2's q/k/v biases are always there; Qwen2.5's rope_theta, and tied as Qwen2.5 0.5B-3B are
    "qwen2, tied, rope_theta 1e6, bf16": dict(model_type="qwen2", tie_word_embeddings=True, dtype="bfloat16",
                                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Mistral v0.2 on: no window; v0.1's 4,096 exports where it never binds, in a context no longer than it
    "mistral, no window, GQA": dict(model_type="mistral", sliding_window=None, num_key_value_heads=1),
    "mistral, window beyond the context, fp16": dict(model_type="mistral", sliding_window=4096, dtype="float16"),
    "qwen2, untied, linear rope, padded vocab": dict(
        model_type="qwen2", pad=24,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
}
PRE_TOKENIZERS = {"llama": "llama-bpe", "qwen2": "qwen2"}  # each folder's tokenizer splits as its family's


def build_folder(out: Path, pad: int = 0, dtype: str = "float32", model_type: str = "llama", **fields: object) -> None:
    tokenizer = qwen2_style_tokenizer() if model_type == "qwen2" else llama3_style_tokenizer()
    config = AutoConfig.for_model(model_type, **{
        **dict(vocab_size=len(tokenizer) + pad, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
               initializer_range=0.1), **fields})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases start at zero, where a file that lost them would still pass
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module", params=FOLDERS, ids=list(FOLDERS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder, and a finished 6-step qlora run of recipes/tiny.py (messages under the Llama 3 template) on it."""
    from qlora.train import train

    tmp = tmp_path_factory.mktemp("folder")
    build_folder(tmp / "base", **FOLDERS[request.param])
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), [
        f"--model.path={tmp / 'base'}", "--model.build=none", f"--output.dir={tmp / 'run'}", "--lora.r=16",
        f"--data.train={ROOT / 'recipes/data/tiny/train.jsonl'}",
        f"--data.eval={ROOT / 'recipes/data/tiny/heldout.jsonl'}",
        "--train.steps=6", "--train.warmup_steps=1", "--train.eval_before=false", "--train.eval_batches=1"])
    train(cfg)
    return tmp / "run"


def test_the_check_reads_the_file_as_llama_cpp_runs_it(run: Path, tmp_path: Path) -> None:
    """Scaled rotary frequencies and biases are in the file and in its read-back: the rotary frequencies are the
    folder's own (transformers' implementation of its rope_type), and the file is the trained model to f16 rounding
    (about 1e-7 nats/token; read back without them: 2.7e-3 with linear x4, 8.5e-5 with rope_freqs, 0.3 without
    biases). Within the f16 bound, not always every argmax: f16's rounding flips a near tie in one of 144 positions on
    the untied Qwen2 (KL 9e-8)."""
    out = tmp_path / "model.gguf"
    export(run, out, "f16", "cpu")
    scores = check_export(run, out, "f16", ROWS)
    assert scores["within"] and scores["kl_mean"] < 1e-6, scores
    base = json.loads((run / "run_config.json").read_text())["model"]["path"]
    expected = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).model.rotary_emb.inv_freq
    read = read_back(out)[1]
    torch.testing.assert_close(read.model.rotary_emb.inv_freq, expected)
    with safe_open(str(Path(base) / "model.safetensors"), "pt") as f:
        assert {n for n, _ in read.named_parameters() if n.endswith(".bias")} == {n for n in f.keys()
                                                                                   if n.endswith(".bias")}


def test_the_hyperparameters_and_tensors_are_the_folders_as_llama_cpp_reads_them(run: Path, tmp_path: Path) -> None:
    """gguf's own reader against the folder's config.json and safetensors header: the keys llama.cpp sizes and runs
    the model by, each tensor under its name in ggml's order of dimensions (the fastest first: an HF row-major (out,
    in) matrix is (in, out) there), vectors and norms in F32, matrices in the type asked for. transformers' reader
    takes the model's shape from the tensors and a wrong epsilon or context length moves its logits by less than f16
    rounding, so the check cannot see these; llama.cpp runs what the keys say (a key_length of the hidden size, or a
    file type other than the tensors', passed every test)."""
    out = tmp_path / "model.gguf"
    export(run, out, "f16", "cpu")
    base = Path(json.loads((run / "run_config.json").read_text())["model"]["path"])
    config = json.loads((base / "config.json").read_text())
    reader = gguf.GGUFReader(out)
    arch = reader.fields["general.architecture"].contents()
    value = {key.removeprefix(f"{arch}."): field.contents() for key, field in reader.fields.items()}
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rope = config["rope_parameters"]
    assert {key: value.get(key) for key in ("block_count", "context_length", "embedding_length", "feed_forward_length",
                                            "attention.head_count", "attention.head_count_kv", "rope.dimension_count",
                                            "attention.key_length", "attention.value_length", "vocab_size",
                                            "rope.freq_base", "general.file_type")} == {
        "block_count": config["num_hidden_layers"], "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"], "feed_forward_length": config["intermediate_size"],
        "attention.head_count": config["num_attention_heads"],
        "attention.head_count_kv": config["num_key_value_heads"], "rope.dimension_count": head_dim,
        "attention.key_length": head_dim, "attention.value_length": head_dim, "vocab_size": config["vocab_size"],
        "rope.freq_base": rope["rope_theta"], "general.file_type": gguf.LlamaFileType.MOSTLY_F16}
    assert value["attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"], rel=1e-6)  # an f32
    linear = rope["rope_type"] == "linear"
    assert (value.get("rope.scaling.type"), value.get("rope.scaling.factor")) == (
        ("linear", rope["factor"]) if linear else (None, None))
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     config["num_hidden_layers"])
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        expected = {names.get_name(key, try_suffixes=(".weight", ".bias")):
                    tuple(reversed(f.get_slice(key).get_shape())) for key in f.keys()}
    if rope["rope_type"] == "llama3":  # Llama 3.1's divisors, one per rotated pair
        expected["rope_freqs.weight"] = (head_dim // 2,)
    assert {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors} == expected
    assert {t.name: t.tensor_type for t in reader.tensors} == {
        name: gguf.GGMLQuantizationType.F16 if len(shape) == 2 else gguf.GGMLQuantizationType.F32
        for name, shape in expected.items()}


def test_the_read_back_parses_the_file_once(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' loader parses the whole file for the config, the tokenizer and the model, and
    what_transformers_drops reads it too: one parse serves all four (each was 3.3 s on SmolLM2's, the demo's build)."""
    out = tmp_path / "model.gguf"
    export(run, out, "f16", "cpu")
    parses = []

    class Counted(gguf.GGUFReader):
        def __init__(self, path: Path, *args: object, **kwargs: object) -> None:
            parses.append(path)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counted)
    read_back(out)
    assert [Path(p) for p in parses] == [out]


def test_the_tokenizer_is_written_as_llama_cpp_reads_it(run: Path, tmp_path: Path) -> None:
    """The split named (llama-bpe, qwen2), not left to llama.cpp's default rules; every token, merge, special id and
    the chat template as the trained tokenizer has them, the padding rows unused."""
    out = tmp_path / "model.gguf"
    export(run, out, "q8_0", "cpu")
    base = json.loads((run / "run_config.json").read_text())["model"]["path"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    fields = gguf.GGUFReader(out).fields
    value = {key: field.contents() for key, field in fields.items() if key.startswith("tokenizer.")}
    arch = fields["general.architecture"].contents()
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == PRE_TOKENIZERS[arch]
    vocab_size = AutoConfig.from_pretrained(base).vocab_size
    assert len(value["tokenizer.ggml.tokens"]) == vocab_size
    assert all(value["tokenizer.ggml.tokens"][i] == token for token, i in tokenizer.get_vocab().items())
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    assert value["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["merges"]]
    assert value.get("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert value["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    types = value["tokenizer.ggml.token_type"]
    assert {types[i] for i in tokenizer.added_tokens_decoder} == {gguf.TokenType.CONTROL}
    assert set(types[len(tokenizer):]) <= {gguf.TokenType.UNUSED}
    assert value["tokenizer.chat_template"] == tokenizer.chat_template


def test_the_read_back_adds_and_ends_as_the_file_says(run: Path, tmp_path: Path) -> None:
    """The read-back's bos and eos are the file's ids, and it adds bos and eos where the file says llama.cpp does. Here
    from a tokenizer read as transformers 5.17 (the GPU image's) reads it: neither flag, and the bos token for eos
    too, which put a Llama 3 file's text to the check without its bos; 5.25 reads all four."""
    out = tmp_path / "model.gguf"
    export(run, out, "f16", "cpu")
    reader = gguf.GGUFReader(out)
    value = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.ggml.")}
    tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    tokenizer.add_bos_token = tokenizer.add_eos_token = False
    if tokenizer.bos_token is not None:
        tokenizer.eos_token = tokenizer.bos_token
    special_tokens_as_written(tokenizer, reader)
    assert tokenizer.bos_token_id == value.get("tokenizer.ggml.bos_token_id")
    assert tokenizer.eos_token_id == value["tokenizer.ggml.eos_token_id"]
    ids = tokenizer.encode("reverse: sun bird dog")
    plain = tokenizer.encode("reverse: sun bird dog", add_special_tokens=False)
    bos, eos = value.get("tokenizer.ggml.add_bos_token", False), value.get("tokenizer.ggml.add_eos_token", False)
    assert ids == [tokenizer.bos_token_id] * bos + plain + [tokenizer.eos_token_id] * eos
    assert bos == (reader.fields["general.architecture"].contents() != "qwen2")  # Llama 3's post-processor adds it


@pytest.mark.parametrize(("model_type", "fields", "says"), [
    ("llama", dict(hidden_act="gelu"), r"uses hidden_act='gelu': llama.cpp's llama architecture is SiLU only"),
    ("qwen2", dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
                                    "rope_theta": 500000.0}),
     r"scales its rotary embedding by 'llama3': the export writes default, linear for llama.cpp's qwen2"),
], ids=["gelu", "qwen2 with rope_freqs"])
def test_what_llama_cpp_would_run_otherwise_is_refused(model_type: str, fields: dict, says: str) -> None:
    """A GELU model would run as SiLU in llama.cpp, and a qwen2 file with Llama 3.1's rope_freqs tensor holds one
    tensor more than llama.cpp's qwen2 loads: refused before anything is written."""
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    config = AutoConfig.for_model(model_type, architectures=[architecture], **fields)
    tokenizer = qwen2_style_tokenizer() if model_type == "qwen2" else llama3_style_tokenizer()
    with pytest.raises(ConfigError, match=says):
        check_exportable(config, tokenizer, "base")


# bf16's fold is the same for every architecture: one folder, not seven runs (82 s)
@pytest.mark.parametrize("run", ["linear rope, untied, fp32"], indirect=True)
def test_a_bf16_file_holds_bf16_matrices_within_its_bound(run: Path, tmp_path: Path) -> None:
    """--type bf16, which no other test exported: its matrices as the bits of the bfloat16 fold (not F16's, not fp32
    bytes under a BF16 name), the file type saying so, and the file read back within bf16's KL bound. Not its top-1
    bound: bf16's rounding flips near ties of these tiny runs' flat distributions (95% on the linear rope folder, at
    KL 6.6e-6 and margins under 0.01 logits)."""
    out = tmp_path / "model.gguf"
    export(run, out, "bf16", "cpu")
    reader = gguf.GGUFReader(out)
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {gguf.GGMLQuantizationType.BF16}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    assert check_export(run, out, "bf16", ROWS, refuse=False)["kl_mean"] <= BOUNDS["bf16"].kl


def test_q4_0_keeps_the_embedding_and_head_at_8_bits() -> None:
    """As llama.cpp's quantize keeps them above 4 bits: token_embd and output in Q8_0, the layers' matrices in Q4_0,
    norms in F32. At 4 bits they passed every test, none of which exports q4_0 (its check fails on a tiny run)."""
    q = gguf.GGMLQuantizationType
    assert {name: tensor_type(name, shape, q.Q4_0) for name, shape in (
        ("token_embd.weight", (259, 64)), ("output.weight", (259, 64)), ("blk.0.attn_q.weight", (64, 64)),
        ("blk.0.ffn_down.weight", (64, 128)), ("output_norm.weight", (64,)))} == {
        "token_embd.weight": q.Q8_0, "output.weight": q.Q8_0, "blk.0.attn_q.weight": q.Q4_0,
        "blk.0.ffn_down.weight": q.Q4_0, "output_norm.weight": q.F32}


def test_only_the_very_split_is_named() -> None:
    """One character off Llama 3's regex is another split, which llama-bpe would not reproduce: no name, unless it is
    the split of another pre-tokenizer llama.cpp knows (Qwen2's takes one digit a token, Llama 3's up to three)."""
    assert pre_by_definition(llama3_style_tokenizer()) == "llama-bpe"
    assert pre_by_definition(llama3_style_tokenizer(LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"))) == "qwen2"
    assert pre_by_definition(llama3_style_tokenizer(LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}{1,2}"))) is None
