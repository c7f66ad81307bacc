"""The trainer's check before it loads (qlora/memory/preflight.py): a step the estimate, with the allocator's margin,
puts beyond the card (or on a CPU device beyond the host's available memory) is refused in one line, exit 2, naming
the longest data.max_seq_len that fits, and nothing is loaded."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch

from qlora.config import ConfigError, apply_overrides, load_recipe
from qlora.memory.arch import load_arch
from qlora.memory.estimate import estimate
from qlora.memory.preflight import check_fits, fits
from qlora.memory.profiler import available_bytes
from qlora.train import main  # before fake_gpu: bitsandbytes picks its backend at import

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def at(cfg, tokens: int, device: str):  # noqa: ANN001, ANN202 (Config, Estimate)
    c = copy.deepcopy(cfg)
    c.data.max_seq_len = tokens
    return estimate(c, load_arch(c), c.quant.method, device)


@pytest.fixture
def small_card(fake_gpu: None, monkeypatch: pytest.MonkeyPatch) -> int:
    """fake_gpu's machine with a 1 GiB card: its size read as the trainer reads it, no CUDA initialised."""
    size = GIB
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=size, name="a 1 GiB card"))
    return size


def test_a_step_beyond_the_card_is_refused_naming_the_longest_that_fits() -> None:
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "llama70b.py"), ["--data.max_seq_len=65536"])
    card, host = 48 * GIB, 128 * GIB
    with pytest.raises(ConfigError) as refused:
        check_fits(cfg, torch.device("cuda"), device_bytes=card, host_bytes=host)
    message = str(refused.value)
    assert message.startswith("data.max_seq_len=65536: the step is estimated at ") and "\n" not in message
    assert "with the allocator's margin and the card has 48.00 GiB" in message
    longest = int(message.split("--data.max_seq_len=")[1].split(",")[0])
    assert fits(at(cfg, longest, "cuda"), card, host) and not fits(at(cfg, longest + 64, "cuda"), card, host)
    # The margin is what decides it: the tensors alone would fit 64 tokens more.
    assert at(cfg, longest + 64, "cuda").peak_bytes <= card
    assert check_fits(apply_overrides(cfg, [f"--data.max_seq_len={longest}"]), torch.device("cuda"),
                      device_bytes=card, host_bytes=host) is not None


def test_the_trainer_refuses_before_loading_on_a_small_card(tmp_path: Path, small_card: int,
                                                           capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny recipe on CUDA (fake_gpu: initialising CUDA raises, so loading would fail otherwise) at rows of 2^20
    tokens: exit 2, one line, the longest length the 1 GiB card takes, and no run directory written."""
    out = tmp_path / "run"
    code = main(["recipes/tiny.py", "--train.device=cuda", "--data.max_seq_len=1048576", f"--output.dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: data.max_seq_len=1048576: the step is estimated at ")
    assert "a 1 GiB card has 1.00 GiB" in err[0] and not out.exists()
    longest = int(err[0].split("--data.max_seq_len=")[1].split(",")[0])
    cfg = load_recipe(ROOT / "recipes" / "tiny.py")
    assert 0 < longest < 1048576 and at(cfg, longest, "cuda").card_bytes <= small_card < \
        at(cfg, longest + 64, "cuda").card_bytes
    # A card smaller than the context and the margin takes nothing at all.
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=GIB // 2, name="x"))
    assert main(["recipes/tiny.py", "--train.device=cuda", f"--output.dir={out}"]) == 2
    assert "not even 64 tokens fit: use a larger card" in capsys.readouterr().err


def test_the_70b_recipe_on_this_cpu_is_refused_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """recipes/llama70b.py --train.device=cpu, which the CUDA refusal suggests: on a host with less available memory
    than its estimate, one line and exit 2 instead of a load of minutes and an out-of-memory error."""
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "llama70b.py"), ["--train.device=cpu"])
    if estimate(cfg, load_arch(cfg), "qlora", "cpu").peak_bytes <= available_bytes():
        pytest.skip("this host has the memory for 70B on its CPU")
    code = main(["recipes/llama70b.py", "--train.device=cpu", f"--output.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "available (python -m qlora.memory RECIPE estimates it, nothing " \
        "loaded): not even 64 tokens fit: use a GPU, or a machine with more memory" in err[0], err
