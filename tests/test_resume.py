"""`--resume`: what it continues (the run on disk), what may change and takes effect, what is refused, and a damaged
newest checkpoint, which it passes over for the newest intact one and sets aside. Real processes, forked from one
that imported qlora.train once (tests/forked_cli.py), train the tiny recipe.

The schedule is constant, so a run of 4 steps resumed with --train.steps=6 is the same run as one of 6 steps: a
resume that falls back to checkpoint-3 must end bitwise equal to the uninterrupted 6-step run.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_crash import adapter, assert_same_run, interrupt, metrics, slowed

from qlora.adapters.lora import ADAPTER_WEIGHTS
from qlora.config import Config, config_from_dict, load_recipe, read_config_json, resolve_paths
from qlora.data.batches import batch_rows, resume_position
from qlora.errors import ConfigError
from qlora.training import launch
from qlora.training.assemble import read_run_config
from qlora.training.checkpoint import FULL_WEIGHTS, OPTIMIZER, STATE, list_checkpoints
from qlora.training.progress import finished, said_done, same_rows
from qlora.training.runconfig import resume_config
from qlora.training.rundir import check_run_dir

TINY = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "tiny.py")
TINY_STEPS, TINY_R = TINY.train.steps, TINY.lora.r
# 4 rows per step, dropout on (resume must restore its RNG), constant lr 3e-3 (the recipe's), one checkpoint per step.
ARGS = ["recipes/tiny.py", "--train.batch_size=4", "--train.grad_accum=1", "--train.save_every=1",
        "--train.keep_checkpoints=4", "--train.eval_every=0", "--train.eval_batches=2", "--train.schedule=constant",
        "--train.warmup_steps=0", "--lora.dropout=0.1", "--train.log_every=1"]


def finished_run(cli, tmp_path_factory: pytest.TempPathFactory, steps: int) -> Path:
    out = tmp_path_factory.mktemp(f"steps-{steps}") / "run"
    result = cli.run([*ARGS, f"--train.steps={steps}", f"--output.dir={out}"])
    assert result.status == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def partial(cli, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run: checkpoints 1-4 (copied, never changed, by each test that resumes it)."""
    out = finished_run(cli, tmp_path_factory, 4)
    assert list_checkpoints(out) == [out / f"checkpoint-{s}" for s in range(1, 5)]
    return out


@pytest.fixture(scope="module")
def reference(cli, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, 6 steps without a stop."""
    return finished_run(cli, tmp_path_factory, 6)


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# --- what --resume continues, and what may change --------------------------------------------------------------------

def test_resume_without_overrides_continues_the_run_on_disk_not_the_recipe(cli, partial, tmp_path):
    """The run was started with --train.steps=4; the recipe says more. --resume alone ends the run at 4, where it is."""
    out = copy_of(partial, tmp_path)
    result = cli.run(["recipes/tiny.py", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert f"{out} has finished, at step 4 of 4" in result.stdout
    assert "the recipe's own values are not used: " in result.stdout and f"train.steps={TINY_STEPS} (the run has 4)" \
        in result.stdout
    assert max(line["step"] for line in metrics(out)) == 4
    assert json.loads((out / "run_config.json").read_text())["train"]["steps"] == 4


def test_a_moved_base_is_pointed_at_with_model_path_on_resume(cli, partial, tmp_path):
    """A base folder moved since the run began: --resume alone, and --resume --model.path=NEW, were both refused as
    'holds another run ... or --overwrite to replace that run', advice that would lose the run. The refusal now names
    the way on, and --model.path=NEW continues the run, recorded in run_config.json."""
    base, moved, out = tmp_path / "base-a", tmp_path / "base-b", tmp_path / "run"
    shutil.copytree(json.loads((partial / "run_config.json").read_text())["model"]["path"], base)
    assert cli.run([*ARGS, "--train.steps=2", f"--model.path={base}", f"--output.dir={out}"]).status == 0
    base.rename(moved)
    kept = snapshot(out)
    refused = cli.run([*ARGS, "--train.steps=3", f"--output.dir={out}", "--resume"])
    assert refused.status == 2 and f"if the base moved from {base}, continue with --resume --model.path=NEW_FOLDER" \
        in refused.stderr, refused.stderr
    assert snapshot(out) == kept
    result = cli.run([*ARGS, "--train.steps=3", f"--model.path={moved}", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert f"model.path '{base}' -> '{moved}'" in result.stdout
    assert json.loads((out / "run_config.json").read_text())["model"]["path"] == str(moved)
    assert max(line["step"] for line in metrics(out)) == 3
    shutil.copytree(moved, base)  # the recorded base there again: another folder is another base
    other = cli.run([*ARGS, "--train.steps=4", f"--model.path={base}", f"--output.dir={out}", "--resume"])
    assert other.status == 2 and "holds another run" in other.stderr and "if the base moved" not in other.stderr


def moved_data_run(cli, tmp_path: Path, steps: int) -> tuple[Path, Path, Path]:
    """A run of `steps` on the tiny data copied to tmp_path/a, then the folder moved to tmp_path/b: (a, b, run)."""
    old, new, out = tmp_path / "a", tmp_path / "b", tmp_path / "run"
    shutil.copytree(Path(__file__).resolve().parent.parent / "recipes" / "data" / "tiny", old)
    result = cli.run([*ARGS, f"--train.steps={steps}", f"--data.train={old / 'train.jsonl'}",
                      f"--data.eval={old / 'heldout.jsonl'}", f"--output.dir={out}"])
    assert result.status == 0, result.stderr
    old.rename(new)
    return old, new, out


def test_a_moved_data_file_is_given_with_data_train_on_resume(cli, reference, tmp_path):
    """A data file moved since the run began: --resume --data.train=NEW was refused as a change of the data the run
    trains on, and the only way on was the old path restored. The recorded path gone, the new one is taken where its
    rows are the run's (their sha256, recorded in the checkpoint), said and recorded in run_config.json; the run ends
    as one straight through on the recipe's copy of the same rows."""
    old, new, out = moved_data_run(cli, tmp_path, 4)
    kept = snapshot(out)
    refused = cli.run([*ARGS, "--train.steps=6", f"--output.dir={out}", "--resume"])
    assert refused.status == 2 and f"data.train={old / 'train.jsonl'} is gone since the run began: if the file " \
        "moved, continue with --resume --data.train=NEW_FILE" in refused.stderr, refused.stderr
    assert snapshot(out) == kept
    result = cli.run([*ARGS, "--train.steps=6", f"--data.train={new / 'train.jsonl'}",
                      f"--data.eval={new / 'heldout.jsonl'}", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert f"changed on the command line: data.train '{old / 'train.jsonl'}' -> '{new / 'train.jsonl'}', " \
        f"data.eval '{old / 'heldout.jsonl'}' -> '{new / 'heldout.jsonl'}'" in result.stdout, result.stdout
    assert json.loads((out / "run_config.json").read_text())["data"] == {
        **json.loads((reference / "run_config.json").read_text())["data"],
        "train": str(new / "train.jsonl"), "eval": str(new / "heldout.jsonl")}
    assert_same_run(out, reference)


def test_a_moved_data_file_with_other_rows_is_refused_before_writing(cli, tmp_path):
    """As many rows, one of them another: a count alone took it for the run's file."""
    old, new, out = moved_data_run(cli, tmp_path, 2)
    lines = (new / "train.jsonl").read_text().splitlines()
    (new / "train.jsonl").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    kept = snapshot(out)
    result = cli.run([*ARGS, "--train.steps=3", f"--data.train={new / 'train.jsonl'}",
                      f"--data.eval={new / 'heldout.jsonl'}", f"--output.dir={out}", "--resume"])
    assert result.status == 2
    assert error_lines(result) == [
        f"error: data.train={new / 'train.jsonl'} holds other rows than {old / 'train.jsonl'}, which the run trained "
        f"on (their sha256 differs): resume with --data.train at the file {old / 'train.jsonl'} moved to, or start "
        "a new run with --overwrite in place of --resume or another output.dir"], result.stderr
    assert snapshot(out) == kept
    shutil.copytree(new, old)  # the recorded file there again: another path is another data set, as before
    other = cli.run([*ARGS, "--train.steps=3", f"--data.train={new / 'train.jsonl'}", f"--output.dir={out}",
                     "--resume"])
    assert other.status == 2 and "--resume cannot change data.train" in other.stderr, other.stderr
    assert snapshot(out) == kept


def test_a_moved_synthetic_config_is_given_with_model_config_json_on_resume(cli, tmp_path):
    """A synthetic base's config.json moved since the run began: --resume --model.config_json=NEW was refused as a
    change of the base, and --resume alone failed to find the file. The new path is taken where the file holds the
    run's content (its sha256, recorded in the checkpoint), said and recorded; another content is refused in one line
    naming both paths; a later --resume from a checkpoint that recorded the old path takes the run as it is."""
    old, new, other, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json", tmp_path / "run"
    config = json.loads((Path(TINY.model.path) / "config.json").read_text())
    old.write_text(json.dumps(config))
    other.write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] // 2}))
    assert cli.run([*ARGS, "--model.synthetic=true", f"--model.config_json={old}", "--train.steps=2",
                    f"--output.dir={out}"]).status == 0
    old.rename(new)
    kept = snapshot(out)
    refused = cli.run([*ARGS, "--train.steps=3", f"--output.dir={out}", "--resume"])
    assert error_lines(refused) == [f"error: model.config_json={old} is gone since the run began: if the file moved, "
                                    "continue with --resume --model.config_json=NEW_FILE (checked to hold the same "
                                    "content)"], refused.stderr
    another = cli.run([*ARGS, "--train.steps=3", f"--model.config_json={other}", f"--output.dir={out}", "--resume"])
    assert error_lines(another) == [
        f"error: model.config_json={other} holds another config.json than the run's {old} (their sha256 differ): the "
        "base would be drawn from another architecture; point it at the run's file (or a copy of it), or start a new "
        "run with --overwrite in place of --resume or another output.dir"], another.stderr
    assert snapshot(out) == kept
    result = cli.run([*ARGS, "--train.steps=3", f"--model.config_json={new}", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert f"changed on the command line: model.config_json '{old}' -> '{new}'" in result.stdout, result.stdout
    assert json.loads((out / "run_config.json").read_text())["model"]["config_json"] == str(new)
    assert max(line["step"] for line in metrics(out)) == 3
    shutil.rmtree(out / "checkpoint-3")  # the newest checkpoint now the one that recorded the old path
    again = cli.run([*ARGS, "--train.steps=4", f"--output.dir={out}", "--resume"])
    assert again.status == 0 and "changed on the command line: train.steps 2 -> 4;" in again.stdout, again.stdout


def config_run(tmp_path: Path, synthetic: bool) -> tuple[Config, Path, Path, Path]:
    """A run of the tiny recipe in tmp_path with model.config_json at a.json, its run_config.json and checkpoint-1;
    b.json a copy of a.json, c.json another config: (its config, a, b, c)."""
    first, copied, other = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    first.write_text('{"model_type": "llama"}\n')
    copied.write_text(first.read_text())
    other.write_text('{"model_type": "llama", "hidden_size": 64}\n')
    cfg = copy.deepcopy(TINY)
    cfg.output.dir, cfg.model.config_json, cfg.model.synthetic = str(tmp_path), str(first), synthetic
    cfg = resolve_paths(cfg)
    (tmp_path / "run_config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / OPTIMIZER).touch()  # a checkpoint is listed with both files; only STATE is read
    torch.save({"config": cfg.to_dict()}, tmp_path / "checkpoint-1" / STATE)
    return cfg, first, copied, other


def test_the_config_json_of_a_base_loaded_from_its_weights_may_change_on_resume(tmp_path, capsys):
    """model.config_json fixes a synthetic base alone: for a base loaded from its weights it only feeds the memory
    estimate, yet --resume --model.config_json=X was refused as changing the base the adapter trains against."""
    cfg, first, _, other = config_run(tmp_path, synthetic=False)
    assert resume_config(cfg, [f"--model.config_json={other}"]).model.config_json == str(other)
    assert f"changed on the command line: model.config_json '{first}' -> '{other}'" in capsys.readouterr().out


def test_a_synthetic_config_is_checked_by_its_content_not_its_path(tmp_path):
    """For a synthetic base the content decides, not the path: the sha256 a checkpoint records, or for one written
    before that, the file at the old path; with neither there, it cannot be checked, and says so. run_config.json
    pointed at a copy (a moved resume cut short before its checkpoint) is taken by qlora.eval's check and --resume
    alike; one pointed at another content, or the file edited where it lies, is refused by both."""
    from qlora.training.runconfig import check_recorded

    cfg, first, copied, other = config_run(tmp_path, synthetic=True)
    (tmp_path / "run_config.json").write_text(json.dumps(cfg.to_dict()))
    sha = hashlib.sha256(first.read_bytes()).hexdigest()
    for recorded in ({"config_json_sha256": sha}, {}):  # a checkpoint of now, one written before the sha256
        torch.save({"config": cfg.to_dict(), **recorded}, tmp_path / "checkpoint-1" / STATE)
        assert resume_config(cfg, [f"--model.config_json={copied}"]).model.config_json == str(copied)
        with pytest.raises(ConfigError, match=rf"^model.config_json={other} holds another config.json than the run's "
                                              rf"{first} \(their sha256 differ\)"):
            resume_config(cfg, [f"--model.config_json={other}"])
    first.unlink()
    with pytest.raises(ConfigError, match=rf"^model.config_json={copied} cannot be checked against the run's {first}: "
                                          r"that file is gone, and checkpoint-1 was written before checkpoints "
                                          rf"recorded its sha256; put the file back at {first}, or start a new run"):
        resume_config(cfg, [f"--model.config_json={copied}"])
    torch.save({"config": cfg.to_dict(), "config_json_sha256": sha}, tmp_path / "checkpoint-1" / STATE)
    raw = json.loads((tmp_path / "run_config.json").read_text())
    for path in (copied, other):
        raw["model"]["config_json"] = str(path)
        (tmp_path / "run_config.json").write_text(json.dumps(raw))
        if path == copied:
            check_recorded(config_from_dict(raw, "run_config.json"), tmp_path / "run_config.json")
            assert resume_config(cfg, []).model.config_json == str(copied)
            continue
        with pytest.raises(ConfigError, match=rf"^model.config_json={other} holds another config.json"):
            check_recorded(config_from_dict(raw, "run_config.json"), tmp_path / "run_config.json")
    copied.write_text(other.read_text())  # edited where it lies, where the checkpoint recorded it
    raw["model"]["config_json"] = str(copied)
    (tmp_path / "run_config.json").write_text(json.dumps(raw))
    torch.save({"config": raw, "config_json_sha256": sha}, tmp_path / "checkpoint-1" / STATE)
    with pytest.raises(ConfigError, match=rf"^model.config_json={copied} holds another config.json than the run's, "
                                          r"edited since \(its sha256 differs\)"):
        resume_config(cfg, [])
    # eval, generate, merge and export read the run through read_run_config: they drew another base from the edit
    with pytest.raises(ConfigError, match=rf"^model.config_json={copied} holds another config.json than the run's, "
                                          r"edited since \(its sha256 differs\)"):
        read_run_config(tmp_path)


def test_rows_without_a_fingerprint_are_checked_by_their_counts_and_said(capsys):
    """A checkpoint written before rows_sha256 takes a moved file by its row counts, and says so; one with them
    refuses a file edited in place to other rows of the same count."""
    cfg = copy.deepcopy(TINY)
    state = {"rows": [600, 100], "config": {"data": {"train": "/old/train.jsonl", "eval": cfg.data.eval}}}
    same_rows(cfg, state, 600, 100, ["t", "e"])
    assert "data.train=recipes/data/tiny/train.jsonl is taken for the run's file, moved, by its row counts alone" \
        in capsys.readouterr().out
    with pytest.raises(ConfigError, match="the data now gives 599 training"):
        same_rows(cfg, state, 599, 100, ["t", "e"])
    capsys.readouterr()
    state = {**state, "rows_sha256": ["t", "e"], "config": {"data": {"train": cfg.data.train, "eval": cfg.data.eval}}}
    same_rows(cfg, state, 600, 100, ["t", "e"])
    assert not capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"^data.eval=recipes/data/tiny/heldout.jsonl holds other rows than when the "
                                          r"run trained on it \(their sha256 differs\): restore the file to resume"):
        same_rows(cfg, state, 600, 100, ["t", "other"])


def test_another_hub_model_on_resume_is_another_run_not_a_moved_base(tmp_path):
    """A base named by a hub id is never 'gone': --resume --model.path=another/model continued a run of org/model-a on
    org/model-b as if the base had moved (the check took any path not on disk for a moved folder)."""
    from qlora.training.runconfig import check_identity

    saved, cfg = load_recipe("recipes/tiny.py"), load_recipe("recipes/tiny.py")
    saved.model.path, cfg.model.path = "org/model-a", "org/model-b"
    with pytest.raises(ConfigError, match=r"holds another run \(model.path='org/model-a', this recipe "
                                          r"'org/model-b'\): use another output.dir"):
        check_identity(saved, cfg, tmp_path, moved=True)


@pytest.mark.parametrize(("key", "value"), [("lora.r", 8), ("lora.alpha", 64.0), ("lora.targets", ["q_proj"]),
                                          ("quant.quant_type", "fp4"), ("quant.method", "lora")])
def test_a_recipe_of_another_adapter_or_base_is_another_run(tmp_path, key, value):
    """Each key of the run's identity, changed in the recipe or on the command line, is another run: refused, naming
    it. Without lora.alpha (or quant.quant_type) there, --resume --lora.alpha=64 went on at another scale of the update
    (or on an fp4 base), the checkpoints loading into adapters of the same shapes; without lora.r, it called every
    checkpoint damaged."""
    from qlora.training.runconfig import check_identity

    saved, cfg = load_recipe("recipes/tiny.py"), load_recipe("recipes/tiny.py")
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=rf"holds another run \({re.escape(key)}="):
        check_identity(saved, cfg, tmp_path)
    check_identity(saved, saved, tmp_path)


def test_the_same_base_written_otherwise_and_a_full_runs_lora_keys_are_the_same_run(tmp_path):
    """Not another run: a base recorded by a run_config.json written before paths were absolute (relative to where
    the run started) that the recipe names absolute, and lora.r or lora.targets changed in the recipe of a full
    fine-tuning run, which has no adapters. Refused, each was sent to --overwrite, which deletes the run."""
    from qlora.training.runconfig import check_identity

    saved, cfg = load_recipe("recipes/tiny.py"), load_recipe("recipes/tiny.py")
    saved.model.path, cfg.model.path = "recipes/data", str(Path("recipes/data").resolve())
    check_identity(saved, cfg, tmp_path)
    saved.quant.method = cfg.quant.method = "full"
    cfg.lora.r, cfg.lora.targets = 8, ["q_proj"]
    check_identity(saved, cfg, tmp_path)


def test_a_refused_resume_names_overwrite_in_place_of_resume(tmp_path):
    """--resume and --overwrite are refused together, yet the refusals of a --resume that a new run gets past sent the
    user to --overwrite: added to the command, it met 'pass one of them' next (measured: the tiny recipe out of memory
    at step 1, its suggestion --lora.r=16 given with --resume refused as another run 'or --overwrite to replace that
    run', then --resume --lora.r=16 --overwrite refused). Each names --overwrite in place of --resume now; a command
    without --resume is told --overwrite, and that command is taken."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = copy.deepcopy(TINY)
    cfg.output.dir = str(out)
    (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")  # stopped before a checkpoint
    other = copy.deepcopy(cfg)
    other.lora.r = TINY_R // 2
    with pytest.raises(ConfigError, match=rf"holds another run \(lora.r={TINY_R}, this recipe {TINY_R // 2}\): use "
                                          r"another output.dir, or --overwrite in place of --resume to replace that "
                                          r"run$"):
        resume_config(other, [f"--lora.r={TINY_R // 2}"])
    with pytest.raises(ConfigError, match=r"use another output.dir, or --overwrite to replace that run$"):
        check_run_dir(out, other, resume=False, overwrite=False)
    with pytest.raises(ConfigError, match=r"pass one of them \(--overwrite alone starts over\)$"):
        check_run_dir(out, other, resume=True, overwrite=True)
    check_run_dir(out, other, resume=False, overwrite=True)  # what the refusal of the --resume named
    (out / ADAPTER_WEIGHTS).write_bytes(b"")  # a finished run, its checkpoints deleted to save space
    with pytest.raises(ConfigError, match=r"no checkpoint to continue from: use another output.dir, or --overwrite in "
                                          r"place of --resume to replace it$"):
        check_run_dir(out, resume_config(cfg, []), resume=True, overwrite=False)
    (out / "run_config.json").write_text('{"model": ')
    with pytest.raises(ConfigError, match=r"restore it, or start the run again with --overwrite in place of --resume$"):
        resume_config(cfg, [])


def test_a_lower_lr_on_resume_takes_effect(cli, partial, tmp_path):
    """The exit-3 advice "lower train.lr, then --resume" works: the resumed steps run at the new lr, in the optimizer
    (the adapter moves ~30x less per step) as in the log."""
    out = copy_of(partial, tmp_path)
    result = cli.run([*ARGS, "--train.steps=6", "--train.lr=1e-4", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert "changed on the command line: train.steps 4 -> 6, train.lr 0.003 -> 0.0001" in result.stdout
    lrs = {line["step"]: line["lr"] for line in metrics(out) if "lr" in line}
    assert [lrs[s] for s in range(1, 7)] == [3e-3] * 4 + [1e-4] * 2
    a3, a4, a5 = (adapter(out / f"checkpoint-{s}") for s in (3, 4, 5))
    moved = {s: sum(float((b[k] - a[k]).norm()) for k in a) for s, (a, b) in {4: (a3, a4), 5: (a4, a5)}.items()}
    assert moved[5] < 0.2 * moved[4], moved
    assert json.loads((out / "run_config.json").read_text())["train"]["lr"] == 1e-4


def test_another_optimizer_on_resume_starts_its_state_afresh(cli, partial, tmp_path):
    """Used to crash after run_config.json was rewritten; now the run goes on with the new optimizer, and a later
    --resume without the override keeps it (the run on disk says adamw)."""
    out = copy_of(partial, tmp_path)
    result = cli.run([*ARGS, "--train.steps=5", "--train.optimizer=adamw", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert "train.optimizer paged_adamw_32bit -> adamw: its state starts afresh" in result.stdout
    assert json.loads((out / "run_config.json").read_text())["train"]["optimizer"] == "adamw"
    result = cli.run(["recipes/tiny.py", "--train.steps=6", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert "starts afresh" not in result.stdout and "checkpoint-5 at step 5" in result.stdout
    assert "exp_avg" in torch.load(out / "checkpoint-6" / OPTIMIZER, weights_only=True)["state"][0]


def test_another_optimizer_keeps_the_resumed_weights_of_16_bit_adapters(cli, tmp_path):
    """bf16 adapters train through fp32 masters (qlora/adapters/master.py); a fresh optimizer's copies must start from
    the resumed adapter, not from the adapter as initialised (B = 0)."""
    out = tmp_path / "run"
    bf16 = [*ARGS, "--quant.compute_dtype=bf16", f"--output.dir={out}"]
    assert cli.run([*bf16, "--train.steps=3"]).status == 0
    result = cli.run([*bf16, "--train.steps=4", "--train.optimizer=adamw", "--resume"])
    assert result.status == 0, result.stderr
    b3, b4 = ({k: v.float() for k, v in adapter(out / f"checkpoint-{s}").items() if "lora_B" in k} for s in (3, 4))
    assert sum(float(v.norm()) for v in b4.values()) > 0.9 * sum(float(v.norm()) for v in b3.values()) > 0


def test_a_smaller_batch_on_resume_continues_from_the_same_row(cli, partial, tmp_path):
    out = copy_of(partial, tmp_path)
    result = cli.run([*ARGS, "--train.steps=6", "--train.batch_size=2", "--train.grad_accum=2",
                      "--data.max_seq_len=96", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert "data.max_seq_len 128 -> 96, train.steps 4 -> 6, train.batch_size 4 -> 2, train.grad_accum 1 -> 2" in \
        result.stdout
    assert torch.load(out / "checkpoint-6" / STATE, weights_only=True)["micro_batch"] == 12  # rows 16-23: 8 + 4
    # train.eval_batches=2 caps the held-out rows in batches of train.batch_size: the closing line says they differ
    assert "; before on 8 rows, after on 4: train.batch_size or train.eval_batches changed since)" in result.stdout


def test_a_shorter_max_seq_len_that_drops_rows_is_refused_before_writing(cli, partial, tmp_path):
    """A row fewer reorders the rest of the epoch (batch_rows permutes the row count) and changes the held-out set:
    at 42 tokens 223 of the 600 training rows have their answer cut off. 96 keeps every row (the test above)."""
    out = copy_of(partial, tmp_path)
    before = snapshot(out)
    result = cli.run([*ARGS, "--train.steps=6", "--data.max_seq_len=42", f"--output.dir={out}", "--resume"])
    assert result.status == 2, result.stderr
    assert re.fullmatch(r"error: the data now gives \d+ training and \d+ held-out rows, the run trained on 600 and "
                        r"held out 100: a data file changed, or data.max_seq_len=42 keeps other rows .* or start a "
                        r"new run",
                        error_lines(result)[-1]), result.stderr
    assert snapshot(out) == before


def test_packed_rows_keep_their_length_on_resume(tmp_path):
    """Packing fills rows of data.max_seq_len tokens: another length packs other rows."""
    cfg = copy.deepcopy(TINY)
    cfg.data.pack, cfg.output.dir = True, str(tmp_path)
    (tmp_path / "run_config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(ConfigError, match=r"--resume cannot change data.max_seq_len \(128 -> 64\): it fixes the rows "
                                          r"the documents are packed into \(data.pack\)"):
        resume_config(cfg, ["--data.max_seq_len=64"])


@pytest.mark.parametrize(("override", "fixes"), [
    ("--data.format=text", "the data the run trains on"),
    ("--data.eval_fraction=0.2", "the held-out split its losses compare"),
])
def test_a_setting_the_checkpoints_fix_is_refused_on_resume(tmp_path, override, fixes):
    """Each went on from the checkpoint without a word where left out of FIXED_ON_RESUME (tests/test_bad_input.py
    changes the others): the rows read as plain text where the run read them by their format (other tokens, other
    targets), or another share of the training file held out (the split redrawn, held-out rows trained on). Refused
    once a checkpoint exists, naming what it fixes; before one, the resume is a new start and takes it."""
    cfg = copy.deepcopy(TINY)
    cfg.output.dir, cfg.data.eval = str(tmp_path), None  # the held-out rows split off the training file
    (tmp_path / "run_config.json").write_text(json.dumps(resolve_paths(copy.deepcopy(cfg)).to_dict()))
    key = override[2:].split("=")[0]
    section, name = key.split(".")
    assert getattr(getattr(resume_config(cfg, [override]), section), name) != getattr(getattr(cfg, section), name)
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(ConfigError, match=rf"^--resume cannot change {re.escape(key)} \(.*\): it fixes {fixes}; "
                                          rf"drop --{re.escape(key)} to continue the run"):
        resume_config(cfg, [override])


@pytest.mark.parametrize(("section", "edit"), [("lora", {"alpha": 64}), ("quant", {"quant_type": "fp4"}),
                                              ("data", {"max_seq_len": 64})])
def test_an_identity_or_packed_length_edited_in_run_config_is_refused(tmp_path, section, edit):
    """run_config.json edited since the checkpoint: lora.alpha (or quant.quant_type) there, and qlora.eval, which
    checks the file against the checkpoint alone, scored the adapter at another scale of its update (or on another
    base); data.max_seq_len of a packed run, its held-out rows packed into others."""
    from qlora.training.runconfig import check_recorded

    cfg = copy.deepcopy(TINY)
    cfg.data.pack = True
    (tmp_path / "checkpoint-1").mkdir()
    torch.save({"config": cfg.to_dict()}, tmp_path / "checkpoint-1" / STATE)
    (tmp_path / "checkpoint-1" / OPTIMIZER).touch()  # a checkpoint is listed with both files; only STATE is read
    raw = cfg.to_dict()
    (tmp_path / "run_config.json").write_text(json.dumps(raw))
    assert check_recorded(cfg, tmp_path / "run_config.json")[0] == tmp_path / "checkpoint-1"
    raw[section].update(edit)
    (tmp_path / "run_config.json").write_text(json.dumps(raw))
    (key, value), = edit.items()
    with pytest.raises(ConfigError, match=rf"run_config.json has {section}.{key}={value!r}, but checkpoint-1 was "
                                          rf"written with {getattr(getattr(TINY, section), key)!r}, which the "
                                          rf"checkpoints fix: restore {section}.{key} in run_config.json"):
        check_recorded(config_from_dict(raw, "run_config.json"), tmp_path / "run_config.json")


@pytest.mark.parametrize(("n", "old", "new", "seen"), [(200, 4, 2, 4), (200, 4, 3, 7), (200, 8, 5, 30), (10, 3, 4, 5)])
def test_resume_position_neither_repeats_nor_skips_a_row_of_the_epoch(n, old, new, seen):
    """After `seen` micro-batches of `old` rows, the first micro-batch of `new` rows starts at the first boundary of
    its size at or after the rows already seen in that epoch (or at the next epoch, if none is left)."""
    epoch, offset = divmod(seen, n // old)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).tolist()  # batch_rows' order, seed 0
    consumed = order[:offset * old]
    start = resume_position({"micro_batch": seen, "batch_size": old}, new, n, 0)
    first = batch_rows(n, new, 0, start)
    if start // (n // new) == epoch:
        assert not set(first) & set(consumed)
        assert offset * old <= order.index(first[0]) < offset * old + new
    else:  # no whole micro-batch of the new size was left in the epoch
        assert start == (epoch + 1) * (n // new) and offset * old + new > (n // new) * new


def test_fewer_steps_than_the_checkpoint_are_refused_before_loading(cli, partial, tmp_path):
    """Before the base loads and the rows are read: refused after them, a 70B run said so minutes late."""
    out = copy_of(partial, tmp_path)
    before = snapshot(out)
    result = cli.run([*ARGS, "--train.steps=2", f"--output.dir={out}", "--resume"])
    assert result.status == 2, result.stderr
    assert "loading" not in result.stdout and "tokenised" not in result.stdout, result.stdout
    assert error_lines(result)[-1].startswith("error: train.steps=2 is below step 4, where ")
    assert error_lines(result)[-1].endswith("checkpoint-4 stands: set --train.steps=4 or more to continue")
    assert snapshot(out) == before


EVERY = ["--train.eval_every=2", "--train.log_every=3"]


@pytest.fixture(scope="module")
def evaluated(cli, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 6 steps straight through, evaluated every 2 steps and logged every 3."""
    out = tmp_path_factory.mktemp("evaluated") / "run"
    assert cli.run([*ARGS, *EVERY, "--train.steps=6", f"--output.dir={out}"]).status == 0
    return out


@pytest.mark.parametrize("first", [4, 3], ids=["ended at an evaluation", "ended at a logged step"])
def test_a_finished_run_given_more_steps_writes_the_rows_of_a_run_straight_through(cli, evaluated, tmp_path, first):
    """A 4-step run resumed to 6 lacked the evaluation a run straight through writes at step 4 (its final evaluation
    there, written after checkpoint-4, is cut from metrics.jsonl with the rest), and kept the training line it logged
    at step 4 only for being its last (log_every=3): measured on the tiny recipe, eval_every=2, log_every=3, a 4-step
    run resumed to 8 logged eval rows at 0, 2, 6, 8 and training rows at 3, 4, 6, 8; straight through, eval rows at 0,
    2, 4, 6, 8 and training rows at 3, 6, 8, every value bitwise the same. Step 3 is no evaluation: none is added."""
    out = tmp_path / "run"
    assert cli.run([*ARGS, *EVERY, f"--train.steps={first}", f"--output.dir={out}"]).status == 0
    result = cli.run([*ARGS, *EVERY, "--train.steps=6", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert_same_run(out, evaluated)
    assert (f"step {first}: held-out loss" in result.stdout) == (first == 4), result.stdout


@pytest.mark.parametrize("where", ["qlora.training.step:eval_stats", "qlora.training.checkpoint:save_checkpoint"],
                         ids=["in the evaluation at step 4", "as checkpoint-5 is written"])
def test_a_finished_run_given_more_steps_and_killed_before_its_next_checkpoint_resumes(cli, evaluated, tmp_path,
                                                                                       where):
    """The same command again was refused (`metrics.jsonl holds 387 bytes, the checkpoint recorded 540 ending a line:
    it was cut short or replaced`, whose fix, moving the file away, loses the run's rows): the resume had dropped the
    training line of step 4, which checkpoint-4 counted, as it started, and written its own rows in its place."""
    out = tmp_path / "run"
    assert cli.run([*ARGS, *EVERY, "--train.steps=4", f"--output.dir={out}"]).status == 0
    longer = [*ARGS, *EVERY, "--train.steps=6", f"--output.dir={out}", "--resume"]
    assert interrupt(cli, longer, slowed(where, 60), tmp_path / "here", signal.SIGKILL).status == -signal.SIGKILL
    assert list_checkpoints(out)[-1].name == "checkpoint-4"
    result = cli.run(longer)
    assert result.status == 0, result.stderr
    assert_same_run(out, evaluated)


def test_a_finished_run_given_more_steps_killed_and_resumed_to_its_own_steps_ends_as_it_did(cli, tmp_path):
    """The resume to more steps drops the training line of step 4 as it writes its evaluation there; killed before its
    next checkpoint and resumed with the old --train.steps=4, the run lacked that line (measured on the tiny recipe,
    log_every=3, eval_every=2): checkpoint-4 now records it, and it is put back."""
    out, ended = tmp_path / "run", tmp_path / "ended"
    assert cli.run([*ARGS, *EVERY, "--train.steps=4", f"--output.dir={out}"]).status == 0
    shutil.copytree(out, ended)
    longer = [*ARGS, *EVERY, "--train.steps=6", f"--output.dir={out}", "--resume"]
    killed = interrupt(cli, longer, slowed("qlora.training.checkpoint:save_checkpoint", 60), tmp_path / "here",
                       signal.SIGKILL)
    assert killed.status == -signal.SIGKILL
    assert b'"step": 4, "loss"' not in (out / "metrics.jsonl").read_bytes()  # as the kill left it
    result = cli.run([*ARGS, *EVERY, "--train.steps=4", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert_same_run(out, ended)


def test_a_finished_run_given_more_steps_keeps_its_last_step_as_its_own_settings_had_it(cli, tmp_path):
    """Step 4 of a 4-step run ran under its settings, as in a run stopped after checkpoint-4 and resumed: given 6
    steps, --train.log_every=3 and --train.eval_every=3, a 4-step run logged every step and evaluated every 2 lost its
    training line at step 4 (taken for one logged only for being its last: 4 % 3) and made no evaluation there (4 % 3
    again), where a 6-step run of its settings, resumed from checkpoint-4 with the same command, keeps both."""
    first, then = [*ARGS, "--train.eval_every=2", "--train.log_every=1"], [*ARGS, "--train.eval_every=3",
                                                                           "--train.log_every=3"]
    ended, stopped = tmp_path / "ended", tmp_path / "stopped"
    assert cli.run([*first, "--train.steps=4", f"--output.dir={ended}"]).status == 0
    assert cli.run([*first, "--train.steps=6", f"--output.dir={stopped}"]).status == 0
    for step in (5, 6):  # as a kill -9 after checkpoint-4 leaves it
        shutil.rmtree(stopped / f"checkpoint-{step}")
    for out in (ended, stopped):
        result = cli.run([*then, "--train.steps=6", f"--output.dir={out}", "--resume"])
        assert result.status == 0, result.stderr
    assert_same_run(ended, stopped)


def test_a_signal_in_the_evaluation_at_a_finished_runs_last_step_stops_without_a_step(cli, evaluated, tmp_path):
    """It trained a step and wrote checkpoint-5 first (`stopped by SIGTERM after step 5`; on a large model a step and a
    checkpoint more of waiting), where a signal in the evaluation before training stops at once: no step is in
    flight. The same command then ends as a run straight through."""
    out = tmp_path / "run"
    assert cli.run([*ARGS, *EVERY, "--train.steps=4", f"--output.dir={out}"]).status == 0
    longer = [*ARGS, *EVERY, "--train.steps=6", f"--output.dir={out}", "--resume"]
    evaluating = slowed("qlora.training.step:eval_stats", 0.5)
    result = interrupt(cli, longer, evaluating, tmp_path / "evaluating", signal.SIGTERM)
    assert result.status == 128 + signal.SIGTERM, result.stderr
    assert error_lines(result)[-1] == (f"stopped by SIGTERM after step 4; {out / 'checkpoint-4'} holds it: continue "
                                       "with --resume")
    assert list_checkpoints(out)[-1].name == "checkpoint-4"
    result = cli.run(longer)
    assert result.status == 0, result.stderr
    assert_same_run(out, evaluated)


# --- a finished run resumed -----------------------------------------------------------------------------------------

def files_and_times(path: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_a_finished_run_resumed_says_so_and_writes_nothing(cli, partial, tmp_path):
    """It loaded the base, evaluated again and wrote its end anew, no step left (measured on the tiny recipe, 3 steps:
    the lock, run_config.json, metrics.jsonl, the adapter and memory.json rewritten, the adapter's and memory.json's
    bytes changed)."""
    out = copy_of(partial, tmp_path)  # its files' times kept
    before = files_and_times(out)
    result = cli.run([*ARGS, "--train.steps=4", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(f"resuming {out} with the settings in its run_config.json")
    assert result.stdout.splitlines()[1:] == [
        f"{out} has finished, at step 4 of 4: its adapter is {out / ADAPTER_WEIGHTS}; nothing was loaded or written "
        "(to train it further: --resume --train.steps=N, N > 4)"]
    assert files_and_times(out) == before


@pytest.mark.parametrize("given, asked", [
    (["--train.lr=1e-5"], "train.lr 0.003 -> 1e-05 to act on; nothing was loaded or written (to train it further: "
                          "--resume --train.steps=N, N > 4, with it)"),
    (["--train.steps=4", "--train.eval_every=3", "--lora.dropout=0.0"],
     "lora.dropout 0.1 -> 0.0, train.eval_every 0 -> 3 to act on; nothing was loaded or written (to train it further: "
     "--resume --train.steps=N, N > 4, with them)"),
], ids=["lr", "eval_every and dropout"])
def test_a_finished_run_resumed_with_other_settings_is_refused_before_loading(cli, partial, tmp_path, given, asked):
    """It loaded the base, trained nothing, and rewrote its adapter, memory.json and a run_config.json that recorded the
    new setting, which no step ran under (measured on the tiny recipe: --resume --train.lr=1e-5 of a finished 4-step
    run, exit 0). A value given as the run has it changes nothing, and is said finished as above."""
    out = copy_of(partial, tmp_path)
    before = files_and_times(out)
    result = cli.run(["recipes/tiny.py", f"--output.dir={out}", "--resume", *given])
    assert result.status == 2, result.stderr
    assert error_lines(result) == [f"error: {out} has finished, at step 4 of 4, so no step is left for the command "
                                   f"line's {asked}"]
    assert files_and_times(out) == before
    result = cli.run(["recipes/tiny.py", f"--output.dir={out}", "--resume", "--train.lr=0.003"])
    assert result.status == 0 and f"{out} has finished, at step 4 of 4: its adapter" in result.stdout, result.stderr
    assert files_and_times(out) == before


def test_a_finished_full_run_says_its_trained_weights_are_there(tmp_path, capsys):
    """A full-method run's end is its trained weights, not an adapter: the line read 'its trained weights is ...'."""
    cfg = copy.deepcopy(TINY)
    cfg.quant.method, cfg.output.dir = "full", str(tmp_path)
    assert said_done(cfg, launch.from_env(), (True, []))
    assert capsys.readouterr().out == (
        f"{tmp_path} has finished, at step {TINY_STEPS} of {TINY_STEPS}: its trained weights are "
        f"{tmp_path / FULL_WEIGHTS}; nothing was loaded or written (to train it further: --resume "
        f"--train.steps=N, N > {TINY_STEPS})\n")


def rewrite_last_row(path: Path, edit) -> None:
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[:start] + edit(data[start:]))


def weights_of_step(path: Path, step: int) -> None:
    """The weights as they are, their header's step another, their time as it was (memory.json no older)."""
    stat = path.stat()
    save_file(load_file(str(path)), str(path), metadata={"format": "pt", "step": str(step)})
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def memory_aged(out: Path, ns: int) -> None:
    """memory.json's time `ns` from the adapter's (the order of a run's end: it is written last)."""
    when = (out / ADAPTER_WEIGHTS).stat().st_mtime_ns + ns
    os.utime(out / "memory.json", ns=(when, when))


# Each spoils one thing finished() reads, the rest as the finished run left it (run_config.json is the resume's).
NOT_FINISHED = {
    "no checkpoint": lambda out: [shutil.rmtree(p) for p in out.glob("checkpoint-*")],
    "the last checkpoint deleted": lambda out: shutil.rmtree(out / "checkpoint-4"),
    "a newer checkpoint half written": lambda out: (out / "checkpoint-5").mkdir(),
    "the last checkpoint's trainer state damaged": lambda out: truncate(out / "checkpoint-4" / STATE),
    "the last checkpoint's trainer state of another step": lambda out: edit_state(out / "checkpoint-4" / STATE, step=2),
    "no metrics.jsonl": lambda out: (out / "metrics.jsonl").unlink(),
    "the last row of another step": lambda out: rewrite_last_row(
        out / "metrics.jsonl", lambda line: json.dumps({**json.loads(line), "step": 3}).encode() + b"\n"),
    "the last row no evaluation": lambda out: rewrite_last_row(
        out / "metrics.jsonl", lambda line: json.dumps({"step": 4, "loss": 1.0}).encode() + b"\n"),
    "the last row torn before its newline": lambda out: rewrite_last_row(out / "metrics.jsonl", bytes.rstrip),
    "the weights of another step": lambda out: weights_of_step(out / ADAPTER_WEIGHTS, 3),
    "no adapter_config.json": lambda out: (out / "adapter_config.json").unlink(),
    "no memory.json": lambda out: (out / "memory.json").unlink(),
    "memory.json older than the weights": lambda out: memory_aged(out, -1),
    "run_config.json not JSON": lambda out: (out / "run_config.json").write_text("{"),
    "another lr in run_config.json": lambda out: (out / "run_config.json").write_text(
        (out / "run_config.json").read_text().replace('"lr": 0.003', '"lr": 0.001')),
}
FINISHED = {"as it ended": lambda out: None, "memory.json as old as the weights": lambda out: memory_aged(out, 0)}


@pytest.mark.parametrize("spoil", [*FINISHED, *NOT_FINISHED])
def test_finished_is_read_from_each_file_a_runs_end_writes(partial, tmp_path, spoil):
    """The finished-run tests above pass every one of finished()'s checks, or fail several: each check is taken
    alone here. A run moved (copied elsewhere, its times kept) is finished where it is now."""
    out = copy_of(partial, tmp_path)
    cfg = read_config_json(partial / "run_config.json")  # as --resume reads it: the run's settings, in its dir now
    cfg.output.dir = str(out)
    {**FINISHED, **NOT_FINISHED}[spoil](out)
    assert finished(cfg) == (spoil in FINISHED, [])


MEMORY_WRITE = "qlora.memory.profiler:PhaseTracker.write"


@pytest.mark.parametrize("where", ["qlora.training.checkpoint:save_final", MEMORY_WRITE],
                         ids=["before the adapter", "before memory.json"])
def test_a_run_killed_after_its_last_checkpoint_is_ended_by_its_resume(cli, partial, tmp_path, where):
    """After its last checkpoint a run writes its final evaluation's row, the adapter, then memory.json: killed before
    either file, it has not finished, and --resume writes them as the run would have."""
    out = tmp_path / "run"
    argv = [*ARGS, "--train.steps=4", f"--output.dir={out}"]
    assert interrupt(cli, argv, slowed(where, 60), tmp_path / "here", signal.SIGKILL).status == -signal.SIGKILL
    assert (out / ADAPTER_WEIGHTS).is_file() == (where == MEMORY_WRITE) and not (out / "memory.json").exists()
    result = cli.run([*argv, "--resume"])
    assert result.status == 0, result.stderr
    assert f"adapter written to {out}" in result.stdout and (out / "memory.json").is_file()
    assert_same_run(out, partial)


@pytest.mark.parametrize("where", ["qlora.training.checkpoint:save_final", MEMORY_WRITE],
                         ids=["before the adapter", "before memory.json"])
def test_a_run_extended_and_killed_after_its_last_checkpoint_is_ended_by_its_resume(cli, partial, reference, tmp_path,
                                                                                   where):
    """The adapter and memory.json there are the shorter run's end (the adapter records step 4), or memory.json is,
    older than the adapter of the new last step: neither is this end's."""
    out = copy_of(partial, tmp_path)
    stale = (out / "memory.json").stat().st_mtime_ns
    longer = [*ARGS, "--train.steps=6", f"--output.dir={out}", "--resume"]
    killed = interrupt(cli, longer, slowed(where, 60), tmp_path / "here", signal.SIGKILL)
    assert killed.status == -signal.SIGKILL
    assert (out / "memory.json").stat().st_mtime_ns == stale and list_checkpoints(out)[-1].name == "checkpoint-6"
    result = cli.run(longer)
    assert result.status == 0, result.stderr
    assert f"adapter written to {out}" in result.stdout
    assert (out / "memory.json").stat().st_mtime_ns > (out / ADAPTER_WEIGHTS).stat().st_mtime_ns
    assert_same_run(out, reference)


# --- a damaged newest checkpoint ------------------------------------------------------------------------------------

def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def nan_adapter(path: Path) -> None:
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})


def reshape_optimizer_state(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    moments = state["state"][0]["__bnb_optimizer_quant_state__"]  # where bitsandbytes keeps them
    moments["state1"] = moments["state1"][:, :2].contiguous()  # a moment of another shape
    torch.save(state, path)


def nan_optimizer_state(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["state"][0]["__bnb_optimizer_quant_state__"]["state1"][0, 0] = float("nan")  # the next step's update: nan
    torch.save(state, path)


def pickle_with_code(path: Path) -> None:
    torch.save({"step": 4, "when": datetime.date(2026, 1, 1)}, path)  # weights_only refuses arbitrary objects


def edit_state(path: Path, **fields: object) -> None:
    torch.save({**torch.load(path, weights_only=True), **fields}, path)


DAMAGE = {
    "adapter cut short": (ADAPTER_WEIGHTS, truncate, r"the adapter is unusable \("),
    "adapter missing": (ADAPTER_WEIGHTS, lambda p: p.unlink(), r"the adapter is unusable \(No such file"),
    "adapter holds nan": (ADAPTER_WEIGHTS, nan_adapter, r"holds nan or inf: the adapter is broken"),
    "optimizer cut short": (OPTIMIZER, truncate, r"optimizer.pt is unreadable \("),
    "optimizer of another shape": (OPTIMIZER, reshape_optimizer_state,
                                   rf"optimizer.pt: state1 of parameter 0 has shape \({TINY_R}, 2\), not "
                                   rf"\({TINY_R}, 128\)"),
    "optimizer holds nan": (OPTIMIZER, nan_optimizer_state, r"optimizer.pt: state1 of parameter 0 holds nan or inf"),
    "trainer state garbage": (STATE, lambda p: p.write_bytes(b"not a torch file"), r"trainer_state.pt is "
                                                                                     r"unreadable \("),
    "trainer state with code": (STATE, pickle_with_code, r"trainer_state.pt is unreadable \(.*[Ww]eights"),
    "trainer state missing": (STATE, lambda p: p.unlink(), r"trainer_state.pt is unreadable \(No such file"),
    # fields a resume reads, edited: a traceback after the run dir was written, or a silent resume elsewhere
    "trainer state field of a wrong type": (STATE, lambda p: edit_state(p, metrics_bytes="abc"),
                                            r"trainer_state.pt: metrics_bytes='abc' is not an integer >= 0"),
    "trainer state field out of range": (STATE, lambda p: edit_state(p, micro_batch=-5),
                                         r"trainer_state.pt: micro_batch=-5 is not an integer >= 0"),
    "trainer state of another step": (STATE, lambda p: edit_state(p, step=2),
                                      r"trainer_state.pt holds step 2, not the 4 its folder is named after"),
    "trainer state without scores": (STATE, lambda p: edit_state(p, first_eval=[1]),
                                     r"trainer_state.pt: first_eval=\[1\] is not the scores of an evaluation"),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(cli, partial, reference, tmp_path, damage):
    """Says which and why, resumes from checkpoint-3, keeps checkpoint-4 aside as it was, and ends with exactly the
    adapter and metrics of the uninterrupted run."""
    name, spoil, why = DAMAGE[damage]
    out = copy_of(partial, tmp_path)
    spoil(out / "checkpoint-4" / name)
    damaged = snapshot(out / "checkpoint-4")
    result = cli.run([*ARGS, "--train.steps=6", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    lines = [line for line in error_lines(result) if "damaged" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{out}/checkpoint-4 is damaged (") and re.search(why, lines[0])
    assert lines[0].endswith("it is set aside as checkpoint-4.damaged for inspection"), lines[0]
    assert f"resumed from {out}/checkpoint-3 at step 3 (the newest usable checkpoint)" in result.stdout
    assert snapshot(out / "checkpoint-4.damaged") == damaged
    assert_same_run(out, reference)


@pytest.mark.parametrize("damage", ["adapter cut short", "adapter missing", "optimizer cut short"])
def test_fewer_steps_are_judged_by_the_checkpoint_the_restore_uses(cli, partial, tmp_path, damage):
    """Judged by the newest trainer_state.pt, --train.steps=3 was refused ("below step 4, where checkpoint-4 stands")
    of a run whose checkpoint-4 the restore passes over: it resumes from checkpoint-3 and ends there; 2 is refused
    before loading, naming checkpoint-3."""
    name, spoil, _ = DAMAGE[damage]
    out = copy_of(partial, tmp_path)
    spoil(out / "checkpoint-4" / name)
    before = snapshot(out)
    result = cli.run([*ARGS, "--train.steps=2", f"--output.dir={out}", "--resume"])
    assert result.status == 2 and "loading" not in result.stdout, result.stderr
    assert error_lines(result) == [f"error: train.steps=2 is below step 3, where {out}/checkpoint-3 stands: set "
                                   "--train.steps=3 or more to continue"]
    assert snapshot(out) == before
    result = cli.run([*ARGS, "--train.steps=3", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert f"resumed from {out}/checkpoint-3 at step 3 (the newest usable checkpoint)" in result.stdout
    assert max(line["step"] for line in metrics(out)) == 3 and (out / "checkpoint-4.damaged").is_dir()


def test_a_checkpoint_renamed_to_a_later_step_is_set_aside_not_resumed(cli, partial, reference, tmp_path):
    """checkpoint-9 holding step 4 sorted newest: it was resumed at step 4, and each checkpoint written after it pruned
    at once, as older than it."""
    out = copy_of(partial, tmp_path)
    (out / "checkpoint-4").rename(out / "checkpoint-9")
    result = cli.run([*ARGS, "--train.steps=6", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert f"{out}/checkpoint-9 is damaged (trainer_state.pt holds step 4, not the 9 its folder is named after)" in \
        result.stderr
    assert f"resumed from {out}/checkpoint-3 at step 3 (the newest usable checkpoint)" in result.stdout
    assert list_checkpoints(out)[-1] == out / "checkpoint-6"
    assert_same_run(out, reference)


def test_no_usable_checkpoint_is_refused_and_nothing_is_touched(cli, partial, tmp_path):
    out = copy_of(partial, tmp_path)
    for step in range(1, 5):
        truncate(out / f"checkpoint-{step}" / ADAPTER_WEIGHTS)
    before = snapshot(out)
    result = cli.run([*ARGS, "--train.steps=6", f"--output.dir={out}", "--resume"])
    assert result.status == 2, result.stderr
    line = error_lines(result)[-1]
    assert line.startswith(f"error: no checkpoint in {out} can be resumed from (checkpoint-4: the adapter is unusable")
    assert "checkpoint-1: " in line
    assert line.endswith("restore one, or start again with --overwrite in place of --resume")
    assert snapshot(out) == before


def test_a_run_of_16_bit_adapters_resumes_with_fp32_ones(cli, tmp_path):
    """A run on CUDA trains bf16 adapters through fp32 masters; resumed on the CPU (or with compute in fp32) its
    adapters are fp32 and its optimizer keeps no masters: the checkpoint's inner state loads, and its masters, the
    fp32 weights the bf16 adapter was rounded from, become the adapters (every checkpoint was refused as unusable).
    Step 4 runs at lr 1e-30, which moves no fp32 weight of the adapters' size: its adapters are the masters to the
    bit (taking the bf16 adapter instead survived the test: 0.4% apart)."""
    out = tmp_path / "run"
    assert cli.run([*ARGS, "--quant.compute_dtype=bf16", f"--output.dir={out}", "--train.steps=3"]).status == 0
    masters = torch.load(out / "checkpoint-3" / OPTIMIZER, weights_only=True)["masters"]
    result = cli.run([*ARGS, "--quant.compute_dtype=fp32", f"--output.dir={out}", "--train.steps=4", "--resume",
                      "--train.lr=1e-30"])
    assert result.status == 0, result.stderr
    assert "resumed from" in result.stdout and "checkpoint-3 at step 3" in result.stdout
    saved = torch.load(out / "checkpoint-4" / OPTIMIZER, weights_only=True)
    assert "masters" not in saved and saved["state"]  # the fp32 run's own optimizer, its moments carried on
    trained = adapter(out / "checkpoint-4")
    assert all(v.dtype == torch.float32 for v in trained.values()) and len(masters) == len(trained)
    assert all(any(torch.equal(v, m) for m in masters) for v in trained.values())
    rounded = adapter(out / "checkpoint-3")
    assert not any(torch.equal(trained[k], v.float()) for k, v in rounded.items() if "lora_B" in k)


def test_a_metrics_file_cut_short_since_the_checkpoint_is_refused_before_writing(cli, partial, tmp_path):
    """Resumed onto it, the first line appended joined the torn one (`...}{"step": 5, ...}`); deleted, the file
    starts afresh."""
    out = copy_of(partial, tmp_path)
    truncate(out / "metrics.jsonl")
    before = snapshot(out)
    result = cli.run([*ARGS, "--train.steps=6", f"--output.dir={out}", "--resume"])
    assert result.status == 2, result.stderr
    line = error_lines(result)[-1]
    assert line.startswith(f"error: {out}/metrics.jsonl holds ") and "restore it, or move it away" in line, line
    assert snapshot(out) == before
    (out / "metrics.jsonl").unlink()
    assert cli.run([*ARGS, "--train.steps=6", f"--output.dir={out}", "--resume"]).status == 0
    assert [r["step"] for r in metrics(out)] == [5, 6, 6]


@pytest.mark.parametrize(("edit", "pattern"), [
    (lambda c: c["train"].update(seed=7), r"run_config.json has train.seed=7, but checkpoint-4 was written with 0, "
                                          r"which the checkpoints fix: restore train.seed in run_config.json"),
    (lambda c: c["train"].pop("lr"), r"run_config.json lacks train.lr, which checkpoint-4 was written with \(0.003\): "
                                     r"the default would stand in; restore train.lr in run_config.json"),
    (lambda c: c["train"].update(lr=0.001), r"run_config.json has train.lr=0.001, but checkpoint-4 was written "
                                            r"with 0.003: restore train.lr in run_config.json \(or, if checkpoint-4 "
                                            r"came from another run, move it away\) to continue the run as it was, or "
                                            r"pass --train.lr=0.001 to resume with it$"),
    (lambda c: c["model"].update(build="tiny llama"), r"pass --model.build='tiny llama' to resume with it$"),
    (lambda c: c["quant"].update(double_quant=False) or c["train"].update(seed=7),
     r"run_config.json has quant.double_quant=False, train.seed=7, but checkpoint-4 was written with "
     r"quant.double_quant=True, train.seed=0, which the checkpoints fix: restore quant.double_quant, train.seed in "),
    (lambda c: c["lora"].pop("dropout") and c["train"].pop("lr"),
     r"run_config.json lacks lora.dropout, train.lr, which checkpoint-4 was written with \(lora.dropout=0.1, "
     r"train.lr=0.003\): the default would stand in; restore lora.dropout, train.lr in run_config.json"),
    (lambda c: c["train"].update(lr=0.001, max_grad_norm=0.5),
     r"run_config.json has train.lr=0.001, train.max_grad_norm=0.5, but checkpoint-4 was written with train.lr=0.003, "
     r"train.max_grad_norm=1.0: restore train.lr, train.max_grad_norm in run_config.json \(or, if checkpoint-4 came "
     r"from another run, move it away\) to continue the run as it was, or pass --train.lr=0.001 "
     r"--train.max_grad_norm=0.5 to resume with them$"),
], ids=["a fixed value changed", "a key removed", "a value a resume may change, changed", "one with a space",
        "two fixed values changed", "two keys removed", "two values a resume may change, changed"])
def test_a_run_config_edited_since_the_checkpoint_is_refused_before_writing(cli, partial, tmp_path, edit, pattern):
    """Each resumed without a word before: at another data order, at the default lr 2e-4 instead of the run's, or at
    the edited lr 1e-3 (a resume changes it on the command line, where it is said). The flag to pass is quoted for a
    shell where its value needs it: `--model.build=tiny llama` gave the shell two words. Several edited values are
    named together: the line named the first alone, and the resume its fix suggested was refused for the second."""
    out = copy_of(partial, tmp_path)
    raw = json.loads((out / "run_config.json").read_text())
    edit(raw)
    (out / "run_config.json").write_text(json.dumps(raw, indent=2) + "\n")
    before = snapshot(out)
    result = cli.run([*ARGS, "--train.steps=6", f"--output.dir={out}", "--resume"])
    assert result.status == 2, result.stderr
    assert len(error_lines(result)) == 1 and re.search(pattern, error_lines(result)[0]), result.stderr
    assert snapshot(out) == before



@pytest.mark.parametrize(("lr", "said"), [(0.001, ", train.lr 0.003 -> 0.001"), (0.003, "")],
                         ids=["the same command", "the checkpoint's value"])
def test_a_value_given_on_the_command_line_is_not_refused_as_edited(cli, partial, tmp_path, lr, said):
    """What a resume with --train.lr=0.001 leaves when it is killed before its first checkpoint: run_config.json says
    the new lr, the newest checkpoint the old one. The same command again resumes at the new lr; one with the
    checkpoint's lr at that. The line said the change from run_config.json's value, not the checkpoint's: nothing
    of the first (the run's lr was 0.003 to step 4), 'train.lr 0.001 -> 0.003' for the second (no change)."""
    out = copy_of(partial, tmp_path)
    raw = json.loads((out / "run_config.json").read_text())
    raw["train"]["lr"] = 0.001
    (out / "run_config.json").write_text(json.dumps(raw, indent=2) + "\n")
    result = cli.run([*ARGS, "--train.steps=6", f"--train.lr={lr}", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("resuming "))
    assert line.endswith(f"changed on the command line: train.steps 4 -> 6{said}"), line
    assert [line["lr"] for line in metrics(out) if line["step"] > 4 and "lr" in line] == [lr, lr]


def test_a_checkpoint_keeps_the_random_state_of_torch_alone(partial):
    """Nothing in a run draws from Python's `random` (measured on the tiny recipe: its state was the same before and
    after runs with dropout, packing, tiling, loss chunks, layer checkpointing, LoftQ, full fine-tuning and a plan; the
    data order and the held-out split come from seeded torch generators): its 2.5 KB state was saved for nothing."""
    state = torch.load(partial / "checkpoint-4" / STATE, weights_only=True)
    assert set(state["rng"]) == {"torch"}


def test_a_checkpoint_that_keeps_the_random_state_of_python_still_resumes(cli, partial, reference, tmp_path):
    """As checkpoints written before it was dropped do."""
    out = copy_of(partial, tmp_path)
    state = torch.load(out / "checkpoint-4" / STATE, weights_only=True)
    state["rng"]["python"] = random.Random(7).getstate()
    torch.save(state, out / "checkpoint-4" / STATE)
    result = cli.run([*ARGS, "--train.steps=6", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    assert "resumed from" in result.stdout and "checkpoint-4 at step 4" in result.stdout
    assert_same_run(out, reference)

class RunsCode:
    """Unpickled, it would create the file it names."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_an_optimizer_file_that_would_run_code_is_set_aside_in_one_line(cli, partial, reference, tmp_path):
    """A protocol-4 pickle (pickle.dumps' default) that runs code: never run, and said in the one line of a damaged
    checkpoint. torch's warning about the protocol came before it (two more lines on stderr), and the reason was
    torch's last line, which only pointed at its documentation."""
    out = copy_of(partial, tmp_path)
    (out / "checkpoint-4" / OPTIMIZER).write_bytes(pickle.dumps({"state": RunsCode(tmp_path / "ran")}))
    result = cli.run([*ARGS, "--train.steps=6", f"--output.dir={out}", "--resume"])
    assert result.status == 0, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and re.fullmatch(
        rf"{out}/checkpoint-4 is damaged \(optimizer.pt is unreadable \(torch.load\(weights_only=True\) refused it: "
        r"Unsupported operand \d+; a checkpoint holds tensors and plain data, never code\)\): it is set aside as "
        r"checkpoint-4.damaged for inspection", lines[0]), result.stderr
    assert not (tmp_path / "ran").exists()
    assert_same_run(out, reference)


def test_a_checkpoint_linked_from_another_disk_is_pruned_as_a_link(cli, partial, tmp_path):
    """Pruned, its link was renamed to .trash-checkpoint-1, which rmtree refused to delete; the next resume then failed
    on it with 'output.dir=... cannot be written (None)'. What a link points at is never deleted."""
    out, moved = copy_of(partial, tmp_path), tmp_path / "other-disk"
    moved.mkdir()
    for step in (1, 2):
        shutil.move(out / f"checkpoint-{step}", moved / f"checkpoint-{step}")
        (out / f"checkpoint-{step}").symlink_to(moved / f"checkpoint-{step}")
    (out / ".trash-checkpoint-2").symlink_to(moved / "checkpoint-2")  # as a killed run would have left it
    kept = snapshot(moved)
    for steps in (6, 7):
        result = cli.run([*ARGS, f"--train.steps={steps}", f"--output.dir={out}", "--resume"])
        assert result.status == 0, result.stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".trash-")] and snapshot(moved) == kept
    assert list_checkpoints(out) == [out / f"checkpoint-{s}" for s in range(4, 8)]
