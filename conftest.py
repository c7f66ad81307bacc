"""Fixtures for every test, those under tests/ and those in the lever folders (qlora/levers/*/test_*.py): the tiny
recipe cut to a short run into a temporary directory, a batch of its rows, the repo root as cwd, and a forked-CLI
server per pytest worker (tests/forked_cli.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from forked_cli import ForkedCLI

from qlora.config import Config, load_recipe
from qlora.data.batches import collate
from qlora.data.splits import load_splits

ROOT = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipes name their data relative to the repo root."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="session")
def cli():
    """Runs `python -m qlora.<command>` in real processes forked from one that imported qlora once (per pytest
    worker: the server never runs anything itself, so every child starts from the same state)."""
    with ForkedCLI() as server:
        yield server


@pytest.fixture
def tiny_config(tmp_path: Path) -> Config:
    """recipes/tiny.py cut to a few steps, writing into tmp_path/run."""
    cfg = load_recipe(ROOT / "recipes" / "tiny.py")
    cfg.output.dir = str(tmp_path / "run")
    cfg.train.steps = 4
    cfg.train.eval_every = 0
    cfg.train.log_every = 1
    return cfg


@pytest.fixture
def batch(tiny_config: Config) -> dict:
    """Four rows of the tiny recipe's training data, collated."""
    from qlora.base.build import ensure_checkpoint
    from qlora.base.load import load_tokenizer

    tokenizer = load_tokenizer(ensure_checkpoint(tiny_config))
    rows, _ = load_splits(tiny_config.data, tokenizer, seed=0)
    return collate(rows[:4], tokenizer.pad_token_id)




@pytest.fixture(scope="session")
def unlike_tiny(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 (a function of a base's name)
    """The overrides that put recipes/tiny.py on a base of support.UNLIKE_TINY, each built once per session."""
    from support import build_unlike_tiny

    built: dict[str, list[str]] = {}

    def overrides(name: str) -> list[str]:
        if name not in built:
            built[name] = build_unlike_tiny(name, tmp_path_factory.mktemp(name))
        return built[name]

    return overrides


@pytest.fixture(scope="session")
def measured(cli: ForkedCLI, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 (a function of overrides)
    """Measured CPU peaks of recipes/tiny.py by override tuple, taken once per session: the smaller of two runs in one
    measuring process (qlora.report.measure --runs=2: a warm-up, then two measured runs, each freed before the
    next), should one of them meet a machine's own disturbance. Before measurement runs mmapped every block of 8 KiB
    or more (readings.MEASURE_MMAP_THRESHOLD; it was 64 KiB), holes in malloc's heap made the same step's peak vary
    by up to 38 MiB from run to run."""
    from support import measure

    cache, out = {}, tmp_path_factory.mktemp("measured")

    def peak(*overrides: str, steps: int = 1) -> int:
        if (overrides, steps) not in cache:
            result = measure(cli, "recipes/tiny.py", "qlora", out / str(len(cache)), f"--steps={steps}", "--runs=2",
                             *overrides)
            assert len(result["runs"]) == 2 and result["measured_peak_bytes"] == min(result["runs"]), result
            cache[overrides, steps] = result["measured_peak_bytes"]
        return cache[overrides, steps]

    return peak


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine where torch sees one GPU and initialising CUDA fails, as in a forked child of a process that
    initialised it: code that must stay on the CPU, or refuse before touching the GPU, can be checked anywhere."""
    import torch

    def no_cuda(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA was initialised")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for module in (torch.cuda, torch.cuda.random):  # random.py binds these names at import
        monkeypatch.setattr(module, "device_count", lambda: 1)
        monkeypatch.setattr(module, "_lazy_init", no_cuda)


# pytest-xdist hands whole files to its two workers in collection order, the next as a worker finishes one: a long file
# collected last runs alone at the end while the other worker waits (the GPU battery's ~115 s did, 2026-12-04). The
# longest files, in seconds on the 2-core machine that day: battery 117, crash 94, export 83, distributed 61,
# bad_input 61, memory 58, checkpoints 43; they go first.
LONGEST_FIRST = ["tests/test_gpu_battery.py", "tests/test_crash.py", "tests/test_export.py",
                 "tests/test_distributed.py", "tests/test_bad_input.py", "tests/test_memory.py",
                 "qlora/levers/checkpoints/test_checkpoints.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


def pytest_configure(config: pytest.Config) -> None:
    # Two cores and two pytest workers: one thread per process avoids oversubscription, in the subprocesses tests
    # start and in the workers themselves (which imported torch, with a thread per core, before this ran).
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
