"""The export's check of itself: transformers reads the file back (its own GGUF loader, tokenizer and chat template
included, given back the rotary scaling and biases that loader drops: base.convert.read_gguf), and it is held to the
run. The file's template must render a held-out conversation exactly as the trained tokenizer does, and its tokenizer
give the same ids on held-out text. Held-out rows go through the trained model (assemble.load_run_fp32: the run as it
trained, adapter on its NF4 base, computing in fp32) and through the exported one; the mean KL divergence per token
and the top-1 agreement must lie within BOUNDS for the type (--skip-check skips this, for a model too big to load
twice). A file that fails its check is kept for inspection and the command exits 1, as qlora.merge does for a merge
beyond its tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from qlora.base.convert import read_gguf
from qlora.config import Config
from qlora.console import announce
from qlora.data.batches import collate
from qlora.data.files import read_rows
from qlora.data.labels import render_chat
from qlora.data.splits import load_splits
from qlora.errors import Stop
from qlora.training.assemble import load_run_fp32
from qlora.training.checkpoint import RUN_CONFIG


class Bound(NamedTuple):
    kl: float
    """Largest mean KL(trained || exported) per token, in nats."""
    top1: float
    """Smallest share of positions where both models' most likely next token is the same."""


# What docs/after-training.md ("Exporting to GGUF") states. Measured on the demo (SmolLM2-135M, 32 held-out rows):
# f16 7.8e-6 nats/token and 100% top-1, bf16 3.3e-4 and 99.6%, q8_0 1.4e-2 and 94.0%, q4_0 2.4 and 38%; each bound
# leaves room for other runs and rows, yet stays below what a file without the adapter scores (KL ~0.1, top-1 ~88% on
# short runs of the demo). The 16-bit types only round the merged weights (2^-11 relative in f16, 2^-8 in bf16); q8_0
# rounds each block of 32 to 8 bits, a step a tenth of NF4's. q4_0 puts NF4's levels, densest near zero where most
# weights are, onto a uniform grid of 16 steps: the bound is what a usable 4-bit file scores, and the demo's is outside
# it.
BOUNDS = {"f16": Bound(0.001, 0.99), "bf16": Bound(0.005, 0.98), "q8_0": Bound(0.03, 0.90), "q4_0": Bound(0.15, 0.85)}


# The widest margin between the trained model's two best logits (a probability ratio of 1.65) that outside_bound
# calls a near tie. A tiny or barely trained model's next-token distributions are flat: measured on the tiny untied
# Qwen2 and fp16 Mistral runs of tests/test_export_own_folder.py, a q4_0 file is their merged model rounded to q4_0 in
# transformers' own layout to KL 1e-8 (the file's layout, untied head and window are right), 0.01 nats/token from the
# run (within q4_0's 0.15), yet 31-33% of its top tokens differ: each where the run's two best lay within 0.36
# logits (median 0.10), while q4_0 moves a logit by 0.11 on average.
NEAR_TIE = 0.5


# For data without conversations: any turns exercise the template, which is code.
CONVERSATION = [{"role": "user", "content": "Where does the 9 am flight from Oslo go?"},
                {"role": "assistant", "content": "Rome."}]


def check_template(trained: PreTrainedTokenizerBase, exported: PreTrainedTokenizerBase, conversations: list[list[dict]],
                   out: Path) -> str:
    """The file's chat template renders each conversation (whole, and up to its last turn with the assistant's
    header) as the trained tokenizer does, and the file's tokenizer turns each rendering into the same ids."""
    if not trained.chat_template:
        return "no chat template to compare (the run's tokenizer has none)"
    if not exported.chat_template:
        raise Stop(1, f"{out} holds no chat template, though the run trained with one: do not use it")
    characters, conversations = 0, conversations or [CONVERSATION]
    for i, messages in enumerate(conversations):
        for turns, prompt in ((messages, False), (messages[:-1], True)):
            if not turns:
                continue
            ours = render_chat(trained, turns, f"held-out conversation {i + 1}", add_generation_prompt=prompt)
            theirs = render_chat(exported, turns, f"{out}, held-out conversation {i + 1}", add_generation_prompt=prompt)
            if ours != theirs:
                k = next((j for j, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                         min(len(ours), len(theirs)))
                raise Stop(1, f"the chat template in {out} renders held-out conversation {i + 1} otherwise than the "
                              f"trained tokenizer: {theirs[k:k + 30]!r} where it had {ours[k:k + 30]!r} (character "
                              f"{k}): do not use the file")
            for special in (False, True):  # as the data was tokenised, and as a runtime adds its bos
                ids = (t.encode(ours, add_special_tokens=special) for t in (trained, exported))
                if next(ids) != next(ids):
                    raise Stop(1, f"the tokenizer in {out} splits held-out conversation {i + 1} into other tokens "
                                  "than the trained one: do not use the file")
            characters += len(ours)
    return f"{len(conversations)} held-out conversation(s) render identically ({characters} characters), same ids"


@torch.no_grad()
def divergence(trained: torch.nn.Module, exported: torch.nn.Module, examples: list[dict], pad_id: int,
               batch_size: int = 8) -> dict:
    """Mean and largest KL(trained || exported) per token, in nats, the share of positions whose most likely next
    token agrees, over every position of `examples`, and the widest margin between the trained model's two best
    logits where the file's top token is another (0.0 where none is)."""
    kl_sum = kl_max = agree = positions = flip_margin = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        mask = batch["attention_mask"].bool()
        logits = [m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                  .logits.float()[mask] for m in (trained, exported)]
        log_p, log_q = (x.log_softmax(-1) for x in logits)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
        same = logits[0].argmax(-1) == logits[1].argmax(-1)
        agree += int(same.sum())
        positions += int(mask.sum())
        if not same.all():
            best = logits[0].topk(2, -1).values
            flip_margin = max(flip_margin, float((best[:, 0] - best[:, 1])[~same].max()))
    return {"kl_mean": kl_sum / positions, "kl_max": kl_max, "top1": agree / positions, "positions": positions,
            "flip_margin": flip_margin}


def read_back(out: Path, path: Path | None = None) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    """The file's tokenizer and model as transformers' own GGUF loader reads them (fp32, CPU), from `path` when it
    does not have its name `out` yet; a file it cannot read fails its check (Stop, exit 1)."""
    try:
        tokenizer, model = read_gguf(path or out, dtype=torch.float32, device_map={"": "cpu"})
    except Exception as err:  # noqa: BLE001  any way the reader fails is the file's failure
        raise Stop(1, f"transformers cannot read {out} back ({type(err).__name__}: {str(err).strip()[:200]}): the "
                      "file is kept for inspection, but do not use it") from err
    return tokenizer, model.eval()


def outside_bound(out: Path, kind: str, scores: dict) -> str:
    """The line for a file further from the trained model than its type's bound: by how much, and the types with
    tighter bounds to export instead."""
    bound = BOUNDS[kind]
    finer = [t for t, b in BOUNDS.items() if b.kl < bound.kl]
    names = ", ".join(finer[:-1]) + " or " + finer[-1] if len(finer) > 1 else "".join(finer)
    instead = f"export with --type {names} instead" if finer else "report it: f16 only rounds the weights"
    flat = ("; top-1 agreement alone is outside, the mean KL within: each top token that changed was a near tie, "
            f"the trained model's two best within {scores['flip_margin']:.2f} logits, as on a tiny or barely trained "
            "model's flat distributions, which any rounding flips" if scores["kl_mean"] <= bound.kl
            and scores.get("flip_margin", NEAR_TIE) < NEAR_TIE else "")
    return (f"{out} is further from the trained model than docs/after-training.md bounds {kind} (mean KL "
            f"{scores['kl_mean']:.2e} nats/token against at most {bound.kl:g}, top-1 agreement "
            f"{100 * scores['top1']:.2f}% against at least {100 * bound.top1:g}%){flat}: the file is kept for "
            f"inspection, but do not use it; {instead}")


def check_export(run_dir: Path, out: Path, kind: str, rows: int = 32,
                 trained: tuple[Config, torch.nn.Module, PreTrainedTokenizerBase] | None = None,
                 exported: tuple[PreTrainedTokenizerBase, torch.nn.Module] | None = None, refuse: bool = True,
                 path: Path | None = None, cfg: Config | None = None) -> dict:
    """Read `out` back with transformers and hold it to the run: the chat template and tokenizer, then KL and top-1
    agreement on `rows` held-out rows against BOUNDS[kind]. `trained` (the run's config, model and tokenizer from
    load_run_fp32) and `exported` (read_back's) are passed by a caller that holds them already. Raises Stop (exit 1)
    beyond the bound, or with `refuse=False` (a benchmark) says so in the result. `path`: where the file is read
    from, when it does not have its name `out` yet; `cfg`: the run's run_config.json as read_run_config read it."""
    out = Path(out)
    announce(f"checking {out}: transformers reads it back; its chat template and tokenizer against the run's, then "
             f"{rows} held-out rows through the trained model and the file, both on CPU in fp32")
    cfg, model, tokenizer = trained or load_run_fp32(Path(run_dir), cfg=cfg)[:3]
    exported_tokenizer, exported_model = exported or read_back(out, path)
    conversations = [r["messages"] for r in read_rows(*held_out_source(cfg, run_dir))
                     if isinstance(r.get("messages"), list)][:rows]
    template = check_template(tokenizer, exported_tokenizer, conversations, out)
    print(f"chat template and tokenizer: {template}")
    examples = load_splits(cfg.data, tokenizer, cfg.train.seed)[1][:rows]
    scores = divergence(model, exported_model, examples, tokenizer.pad_token_id)
    bound = BOUNDS[kind]
    within = scores["kl_mean"] <= bound.kl and scores["top1"] >= bound.top1
    print(f"{out} against the trained model, {len(examples)} held-out rows ({scores['positions']} positions): mean KL "
          f"{scores['kl_mean']:.2e} nats/token (largest {scores['kl_max']:.2e}), top-1 agreement "
          f"{100 * scores['top1']:.2f}%: {'within' if within else 'OUTSIDE'} the {kind} bound (KL <= {bound.kl:g}, "
          f"agreement >= {100 * bound.top1:g}%)")
    if not within and refuse:
        raise Stop(1, outside_bound(out, kind, scores))
    return {**scores, "rows": len(examples), "template": template, "bound": bound._asdict(), "within": within,
            "type": kind}


def held_out_source(cfg: Config, run_dir: Path) -> tuple[str, str]:
    """The file the check reads its held-out conversations from, and the setting of the run that names it."""
    key = "data.eval" if cfg.data.eval else "data.train"
    return cfg.data.eval or cfg.data.train, f"{key} in {Path(run_dir) / RUN_CONFIG}, or export with --skip-check"

