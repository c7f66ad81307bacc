"""qlora.generate's decoding (qlora/generate.py) against a plain loop over the model's logits, on a real tiny run:
greedy is the argmax whatever the base's generation_config.json says, sampling is at the temperature asked for, and the
answer ends at the tokenizer's end-of-turn token, printed without it."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import pytest
import torch
from support import adding_bos, finished_run

from qlora import generate as gen
from qlora.training.assemble import load_run

PROMPT = "reverse: dog moon red"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A finished 20-step run of the tiny recipe, loaded as qlora.generate loads it: (model, tokenizer, its dir)."""
    cfg, _ = finished_run("tiny.py", tmp_path_factory.mktemp("generate") / "run", steps=20, eval_every=0,
                          log_every=10)
    _, model, tokenizer, _ = load_run(Path(cfg.output.dir), "cpu")
    return model, tokenizer, Path(cfg.output.dir)


def argmax_loop(model: torch.nn.Module, tokenizer: object, n: int) -> str:
    """The greedy answer to PROMPT, one full forward per token, stopping after the end-of-turn token."""
    ids = tokenizer(gen.render(tokenizer, PROMPT), add_special_tokens=False, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            token = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
            if token == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_greedy_is_the_argmax_whatever_the_generation_config_asks(loaded) -> None:
    """A hub model's generation_config.json often asks for sampling (Llama-3.1-Instruct: do_sample, temperature 0.6):
    --temperature 0 must decode greedily anyway, and the answer holds --max-new-tokens tokens (none is an eos here)."""
    model, tokenizer, _ = loaded
    expected = argmax_loop(model, tokenizer, 5)
    assert len(tokenizer(expected, add_special_tokens=False)["input_ids"]) == 5
    saved = model.generation_config.do_sample, model.generation_config.temperature
    model.generation_config.do_sample, model.generation_config.temperature = True, 5.0
    try:
        for seed in range(3):
            torch.manual_seed(seed)
            assert gen.generate(model, tokenizer, PROMPT, max_new_tokens=5, stream=False) == expected
    finally:
        model.generation_config.do_sample, model.generation_config.temperature = saved


@pytest.mark.parametrize("fmt", ["messages", "text", "instruction"])
def test_the_prompt_begins_with_one_bos_as_the_rows_did(loaded, fmt: str) -> None:
    """Under a tokenizer that adds bos itself, as Llama 3's post-processor does, where the chat template writes it too:
    the ids the model is given are the rendered template's, one bos first, as in the rows it trained on
    (qlora.data.labels), not a second bos before the template's. Rendered without a template (text, instruction),
    the prompt begins with the tokenizer's bos, as those rows do (qlora.data.labels.missing_bos)."""
    model, tokenizer, _ = loaded
    adds_bos = adding_bos(tokenizer)
    rendered = gen.render(tokenizer, PROMPT, fmt)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert adds_bos(rendered)["input_ids"] == [tokenizer.bos_token_id, *ids]
    if fmt == "messages":
        assert ids[0] == tokenizer.bos_token_id != ids[1]
    else:
        assert tokenizer.bos_token_id not in ids
        ids = [tokenizer.bos_token_id, *ids]
    given = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: given.append(kwargs["input_ids"]), with_kwargs=True)
    try:
        gen.generate(model, adds_bos, PROMPT, max_new_tokens=1, stream=False, fmt=fmt)
    finally:
        hook.remove()
    assert given[0].tolist() == [ids]
    assert gen.prompt_ids(tokenizer, PROMPT, fmt) == (ids if fmt == "messages" else ids[1:])


def test_sampling_is_at_the_temperature_asked_for(loaded) -> None:
    """At --temperature 1e-4 sampling is the greedy answer, and at 10 it is not (the model's own default of 1 would
    make the first differ from greedy and the second too close to it to tell)."""
    model, tokenizer, _ = loaded
    expected = argmax_loop(model, tokenizer, 8)
    answers = {}
    for temperature in (1e-4, 10.0):
        answers[temperature] = set()
        for seed in range(4):
            torch.manual_seed(seed)
            answers[temperature].add(gen.generate(model, tokenizer, PROMPT, 8, temperature, stream=False))
    assert answers[1e-4] == {expected}
    assert expected not in answers[10.0] and len(answers[10.0]) == 4


@pytest.mark.parametrize("listed", [False, True], ids=["tokenizer's eos", "base's generation_config eos"])
def test_the_answer_ends_at_the_end_of_turn_token(loaded, capsys, listed: bool) -> None:
    """A model that says <|im_end|> as its third token: the answer is the two tokens before it, printed and returned
    without it, however many more --max-new-tokens allows. The same for a special token the base's
    generation_config.json lists as an eos beside the tokenizer's (Llama-3.1-Instruct's <|eom_id|>, Qwen2.5's
    <|endoftext|>): the answer went on past it to --max-new-tokens."""
    model, tokenizer, _ = loaded
    expected = argmax_loop(model, tokenizer, 2)
    end = tokenizer.bos_token_id if listed else tokenizer.eos_token_id
    assert end != tokenizer.eos_token_id or not listed
    calls = []

    def end_third(module: torch.nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
        calls.append(1)  # one forward per new token (the prompt's, then each with the KV cache)
        if len(calls) == 3:
            logits = logits.clone()
            logits[..., -1, end] = logits.max() + 100
        return logits

    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end] if listed else tokenizer.eos_token_id
    hook = model.get_output_embeddings().register_forward_hook(end_third)
    try:
        text = gen.generate(model, tokenizer, PROMPT, max_new_tokens=10)
    finally:
        hook.remove()
        model.generation_config.eos_token_id = saved
    assert len(calls) == 3 and text == expected and len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 2
    assert capsys.readouterr().out == expected + "\n"


def test_format_renders_the_prompt_given_and_each_stdin_line(loaded, capsys, monkeypatch) -> None:
    """--format=text: --prompt and every stdin line are completed as the text itself, not in the chat template the
    run's messages rows trained on (the answers differ)."""
    model, tokenizer, run = loaded
    as_text = gen.generate(model, tokenizer, PROMPT, 4, stream=False, fmt="text")
    assert as_text != gen.generate(model, tokenizer, PROMPT, 4, stream=False)
    assert gen.main([str(run), "--prompt", PROMPT, "--format=text", "--max-new-tokens=4"]) == 0
    assert capsys.readouterr().out == as_text + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    assert gen.main([str(run), "--format=text", "--max-new-tokens=4"]) == 0
    assert capsys.readouterr().out == as_text + "\n"


def test_the_bases_generation_config_adds_no_penalty_or_cut(loaded) -> None:
    """A base's generation_config.json (Qwen2.5-Instruct's repetition_penalty 1.05, top_p 0.8, top_k 20) was applied
    where qlora.generate sets nothing, and transformers' own top_k=50 too: the greedy answer must stay the argmax, and
    sampling draw from every token. The head is made to give every token all but the same logit (the end of turn's
    -inf), so that 200 tokens sampled at temperature 1 come from the whole vocabulary, not the 50 or 1 a top_k keeps."""
    model, tokenizer, _ = loaded
    expected = argmax_loop(model, tokenizer, 6)
    saved = model.generation_config
    model.generation_config = saved.__class__(repetition_penalty=1e4, no_repeat_ngram_size=1, top_k=1, top_p=0.01,
                                              num_beams=2, bad_words_ids=[[int(t)] for t in tokenizer(
                                                  expected, add_special_tokens=False)["input_ids"]])
    try:
        assert gen.generate(model, tokenizer, PROMPT, max_new_tokens=6, stream=False) == expected
        fed = []

        def flat(module: torch.nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
            logits = torch.linspace(0, -1, logits.shape[-1]).expand_as(logits).clone()  # distinct: no ties at a cut
            logits[..., tokenizer.eos_token_id] = -math.inf
            return logits

        hooks = [model.get_output_embeddings().register_forward_hook(flat),
                 model.get_input_embeddings().register_forward_pre_hook(lambda m, args: fed.append(args[0][0, -1]))]
        try:
            torch.manual_seed(0)
            gen.generate(model, tokenizer, PROMPT, max_new_tokens=200, temperature=1.0, stream=False)
        finally:
            for hook in hooks:
                hook.remove()
    finally:
        model.generation_config = saved
    drawn = {int(t) for t in fed[1:]}  # the tokens fed back after the prompt: each one sampled
    assert len(fed) == 200 and len(drawn) > 100, (len(fed), len(drawn), len(tokenizer))
