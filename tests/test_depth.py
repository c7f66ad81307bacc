"""Cheap probes (qlora/memory/depth.py): a model cut to k of its L decoder layers, measured at full width and length,
and the known bytes of the missing layers added, against the whole model measured the same way (CPU, tensor by
tensor with qlora/report/recorder.py: what the CUDA allocator's allocated counter counts, without a resident set's
noise or a fresh process per run)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import LlamaConfig

from qlora.base.build import TINY_LLAMA
from qlora.config import apply_overrides, load_recipe
from qlora.errors import ConfigError
from qlora.memory.arch import load_arch
from qlora.memory.depth import depth_estimate, full_depth, probe_depth, truncated_config
from qlora.memory.estimate import estimate
from qlora.report.recorder import record_steps

ROOT = Path(__file__).resolve().parent.parent
# The tiny Llama's width, four layers, at 4096 tokens with the long-context levers: the layer inputs the two missing
# layers keep (2 x 2 MiB) are a ninth of the step, the missing layers' bytes 12.7% of it (14.0% at 8192 tokens,
# which cost twice the time; the prediction within 0.06% at either length).
LONG = ["--data.max_seq_len=4096", "--train.batch_size=1", "--lora.dropout=0.1", "--train.tile_size=1024",
        "--train.tile_projections=true"]


def deep_tiny(tmp_path: Path, layers: int, *overrides: str):  # noqa: ANN201 (Config)
    path = tmp_path / f"tiny{layers}" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=259, **{**TINY_LLAMA, "num_hidden_layers": layers}).to_json_file(path)
    return apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"),
                           ["--model.synthetic=true", f"--model.config_json={path}", *overrides])


def test_a_truncated_probe_predicts_the_whole_models_peak(tmp_path: Path) -> None:
    cfg = deep_tiny(tmp_path, 4, *LONG)
    k = probe_depth(cfg, "cpu")
    assert k == 2
    truncated = truncated_config(cfg, k, tmp_path / "cut")
    assert load_arch(truncated).layers == 2 and load_arch(truncated).hidden == load_arch(cfg).hidden
    _, part = record_steps(truncated, 1)
    _, whole = record_steps(cfg, 1)
    predicted = full_depth(cfg, k, part, "cpu")
    # One step: its peak, in the backward, comes before the optimizer state exists (on CUDA a probe's state is read
    # after its step, so there the known bytes keep it).
    expected = predicted.predicted - predicted.known["optimizer_state"]
    assert whole - part > 0.10 * whole  # the known bytes matter: leaving them out would miss by more than 10%
    assert abs(expected / whole - 1) <= 0.05, (part, whole, predicted)
    assert predicted.known["activations"] == 2 * 4096 * 128 * 4  # two more layer inputs kept (fp32)


def test_a_probe_that_peaks_elsewhere_than_the_whole_model_is_refused(tmp_path: Path) -> None:
    """Rows of 16 tokens without checkpointing: the optimizer step (every gradient, the update's temporaries) is the
    4-layer model's peak but not a 1-layer model's, whose measurement would then say nothing of the whole's."""
    cfg = deep_tiny(tmp_path, 4, "--data.max_seq_len=16", "--train.batch_size=1",
                    "--train.gradient_checkpointing=false")
    assert probe_depth(cfg, "cpu") == 3
    with pytest.raises(ConfigError, match=r"^a probe of 1 of 4 layers peaks at layer_backward, the whole model at "
                                          r"optimizer_step: its measurement says nothing of the whole's; probe 3 "
                                          r"layers$"):
        full_depth(cfg, 1, 10**6, "cpu")


def test_the_missing_layers_are_those_of_l_less_k(tmp_path: Path) -> None:
    """6 layers probed at 2 (4 missing, where the test above's 4 at 2 cannot tell L - k from k): the prediction adds
    four layers' known bytes to what was measured, four times what one missing layer adds (each layer alike: its
    input kept, fp32 at 4096 x 128, its weights, adapters and their state), and from the estimate of the probe it
    gives the estimate of the whole."""
    cfg = deep_tiny(tmp_path, 6, *LONG)
    measured = 10**8  # any figure: the known bytes are added to it
    four, one = full_depth(cfg, 2, measured, "cpu"), full_depth(cfg, 5, measured, "cpu")
    assert (four.layers, four.depth) == (6, 2)
    assert four.known["activations"] == 4 * 4096 * 128 * 4 and one.known["activations"] == 4096 * 128 * 4
    assert four.predicted - measured == 4 * (one.predicted - measured) > 4 * 4096 * 128 * 4
    arch = load_arch(cfg)
    probe = full_depth(cfg, 2, depth_estimate(cfg, arch, 2, "cpu").peak_bytes, "cpu")
    assert probe.predicted == estimate(cfg, arch, "qlora", "cpu").peak_bytes


def test_the_probe_depth_keeps_the_models_checkpoint_groups_and_its_per_layer_lists(tmp_path: Path) -> None:
    """With train.checkpoint_every=3 of 12 layers the probe is 3 layers, one whole group (2 would split it); a model
    of 2 layers has no shorter probe than itself; a cut config.json keeps one entry of layer_types a layer."""
    grouped = deep_tiny(tmp_path, 12, "--data.max_seq_len=256", "--train.batch_size=1", "--train.checkpoint_every=3")
    assert probe_depth(grouped, "cpu") == 3
    assert probe_depth(deep_tiny(tmp_path, 2, "--data.max_seq_len=256", "--train.batch_size=1"), "cpu") == 2
    typed = deep_tiny(tmp_path, 4)
    path = Path(typed.model.config_json)
    path.write_text(path.read_text().replace('"num_hidden_layers": 4', '"layer_types": ["full_attention", '
                                             '"sliding_attention", "sliding_attention", "sliding_attention"], '
                                             '"num_hidden_layers": 4'))
    cut = truncated_config(typed, 2, tmp_path / "cut")
    written = json.loads(Path(cut.model.config_json).read_text())  # the first two layers' entries, in order
    assert written["num_hidden_layers"] == 2 and written["layer_types"] == ["full_attention", "sliding_attention"]


def test_the_probe_depth_steps_by_whole_checkpoint_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups of 3 of 12 layers, where the estimator says 3 layers peak elsewhere than the whole model and 4 or more
    at the same moment: the probe is 6 layers, two whole groups; 4 would cut its second group after one layer."""
    import qlora.memory.depth as depth

    monkeypatch.setattr(depth, "estimate", lambda *a, **k: SimpleNamespace(peak_phase="layer_backward"))
    monkeypatch.setattr(depth, "depth_estimate", lambda cfg, arch, layers, device: SimpleNamespace(
        peak_phase="layer_backward" if layers >= 4 else "optimizer_step"))
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), ["--train.checkpoint_every=3"])
    assert probe_depth(cfg, "cpu", SimpleNamespace(layers=12)) == 6
