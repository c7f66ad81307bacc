"""Cheap probes: measure a model with only k of its L decoder layers, at full width and full length, and compute the
full-depth peak from it.

A step's peak at long context is one layer's backward beside what the other layers keep: their weights, adapters,
gradients and optimizer state, and the layer inputs the checkpoint plan holds on the device. The first is what needs
measuring (the kernels' buffers, the allocator's reserve); the rest is known bytes. So a probe of k layers (synthetic
weights from a copy of config.json with num_hidden_layers = k, the same checkpoint plan) is measured, and

    peak(L) = measured(k) + known(L) - known(k)

where known(n) is the estimator's depth-dependent part at the same moment of the step, the difference of its two
estimates: every term of one layer's own backward (and the loss, the context, the allocator's margin, fitted to the
length alone) is the same in both and cancels, so an error in it does not enter the prediction. It holds when both
depths peak in the same phase (a layer's backward, the loss's, the optimizer step); `probe_depth` picks the smallest
k for which the estimator says they do. A 70B probe at 60K tokens is then two layers' step instead of eighty.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from qlora.base.build import config_json_path
from qlora.config import Config
from qlora.errors import ConfigError
from qlora.memory.arch import Arch, load_arch
from qlora.memory.estimate import Estimate, estimate


def moment(est: Estimate) -> str:
    """The phase `est` peaks in. Within a layer's backward the moment may differ between the depths (the backward's
    first layer, with the most layer inputs, or its last, with every gradient): the layer's own working set is the
    same at both, and the inputs and gradients are known bytes."""
    return est.peak_phase


def depth_estimate(cfg: Config, arch: Arch, layers: int, device: str) -> Estimate:
    return estimate(cfg, dataclasses.replace(arch, layers=layers), cfg.quant.method, device)


def probe_depth(cfg: Config, device: str = "cuda", arch: Arch | None = None) -> int:
    """The fewest decoder layers (at least 2, a multiple of train.checkpoint_every so that the probe's groups are the
    model's) whose estimate peaks at the same moment as the whole model's; the whole depth if none does."""
    arch = arch or load_arch(cfg)
    every = max(1, cfg.train.checkpoint_every) if cfg.train.gradient_checkpointing else 1
    whole = moment(estimate(cfg, arch, cfg.quant.method, device))
    for k in range(max(2, every), arch.layers, every):
        if moment(depth_estimate(cfg, arch, k, device)) == whole:
            return k
    return arch.layers


@dataclass
class Prediction:
    """A full-depth peak from a truncated probe: measured at `depth` of `layers` layers, plus the known bytes."""

    layers: int
    depth: int
    measured: int
    known: dict[str, int]
    """By the estimator's category: what the missing layers add at the peak moment (layer inputs under activations)."""
    moment: str

    @property
    def predicted(self) -> int:
        return self.measured + sum(self.known.values())


def full_depth(cfg: Config, depth: int, measured: int, device: str = "cuda", arch: Arch | None = None) -> Prediction:
    """The full model's peak from `measured`, the peak of the same recipe (and plan) at `depth` decoder layers."""
    arch = arch or load_arch(cfg)
    whole, part = estimate(cfg, arch, cfg.quant.method, device), depth_estimate(cfg, arch, depth, device)
    if moment(whole) != moment(part):
        raise ConfigError(f"a probe of {depth} of {arch.layers} layers peaks at {moment(part)}, the whole model at "
                          f"{moment(whole)}: its measurement says nothing of the whole's; probe "
                          f"{probe_depth(cfg, device, arch)} layers")
    known = {k: whole.components[k] - part.components[k] for k in whole.components}
    return Prediction(arch.layers, depth, measured, {k: v for k, v in known.items() if v}, moment(whole))


def truncated_config(cfg: Config, depth: int, folder: Path) -> Config:
    """`cfg` with `depth` of its decoder layers: synthetic weights from a copy of its config.json written into
    `folder` (its `num_hidden_layers` set to `depth`), everything else as it was."""
    source = json.loads(config_json_path(cfg).read_text(encoding="utf-8"))
    text = source.get("text_config", source)  # a multimodal checkpoint nests the language model's
    text["num_hidden_layers"] = depth
    for key in ("layer_types", "mlp_only_layers"):  # per-layer lists must match the depth
        if isinstance(text.get(key), list):
            text[key] = text[key][:depth]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    out = copy.deepcopy(cfg)
    out.model.synthetic, out.model.config_json = True, str(path)
    return out

