"""`bash benchmarks/gpu.sh OUT --size tiny`: the GPU battery's plumbing, run for real on the CPU as on a CI machine
(no GPU, no network): wheels installed from a folder, every part, the four files in OUT, resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def wheel(folder: Path) -> Path:
    """A real, minimal wheel of a package installed nowhere: what the battery must install from --wheels."""
    name = "qlora_battery_probe"
    path = folder / f"{name}-1.0-py3-none-any.whl"
    files = {f"{name}/__init__.py": "VALUE = 1\n",
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{name}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            "Tag: py3-none-any\n"}
    files[f"{name}-1.0.dist-info/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{name}-1.0.dist-info/RECORD"])
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def battery(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the battery sets its own: the wheel site, then the repository
    return subprocess.run(["bash", "benchmarks/gpu.sh", str(tmp / "out"), "--size=tiny", f"--work={tmp / 'work'}",
                           f"--wheels={tmp / 'wheels'}", f"--site={tmp / 'site'}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def test_the_battery_runs_every_part_at_tiny_size(tmp_path: Path) -> None:
    wheel(tmp_path / "wheels")
    done = battery(tmp_path, "--part=all")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "reports.tar.gz", "results.jsonl", "snapshots.tar",
                                                     "summary.md", "traces.tar"]
    with tarfile.open(out / "snapshots.tar") as tar:  # the allocator's history of part 5, apart from the reports
        assert tar.getnames() == ["memory_reports/snapshots/tiny-256-cpu.pickle.gz"]
    with tarfile.open(out / "traces.tar") as tar:  # the profiler's record of part 6, apart from the reports
        assert "traces/ours-fastest-cpu-tiny.json.gz" in tar.getnames()

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["part"] for r in rows} == {1, 2, 3, 4, 5, 6}
    assert [r["status"] for r in rows] == ["ok"] * len(rows), rows
    summary = (out / "summary.md").read_text()
    assert "- device: cpu" in summary and "- date: " in summary
    assert "- command: `bash benchmarks/gpu.sh " in summary
    assert "installed from" in summary and "qlora_battery_probe" in summary  # the missing wheel, installed
    assert (tmp_path / "site" / "qlora_battery_probe" / "__init__.py").is_file()

    with tarfile.open(out / "reports.tar.gz") as tar:
        names = set(tar.getnames())
    for report in ("memory_reports/tiny-cpu.md", "benchmarks/results/throughput-cpu-tiny.md",
                   "benchmarks/results/memory-levers-cpu-tiny.md", "memory_reports/tiny-rows-cpu.json",
                   "memory_reports/snapshots/tiny-256-cpu.txt"):
        assert report in names, names
    # Part 5 (issue 22): a probe of one of the tiny Llama's two layers, the whole model's peak predicted from it, and
    # one probe of both; each row machine-readable; the allocator's history recorded and attributed.
    measured = json.loads((tmp_path / "work" / "memory_reports/tiny-rows-cpu.json").read_text())["rows"]
    assert [(r["tokens"], r["depth"], r["layers"]) for r in measured] == [(256, 1, 2), (256, 2, 2)]
    for r in measured:
        assert {"model", "tokens", "budget_gib", "estimated_gib", "measured_gib"} <= r.keys() and r["measured_gib"]
    assert measured[0]["measured_gib"] > measured[0]["probe_gib"]  # the missing layer's known bytes added
    assert "peak allocated" in (tmp_path / "work" / "memory_reports/snapshots/tiny-256-cpu.txt").read_text()
    # Part 6 (issue 24): our step as shipped and as train.plan=fastest picks it, with their kernel tables; Unsloth's
    # row says why it did not run on a machine without its site folder.
    speed = (tmp_path / "work" / "benchmarks/results/throughput-cpu-tiny.md").read_text()
    assert "| ours-fastest | " in speed and "train.plan=fastest chose: ours-fastest: --train.gradient_checkpointing=" \
        "false" in speed
    assert "Kernel time per step by family" in speed and "| LoRA matmuls | " in speed
    assert "| unsloth | failed: RuntimeError: unsloth could not be imported from --unsloth-site" in speed
    levers = (tmp_path / "work" / "benchmarks/results/memory-levers-cpu-tiny.md").read_text()
    for lever in ("baseline (checkpointing only)", "offload (transformers, sync)", "quantize_lm_head"):
        assert f"| {lever} | 0." in levers
    assert "Max context of the recipe within 0.50 GiB: **" in levers
    # Part 3 and 4 took their repeated probes from part 2's log: each probe was measured once.
    log = (tmp_path / "work" / "benchmarks/results/memory-levers-cpu-tiny.probes.jsonl").read_text().splitlines()
    keys = [json.loads(line)["key"] for line in log]
    assert len(keys) == len(set(keys)) and "lever baseline seq 128" in keys

    again = battery(tmp_path, "--part=2")  # the same machine, a later command: nothing to measure again
    assert again.returncode == 0, again.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["item"], r["note"]) for r in rows] == [("levers-tiny", "finished by an earlier command"),
                                                      ("context-tiny", "finished by an earlier command")]


def test_items_pick_from_the_parts_in_the_order_given_and_an_unknown_one_is_named(tmp_path: Path) -> None:
    """A lease shorter than the parts: --items runs the named items alone, in the order given, each once."""
    plan = battery(tmp_path, "--part=all", "--items=levers-tiny,gpu-tests", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert [line.split()[2] for line in plan.stdout.splitlines()] == ["levers-tiny", "gpu-tests"]
    wrong = battery(tmp_path, "--part=1", "--items=gpu-tests,levers-tiny", "--dry-run")
    assert wrong.returncode == 2 and "no item levers-tiny in part 1" in wrong.stderr
    assert "the items: gpu-tests, memory-tiny, throughput-tiny" in wrong.stderr


def test_the_batterys_gpu_tests_run_in_one_process_and_its_cpu_suite_without_the_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers on one card would measure each other's memory: the GPU items run pytest in one process, whatever
    pyproject's addopts (`-n 2`) say. The CPU suite on the image hides the GPU and runs in 8 workers where the image
    has pytest-xdist (one process would not finish in its cap), in one where it has not (`-n` would be refused)."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu import plan

    items = [i for size in ("full", "tiny") for i in plan(size, Path("/w"), "python") if "pytest" in i.cmd]
    assert {i.name for i in items} >= {"gpu-tests", "stream-tests", "cpu-tests"}
    for item in items:
        at = item.cmd.index("pytest")
        if item.name != "cpu-tests":
            assert item.cmd[at + 1:at + 8] == ["-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=-ra"]

    def cpu_tests() -> list[str]:
        return next(i.cmd for i in plan("full", Path("/w"), "python") if i.name == "cpu-tests")

    assert cpu_tests()[:2] == ["env", "CUDA_VISIBLE_DEVICES="] and "addopts=-ra -n 8 --dist loadfile" in cpu_tests()
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xdist" else found(name, *a))
    assert "addopts=-ra" in cpu_tests() and "-n" not in " ".join(cpu_tests())


def test_the_emulated_small_cards_run_the_attention_kernel_of_the_cards_they_stand_for() -> None:
    """The 24 and 45 GiB cards (RTX 4090, L40S: sm89) run FlashAttention-2, which the H200 emulating them would not
    (it runs cuDNN's attention, qlora/base/attention.py); the 79.6 GiB H100 runs cuDNN's, as the H200 does."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu import plan

    cards = {i.name: i.cmd for i in plan("full", Path("/w"), "python")
             if i.name.startswith("context-") and any(a.startswith("--budget-gib=") for a in i.cmd)}
    flash = "--override=--model.sdpa_backend=flash"
    assert {"context-8b-24", "context-8b-45", "context-70b-45", "context-70b-24gb-24", "context-8b-79.6"} <= set(cards)
    for name, cmd in cards.items():
        budget = next(float(a.split("=")[1]) for a in cmd if a.startswith("--budget-gib="))
        assert (flash in cmd) == (budget < 79), name


def test_a_cut_wheel_installs_without_the_members_dropped(tmp_path: Path) -> None:
    """benchmarks/wheels.py, as gpu_wheels.sh cuts bitsandbytes to the image's CUDA library: the members matching a
    glob and their RECORD lines go, and pip installs the rest."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from wheels import cut

    path = wheel(tmp_path / "wheels")
    with zipfile.ZipFile(path, "a") as z:  # two "libraries", as bitsandbytes ships one per CUDA version
        for cuda in ("118", "130"):
            z.writestr(f"qlora_battery_probe/lib_cuda{cuda}.so", b"\0" * 50_000)
    cut(path, ["qlora_battery_probe/lib_cuda1[12]*.so"])
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        record = z.read("qlora_battery_probe-1.0.dist-info/RECORD").decode()
    assert "qlora_battery_probe/lib_cuda130.so" in names and "qlora_battery_probe/lib_cuda118.so" not in names
    assert "lib_cuda118" not in record
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                    str(tmp_path / "site"), str(path)], check=True, capture_output=True)
    installed = {p.name for p in (tmp_path / "site" / "qlora_battery_probe").iterdir()} - {"__pycache__"}
    assert installed == {"__init__.py", "lib_cuda130.so"}
