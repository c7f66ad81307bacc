"""Is the exported GGUF the model the run trained, read by transformers and run by llama.cpp itself?

    nice -n 10 python benchmarks/gguf_export.py RUN_DIR [--types f16,bf16,q8_0,q4_0] [--rows 32] [--out-dir DIR]

Exports RUN_DIR once per type (python -m qlora.export, into --out-dir, default runs/gguf/), times it, and holds each
file to its bound as the command does (transformers reads it back: KL per token and top-1 agreement against the run
as it trained, on the held-out rows). Where llama-cpp-python is installed, llama.cpp loads each file too and scores the
same rows with its own kernels: its tokenizer against the run's on the rendered held-out conversations, and its
logits against the trained model's at every position (KL, top-1 agreement). llama-cpp-python is not a dependency:
PyPI ships it as source only, a build of several minutes (`pip install llama-cpp-python`); without it those columns
say so. Writes benchmarks/results/gguf-cpu.{md,json}. (Not named gguf.py: that would hide the gguf package from the
imports of the scripts in this folder.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import header, record, write_result  # noqa: E402  (a sibling script, not a package)

from qlora import cli  # noqa: E402  (one line and its exit status for each ending)
from qlora.data.files import read_rows  # noqa: E402
from qlora.data.labels import render_chat  # noqa: E402
from qlora.data.splits import load_splits  # noqa: E402
from qlora.export.check import check_export  # noqa: E402
from qlora.export.gguf_file import TYPES, export  # noqa: E402
from qlora.training.assemble import load_run_fp32  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def llama_cpp_scores(path: Path, trained: torch.nn.Module, tokenizer: object, examples: list[dict],
                     conversations: list[list[dict]]) -> dict:
    """llama.cpp's own reading of the file: its tokens for the rendered conversations against the run's tokenizer,
    and its next-token distributions on the held-out rows against the trained model's."""
    from llama_cpp import Llama

    width = max(len(ex["input_ids"]) for ex in examples)
    llm = Llama(model_path=str(path), n_ctx=max(width, 64), logits_all=True, verbose=False,
                n_threads=torch.get_num_threads())
    texts = [render_chat(tokenizer, messages, "held-out conversation") for messages in conversations]
    same_tokens = sum(llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(
        text, add_special_tokens=False) for text in texts)
    kl_sum = agree = positions = 0
    with torch.no_grad():
        for ex in examples:
            ids = ex["input_ids"]
            llm.reset()
            llm.eval(ids)
            theirs = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
            ours = trained(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
            log_p, log_q = ours.log_softmax(-1), theirs.log_softmax(-1)
            kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
            agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            positions += len(ids)
    template = llm.metadata.get("tokenizer.chat_template") == tokenizer.chat_template
    return {"tokenizer_same": f"{same_tokens}/{len(texts)}", "template_same": template,
            "kl_mean": kl_sum / positions, "top1": agree / positions, "positions": positions}


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--types", default="f16,bf16,q8_0,q4_0")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "gguf")
    args = parser.parse_args(argv)
    kinds = args.types.split(",")
    unknown = [k for k in kinds if k not in TYPES]
    if unknown:
        parser.error(f"--types: {unknown[0]} is not one of {', '.join(TYPES)}")
    prov = record("gguf_export.py", "cpu")
    try:
        import llama_cpp
        runtime = f"llama-cpp-python {llama_cpp.__version__}"
    except ImportError:
        runtime = None
    cfg, model, tokenizer, _ = trained = load_run_fp32(args.run_dir)
    examples = load_splits(cfg.data, tokenizer, cfg.train.seed)[1][:args.rows]
    conversations = [r["messages"] for r in read_rows(cfg.data.eval or cfg.data.train)
                     if isinstance(r.get("messages"), list)][:args.rows]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in kinds:
        out = args.out_dir / f"{args.run_dir.name}-{kind}.gguf"
        out.unlink(missing_ok=True)
        written = export(args.run_dir, out, kind, "cpu")
        started = time.perf_counter()
        checked = check_export(args.run_dir, out, kind, args.rows, trained[:3], refuse=False)
        row = {"type": kind, "mb": written["bytes"] / 1e6, "export_s": written["seconds"],
               "check_s": round(time.perf_counter() - started, 1), "transformers": checked}
        if runtime:
            row["llama_cpp"] = llama_cpp_scores(out, model, tokenizer, examples, conversations)
        rows.append(row)
    lines = header(f"GGUF export of {args.run_dir.name}: the file against the trained model", prov, "cpu")
    lines += [f"{len(examples)} held-out rows, every position; the trained model is the run as load_run rebuilds it "
              "(adapter on its NF4 base, CPU, fp32). KL is KL(trained || file) in nats per token. llama.cpp: "
              f"{runtime or 'llama-cpp-python not installed (pip install llama-cpp-python: a source build)'}.", "",
              "| type | MB | export s | check s | KL, transformers | top-1, transformers | bound (KL, top-1) | "
              "KL, llama.cpp | top-1, llama.cpp | llama.cpp tokens same | template same |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t, c = r["transformers"], r.get("llama_cpp")
        cpp = [f"{c['kl_mean']:.2e}", f"{100 * c['top1']:.2f}%", c["tokenizer_same"], "yes" if c["template_same"]
               else "no"] if c else ["-"] * 4
        bound = f"{t['bound']['kl']:g}, {100 * t['bound']['top1']:g}%: {'within' if t['within'] else 'OUTSIDE'}"
        lines.append(f"| {r['type']} | {r['mb']:.1f} | {r['export_s']:g} | {r['check_s']:g} | {t['kl_mean']:.2e} | "
                     f"{100 * t['top1']:.2f}% | {bound} | " + " | ".join(cpp) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_result(ROOT / "benchmarks" / "results" / "gguf-cpu", {**prov, "rows": rows}, text)


if __name__ == "__main__":
    sys.exit(cli.run(main))
