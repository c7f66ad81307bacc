"""The trainer's check before it loads (qlora/memory/preflight.py): a step the estimate, with the allocator's margin,
puts beyond the card (or on a CPU device beyond the host's available memory) is refused in one line, exit 2, naming
the longest data.max_seq_len that fits, and nothing is loaded."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest
import torch
from forked_cli import ForkedCLI

from qlora.config import apply_overrides, load_recipe
from qlora.errors import ConfigError
from qlora.memory.arch import load_arch
from qlora.memory.estimate import estimate
from qlora.memory.preflight import available_on, check_fits, fits, needs, process_margin, say_fits
from qlora.memory.readings import available_bytes
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
    assert "--train.batch_size" not in message  # one row a micro-batch already
    assert fits(at(cfg, longest, "cuda"), card, host) and not fits(at(cfg, longest + 64, "cuda"), card, host)
    # The margin is what decides it: the tensors alone would fit 64 tokens more.
    assert at(cfg, longest + 64, "cuda").peak_bytes <= card
    assert check_fits(apply_overrides(cfg, [f"--data.max_seq_len={longest}"]), torch.device("cuda"),
                      device_bytes=card, host_bytes=host) is not None


def test_the_card_holds_the_peak_and_the_allocators_margin_once() -> None:
    """The margin fitted on an H200 (issue 22), worked by hand for the 70B recipe at 2,048 tokens: 4 hidden states a
    token, 4 x 2,048 x 8,192 x 2 bytes = 134,217,728, and 0.4 GiB outside the allocator, 429,496,729: added once to
    the peak for the card. A CPU has no allocator's margin."""
    cfg = load_recipe(ROOT / "recipes" / "llama70b.py")
    cuda, cpu = at(cfg, 2048, "cuda"), at(cfg, 2048, "cpu")
    assert cuda.margin == 134_217_728 + 429_496_729 and cuda.card_bytes == cuda.peak_bytes + cuda.margin
    assert cpu.margin == 0 and cpu.card_bytes == cpu.peak_bytes


def test_the_trainer_refuses_before_loading_on_a_small_card(tmp_path: Path, small_card: int,
                                                           capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny recipe on CUDA (fake_gpu: initialising CUDA raises, so loading would fail otherwise) at rows of 2^20
    tokens: exit 2, one line, the longest length the 1 GiB card takes, and no run directory written."""
    out = tmp_path / "run"
    code = main(["recipes/tiny.py", "--train.device=cuda", "--data.max_seq_len=1048576", f"--output.dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: train.batch_size=8 x data.max_seq_len=1048576: the step is estimated at ")
    assert "a 1 GiB card has 1.00 GiB" in err[0] and not out.exists()
    longest = int(err[0].split("--data.max_seq_len=")[1].split()[0].rstrip(","))
    cfg = load_recipe(ROOT / "recipes" / "tiny.py")  # 8 rows a micro-batch, one micro-batch a step
    assert 0 < longest < 1048576 and at(cfg, longest, "cuda").card_bytes <= small_card < \
        at(cfg, longest + 64, "cuda").card_bytes
    # Or fewer rows at a time, as many per step: one row of 2^20 tokens does not fit either.
    assert " or --train.batch_size" not in err[0]
    # A card smaller than the context and the margin takes nothing at all.
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=GIB // 2, name="x"))
    assert main(["recipes/tiny.py", "--train.device=cuda", f"--output.dir={out}"]) == 2
    assert "not even one row of 64 tokens fits: use a larger card" in capsys.readouterr().err


def test_processes_on_one_host_each_weigh_their_share_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes of a run on one CPU host (torchrun --nproc-per-node=2) load and step at once: each weighed the
    host's whole available memory as its own and passed a step that fits the host once, not twice. A step that fits
    the whole host but not half of it is refused for each of 2, naming the share; for one it still fits."""
    cfg = load_recipe(ROOT / "recipes" / "tiny.py")
    need = needs(at(cfg, cfg.data.max_seq_len, "cpu"))[0]
    available = int(1.5 * need)
    monkeypatch.setattr("qlora.memory.preflight.available_bytes", lambda: available)
    assert check_fits(cfg, torch.device("cpu")) is not None
    with pytest.raises(ConfigError) as refused:
        check_fits(cfg, torch.device("cpu"), 2, processes=2)
    assert f"and this host's {available / GIB:.2f} GiB available, shared by 2 processes: " \
           f"{available // 2 / GIB:.2f} GiB each (python -m qlora.memory" in str(refused.value)


def test_cuda_processes_on_one_host_each_weigh_their_share_of_it_for_the_host_part(
        fake_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA each of 2 processes on one host keeps its host part (the 8B recipe's embedding table, offloaded layer
    inputs) there beside the other's: a host whose available memory holds it once and a half passes one process, and
    refuses each of 2, naming the share, however large the card."""
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=80 * GIB, name="an 80 GiB card"))
    cfg = load_recipe(ROOT / "recipes" / "llama8b.py")
    host = needs(estimate(cfg, load_arch(cfg), "qlora", "cuda", 2))[1]
    available = int(1.5 * host)
    monkeypatch.setattr("qlora.memory.preflight.available_bytes", lambda: available)
    assert check_fits(cfg, torch.device("cuda"), 2) is not None
    with pytest.raises(ConfigError) as refused:
        check_fits(cfg, torch.device("cuda"), 2, processes=2)
    assert f"the plan keeps {host / GIB:.2f} GiB in host memory and this host's {available / GIB:.2f} GiB available, " \
           f"shared by 2 processes: {available // 2 / GIB:.2f} GiB each" in str(refused.value)


def test_a_micro_batch_beyond_the_host_is_refused_naming_the_largest_that_fits() -> None:
    """The tiny recipe's rows of 128 tokens in micro-batches of 10^5 rows on a 2 GiB host: fewer rows at a time,
    with as many rows per step, or shorter rows."""
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), ["--train.batch_size=100000"])
    with pytest.raises(ConfigError) as refused:
        check_fits(cfg, torch.device("cpu"), device_bytes=2 * GIB)
    message = str(refused.value)
    assert message.startswith("train.batch_size=100000 x data.max_seq_len=128: the step is estimated at ")
    assert "malloc's free lists beside the tensors) and the host has 2.00 GiB available" in message
    batch = int(message.split("--train.batch_size=")[1].split()[0])
    # the same rows per step in micro-batches that divide them (it said 3 x 1 -> 2 x 2, 5 x 3 -> 4 x 4)
    assert 100000 % batch == 0 and f"--train.grad_accum={100000 // batch}, the most that fits" in message
    larger = min(b for b in range(batch + 1, 100001) if 100000 % b == 0)
    rows = apply_overrides(copy.deepcopy(cfg), [f"--train.batch_size={batch}"])
    more = apply_overrides(copy.deepcopy(cfg), [f"--train.batch_size={larger}"])
    assert fits(at(rows, 128, "cpu"), 2 * GIB, None) and not fits(at(more, 128, "cpu"), 2 * GIB, None)


def test_the_70b_recipe_on_this_cpu_is_refused_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """recipes/llama70b.py --train.device=cpu, which the CUDA refusal suggests: on a host with less available memory
    than its estimate, one line and exit 2 instead of a load of minutes and an out-of-memory error."""
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "llama70b.py"), ["--train.device=cpu"])
    if estimate(cfg, load_arch(cfg), "qlora", "cpu").peak_bytes <= available_bytes():
        pytest.skip("this host has the memory for 70B on its CPU")
    code = main(["recipes/llama70b.py", "--train.device=cpu", f"--output.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "available (python -m qlora.memory RECIPE estimates it, nothing " \
        "loaded): not even one row of 64 tokens fits: use a GPU, or a machine with more memory" in err[0], err


@pytest.mark.parametrize("recipe,fix", [
    ("llama70b.py", "on the CPU the step is estimated at 73.68 GiB and this host has 16.00 GiB available: run it where "
                    "a CUDA GPU is visible"),
    ("tiny.py", "use --train.device=cpu or auto (on the CPU the step is estimated at 0.14 GiB, and the host has "
                "16.00 GiB available)")])
def test_no_gpu_sends_to_the_cpu_only_a_step_the_host_holds(recipe: str, fix: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """train.device=cuda without a GPU said 'use --train.device=cpu or auto' to every recipe: the 70B one then
    needed 69 GiB of the host's 16 (issue 22). The line says which a CPU run would hold, before anything loads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("qlora.memory.preflight.available_bytes", lambda: 16 * GIB)
    code = main([f"recipes/{recipe}", "--train.device=cuda", f"--output.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: train.device=cuda but no CUDA GPU is visible: "
                                                             f"{fix}"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change,line", [
    ({"tie_word_embeddings": "false"}, 'has tie_word_embeddings="false": write true or false (JSON booleans)'),
    ({"sliding_window": 0}, "has sliding_window=0: write the tokens a layer attends to: a positive integer, or null "
                            "for none")])
def test_a_config_value_the_estimator_refuses_is_refused_before_building(change: dict, line: str, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """The check before loading took any refusal of the estimator for a model it does not know, and left it to the
    loader: tie_word_embeddings="false" ended in transformers' multi-line validation traceback, exit 1, and a window
    of 0 tokens trained (a red-team pass stopped it at step 217)."""
    from support import architecture

    from qlora.base.build import config_json_path

    tiny = apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), architecture("tiny-mistral"))
    config = json.loads(config_json_path(tiny).read_text())  # built first where it is not yet
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config, **change}))
    code = main(["recipes/tiny.py", *architecture("tiny-mistral"), "--model.synthetic=true",
                 f"--model.config_json={path}", f"--output.dir={tmp_path / 'run'}"])
    out, err = capsys.readouterr()
    assert (code, err.splitlines()) == (2, [f"error: {path} {line}"])
    assert "drawing " not in out and not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,offered", [
    (["--train.tile_norms=false"], "--train.tile_norms=true: the norms in tiles too"),
    (["--train.tile_size=0", "--train.tile_projections=false", "--train.tile_norms=false"],
     "--train.tile_size=4096 --train.tile_projections=true --train.tile_norms=true: the MLP, projections and norms")])
def test_out_of_memory_advice_offers_the_tiles_the_recipe_lacks(overrides: list[str], offered: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CUDA out-of-memory names as fitting (qlora/training/oom.py): the 8B recipe at 131,072 tokens on a
    24 GiB card, without tiled norms (or without any tiles), fits once the missing switch is on, by the estimate. On
    a host of 128 GiB, as the GPU machine's: its layer inputs wait there (32 GiB), which this machine's would not
    hold, and the advice weighs the host too."""
    from qlora.training import oom
    from qlora.training.oom import suggestions

    monkeypatch.setattr(oom, "available_bytes", lambda: available_on(128 * GIB))

    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "llama8b.py"), ["--data.max_seq_len=131072", *overrides])
    lines = suggestions(cfg, torch.device("cuda"), 24 * GIB, 0)
    assert lines[0].startswith("estimated peak of this recipe") and "fits under 22.80 GiB" in lines[0]
    assert any(line.strip().startswith(offered) for line in lines[1:]), lines


def test_a_cpu_run_stays_within_what_the_check_held_it_to(cli: ForkedCLI, tmp_path: Path) -> None:
    """The CPU promise: a run the check lets through stays within what it counted, the estimate and process_margin.
    Rows of 4,096 tokens on the tiny Llama, in a fresh process with glibc's defaults: 217 to 229 MiB above its start
    against an estimate of 51 MiB, the rest libraries and malloc's free lists (the check had counted the estimate)."""
    rows = tmp_path / "long.jsonl"
    answer = " ".join(["red green blue cat dog bird"] * 800)  # 4,799 bytes: every row cut to max_seq_len tokens
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "words:"},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    rows.write_text(rows.read_text() * 4)
    overrides = [f"--data.train={rows}", f"--data.eval={rows}", "--data.max_seq_len=4096", "--train.batch_size=1",
                 "--train.steps=2", "--train.eval_before=false", "--train.eval_every=0"]
    out = tmp_path / "run"
    done = cli.run(["recipes/tiny.py", *overrides, f"--output.dir={out}"])
    assert done.status == 0, done.stderr[-2000:]
    peak = json.loads((out / "memory.json").read_text())["peak_bytes"]  # the resident set above it before loading
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), overrides)
    held_to, _ = needs(estimate(cfg, load_arch(cfg), "qlora", "cpu"))
    assert peak <= held_to, (peak / 2**20, held_to / 2**20)


def test_a_rank_equal_to_a_layers_side_is_checked_and_one_above_is_left_to_the_loader() -> None:
    """The tiny Llama's k_proj and v_proj are 128 x 64: lora.r=64 is an adapter they can have (attach_lora takes a rank
    up to the smaller side), so a step beyond the host is refused before loading; lora.r=65 is one they cannot, and
    the check leaves it to attach_lora, whose refusal names the largest rank."""
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), ["--data.max_seq_len=1048576"])
    with pytest.raises(ConfigError, match=r"^train.batch_size=8 x data.max_seq_len=1048576: the step is estimated"):
        check_fits(apply_overrides(copy.deepcopy(cfg), ["--lora.r=64"]), torch.device("cpu"), device_bytes=GIB)
    assert check_fits(apply_overrides(copy.deepcopy(cfg), ["--lora.r=65"]), torch.device("cpu"),
                      device_bytes=GIB) is None


def test_the_largest_micro_batch_is_found_past_the_tiles_where_a_smaller_one_does_not_fit() -> None:
    """8B rows of 2,048 tokens with tiles of 32,768 on 16 GiB: micro-batches of up to 16 rows run untiled, and of
    those up to 13 fit; 17 rows are tiled and fit too. 31 x 17 rows a step is refused naming 17 x 31, not 1 x 527 (a
    plain bisection over the rows stops below the drop, at 13, which does not divide 527)."""
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "llama8b.py"), [
        "--train.tile_size=32768", "--data.max_seq_len=2048", "--train.batch_size=31", "--train.grad_accum=17"])
    card, host = 16 * GIB, 125 * GIB

    def fits_rows(rows: int) -> bool:
        c = apply_overrides(copy.deepcopy(cfg), [f"--train.batch_size={rows}"])
        return fits(estimate(c, load_arch(c), "qlora", "cuda"), card, host)

    assert fits_rows(13) and not fits_rows(15) and fits_rows(17) and not fits_rows(18)
    with pytest.raises(ConfigError, match=r"set --data.max_seq_len=\d+ or --train.batch_size=17 "
                                          r"--train.grad_accum=31, the most that fits"):
        check_fits(cfg, torch.device("cuda"), device_bytes=card, host_bytes=host)


def test_a_step_that_needs_exactly_the_card_and_the_host_is_accepted() -> None:
    """The 8B recipe (embeddings, layer inputs in host memory) on a card and a host of exactly what its step needs:
    accepted; a byte less of the host is refused for the host's part, naming what the plan keeps there."""
    cfg = load_recipe(ROOT / "recipes" / "llama8b.py")
    card, host = needs(at(cfg, cfg.data.max_seq_len, "cuda"))
    assert host > GIB  # the embedding table alone is 1 GiB in bf16
    assert check_fits(cfg, torch.device("cuda"), device_bytes=card, host_bytes=host) is not None
    with pytest.raises(ConfigError, match=rf"^data.max_seq_len=2048: the plan keeps {host / GIB:.2f} GiB in host "
                                          rf"memory and this host has {(host - 1) / GIB:.2f} GiB available \("):
        check_fits(cfg, torch.device("cuda"), device_bytes=card, host_bytes=host - 1)


def test_the_host_part_leaves_out_the_processs_own_allowance() -> None:
    """The available memory the host's part is checked against already excludes this process (MemAvailable, read
    after loading), so the 6 GiB the estimate allows the process itself is not asked of it again: the 8B recipe's
    plan is accepted on a host with exactly what it keeps there beside that (embeddings, layer inputs, optimizer
    state) and refused a byte less. Counting the allowance again refused it with 6 GiB to spare."""
    cfg = load_recipe(ROOT / "recipes" / "llama8b.py")
    est = at(cfg, cfg.data.max_seq_len, "cuda")
    kept = sum(v for k, v in est.host.items() if k != "runtime")
    assert est.host["runtime"] == 6 * GIB and kept > GIB
    assert check_fits(cfg, torch.device("cuda"), device_bytes=est.card_bytes, host_bytes=kept) is not None
    with pytest.raises(ConfigError, match=rf"the plan keeps {kept / GIB:.2f} GiB in host memory"):
        check_fits(cfg, torch.device("cuda"), device_bytes=est.card_bytes, host_bytes=kept - 1)


def test_a_step_that_fits_is_said_with_its_estimate_and_memory_levers_before_loading(
        fake_gpu: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The 8B recipe on an 80 GiB card: one line, before anything loads, of what the step is estimated to hold on the
    card (with the allocator's margin) and in host memory, and the memory levers that bring it there, as the
    estimate counts them, against the host's available memory (a host of 100 GiB available here); a step that keeps
    nothing in host memory (the tiny recipe) says no host part; on a CPU device the process's share beside the tensors
    is named."""
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=80 * GIB, name="an 80 GiB card"))
    monkeypatch.setattr("qlora.memory.preflight.available_bytes", lambda: 100 * GIB)
    cfg = load_recipe(ROOT / "recipes" / "llama8b.py")
    est = say_fits(cfg, torch.device("cuda"))
    card, host = needs(est)
    line, = capsys.readouterr().out.splitlines()
    assert line.startswith(f"the step is estimated at {card / GIB:.2f} GiB with the allocator's margin and an 80 GiB "
                           f"card has 80.00 GiB; {host / GIB:.2f} GiB in host memory, and this host has 100.00 GiB "
                           "available; "), line
    assert line.endswith("; memory levers: offload_activations, tile_size=4096 with tile_projections and tile_norms, "
                         "loss_chunk_size=1024, embeddings_on_cpu"), line
    # with its data: its tokenised rows, 0.36 MiB, in host memory (rows.py)
    tiny = apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), ["--data.train=absent.jsonl", "--data.eval=none"])
    assert needs(say_fits(tiny, torch.device("cuda")))[1] == 0
    assert "host memory" not in capsys.readouterr().out
    est = say_fits(tiny, torch.device("cpu"))
    line, = capsys.readouterr().out.splitlines()
    assert line.startswith(f"the step is estimated at {needs(est)[0] / GIB:.2f} GiB ({process_margin(est) / GIB:.2f} "
                           "GiB of it the process's libraries and malloc's free lists beside the tensors) and this "
                           "host has "), line
    assert "levers" not in line  # the tiny recipe sets none
    # One of 2 processes on this host says the share it was checked against, of the card's host part and on a CPU
    shared = "this host's 100.00 GiB available, shared by 2 processes: 50.00 GiB each"
    each = needs(say_fits(cfg, torch.device("cuda"), 2, processes=2))[1]
    assert f"{each / GIB:.2f} GiB in host memory, and {shared}; " in capsys.readouterr().out
    say_fits(tiny, torch.device("cpu"), 2, processes=2)
    assert capsys.readouterr().out.endswith(f"beside the tensors) and {shared}\n")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_line_of_a_step_that_fits_names_the_memory_it_was_checked_against(monkeypatch, capsys, device):
    """say_fits read MemAvailable for the check and again for its line: a host whose available memory fell between
    the two (another process loading) was said to have less than the step it had just passed (here 1 MiB, less than
    the 8B recipe's host part on a card or the tiny step on the CPU: a check that read it again, in room or for the
    card's host part, refuses the step)."""
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=80 * GIB, name="an 80 GiB card"))
    readings = iter([100 * GIB, GIB // 1024])
    monkeypatch.setattr("qlora.memory.preflight.available_bytes", lambda: next(readings))
    recipe = "llama8b.py" if device == "cuda" else "tiny.py"
    say_fits(load_recipe(ROOT / "recipes" / recipe), torch.device(device))
    line, = capsys.readouterr().out.splitlines()
    assert "this host has 100.00 GiB available" in line and " 0.00 GiB available" not in line, line


@pytest.mark.parametrize(("name", "gib"), [("llama8b_6gb", 6), ("llama70b_24gb", 24), ("llama8b", 79.6)])
def test_the_longest_context_the_memory_tool_names_is_the_checks(name: str, gib: float, capsys) -> None:
    """Two doors, one answer: `python -m qlora.memory RECIPE --max-context --gpu-gib G` names the longest row (in
    steps of 1024) and its plan; the trainer's check on that card and --host-gib's host takes that plan, refuses it
    one step longer, and the refusal's longest data.max_seq_len (in steps of 64) lies within that step and is taken.
    By the card (6 GiB: 35,840 tokens), with an offload budget (24 GiB: 67,584) and with checkpoint_every=2 (79.6
    GiB: 564,224)."""
    import re

    from qlora.memory.preflight import available_on
    from qlora.report.memory import main as memory

    assert memory([f"recipes/{name}.py", "--max-context", "--gpu-gib", str(gib), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    card, host = int(gib * GIB), available_on(128 * GIB)

    def check(tokens: int) -> None:
        cfg = apply_overrides(load_recipe(ROOT / "recipes" / f"{name}.py"),
                              [*row["overrides"], f"--data.max_seq_len={tokens}"])
        check_fits(cfg, torch.device("cuda"), device_bytes=card, host_bytes=host)

    check(row["tokens"])
    with pytest.raises(ConfigError, match=r"set --data\.max_seq_len=(\d+)") as refused:
        check(row["tokens"] + 1024)
    longest = int(re.search(r"set --data\.max_seq_len=(\d+)", str(refused.value))[1])
    assert row["tokens"] <= longest < row["tokens"] + 1024
    check(longest)


def test_the_tokenised_rows_are_counted_before_the_data_is_read(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows are held from before the base loads to the run's end, and the check counted none of them: a host that
    holds the step but not the rows beside it passed (1M chat rows: ~6 GiB). Counted from the files' sizes, once:
    on a CPU device a component of the process, on CUDA a host term; a file that is not there counts nothing."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"reverse: {n} " + "red " * 60},
                                                     {"role": "assistant", "content": "der " * 60}]}) + "\n"
                            for n in range(4000)))
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), [f"--data.train={rows}"])
    size = rows.stat().st_size + Path(cfg.data.eval).stat().st_size
    cpu, cuda = (estimate(cfg, load_arch(cfg), "qlora", device) for device in ("cpu", "cuda"))
    assert cpu.components["tokenised_rows"] == cuda.host["tokenised_rows"] == int(4.4 * size) and not cpu.host
    assert "tokenised_rows" not in cuda.components
    without = apply_overrides(copy.deepcopy(cfg), [f"--data.train={tmp_path / 'absent.jsonl'}", "--data.eval=none"])
    assert "tokenised_rows" not in estimate(without, load_arch(without), "qlora", "cpu").components
    need = needs(cpu)[0]
    monkeypatch.setattr("qlora.memory.preflight.available_bytes", lambda: need - cpu.components["tokenised_rows"])
    with pytest.raises(ConfigError, match=r"the step is estimated at .* and this host has"):
        check_fits(cfg, torch.device("cpu"))
    monkeypatch.setattr("qlora.memory.preflight.available_bytes", lambda: need)
    assert check_fits(cfg, torch.device("cpu")) is not None
