"""The weights of a model directory against its config.json, from the safetensors headers alone: every tensor of the
model config.json describes there, of its shape, a weight in floating point, nothing else; each file readable; each
tensor in one shard, the one the index names; the layers linear ones (no GPT-2 Conv1D).

transformers initialises a layer the weights lack at random with a warning, drops one the config does not know, and
meets a shape that disagrees in a RuntimeError after a report of every layer: the run would train another model than
the user's. The model whose shapes the headers are compared with is built on the meta device (no memory for weights).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from qlora.errors import ConfigError

if TYPE_CHECKING:
    import torch

RESTORE = "restore the config.json that came with the weights"
# The floating-point dtypes of safetensors' headers a weight is stored in.
FLOATS = ("F16", "BF16", "F32", "F64")


def damaged(what: str, err: Exception) -> str:
    """The line for a safetensors file that cannot be read."""
    return f"{what}: a safetensors file is damaged ({err}): download or build the checkpoint again"


def stored_shapes(shards: list[Path], what: str) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """Tensor name -> (shape, file name, dtype as safetensors names it: F32, BF16, I64), from the headers alone."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for shard in shards:
        try:
            with safe_open(str(shard), "pt") as f:
                held = {name: (tuple(f.get_slice(name).get_shape()), shard.name, f.get_slice(name).get_dtype())
                        for name in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ConfigError(damaged(what, f"{shard.name}: {err}")) from err
        # transformers reads every shard whole, so of a tensor two shards hold the last one read is trained.
        twice = next((name for name in held if name in shapes), None)
        if twice:
            raise ConfigError(f"{what}: {shapes[twice][1]} and {shard.name} both hold {twice}: the shards are of "
                              "different downloads or revisions; download the checkpoint again")
        shapes.update(held)
    return shapes


def load_renamings(model: torch.nn.Module) -> tuple[list, bool]:
    """The renamings transformers applies to a checkpoint's names as it loads `model`, in its order, and whether it
    converts more than names (converters that fuse or split tensors, prefix changes), which the check does not replay.
    Each renaming's own rename_source_key: transformers 5.17, the GPU image's, has no apply_renamings. ([], False)
    where a transformers keeps no such list."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return [], False
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    return renamings, len(renamings) < len(mapping)


def check_weights(path: Path, what: str, trust_remote_code: bool = False) -> None:
    """Every tensor of the model config.json describes is in the safetensors files, of its shape, and they hold no
    other. A checkpoint transformers cannot describe (an unknown architecture, remote code, pickle weights only) is
    left to the loader; pre-quantised weights were refused before (check_not_quantized)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.base.build import INDEX, checkpoint_shards

    path = Path(path)
    if not ((path / "model.safetensors").is_file() or (path / INDEX).is_file()):
        return
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # not JSON, an unknown architecture, remote code: the loader's line says which
        return
    except Exception as err:  # transformers' own checks of the values (a strict dataclass validator)
        reason = str(err).strip().splitlines()[-1].strip()
        raise ConfigError(f"{what}: transformers refuses its config.json ({reason}): {RESTORE}") from err
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001  no causal LM class for it: the loader says so in its own line
        return
    check_linear_layers(model, what)
    # named_parameters lists a tied weight (lm_head sharing the embedding) once, as the checkpoint stores it.
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                expected[f"{module_name}.{name}" if module_name else name] = tuple(buffer.shape)
    stored = stored_shapes(checkpoint_shards(path), what)  # an unreadable index is refused by checkpoint_shards
    check_index(path, stored, what)
    # The names transformers renames on load, as it does (GPT-NeoX's embed_out.weight is its lm_head.weight), each
    # with the name the file holds it by (`in_file`), which a line below says beside the model's.
    in_file = {n: n for n in stored}
    renamings, converts = load_renamings(model)
    for renaming in renamings:
        in_file = {renaming.rename_source_key(n)[0]: was for n, was in in_file.items()}
    # Some checkpoints store the base model's weights without its prefix (`h.0...` for `transformer.h.0...`), which
    # transformers adds on load.
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    in_file = {prefix + n if prefix + n in expected and n not in expected else n: was for n, was in in_file.items()}
    stored = {n: stored[was] for n, was in in_file.items()}

    def held(name: str) -> str:  # "lm_head.weight (embed_out.weight in the file)"
        return name if in_file[name] == name else f"{name} ({in_file[name]} in the file)"

    parameters = dict(model.named_parameters())
    for name, shape in expected.items():
        got, file, dtype = stored.get(name, (shape, "", "F32"))
        if got != shape:
            raise ConfigError(f"{what}: config.json makes {held(name)} {list(shape)}, but {file} holds it as "
                              f"{list(got)}: the config and the weights are of different models; {RESTORE}")
        # A header that says I32 for a weight's bytes loads them as integers, cast: ~1e9 each, every step then
        # non-finite and blamed on the rows and the learning rate.
        if name in parameters and dtype.startswith("F8"):  # F8_E4M3, F8_E5M2: FP8 releases, scaled by other tensors
            raise ConfigError(f"{what}: {file} holds the weight {held(name)} as {dtype}, an 8-bit float (an FP8 "
                              "checkpoint, its weights scaled by tensors qlora does not read): point model.path at "
                              "the 16-bit (BF16, F16 or F32) weights of the model")
        if name in parameters and dtype not in FLOATS:
            raise ConfigError(f"{what}: {file} holds the weight {held(name)} as {dtype}, not floating point: the file "
                              "is damaged or holds no model's weights; download or build the checkpoint again")
    # Names in a scheme of transformers' own conversions (legacy checkpoints) leave most names on both sides unmatched:
    # the loader maps them. Weights under a config.json of over twice their layers match most of theirs: refused below.
    # A model the loader only renames for (Llama) has no other scheme: a Llama in Meta's own names (tok_embeddings,
    # layers.0.attention.wq) passed here, loaded as random weights and ended in a bitsandbytes AssertionError.
    if 2 * len(expected.keys() & stored.keys()) < min(len(expected), len(stored)):
        if converts:
            return
        theirs, ours = (next(n for n in a if n not in b) for a, b in ((stored, expected), (expected, stored)))
        raise ConfigError(f"{what}: most tensors of its safetensors files are named otherwise than transformers loads "
                          f"{type(model).__name__} by ({held(theirs)} where it expects {ours}): the weights are in "
                          "another format; use the model's Hugging Face (transformers) checkpoint")
    ignored = [re.compile(p) for p in (model._keys_to_ignore_on_load_missing or [])]
    missing = [n for n in expected if n not in stored and not any(p.search(n) for p in ignored)]
    if missing:
        raise ConfigError(f"{what}: config.json describes {missing[0]}, which no safetensors file holds (transformers "
                          f"would fill it with random numbers, {len(missing)} tensor(s) in all): {RESTORE}")
    ignored = [re.compile(p) for p in (model._keys_to_ignore_on_load_unexpected or [])]
    extra = [n for n in stored if n not in expected and not any(p.search(n) for p in ignored)
             and n not in (model._tied_weights_keys or {})]
    if extra:
        raise ConfigError(f"{what}: {stored[extra[0]][1]} holds {held(extra[0])}, which the model config.json "
                          f"describes has no place for (transformers would drop it, {len(extra)} tensor(s) in all): "
                          f"{RESTORE}")


def check_linear_layers(model: torch.nn.Module, what: str) -> None:
    """No transformers Conv1D (GPT-2's layers, their weights stored transposed): bitsandbytes quantises it under qlora
    and the run trains, but a 16-bit method finds no linear layer to adapt (a ValueError in the rank check), and merge
    and export read every weight back as nn.Linear's."""
    from transformers.pytorch_utils import Conv1D

    conv = next((name for name, module in model.named_modules() if isinstance(module, Conv1D)), None)
    if conv:
        raise ConfigError(f"{what}: its {conv} is a transformers Conv1D (GPT-2's layout, the weight transposed), not "
                          "a linear layer: qlora quantises, adapts and merges nn.Linear layers; it trains dense "
                          "decoders such as Llama, Mistral, Qwen2/3, Gemma and Phi-3")


def check_index(path: Path, stored: dict[str, tuple[tuple[int, ...], str, str]], what: str) -> None:
    """Every tensor the index names is in the safetensors file it names. transformers reads each shard whole and never
    looks the index's names up, so one no shard holds, or another shard holds, loads without a word: a shard from
    another download or revision."""
    from qlora.base.build import INDEX, index_weight_map

    if not (path / INDEX).is_file():
        return
    weight_map = index_weight_map(path)
    ghost = [name for name in weight_map if name not in stored]
    if ghost:
        raise ConfigError(f"{what}: {INDEX} maps {ghost[0]} to {weight_map[ghost[0]]}, but no safetensors file holds "
                          f"it ({len(ghost)} tensor(s) in all): the index and the shards are of different downloads; "
                          "download the checkpoint again")
    moved = [name for name, file in weight_map.items() if stored[name][1] != file]
    if moved:
        raise ConfigError(f"{what}: {INDEX} maps {moved[0]} to {weight_map[moved[0]]}, but {stored[moved[0]][1]} "
                          f"holds it ({len(moved)} tensor(s) in all): the index and the shards are of different "
                          "downloads; download the checkpoint again")


def check_kept_layers(names: list[str], path: str | Path) -> None:
    """quant.keep_16bit against the safetensors headers, before the base is loaded: a name with no matrix stored
    under it is no linear layer of the checkpoint (refused after the load before, a 70B's minutes later). A name
    stored without the base model's prefix (`layers.0...` for `model.layers.0...`) counts as its own."""
    from qlora.base.build import INDEX, checkpoint_shards

    path = Path(path)
    if not names or not ((path / "model.safetensors").is_file() or (path / INDEX).is_file()):
        return
    stored = stored_shapes(checkpoint_shards(path), f"model.path={path}")
    matrices = sorted(n.removesuffix(".weight") for n, (shape, _, _) in stored.items()
                      if n.endswith(".weight") and len(shape) == 2)
    unknown = [n for n in names if not any(n == m or n.endswith(f".{m}") for m in matrices)]
    if unknown and matrices:  # none: names of a scheme the loader maps, left to its own check after the load
        example = next((m for m in matrices if ".layers." in m), matrices[0])
        raise ConfigError(f"quant.keep_16bit names {unknown[0]}, which is not a linear layer of {path}: use full "
                          f"names such as {example}")
