"""The tokenizer the run trained with, as GGUF metadata: its byte-level BPE vocabulary, merges, special tokens and chat
template, and the name of the pre-tokenizer (how text is split before BPE) llama.cpp is to split text by.
"""

from __future__ import annotations

import json
from hashlib import sha256

import gguf
from transformers import PreTrainedTokenizerBase

# llama.cpp picks its pre-tokenizer (how text is split before BPE) by a hash of the ids a tokenizer gives CHECK_TEXT
# (convert_hf_to_gguf.py, get_vocab_base_pre; llama.cpp PR 6920). The families the export writes (architecture.py).
PRE_TOKENIZERS = {"0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
                  "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
                  # Qwen1.5-7B's, in llama.cpp's list; Qwen2 and Qwen2.5 kept its vocabulary and split
                  "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2"}
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) "
              "\U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 "
              "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
              "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
              "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
              "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
              "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
              "make it, 'D you like some tea? We'Ve a'lL")

# A tokenizer trained anew on a known pre-tokenizer has ids, so a hash, of its own: named by its definition in
# tokenizer.json instead, where that is the very split llama.cpp's pre-tokenizer of that name makes (llama-vocab.cpp:
# llama-bpe splits by Llama 3's regex, then maps bytes). Without a name llama.cpp falls back to its default split, whose
# first rule cuts at every punctuation mark ("it's" as it ' s, where Llama 3's split keeps 's): other tokens than the
# run trained on.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's (tokenization_qwen2.py), llama.cpp's qwen2: Llama 3's but for one digit a token where Llama 3 takes up to 3.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPECS = {name: [{"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
                              {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]
                       for name, split in (("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT))}


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, base: str, vocab_size: int) -> str:
    """The byte-level BPE vocabulary as llama.cpp's converter lists it (get_vocab_base): one entry per embedding
    row, rows without a token as padding, added tokens as CONTROL when special (or spelled <|...|>) and USER_DEFINED
    otherwise; merges, special token ids and the add-bos flag from the checkpoint's files (gguf.SpecialVocab); the
    chat template the run trained with. Returns the pre-tokenizer's name, or a note when llama.cpp will not know it."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if i in added:
            if not added[i].normalized:  # llama.cpp takes added tokens as already normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    pre = PRE_TOKENIZERS.get(sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()) or pre_by_definition(
        tokenizer)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(base, load_merges=True, n_vocab=vocab_size)
    special.chat_template = tokenizer.chat_template  # the one the run rendered its data with
    special.add_to_gguf(writer, quiet=True)
    return pre or "unknown to llama.cpp (it will split text by its default rules; transformers reads it as trained)"


def pre_by_definition(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The llama.cpp pre-tokenizer whose split the tokenizer's own pre_tokenizer is (PRE_TOKENIZER_SPECS), or None.
    Offsets are left out of the comparison (trim_offsets): they do not change the tokens."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    steps = [{k: v for k, v in step.items() if k != "trim_offsets"} for step in steps]
    return next((name for name, known in PRE_TOKENIZER_SPECS.items() if steps == known), None)

