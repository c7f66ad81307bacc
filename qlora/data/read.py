"""Data: read rows (local JSONL/JSON/Parquet/CSV or a hub dataset), tokenise them with labels masked, batch them.

Labels are -100 wherever no loss is wanted: prompts, system and user turns, padding. Only assistant turns (chat), the
output (instruction) or every token (text) are learned. The order of micro-batches is a pure function of the seed
and the micro-batch index, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import jinja2
import torch
from transformers import PreTrainedTokenizerBase

from qlora.base.build import hub_unreachable, looks_like_hub_id
from qlora.config import DataConfig
from qlora.errors import ConfigError

IGNORE = -100  # torch.nn.functional.cross_entropy's ignore_index
LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
FORMAT_FIELDS = {"messages": ("messages",), "instruction": ("instruction", "output"), "text": ("text",)}
ROLES = ("system", "user", "assistant")
_LEARNED = {"messages": "assistant turn", "instruction": "output", "text": "text"}  # what a row's labels are
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CONTENT_STAND_IN = "QLORA-CONTENT-7f3a9c"  # an opening turn's stand-in: no template writes it, none trims or escapes it


class Rows(list):
    """A source's rows, each with where it stands (`places`), for the messages that name a row: `file:LINE` in a
    JSONL file (blank lines count) or a CSV file (its header is line 1), `file: row N` in the other kinds."""

    def __init__(self, rows: list[dict], places: list[str]) -> None:
        super().__init__(rows)
        self.places = places


def read_rows(source: str) -> Rows:
    """Rows of a local file, or of a hub dataset's train split when `source` is no local path."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()  # train.JSONL too
    if suffix in LOADERS or not looks_like_hub_id(source):
        if not path.is_file():
            problem = ("is a directory, not a file" if path.is_dir() else
                       "is not a regular file" if path.exists() else
                       "is a link that leads nowhere (a loop, or a missing target)" if path.is_symlink() else
                       "not found")
            raise ConfigError(f"data file {path} {problem}: check data.train / data.eval")
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix not in LOADERS:
            raise ConfigError(f"data file {path}: unknown extension, use one of {', '.join(LOADERS)}")
        import datasets

        logging.getLogger("datasets").setLevel(logging.CRITICAL)  # its own error line would repeat ours
        header, lines = csv_records(path) if suffix == ".csv" else ([], [])
        # A CSV's cells are text as written: pandas would read a column of digits as numbers (zip code 00501 as 501.0)
        # and "NA", "None" or "null" as missing.
        # Converters by column position: pandas names the columns itself (an empty name `Unnamed: 0`, as its own
        # to_csv writes an index; a repeated one `text.1`).
        as_text = dict(converters=dict.fromkeys(range(len(header)), str), keep_default_na=False,
                       na_filter=False) if header else {}
        try:
            rows = columnar_rows(datasets.load_dataset(LOADERS[suffix], data_files=str(path), split="train",
                                                       **as_text))
        except Exception as err:  # datasets wraps the parser's error ("An error occurred while generating ...")
            cause = err
            while cause.__cause__ or cause.__context__:
                cause = cause.__cause__ or cause.__context__
            text = (str(cause).strip() or "no details").splitlines()[0]
            if suffix == ".json":
                json_syntax_error(path)
            raise ConfigError(f"data file {path} could not be read ({type(cause).__name__}: {text}): fix the file, "
                              "or convert it to JSONL") from err
        if suffix == ".csv":  # a row per line after the header where pandas read the file otherwise
            lines = lines if len(lines) == len(rows) else range(2, len(rows) + 2)
            return Rows(rows, [f"{path}:{line}" for line in lines])
        return Rows(rows, [f"{path}: row {i + 1}" for i in range(len(rows))])
    import datasets

    offline = hub_unreachable()  # with no network: fail at once, not after ~25 s of retries
    try:
        rows = columnar_rows(datasets.load_dataset(source, split="train"))
        return Rows(rows, [f"{source}: row {i + 1}" for i in range(len(rows))])
    except Exception as err:
        why = f"{offline}, and it is not in the datasets cache" if offline else str(err).splitlines()[0]
        raise ConfigError(f"data source {source!r} is neither a local file nor a reachable hub dataset ({why}): "
                          "give a local file, or download the dataset first") from err


def csv_records(path: Path) -> tuple[list[str], list[int]]:
    """A CSV file's column names, and the line an editor shows for each row: where its record begins, counting the
    header, blank lines (which pandas skips) and quoted fields that span lines."""
    header, starts, end = [], [], 0
    limit = csv.field_size_limit(2**31 - 1)  # a cell of any length, as pandas reads it (the default is 128 KiB)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for record in reader:
                if record and not header:
                    header = record
                elif record:  # [] for a blank line
                    starts.append(end + 1)
                end = reader.line_num
    except (UnicodeDecodeError, csv.Error):  # pandas names what is wrong with the file
        return [], []
    finally:
        csv.field_size_limit(limit)
    return header, starts


def columnar_rows(table: object) -> list[dict]:
    """A `datasets` table's rows as the file wrote them. Arrow gives every row every column, a field the row lacks as
    None (a JSON array of chat rows and text rows: `messages: None` in each text row), so None is taken for absent,
    as a CSV's empty cell is (its input field, say)."""
    return [{k: v for k, v in row.items() if v is not None} for row in table.to_list()]


def _read_jsonl(path: Path) -> Rows:
    rows, places = [], []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as err:
        raise ConfigError(f"data file {path} is unreadable ({err.strerror}): check its permissions") from err
    for number, raw in enumerate(lines, 1):
        try:
            # A byte order mark some editors write; at the start of any line, since files joined with `cat` carry
            # each one's mark where it begins.
            line = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}:{number}: not UTF-8 ({err.reason} at byte {err.start}): re-encode the file "
                              "as UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_unique_keys)
        except DuplicateKey as err:
            raise ConfigError(f"{path}:{number}: key {err.key!r} appears twice in one object, and JSON would keep only "
                              "the last: keep one of them") from None
        except json.JSONDecodeError as err:
            if line.strip() in ("[", "{"):  # json.dump(rows, f, indent=2) into a file named .jsonl
                raise ConfigError(f"{path}:{number}: a JSON document written over several lines, not one JSON object "
                                  "per line (JSONL): name the file .json, or write one row per line") from None
            raise ConfigError(f"{path}:{number}: malformed JSON ({err.msg}): fix or delete that line") from None
        except (ValueError, RecursionError) as err:  # an integer of over 4,300 digits; objects nested too deep
            why = "nested too deeply" if isinstance(err, RecursionError) else str(err).split(";")[0]
            raise ConfigError(f"{path}:{number}: unreadable JSON ({why}): fix or delete that line") from None
        if not isinstance(row, dict):
            hint = ": a JSON array of rows belongs in a .json file" if isinstance(row, list) else ""
            raise ConfigError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}{hint}")
        rows.append(row)
        places.append(f"{path}:{number}")
    return Rows(rows, places)


def json_syntax_error(path: Path) -> None:
    """Name the line where a .json file that `datasets` could not read breaks JSON: its own message gives a byte
    position at best ("Expected object or value at position 14"). Returns where Python reads the file (the trouble
    lay elsewhere, and `datasets`' message stands)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # a value per line (JSON Lines, which `datasets` reads in a .json file too)
            _read_jsonl(path)  # names the first bad line, if any
            return
        raise ConfigError(f"{path}:{err.lineno}: malformed JSON ({err.msg}): fix the file, or convert it to "
                          "JSONL") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return


class DuplicateKey(ValueError):
    """A key written twice in one JSON object."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object as a dict, refusing a key written twice: json.loads keeps the last silently, and a second
    `messages` (a generator's bug) would replace the conversation without a word."""
    row = dict(pairs)
    if len(row) < len(pairs):
        seen = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return row


def detect_format(rows: list[dict], source: str) -> str:
    if not rows:
        raise ConfigError(f"{source} holds no rows: add data or point data.train at another file")
    for fmt, fields in FORMAT_FIELDS.items():
        if all(f in rows[0] for f in fields):
            return fmt
    raise ConfigError(f"{source}: first row has fields {sorted(rows[0])}, none of the formats "
                      "messages / instruction+output / text: rename the fields or set data.format")


def tokenize_row(row: dict, fmt: str, tokenizer: PreTrainedTokenizerBase, where: str) -> dict[str, list[int]]:
    """Token ids and labels (prompt tokens masked) for one row; `where` names the row in errors (file:line)."""
    missing = [f for f in FORMAT_FIELDS[fmt] if f not in row]
    if missing:
        raise ConfigError(f"{where}: row lacks field(s) {', '.join(missing)} that format {fmt!r} needs")
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
        return _tokenize_chat(row["messages"], tokenizer, where)
    if fmt == "instruction":
        template = ALPACA_PROMPT_INPUT if row.get("input") not in (None, "") else ALPACA_PROMPT  # 0 is an input
        prompt = template.format(instruction=row["instruction"], input=row.get("input", ""))
        return _join([(prompt, False), (str(row["output"]) + tokenizer.eos_token, True)], tokenizer)
    return _join([(str(row["text"]) + tokenizer.eos_token, True)], tokenizer)


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


def _tokenize_chat(messages: list[dict], tokenizer: PreTrainedTokenizerBase, where: str) -> dict[str, list[int]]:
    if tokenizer.chat_template is None:
        raise ConfigError(f"{where}: chat data needs a tokenizer with a chat template, and this one has none: "
                          "use a chat model's tokenizer or data.format=instruction/text")
    for n, m in enumerate(messages, 1):
        problem = message_problem(m)
        if problem:
            raise ConfigError(f"{where}: each message needs a role in {ROLES} and a string content; message {n} "
                              f"{problem}: fix or drop that turn")
    # Render the conversation one turn longer at a time; the text each turn adds is its segment. Assistant segments
    # (content + end-of-turn) are learned; everything the template adds around them is masked.
    segments, previous = [], ""
    for i, message in enumerate(messages):
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
        return f"has role {kind(message['role'])} (tool calls and tool results are not trained here)"
    if not isinstance(message.get("content"), str):
        what = f"content {kind(message['content'])}" if "content" in message else "no content"
        return f"({message['role']}) has {what}" + (" beside tool_calls" if "tool_calls" in message else "")
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


def _join(segments: list[tuple[str, bool]], tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    input_ids, labels = [], []
    for text, learn in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if learn else [IGNORE] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


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
                  max_seq_len: int) -> list[dict[str, list[int]]]:
    """Tokenise and truncate every row; drop rows left with nothing to learn, and say how many.

    Memory per row is bounded whatever the data holds (a single 50 MB line once took 2 GB for a row cut to 128
    tokens): each text field is cut before tokenisation to the characters max_seq_len + 1 tokens can cover at most
    (`longest_token`). Text beyond that lies past max_seq_len tokens, where the row is truncated anyway, assuming (as
    for every BPE or SentencePiece tokenizer) that where a field ends changes only the tokens of its last word.
    """
    if not rows:
        raise ConfigError(f"{source} holds no rows: add data or point data.train / data.eval at another file")
    limit = (max_seq_len + 1) * longest_token(tokenizer)
    examples, dropped = [], []
    places = getattr(rows, "places", None) or [f"{source}: row {n}" for n in range(1, len(rows) + 1)]
    for row, where in zip(rows, places, strict=True):
        ex = tokenize_row(cut_row(row, limit), fmt, tokenizer, where)
        ex = {k: v[:max_seq_len] for k, v in ex.items()}
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


def load_splits(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> tuple[list[dict], list[dict]]:
    """Tokenised train and held-out examples; the held-out split is carved from train by seed when not given."""
    rows = read_rows(cfg.train)
    fmt = detect_format(rows, cfg.train) if cfg.format == "auto" else cfg.format
    train = tokenize_rows(rows, fmt, tokenizer, cfg.train, cfg.max_seq_len)
    if cfg.eval:
        held = tokenize_rows(read_rows(cfg.eval), fmt, tokenizer, cfg.eval, cfg.max_seq_len)
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = max(1, round(len(train) * cfg.eval_fraction))
        if n_eval >= len(train):
            raise ConfigError(f"{cfg.train}: {len(train)} rows are too few to hold out {n_eval}: give data.eval")
        train, held = [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]]
    seen = repeated(train, held)
    if seen:
        print(f"{cfg.eval or cfg.train}: {seen} of {len(held)} held-out rows are also training rows (within "
              f"max_seq_len={cfg.max_seq_len}): their loss reads what was learned by heart; remove the duplicates")
    return train, held


def repeated(train: list[dict], held: list[dict]) -> int:
    """How many held-out examples are token for token a training example. A duplicated row lands on both sides of a
    seeded split, and a held-out file is often cut from the training one; either makes the held-out loss a
    memorisation score. Rows are compared by a hash of their ids: a set of the ids themselves would hold the data
    twice."""
    trained = {hash(tuple(ex["input_ids"])) for ex in train}
    return sum(hash(tuple(ex["input_ids"])) in trained for ex in held)


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row in the batch (right padding, masked out of attention and loss)."""
    width = max(len(ex["input_ids"]) for ex in examples)
    batch = {"input_ids": torch.full((len(examples), width), pad_id),
             "labels": torch.full((len(examples), width), IGNORE),
             "attention_mask": torch.zeros(len(examples), width, dtype=torch.long)}
    packed = "position_ids" in examples[0]  # rows from qlora.data.pack: documents keep apart by restarting positions
    if packed:
        batch["position_ids"] = torch.zeros(len(examples), width, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(ex["input_ids"])
        batch["labels"][i, :n] = torch.tensor(ex["labels"])
        batch["attention_mask"][i, :n] = 1
        if packed:
            # The padding tail restarts at 0 too, so it forms its own segment that no document attends to.
            batch["position_ids"][i, :n] = torch.tensor(ex["position_ids"])
            batch["position_ids"][i, n:] = torch.arange(width - n)
    return batch


def micro_batches(examples: list[dict], batch_size: int, seed: int, pad_id: int, start: int = 0, rank: int = 0,
                  world: int = 1) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Endless (index, batch) pairs from micro-batch `start` on; each epoch is a fresh permutation by seed.

    The batch at index i depends only on (seed, i), which is what makes resume exact. With `world` processes, micro-
    batch i of the run holds the rows one process with batch `world * batch_size` would take, and process `rank`
    takes its rank-th `batch_size` of them: N processes x batch b see exactly the rows of 1 process x batch N b.
    """
    index = start
    while True:
        rows = batch_rows(len(examples), batch_size * world, seed, index)[rank * batch_size:(rank + 1) * batch_size]
        yield index, collate([examples[i] for i in rows], pad_id)
        index += 1


def target_tokens(examples: list[dict], batch_size: int, seed: int, index: int) -> int:
    """Target tokens of micro-batch `index` (labels after the one-token shift that are not IGNORE), from the rows
    alone: what a process divides its summed loss by when it collates only its share of the batch."""
    return sum(sum(label != IGNORE for label in examples[i]["labels"][1:])
               for i in batch_rows(len(examples), batch_size, seed, index))


def batch_rows(n_examples: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Positions in the training split of the rows in micro-batch `index`."""
    per_epoch = max(1, n_examples // batch_size)  # a ragged last batch would change the token count per step
    epoch, offset = divmod(index, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[offset * batch_size:(offset + 1) * batch_size].tolist()


def resume_position(state: dict, batch_size: int, n_examples: int, default: int) -> int:
    """The micro-batch a resumed run starts at: the one after the checkpoint's last (`state["micro_batch"]`), or,
    when train.batch_size changed on --resume, the first of the new size that starts at or after the same row of the
    same epoch, so no row is seen twice or skipped in that epoch. `default` serves checkpoints that do not record it."""
    index, old_size = state.get("micro_batch", default), state.get("batch_size", batch_size)
    if old_size == batch_size:
        return index
    epoch, offset = divmod(index, max(1, n_examples // old_size))
    per_epoch = max(1, n_examples // batch_size)
    return epoch * per_epoch + min(-(-offset * old_size // batch_size), per_epoch)


def eval_rows(examples: list[dict], batch_size: int, max_batches: int = 0) -> list[dict]:
    """The held-out rows an evaluation scores (the first `max_batches` batches' worth when > 0), shortest first: a
    batch of similar lengths pads little (8% fewer tokens on the demo), and a row's score does not depend on its
    neighbours."""
    rows = examples[:max_batches * batch_size] if max_batches else examples
    return sorted(rows, key=lambda ex: len(ex["input_ids"]))


def eval_batches(examples: list[dict], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_id)
