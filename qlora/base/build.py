"""Where a base checkpoint's files come from: built once into the cache (the tiny random Llama, SmolLM2 from its
GGUF), a local directory, or a hub snapshot; and which of its files hold the weights and the config.

Builders write a checkpoint that is then loaded like any Hugging Face one, so every method takes one path. Nothing
heavy is imported at module level: recipes import `cache_dir` from here, and reading a recipe must stay instant.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from qlora.config import Config
from qlora.console import announce, since
from qlora.errors import ConfigError, Stop, check_writable
from qlora.partial import ordinary_modes, remove_abandoned, sync, sync_tree

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INDEX = "model.safetensors.index.json"  # a sharded safetensors checkpoint's tensor -> file map

# ChatML, as SmolLM2 uses it; the tiny tokenizer gets it so chat data trains the same way on both.
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# A small Llama: every kind of layer the big ones have (GQA attention, SwiGLU MLP, RMSNorm, RoPE), trains in seconds.
# Weights drawn with std 0.1, not transformers' 0.02: behind a frozen RMSNorm (weight 1) and a frozen random lm_head,
# a logit can reach only std x hidden = 2.6 at 0.02, so no token ever got more than ~5% probability and adapters
# learned the tiny task too slowly to show it (0% exact match after 400 steps); at 0.1 the ceiling is 12.8.
TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  initializer_range=0.1)


def cache_dir() -> Path:
    """Where built checkpoints live: $QLORA_CACHE, else ~/.cache/qlora."""
    return Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora")).expanduser()


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + ChatML specials; needs no download or corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + len(specials), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML)


# The tiny Llama's shapes in the other dense decoders the trainer takes, each keeping what sets it apart: tied
# embeddings (Llama 3.2 1B/3B), q/k/v biases (Qwen2), a sliding window shorter than the tiny task's rows of ~45-60
# tokens (Mistral; Gemma 3's sliding layers), Gemma 3's extra norms and a head_dim apart from hidden / heads, Phi-3's
# fused qkv_proj and gate_up_proj.
TINY_ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("llama", {}),
    "tiny-llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "tiny-qwen2": ("qwen2", {}),
    "tiny-mistral": ("mistral", dict(sliding_window=16)),
    "tiny-gemma3": ("gemma3_text", dict(head_dim=48, query_pre_attn_scalar=48, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)),
    "tiny-phi3": ("phi3", {}),
}


def build_tiny(model_type: str, fields: dict, out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    config = AutoConfig.for_model(model_type, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **{"vocab_size": len(tokenizer), **TINY_LLAMA, **fields})
    torch.manual_seed(0)  # the same tiny base on every machine
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def build_smollm2(out_dir: Path) -> None:
    from qlora.base.convert import write_smollm2_checkpoint

    write_smollm2_checkpoint(out_dir)


BUILDERS: dict[str, Callable[[Path], None]] = {
    **{name: functools.partial(build_tiny, *arch) for name, arch in TINY_ARCHITECTURES.items()},
    "smollm2-135m-instruct": build_smollm2}


def ensure_checkpoint(cfg: Config) -> str:
    """Return the checkpoint path (or hub id), building it into place first when the recipe names a builder."""
    path = os.path.expanduser(cfg.model.path)
    if cfg.model.build is None:
        return path
    if cfg.model.build not in BUILDERS:
        raise ConfigError(f"model.build={cfg.model.build!r} is not one of {', '.join(BUILDERS)}")
    target = Path(path)
    if target.exists() and not target.is_dir():  # the build failed at its rename, saying to remove "that directory"
        raise ConfigError(f"model.path={target} is a file, not a directory: model.build={cfg.model.build} builds a "
                          "checkpoint directory there; point model.path at a new directory")
    if not (target / "config.json").is_file():
        if target.is_dir() and any(target.iterdir()):
            # It was emptied to make room: a run's output dir, or ~, given as model.path lost every file in it.
            raise ConfigError(f"model.path={target} is a directory without config.json that holds other files: "
                              f"model.build={cfg.model.build} builds a checkpoint into a new or empty directory; "
                              "point model.path at one")
        # A link in a loop or to nothing, a file above it, a read-only folder: refused before the announcement (a
        # loop announced the build, then failed its rename saying "Not a directory").
        try:
            check_writable(target, "model.path", directory=True)
        except Stop as err:  # the recipe's model.path: the user set the cache, not it (HOME a file: "choose another")
            if not target.is_relative_to(cache_dir()):
                raise
            raise Stop(err.code, f"{err}; built models go to $QLORA_CACHE, else ~/.cache/qlora: set QLORA_CACHE to a "
                                 "folder this user may write") from None
        started = announce(f"building {cfg.model.build} into {target} (once; later runs reuse it)")
        target.parent.mkdir(parents=True, exist_ok=True)
        # Builders write into a path that does not exist yet; renaming it into place is atomic, so a run killed
        # mid-build never leaves a half checkpoint at `target`.
        # Several processes may build at once (test workers, two first runs): the first rename wins, and a later
        # builder keeps the checkpoint already in place (builders are deterministic) rather than replace it under
        # a process that may be reading it.
        tmp = target.parent / f".{target.name}.building-{os.getpid()}"
        remove_abandoned(target, "building")  # what a build killed before its rename left (a kill runs no cleanup)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            BUILDERS[cfg.model.build](tmp)
            ordinary_modes(tmp)  # safetensors writes 0600: another user of a shared QLORA_CACHE could not read it
            if not (target / "config.json").is_file():
                try:  # onto a missing or empty directory; another process's checkpoint there stays
                    sync_tree(tmp)  # a power cut after the rename leaves the whole checkpoint, or none
                    os.replace(tmp, target)
                    sync(target.parent)
                except OSError as err:  # ENOTEMPTY, EEXIST: another process's rename came first
                    if not (target / "config.json").is_file():
                        raise ConfigError(f"could not put the built checkpoint at {target} ({err.strerror}): "
                                          "remove that directory and run again") from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"built in {since(started)}")
    return str(target.resolve())


def looks_like_hub_id(name: str) -> bool:
    """`name` or `owner/name`, and no local path: anything else that does not exist is a mistyped path, not a
    download."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and not os.path.exists(name)


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now, or None if it can.

    Without a network, huggingface_hub and datasets retry each request for ~25 s before they fail. So one connection
    is tried first (3 s at most); if it fails, the hub libraries are switched to offline mode for the rest of the
    command, and a copy in the local cache still loads while anything else fails at once. Behind a proxy the direct
    connection proves nothing, so it is not tried.
    """
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
        return None
    except OSError as err:
        reason = f"no network: {url.hostname} cannot be reached ({err.strerror or err})"
    constants.HF_HUB_OFFLINE = True  # read by huggingface_hub (and transformers) at each request
    if "datasets.config" in sys.modules:  # datasets keeps its own copy of the flag
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True
    return reason


def local_checkpoint(path: str) -> Path:
    """A checkpoint directory, or a hub id's snapshot (from the cache that loading it for training filled)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
    if not looks_like_hub_id(path):  # said "fetch it first with huggingface-cli download /a/local/path"
        what = "is a file, not a checkpoint directory" if os.path.exists(path) else "not found"
        raise ConfigError(f"base {path} {what}: give the directory holding its config.json and weights")
    offline = hub_unreachable()
    try:
        return Path(snapshot_download(path, allow_patterns=patterns))
    except Exception as err:  # huggingface_hub raises several types for a missing repo or no network
        why = f"{offline}, and it is not in the local cache" if offline else str(err).splitlines()[0]
        raise ConfigError(f"base {path} is neither a local directory nor a reachable hub checkpoint ({why}): fetch "
                          f"it first with huggingface-cli download {path}, or give a local directory") from err


def index_weight_map(root: Path) -> dict[str, str]:
    """A sharded checkpoint's index: tensor name -> safetensors file name. One that is no such map (not JSON, no
    weight_map, a list) is refused in one line: every reader of the shards would fail in its own words."""
    try:
        weight_map = json.loads((root / INDEX).read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
        raise ConfigError(f"{root / INDEX} is unreadable ({err}): download the checkpoint again") from err
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ConfigError(f"{root / INDEX} is unreadable (its weight_map is no object of tensor names to file names): "
                          "download the checkpoint again")
    return weight_map


def checkpoint_shards(root: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in the order its index lists them."""
    if (root / INDEX).is_file():
        return [root / name for name in dict.fromkeys(index_weight_map(root).values())]
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    raise ConfigError(f"{root} holds no model.safetensors or {INDEX}: the 16-bit weights are read from "
                      "safetensors only; re-save the base with save_pretrained(safe_serialization=True)")


def weight_locations(base_path: str) -> dict[str, str]:
    """Tensor name -> the safetensors file of the checkpoint that holds it."""
    from safetensors import safe_open

    where = {}
    for shard in checkpoint_shards(local_checkpoint(base_path)):
        with safe_open(str(shard), "pt") as f:
            where.update(dict.fromkeys(f.keys(), str(shard)))
    return where


def not_a_directory(path: str) -> str:
    """The line for a model.path that names a file (a .safetensors or .gguf file) rather than its directory."""
    return (f"model.path={path} is a file, not a checkpoint directory: point it at the directory holding config.json "
            "and the weights")


def config_file(config_json: str) -> Path:
    """model.config_json's file: the path given, or the config.json in the folder it names."""
    path = Path(config_json).expanduser()
    return path / "config.json" if path.is_dir() else path


def config_sha256(config_json: str | None) -> str | None:
    """The sha256 of model.config_json's file (None where there is none): the architecture a synthetic base is drawn
    from, which each checkpoint records, so that a resume tells a moved copy from another file by content."""
    path = config_file(config_json) if config_json else None
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else None


def config_json_path(cfg: Config) -> Path:
    """model.config_json if set, else the checkpoint's own config.json (built checkpoints are built first: no hub)."""
    if cfg.model.config_json:
        path = config_file(cfg.model.config_json)
        if path.exists() and not path.is_file():  # read whole: a fifo hung the estimate, /dev/zero filled memory
            raise ConfigError(f"model.config_json={path} is not a regular file (a pipe or a device): point it at a "
                              "model's config.json")
        return path
    if Path(cfg.model.path).expanduser().is_file() and not cfg.model.build:  # a .gguf or .safetensors file
        raise ConfigError(not_a_directory(cfg.model.path))
    path = Path(cfg.model.path).expanduser() / "config.json"
    if not path.is_file() and cfg.model.build:
        path = Path(ensure_checkpoint(cfg)) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}: set model.config_json to a local copy of the model's config.json")
    return path
