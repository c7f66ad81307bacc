"""The numbers of a decoder that memory depends on, read from its config.json alone (no weights, no transformers).

Llama-style decoders: per layer q/k/v/o attention projections (grouped-query: k and v have kv_heads heads) and a
gated MLP (gate, up, down), RMSNorm before each, an embedding table and an output head that may share its weights.
Llama, Mistral, Qwen2/3, SmolLM and their kin all fit, and Phi-3, whose q/k/v are one linear layer and gate/up another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from qlora.base.build import config_json_path
from qlora.base.model_dir import check_config_file
from qlora.config import Config
from qlora.errors import ConfigError

# The model types whose decoder layers are linear_shapes' (q/k/v projections, a gated MLP), each with whether
# transformers 5 ties the output head to the embeddings when config.json does not say. Others are refused rather than
# estimated wrongly: an MLP without a gate (StarCoder2), low-rank attention (DeepSeek). A config without a model_type
# is taken as one of these.
MODELLED = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False, "olmo2": False, "gemma": True,
            "gemma3_text": True, "phi3": False}
# Phi-3 (transformers' Phi3Attention, Phi3MLP): q/k/v computed by one qkv_proj and split into views, gate/up by one
# gate_up_proj and chunked; adapters attach to the fused layers, as PEFT's all-linear does.
FUSED = ("phi3",)
# What a decoder layer keeps in 16-bit beyond its two RMSNorms, from (hidden, q width, kv width, head_dim): Qwen2's
# q/k/v biases; Gemma 3's norms before and after the MLP and its q and k norms (one head wide). Small (0.001% of
# Qwen2.5-72B, 0.007% of Gemma-3-1B), but the estimate's weights are the loaded model's to the byte.
LAYER_EXTRAS = {"qwen2": lambda h, q, kv, d: q + 2 * kv, "gemma3_text": lambda h, q, kv, d: 2 * h + 2 * d}
GEMMA3_BUFFERS = 4  # Gemma 3's embedding scale, an fp32 scalar buffer
# The model types whose layers may attend within a sliding window, and transformers 5's window where config.json names
# none (MistralConfig, Gemma3TextConfig: 4096; Qwen2/3 only with use_sliding_window, from layer max_window_layers on;
# Phi3Config none, every layer where config.json names one: Phi-3-mini and -medium 2,047).
WINDOW_DEFAULT = {"mistral": 4096, "gemma3_text": 4096, "qwen2": 4096, "qwen3": 4096, "phi3": None}
# The estimate walks the layers (a list per layer, every checkpoint spacing up to L): num_hidden_layers=10**6 hung
# --max-context and 10**30 ended in an OverflowError. The deepest released decoders have under 200 (Llama-3.1-405B 126).
MAX_LAYERS = 1024


class BadConfigValue(ConfigError):
    """A config.json value transformers would refuse too, or none a decoder has: refused before loading, where a model
    the estimator does not know is left to the loader (qlora/memory/preflight.py)."""


@dataclass(frozen=True)
class Arch:
    """The numbers of a Llama-style decoder that memory depends on, read from its config.json."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    layer_extra: int = 0
    """Per decoder layer, the 16-bit parameters beyond its two RMSNorms (LAYER_EXTRAS)."""
    rotary_tables: int = 1
    """Rotary modules: Gemma 3 has one for its sliding layers and one for its global ones."""
    window: int | None = None
    """The sliding window of the layers that have one, in tokens (None: every layer attends to the whole row)."""
    windowed_layers: int = 0
    """How many layers attend within `window`: Mistral's all, Gemma 3's five in six (its layer_types)."""
    fused: bool = False
    """Phi-3's layout: one qkv_proj for q/k/v, one gate_up_proj for gate/up (FUSED)."""

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.fused:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes.values())

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (unless tied), the 2L+1 RMSNorm weights and each layer's extras: never quantised."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden + \
            self.layers * self.layer_extra

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    @property
    def buffer_bytes(self) -> int:
        """The rotary tables' inverse frequencies (inv_freq and original_inv_freq, fp32), Gemma 3's embedding scale."""
        return self.rotary_tables * 2 * (self.head_dim // 2) * 4 + (GEMMA3_BUFFERS if self.rotary_tables > 1 else 0)


def load_arch(cfg: Config) -> Arch:
    """Read config.json as plain JSON: no transformers import, so an estimate takes a second, not ten."""
    path = config_json_path(cfg)
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not a readable config.json ({err}): point model.config_json at one") from err
    check_config_file(path, f"model.config_json={path}" if cfg.model.config_json else f"model.path={path.parent}")
    # some checkpoints nest the language model's (multimodal ones are refused above)
    c = c["text_config"] if isinstance(c.get("text_config"), dict) else c
    numbers = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in numbers if not (isinstance(c.get(k), int) and c[k] > 0)]
    if missing:
        raise ConfigError(f"{path} has no positive integer {', '.join(missing)}: the estimator knows Llama-style "
                          "decoders only")
    if c["num_hidden_layers"] > MAX_LAYERS:
        raise BadConfigValue(f"{path} has num_hidden_layers={c['num_hidden_layers']}, beyond any decoder's (the "
                             f"estimator takes up to {MAX_LAYERS}): restore the config.json that came with the weights")
    kind = c.get("model_type")
    if kind is not None and not isinstance(kind, str):
        raise BadConfigValue(f"{path} has model_type={json.dumps(kind)}, not a name: write the model's type as a "
                             'string, e.g. "llama"')
    if kind is not None and kind not in MODELLED:
        raise ConfigError(f"{path} is a {kind} model: the estimator knows the layers of {', '.join(MODELLED)} "
                          "decoders only, so it gives no estimate for it")
    if kind == "phi3" and c.get("resid_pdrop", 0):  # transformers' Phi3DecoderLayer drops the residual in training
        raise ConfigError(f"{path} has resid_pdrop={c['resid_pdrop']}: the estimator does not count the masks of "
                          "Phi-3's residual dropout, so it gives no estimate for it (Phi-3's own configs have 0.0)")
    heads, hidden = c["num_attention_heads"], c["hidden_size"]
    kv_heads, head_dim = c.get("num_key_value_heads") or heads, c.get("head_dim") or hidden // heads
    tied = c.get("tie_word_embeddings", MODELLED.get(kind, True))  # absent: transformers' default
    if not isinstance(tied, bool):  # "false" would count as tied; transformers 5 refuses it as it loads
        raise BadConfigValue(f"{path} has tie_word_embeddings={json.dumps(tied)}: write true or false (JSON booleans)")
    extra = LAYER_EXTRAS[kind](hidden, heads * head_dim, kv_heads * head_dim, head_dim) if kind in LAYER_EXTRAS else 0
    window, windowed = sliding_window(c, kind, path)
    return Arch(name=path.parent.name, layers=c["num_hidden_layers"], hidden=hidden,
                intermediate=c["intermediate_size"], heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                vocab=c["vocab_size"], tied=tied, layer_extra=extra,
                rotary_tables=2 if kind == "gemma3_text" else 1, window=window, windowed_layers=windowed,
                fused=kind in FUSED)


def sliding_window(c: dict, kind: str | None, path: object = "config.json") -> tuple[int | None, int]:
    """(window, layers that attend within it) as transformers 5 reads config.json (the model types' configuration
    classes): layer_types where given, else Gemma 3's sliding_window_pattern (every 6th layer global), Qwen's layers
    from max_window_layers on, Mistral's all. A value transformers would refuse, or a window of no tokens, is refused
    here by its key: a string window was a TypeError, a pattern of 0 a ZeroDivisionError, and layer_types longer than
    the model counted more windowed layers than it has."""
    window = c.get("sliding_window", WINDOW_DEFAULT.get(kind))
    if kind in ("qwen2", "qwen3"):
        checked_value(c, "use_sliding_window", path, bool, "true or false")
    if kind not in WINDOW_DEFAULT or window is None or (kind in ("qwen2", "qwen3") and not c.get("use_sliding_window")):
        return None, 0
    checked_value(c, "sliding_window", path, int, "the tokens a layer attends to: a positive integer, or null for none",
                  1)
    layers = c["num_hidden_layers"]
    if "layer_types" in c:
        types = c["layer_types"]
        if not (isinstance(types, list) and len(types) == layers and
                set(types) <= {"sliding_attention", "full_attention"}):
            raise BadConfigValue(f"{path} has layer_types={json.dumps(types)[:80]}: write a list of "
                                 f'num_hidden_layers={layers} entries, each "sliding_attention" or "full_attention"')
        windowed = types.count("sliding_attention")
    elif kind == "gemma3_text":
        pattern = checked_value(c, "sliding_window_pattern", path, int, "every how many layers one is global", 1, 6)
        windowed = sum(bool((i + 1) % pattern) for i in range(layers))
    elif kind in ("qwen2", "qwen3"):
        first = checked_value(c, "max_window_layers", path, int, "the index of the first windowed layer (an integer)",
                              None, 28)
        windowed = layers - min(max(first, 0), layers)  # below 0 transformers makes every layer windowed, as 0 does
    else:
        windowed = layers
    return (window, windowed) if windowed else (None, 0)


def checked_value(c: dict, key: str, path: object, kind: type, what: str, least: int | None = None,
                  default: object = None) -> object:
    """c[key] (or `default` where absent) if it is a `kind` (a JSON boolean is no integer) of at least `least`; else
    the line naming the key and what it holds."""
    value = c.get(key, default)
    if key in c and (not isinstance(value, kind) or (kind is int and isinstance(value, bool)) or
                     (least is not None and value < least)):
        raise BadConfigValue(f"{path} has {key}={json.dumps(value)}: write {what}")
    return value
