"""One command for a borrowed GPU: its tests, the memory reports, the lever tables, the max-context searches and the
throughput comparison, in parts of at most nine minutes, every result kept the moment it is measured.

    bash benchmarks/gpu.sh OUT --part 1                  # then --part 2, 3, 4: one command each
    bash benchmarks/gpu.sh OUT --size tiny --part all    # the same plumbing on the CPU, at the tiny size

Parts at full size (each item gets at most its cap and what is left of the part's --budget, 540 s by default, and
stops itself in time); each part first installs the wheels missing here from --wheels (no network):
  1  the GPU tests, the memory reports of SmolLM2-135M (synthetic weights: its GGUF is not here) and Llama-3.1-8B,
     and the 8B throughput comparison
  2  the 70B memory report, the 8B lever table and max-context search
  3  the 70B lever table and max-context search
  4  optional: the lever tables and searches again where the deadline cut them short (on the same machine they go on
     from their logs), the CPU test suite on this machine (CPU tests must stay on the CPU here too), and the 8B
     estimate-against-measurement test
  5  issue 22, each item alone under nine minutes (truncated-depth probes, qlora/memory/depth.py): snapshot-70b (the
     allocator recorded through one 70B probe at 58,368 tokens: the snapshot, compacted, and what it holds at its
     peak, by term of the estimator); rows-70b and rows-8b (the estimate beside the measured card peak at 2K / ~30K /
     ~60K and 2K / ~100K / ~300K tokens, the plan of an 80 GB card, one full-depth probe each as the check); and the
     longest context of each recipe on emulated cards, context-70b-45, context-70b-79.6, context-8b-24,
     context-8b-45, context-8b-79.6 (--budget-gib: nvidia-smi's totals for an L40S, an H100 80GB, an RTX 4090; the
     70B's weights alone exceed 24 GiB). Their reports go to memory_reports/ (in reports.tar.gz).
  6  issue 24, each item alone under nine minutes: speed-8b (throughput.py at 8B, 1 x 2048: the standard stack, ours
     as shipped, ours with train.plan=fastest on the whole card and within 14 GiB (the standard stack's peak), each
     also with our fused paths set (fuse_lora, and dequant_once or reuse_dequant), ours on a 16-bit base; 2 more
     steps of each profiled: the kernel table and the SDPA backend that ran), unsloth-8b (the same command with
     Unsloth's stack added: only Unsloth is measured, the others come from speed-8b's log, and the report holds them
     all side by side), speed-70b (the standard stack,
     the 70B recipe as shipped and its fastest plan, with their kernel tables), lever-costs-8b (every lever's step
     time at 8B: the CUDA column of qlora/memory/costs.py)
  7  issue 25, the 4-bit base streamed from host memory (train.stream_base), each item alone under nine minutes:
     stream-tests (its CUDA tests: the loss and gradients of the base held whole, the bytes after the round trip);
     stream-70b (recipes/llama70b_24gb.py, a step at 2,048 tokens judged against 12 GiB, the smallest-card target:
     its peak answers the 24 GiB one too); stream-8b (recipes/llama8b_6gb.py against 6 GiB); context-70b-24gb-24
     (its longest context within 24 GiB, truncated-depth probes); throughput-70b-stream (recipes/llama70b.py at
     4,096 tokens, the base streamed against resident in one command: the step-time ratio, target <= 1.3).

OUT receives four files (five with traces.tar: the profiler traces of part 6, as many as fit 15 MiB), each rewritten
after every item, so a command cut short leaves everything finished:
summary.md (device, date, command, versions, then each item's outcome and reports), results.jsonl (one line per
item), log.txt (all the items printed), reports.tar.gz (the reports at their paths in the repository,
memory_reports/... and benchmarks/results/..., to unpack at its root; and each item's log under logs/). Work files
live in --work: an item finished there is not run again by a later command on the same machine, and the benchmarks
take up their logged probes from there (--fresh starts over).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probes import CUT_SHORT, ROOT  # noqa: E402  (sibling scripts, not a package)
from provenance import git_commit  # noqa: E402

GRACE = 20  # seconds between an item's own deadline and the kill: to write its report and end its probe
APART_BYTES = 15 * 2**20  # traces.tar, snapshots.tar: under the 16 MiB a file from $OUT may have
UNSLOTH_SITE = "/tmp/qlora-unsloth-site"  # WHEELS/unsloth/ installed apart: Unsloth pins datasets < 5, trl <= 1.15
# speed-8b's stacks (benchmarks/throughput.py): the standard stack, ours as shipped, the plan on the whole card and
# within the standard stack's peak, each with and without our fused paths, and ours on a 16-bit base.
STACKS_8B = "standard,ours,ours-fastest,ours-fastest-fused,ours-fastest-14gib,ours-fastest-14gib-fused,ours-lora16"


@dataclass
class Item:
    part: int
    name: str
    cmd: list[str]
    cap: float
    """Seconds at most, within what is left of the part's budget."""
    reports: list[str] = field(default_factory=list)
    """Globs, under the work dir, of the reports the item writes."""
    deadline: bool = False
    """The command takes --deadline=SECONDS and stops itself by then, keeping what it measured."""


def plan(size: str, work: Path, python: str) -> list[Item]:
    """Every item, in order. An item of part 4 that already ran in an earlier part goes on from its log there (or is
    skipped, if it finished). At the tiny size the same kinds of items on the tiny Llama, cut to what the CPU does in
    minutes."""
    mem, res = f"--out-dir={work}/memory_reports", f"--out-dir={work}/benchmarks/results"
    memory = [python, "-m", "qlora.memory"]
    levers = [python, "benchmarks/memory_levers.py", res]
    speed = [python, "benchmarks/throughput.py", res]
    # The GPU tests in one process, whatever pyproject's addopts say: two workers on one card would measure each
    # other's memory (and an image without pytest-xdist would refuse addopts' `-n 2`).
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=-ra"]
    # The 8B estimate test measures what memory-llama8b measures: it runs last, in what part 4 leaves.
    gpu_tests = [*pytest, "-k", "(gpu or on_cuda) and not llama8b", "tests/test_gpu.py", "tests/test_memory_gpu.py",
                 "tests/test_levers.py", "qlora/levers/liger/test_liger.py",
                 "qlora/levers/checkpoints/test_checkpoints.py", "qlora/levers/loss/test_loss.py",
                 "qlora/levers/lm_head/test_lm_head.py"]
    # The CPU suite on the image's versions, the GPU hidden (so that no test touches it), in 8 workers where the image
    # has pytest-xdist (it had on 2026-11-17): one process would not finish in its cap.
    xdist = " -n 8 --dist loadfile" if importlib.util.find_spec("xdist") else ""
    cpu_tests = ["env", "CUDA_VISIBLE_DEVICES=", python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
                 f"addopts=-ra{xdist}", "-k", "not gpu and not on_cuda", "tests", "qlora"]
    unsloth = f"--unsloth-site={UNSLOTH_SITE}"
    speed8b = [*speed, "--size=8b", "--profile=2", unsloth]
    reports22 = f"{work}/memory_reports"
    issue22 = [python, "benchmarks/memory_levers.py", f"--out-dir={reports22}", "--no-levers", "--probe-steps=1"]
    if size == "tiny":
        tiny = ["--size=tiny", "--probe-steps=1", "--probe-timeout=120"]
        context = [*levers, *tiny, "--no-levers", "--max-context"]
        reports = ["benchmarks/results/memory-levers-*-tiny.md"]
        return [
            Item(1, "gpu-tests", gpu_tests, 120),
            Item(1, "memory-tiny", [*memory, "recipes/tiny.py", "--measure", "--methods=qlora", mem], 240,
                 ["memory_reports/tiny-*.md"]),
            Item(1, "throughput-tiny", [*speed, "--size=tiny", "--stacks=standard,ours", "--steps=2", "--warmup=1",
                                        "--probe-timeout=120"], 240, ["benchmarks/results/throughput-*-tiny.md"], True),
            Item(2, "levers-tiny", [*levers, *tiny, "--levers=baseline,hf_offload"], 240, reports, True),
            Item(2, "context-tiny", [*context, "--max-probes=2"], 240, reports, True),
            Item(3, "levers-tiny-more", [*levers, *tiny, "--levers=baseline,quantize_lm_head"], 240, reports, True),
            Item(4, "context-tiny-more", [*context, "--max-probes=1"], 240, reports, True),
            # The tiny Llama has two layers: a probe of one, predicted for both, beside one of both; recorded.
            Item(5, "rows-tiny", [*issue22, "--size=tiny", "--rows=256", "--full-depth-at=256", "--depth=1",
                                  "--probe-timeout=120", f"--history={reports22}/snapshots/tiny-256-cpu.pickle.gz"],
                 240, ["memory_reports/tiny-rows-*.md"], True),
            # Issue 24: our step as shipped and as the plan picks it, profiled, and Unsloth's row (on a CPU machine
            # without its site folder it says why it did not run).
            Item(6, "speed-tiny", [*speed, "--size=tiny", "--stacks=ours-fastest,unsloth", "--steps=1",
                                   "--warmup=0", "--profile=1", "--probe-timeout=120", unsloth], 240,
                 ["benchmarks/results/throughput-*-tiny.md"], True),
        ]
    smollm2 = ["--model.synthetic=true", "--model.config_json=recipes/configs/smollm2-135m/config.json",
               "--model.build=none"]
    def search(part: int, size: str, cap: float) -> Item:
        return Item(part, f"context-{size}", [*levers, f"--size={size}", "--no-levers", "--max-context",
                                              "--probe-timeout=300"], cap,
                    [f"benchmarks/results/memory-levers-*-{size}.md"], True)

    def card(size: str, budget: float, part: int = 5) -> Item:  # the longest context on an emulated card
        name = f"{budget:g}gib".replace(".", "_")  # as memory_levers.py names the report
        recipe = f"llama{size}".replace("-", "_")  # 70b-24gb: recipes/llama70b_24gb.py
        # The 24 and 45 GiB cards (RTX 4090, L40S) are sm89, where torch runs FlashAttention-2; the H200 would run
        # cuDNN's attention, whose backward holds less (qlora/base/attention.py). The 79.6 GiB H100 runs cuDNN's.
        kernel = ["--override=--model.sdpa_backend=flash"] if budget < 79 else []
        # On the 79.6 GiB card a probe is long (8B at 640K tokens: ~3e16 FLOPs of attention in two layers, a minute
        # or more): steps of 10% from the estimate's length, so that an estimate within 10% is bracketed by two
        # probes and one bisection ends the search within its 1/16.
        growth = ["--growth=1.1"] if budget >= 79 else []
        return Item(part, f"context-{size}-{budget:g}", [*issue22, f"--size={size}", "--max-context", "--depth=auto",
                                                      f"--budget-gib={budget}", "--probe-timeout=300",
                                                      "--max-seq=1048576", *kernel, *growth], 540,
                    [f"memory_reports/{recipe}-context-cuda-{name}.md"], True)

    def table(part: int, size: str, cap: float) -> Item:
        return Item(part, f"levers-{size}", [*levers, f"--size={size}", "--probe-timeout=150"], cap,
                    [f"benchmarks/results/memory-levers-*-{size}.md"], True)

    return [
        Item(1, "gpu-tests", gpu_tests, 150),
        Item(1, "memory-smollm2", [*memory, "recipes/smollm2_135m.py", "--measure", mem, *smollm2], 90,
             ["memory_reports/smollm2_135m-*.md"]),
        Item(1, "memory-llama8b", [*memory, "recipes/llama8b.py", "--measure", mem], 150,
             ["memory_reports/llama8b-*.md"]),
        Item(1, "throughput-8b", [*speed, "--size=8b", "--probe-timeout=150"], 540,
             ["benchmarks/results/throughput-*-8b.md"], True),
        Item(2, "memory-llama70b", [*memory, "recipes/llama70b.py", "--measure", mem], 150,
             ["memory_reports/llama70b-*.md"]),
        table(2, "8b", 200),
        search(2, "8b", 540),
        table(3, "70b", 300),
        search(3, "70b", 540),
        # Part 4 goes on with whatever parts 2 and 3 left cut short (an item that finished is skipped at no cost).
        table(4, "8b", 90), search(4, "8b", 120), table(4, "70b", 120), search(4, "70b", 120),
        Item(4, "cpu-tests", cpu_tests, 300),
        Item(4, "gpu-test-8b-estimate", [*pytest, "-k", "llama8b", "tests/test_memory_gpu.py"], 200),
        # Issue 22. The rows share their probe logs with the snapshot's (the same setup): its 58,368 row is theirs.
        Item(5, "snapshot-70b", [*issue22, "--size=70b", "--rows=58368", "--depth=auto", "--budget-gib=79.6",
                                 "--probe-timeout=420",
                                 f"--history={reports22}/snapshots/llama70b-58368-cuda.pickle.gz"], 480,
             ["memory_reports/llama70b-rows-*.md"], True),
        Item(5, "rows-70b", [*issue22, "--size=70b", "--rows=2048,29696,58368", "--full-depth-at=29696",
                             "--depth=auto", "--budget-gib=79.6", "--probe-timeout=240"], 540,
             ["memory_reports/llama70b-rows-*.md"], True),
        Item(5, "rows-8b", [*issue22, "--size=8b", "--rows=2048,100352,300032", "--full-depth-at=100352",
                            "--depth=auto", "--budget-gib=79.6", "--probe-timeout=240"], 540,
             ["memory_reports/llama8b-rows-*.md"], True),
        card("70b", 45.0), card("70b", 79.6), card("8b", 24.0), card("8b", 45.0), card("8b", 79.6),
        # Issue 24. Unsloth's item runs speed-8b's command with its stack added: the others come from the log.
        Item(6, "speed-8b", [*speed8b, f"--stacks={STACKS_8B}",
                             "--probe-timeout=150"],
             420, ["benchmarks/results/throughput-*-8b.md"], True),
        # Unsloth first: on a fresh machine (no speed-8b log to take the others from) they come after it.
        Item(6, "unsloth-8b", [*speed8b, f"--stacks=unsloth,{STACKS_8B}",
                               "--probe-timeout=420"], 500, ["benchmarks/results/throughput-*-8b.md"], True),
        Item(6, "speed-70b", [*speed, "--size=70b", "--stacks=standard,ours,ours-fastest", "--steps=3", "--profile=1",
                              "--probe-timeout=240"], 540, ["benchmarks/results/throughput-*-70b.md"], True),
        Item(6, "lever-costs-8b", [python, "benchmarks/lever_costs.py", res, "--size=8b", "--steps=5", "--warmup=1",
                                     "--probe-timeout=120"], 540,
             ["benchmarks/results/lever-costs-*-8b.md"], True),
        # Issue 25. stream-70b's peak at 2,048 tokens is the card it needs: judged against the smallest-card target.
        Item(7, "stream-tests", [*pytest, "-k", "cuda", "qlora/levers/stream_base/test_stream_base.py"], 150),
        Item(7, "stream-70b", [*levers, "--size=70b-24gb", "--levers=recipe", "--budget-gib=12",
                               "--probe-timeout=420"], 480, ["benchmarks/results/memory-levers-*-70b-24gb.md"], True),
        Item(7, "stream-8b", [*levers, "--size=8b-6gb", "--levers=recipe", "--budget-gib=6", "--probe-timeout=240"],
             300, ["benchmarks/results/memory-levers-*-8b-6gb.md"], True),
        card("70b-24gb", 24.0, part=7),
        Item(7, "throughput-70b-stream", [*speed, "--size=70b", "--seq=4096", "--stacks=ours,ours-streamed",
                                          "--steps=3", "--warmup=1", "--probe-timeout=250", "--tag=stream"], 540,
             ["benchmarks/results/throughput-*-70b-stream.md"], True),
    ]


# --- installing what is missing, without a network ---

def missing_wheels(wheels: Path, site: Path) -> list[Path]:
    """The wheels in `wheels` whose distribution is installed neither here nor in `site`."""
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    missing = []
    for wheel in sorted(wheels.glob("*.whl")):
        try:
            importlib.metadata.version(wheel.name.split("-")[0])
        except importlib.metadata.PackageNotFoundError:
            missing.append(wheel)
    return missing


def install(wheels: Path, site: Path, python: str) -> list[str]:
    """Install the missing wheels into `site` (on every item's PYTHONPATH); return their distribution names."""
    if not wheels.is_dir():
        return []
    missing = missing_wheels(wheels, site)
    if missing:
        pip = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                              "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, missing)],
                             capture_output=True, text=True)
        if pip.returncode:
            raise RuntimeError(f"pip install from {wheels} failed: {(pip.stderr or pip.stdout).strip()[-400:]}")
    return [w.name.split("-")[0] for w in missing]


VERSIONS = """
import importlib.metadata as m, json, platform, sys, torch
found = {"python": platform.python_version()}
for name in ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "datasets", "gguf", *sys.argv[1:]):
    try:
        found[name] = m.version(name)
    except m.PackageNotFoundError:
        found[name] = "not installed"
import bitsandbytes  # the import that fails where its CUDA library does not load
cuda = torch.cuda.is_available()
found["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
found["cuda"] = torch.version.cuda if cuda else None
print("RESULT " + json.dumps(found))
"""


# --- the run ---

class Battery:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out, self.work = Path(args.out), Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.command = shlex.join(["bash", "benchmarks/gpu.sh", *args.argv])
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.site, str(ROOT),
                                                                 os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        self.done_before = {} if args.fresh else self.read(self.work / "results.jsonl")
        self.rows: list[dict] = []
        self.setup: dict = {}
        for name in ("summary.md", "results.jsonl", "log.txt"):
            (self.out / name).unlink(missing_ok=True)

    @staticmethod
    def read(path: Path) -> dict[str, dict]:
        if not path.exists():
            return {}
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return {row["item"]: row for row in rows if row["status"] == "ok"}

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.started)

    def log(self, text: str) -> None:
        print(text, flush=True)
        with open(self.out / "log.txt", "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def prepare(self, items: list[Item]) -> None:
        """Install what is missing (Unsloth's site only for the items that run it: some 18 wheels), then read the
        versions and the device as the items will see them."""
        wheels, site = Path(self.args.wheels), self.args.site
        try:
            installed = install(wheels, Path(site), self.args.python)
            self.setup["install"] = f"installed from {wheels} into {site}: {', '.join(installed)}" if installed \
                else f"nothing to install from {wheels}" + ("" if wheels.is_dir() else " (no such folder)")
        except RuntimeError as err:
            installed, self.setup["install"] = [], str(err)
        unsloth = Path(self.args.wheels) / "unsloth"
        wanted = any(a.startswith("--stacks=") and "unsloth" in a.split("=", 1)[1].split(",") for i in items
                     for a in i.cmd)
        if wanted and unsloth.is_dir() and any(unsloth.glob("*.whl")) and \
                not (Path(UNSLOTH_SITE) / "unsloth").is_dir():
            pip = subprocess.run([self.args.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                  "--no-compile", "--no-cache-dir", "--upgrade", "--target", UNSLOTH_SITE,
                                  *map(str, sorted(unsloth.glob("*.whl")))], capture_output=True, text=True)
            self.setup["install"] += f"; {unsloth}: " + (f"installed into {UNSLOTH_SITE}" if not pip.returncode else
                                                         f"failed: {(pip.stderr or pip.stdout).strip()[-300:]}")
        self.log(f"== setup: {self.setup['install']}")
        proc = subprocess.run([self.args.python, "-c", VERSIONS, *installed], capture_output=True, text=True,
                              env=self.env, cwd=ROOT, timeout=300)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        self.setup["versions"] = json.loads(found[-1][7:]) if found else {"error": proc.stderr.strip()[-500:]}
        self.log(f"   {self.setup['versions']}")
        self.setup["qlora"] = git_commit() or "unknown (no git history here)"

    def run(self, item: Item) -> dict:
        row = {"part": item.part, "item": item.name, "command": shlex.join(item.cmd)}
        if item.name in self.done_before:
            return {**self.done_before[item.name], "status": "ok", "note": "finished by an earlier command"}
        limit = min(item.cap, self.left())
        if limit < 30:
            return {**row, "status": "not run", "note": f"{self.left():.0f} s left of the part's budget"}
        cmd = item.cmd + ([f"--deadline={max(10, limit - GRACE):.0f}"] if item.deadline else [])
        row["command"] = shlex.join(cmd)
        self.log(f"== part {item.part}: {item.name} (at most {limit:.0f} s)\n$ {row['command']}")
        started = time.monotonic()
        item_log = self.work / "logs" / f"{item.name}.txt"
        with open(item_log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc, status = proc.wait(timeout=limit), None
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)  # a benchmark kills its probe, then exits
                try:
                    proc.wait(timeout=GRACE)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc, status = proc.returncode, "timed out"
        text = item_log.read_text(encoding="utf-8", errors="replace")
        self.log(text.rstrip())
        lines = [line for line in text.splitlines() if line.strip()]
        row.update(status=status or {0: "ok", CUT_SHORT: "cut short"}.get(rc, "failed"), rc=rc,
                   seconds=round(time.monotonic() - started, 1), last_line=lines[-1][:300] if lines else "",
                   reports=sorted(str(p.relative_to(self.work)) for pattern in item.reports
                                  for p in self.work.glob(pattern)))
        with open(self.work / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if row["status"] == "ok":
            self.done_before[item.name] = row
        return row

    def write(self) -> None:
        """summary.md, results.jsonl and reports.tar.gz in OUT, each replaced whole."""
        v = self.setup.get("versions", {})
        lines = [f"# GPU battery, part {self.args.part}, {self.args.size} size", "",
                 f"- device: {v.get('device', 'unknown')} (CUDA {v.get('cuda')})",
                 f"- date: {self.date}", f"- command: `{self.command}`",
                 f"- versions: {', '.join(f'{k} {val}' for k, val in v.items() if k not in ('device', 'cuda'))}",
                 f"- qlora: {self.setup.get('qlora')}", f"- setup: {self.setup.get('install')}", "",
                 "| part | item | status | seconds | last line |", "|---:|---|---|---:|---|"]
        lines += [f"| {r['part']} | {r['item']} | {r['status']}{' (' + r['note'] + ')' if r.get('note') else ''} | "
                  f"{r.get('seconds', '')} | {r.get('last_line', '').replace('|', '/')} |" for r in self.rows]
        reports = dict.fromkeys(report for r in self.rows for report in r.get("reports", []))  # each once, as now
        for report in reports:
            path = self.work / report
            if path.suffix == ".md" and path.exists():
                text = path.read_text(encoding="utf-8")
                lines += ["", f"## {report}", "", "##" + text if text.startswith("# ") else text]
        replace(self.out / "summary.md", "\n".join(lines) + "\n")
        replace(self.out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        tmp = self.out / ".reports.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for sub in ("memory_reports", "benchmarks/results", "logs"):
                if (self.work / sub).is_dir():
                    tar.add(self.work / sub, arcname=sub, filter=lambda m: None if "/traces" in m.name
                            or m.name.endswith(".pickle.gz") else m)
        os.replace(tmp, self.out / "reports.tar.gz")
        # The profiler traces (throughput.py --profile) and the allocator snapshots (--history), each apart: a file
        # comes back only up to 16 MiB, and the reports must come back whatever these weigh.
        capped(sorted((self.work / "benchmarks/results/traces").glob("*.json.gz")), "traces", self.out / "traces.tar")
        capped(sorted((self.work / "memory_reports/snapshots").glob("*.pickle.gz")), "memory_reports/snapshots",
               self.out / "snapshots.tar")


def capped(files: list[Path], folder: str, tar_path: Path) -> None:
    """`files` (gzipped already) into an uncompressed tar under `folder`/, as many as fit APART_BYTES, smallest first
    (a full-size profile is several MB: the most of them that fit); none larger than that alone. No tar when none
    fits. The kernel tables they were read into are in the reports whatever comes back."""
    kept = sorted((f for f in files if f.stat().st_size <= APART_BYTES), key=lambda f: f.stat().st_size)
    kept = [f for i, f in enumerate(kept) if sum(k.stat().st_size for k in kept[:i + 1]) <= APART_BYTES]
    if kept:
        tmp = tar_path.with_name(f".{tar_path.name}.tmp")
        with tarfile.open(tmp, "w") as tar:
            for f in kept:
                tar.add(f, arcname=f"{folder}/{f.name}")
        os.replace(tmp, tar_path)


def replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="where the four result files go (e.g. $OUT)")
    parser.add_argument("--part", default="1", help="1, 2, 3, 4, 5, 6, 7, a list such as 1,2, or all")
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="tiny: the CPU plumbing run")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole command")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="wheels to install where missing")
    parser.add_argument("--site", default="/tmp/qlora-gpu-site", help="where they are installed")
    parser.add_argument("--work", help="work files (default runs/gpu-battery, runs/gpu-battery-tiny)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of every item")
    parser.add_argument("--items", help="only these items of the parts, in the order given (e.g. "
                        "gpu-tests,memory-llama70b): for a lease shorter than the parts")
    parser.add_argument("--fresh", action="store_true", help="run every item again, every probe too")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.work = args.work or str(ROOT / "runs" / ("gpu-battery-tiny" if args.size == "tiny" else "gpu-battery"))
    parts = {1, 2, 3, 4, 5, 6, 7} if args.part == "all" else {int(p) for p in args.part.split(",")}
    items = [i for i in plan(args.size, Path(args.work), args.python) if i.part in parts]
    if args.items:
        named: dict[str, Item] = {}
        for i in items:  # the first of two items of one name: part 4's are shorter goes at what 2 and 3 left
            named.setdefault(i.name, i)
        unknown = [name for name in args.items.split(",") if name not in named]
        if unknown:
            parser.error(f"--items: no item {', '.join(unknown)} in part {args.part}; the items: {', '.join(named)}")
        items = [named[name] for name in args.items.split(",")]
    if args.fresh:
        items = [Item(i.part, i.name, [*i.cmd, "--fresh"] if i.deadline else i.cmd, i.cap, i.reports, i.deadline)
                 for i in items]
    if args.dry_run:
        for i in items:
            print(f"part {i.part} {i.name} (<= {i.cap:.0f} s): {shlex.join(i.cmd)}")
        return 0
    battery = Battery(args)
    battery.prepare(items)
    battery.write()
    for item in items:
        battery.rows.append(battery.run(item))
        battery.write()
    failed = [r["item"] for r in battery.rows if r["status"] != "ok"]
    battery.log(f"== done in {time.monotonic() - battery.started:.0f} s; "
                f"{'not ok: ' + ', '.join(failed) if failed else 'every item ok'}; results in {battery.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
