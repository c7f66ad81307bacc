"""The input embedding table in CPU memory (model.embeddings_on_cpu): `CPUEmbedding` looks tokens up there and sends
only their vectors to the device, vocab x hidden x 2 bytes of device memory saved (1.0 GiB for Llama-3.1-8B, 2.1 GiB
for 70B) for one batch x seq x hidden copy per step.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora.errors import ConfigError
from qlora.levers.lever import RunConfig


class CPUEmbedding(nn.Module):
    """An embedding table that stays in CPU memory: look up there, send the vectors to `device`.

    The table is a plain attribute, not a parameter or buffer, so `model.to(device)` leaves it where it is and
    `model.device` still names the accelerator. It is frozen: only LoRA or quantised-base methods may use it.
    """

    def __init__(self, embedding: nn.Embedding, device: torch.device) -> None:
        super().__init__()
        self.table = embedding.weight.detach().to("cpu")
        # Gemma's scaled embeddings (transformers' *ScaledWordEmbedding) multiply each row by embed_scale, sqrt(hidden),
        # in their forward: a plain lookup would drop it.
        scale = getattr(embedding, "embed_scale", None)
        self.scale = None if scale is None else torch.as_tensor(scale).detach().to("cpu", self.table.dtype)
        self.padding_idx = embedding.padding_idx
        self.device = device
        self.num_embeddings, self.embedding_dim = self.table.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        vectors = nn.functional.embedding(input_ids.to("cpu"), self.table, self.padding_idx)
        if self.scale is not None:
            vectors = vectors * self.scale
        if self.device.type == "cuda":
            vectors = vectors.pin_memory()  # lets the copy below run asynchronously
        return vectors.to(self.device, non_blocking=True)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table on cpu, output on {self.device}"


def embeddings_to_cpu(model: nn.Module, device: torch.device) -> int:
    """Move the input embedding table to CPU memory (model.embeddings_on_cpu); return the accelerator bytes freed
    (none where the table already lived in CPU memory)."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise ConfigError(f"model.embeddings_on_cpu expects an nn.Embedding, found {type(embedding).__name__}")
    if type(embedding).forward is not nn.Embedding.forward and not hasattr(embedding, "embed_scale"):
        raise ConfigError(f"model.embeddings_on_cpu looks rows up in a plain table, but this model's "
                          f"{type(embedding).__name__} computes more in its forward: "
                          "set --model.embeddings_on_cpu=false")
    output = model.get_output_embeddings()
    if output is not None and output.weight is embedding.weight:
        raise ConfigError("model.embeddings_on_cpu: this model ties lm_head to the input embeddings, so the table "
                         "must stay on the device for the head: set --model.embeddings_on_cpu=false")
    # By type: the trainer names the device `cuda`, the table's tensor says `cuda:0`.
    freed = embedding.weight.numel() * embedding.weight.element_size() if embedding.weight.is_cuda else 0
    model.set_input_embeddings(CPUEmbedding(embedding, device))
    del embedding, output  # the last references to the old table: the cache can only hand back unreferenced memory
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the table's device memory back, so reserved memory shows the saving
    return freed


def apply(model: nn.Module, cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> None:
    """The trainer's hook as the base loads (quant.method=full is refused by its rules)."""
    if cfg.model.embeddings_on_cpu:
        freed = embeddings_to_cpu(model, device)
        print(f"model.embeddings_on_cpu: input embeddings in CPU memory, {freed / 2**20:,.1f} MiB of {device} freed")
