"""The GGUF export (qlora/export/) on the demo model, SmolLM2-135M-Instruct: one short qlora run, exported once per
type (f16, q8_0) and read back by transformers' own GGUF loader, held to README.md's bounds; the file's chat template
and tokenizer against the run's; and what the export refuses, through the real CLI: one line, exit 2, nothing written.

Everything shares one 3-step run and the run's model as load_run rebuilds it (module fixtures): reading a GGUF back
is the slow part (transformers parses the 49,152-token vocabulary and 48,900 merges each time it opens the file).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support import finished_run

from qlora.adapters.lora import LoRALinear
from qlora.base.build import ensure_checkpoint
from qlora.config import load_recipe
from qlora.data.splits import load_splits
from qlora.errors import ConfigError, Stop
from qlora.export import __main__ as export_command
from qlora.export.check import BOUNDS, check_export, check_template, divergence, outside_bound, read_back
from qlora.export.gguf_file import export
from qlora.training import assemble
from qlora.training.assemble import load_run
from qlora.training.checkpoint import RUN_CONFIG

ROOT = Path(__file__).resolve().parent.parent
ROWS = 8  # held-out rows each check runs (the CLI's default is 32)
KINDS = ("f16", "q8_0")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-step qlora run of the demo recipe, batches of 2."""
    cfg, _ = finished_run("smollm2_135m.py", tmp_path_factory.mktemp("smollm2") / "run", steps=3, batch_size=2,
                          warmup_steps=1, eval_before=False, eval_batches=1, log_every=3)
    return Path(cfg.output.dir)


@pytest.fixture(scope="module")
def trained(run: Path) -> tuple:
    """The run as it trained (adapter on its NF4 base), on CPU in fp32: what every check compares with."""
    cfg, model, tokenizer, _ = load_run(run, "cpu", "fp32")
    return cfg, model, tokenizer


@pytest.fixture(scope="module")
def files(run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    # Beside the first file: a partial a killed export left (its pid is gone), and one of a live export (this one's).
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / f".{KINDS[0]}.gguf.partial-{dead.pid}-abcd").write_bytes(b"GGUF cut short")
    (out / f".{KINDS[0]}.gguf.partial-{os.getpid()}-efgh").write_bytes(b"GGUF being written")
    for kind in KINDS:
        export(run, out / f"{kind}.gguf", kind, "cpu")
    return {kind: out / f"{kind}.gguf" for kind in KINDS}


def test_an_export_removes_what_a_killed_one_left_and_writes_an_ordinary_file(files) -> None:
    """kill -9 skips every cleanup: the next export to the same path removes the partial whose process is gone, and
    never one of a live process. The file is as readable as any (mkstemp alone makes it 0600)."""
    out = files[KINDS[0]].parent
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f".{KINDS[0]}.gguf.partial-{os.getpid()}-efgh", *(f"{kind}.gguf" for kind in KINDS)])
    umask = os.umask(0o022)
    os.umask(umask)
    assert {path.stat().st_mode & 0o777 for path in files.values()} == {0o666 & ~umask}


def test_the_file_takes_its_name_only_once_checked(run: Path, tmp_path: Path) -> None:
    """The check reads the file under its hidden name: stopped there (a kill, Ctrl-C), no unchecked file lies where
    llama.cpp would load it; found too far, it takes its name all the same, for inspection, as the error says."""
    out, seen = tmp_path / "x.gguf", []

    def interrupted(path: Path) -> None:
        seen.append((path.name, path.parent, out.exists(), path.stat().st_size))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export(run, out, "f16", "cpu", interrupted)
    [(name, folder, existed, size)] = seen
    assert name.startswith(".x.gguf.partial-") and name.endswith(".gguf") and not existed and size > 0
    assert folder == tmp_path  # beside it: one rename on one file system, and found there if a kill left it
    assert list(tmp_path.iterdir()) == []

    def too_far(path: Path) -> None:
        raise Stop(1, f"{out} is further from the trained model than docs/after-training.md bounds")

    with pytest.raises(Stop):
        export(run, out, "f16", "cpu", too_far)
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]


def test_a_file_that_takes_the_name_meanwhile_is_not_overwritten(run: Path, tmp_path: Path) -> None:
    """--gguf is checked free as the command starts, minutes before the rename: another export to the same path that
    finished meanwhile had its file replaced by this one's."""
    out = tmp_path / "x.gguf"

    def another_export(path: Path) -> None:
        out.write_text("the other export's\n")

    with pytest.raises(ConfigError, match=r"--gguf=.*x.gguf appeared while this command wrote it"):
        export(run, out, "f16", "cpu", another_export)
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"] and out.read_text() == "the other export's\n"


def test_the_command_reads_the_run_config_once(run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """It read the run's run_config.json, and its newest checkpoint's record of it, three times (as it started, for
    what it folds, for the check's reference): what was checked and what was exported could be two files, a run
    extended in between."""
    reads = []
    read = assemble.read_config_json
    monkeypatch.setattr(assemble, "read_config_json", lambda path: reads.append(path) or read(path))
    assert export_command.main([str(run), f"--gguf={tmp_path / 'm.gguf'}", "--type=q8_0", "--rows=1"]) == 0
    assert reads == [run / RUN_CONFIG]
    # and the check ran, held to the type asked for: without --skip-check, a command that never checked passed this
    assert re.search(r"mean KL .* top-1 agreement .*: within the q8_0 bound", capsys.readouterr().out)


@pytest.fixture(scope="module")
def read(files: dict[str, Path]) -> dict[str, tuple]:
    """Each file's tokenizer and model as transformers' GGUF loader reads them, once."""
    return {kind: read_back(path) for kind, path in files.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_the_file_read_back_is_the_trained_model_within_its_bound(run, trained, files, read, kind, capsys) -> None:
    result = check_export(run, files[kind], kind, ROWS, trained, read[kind])
    bound = BOUNDS[kind]
    assert result["kl_mean"] <= bound.kl and result["top1"] >= bound.top1, result
    assert result["positions"] > 200 and result["rows"] == ROWS
    out = capsys.readouterr().out
    assert re.search(r"chat template and tokenizer: \d+ held-out conversation\(s\) render identically", out), out
    assert re.search(rf"mean KL .* top-1 agreement .*: within the {kind} bound", out), out


def test_a_q8_0_file_is_about_half_an_f16_one(files) -> None:
    """8.5 bits a weight (a 16-bit scale per 32) against 16; the norms stay f32 in both."""
    assert files["q8_0"].stat().st_size / files["f16"].stat().st_size == pytest.approx(8.5 / 16, abs=0.02)


def test_the_bound_notices_a_file_without_the_adapter(trained, read) -> None:
    """The bounds are tight enough to matter: the base the run started from (its adapters scaled to zero) is
    outside the q8_0 bound against the exported file, which holds the adapter."""
    cfg, model, tokenizer = trained
    examples = load_splits(cfg.data, tokenizer, cfg.train.seed)[1][:ROWS]
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    scalings = [m.scaling for m in adapters]
    try:
        for m in adapters:
            m.scaling = 0.0
        bare = divergence(model, read["f16"][1], examples, tokenizer.pad_token_id)
    finally:
        for m, s in zip(adapters, scalings, strict=True):
            m.scaling = s
    assert bare["kl_mean"] > BOUNDS["q8_0"].kl, bare


def test_the_template_check_refuses_a_template_that_renders_otherwise(trained, files, read) -> None:
    """The file's template as transformers reads it renders held-out conversations as trained; one changed
    character in it is refused, naming where."""
    _, _, tokenizer = trained
    exported = read["q8_0"][0]
    assert exported.chat_template == tokenizer.chat_template
    conversations = [json.loads(line)["messages"] for line in
                     (ROOT / "recipes/data/destination/heldout.jsonl").read_text().splitlines()[:2]]
    assert "render identically" in check_template(tokenizer, exported, conversations, files["q8_0"])
    original = exported.chat_template
    try:
        exported.chat_template = original.replace("<|im_start|>", "<|im_start|> ", 1)
        with pytest.raises(Stop, match=r"renders held-out conversation 1 otherwise than the trained tokenizer: "
                                       r"' system\\nYou are.*' where it had 'system\\nYou are.*' \(character 12\): "
                                       r"do not use the file"):
            check_template(tokenizer, exported, conversations, files["q8_0"])
    finally:
        exported.chat_template = original


def run_with_base(run: Path, tmp: Path, change: Callable[[Path], None]) -> Path:
    """A copy of `run` whose run_config.json points at a copy of its base that `change(base_dir)` altered."""
    base = Path(ensure_checkpoint(load_recipe(ROOT / "recipes" / "smollm2_135m.py")))
    copy = tmp / "base"
    copy.mkdir()
    for item in base.iterdir():
        (copy / item.name).symlink_to(item)
    change(copy)
    runs = tmp / "run"
    shutil.copytree(run, runs, ignore=shutil.ignore_patterns("checkpoint-*"))
    raw = json.loads((runs / RUN_CONFIG).read_text())
    raw["model"]["path"], raw["model"]["build"] = str(copy), None
    (runs / RUN_CONFIG).write_text(json.dumps(raw))
    return runs


def rewrite(name: str, edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def change(base: Path) -> None:
        text = (base / name).read_bytes()
        (base / name).unlink()  # a symlink to the cache: replaced, not written through
        (base / name).write_bytes(edit(text))
    return change


def json_edit(**changes: object) -> Callable[[bytes], bytes]:
    return lambda text: json.dumps({**json.loads(text), **changes}).encode()


def no_merges(text: bytes) -> bytes:
    spec = json.loads(text)
    spec["model"]["merges"] = []
    return json.dumps(spec).encode()


@pytest.mark.parametrize(("change", "args", "pattern"), [
    (rewrite("config.json", json_edit(architectures=["GemmaForCausalLM"], model_type="gemma", head_dim=64)), [],
     r"is a GemmaForCausalLM: the GGUF export writes LlamaForCausalLM \(Llama 1-3, SmolLM\), MistralForCausalLM "
     r"\(Mistral without a sliding window\), Qwen2ForCausalLM \(Qwen2, Qwen2.5\) models only"),
    (rewrite("config.json", json_edit(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16)),
     [], r"attends within a sliding window of 16 tokens \(sliding_window, in a context of 8192\), which llama.cpp's "
         r"llama architecture does not store"),
    (rewrite("model.safetensors", lambda text: text[:5000]), [], r"a safetensors file is damaged \(model.safetensors"),
    (rewrite("config.json", json_edit(num_key_value_heads=2)), [],
     r"config.json has num_attention_heads=9, not a multiple of num_key_value_heads=2"),
    (rewrite("tokenizer.json", no_merges), [], r"is byte-level BPE without merges .*llama.cpp cannot load"),
    (None, ["--gguf={tmp}/model.bin"], r"--gguf=.*model.bin does not end in .gguf.* use model.gguf"),
    (None, ["--gguf={tmp}"], r"--gguf=.* is a directory: give the path of a file"),
    (None, ["--gguf={tmp}/notes.txt/m.gguf"], r"cannot be created: .*notes.txt is a file"),
    (None, ["--gguf={tmp}/notes.gguf"], r"--gguf=.*notes.gguf exists: choose another path or delete it"),
    (None, ["--type=q4_k"], r"argument --type: invalid choice: 'q4_k'"),
    (None, ["--rows=0"], r"--rows=0: the check needs at least one held-out row"),
], ids=["other architecture", "a sliding window", "damaged weights", "impossible config", "tokenizer without merges",
        "not .gguf", "a directory", "under a file", "exists", "unknown type", "no rows"])
def test_an_export_that_cannot_be_made_is_refused_in_one_line(cli, run, tmp_path, change, args, pattern) -> None:
    runs = run_with_base(run, tmp_path, change) if change else run
    (tmp_path / "notes.txt").write_text("the user's own file\n")
    (tmp_path / "notes.gguf").write_text("the user's own file\n")
    argv = [str(runs), *[a.replace("{tmp}", str(tmp_path)) for a in args]]
    if not any(a.startswith("--gguf") for a in argv):
        argv.append(f"--gguf={tmp_path}/out.gguf")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    result = cli.run(argv, module="qlora.export")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.status == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written, nothing removed


def test_a_file_outside_its_bound_is_named_with_the_page_that_states_it_and_what_to_do() -> None:
    """The line named README.md, which gives only two of the four bounds, and no way forward."""
    line = outside_bound(Path("runs/x-q4_0.gguf"), "q4_0", {"kl_mean": 2.41, "top1": 0.3807})
    assert line == ("runs/x-q4_0.gguf is further from the trained model than docs/after-training.md bounds q4_0 "
                    "(mean KL 2.41e+00 nats/token against at most 0.15, top-1 agreement 38.07% against at least 85%): "
                    "the file is kept for inspection, but do not use it; export with --type f16, bf16 or q8_0 "
                    "instead")
    assert "--type f16 instead" in outside_bound(Path("x.gguf"), "bf16", {"kl_mean": 0.01, "top1": 0.9})


def test_the_bounds_are_those_docs_after_training_states() -> None:
    """The check holds each type to the bound the page gives a user: a bound widened in the code alone (f16's KL
    tenfold, to where a file off by more than its rounding passes) kept every other test green."""
    rows = re.findall(r"^\| `(\w+)` \| ([\d.]+) \| (\d+)% \|", (ROOT / "docs/after-training.md").read_text(), re.M)
    assert {kind: (float(kl), int(top1) / 100) for kind, kl, top1 in rows} == {k: tuple(b) for k, b in BOUNDS.items()}


def test_a_file_outside_on_top_1_alone_says_its_changes_were_near_ties() -> None:
    """A tiny untied Qwen2 run's q4_0 file (KL 1.05e-2, within; top-1 69%) failed its check with the line of a file
    far from its model, though each top token it changed was a near tie of a flat distribution (0.36 logits at
    most). The line says so where they were; a wider change, or a KL outside, is said as before."""
    scores = {"kl_mean": 1.05e-2, "top1": 0.6944, "flip_margin": 0.36}
    line = outside_bound(Path("x.gguf"), "q4_0", scores)
    assert ("85%); top-1 agreement alone is outside, the mean KL within: each top token that changed was a near tie, "
            "the trained model's two best within 0.36 logits, as on a tiny or barely trained model's flat "
            "distributions, which any rounding flips: the file is kept") in line
    assert "near tie" not in outside_bound(Path("x.gguf"), "q4_0", {**scores, "flip_margin": 2.0})
    assert "near tie" not in outside_bound(Path("x.gguf"), "q4_0", {**scores, "kl_mean": 0.2})


def test_the_divergence_measures_the_margin_of_each_changed_top_token() -> None:
    """flip_margin: the widest gap between the trained model's two best logits where the file's top token differs."""
    class Fixed(torch.nn.Module):
        def __init__(self, logits: list[list[float]]) -> None:
            super().__init__()
            self.logits = torch.tensor([logits])

        def forward(self, **kwargs: object) -> object:
            return type("Out", (), {"logits": self.logits})

    trained = Fixed([[2.0, 1.7, 0.0], [3.0, 0.0, 0.0], [1.0, 0.9, 0.0]])
    exported = Fixed([[1.7, 2.0, 0.0], [3.0, 0.0, 0.0], [0.9, 1.0, 0.0]])
    scores = divergence(trained, exported, [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}], pad_id=0)
    assert scores["top1"] == pytest.approx(1 / 3) and scores["flip_margin"] == pytest.approx(0.3)
    assert divergence(trained, trained, [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}], pad_id=0)["flip_margin"] == 0


def test_the_divergence_is_the_file_measured_from_the_trained_model() -> None:
    """KL(trained || exported), the direction BOUNDS were measured in: from a peaked trained distribution to a flat
    file 0.92 nats, the other way 1.60. Reversed, every swap test above (symmetric) still passed."""
    class Fixed(torch.nn.Module):
        def __init__(self, logits: list[float]) -> None:
            super().__init__()
            self.logits = torch.tensor([[logits]])

        def forward(self, **kwargs: object) -> object:
            return type("Out", (), {"logits": self.logits})

    peaked, flat = torch.tensor([4.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.0])
    expected = torch.nn.functional.kl_div(flat.log_softmax(-1), peaked.log_softmax(-1), log_target=True,
                                          reduction="sum")
    reverse = torch.nn.functional.kl_div(peaked.log_softmax(-1), flat.log_softmax(-1), log_target=True,
                                         reduction="sum")
    assert float(reverse) > float(expected) + 0.1
    scores = divergence(Fixed(peaked.tolist()), Fixed(flat.tolist()), [{"input_ids": [5], "labels": [5]}], pad_id=0)
    assert scores["kl_mean"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(("kl", "top1", "within"), [(0.03, 0.90, True), (0.0, 0.8999, False), (0.0301, 1.0, False),
                                                    (0.0301, 0.8999, False)])
def test_a_file_is_accepted_on_its_bound_and_refused_a_hair_past_either(monkeypatch, tmp_path, kl, top1,
                                                                         within) -> None:
    """q8_0's bound (mean KL <= 0.03, top-1 >= 90%), each side held to: a file exactly on it is within, and one past
    it on the KL or the agreement alone is refused, exit 1; the largest KL of a token (far past it here) is not
    held to it. Every file the checks above read lay far inside its
    bound, so taking either side alone (or for and) or the bound itself as outside passed them."""
    from transformers import AutoTokenizer

    from qlora.export import check

    cfg = load_recipe(ROOT / "recipes" / "tiny.py")
    cfg.data.train, cfg.data.eval = str(ROOT / cfg.data.train), str(ROOT / cfg.data.eval)
    tokenizer = AutoTokenizer.from_pretrained(ensure_checkpoint(cfg))
    scores = {"kl_mean": kl, "kl_max": 10 * kl + 1, "top1": top1, "positions": 10, "flip_margin": 0.0}
    monkeypatch.setattr(check, "divergence", lambda *args, **kwargs: scores)
    args = (tmp_path, tmp_path / "x.gguf", "q8_0", 2, (cfg, None, tokenizer), (tokenizer, None))
    if within:
        assert check_export(*args)["within"] is True
        return
    with pytest.raises(Stop) as stop:
        check_export(*args)
    assert stop.value.code == 1 and "further from the trained model than docs/after-training.md bounds q8_0" in \
        str(stop.value)
    assert check_export(*args, refuse=False)["within"] is False
