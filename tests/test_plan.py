"""train.plan=fastest (qlora/memory/plan.py) on fake card and host sizes: it never picks a plan whose estimate exceeds
the card or the host, no cheaper combination of the levers fits, on a big card the memory levers that cost time are
off, and what the recipe keeps stays; the trainer prints the choice and records it in run_config.json."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch

from qlora.config import Config, apply_overrides, load_recipe
from qlora.errors import ConfigError
from qlora.memory.arch import load_arch
from qlora.memory.candidates import choices, off, with_settings
from qlora.memory.costs import COSTS, TABLE
from qlora.memory.estimate import estimate
from qlora.memory.plan import choose, plan_for, unplanned
from qlora.memory.preflight import needs

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
HOST = 120 * GIB  # available host memory (the process's own allowance excluded)


def recipe(name: str, *overrides: str) -> Config:
    return apply_overrides(load_recipe(ROOT / "recipes" / f"{name}.py"), ["--train.plan=fastest", *overrides])


def as_user_runs_it(cfg: Config, overrides: list[str]) -> tuple[Config, object]:
    """The plan's overrides on the recipe, estimated the ordinary way (as preflight will)."""
    planned = apply_overrides(copy.deepcopy(cfg), overrides)
    return planned, estimate(planned, load_arch(planned), planned.quant.method, "cuda")


@pytest.mark.parametrize(("name", "seq", "card_gib"), [("llama8b", 2048, 16), ("llama8b", 2048, 24),
                                                      ("llama8b", 65_536, 24), ("llama8b", 65_536, 79.6),
                                                      ("llama70b", 2048, 45), ("llama70b", 32_768, 79.6)])
def test_the_plan_fits_card_and_host_and_nothing_cheaper_does(name: str, seq: int, card_gib: float) -> None:
    cfg = recipe(name, f"--data.max_seq_len={seq}")
    card = int(card_gib * GIB)
    plan = choose(cfg, "cuda", card, HOST)
    assert plan is not None
    planned, est = as_user_runs_it(cfg, plan.overrides(cfg))
    assert est.card_bytes == plan.estimate.card_bytes <= card
    assert est.host_bytes - est.host["runtime"] <= HOST
    # Every combination the table's levers allow that costs less (with no lever replayed: checkpoint_every=1) does
    # not fit: the plan is the fastest by the table, not merely one that fits.
    options, _ = choices(cfg, "cuda")
    arch = load_arch(cfg)
    for switches in itertools.product((False, True), repeat=len(options)):
        on = [row for (row, _), s in zip(options, switches, strict=True) if s]
        settings = {row.lever: value if s else off(row.lever) for (row, value), s in zip(options, switches,
                                                                                          strict=True)}
        cheaper = sum(row.cuda for row in on)
        candidate = with_settings(cfg, {**settings, "train.offload_budget_gib": 0.0})
        if candidate is None or cheaper >= plan.cost - 1e-9:
            continue
        if any(row.lever.startswith("train.tile") or row.lever in ("train.loss_chunk_size",
                                                                   "train.offload_activations") for row in on):
            continue  # costed where they act, by the share they offload: covered by the plan's own search
        est = estimate(candidate, arch, "qlora", "cuda")
        assert est.card_bytes > card, (settings, cheaper, plan.cost)


def test_on_a_big_card_every_memory_lever_that_costs_time_is_off() -> None:
    """The 8B recipe as shipped on an H200-sized card (139.8 GiB) at 2048 tokens: no recompute, nothing on the host;
    on a 16 GiB card the recipe's own memory levers come back, cheapest first."""
    cfg = recipe("llama8b")
    big = choose(cfg, "cuda", int(139.8 * GIB), HOST)
    memory = [row.lever for row in TABLE if row.kind != "kernels"]
    assert big.cost == 0 and all(big.settings.get(lever, off(lever)) == off(lever) for lever in memory)
    planned, est = as_user_runs_it(cfg, big.overrides(cfg))
    assert not planned.train.gradient_checkpointing and not est.host.get("checkpoints")
    small = choose(cfg, "cuda", 16 * GIB, HOST)
    assert small.cost > 0 and small.estimate.card_bytes <= 16 * GIB
    on = {lever for lever, value in small.settings.items() if lever in COSTS and value != off(lever)}
    assert on and on <= {"train.gradient_checkpointing", "train.loss_chunk_size", "model.embeddings_on_cpu",
                         "train.offload_activations", "train.optimizer_on_cpu", "train.checkpoint_every"}


def test_a_kept_lever_stays_as_set_and_nothing_fits_where_the_weights_do_not() -> None:
    cfg = recipe("llama8b", "--train.plan_keep=train.offload_activations,train.gradient_checkpointing")
    plan = choose(cfg, "cuda", int(139.8 * GIB), HOST)
    assert "train.offload_activations" not in plan.settings and plan.left["train.offload_activations"] == \
        "train.plan_keep"
    assert plan.estimate.host["checkpoints"] > 0  # still offloaded, as the recipe sets it
    # 70B's NF4 weights alone exceed 24 GiB: the plan streams the base from host memory (issue 25), where the host
    # can pin it, and nothing fits where it cannot, or where the card is below even two layers and their work.
    streamed = choose(recipe("llama70b"), "cuda", 24 * GIB, HOST)
    assert streamed.settings["train.stream_base"] is True and streamed.estimate.card_bytes <= 24 * GIB
    assert streamed.estimate.host["streamed_base"] > 30 * GIB and streamed.estimate.host_bytes <= HOST
    assert choose(recipe("llama70b"), "cuda", 24 * GIB, 32 * GIB) is None
    assert choose(recipe("llama70b"), "cuda", 2 * GIB, HOST) is None
    # One process's lever: with several, left as the recipe sets it.
    assert "train.stream_base" not in {row.lever for row, _ in choices(recipe("llama70b"), "cuda", gpus=2)[0]}


def test_on_a_cpu_device_the_host_is_the_card(tiny_config: Config) -> None:
    """The tiny recipe on CPU: with room, no checkpointing and the speed levers that save time on a CPU; with just
    enough for the recipe's own step, checkpointing stays."""
    cfg = apply_overrides(tiny_config, ["--train.plan=fastest"])
    arch = load_arch(cfg)
    roomy = choose(cfg, "cpu", 64 * GIB, None)
    assert roomy.settings["train.gradient_checkpointing"] is False
    faster = {row.lever for row in TABLE if row.kind == "kernels" and row.cpu is not None and row.cpu < 0}
    assert {lever for lever, v in roomy.settings.items() if lever in faster and v is True}
    # the recipe as it is (checkpointing on, no speed lever), with what the check counts for the process beside it
    tight = needs(estimate(cfg, arch, "qlora", "cpu"))[0]
    plan = choose(cfg, "cpu", tight, None)
    assert plan.settings["train.gradient_checkpointing"] is True and plan.estimate.card_bytes <= tight


def test_the_trainer_prints_the_plan_and_records_it(tiny_config: Config, capsys) -> None:
    from qlora.train import train

    cfg = apply_overrides(tiny_config, ["--train.plan=fastest", "--train.steps=1", "--train.eval_before=false",
                                        "--train.eval_batches=1"])
    train(cfg)
    out = capsys.readouterr().out
    assert "train.plan=fastest (this host has " in out and "off: train.gradient_checkpointing" in out
    assert out.index("train.plan=fastest") < out.index("loading ")  # before the base is loaded
    recorded = json.loads((Path(cfg.output.dir) / "run_config.json").read_text())["train"]
    assert recorded["plan"] == "fastest" and "--train.gradient_checkpointing=false" in recorded["plan_chose"]
    assert recorded["gradient_checkpointing"] is False


# --- the batch shape (train.plan_batch) ---

def with_batch_figure(monkeypatch: pytest.MonkeyPatch, figure: float) -> None:
    """A CUDA figure for the batch shape (none is measured yet: the GPU battery's lever-costs-8b measures it)."""
    import dataclasses

    from qlora.memory import candidates

    monkeypatch.setattr(candidates, "BATCH", dataclasses.replace(candidates.BATCH, cuda=figure))


@pytest.mark.parametrize("card_gib", [16, 24, 48, 80, 139.8])
def test_the_plan_runs_the_steps_rows_in_the_cheapest_micro_batches_that_fit(monkeypatch: pytest.MonkeyPatch,
                                                                            card_gib: float) -> None:
    """The 8B recipe (1 row x 16 a step) with the batch shape left to the plan: the rows per step stay 16, the plan
    fits the card, and no shape with a larger micro-batch and the same levers fits at less cost."""
    with_batch_figure(monkeypatch, 0.1)
    cfg = recipe("llama8b")  # the recipe leaves the batch shape to the plan
    card = int(card_gib * GIB)
    plan = choose(cfg, "cuda", card, HOST)
    planned, est = as_user_runs_it(cfg, plan.overrides(cfg))
    t = planned.train
    assert t.batch_size * t.grad_accum == 16 and est.card_bytes <= card
    for b in (2, 4, 8, 16):
        if b <= t.batch_size:
            continue
        bigger = with_settings(planned, {"train.batch_size": b, "train.grad_accum": 16 // b})
        assert estimate(bigger, load_arch(bigger), "qlora", "cuda").card_bytes > card, b
    if card_gib >= 48:  # room beyond a plain step: larger micro-batches, which save time
        assert t.batch_size > 1 and "--train.batch_size=1" not in plan.overrides(cfg)


def test_the_batch_shape_is_the_recipes_unless_left_to_the_plan_and_measured(monkeypatch: pytest.MonkeyPatch
                                                                            ) -> None:
    big = int(139.8 * GIB)
    unmeasured = choose(recipe("llama8b", "--train.plan_batch=true"), "cuda", big, HOST)  # no CUDA figure yet
    assert "train.batch_size" not in unmeasured.settings
    assert unmeasured.left["train.batch_size"] == "no cuda figure in the cost table yet"
    with_batch_figure(monkeypatch, 0.1)
    assert "train.batch_size" not in choose(recipe("llama8b", "--train.plan_batch=false"), "cuda", big,
                                            HOST).settings
    kept = choose(recipe("llama8b", "--train.plan_batch=true", "--train.plan_keep=train.grad_accum"), "cuda", big,
                  HOST)
    assert "train.batch_size" not in kept.settings and kept.left["train.batch_size"] == "train.plan_keep"
    chosen = choose(recipe("llama8b", "--train.plan_batch=true"), "cuda", big, HOST)
    assert chosen.settings["train.batch_size"] > 1
    with pytest.raises(ConfigError, match="train.plan_batch leaves the batch shape to train.plan=fastest"):
        apply_overrides(load_recipe(ROOT / "recipes" / "llama8b.py"), ["--train.plan=recipe",
                                                                        "--train.plan_batch=true"])


def test_a_smaller_micro_batch_is_the_plans_way_to_fit_a_small_card(monkeypatch: pytest.MonkeyPatch) -> None:
    """48 rows x 2048 tokens in one micro-batch fit 16 GiB with no lever (the base kept on the card); the plan splits
    them rather than give up."""
    with_batch_figure(monkeypatch, 0.1)
    rows = ["--train.batch_size=48", "--train.grad_accum=1", "--train.plan_keep=train.stream_base"]
    assert choose(recipe("llama8b", "--train.plan_batch=false", *rows), "cuda", 16 * GIB, HOST) is None
    plan = choose(recipe("llama8b", "--train.plan_batch=true", *rows), "cuda", 16 * GIB, HOST)
    assert plan is not None and plan.settings["train.batch_size"] < 48 and plan.estimate.card_bytes <= 16 * GIB
    assert plan.settings["train.batch_size"] * plan.settings["train.grad_accum"] == 48


def test_the_batch_cost_follows_the_fixed_share_of_a_micro_batch() -> None:
    from qlora.memory.candidates import BATCH, batch_cost
    from qlora.memory.costs import MEASURED_TOKENS

    f = BATCH.cpu
    cfg = apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), [
        "--train.batch_size=1", "--train.grad_accum=16", f"--data.max_seq_len={MEASURED_TOKENS['cpu']}"])
    assert batch_cost(cfg, 1, "cpu") == 0
    assert batch_cost(cfg, 16, "cpu") == pytest.approx(-(15 / 16) * f)  # 15 of 16 fixed parts saved
    assert batch_cost(cfg, 2, "cpu") > batch_cost(cfg, 4, "cpu") > batch_cost(cfg, 16, "cpu")
    longer = apply_overrides(copy.deepcopy(cfg), [f"--data.max_seq_len={4 * MEASURED_TOKENS['cpu']}"])
    assert batch_cost(cfg, 16, "cpu") < batch_cost(longer, 16, "cpu") < 0  # the fixed part weighs less in long rows
    # A recipe of 4 x 4 rows: a micro-batch of b rows at the measured length takes f + b (1 - f) of a 1-row one, so a
    # step (16 / b of them) takes 16 / b (f + b (1 - f)); the cost is against the recipe's 4-row micro-batches (with 1
    # row, the recipe's rows dropped out of the sum: 1-row micro-batches were weighed as 4-row ones).
    four = apply_overrides(copy.deepcopy(cfg), ["--train.batch_size=4", "--train.grad_accum=4"])

    def step(b: int) -> float:
        return 16 / b * (f + b * (1 - f))

    for b in (1, 2, 8, 16):
        assert batch_cost(four, b, "cpu") == pytest.approx(step(b) / step(4) - 1), b


def test_the_same_rows_in_other_micro_batches_give_the_same_losses_and_adapter(tiny_config: Config,
                                                                              tmp_path: Path) -> None:
    """4 rows a step as 1 x 4 and as 4 x 1, over two epochs of 40 rows (a multiple of both sizes, so every epoch holds
    the same rows): the loss of each step and the trained adapter agree (fp32, no dropout)."""
    from safetensors.torch import load_file

    from qlora.train import train

    rows = (ROOT / "recipes" / "data" / "tiny" / "train.jsonl").read_text().splitlines()
    (tmp_path / "forty.jsonl").write_text("\n".join(rows[:40]) + "\n")
    runs = {}
    for b, g in ((1, 4), (4, 1)):
        cfg = apply_overrides(copy.deepcopy(tiny_config), [
            f"--train.batch_size={b}", f"--train.grad_accum={g}", "--lora.dropout=0", "--train.steps=16",
            f"--data.train={tmp_path / 'forty.jsonl'}", "--train.eval_before=false", "--train.eval_batches=1",
            f"--output.dir={tmp_path / str(b)}"])
        train(cfg)
        run = Path(cfg.output.dir)
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        runs[b] = losses, load_file(run / "adapter_model.safetensors")
    (one, a1), (four, a4) = runs[1], runs[4]
    assert len(one) == len(four) == 16  # 64 rows: into the second epoch
    assert one == pytest.approx(four, rel=1e-4, abs=1e-5)
    assert one[-1] < one[0]  # it trains
    for name, value in a1.items():
        assert torch.allclose(value, a4[name], rtol=1e-3, atol=1e-5), name


def test_the_trainer_runs_the_planned_shape_and_refuses_a_step_past_the_rows(tiny_config: Config, tmp_path: Path,
                                                                            capsys) -> None:
    """On a CPU device with room, 1 x 8 rows become one micro-batch of 8, recorded in run_config.json; with 6 training
    rows the step's 8 rows, which the plan keeps, would see rows twice whatever the shape: refused, naming the most
    rows a step (it cut the micro-batch to 4 x 2 and trained 8 rows a step over 6)."""
    from qlora.train import train

    base = ["--train.plan=fastest", "--train.plan_batch=true", "--train.batch_size=1", "--train.grad_accum=8",
            "--train.steps=1", "--train.eval_before=false", "--train.eval_batches=1"]
    train(apply_overrides(copy.deepcopy(tiny_config), base))
    out = capsys.readouterr().out
    assert "batch: 8 rows x 1 micro-batch a step (the recipe: 1 x 8;" in out
    recorded = json.loads((Path(tiny_config.output.dir) / "run_config.json").read_text())["train"]
    assert (recorded["batch_size"], recorded["grad_accum"]) == (8, 1)
    assert {"--train.batch_size=8", "--train.grad_accum=1"} <= set(recorded["plan_chose"])

    rows = (ROOT / "recipes" / "data" / "tiny" / "train.jsonl").read_text().splitlines()
    (tmp_path / "six.jsonl").write_text("\n".join(rows[:6]) + "\n")
    few = apply_overrides(copy.deepcopy(tiny_config), [*base, f"--data.train={tmp_path / 'six.jsonl'}",
                                                       f"--output.dir={tmp_path / 'six'}"])
    with pytest.raises(ConfigError, match=r"^8 rows x 1 accum = 8 rows a step exceed the 6 training rows, so a step "
                                          r"would see rows twice: make train.batch_size x train.grad_accum at most 6 "
                                          r"\(--train.batch_size=6 --train.grad_accum=1\), or add rows$"):
        train(few)
    assert not (tmp_path / "six" / "run_config.json").exists()


def test_a_batch_shape_set_on_the_command_line_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from qlora.memory.plan import keep_overridden

    with_batch_figure(monkeypatch, 0.1)
    cfg = recipe("llama8b", "--train.grad_accum=8")
    keep_overridden(cfg, ["--train.grad_accum=8", "--data.max_seq_len=2048"])
    assert cfg.train.plan_keep == ["train.grad_accum"]
    plan = choose(cfg, "cuda", int(139.8 * GIB), HOST)
    assert "train.batch_size" not in plan.settings and plan.left["train.batch_size"] == "train.plan_keep"


def test_a_lever_that_saves_time_but_is_off_says_why(tiny_config: Config) -> None:
    """On a CPU device fuse_lora is on, so fuse_lora_add, which saves time too but which the config refuses beside it,
    is off: the plan says it is not allowed, not that it saves no time; dequant_once, off where the host has no room
    for its copies, does not fit."""
    from qlora.memory.plan import explain

    cfg = apply_overrides(tiny_config, ["--train.plan=fastest"])
    roomy = choose(cfg, "cpu", 64 * GIB, None)
    assert roomy.settings["train.fuse_lora"] is True
    said = {line.split(" (")[0].strip(): line.split("): ")[-1] for line in explain(cfg, roomy, "cpu", "")[1:]}
    assert said["off: train.fuse_lora_add"] == "not allowed beside the levers on"
    plain = estimate(with_settings(cfg, {"train.gradient_checkpointing": False}), load_arch(cfg), "qlora", "cpu")
    tight = choose(cfg, "cpu", needs(plain)[0], None)  # room for the plain step, not for 16-bit copies of the base
    assert tight.settings["train.dequant_once"] is False
    said = {line.split(" (")[0].strip(): line.split("): ")[-1] for line in explain(cfg, tight, "cpu", "")[1:]}
    assert said["off: train.dequant_once"] == "does not fit beside the levers on"
    assert said["off: train.tile_size"] == "not needed here"


def test_a_run_resumed_where_the_plan_picks_another_micro_batch_continues_exactly(cli, tmp_path: Path) -> None:
    """8 rows a step run as 8 x 1 for 4 steps, then resumed under a ceiling that leaves room for one row only (1 x 8):
    the 8 losses are those of the run that never stopped (fp32, no dropout: the same rows, the same loss)."""
    base = ["recipes/tiny.py", "--train.plan=fastest", "--train.plan_batch=true", "--train.eval_before=false",
            "--train.eval_every=0", "--train.eval_batches=1", "--lora.dropout=0", "--train.log_every=1"]
    one_row = "0.104"  # GiB: the tiny model's step of 1 row fits, of 2 rows not (the estimate, process_margin beside)
    assert choose(apply_overrides(load_recipe(ROOT / "recipes" / "tiny.py"), base[1:4]), "cpu",
                  int(float(one_row) * GIB), None).settings["train.batch_size"] == 1
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli.run([*base, "--train.steps=8", f"--output.dir={full}"]).status == 0
    first = cli.run([*base, "--train.steps=4", f"--output.dir={part}"])
    assert first.status == 0 and "batch: 8 rows x 1 micro-batch a step (as the recipe;" in first.stdout
    resumed = cli.run([*base, "--train.steps=8", f"--output.dir={part}", "--resume", f"--train.plan_gib={one_row}"])
    assert resumed.status == 0, resumed.stderr
    assert "batch: 1 row x 8 micro-batches a step (the recipe: 8 x 1;" in resumed.stdout
    # What the plan chose is planned again from the recipe, not reported as the recipe's values left unused.
    resuming = next(line for line in resumed.stdout.splitlines() if line.startswith("resuming "))
    assert "plan_chose" not in resuming and "gradient_checkpointing" not in resuming, resuming
    recorded = json.loads((part / "run_config.json").read_text())["train"]
    assert "--train.batch_size=8" in recorded["plan_from"] and "--train.batch_size=1" in recorded["plan_chose"]

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]

    assert len(losses(part)) == 8 and losses(part) == pytest.approx(losses(full), rel=1e-5)


def test_a_planned_run_resumed_with_the_plan_off_goes_on_with_the_levers_it_chose(cli, tmp_path: Path) -> None:
    """--train.plan=recipe on resuming a planned run was refused for train.plan_keep ("leave train.plan_keep empty"),
    which the first command line had filled (its --train.batch_size): a key the user never set. Now the plan's own
    fields go with it and the run goes on with the levers the plan chose: bitwise the run that never stopped (fp32,
    dropout on)."""
    from test_crash import adapter, metrics

    base = ["recipes/tiny.py", "--train.batch_size=4", "--train.schedule=constant", "--train.warmup_steps=0",
            "--train.eval_before=false", "--train.eval_every=0", "--train.eval_batches=1", "--train.log_every=1",
            "--lora.dropout=0.1"]
    planned = [*base, "--train.plan=fastest", "--train.plan_batch=true"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli.run([*planned, "--train.steps=4", f"--output.dir={full}"]).status == 0
    assert cli.run([*planned, "--train.steps=2", f"--output.dir={part}"]).status == 0
    resumed = cli.run([*base, "--train.steps=4", f"--output.dir={part}", "--resume", "--train.plan=recipe"])
    assert resumed.status == 0, resumed.stderr
    assert "train.plan 'fastest' -> 'recipe', train.plan_keep ['train.batch_size'] -> [], train.plan_batch True -> " \
        "False" in resumed.stdout
    recorded = json.loads((part / "run_config.json").read_text())["train"]
    assert recorded["fuse_lora"] and not recorded["gradient_checkpointing"]  # the plan's choice on a CPU device
    assert adapter(part).keys() == adapter(full).keys()
    for key, value in adapter(full).items():
        torch.testing.assert_close(adapter(part)[key], value, rtol=0, atol=0)
    assert metrics(part) == metrics(full)


def test_a_resume_whose_plan_from_no_longer_applies_names_run_config_and_goes_on_off_the_plan(cli,
                                                                                              tmp_path: Path) -> None:
    """A lever renamed since the run began (here: run_config.json edited) left in train.plan_from: the resume said
    "unknown key --train.fuse_lora_old: ..." as if from the command line, naming neither the run's run_config.json
    nor a way on. Now the line names both, and the fix it names runs: the run goes on with the levers the plan chose,
    to its last step."""
    out = tmp_path / "run"
    args = ["recipes/tiny.py", f"--output.dir={out}", "--train.eval_before=false", "--train.eval_every=0",
            "--train.eval_batches=1"]
    assert cli.run([*args, "--train.steps=2", "--train.plan=fastest"]).status == 0
    saved = json.loads((out / "run_config.json").read_text())
    undo = saved["train"]["plan_from"]
    assert "--train.fuse_lora=false" in undo  # the plan turned it on, on a CPU device
    undo[undo.index("--train.fuse_lora=false")] = "--train.fuse_lora_old=false"
    (out / "run_config.json").write_text(json.dumps(saved))
    refused = cli.run([*args, "--train.steps=3", "--resume"])
    assert refused.status == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(f"error: {out / 'run_config.json'}'s train.plan_from (the recipe's values of the "
                                     "levers the run's plan changed) no longer applies (unknown key "
                                     "--train.fuse_lora_old: "), refused.stderr
    assert refused.stderr.rstrip().endswith(": continue with --resume --train.plan=recipe to keep the levers the plan "
                                            "chose, or correct train.plan_from there"), refused.stderr
    resumed = cli.run([*args, "--train.steps=3", "--resume", "--train.plan=recipe"])
    assert resumed.status == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and (out / "checkpoint-3").is_dir()
    assert json.loads((out / "run_config.json").read_text())["train"]["fuse_lora"] is True  # as the plan chose


def test_a_plain_resume_names_the_runs_levers_not_the_plan_keep_its_command_line_filled(cli, tmp_path: Path) -> None:
    """--resume of a planned run whose first command line set train.batch_size said "the recipe's own values are not
    used: train.batch_size=8 (the run has 2), ..., train.plan_keep=[] (the run has ['train.batch_size'])": a key the
    user never set, filled by that command line, beside the lever it names."""
    out = tmp_path / "run"
    args = ["recipes/tiny.py", f"--output.dir={out}", "--train.eval_before=false", "--train.eval_batches=1"]
    assert cli.run([*args, "--train.steps=2", "--train.plan=fastest", "--train.batch_size=2"]).status == 0
    resumed = cli.run([*args, "--train.steps=3", "--resume"])
    assert resumed.status == 0, resumed.stderr
    resuming = next(line for line in resumed.stdout.splitlines() if line.startswith("resuming "))
    assert "train.batch_size=8 (the run has 2)" in resuming and "plan_keep" not in resuming, resuming


def test_a_lever_the_recipe_keeps_since_the_run_began_is_named_on_resume(cli, tmp_path: Path, capsys) -> None:
    """A recipe whose train.plan_keep gained a lever after the run began: the resume goes on with the run's plan_keep
    (the run's plan stays where it fits, the gained lever as that plan set it), and its line names the recipe's list as
    not used, beside the run's; a gained lever the run keeps already (its first command line set it) changes nothing
    and is not named. A mutant that never named train.plan_keep survived test_plan.py and test_resume.py."""
    from qlora.config import resolve_paths
    from qlora.training.runconfig import resume_config

    out = tmp_path / "run"
    args = [f"--output.dir={out}", "--train.eval_before=false", "--train.eval_batches=1"]
    assert cli.run(["recipes/tiny.py", *args, "--train.steps=2", "--train.plan=fastest", "--train.batch_size=2",
                    "--train.dequant_once=true"]).status == 0
    ours = ["train.batch_size", "train.dequant_once"]  # the run's plan_keep, as its first command line filled it
    for gained, named in ((["train.fuse_lora"], True), (["train.dequant_once"], False)):
        edited = recipe("tiny", *args, "--train.steps=3")  # the recipe as it reads now, with the resume's overrides
        edited.train.plan_keep = gained
        resumed = resume_config(resolve_paths(edited), [*args, "--train.steps=3"])
        resuming = capsys.readouterr().out
        assert resumed.train.plan_keep == ours and "train.batch_size=8 (the run has 2)" in resuming
        assert (f"train.plan_keep={gained!r} (the run has {ours!r})" in resuming) is named, resuming
        assert ("plan_keep" in resuming) is named, resuming


def test_a_ceiling_no_plan_fits_is_refused_not_passed_over(tiny_config: Config) -> None:
    """train.plan_gib is the most the plan may use: below anything that fits, the run went on with the recipe's
    levers, past the ceiling, having said only that nothing fit."""
    from qlora.memory.plan import use_plan

    cfg = apply_overrides(tiny_config, ["--train.plan=fastest", "--train.plan_gib=0.001"])
    with pytest.raises(ConfigError, match=r"no combination of levers fits train.plan_gib=0.001 \(.*\): raise "
                                          r"train.plan_gib \(0 = the whole card\), or shorten data.max_seq_len"):
        use_plan(cfg, torch.device("cpu"))


def test_a_resumed_run_is_planned_from_the_recipe_not_from_the_plan_before() -> None:
    """run_config.json holds the levers a plan chose; a resume where they no longer fit plans again. Planned from those,
    a lever the first plan turned off came back at the cost table's setting, not the recipe's: llama8b_6gb planned
    on 80 GiB, then resumed on 4 GiB, found no plan where a fresh start fits (loss_chunk_size=256). train.plan_from
    holds the recipe's values; a lever set on the resume's command line stays as set."""
    from qlora.config.config import config_from_dict

    def planned(cfg: Config, card_gib: float) -> tuple[Config, object]:
        return cfg, plan_for(cfg, "cuda", int(card_gib * GIB), f"{card_gib} GiB", (HOST, "a host"))[0]

    for seq in (2048, 16_384):
        fresh = recipe("llama8b_6gb", f"--data.max_seq_len={seq}")
        first, _ = planned(copy.deepcopy(fresh), 80)
        assert first.train.plan_from and first.train.loss_chunk_size == 0  # a big card needs no chunks
        saved = config_from_dict(json.loads(json.dumps(first.to_dict())), "run_config.json")
        unplanned(saved, [])
        assert saved.train.plan_chose == first.train.plan_chose  # the run's plan, kept where it still fits
        saved.train.plan_chose = []
        assert saved.to_dict() == fresh.to_dict()
        saved.train.plan_chose = first.train.plan_chose  # which 4 GiB does not hold: planned again, as fresh
        resumed, plan = planned(saved, 4)
        again, fresh_plan = planned(copy.deepcopy(fresh), 4)
        assert plan is not None and plan.settings == fresh_plan.settings and resumed.to_dict() == again.to_dict()
    kept = apply_overrides(copy.deepcopy(first), ["--train.tile_size=2048"])
    unplanned(kept, ["--train.tile_size=2048"])
    assert kept.train.tile_size == 2048 and kept.train.loss_chunk_size == fresh.train.loss_chunk_size


def test_a_plan_without_checkpointing_fits_the_host_too() -> None:
    """The 8B recipe on a card 0.05 GiB short of its plain step: the cheapest lever is the embedding table in host
    memory (+1%, 0.98 GiB there); a host with 0.5 GiB available cannot take it, so the plan saves elsewhere, within
    the host, rather than choose a plan the check before loading refuses."""
    cfg = recipe("llama8b")
    card = choose(cfg, "cuda", 200 * GIB, HOST).estimate.card_bytes - GIB // 20
    roomy = choose(cfg, "cuda", card, HOST)
    assert roomy.settings["model.embeddings_on_cpu"] is True and not roomy.settings["train.gradient_checkpointing"]
    small = choose(cfg, "cuda", card, GIB // 2)
    assert small.settings["model.embeddings_on_cpu"] is False and small.cost > roomy.cost
    assert needs(small.estimate)[1] <= GIB // 2 and small.estimate.card_bytes <= card


def test_processes_on_one_host_plan_for_their_share_of_it(fake_gpu: None, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Two CUDA processes on one host planned without it (use_plan), so the plan could keep in host memory what each
    process's check before loading then refused. The 8B recipe on a card 0.05 GiB short of its plain step, on a host
    that takes the cheapest lever's embedding table once and a half: one process keeps it there; each of two counts
    its share, the least over the processes (here the same), and saves elsewhere within it."""
    import types

    from qlora.memory.plan import use_plan

    cfg = recipe("llama8b", "--train.plan=fastest")
    card = choose(cfg, "cuda", 200 * GIB, HOST, 2).estimate.card_bytes - GIB // 20
    roomy = choose(copy.deepcopy(cfg), "cuda", card, HOST, 2)
    assert roomy.settings["model.embeddings_on_cpu"] is True
    available = int(1.5 * needs(roomy.estimate)[1])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=card, name="a card"))
    monkeypatch.setattr("qlora.memory.preflight.available_bytes", lambda: available)  # this_host
    alone = use_plan(copy.deepcopy(cfg), torch.device("cuda"), 2)
    assert alone.settings["model.embeddings_on_cpu"] is True
    capsys.readouterr()
    seen = []
    shared = use_plan(copy.deepcopy(cfg), torch.device("cuda"), 2, 2, lambda room: seen.append(room) or room)
    assert not shared.settings["model.embeddings_on_cpu"] and needs(shared.estimate)[1] <= available // 2
    assert seen[1][0] == available // 2  # every process's share, the least of them
    assert f"this host's {available / GIB:.2f} GiB available, shared by 2 processes: {available // 2 / GIB:.2f} " \
           "GiB each" in capsys.readouterr().out.splitlines()[0]


def test_no_lever_the_plan_turns_on_could_be_off() -> None:
    """The 8B recipe at 16,384 tokens on 10 GiB: every lever the plan turns on that costs time is needed, its plan
    with that lever off does not fit. Comparing a candidate's table cost without what its checkpoint plan adds let a
    later candidate with the embeddings in host memory (+1%) pass for cheaper, the same step with a needless lever."""
    from qlora.memory.preflight import fits

    cfg = recipe("llama8b", "--data.max_seq_len=16384")
    card = 10 * GIB
    plan = choose(cfg, "cuda", card, HOST)
    on = [row for row in plan.considered if plan.settings[row.lever] != off(row.lever) and row.cuda]
    assert len(on) >= 3
    for row in on:
        without = with_settings(cfg, {**plan.settings, row.lever: off(row.lever)})
        if without is not None:
            assert not fits(estimate(without, load_arch(without), "qlora", "cuda"), card, HOST), row.lever


def test_a_host_that_takes_only_some_layer_inputs_gets_a_budget() -> None:
    """The 8B recipe at 65,536 tokens on 40 GiB with 8 GiB of host memory: the host takes 14 of the 32 layer inputs,
    so the plan sets train.offload_budget_gib; without one (0: no limit) all 32 go to the host, twice what it has,
    and the check before loading refuses the plan. A host that takes all 32 gets none (a budget only binds)."""
    from qlora.memory.preflight import fits

    cfg = recipe("llama8b", "--data.max_seq_len=65536")
    card, host = 40 * GIB, 8 * GIB
    plan = choose(cfg, "cuda", card, host)
    planned, est = as_user_runs_it(cfg, plan.overrides(cfg))
    assert 0 < planned.train.offload_budget_gib <= 8 and planned.train.offload_activations
    assert fits(est, card, host) and est.card_bytes == plan.estimate.card_bytes
    roomy = choose(cfg, "cuda", card, HOST)  # a host that takes all 32: no budget, none in the overrides
    assert roomy.estimate.checkpoints.host == 32 and roomy.settings["train.offload_budget_gib"] == 0


def test_a_budget_the_command_line_set_stays_as_set() -> None:
    """The 8B recipe with --train.offload_budget_gib=4 (kept: train.plan_keep, as qlora.train keeps what its command
    line sets) on 200 GiB: the plan keeps the 4 GiB, and so offloading and checkpointing, which a budget needs; it
    neither writes its own budget over it nor turns offloading off and the budget to 0."""
    cfg = recipe("llama8b", "--train.offload_budget_gib=4", "--train.plan_keep=train.offload_budget_gib")
    plan = choose(cfg, "cuda", 200 * GIB, HOST)
    planned, _ = as_user_runs_it(cfg, plan.overrides(cfg))
    assert planned.train.offload_budget_gib == 4 and planned.train.offload_activations
    assert not any(item.startswith("--train.offload_budget_gib") for item in plan.overrides(cfg))


def test_the_plans_cost_is_the_tables_figures_for_the_layers_replayed_and_the_inputs_offloaded() -> None:
    """The 8B recipe at 65,536 tokens on 24 GiB with 8 GiB of host memory: checkpointing, tiles, loss chunks, and of
    the 32 layer inputs every second kept, 14 of those 16 on the host. What the plan costs (printed as "+141% of a
    plain step"), by the table: each lever's figure, checkpoint_every's for the 1 of 2 layers replayed, offloading's
    for the 14 of 16 kept inputs it moves."""
    plan = choose(recipe("llama8b", "--data.max_seq_len=65536"), "cuda", 24 * GIB, 8 * GIB)
    cp = plan.estimate.checkpoints
    assert (cp.every, cp.kept, cp.host) == (2, 16, 14)
    on = {lever for lever, value in plan.settings.items() if lever in COSTS and value != off(lever)}
    assert on == {"train.gradient_checkpointing", "train.tile_size", "train.loss_chunk_size",
                  "train.offload_activations", "train.checkpoint_every"}
    figure = {lever: COSTS[lever].cuda for lever in on}
    assert plan.cost == pytest.approx(figure["train.gradient_checkpointing"] + figure["train.tile_size"] +
                                      figure["train.loss_chunk_size"] + figure["train.checkpoint_every"] * 1 / 2 +
                                      figure["train.offload_activations"] * 14 / 16)


def test_several_processes_keep_the_recipes_layer_inputs_placement() -> None:
    """The 8B recipe at 65,536 tokens on 40 GiB with 8 GiB of host memory: one process offloads 14 of its 32 layer
    inputs within a budget sized to the host; two would each pin that budget on the one host, twice what it has, so
    with several the plan keeps the recipe's checkpoint_every and sizes no budget (saving elsewhere, at more cost)."""
    cfg = recipe("llama8b", "--data.max_seq_len=65536")
    one = choose(cfg, "cuda", 40 * GIB, 8 * GIB)
    assert one.settings["train.offload_budget_gib"] > 0 and one.estimate.checkpoints.host == 14
    two = choose(cfg, "cuda", 40 * GIB, 8 * GIB, gpus=2)
    assert two.settings["train.offload_budget_gib"] == 0 and two.estimate.checkpoints.host == 0
    assert two.settings["train.checkpoint_every"] == cfg.train.checkpoint_every and two.cost > one.cost


def test_a_kept_checkpoint_every_is_not_replanned() -> None:
    """The 8B recipe at 65,536 tokens on 30 GiB with 8 GiB of host memory: the plan replays 2 of every 3 layers; with
    train.checkpoint_every in train.plan_keep (as qlora.train puts it where the command line sets it) it keeps the
    recipe's every layer input and saves elsewhere, at more cost, rather than change what the user set."""
    cfg = recipe("llama8b", "--data.max_seq_len=65536")
    free = choose(cfg, "cuda", 30 * GIB, 8 * GIB)
    kept = choose(apply_overrides(cfg, ["--train.plan_keep=train.checkpoint_every"]), "cuda", 30 * GIB, 8 * GIB)
    assert free.estimate.checkpoints.every == 3
    assert kept.estimate.checkpoints.every == cfg.train.checkpoint_every == 1 and kept.cost > free.cost


def test_the_cost_tables_cpu_column_is_the_committed_measurement_and_host_traffic_is_ordered_by_bytes() -> None:
    """The CPU column is benchmarks/results/lever-costs-cpu-small.json's costs rounded to 0.01 (checkpoint_every's
    scaled by 4/3 to a whole forward, tile_norms from its own run), at the row length it measured; the ASSUMED CUDA
    host-traffic figures are ordered by the bytes each moves a step (qlora/memory/costs.py's docstring)."""
    from qlora.memory.costs import MEASURED_TOKENS

    results = ROOT / "benchmarks" / "results"
    run = json.loads((results / "lever-costs-cpu-small.json").read_text())
    norms = json.loads((results / "lever-costs-cpu-small-tile-norms.json").read_text())["costs"]["train.tile_norms"]
    measured = dict(run["costs"], **{"train.checkpoint_every": run["costs"]["train.checkpoint_every"] * 4 / 3,
                                     "train.tile_norms": norms})
    assert {row.lever: row.cpu for row in TABLE if row.cpu is not None} == \
        {lever: round(cost, 2) for lever, cost in measured.items()}
    assert MEASURED_TOKENS["cpu"] == run["setup"]["seq"]
    host = ["model.embeddings_on_cpu", "train.offload_activations", "train.optimizer_on_cpu", "train.stream_base"]
    assert [COSTS[lever].cuda for lever in host] == sorted(COSTS[lever].cuda for lever in host)
    assert [row.lever for row in TABLE if row.kind == "host traffic"] == host


def test_the_longest_context_max_context_finds_is_planned_not_said_to_fit_nowhere() -> None:
    """The 70B recipe on 80 GiB with 128 GiB of host: `--max-context` says 177,152 tokens train with every second
    layer input kept. The plan at that length once said no combination of levers fits: its quick check switched every
    memory lever on, the streamed base too, whose rules keep every layer input, and so it never tried a replay."""
    from qlora.memory.context import max_context
    from qlora.memory.preflight import fits

    tokens, _, _ = max_context(recipe("llama70b"), 80 * GIB, 128 * GIB)
    assert tokens == 177_152
    plan = choose(recipe("llama70b", f"--data.max_seq_len={tokens}"), "cuda", 80 * GIB, 128 * GIB)
    assert plan is not None and plan.estimate.checkpoints.every == 2
    assert not plan.settings["train.stream_base"] and fits(plan.estimate, 80 * GIB, 128 * GIB)


def test_a_resume_keeps_the_runs_own_plan_where_it_still_fits(tiny_config: Config) -> None:
    """A resume plans again only where the run's plan no longer fits (or the command line asks for a new one): on a
    CPU device the host's available memory moves between runs, and a plan that then turned on tiles or the chunked
    loss would continue the run as another one. The tiny recipe planned on a host with room for its own step alone
    (checkpointing on), resumed on a roomy host: the run's plan kept, said so, and recorded as before."""
    cfg = apply_overrides(tiny_config, ["--train.plan=fastest"])
    tight = needs(estimate(cfg, load_arch(cfg), "qlora", "cpu"))[0]
    ran = copy.deepcopy(cfg)
    plan, _ = plan_for(ran, "cpu", tight, "a tight host", None)
    assert plan.settings["train.gradient_checkpointing"] is True and ran.train.plan_chose

    def resumed(overrides: list[str], room: int) -> tuple[Config, list[str]]:
        again = copy.deepcopy(ran)  # run_config.json as the run wrote it
        unplanned(again, overrides)
        return again, plan_for(again, "cpu", room, "a roomy host", None)[1]

    again, lines = resumed([], 64 * GIB)
    assert again.train.gradient_checkpointing is True and again.train.plan_chose == ran.train.plan_chose
    assert lines[1] == "  the run's own plan, as it chose at its start (train.plan_chose), which still fits: kept"
    # A plan asked for anew on the command line: planned again for the roomy host.
    again, lines = resumed(["--train.plan_gib=0"], 64 * GIB)
    assert again.train.gradient_checkpointing is False and "kept" not in lines[1]
    # A roomy run's plan resumed where it no longer fits: planned again, and said.
    roomy = copy.deepcopy(cfg)
    plan_for(roomy, "cpu", 64 * GIB, "a roomy host", None)
    ran = roomy
    again, lines = resumed([], tight)
    assert again.train.gradient_checkpointing is True
    assert lines[1].startswith("  the run's own plan (--train.gradient_checkpointing=false") and \
        "does not fit here: planned again" in lines[1], lines


def test_a_runs_plan_this_version_cannot_read_is_planned_again_and_said(tiny_config: Config) -> None:
    """A resumed run's train.plan_chose that names a lever renamed since the run began, or a value that no longer
    parses: the resume plans again, as a fresh start on that host does, and says why in one line (it said "does not
    fit here"). A mutant of kept_plan that caught OSError alone survived: the ConfigError reached plan_for's "no
    estimate for this model", and the run went on unplanned, with the recipe's levers."""
    cfg = apply_overrides(tiny_config, ["--train.plan=fastest"])
    fresh = copy.deepcopy(cfg)
    plan_for(fresh, "cpu", 64 * GIB, "a roomy host", None)
    for chose, why in (("--train.dequant_at_once=true", "unknown key --train.dequant_at_once: did you mean "
                                                        "--train.dequant_once?"),
                       ("--train.tile_size=4k", "--train.tile_size=4k: expected int, e.g. --train.tile_size=1")):
        again = copy.deepcopy(cfg)
        again.train.plan_chose = ["--train.gradient_checkpointing=false", chose]
        plan, lines = plan_for(again, "cpu", 64 * GIB, "a roomy host", None)
        assert plan is not None and again.train.plan_chose == fresh.train.plan_chose, lines
        assert lines[1].startswith(f"  the run's own plan (--train.gradient_checkpointing=false {chose}) no longer "
                                   f"applies ({why}): planned again"), lines


def test_a_plan_that_kept_the_recipes_levers_is_kept_on_resume(tiny_config: Config) -> None:
    """A plan that changes none of the recipe's levers recorded no override, so a resume took the run for unplanned
    and planned again: the tiny recipe planned at exactly its own step's need (checkpointing on, as the recipe), then
    resumed on a roomy host, dropped checkpointing. It is recorded as made now, and kept where it fits."""
    cfg = apply_overrides(tiny_config, ["--train.plan=fastest", "--train.plan_batch=false"])
    tight = needs(estimate(cfg, load_arch(cfg), "qlora", "cpu"))[0]
    cfg = apply_overrides(cfg, choose(cfg, "cpu", tight, None).overrides(cfg))  # a recipe that sets what it chooses
    ran = copy.deepcopy(cfg)
    plan, _ = plan_for(ran, "cpu", tight, "a tight host", None)
    assert plan.overrides(cfg) == [] and ran.train.plan_chose == ["--train.plan=fastest"]
    unplanned(ran, [])
    plan, lines = plan_for(ran, "cpu", 64 * GIB, "a roomy host", None)
    assert ran.train.gradient_checkpointing is True and "which still fits: kept" in lines[1], lines


def test_a_kept_plan_sets_every_lever_and_the_batch_shape_it_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume on the card and host the run started on keeps its plan: every lever the plan set (checkpoint_every
    and the offload budget too), the micro-batch it chose, at the cost it had; where the host no longer holds what the
    plan keeps there, it plans again within the host. The kept plan was priced without the layers it replays and the
    inputs it offloads: the 8B recipe at 65,536 tokens on 24 GiB with 8 GiB of host, +141% at the start, +118% kept.
    Mutants of kept_plan (the host not weighed, checkpoint_every, the budget or the batch shape not set) survived."""
    from qlora.config.config import config_from_dict
    from qlora.memory.candidates import get
    from qlora.memory.preflight import fits

    def resumed(first: Config, card: int, host: int) -> tuple[Config, object, list[str]]:
        saved = config_from_dict(json.loads(json.dumps(first.to_dict())), "run_config.json")
        unplanned(saved, [])
        return saved, *plan_for(saved, "cuda", card, "a card", (host, "a host"))

    with_batch_figure(monkeypatch, 0.1)
    for seq, card, host in ((65_536, 24 * GIB, 8 * GIB), (2048, 80 * GIB, HOST)):
        first = recipe("llama8b", f"--data.max_seq_len={seq}", "--train.plan_batch=true")
        chosen, _ = plan_for(first, "cuda", card, "a card", (host, "a host"))
        saved, kept, lines = resumed(first, card, host)
        assert lines[1].endswith("which still fits: kept"), lines
        for key, value in chosen.settings.items():
            assert get(saved, key) == pytest.approx(value, abs=2e-6), key  # a budget read back: up to 2e-6 over
        assert kept.cost == pytest.approx(chosen.cost) and kept.estimate.card_bytes == chosen.estimate.card_bytes
    assert chosen.settings["train.batch_size"] > 1  # 80 GiB: a larger micro-batch than the recipe's 1
    # A host that no longer holds what the plan keeps there: planned again, within it.
    first = recipe("llama8b", "--data.max_seq_len=65536")
    chosen, _ = plan_for(first, "cuda", 24 * GIB, "a card", (8 * GIB, "a host"))
    smaller = needs(chosen.estimate)[1] - GIB
    saved, again, lines = resumed(first, 24 * GIB, smaller)
    assert "does not fit here: planned again" in lines[1], lines
    assert fits(again.estimate, 24 * GIB, smaller)


@pytest.mark.parametrize("gib", [7.1999999993, 105.421875, 0.1 + 0.2, 1e-7, 0.0])
def test_a_budget_written_as_an_override_reads_back_as_the_same_text(gib: float) -> None:
    """A kept plan writes its offload budget again at every resume: rounded up to a KiB and printed to 6 places, a
    budget's text read back grew by 1e-6 GiB each time (7.200001, 7.200002, ...). Never below the budget either."""
    from qlora.memory.context import budget_text

    text = budget_text(gib)
    assert gib <= float(text) <= gib + 1e-6 and budget_text(float(text)) == text, text


def test_a_plan_from_not_read_from_a_run_is_refused_as_the_user_gave_it(tmp_path: Path) -> None:
    """A train.plan_from of the recipe's or the command line's (no run_config.json given, or none at the path given:
    a --resume with no run there) that holds an unknown key is the user's own slip, refused as such, not sent to a
    run_config.json that did not hold it."""
    for run_config in (None, tmp_path / "run_config.json"):
        cfg = recipe("tiny", "--train.plan_from=--train.fuse_lora_old=false")
        with pytest.raises(ConfigError, match=r"^unknown key --train\.fuse_lora_old"):
            unplanned(cfg, [], run_config)


@pytest.mark.parametrize("item", ["--train.tile_size=2048", "--train.grad_accum=4", "--train.offload_budget_gib=4",
                                  "--train.plan_gib=0"])
def test_a_resume_that_sets_a_lever_the_shape_or_a_budget_asks_for_a_new_plan(item: str) -> None:
    """A lever, the batch shape, the offload budget or a train.plan* key on the resume's command line asks for a new
    plan: the run's own (train.plan_chose) is not kept over what the user set."""
    cfg = recipe("llama8b", "--train.plan_chose=--train.checkpoint_every=2")
    unplanned(cfg, [item])
    assert cfg.train.plan_chose == []
    unplanned(again := recipe("llama8b", "--train.plan_chose=--train.checkpoint_every=2"), ["--data.max_seq_len=4096"])
    assert again.train.plan_chose == ["--train.checkpoint_every=2"]  # not a lever: the run's plan stays on record
