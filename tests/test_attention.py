"""SDPA as the trainer runs it (qlora/base/attention.py, sliding_window.py): packed rows by document, a sliding window
block by block, against transformers' own paths; and its CUDA kernel: which one torch runs, holding it to
model.sdpa_backend, and what the estimate counts for each. The card is a stand-in here (monkeypatched capability and
cuDNN version): CI has no GPU, and torch's rule is read off its source (sdp_utils.cpp, check_prefer_cudnn_attention)."""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import pytest
import torch
from support import architecture

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


def windowed_case(window: int, rows: list[list[int]], heads: int, kv: int) -> tuple:
    """Random q, k, v (fp32, (b, heads, T, hd) as the projections' views give them) for rows of these documents, their
    position ids, and a stand-in for the attention module."""
    generator, b, t, d = torch.Generator().manual_seed(0), len(rows), sum(rows[0]), 32
    q, k, v = (torch.randn(b, t, n, d, generator=generator).transpose(1, 2).requires_grad_() for n in (heads, kv, kv))
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv, True
    return q, k, v, positions, module


@pytest.mark.parametrize("grouped", [True, False], ids=["enable_gqa", "K and V repeated (CUDA before pytorch#191085)"])
@pytest.mark.parametrize(("window", "rows", "heads", "kv"), [
    (16, [[700]], 4, 2),  # a plain row, the window dividing it in no block: 3 blocks of 256 queries, the last short
    (100, [[300, 20, 380], [700]], 4, 2),  # packed, documents longer and shorter than the window; batch 2
    (300, [[1000], [250, 750]], 6, 2),  # a window that does not divide T (blocks of 320), GQA 3:1
    (256, [[1024], [1024]], 4, 4),  # one that does (blocks of 256), no grouping
    (512, [[2000]], 8, 1),  # one K and V head for eight
    (33, [[600]], 4, 2),  # W - 1 a multiple of 8 (R = W - 1): the mask's first key column is in the window
], ids=["plain row", "packed, batch 2", "window not dividing T", "window dividing T", "MQA", "reach of W - 1 exactly"])
def test_a_window_attends_block_by_block_as_the_dense_mask_does(window: int, rows: list[list[int]], heads: int,
                                                                 kv: int, grouped: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's SDPA within a sliding window (qlora/base/sliding_window.py) against transformers' own: its dense
    mask (create_sliding_window_causal_mask, packing included) through the stock sdpa path, and eager attention. Output
    and q, k and v gradients within 2e-5 in fp32 (the blocks sum in another order: 6e-6 apart at most, measured);
    attending past the window, or across documents, is off by O(1). What SDPA saves is the blocks' outputs and
    logsumexp and the one block mask: no T x T tensor."""
    from transformers import AutoConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_sliding_window_causal_mask
    from transformers.models.mistral.modeling_mistral import eager_attention_forward

    from qlora.base import sliding_window

    if not grouped:
        monkeypatch.setattr(sliding_window, "grouped", lambda *args: False)
    q, k, v, positions, module = windowed_case(window, rows, heads, kv)
    b, t, scale = len(rows), positions.shape[1], 0.1  # not SDPA's default of 1/sqrt(hd): Gemma 3's is its own
    weights = torch.randn(b, t, heads, 32, generator=torch.Generator().manual_seed(1))
    config = AutoConfig.for_model("mistral", sliding_window=window)
    # transformers 5.17 (the GPU image's) names the cache past_key_values, 5.25 cache (the old name deprecated)
    no_cache = {"cache" if "cache" in inspect.signature(create_sliding_window_causal_mask).parameters
                else "past_key_values": None}
    results, saved = {}, []
    for name in ("blocks", "sdpa", "eager"):
        for x in (q, k, v):
            x.grad = None
        if name == "blocks":
            with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
                out, _ = attention.sdpa_by_document(module, q, k, v, None, scaling=scale, position_ids=positions,
                                                    sliding_window=window)
        else:
            config._attn_implementation = name
            mask = create_sliding_window_causal_mask(config=config, inputs_embeds=torch.zeros(b, t, 8),
                                                     attention_mask=None, position_ids=positions, **no_cache)
            forward = sdpa_attention_forward if name == "sdpa" else eager_attention_forward
            out, _ = forward(module, q, k, v, mask, scaling=scale, dropout=0.0)
        (out * weights).sum().backward()
        results[name] = (out.detach(), q.grad, k.grad, v.grad)
    for name in ("sdpa", "eager"):
        for what, ours, theirs in zip(("output", "dq", "dk", "dv"), results["blocks"], results[name], strict=True):
            torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5,
                                       msg=lambda m, n=name, w=what: f"{n} {w}: {m}")
    inputs = {x.untyped_storage().data_ptr() for x in (q, k, v)}
    kept = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in saved
            if x.untyped_storage().data_ptr() not in inputs}
    mask = sliding_window.window_mask(window, torch.float32, torch.device("cpu"))
    if grouped:  # each block's output (T x heads x hd in all) and logsumexp, and the mask
        assert sum(kept.values()) <= 4 * b * t * heads * (32 + 1) + mask.untyped_storage().nbytes(), kept
    assert max(kept.values()) < b * t * t, kept



@pytest.mark.parametrize("window", [16, 100, 255, 256, 300, 4095, 4096])
def test_a_windows_blocks_are_cut_where_the_cuda_kernel_takes_its_mask(window: int) -> None:
    """On the CPU any cut attends as the dense mask does (the test above); on CUDA the memory-efficient kernel takes a
    mask whose rows, and the start of each block's slice of it, are a multiple of 8: the R keys before a block are
    W - 1 rounded up to 8 (no fewer, or a query loses the first of its window), a block of B queries is at least the
    window and MIN_BLOCK, rounded to 64, and each query sees the W keys that end at it, no more."""
    from qlora.base import sliding_window

    block, before = sliding_window.block_size(window), sliding_window.reach(window)
    assert before % 8 == 0 and window - 1 <= before < window + 7
    assert block % 64 == 0 and max(window, sliding_window.MIN_BLOCK) <= block < max(window, 256) + 64
    mask = sliding_window.window_mask(window, torch.float32, torch.device("cpu"))
    assert mask.shape == (block, before + block)
    seen = mask == 0
    assert (seen.sum(1) == window).all()
    assert seen[0, before] and not seen[0, before + 1] and seen[-1, -1]



@pytest.mark.parametrize("window", [None, 100], ids=["by document", "by block"])
def test_attention_dropout_is_drawn_by_document_and_by_block(window: int | None) -> None:
    """A config's attention_dropout reaches every document's and block's SDPA in training (dropping it survived every
    test: the tiny recipe's is 0): outputs differ from the undropped ones, alike for a seed, apart for another."""
    q, k, v, positions, module = windowed_case(window or 1000, [[300, 20, 380], [700]], 4, 2)

    def attend(dropout: float, seed: int = 0) -> torch.Tensor:
        torch.manual_seed(seed)
        return attention.sdpa_by_document(module, q, k, v, None, dropout=dropout, position_ids=positions,
                                          sliding_window=window)[0]

    plain, dropped = attend(0.0), attend(0.5)
    # row 1, one document of 700 tokens: attended whole (by document) or in blocks (by block), never causally alone
    assert not torch.allclose(dropped[1], plain[1], atol=0.1) and torch.equal(dropped, attend(0.5))
    assert not torch.equal(dropped, attend(0.5, seed=1))


def test_one_rows_position_ids_serve_every_row_of_the_batch() -> None:
    """transformers may hand one row of position ids (1, T) for a batch: its documents are every row's, as
    transformers reads them; without that they were read as none, and each row attended across its documents."""
    q, k, v, positions, module = windowed_case(1000, [[300, 400], [300, 400]], 4, 2)
    shared, _ = attention.sdpa_by_document(module, q, k, v, None, position_ids=positions[:1])
    each, _ = attention.sdpa_by_document(module, q, k, v, None, position_ids=positions)
    torch.testing.assert_close(shared, each, rtol=0, atol=0)
    whole, _ = attention.sdpa_by_document(module, q, k, v, None, position_ids=torch.arange(700)[None])
    assert not torch.allclose(whole[:, 300:], each[:, 300:], atol=1e-3)


def test_a_window_is_left_to_the_blocks_only_for_a_whole_row_without_a_cache() -> None:
    """The blocks take the keys to be the queries, from position 0: a KV cache's keys beyond the queries (generate), or
    a cache that dropped those before the window, keep transformers' mask, as do an added pattern and a model type
    whose layers do not pass their window on."""
    from transformers import AutoConfig

    from qlora.base.sliding_window import left_to_blocks

    row = dict(config=AutoConfig.for_model("mistral", sliding_window=16), q_length=64, kv_length=64, q_offset=0,
               kv_offset=0)
    assert left_to_blocks(row)
    for other in (dict(q_length=1, kv_length=65), dict(kv_offset=48), dict(q_offset=64), dict(use_vmap=True),
                  dict(allow_is_bidirectional_skip=True), dict(config=AutoConfig.for_model("llama"))):
        assert not left_to_blocks({**row, **other}), other


@pytest.mark.parametrize(("config", "window"), [
    (dict(model_type="mistral", sliding_window=16), 16),
    (dict(model_type="gemma3_text", sliding_window=16, num_hidden_layers=2,
          layer_types=["sliding_attention", "full_attention"]), 16),
    (dict(model_type="gemma3_text", sliding_window=16, num_hidden_layers=2, layer_types=["full_attention"] * 2),
     None),  # no sliding layer
    (dict(model_type="mistral", sliding_window=None), None),
    (dict(model_type="llama"), None),  # not a type whose layers pass the window on
])
def test_the_window_the_blocks_take_is_a_sliding_layers_own(config: dict, window: int | None) -> None:
    from transformers import AutoConfig

    from qlora.base.sliding_window import configured_window

    assert configured_window(AutoConfig.for_model(**config)) == window


# Each windowed model type, tiny and random, with a window of 16 (Gemma 3 and Qwen's on one layer of two).
WINDOWED = {"mistral": dict(sliding_window=16), "phi3": dict(sliding_window=16),
            "gemma3_text": dict(sliding_window=16, head_dim=16, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "full_attention"]),
            "qwen2": dict(sliding_window=16, use_sliding_window=True, max_window_layers=1),
            "qwen3": dict(sliding_window=16, use_sliding_window=True, max_window_layers=1)}


@pytest.mark.parametrize("model_type", list(WINDOWED))
def test_windowed_layers_build_no_dense_mask_unless_a_row_is_padded(model_type: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of 300 tokens (two blocks) past a window of 16, as made, packed and padded (without a KV cache, as the
    trainer runs them: with one transformers reads no packing), and greedy generation (a KV cache): logits within 1e-4
    of transformers' eager attention, the same tokens generated. transformers' dense mask (sdpa_mask) is built for the
    padded rows and at most the cached decoding steps: a model type the blocks were not checked on (BY_BLOCKS) keeps
    it."""
    import transformers.masking_utils as masking
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.base import sliding_window

    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                  max_position_embeddings=1024, pad_token_id=0, use_cache=False,
                                  **WINDOWED[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention.implementation("sdpa")).eval()
    assert sliding_window.configured_window(model.config) == 16
    ids = torch.randint(3, 100, (2, 300), generator=torch.Generator().manual_seed(0))
    padded = torch.ones_like(ids)
    padded[1, 290:] = 0
    packed = torch.cat([torch.arange(270), torch.arange(30)]).expand(2, 300)
    cases = {"as made": dict(input_ids=ids), "packed": dict(input_ids=ids, position_ids=packed),
             "padded": dict(input_ids=ids, attention_mask=padded)}
    built = []
    sdpa_mask = masking.sdpa_mask
    monkeypatch.setattr(masking, "sdpa_mask", lambda *a, **k: built.append(k["q_length"]) or sdpa_mask(*a, **k))
    with torch.no_grad():
        ours = {}
        for name, case in cases.items():
            built.clear()
            ours[name] = model(**case).logits
            assert bool(built) == (name == "padded"), (name, built)
        built.clear()
        generated = model.generate(ids[:1, :40], max_new_tokens=5, do_sample=False, use_cache=True)
        assert set(built) <= {1}, built  # the prompt by blocks; a cached step the stock way
        monkeypatch.setattr(sliding_window, "BY_BLOCKS", ())
        built.clear()
        model(**cases["as made"])
        assert built, "a model type not in BY_BLOCKS builds the dense mask"
        model.set_attn_implementation("eager")
        eager = {name: model(**case).logits for name, case in cases.items()}
        assert torch.equal(generated, model.generate(ids[:1, :40], max_new_tokens=5, do_sample=False, use_cache=True))
    for name, case in cases.items():
        real = case.get("attention_mask", torch.ones_like(ids)).bool()
        torch.testing.assert_close(ours[name][real], eager[name][real], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("pack", [False, True])
def test_tiny_mistral_trains_by_blocks_as_with_the_dense_mask(tiny_config: Config, pack: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny recipe on tiny-mistral (window 16, rows of ~45-60 tokens; packed, rows of 256 holding several), 4
    steps: the losses by blocks within 1e-5 (relative) of those with transformers' dense mask and stock path, which the
    trainer ran before (sliding_window.left_to_blocks refused)."""
    from qlora.train import train

    losses = []
    for dense in (False, True):
        cfg = apply_overrides(copy.deepcopy(tiny_config), [
            *architecture("tiny-mistral"), f"--data.pack={pack}", "--data.max_seq_len=256",
            f"--output.dir={tiny_config.output.dir}-{dense}"])
        if dense:
            monkeypatch.setattr(attention, "left_to_blocks", lambda kwargs: False)
        train(cfg)
        lines = [json.loads(line) for line in Path(cfg.output.dir, "metrics.jsonl").read_text().splitlines()]
        losses.append([line["loss"] for line in lines if "loss" in line])
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5), losses


@pytest.mark.parametrize(("build", "kernel"), [
    ("tiny-mistral", "the memory-efficient kernel (a sliding window shorter than the rows, in blocks with a mask; not "
                     "measured on a GPU)"),
    ("tiny-qwen2", "FlashAttention-2 (torch picks it on this card)")])  # no use_sliding_window: no window
def test_the_start_up_line_names_the_kernel_a_window_runs(tiny_config: Config, build: str, kernel: str,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """On a CUDA device (a stand-in here: the line is printed before anything runs) the blocks of a window shorter
    than the rows carry a mask, which FlashAttention-2 does not take: the memory-efficient kernel runs them (cuDNN's
    is kept off, as for documents), whatever torch would pick for the whole row."""
    from qlora.training.assemble import prepare, print_summary

    run = prepare(apply_overrides(tiny_config, [*architecture(build), "--train.device=cpu"]))
    monkeypatch.setattr(attention, "visible_capability", lambda: (8, 9))  # a card that runs FlashAttention-2
    print_summary(tiny_config, {**run, "device": torch.device("cuda")})
    assert f"attention: SDPA through {kernel}\n" in capsys.readouterr().out
    assert attention.cuda_kernel(apply_overrides(tiny_config, ["--model.sdpa_backend=cudnn"]), masked=True) == \
        "efficient"
