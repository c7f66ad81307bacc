"""The small CPU snapshot tests/test_snapshot.py reads, in the CUDA allocator's format (qlora/report/recorder.py):
two training steps in bf16 of a narrow Llama (tests/snapshots/narrow-llama.json: 2 layers, hidden 256, MLP 896 = 3.5
hidden and 4:1 grouped-query attention, as Llama-3's; widths whose products do not coincide, so that a block's size
names one thing), 512 tokens with the 70B recipe's levers (tiles of 128 tokens on the MLP and projections, LoRA dropout,
the loss in chunks), and one block no term of the estimator explains: a forward hook keeps `stray_buffer`'s tensor
alive to the end, so that the test can tell an attribution that names everything from one that names nothing
unknown. Regenerate (after a change to the recorder, the model's code or the steps) from the repository root:

    python tests/snapshot_fixture.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "snapshots" / "narrow-bf16-512.pickle.gz"
TOKENS = 512
OVERRIDES = ["--model.synthetic=true", "--model.config_json=tests/snapshots/narrow-llama.json",
             "--quant.compute_dtype=bf16", f"--data.max_seq_len={TOKENS}", "--train.batch_size=1",
             "--lora.dropout=0.1", "--train.tile_size=128", "--train.tile_projections=true",
             "--train.loss_chunk_size=128"]
STRAY_BYTES = 3 * TOKENS * 256 * 2  # three of the layer's hidden states (T h e), allocated where no term looks
KEPT: list = []


def stray_buffer(module: object, args: tuple, output: object) -> None:
    import torch

    if not KEPT:
        KEPT.append(torch.empty(STRAY_BYTES, dtype=torch.uint8).fill_(1))


def config():  # noqa: ANN201 (Config)
    """The recorded run's recipe: synthetic weights, so that every tensor is made by an op the recorder sees."""
    from qlora.config import apply_overrides, load_recipe

    return apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), OVERRIDES)


def record(steps: int = 2) -> tuple[dict, int]:
    """The fixture's recording: `steps` training steps with the stray block; (snapshot, the recorder's peak)."""
    import transformers

    from qlora.report.recorder import record_steps, site_roots

    original = transformers.models.llama.modeling_llama.LlamaDecoderLayer.__init__

    def with_hook(self, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        if self.self_attn.layer_idx == 1:
            self.register_forward_hook(stray_buffer)

    transformers.models.llama.modeling_llama.LlamaDecoderLayer.__init__ = with_hook
    try:
        return record_steps(config(), steps, (str(ROOT), *site_roots()))
    finally:
        transformers.models.llama.modeling_llama.LlamaDecoderLayer.__init__ = original
        KEPT.clear()


if __name__ == "__main__":
    from qlora.report.recorder import write_snapshot

    snapshot, peak = record()
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    write_snapshot(snapshot, FIXTURE)
    print(f"{FIXTURE.relative_to(ROOT)}: {FIXTURE.stat().st_size:,} bytes, peak {peak:,} bytes allocated")
    sys.exit(0)
