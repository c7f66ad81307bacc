"""`python -m qlora.generate RUN_DIR [--prompt TEXT]`: talk to a trained adapter on its 4-bit base, unmerged.

The model is exactly the one training evaluated (base as it trained, adapters beside it), so what it says is what the
run learned, before any merge or export. Tokens are printed as they are generated, alone on stdout (what loading
says goes to stderr, so `> out.txt` holds the text). Each prompt is rendered as the prompt part of the rows the run
trained on (`--format` chooses another): a user turn in the chat template (messages), the Alpaca prompt (instruction),
or as it is (text), as qlora.data.labels tokenises them. Without --prompt, every line read from stdin is a prompt,
until end of input; with --jsonl each line is a JSON string or an object with a "prompt" field, so a prompt can hold
newlines (`{"prompt": "Tom flies to Rome.\\nDestination city?"}`).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import math
import os
import sys
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, TextStreamer

from qlora.base.build import ensure_checkpoint, looks_like_hub_id
from qlora.base.load import load_tokenizer
from qlora.cli import require_stdout, run
from qlora.commands import generate_parser
from qlora.config import Config, DataConfig
from qlora.console import quiet_libraries
from qlora.data.files import read_rows
from qlora.data.labels import ALPACA_PROMPT, detect_format, missing_bos, render_chat
from qlora.errors import ConfigError, json_trouble
from qlora.training.assemble import load_run, read_run_config

# Below this, sampling is greedy decoding in all but name, and far below it the logits divided by the temperature
# overflow float32, so sampling fails on infinities (1e-320 did).
MIN_TEMPERATURE = 1e-4
# Above this, logits a model spreads over ~30 nats differ by e^3 at most, so every token of the vocabulary is all but
# equally likely: the text is noise (1e300 printed bytes at random, and past float32's 3.4e38 the logits divided by
# it are 0, or nan where -inf).
MAX_TEMPERATURE = 10.0


def render(tokenizer: PreTrainedTokenizerBase, prompt: str, fmt: str = "messages") -> str:
    """The prompt as rows of data format `fmt` hold it before what is learned: a user turn plus the assistant header
    (where the tokenizer has a chat template), the Alpaca prompt, or the text as it is."""
    if fmt == "instruction":
        return ALPACA_PROMPT.format(instruction=prompt)
    if fmt == "messages" and tokenizer.chat_template:
        return render_chat(tokenizer, [{"role": "user", "content": prompt}], f"prompt {prompt[:40]!r}",
                           add_generation_prompt=True)
    return prompt


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, fmt: str = "messages") -> list[int]:
    """The prompt's token ids as the rows of data format `fmt` begin, tokenised as qlora.data.labels does: a chat
    template holds every special token itself (add_special_tokens=False: no second bos before its own); the other
    formats begin as the tokenizer begins a text (missing_bos)."""
    text = render(tokenizer, prompt, fmt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if fmt == "messages" and tokenizer.chat_template else missing_bos(tokenizer, ids) + ids


def trained_format(data: DataConfig) -> str:
    """The data format the run trained on: data.format, or where it is auto the one training found in data.train's
    rows (a run on instruction rows was prompted in the chat template, which it never trained on). `messages`, said,
    where the file cannot be read any more."""
    if data.format != "auto":
        return data.format
    try:
        return detect_format(read_rows(data.train, "data.train"), data.train)
    except ConfigError as err:
        print(f"the run's data format is unknown ({err}): each prompt is rendered as a chat turn; --format chooses")
        return "messages"


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 256,
             temperature: float = 0.0, stream: bool = True, where: str = "--prompt", fmt: str = "messages") -> str:
    """Complete one prompt, rendered as rows of data format `fmt` (greedy when temperature is 0); print tokens as
    they come when `stream`; return the text. A prompt that leaves no room for `max_new_tokens` in the model's
    context is refused, naming `where`."""
    ids = prompt_ids(tokenizer, prompt, fmt)
    check_context(getattr(model.config, "max_position_embeddings", None), max_new_tokens, len(ids), where, fmt)
    inputs = {"input_ids": torch.tensor([ids], device=model.device)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    # Sampling at the temperature alone: transformers adds its top_k=50 where no value is set.
    sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, use_cache=True,
                              eos_token_id=stop_tokens(tokenizer, model.generation_config),
                              pad_token_id=tokenizer.pad_token_id, **sampling)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    # What transformers' generate leaves unset it takes from the base's generation_config.json first: a repetition
    # penalty, top_p, top_k or beams a hub model ships there (Qwen2.5-Instruct's repetition_penalty 1.05, top_p 0.8,
    # top_k 20) changed the greedy answer, and the sampling one, without a word. The base's is set aside meanwhile.
    base, model.generation_config = model.generation_config, GenerationConfig()
    try:
        out = model.generate(**inputs, generation_config=config, streamer=streamer)
    finally:
        model.generation_config = base
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def stop_tokens(tokenizer: PreTrainedTokenizerBase, base: GenerationConfig) -> list[int]:
    """The tokens an answer ends at: the tokenizer's eos (the one training appended to each answer), then those the
    base's generation_config.json lists. Llama-3.1-Instruct lists <|end_of_text|>, <|eom_id|> and <|eot_id|>, and
    Qwen2.5-Instruct <|im_end|> and <|endoftext|>: a model that ends with one the tokenizer does not name went on
    past its answer to --max-new-tokens."""
    listed = base.eos_token_id if isinstance(base.eos_token_id, list) else [base.eos_token_id]
    return list(dict.fromkeys(t for t in [tokenizer.eos_token_id, *listed] if t is not None))


def check_context(context: int | None, max_new_tokens: int, prompt_tokens: int | None = None,
                  where: str = "--prompt", fmt: str = "messages") -> None:
    """Refuse --max-new-tokens, or a prompt of `prompt_tokens` (named `where`, rendered as `fmt` rows) with them,
    beyond the model's `context` (None: unknown, nothing refused): positions past it take rotary tables the model
    never trained on."""
    if not context:
        return
    if max_new_tokens > context:
        raise ConfigError(f"--max-new-tokens={max_new_tokens} exceeds the model's context of {context} tokens "
                          f"(max_position_embeddings): use at most {context}")
    if prompt_tokens is not None and prompt_tokens + max_new_tokens > context:
        raise ConfigError(f"{where}: the prompt is {prompt_tokens} tokens (rendered as {fmt} rows), and with "
                          f"--max-new-tokens={max_new_tokens} it exceeds the model's context of {context} tokens "
                          f"(max_position_embeddings): shorten it to at most {context - max_new_tokens} tokens, or "
                          "lower --max-new-tokens")


def local_base(cfg: Config) -> Path | None:
    """The run's base as a directory on this machine, before it loads: its checkpoint (built first where the recipe
    builds it) or a hub id's copy in the local cache; None where there is none (synthetic weights, a hub id never
    downloaded here), and the loaded model is asked instead."""
    if cfg.model.synthetic:
        return None
    path = Path(ensure_checkpoint(cfg))
    if not (path / "config.json").is_file() and looks_like_hub_id(cfg.model.path):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.model.path, "config.json")  # reads the cache only, never the network
        path = Path(cached).parent if isinstance(cached, str) else path
    return path if (path / "config.json").is_file() else None


def check_before_loading(cfg: Config, max_new_tokens: int, prompt: str | None, fmt: str) -> None:
    """check_context from the base's own config.json and tokenizer, before the base loads (minutes for a 70B), where
    the base is on this machine (local_base). Its max_position_embeddings is what the loaded model's config holds."""
    base = local_base(cfg)
    try:
        config = json.loads((base / "config.json").read_text(encoding="utf-8")) if base else None
    except (OSError, UnicodeDecodeError, ValueError):
        return  # the load names what is wrong with it
    config = config.get("text_config", config) if isinstance(config, dict) else None
    context = config.get("max_position_embeddings") if isinstance(config, dict) else None
    if not isinstance(context, int) or isinstance(context, bool) or context <= 0:
        return
    check_context(context, max_new_tokens)
    if prompt is not None:
        tokenizer = load_tokenizer(str(base), cfg.model.trust_remote_code)
        check_context(context, max_new_tokens, len(prompt_ids(tokenizer, prompt, fmt)), "--prompt", fmt)


def read_prompt(line: str, jsonl: bool, number: int) -> str:
    """The prompt on one stdin line: the line itself, or with `jsonl` the JSON string (or "prompt" field) on it."""
    if not jsonl:
        return line.rstrip("\r\n")  # the line's end, Windows' too
    try:
        value = json.loads(line)
    # an integer of over 4,300 digits is a ValueError, arrays nested too deep a RecursionError: neither is a prompt
    except (ValueError, RecursionError) as err:
        why = err.msg if isinstance(err, json.JSONDecodeError) else json_trouble(err)  # one line: no line number
        raise ConfigError(f"stdin:{number}: not JSON ({why}): with --jsonl write each prompt as a JSON string, "
                          'e.g. "first line\\nsecond line"') from None
    value = value.get("prompt") if isinstance(value, dict) else value
    if not isinstance(value, str):
        raise ConfigError(f'stdin:{number}: with --jsonl a line is a JSON string or an object with a "prompt" '
                          "string")
    if not value.strip():  # as --prompt: blanks alone are no text to complete
        raise ConfigError(f"stdin:{number}: the prompt is empty: give the text to complete")
    return value


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: list[str]) -> int:
    parser = generate_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    if args.max_new_tokens <= 0:
        parser.error(f"--max-new-tokens={args.max_new_tokens} must be positive, e.g. 256")
    if not 0 <= args.temperature < math.inf:  # nan fails too
        parser.error(f"--temperature={args.temperature} must be a finite number >= 0 (0 decodes greedily)")
    if args.temperature > MAX_TEMPERATURE:
        parser.error(f"--temperature={args.temperature:g} is above {MAX_TEMPERATURE:g}, where every token is all but "
                     f"equally likely and the text is noise: use 0 to decode greedily, or {MIN_TEMPERATURE:g} to "
                     f"{MAX_TEMPERATURE:g} (1 samples the model as it is)")
    if 0 < args.temperature < MIN_TEMPERATURE:
        parser.error(f"--temperature={args.temperature} is below {MIN_TEMPERATURE}, where sampling is greedy decoding "
                     f"(and tinier values overflow float32): use 0 to decode greedily, or at least {MIN_TEMPERATURE}")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty: give the text to complete")
    if args.prompt is not None:
        args.prompt = argv_text(args.prompt)
        check_utf8(args.prompt, "--prompt")
    elif sys.stdin is None:  # started with stdin closed (`<&-`, a launcher's): Python leaves it None
        parser.error("no --prompt, and stdin is closed: give --prompt TEXT, or pipe prompts to stdin")
    require_stdout("the generated text")
    # stdout holds the generated text alone (`--prompt ... > out.txt`): what loading says goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        cfg = read_run_config(args.run_dir)
        fmt = args.format or trained_format(cfg.data)
        check_before_loading(cfg, args.max_new_tokens, args.prompt, fmt)
        _, model, tokenizer, _ = load_run(args.run_dir, args.device, cfg=cfg)
    check_context(getattr(model.config, "max_position_embeddings", None), args.max_new_tokens)  # a base not at hand
    if args.prompt is not None:
        generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, fmt=fmt)
        return 0
    utf8_stdin()
    interactive = sys.stdin.isatty()
    number = 0
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)  # as a shell's prompt: not part of the text
        number += 1
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError as err:
            raise ConfigError(f"stdin:{number}: not UTF-8 ({err.reason} at byte {err.start}): give prompts as "
                              "UTF-8 text") from None
        if not line:  # end of input (Ctrl-D)
            return 0
        if line.strip():
            prompt = read_prompt(line, args.jsonl, number)
            check_utf8(prompt, f"stdin:{number}")
            generate(model, tokenizer, prompt, args.max_new_tokens, args.temperature, where=f"stdin:{number}",
                     fmt=fmt)


def argv_text(arg: str) -> str:
    """`arg` as the UTF-8 text its bytes on the command line are. Python decoded them with the locale's codec: under
    LC_ALL=C "é" came as '\\udcc3\\udca9', refused as no UTF-8, under latin-1 as "Ã©". Bytes that are no UTF-8 stay as
    Python gave them, for check_utf8 to refuse; so does a str that never was bytes (`main` called in-process)."""
    try:
        return os.fsencode(arg).decode("utf-8")
    except UnicodeError:
        return arg


def utf8_stdin() -> None:
    """Prompts on stdin read as UTF-8 whatever the locale (its codec, ASCII under LC_ALL=C, refused "é" as no UTF-8),
    strictly: a line that is no UTF-8 is refused with its byte (the loop's UnicodeDecodeError)."""
    if isinstance(sys.stdin, io.TextIOWrapper) and codecs.lookup(sys.stdin.encoding).name != "utf-8":
        sys.stdin.reconfigure(encoding="utf-8", errors="strict")


def check_utf8(prompt: str, where: str) -> None:
    """A prompt the tokenizer can take: Python hands bytes that are not UTF-8 (in argv) and JSON's "\\ud800" escapes
    over as lone surrogates, which no tokenizer accepts."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConfigError(f"{where}: not UTF-8 text ({err.object[err.start:err.end]!a}): give the prompt as UTF-8") \
            from None


if __name__ == "__main__":
    sys.exit(main())
