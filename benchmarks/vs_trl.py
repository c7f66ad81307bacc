"""CPU time per step on the demo: our trainer against transformers + peft + bitsandbytes + trl's SFTTrainer.

    python benchmarks/vs_trl.py                       # 36 steps per stack (the demo's), ~15 min of CPU in all
    python benchmarks/vs_trl.py --steps 12 --stacks ours,trl

Every stack trains recipes/smollm2_135m.py as it stands: SmolLM2-135M-Instruct in NF4 with double quant, fp32 compute,
fp32 LoRA adapters (r 16, alpha 16, dropout 0.05) on every linear layer but lm_head, bitsandbytes' paged AdamW 32-bit
(on CPU it pages nothing), lr 5e-4 with 3 warmup steps and cosine decay, gradient-norm clip 1.0, non-reentrant
gradient checkpointing, SDPA attention, batches of 8 rows padded to their longest. Same data in the same order: our
tokenised rows (labels on the assistant turn only), batch i holding the rows of `data.batches.batch_rows(..., i)`, are
handed to SFTTrainer pre-tokenised with a sequential sampler. Same seed. One thread (OMP_NUM_THREADS=1 and
torch.set_num_threads(1)), each stack in a fresh process.

    ours               python -m qlora.train's `train()`, as the demo runs it (no evaluation before training)
    ours-exact-alloc   the same, with glibc's allocator set as the memory profiler set it on every run before
                       2244670 (mmap threshold 64 KiB then; `qlora.memory --measure` uses 8 KiB since, for exact peaks)
    trl                SFTTrainer(model, peft_config=LoraConfig(...)) on the model from
                       AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4, double
                       quant, fp32 compute)); SFTTrainer casts a quantised model's adapters to bf16 (QLoRA paper,
                       sec. 3), so they are cast back to fp32 before training: the comparison is fp32 adapters
                       throughout. HF's schedule differs from ours in its warmup only (0, 1/3, 2/3 against 1/4,
                       2/4, 3/4 of the peak lr).

Measured per step: CPU seconds (user and system, getrusage) between consecutive optimizer steps, read by a global
optimizer-step hook that is the same for every stack, so collation, forward, backward, clipping and the update all
fall inside; the median is over the steps after the first two. Also the process's peak resident set, the whole run's
CPU time, and the held-out loss and exact match after training, scored by `training.step.evaluate` for every stack.
CPU time, not wall time: it stays comparable on a machine shared with other jobs (the load is recorded), though
cache contention still inflates it somewhat.

Writes benchmarks/results/vs-trl-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import header, record, write_result  # noqa: E402  (a sibling script, not a package)

from qlora import cli  # noqa: E402  (one line and its exit status for each ending)

if TYPE_CHECKING:  # the hints only: qlora is imported in the worker only
    from qlora.config import Config

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "smollm2_135m.py"
RESULTS = ROOT / "benchmarks" / "results"
STACKS = ("ours", "ours-exact-alloc", "trl")
WARMUP = 2  # steps left out of the median: the first pays for lazy initialisation (optimizer state, kernels)


class StepClock:
    """CPU seconds (user, system) between consecutive optimizer steps of any torch optimizer in this process."""

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.steps: list[tuple[float, float]] = []
        self.last = self.now()
        register_optimizer_step_post_hook(self.tick)

    @staticmethod
    def now() -> tuple[float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime, usage.ru_stime

    def tick(self, *_: object) -> None:
        now = self.now()
        self.steps.append((now[0] - self.last[0], now[1] - self.last[1]))
        self.last = now


def demo_config(steps: int, out_dir: str) -> Config:
    from qlora.config import apply_overrides, load_recipe

    return apply_overrides(load_recipe(RECIPE), [f"--train.steps={steps}", f"--output.dir={out_dir}",
                                                 "--train.eval_before=false", "--train.eval_every=0",
                                                 "--train.device=cpu"])


def run_ours(steps: int, out_dir: str) -> dict:
    from qlora.train import train

    return train(demo_config(steps, out_dir))["after"]


def run_trl(steps: int, out_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from qlora.base.build import ensure_checkpoint
    from qlora.base.load import keep_cpu_weights_exact, load_tokenizer, quantization_config
    from qlora.data.batches import batch_rows
    from qlora.data.splits import load_splits
    from qlora.training.step import evaluate

    cfg = demo_config(steps, out_dir)
    t = cfg.train
    path = ensure_checkpoint(cfg)
    tokenizer = load_tokenizer(path)
    train_rows, eval_rows = load_splits(cfg.data, tokenizer, t.seed)
    order = [i for step in range(steps) for i in batch_rows(len(train_rows), t.batch_size, t.seed, step)]
    dataset = Dataset.from_list([{k: train_rows[i][k] for k in ("input_ids", "labels")} for i in order])
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map={"": "cpu"},
                                                 attn_implementation=cfg.model.attn_implementation,
                                                 quantization_config=quantization_config(cfg.quant, torch.float32))
    args = SFTConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=t.batch_size,
                     gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, lr_scheduler_type="cosine",
                     warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                     optim="paged_adamw_32bit", gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=cfg.data.max_seq_len,
                     train_sampling_strategy="sequential", seed=t.seed, data_seed=t.seed, use_cpu=True,
                     bf16=False, fp16=False, save_strategy="no", eval_strategy="no", report_to=[],
                     logging_steps=steps, disable_tqdm=True, dataloader_num_workers=0)
    peft = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft)
    for p in trainer.model.parameters():
        if p.requires_grad:  # back to fp32 adapters (see the docstring); the optimizer is built in train()
            p.data = p.data.float()
    trainer.train()
    keep_cpu_weights_exact(trainer.model)  # scored as ours is: bitsandbytes' bf16 CPU kernel off
    return evaluate(trainer.model, eval_rows, cfg, tokenizer.pad_token_id, torch.device("cpu"))


def worker(stack: str, steps: int, out: Path) -> None:
    """One stack in this process: train, score, write the figures to `out`."""
    import torch

    torch.set_num_threads(1)
    if stack == "ours-exact-alloc":
        from qlora.memory.readings import glibc_returns_freed_memory

        glibc_returns_freed_memory()
    clock = StepClock()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        scores = (run_trl if stack == "trl" else run_ours)(steps, tmp)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    timed = clock.steps[WARMUP:]
    out.write_text(json.dumps({
        "stack": stack, "steps": len(clock.steps),
        "cpu_s_per_step": statistics.median(u + s for u, s in timed),
        "user_s_per_step": statistics.median(u for u, _ in timed),
        "system_s_per_step": statistics.median(s for _, s in timed),
        "cpu_s_steps": [round(u + s, 3) for u, s in clock.steps],
        "run_cpu_s": usage.ru_utime + usage.ru_stime, "run_wall_s": time.perf_counter() - started,
        "peak_rss_bytes": usage.ru_maxrss * 1024, "eval_loss": scores["eval_loss"],
        "eval_exact_match": scores["eval_exact_match"]}) + "\n", encoding="utf-8")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min) on {os.cpu_count()} cores"


def report(prov: dict, results: dict[str, dict], loads: dict[str, str], steps: int) -> str:
    lines = header("CPU time per step: qlora against trl's SFTTrainer on the demo", prov, "cpu")
    lines += [f"SmolLM2-135M-Instruct, recipes/smollm2_135m.py, {steps} steps of 8 rows, one thread; median CPU "
              f"seconds per optimizer step (user + system) over steps {WARMUP + 1}-{steps}. Load average of the "
              "machine when each stack finished, as the run met it:", ""]
    lines += [f"- {name}: {load}" for name, load in loads.items()] + [""]
    lines += ["| stack | CPU s / step | user | system | run CPU s | peak RSS | held-out loss | exact match |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {name} | {r['cpu_s_per_step']:.2f} | {r['user_s_per_step']:.2f} | "
                     f"{r['system_s_per_step']:.2f} | {r['run_cpu_s']:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} MiB | "
                     f"{r['eval_loss']:.4f} | {100 * r['eval_exact_match']:.1f}% |")
    if "error" not in results.get("ours", {"error": 1}):
        ours = results["ours"]["cpu_s_per_step"]
        lines.append("")
        for name, r in results.items():
            if name != "ours" and "error" not in r:
                lines.append(f"- {name} / ours: {r['cpu_s_per_step'] / ours:.2f}x the CPU time per step")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=36, help="optimizer steps per stack (the demo's 36)")
    parser.add_argument("--stacks", default=",".join(STACKS), help=f"comma-separated subset of {','.join(STACKS)}")
    parser.add_argument("--worker", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.out)
        return
    stacks = [s for s in args.stacks.split(",") if s]
    if not stacks or any(s not in STACKS for s in stacks) or args.steps <= WARMUP:
        parser.error(f"--stacks takes a subset of {','.join(STACKS)}; --steps must exceed {WARMUP}")
    import torch

    torch.set_num_threads(1)  # as in each worker, so that the header's machine line says so
    prov = record("vs_trl.py", "cpu")
    results, loads = {}, {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for stack in stacks:
        print(f"{stack}: {args.steps} steps ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            proc = subprocess.run([sys.executable, __file__, "--worker", stack, f"--steps={args.steps}",
                                   f"--out={out}"], env=env, cwd=ROOT, capture_output=True, text=True,
                                  errors="replace")
            loads[stack] = load_average()
            if proc.returncode != 0 or not out.is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
                results[stack] = {"error": " ".join(tail) or f"exit status {proc.returncode}"}
            else:
                results[stack] = json.loads(out.read_text(encoding="utf-8"))
        print(f"  {results[stack]}", flush=True)
    text = report(prov, results, loads, args.steps)
    write_result(RESULTS / "vs-trl-cpu", {**prov, "steps": args.steps, "load_average": loads, "results": results},
                 text)
    print(text)


if __name__ == "__main__":
    sys.exit(cli.run(main))
