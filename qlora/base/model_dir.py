"""A model directory checked before anything loads it: config.json's counts possible, the weights the model that
config.json describes (every tensor there, of its shape, nothing else), each safetensors file readable, a tokenizer
beside them that reads, within the embedding.

transformers meets each of these late and in its own words: a zero head count is a ZeroDivisionError inside
LlamaConfig, a config that disagrees with its weights a RuntimeError after a report of every layer, a token id past
the embedding an IndexError in the first forward. Worse, a layer the weights lack is initialised at random with a
warning, and one the config does not know is dropped: the run then trains on another model than the user's. Here
each is one line that names the file, the key or the layer, and the fix (exit 2), before a weight is read. So is a
checkpoint this trainer cannot train as asked though transformers loads it: no causal LM (an encoder, a classifier),
weights already quantised, an index naming a tensor no shard holds.

Reading config.json as JSON and the safetensors headers costs milliseconds; the weights are compared with the model
config.json describes in stored_weights.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora.base.stored_weights import RESTORE, check_weights
from qlora.errors import ConfigError

# Counts a decoder config holds, each a positive integer where present (head_dim and num_key_value_heads may be null).
COUNTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "vocab_size", "max_position_embeddings")
# How config.json counts experts (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, ...): any above 1 is a mixture.
EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# Logits transformed after lm_head, with the value that leaves them as they are: Cohere multiplies them by
# logit_scale, Gemma 2 caps them by final_logit_softcapping (tanh), Granite divides them by logits_scaling.
LOGIT_TRANSFORMS = {"logit_scale": 1.0, "final_logit_softcapping": None, "logits_scaling": 1.0}
# The files transformers builds a tokenizer from: the tokenizers library's, SentencePiece's (tokenizer.model,
# sentencepiece.bpe.model, ...), byte-level BPE's, WordPiece's, tiktoken's.
TOKENIZER_FILES = ("tokenizer.json", "*.model", "vocab.json", "vocab.txt", "*.tiktoken")



def check_config_file(path: Path, what: str) -> dict | None:
    """config.json's counts positive integers that divide as attention needs; return it (None where it is no JSON).
    `what` names the checkpoint for the user (`model.path=DIR`). A file that is not JSON is left to the loader, which
    says so; JSON that is not an object is refused here (transformers' own message for it changes between releases
    and names no key)."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict):
        raise ConfigError(f"{what}: config.json holds a JSON {type(config).__name__}, not an object of settings "
                          f"(hidden_size, num_hidden_layers, ...): {RESTORE}")
    c = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    check_supported(config, c, what)
    for key in COUNTS:
        value = c.get(key)
        if key in c and not (value is None and key in ("head_dim", "num_key_value_heads")) and (
                not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"{what}: config.json has {key}={json.dumps(value)}, but it counts something and must "
                              f"be a positive integer: {RESTORE}")
    heads, kv_heads = c.get("num_attention_heads"), c.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise ConfigError(f"{what}: config.json has num_attention_heads={heads}, not a multiple of "
                          f"num_key_value_heads={kv_heads}: each key/value head serves a whole group of query heads; "
                          f"{RESTORE}")
    hidden = c.get("hidden_size")
    if heads and hidden and not c.get("head_dim") and hidden % heads:
        raise ConfigError(f"{what}: config.json has hidden_size={hidden}, not a multiple of num_attention_heads="
                          f"{heads}, and no head_dim: {RESTORE}")
    check_named_values(c, what)
    return config


def check_supported(config: dict, c: dict, what: str) -> None:
    """Refuse what this trainer would train wrongly without a word, though transformers loads it: experts in fused 3D
    tensors, which are no nn.Linear (bitsandbytes would leave them 16-bit, LoRA untrained, the estimate uncounted);
    logits that transformers transforms after lm_head, which the loss (qlora/training/loss.py) computes without; a
    vision tower beside the decoder."""
    experts = next((k for k in EXPERTS if isinstance(c.get(k), int) and c[k] > 1), None)
    if experts:
        raise ConfigError(f"{what}: config.json has {experts}={c[experts]}, a mixture-of-experts model: its experts "
                          "are not linear layers, so they would stay 16-bit and untrained and the memory estimate "
                          "would miss them: qlora trains dense decoders (Llama, Mistral, Qwen2/3, Gemma)")
    for key, plain in LOGIT_TRANSFORMS.items():
        if key in c and c[key] != plain:
            raise ConfigError(f"{what}: config.json has {key}={json.dumps(c[key])}: transformers transforms this "
                              "model's logits after lm_head, and qlora's loss computes them without, so training "
                              "would fit another function than the model you deploy: not supported")
    if isinstance(config.get("vision_config"), dict):
        raise ConfigError(f"{what}: config.json has a vision_config, a multimodal model: qlora trains text decoders, "
                          "and its vision tower would be adapted and counted nowhere: use the text-only model")


def check_named_values(c: dict, what: str) -> None:
    """The activation and rotary scaling are names transformers looks up when it builds the model (a KeyError deep in
    its code otherwise); the special token ids lie within the embedding (an assertion in nn.Embedding otherwise)."""
    from transformers.activations import ACT2FN
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    act = c.get("hidden_act")
    if isinstance(act, str) and act not in ACT2FN:
        raise ConfigError(f"{what}: config.json has hidden_act={json.dumps(act)}, an activation transformers does not "
                          f"know (it knows {', '.join(sorted(ACT2FN)[:8])}, ...): {RESTORE}")
    for key in ("rope_parameters", "rope_scaling"):
        rope = c.get(key)
        kind = (rope.get("rope_type") or rope.get("type")) if isinstance(rope, dict) else None
        if isinstance(kind, str) and kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
            raise ConfigError(f"{what}: config.json has {key}.rope_type={json.dumps(kind)}, a rotary scaling "
                              f"transformers does not know (default, {', '.join(ROPE_INIT_FUNCTIONS)}): {RESTORE}")
    vocab = c.get("vocab_size")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        ids = c.get(key) if isinstance(c.get(key), list) else [c.get(key)]
        for i in ids:
            if isinstance(vocab, int) and isinstance(i, int) and not isinstance(i, bool) and not 0 <= i < vocab:
                raise ConfigError(f"{what}: config.json has {key}={i}, outside the embedding's {vocab} rows "
                                  f"(vocab_size): {RESTORE}")


def check_causal_lm(config: dict, what: str) -> None:
    """A text generator with its language-model head: transformers' AutoModelForCausalLM takes an encoder (BertModel),
    a classifier (LlamaForSequenceClassification) or a decoder without head (LlamaModel) too, and the check of the
    weights then names a missing lm_head with the wrong fix, or T5 fails in transformers' words. Code the checkpoint
    ships (auto_map) names its own classes, so it is left to the loader."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if "auto_map" in config:
        return
    heads = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    kind = config.get("model_type")
    # Old conversions name classes transformers no longer has (LLaMAForCausalLM, RWForCausalLM): the suffix says it.
    if archs and not any(a in heads or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        named = f"architectures={json.dumps(archs)}"
    elif not archs and kind in CONFIG_MAPPING_NAMES and kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        named = f"model_type={json.dumps(kind)}"
    else:
        return
    raise ConfigError(f"{what}: config.json has {named}, not a causal language model with its head (a ...ForCausalLM): "
                      "qlora trains decoder-only text generators (Llama, Mistral, Qwen2/3, Gemma, Phi-3): point "
                      "model.path at one")


def check_not_quantized(config: dict, what: str) -> None:
    """Weights stored quantised (bitsandbytes, GPTQ, AWQ): transformers loads them its own way whatever quant.method
    asks (a bitsandbytes checkpoint came up 4-bit under quant.method=lora), or fails in its words (GPTQ without
    optimum: an ImportError; config and weights that disagree: an AssertionError in bitsandbytes); and merge, export
    and quant.keep_16bit read 16-bit weights back from the files (a bitsandbytes one failed merge after training,
    blaming the adapter's rank)."""
    quant = config.get("quantization_config")
    if quant is None:
        return
    if quant == {}:  # a leftover of an editor or converter: 16-bit weights, which transformers refuses to load
        raise ConfigError(f"{what}: config.json has an empty quantization_config, which transformers refuses (it "
                          "names no quant_method); the weights are not quantised by it: delete that key from "
                          "config.json")
    method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
    raise ConfigError(f"{what}: config.json has a quantization_config (quant_method={method}): the weights are already "
                      "quantised, and qlora quantises a 16-bit checkpoint itself (quant.method) and reads its 16-bit "
                      "weights back to merge and export: point model.path at the unquantised model")


def check_vocab(vocab_size: int, tokenizer: object, what: str) -> None:
    """No token id of the tokenizer lies past the embedding (an IndexError in the first forward otherwise)."""
    vocab = tokenizer.get_vocab()
    token, top = max(vocab.items(), key=lambda item: item[1])
    if top >= vocab_size:
        raise ConfigError(f"{what}: the tokenizer has token {token!r} at id {top}, but the embedding (config.json "
                          f"vocab_size={vocab_size}) ends at {vocab_size - 1}: use the tokenizer that came with the "
                          "weights")


def check_tokenizer_files(path: Path, what: str) -> None:
    """A tokenizer beside the weights, its tokenizer.json one the tokenizers library reads. transformers meets a
    missing one after the weights have loaded, as "Couldn't instantiate the backend tokenizer from one of: ", and a
    tokenizer.json that is JSON but no tokenizer as a KeyError ('added_tokens'). A tokenizer the checkpoint's own code
    builds (an auto_map in tokenizer_config.json) or another library reads (tiktoken) is left to the loader."""
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").is_file():
        try:
            Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as err:  # noqa: BLE001  the tokenizers library raises Exception itself, with serde's text
            raise ConfigError(f"{what}: its tokenizer.json is no tokenizer the tokenizers library reads ("
                              f"{str(err).splitlines()[0]}): restore the tokenizer.json that came with the weights"
                              ) from err
        return
    config = path / "tokenizer_config.json"
    # The text, not the JSON: a tokenizer_config.json that does not parse is the loader's to name.
    if any(any(path.glob(pattern)) for pattern in TOKENIZER_FILES) or (
            config.is_file() and "auto_map" in config.read_text(encoding="utf-8", errors="replace")):
        return
    raise ConfigError(f"{what}: the directory holds no tokenizer ({', '.join(TOKENIZER_FILES[:-1])} or "
                      f"{TOKENIZER_FILES[-1]}): copy the tokenizer files that came with the weights into it")


def check_model_dir(path: str | Path, what: str, trust_remote_code: bool = False) -> dict | None:
    """config.json's values, then the weights against it, then the tokenizer's files (`what` names the directory for
    the user); return config.json as read (None where it is no JSON: the loader says so)."""
    path = Path(path)
    if not (path / "config.json").is_file():  # transformers: "Should have a `model_type` key in its config.json"
        raise ConfigError(f"{what}: the directory holds no config.json, which says what model the weights are: copy "
                          "the config.json that came with the weights into it")
    config = check_config_file(path / "config.json", what)
    if config is not None:  # the weights of a model config.json describes, not of a synthetic one
        check_causal_lm(config, what)
        check_not_quantized(config, what)
    check_weights(path, what, trust_remote_code)
    check_tokenizer_files(path, what)
    return config


def unrun_code(config: dict | None, what: str) -> str | None:
    """The line for a checkpoint whose config.json (`config`, as check_model_dir read it) names model code of its own
    (auto_map) that is not run (no model.trust_remote_code): with a model_type transformers knows, it loads its
    built-in class in silence, and the run trains a model other than the one the checkpoint's code describes. None
    where there is nothing to say (an unknown model_type is refused by the load: load.load_error; a config.json that
    is no JSON, by the loader)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    code = config.get("auto_map") if config is not None else None
    if not isinstance(code, dict) or "AutoModelForCausalLM" not in code or \
            config.get("model_type") not in CONFIG_MAPPING_NAMES:
        return None
    return (f"{what} ships model code of its own (config.json's auto_map: {code['AutoModelForCausalLM']}), which is "
            f"not run: transformers' own {config['model_type']} is loaded; read that code and set "
            "--model.trust_remote_code=true to run it instead")
