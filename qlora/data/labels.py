"""Labels: rows tokenised with the loss masked.

Labels are -100 wherever no loss is wanted: prompts, system and user turns, padding. Only assistant turns (chat), the
output (instruction) or every token (text) are learned.
"""

from __future__ import annotations

import functools
import json
import math
from array import array

import jinja2
from transformers import PreTrainedTokenizerBase

from qlora.data.tokens import as_tensor, int32
from qlora.errors import ConfigError

IGNORE = -100  # torch.nn.functional.cross_entropy's ignore_index
FORMAT_FIELDS = {"messages": ("messages",), "instruction": ("instruction", "output"), "text": ("text",)}
ROLES = ("system", "user", "assistant")
_LEARNED = {"messages": "assistant turn", "instruction": "output", "text": "text"}  # what a row's labels are
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CONTENT_STAND_IN = "QLORA-CONTENT-7f3a9c"  # an opening turn's stand-in: no template writes it, none trims or escapes it


def format_of(row: dict) -> str | None:
    """The first format whose fields `row` has, or None."""
    return next((fmt for fmt, fields in FORMAT_FIELDS.items() if all(f in row for f in fields)), None)


def detect_format(rows: list[dict], source: str) -> str:
    """The format of `rows` (read from `source` by read_rows, which refuses a file of none), from its first row's
    fields."""
    if fmt := format_of(rows[0]):
        return fmt
    wrapped = [k for k, v in rows[0].items() if len(rows) == 1 and isinstance(v, list) and v and
               isinstance(v[0], dict) and format_of(v[0])]
    if wrapped:  # {"data": [rows]}, as many exports write a .json file: read as one row
        raise ConfigError(f"{source} is one JSON object holding its rows under {wrapped[0]!r}: write them as the "
                          "file's top-level array, or one object per line (.jsonl)")
    if len(rows) == 1 and rows[0] and all(v == [] for v in rows[0].values()):  # {"data": []}: the same, of none
        raise ConfigError(f"{source} is one JSON object holding no rows (under {next(iter(rows[0]))!r}): add data, "
                          "as the file's top-level array or one object per line (.jsonl)")
    raise ConfigError(f"{source}: first row has fields {sorted(rows[0])}, none of the formats "
                      "messages / instruction+output / text: rename the fields or set data.format")


def check_row(row: dict, fmt: str, where: str) -> None:
    """Refuse a row format `fmt` cannot train on (a field missing or not text, a chat turn without role or content);
    `where` names the row (file:line). No tokenizer needed: read_splits checks every row before a base loads."""
    missing = [f for f in FORMAT_FIELDS[fmt] if f not in row]
    if missing:
        raise ConfigError(f"{where}: row lacks field(s) {', '.join(missing)} that format {fmt!r} needs: fix or "
                          "delete that row")
    try:  # tokenizers refuse what UTF-8 cannot hold: a lone surrogate (JSON's "\ud800" escape)
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConfigError(f"{where}: holds a lone UTF-16 surrogate ({err.object[err.start:err.end]!a}), which is no "
                          "text: fix or delete that row") from None
    text_fields = () if fmt == "messages" else FORMAT_FIELDS[fmt] + (("input",) if fmt == "instruction" else ())
    for name in text_fields:
        value = row.get(name)
        if name == "input" and value is None:  # absent, or null: no input (as many Alpaca-style sets write it)
            continue
        # A number is its digits, but not NaN or Infinity: json.dumps writes a pandas gap as NaN, and it trained as
        # the text "nan" (a null is refused alike).
        if isinstance(value, bool) or not isinstance(value, str | int | float) or \
                isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: field {name} must be text, got {json.dumps(value)[:60]}: fix that row")
    if fmt == "messages":
        if not isinstance(row["messages"], list):
            raise ConfigError(f"{where}: messages must be a list of {{role, content}} objects, "
                              f"got {type(row['messages']).__name__}")
        for n, m in enumerate(row["messages"], 1):
            problem = message_problem(m)
            if problem:
                raise ConfigError(f"{where}: each message needs a role in {ROLES} and a string content; message {n} "
                                  f"{problem}: fix or drop that turn")


def check_rows(rows: list[dict], fmt: str) -> None:
    """check_row for every row read by read_rows, as tokenising would: a bad one at the end of a large file is named
    before a base loads, not minutes after."""
    for row, where in zip(rows, rows.places, strict=True):
        check_row(row, fmt, where)


def tokenize_row(row: dict, fmt: str, tokenizer: PreTrainedTokenizerBase, where: str,
                 limit: int | None = None) -> dict[str, list[int]]:
    """Token ids and labels (prompt tokens masked) for one row; `where` names the row in errors (file:line). With
    `limit`, a conversation's turns past its first `limit` characters are not rendered (see _tokenize_chat)."""
    check_row(row, fmt, where)
    if fmt == "messages":
        return _tokenize_chat(row["messages"], tokenizer, where, limit)
    if fmt == "instruction":
        template = ALPACA_PROMPT_INPUT if row.get("input") not in (None, "") else ALPACA_PROMPT  # 0 is an input
        prompt = template.format(instruction=row["instruction"], input=row.get("input", ""))
        return _join([(prompt, False), (str(row["output"]) + tokenizer.eos_token, True)], tokenizer, bos=True)
    return _join([(str(row["text"]) + tokenizer.eos_token, True)], tokenizer, bos=True)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str,
                add_generation_prompt: bool = False) -> str:
    """The conversation as the tokenizer's chat template writes it. The template is code that came with the model:
    one that does not parse, is not a template, or raises on these turns (many refuse a system turn, or two turns of
    one role in a row, with raise_exception) is named in one line, with `where` (file:line, the prompt) and the fix."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"{where}: the chat template of {tokenizer.name_or_path} does not parse (its line "
                          f"{err.lineno}: {err.message}): fix its chat_template.jinja") from err
    except Exception as err:  # noqa: BLE001  whatever the template's own code raised (TemplateError, TypeError, ...)
        roles = ", ".join(m.get("role", "?") for m in messages if isinstance(m, dict))
        raise ConfigError(f"{where}: the chat template of {tokenizer.name_or_path} fails on the turns [{roles}] "
                          f"({type(err).__name__}: {str(err).strip() or 'no message'}): drop or merge the turns it "
                          "refuses (a system turn, two of one role in a row), or use a model whose template accepts "
                          "them") from err


def _tokenize_chat(messages: list[dict], tokenizer: PreTrainedTokenizerBase, where: str,
                   limit: int | None) -> dict[str, list[int]]:
    if tokenizer.chat_template is None:
        raise ConfigError(f"{where}: chat data needs a tokenizer with a chat template, and this one has none: "
                          "use a chat model's tokenizer or data.format=instruction/text")
    # Render the conversation one turn longer at a time; the text each turn adds is its segment. Assistant segments
    # (content + end-of-turn) are learned; everything the template adds around them is masked.
    segments, previous = [], ""
    for i, message in enumerate(messages):
        # Past `limit` characters the rest lies beyond max_seq_len tokens (tokenize_rows). Rendering every prefix is
        # quadratic in the turns: a row of 2,000 short turns took 19 s, a 50 MB line of them would never end.
        if limit is not None and len(previous) > limit:
            break
        prefix = messages[: i + 1]
        text = render_chat(tokenizer, prefix, where)
        if message["role"] == "assistant":
            head = render_chat(tokenizer, messages[:i], where, add_generation_prompt=True) if i else \
                opening_head(tokenizer, message, text, where)
            segments.append((head[len(previous):], False))
            previous = head
        if not text.startswith(previous):
            raise ConfigError(f"{where}: the chat template re-renders earlier turns, so turns cannot be masked")
        segments.append((text[len(previous):], message["role"] == "assistant"))
        previous = text
    return _join(segments, tokenizer)


def message_problem(message: object) -> str | None:
    """What keeps one chat turn from training, in a few words (not the turn itself: its content may be megabytes),
    or None."""
    def kind(value: object) -> str:
        return "null" if value is None else repr(value)[:40] if isinstance(value, str) else type(value).__name__

    if not isinstance(message, dict):
        return f"is {kind(message)}, not a {{role, content}} object"
    if "role" not in message:
        return f"has no role (its keys: {', '.join(map(str, message))[:80]}; ShareGPT's from/value become role/content)"
    if message["role"] not in ROLES:
        role = message["role"]
        low = role.lower() if isinstance(role, str) else role  # the note each role fits, in any case: Human, GPT
        note = ("ShareGPT's human and gpt are user and assistant" if low in ("human", "gpt") else
                "roles are lower case" if low in ROLES else
                "tool calls and tool results are not trained here" if low in ("tool", "function", "ipython") else
                None)
        return f"has role {kind(role)}" + (f" ({note})" if note else "")
    if not isinstance(message.get("content"), str):
        what = f"content {kind(message['content'])}" if "content" in message else "no content"
        parts = " of parts (OpenAI's multimodal form): join their text into one string" \
            if isinstance(message.get("content"), list) else ""
        return f"({message['role']}) has {what}{parts}" + (" beside tool_calls" if "tool_calls" in message else "")
    return None


def opening_head(tokenizer: PreTrainedTokenizerBase, message: dict, text: str, where: str) -> str:
    """What the template writes before the text of an assistant turn that opens the conversation (`text`, rendered
    alone): the assistant header of an empty conversation, unless the template adds more before a first turn (SmolLM2
    its default system prompt, Llama 3 its begin-of-text), then all that precedes the turn's content. Never learned.

    That is found by rendering the turn with a stand-in content, not by searching `text` for the content: the content
    may occur in the header first ("begin" in Llama 3's <|begin_of_text|>: the header was learned from there on), or
    not at all in the form written (Llama 3 trims it)."""
    try:
        head = render_chat(tokenizer, [], where, add_generation_prompt=True)
    except ConfigError:  # a template that refuses an empty conversation
        head = None
    if head is not None and text.startswith(head):
        return head
    probe = render_chat(tokenizer, [{**message, "content": CONTENT_STAND_IN}], where)
    at = probe.find(CONTENT_STAND_IN)
    if at < 0 or not text.startswith(probe[:at]):
        raise ConfigError(f"{where}: the conversation opens with an assistant turn, and where its text begins in what "
                          f"the chat template of {tokenizer.name_or_path} writes cannot be found: open it with a "
                          "user (or system) turn")
    return probe[:at]


def _join(segments: list[tuple[str, bool]], tokenizer: PreTrainedTokenizerBase,
          bos: bool = False) -> dict[str, list[int]]:
    """The segments' ids, each learned or masked; with `bos`, begun as the tokenizer begins a text (missing_bos)."""
    input_ids, labels = [], []
    for text, learn in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if learn else [IGNORE] * len(ids)
    start = missing_bos(tokenizer, input_ids) if bos else []
    return {"input_ids": start + input_ids, "labels": [IGNORE] * len(start) + labels}


def missing_bos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    """The ids the tokenizer puts before a text of its own accord (Llama 3's <|begin_of_text|>, Llama 2's <s>; none
    for SmolLM2 or Qwen2.5), where `ids` (a text without a chat template, which writes them itself) does not begin
    with them already. Every text of such a model's pretraining began so, and llama.cpp begins each prompt so (the
    add_bos_token of an exported GGUF): an instruction or text row without it trained the model on a start it never
    meets."""
    start = list(_leading_specials(tokenizer))
    return [] if ids[:len(start)] == start else start


@functools.lru_cache(maxsize=8)
def _leading_specials(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """What the tokenizer adds before a text: a probe tokenised with and without its special tokens. Once per
    tokenizer, not per row: per row they took an instruction row's tokenisation from 141 to 231 us (SmolLM2's)."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return tuple(full[:at])


def longest_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Characters in the tokenizer's longest vocabulary entry: no token covers more text than that.

    Entries are spelled in the tokenizer's own alphabet (byte-level BPE: one character per byte; SentencePiece: `▁`
    for a space; byte fallback: `<0x0A>` for one byte), each at least as long as the text it stands for, unless a
    normaliser shortens text before it is split (no tokenizer of ours does).
    """
    return max(1, max(map(len, tokenizer.get_vocab())))


def cut_row(row: dict, limit: int) -> dict:
    """`row` with every text field cut to `limit` characters (chat messages' contents too)."""
    def cut(value: object) -> object:
        return value[:limit] if isinstance(value, str) else value

    out = {k: cut(v) for k, v in row.items()}
    if isinstance(out.get("messages"), list):
        out["messages"] = [{k: cut(v) for k, v in m.items()} if isinstance(m, dict) else m for m in out["messages"]]
    return out


def tokenize_rows(rows: list[dict], fmt: str, tokenizer: PreTrainedTokenizerBase, source: str,
                  max_seq_len: int) -> list[dict[str, array]]:
    """Tokenise and truncate every row; drop rows left with nothing to learn, and say how many. Each row's ids and
    labels are held as int32 arrays (qlora/data/tokens.py): 4 bytes a token, not a list's 36 or more.

    Memory per row is bounded whatever the data holds (a single 50 MB line once took 2 GB for a row cut to 128
    tokens): each text field is cut before tokenisation to the characters max_seq_len + 1 tokens can cover at most
    (`longest_token`). Text beyond that lies past max_seq_len tokens, where the row is truncated anyway, assuming (as
    for every BPE or SentencePiece tokenizer) that where a field ends changes only the tokens of its last word. So is
    time: a conversation's turns are rendered until its text passes those characters, not to its last turn.
    """
    limit = (max_seq_len + 1) * longest_token(tokenizer)
    examples, dropped = [], []
    places = getattr(rows, "places", None) or [f"{source}: row {n}" for n in range(1, len(rows) + 1)]
    for row, where in zip(rows, places, strict=True):
        ex = tokenize_row(cut_row(row, limit), fmt, tokenizer, where, limit)
        ex = {k: int32(v[:max_seq_len], where) for k, v in ex.items()}
        # Position t predicts token t+1, so a label at position 0 is never learned.
        if all(label == IGNORE for label in ex["labels"][1:]):
            dropped.append(where)
            continue
        examples.append(ex)
    if not examples:
        raise ConfigError(f"{source}: every row has all its labels masked (no {_LEARNED[fmt]} within "
                          f"data.max_seq_len={max_seq_len}): check the data, the format, or raise data.max_seq_len")
    if dropped:
        print(f"{source}: dropped {len(dropped)} of {len(rows)} rows with no learnable token within "
              f"max_seq_len={max_seq_len} (the first: {dropped[0]})")
    return examples


def shortest_keeping(examples: list[dict[str, array]]) -> int:
    """The shortest max_seq_len that keeps every one of `examples` (tokenised, unpacked): `tokenize_rows` drops a row
    whose labels past position 0 are all masked within it, so each needs its first learned label's position + 1."""
    need = 0
    for ex in examples:
        learned = (as_tensor(ex["labels"])[1:] != IGNORE).nonzero()
        need = max(need, int(learned[0]) + 2 if len(learned) else 0)
    return need
