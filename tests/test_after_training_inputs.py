"""What merge, export and eval do with an odd run folder or output path: an adapter_config.json edited by hand, an
adapter file without layers, `--out .` and a linked --out, a full disk under a merge, data the check reads that is
gone. Each ends in one line and its exit status, before the work where it can be found first, and leaves no partial.

One short qlora run of the tiny recipe is trained once for the module; each test copies what it changes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from support import finished_run

from qlora import eval as run_eval
from qlora.export import __main__ as export_command
from qlora.export.gguf_file import write_tensor
from qlora.merge import __main__ as merge_command
from qlora.merge import checkpoint
from qlora.training.checkpoint import OPTIMIZER, RUN_CONFIG, STATE


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg, _ = finished_run("tiny.py", tmp_path_factory.mktemp("qlora") / "run", steps=4, eval_every=0, log_every=4,
                          eval_before=False)
    return Path(cfg.output.dir)


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoint-*", ".qlora.lock"))
    return out


def one_error(capsys: pytest.CaptureFixture) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_merge_refuses_an_adapter_config_edited_away_from_the_run_even_with_skip_check(run, tmp_path, capsys) -> None:
    """lora_alpha 32 -> 64 in adapter_config.json: a merge would fold the update in at twice the scale it trained at."""
    edited = copy_run(run, tmp_path)
    spec = json.loads((edited / "adapter_config.json").read_text())
    spec["lora_alpha"] *= 2
    (edited / "adapter_config.json").write_text(json.dumps(spec))
    assert merge_command.main([str(edited), "--out", str(tmp_path / "merged"), "--skip-check"]) == 2
    assert "adapter_config.json says r=32, lora_alpha=64 but run_config.json lora.r=32, lora.alpha=32" in \
        one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_merge_refuses_an_adapter_file_without_layers(run, tmp_path, capsys) -> None:
    emptied = copy_run(run, tmp_path)
    save_file({}, str(emptied / "adapter_model.safetensors"))
    assert merge_command.main([str(emptied), "--out", str(tmp_path / "merged"), "--skip-check"]) == 2
    assert "adapter_model.safetensors holds no adapter layers" in one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("drop", ["lora_A", "lora_B", "pair"])
def test_merge_refuses_an_adapter_file_that_lost_a_layer(run, tmp_path, capsys, drop) -> None:
    """One layer's lora_A, or its pair, gone from the file: the merge folded that layer as the base alone, exit 0. Its
    lora_B alone gone: the file was called unreadable."""
    lost = copy_run(run, tmp_path)
    tensors = load_file(str(lost / "adapter_model.safetensors"))
    layer = "base_model.model.model.layers.1.self_attn.v_proj"
    kept = {k: v for k, v in tensors.items() if not k.startswith(f"{layer}.{'' if drop == 'pair' else drop}")}
    save_file(kept, str(lost / "adapter_model.safetensors"))
    assert merge_command.main([str(lost), "--out", str(tmp_path / "merged"), "--skip-check"]) == 2
    assert "adapter_model.safetensors lacks the adapter pair (lora_A and lora_B) of model.layers.1.self_attn.v_proj " \
        "(1 layer(s) in all) that the run trained" in one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]



@pytest.mark.parametrize("side", ["rank", "in_features"])
def test_merge_refuses_a_lora_a_that_does_not_fit_its_b_or_base(run, tmp_path, capsys, side) -> None:
    """One layer's lora_A a row (rank) or a column (in_features) short, its B as trained: without the check the
    fold's B A ends in a traceback ('mat1 and mat2 shapes cannot be multiplied')."""
    cut = copy_run(run, tmp_path)
    tensors = load_file(str(cut / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    tensors[key] = (tensors[key][1:] if side == "rank" else tensors[key][:, 1:]).contiguous()
    save_file(tensors, str(cut / "adapter_model.safetensors"))
    assert merge_command.main([str(cut), "--out", str(tmp_path / "merged"), "--skip-check"]) == 2
    assert "the adapter of model.layers.1.self_attn.v_proj (B (" in one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

def test_merge_into_the_current_directory_is_refused_before_merging(run, tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert merge_command.main([str(run), "--out", ".", "--skip-check"]) == 2
    assert "--out . is the current directory" in one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"] and not any((tmp_path / "here").iterdir())


def test_merge_into_a_link_to_an_empty_directory_fills_that_directory(run, tmp_path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert merge_command.main([str(run), "--out", str(tmp_path / "link"), "--skip-check"]) == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "model.safetensors").is_file()


def test_a_full_disk_under_a_merge_is_exit_5_naming_out(run, tmp_path, capsys, monkeypatch) -> None:
    def full(*args: object, **kwargs: object) -> None:  # what safetensors raises on ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    assert merge_command.main([str(run), "--out", str(tmp_path / "new" / "merged"), "--skip-check"]) == 5
    assert one_error(capsys) == (f"error: could not write {tmp_path / 'new' / 'merged'} (No space left on device); "
                                 "free some space, then run the command again")
    assert list(tmp_path.iterdir()) == []  # the partial is gone, and the folder the merge created for it


def test_a_directory_that_appears_at_out_while_merging_is_left_as_it_is(run, tmp_path, capsys, monkeypatch) -> None:
    """Another merge fills --out while this one works (it was free as this one started): the rename ended in a
    traceback (OSError: Directory not empty). Refused in one line; the other merge's files stay (the export's
    file: tests/test_export.py)."""
    merged = tmp_path / "merged"

    def other_merge(run_dir: Path, tmp: Path, cfg: object) -> dict:
        merged.mkdir()
        (merged / "model.safetensors").write_text("the other merge's\n")
        return {}

    monkeypatch.setattr(checkpoint, "merge_error", other_merge)
    assert merge_command.main([str(run), "--out", str(merged)]) == 2
    assert one_error(capsys) == (f"error: --out={merged} appeared while this command wrote it (another command "
                                 "writing the same path?): it is left as it is; choose another path, or delete it and "
                                 "run again")
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no partial left
    assert (merged / "model.safetensors").read_text() == "the other merge's\n"


def test_an_output_path_through_a_link_loop_is_refused_in_one_line(run, tmp_path, capsys) -> None:
    """A link loop at (or above) --out, --gguf or --json, or given as the export's RUN_DIR, ended in a traceback:
    RuntimeError: Symlink loop, from Path.resolve where the path is checked against the run's own names."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    loop = tmp_path / "loop"
    assert merge_command.main([str(run), "--out", str(loop / "merged"), "--skip-check"]) == 2
    assert one_error(capsys) == (f"error: --out={loop / 'merged'} cannot be created: {loop} is a link that leads "
                                 "nowhere (a loop, or a missing target): remove the link, or choose another path")
    assert export_command.main([str(run), "--gguf", str(loop / "m.gguf")]) == 2
    assert f"error: --gguf={loop / 'm.gguf'} cannot be created: {loop} is a link" in one_error(capsys)
    assert run_eval.main([str(run), "--json", str(loop)]) == 2
    assert f"error: --json={loop} is a link that leads nowhere" in one_error(capsys)
    assert export_command.main([str(loop), "--gguf", str(tmp_path / "m.gguf")]) == 2  # the run itself
    assert f"error: {loop / RUN_CONFIG} not found: RUN_DIR must be" in one_error(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["loop"]


def gone_heldout(run: Path, tmp_path: Path) -> Path:
    moved = copy_run(run, tmp_path)
    raw = json.loads((moved / RUN_CONFIG).read_text())
    raw["data"]["eval"] = str(tmp_path / "moved.jsonl")
    (moved / RUN_CONFIG).write_text(json.dumps(raw))
    return moved


def test_eval_names_a_missing_heldout_file_before_loading_the_model(run, tmp_path, capsys, monkeypatch) -> None:
    moved = gone_heldout(run, tmp_path)
    monkeypatch.setattr(run_eval, "load_run", lambda *a, **k: pytest.fail("loaded the model first"))
    assert run_eval.main([str(moved)]) == 2
    assert f"data file {tmp_path / 'moved.jsonl'} not found: check data.eval in {moved / RUN_CONFIG}, or give --data " \
           "FILE" in one_error(capsys)


def test_export_names_a_missing_heldout_file_before_exporting(run, tmp_path, capsys, monkeypatch) -> None:
    """The check reads the held-out rows after the whole file is written: a file gone is found first, not then."""
    moved = gone_heldout(run, tmp_path)
    monkeypatch.setattr(export_command, "export", lambda *a, **k: pytest.fail("exported first"))
    assert export_command.main([str(moved), "--gguf", str(tmp_path / "out.gguf")]) == 2
    assert f"data file {tmp_path / 'moved.jsonl'} not found: check data.eval in {moved / RUN_CONFIG}, or export with " \
           "--skip-check" in one_error(capsys)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".out.gguf*"))


def test_a_damaged_loftq_shifts_file_is_one_line(run, tmp_path, capsys) -> None:
    """A run with lora.loftq_iters > 1 rebuilds its base from loftq_shifts.safetensors: cut short, it is named."""
    damaged = copy_run(run, tmp_path)
    raw = json.loads((damaged / RUN_CONFIG).read_text())
    raw["lora"].update(init="loftq", loftq_iters=2)
    (damaged / RUN_CONFIG).write_text(json.dumps(raw))
    (damaged / "loftq_shifts.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    assert run_eval.main([str(damaged)]) == 2
    assert "loftq_shifts.safetensors is unreadable (Error while deserializing header" in one_error(capsys)


def test_eval_refuses_a_heldout_split_of_a_train_file_that_changed(tmp_path, capsys) -> None:
    """Without data.eval the held-out rows are a seeded split of data.train's rows: two rows swapped (as many rows,
    which the counts took) hold out other rows, most of them trained on. The checkpoint's rows_sha256 names it, as
    --resume does; a checkpoint written before it is checked by its row counts, and says so."""
    import torch

    from qlora.config import load_recipe
    from qlora.train import train

    data = tmp_path / "train.jsonl"
    shutil.copy(Path(__file__).resolve().parent.parent / "recipes/data/tiny/train.jsonl", data)
    cfg = load_recipe(Path(__file__).resolve().parent.parent / "recipes/tiny.py")
    cfg.data.train, cfg.data.eval, cfg.output.dir = str(data), None, str(tmp_path / "run")
    cfg.train.steps, cfg.train.eval_every, cfg.train.eval_before, cfg.train.log_every = 2, 0, False, 2
    train(cfg)
    assert run_eval.main([str(tmp_path / "run")]) == 0  # the file as trained: its own held-out split
    capsys.readouterr()
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join([lines[1], lines[0], *lines[2:]]))
    assert run_eval.main([str(tmp_path / "run")]) == 2
    assert one_error(capsys) == (f"error: data.train={data} holds other rows than the run's (their sha256 differs), "
                                 "so the split carved from them by seed would hold out rows the run trained on: "
                                 "restore it, or pass --data FILE to score a file as it is")
    state = tmp_path / "run" / "checkpoint-2" / STATE  # as written before rows_sha256: the counts decide
    torch.save({k: v for k, v in torch.load(state, weights_only=True).items() if k != "rows_sha256"}, state)
    assert run_eval.main([str(tmp_path / "run")]) == 0
    assert ("checkpoint-2 holds no fingerprint of the run's rows (written before they were recorded): "
            f"{data} is taken for the run's by its row counts alone") in capsys.readouterr().out
    with data.open("a") as f:
        f.write(lines[0])
    assert run_eval.main([str(tmp_path / "run")]) == 2
    assert "now gives 571 training and 30 held-out rows, the run had 570 and 30: the file changed" in one_error(capsys)
    assert run_eval.main([str(tmp_path / "run"), "--data", str(cfg.data.train)]) == 0  # another file: as asked


def test_eval_refuses_a_heldout_file_edited_or_moved_to_other_rows(run, tmp_path, capsys, monkeypatch) -> None:
    """data.eval pointed at a copy of the held-out file with two rows swapped, or one row fewer: not the rows the run
    was evaluated on, named before the model loads; the copy as it was is the run's, wherever it lies."""
    moved = tmp_path / "run"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns(".qlora.lock"))  # its checkpoint records the rows
    raw = json.loads((moved / RUN_CONFIG).read_text())
    held = Path(raw["data"]["eval"]).read_text().splitlines(keepends=True)
    raw["data"]["eval"] = str(tmp_path / "moved.jsonl")
    (moved / RUN_CONFIG).write_text(json.dumps(raw))
    monkeypatch.setattr(run_eval, "load_run", lambda *a, **k: pytest.fail("loaded the model first"))
    for edited in ([held[1], held[0], *held[2:]], held[1:]):
        (tmp_path / "moved.jsonl").write_text("".join(edited))
        assert run_eval.main([str(moved)]) == 2
        assert one_error(capsys) == (f"error: data.eval={tmp_path / 'moved.jsonl'} holds other rows than the run's "
                                     "(their sha256 differs), so they are not the rows the run was evaluated on: "
                                     "restore it, or pass --data FILE to score a file as it is")
    (tmp_path / "moved.jsonl").write_text("")  # no rows at all: said as read_rows says it of any file
    assert run_eval.main([str(moved)]) == 2
    assert one_error(capsys) == (f"error: {tmp_path / 'moved.jsonl'} holds no rows: add data, or check data.eval in "
                                 f"{moved / RUN_CONFIG}, or give --data FILE")
    monkeypatch.undo()
    (tmp_path / "moved.jsonl").write_text("".join(held))
    assert run_eval.main([str(moved)]) == 0


def test_a_full_disk_under_an_export_is_exit_5_naming_the_file(tmp_path) -> None:
    """numpy's tofile, which gguf's writer appends each tensor with, checks the free space itself and says so in an
    OSError without an errno: it ends as a full disk does (exit 5, one line naming --gguf), not in a traceback."""
    import errno

    import numpy as np

    from qlora.errors import exit_status

    class FullDisk:
        def write_tensor_data(self, data: np.ndarray) -> None:
            raise OSError("Not enough free space to write 56623104 bytes after offset 1785376")

    out = tmp_path / "model.gguf"
    with pytest.raises(OSError) as caught:
        write_tensor(FullDisk(), np.zeros(4, np.float32), out)
    assert caught.value.errno == errno.ENOSPC
    assert exit_status(caught.value) == (5, f"error: could not write {out} (No space left on device); free some "
                                            "space, then run the command again")


def test_a_blank_jsonl_prompt_is_empty_as_a_blank_prompt_flag_is() -> None:
    from qlora import generate as gen
    from qlora.errors import ConfigError

    with pytest.raises(ConfigError, match="stdin:3: the prompt is empty"):
        gen.read_prompt(json.dumps({"prompt": " \n\t"}), jsonl=True, number=3)


def test_a_run_config_edited_since_its_checkpoints_is_refused_before_loading(run, tmp_path, capsys,
                                                                           monkeypatch) -> None:
    """quant.double_quant edited to false: qlora.eval scored the adapter on another base (4.0106 for 4.0087), and
    merge folded it into one, without a word; a key removed would have had its default stand in."""
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".qlora.lock"))
    raw = json.loads((out / RUN_CONFIG).read_text())
    raw["quant"]["double_quant"] = False
    (out / RUN_CONFIG).write_text(json.dumps(raw))
    monkeypatch.setattr(run_eval, "load_run", lambda *a, **k: pytest.fail("loaded the model first"))
    assert run_eval.main([str(out)]) == 2
    assert one_error(capsys).endswith(f"{out / RUN_CONFIG} has quant.double_quant=False, but checkpoint-4 was written "
                                      "with True, which the checkpoints fix: restore quant.double_quant in "
                                      "run_config.json (or, if checkpoint-4 came from another run, move it away) to "
                                      "use the run, or start a new run with --overwrite")
    del raw["quant"]["double_quant"]
    (out / RUN_CONFIG).write_text(json.dumps(raw))
    assert merge_command.main([str(out), "--out", str(tmp_path / "merged")]) == 2
    assert f"{out / RUN_CONFIG} lacks quant.double_quant, which checkpoint-4 was written with (True)" in \
        one_error(capsys)
    assert not (tmp_path / "merged").exists()


def test_a_run_config_edited_since_a_checkpoint_that_lost_its_optimizer_state_is_refused(run, tmp_path,
                                                                                           capsys) -> None:
    """The settings run_config.json is compared with were read from complete checkpoints only: the newest one without
    its optimizer.pt (deleted to save room: eval, generate, export and merge never read it) was passed over for an
    older one, or, the only one, left run_config.json unchecked without a word, and qlora.eval scored the adapter
    on the base quant.double_quant=false (edited) draws. The record lies in trainer_state.pt, and is read there."""
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".qlora.lock"))
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]
    (out / "checkpoint-4" / OPTIMIZER).unlink()
    raw = json.loads((out / RUN_CONFIG).read_text())
    raw["quant"]["double_quant"] = False
    (out / RUN_CONFIG).write_text(json.dumps(raw))
    assert run_eval.main([str(out)]) == 2
    assert one_error(capsys).endswith(f"{out / RUN_CONFIG} has quant.double_quant=False, but checkpoint-4 was written "
                                      "with True, which the checkpoints fix: restore quant.double_quant in "
                                      "run_config.json (or, if checkpoint-4 came from another run, move it away) to "
                                      "use the run, or start a new run with --overwrite")


def test_a_run_or_checkpoint_without_its_adapter_names_the_newest_checkpoint_that_holds_one(run, tmp_path) -> None:
    """require_weights, which eval, generate, export and merge share, offers the newest checkpoint-N that still holds
    the adapter, for the run and for a checkpoint-N beside it; the command table tries each path with one checkpoint
    only, where a mutant that offered the oldest (kept[0]), or looked for them inside the checkpoint given, survived,
    as did one that called a checkpoint-N's directory at the adapter's name "not found"."""
    from qlora.errors import ConfigError
    from qlora.training.checkpoint import OPTIMIZER
    from qlora.training.restore import require_weights

    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".qlora.lock"))
    weights = "adapter_model.safetensors"
    first, last = (out / "checkpoint-2", out / "checkpoint-4")
    shutil.copytree(last, first)  # as train.checkpoint_every=2 leaves it (train.keep_checkpoints=2): an older one

    def said(path: Path) -> str:
        with pytest.raises(ConfigError) as caught:
            require_weights(path, weights)
        return str(caught.value)

    (out / weights).unlink()
    assert said(out) == f"{out / weights} not found: the run has not finished; pass {last} instead"
    (last / weights).unlink()
    assert said(last) == f"{last / weights} not found: the checkpoint lost it since it was written; pass {first} " \
                         "instead"
    (last / weights).mkdir()
    assert said(last) == f"{last / weights} is not a file; pass {first} instead"
    (last / weights).rmdir()
    os.mkfifo(last / weights)  # neither file nor directory: is_dir() in place of exists() called it "not found"
    assert said(last) == f"{last / weights} is not a file; pass {first} instead"
    # eval, generate and merge read a checkpoint-N's adapter and adapter_config.json, not its optimizer.pt or
    # trainer_state.pt: one that lost either loads as a whole one does, so it is offered (the newest of those); one
    # without its adapter_config.json is refused as it loads, so it is not.
    (last / weights).unlink()
    shutil.copy(first / weights, last / weights)
    for lost in (OPTIMIZER, STATE):
        (last / lost).unlink()
        assert said(out) == f"{out / weights} not found: the run has not finished; pass {last} instead"
    (last / "adapter_config.json").rename(tmp_path / "adapter_config.json")
    assert said(out) == f"{out / weights} not found: the run has not finished; pass {first} instead"
    (tmp_path / "adapter_config.json").rename(last / "adapter_config.json")
    for ckpt in (first, last):
        (ckpt / weights).unlink()
    for ckpt in (first, last):  # damaged: no complete checkpoint, yet the run wrote some: restore, not "stopped before"
        (ckpt / OPTIMIZER).unlink(missing_ok=True)
    assert said(out) == f"{out / weights} not found: the run has not finished; no checkpoint of the run holds one: " \
                        "restore it, or train the run again"


def test_a_run_whose_only_checkpoint_state_is_damaged_says_which_checks_it_could_not_make(run, tmp_path,
                                                                                          capsys) -> None:
    """The held-out rows' sha256 and the settings run_config.json is compared with are read from the checkpoint's
    trainer_state.pt: cut short (or gone), eval and merge skipped both in silence, so run_config.json edited besides
    went unnoticed. Each check skipped is said in one line naming the file, and the command goes on."""
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".qlora.lock"))
    state = out / "checkpoint-4" / STATE
    state.write_bytes(state.read_bytes()[:100])
    held = json.loads((out / RUN_CONFIG).read_text())["data"]["eval"]
    said = [f"{out / RUN_CONFIG} is not checked against the settings the run's checkpoint records: ",
            f"{held} is not checked against the run's held-out rows (their sha256, which its checkpoint records): "]
    assert run_eval.main([str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "is not checked" in line]
    assert [line.split(str(state))[0] for line in lines] == said
    assert all(line.split(str(state))[1].startswith(" is unreadable (PytorchStreamReader") for line in lines)
    state.unlink()  # gone, and the checkpoint-N given itself: said as well
    assert merge_command.main([str(out / "checkpoint-4"), "--out", str(tmp_path / "merged")]) == 0
    assert f"{said[0]}{state} is unreadable (No such file or directory)" in capsys.readouterr().out.splitlines()
