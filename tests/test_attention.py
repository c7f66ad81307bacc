"""SDPA's CUDA kernel (qlora/base/attention.py): which one torch runs, holding it to model.sdpa_backend, and what the
estimate counts for each. The card is a stand-in here (monkeypatched capability and cuDNN version): CI has no GPU,
and torch's rule is read off its source (sdp_utils.cpp, check_prefer_cudnn_attention)."""

from __future__ import annotations

import pytest
import torch

from qlora.base import attention
from qlora.config import Config, apply_overrides, load_recipe
from qlora.errors import ConfigError
from qlora.memory.arch import load_arch
from qlora.memory.estimate import estimate


def card(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], cudnn: int, cuda: str = "13.0") -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: cudnn)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.delenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", raising=False)


@pytest.mark.parametrize(("capability", "cudnn", "cuda", "first"), [
    ((9, 0), 91900, "13.0", True),   # H100/H200 with the GPU image's torch 2.11 (cuDNN 9.19)
    ((10, 0), 91600, "13.0", True),  # B200
    ((10, 3), 91900, "12.9", True),
    ((12, 0), 91900, "12.9", False),  # RTX 5090: flash
    ((8, 9), 91900, "13.0", False),  # RTX 4090, L40S: flash
    ((9, 0), 91500, "13.0", False),  # cuDNN 9.15.0 is not newer than 9.15.0
])
def test_cudnn_comes_first_where_torch_puts_it_first(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int],
                                                     cudnn: int, cuda: str, first: bool) -> None:
    card(monkeypatch, capability, cudnn, cuda)
    assert attention.cudnn_first(capability) is first
    monkeypatch.setenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", "1")
    assert not attention.cudnn_first(capability)


def llama8b(*overrides: str) -> Config:
    return apply_overrides(load_recipe("recipes/llama8b.py"), [
        "--data.max_seq_len=131072", "--train.plan=recipe", "--train.plan_batch=false", *overrides])


def test_the_estimate_counts_the_kernel_that_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """8B at 131,072 tokens, where SDPA's backward is the layer's peak: cuDNN's backward holds one dk and one dv at
    every query head fewer than FlashAttention-2's (2 q e a token). auto counts flash where no card is at hand (the
    upper bound), cuDNN on an H200 that this process uses or that nvidia-smi names."""
    arch = load_arch(llama8b())
    peak = {k: estimate(llama8b(f"--model.sdpa_backend={k}"), arch, "qlora", "cuda") for k in ("flash", "cudnn")}
    assert "SDPA backward" in peak["flash"].formulas["activations"]
    q, T = arch.heads * arch.head_dim, 131072
    assert peak["flash"].peak_bytes - peak["cudnn"].peak_bytes == 2 * q * 2 * T
    assert "FlashAttention-2's" in "; ".join(peak["flash"].assumptions)
    assert "cuDNN's" in "; ".join(peak["cudnn"].assumptions)
    auto = llama8b()
    monkeypatch.setattr(attention, "visible_capability", lambda: None)  # no nvidia-smi, as in CI
    assert not torch.cuda.is_initialized() and estimate(auto, arch, "qlora", "cuda").peak_bytes == \
        peak["flash"].peak_bytes
    card(monkeypatch, (9, 0), 91900)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert attention.cuda_kernel(auto) == "cudnn"
    assert estimate(auto, arch, "qlora", "cuda").peak_bytes == peak["cudnn"].peak_bytes
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # before CUDA is set up: nvidia-smi's cards
    monkeypatch.setattr(attention, "visible_capability", lambda: (8, 9))
    assert attention.cuda_kernel(auto) == "flash"
    monkeypatch.setattr(attention, "visible_capability", lambda: (9, 0))
    assert attention.cuda_kernel(auto) == "cudnn"


def test_nvidia_smi_is_read_for_one_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import types

    def smi(out: str) -> None:
        attention.visible_capability.cache_clear()
        monkeypatch.setattr(subprocess, "run", lambda *a, **k: types.SimpleNamespace(stdout=out))

    try:
        smi("9.0\n9.0\n")
        assert attention.visible_capability() == (9, 0)
        smi("9.0\n8.9\n")  # cards that differ: no one answer
        assert attention.visible_capability() is None
        smi("No devices were found\n")
        assert attention.visible_capability() is None
    finally:
        attention.visible_capability.cache_clear()


def test_the_kernel_asked_for_is_held_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    card(monkeypatch, (8, 9), 91900)
    with pytest.raises(ConfigError, match=r"model.sdpa_backend=cudnn: torch runs cuDNN's attention first only on "
                                          r"sm90/sm100 cards .* \(this is sm89 with cuDNN 91900.*use "
                                          r"--model.sdpa_backend=auto or flash"):
        attention.use_kernel(llama8b("--model.sdpa_backend=cudnn"), cuda)
    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        attention.use_kernel(llama8b("--model.sdpa_backend=flash"), torch.device("cpu"))  # a CPU run: nothing
        assert torch.backends.cuda.cudnn_sdp_enabled() == was
        attention.use_kernel(llama8b("--model.sdpa_backend=flash"), cuda)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def test_packed_documents_run_through_flash_and_are_counted_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN's attention would build a graph for every new document length: the documents of a packed row run with
    cuDNN's kernel switched off, and the estimate counts FlashAttention-2's buffers for them whatever the setting."""
    arch = load_arch(llama8b())
    packed = [estimate(llama8b("--data.pack=true", f"--model.sdpa_backend={k}"), arch, "qlora", "cuda").peak_bytes
              for k in ("flash", "cudnn")]
    assert packed[0] == packed[1]
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
    module = torch.nn.Module()
    out, _ = attention.sdpa_by_document(module, q, k, k, None, position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4,
                                                                                            5, 6]]))
    assert seen == [False, False] and out.shape == (1, 12, 4, 8)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # as it was, after


def test_documents_are_read_off_the_position_ids() -> None:
    """A new document wherever the position does not grow by one, as transformers reads packed rows; None when no row
    holds two."""
    rows = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8], [4, 5, 6, 0, 1, 2, 3, 0, 0]])
    assert attention.document_lengths(rows) == [[3, 2, 4], [9], [3, 4, 1, 1]]
    assert attention.document_lengths(torch.arange(6).expand(2, 6).clone()) is None
    assert attention.document_lengths(None) is None


def test_the_max_context_table_counts_flash_for_every_card_size_whatever_card_is_here(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--max-context --gpu-gib 24,48,80` asks about cards of those sizes, not this machine's: on an H200 it must not
    count cuDNN's smaller buffers for a 24 GB card (an RTX 4090 runs FlashAttention-2). A recipe's explicit kernel
    stands."""
    from qlora.memory.context import context_report

    card(monkeypatch, (9, 0), 91900)
    monkeypatch.setattr(attention, "visible_capability", lambda: (9, 0))
    cfg = llama8b()
    assert attention.cuda_kernel(cfg) == "cudnn"
    here = context_report(cfg, [24.0], 128.0)
    flash = context_report(llama8b("--model.sdpa_backend=flash"), [24.0], 128.0)
    cudnn = context_report(llama8b("--model.sdpa_backend=cudnn"), [24.0], 128.0)
    assert here["rows"][0]["tokens"] == flash["rows"][0]["tokens"] < cudnn["rows"][0]["tokens"]
    assert any("FlashAttention-2, which the 24 and 48 GB cards run" in a for a in here["assumptions"])
    assert cfg.model.sdpa_backend == "auto"  # the recipe's config is not changed under it


def test_right_padded_rows_are_given_no_mask(tiny_config: Config, batch: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of other lengths, unpacked, came with a 2D mask holding their padding, and transformers built a batch x T x
    T mask for every forward (the estimate counts none; on CUDA it keeps SDPA off FlashAttention-2). Under causal
    attention no real token sees the right padding after it: each row's hidden states are the row's alone."""
    import transformers.masking_utils as masking

    from qlora.base.load import load_base
    from qlora.training.loss import target_hidden

    model, _, _ = load_base(tiny_config, torch.device("cpu"))
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # rows of other lengths: padding in the batch
    built = []
    sdpa_mask = masking.sdpa_mask
    monkeypatch.setattr(masking, "sdpa_mask", lambda *a, **k: built.append(1) or sdpa_mask(*a, **k))
    with torch.no_grad():
        hidden, _, rows = target_hidden(model, batch)
        assert not built
        alone = [target_hidden(model, {k: v[i:i + 1, :n] for k, v in batch.items()})[0]
                 for i, n in enumerate(lengths.tolist())]
    torch.testing.assert_close(hidden, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert rows.unique().tolist() == list(range(len(lengths)))
