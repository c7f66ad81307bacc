"""The commands of README.md and of the pages it links (docs/*.md, memory_reports/README.md), run as written in a
scratch clone of the checkout: each leaves `git status` clean, unless it is one of those told where to write
(`--out-dir=...`, the benchmarks); and the PEFT snippet of docs/training.md loads a run's adapter.

Three things keep it fast without changing where anything is written: the model cache ($QLORA_CACHE) of the clone
holds the tiny random Llama under SmolLM2's name too, so the demo's commands run on it; every `qlora.train` command
gets `FAST` appended (2 steps, 1 held-out batch; rows up to 512 tokens, as the tiny model's bytes are longer than
SmolLM2's tokens); and a plain `python -m qlora.<command> ...` line runs in a process forked from one that imported
qlora already (tests/forked_cli.py), as `python -m` would run it, while a line with a pipe or a variable runs in bash.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora.base.build import ensure_checkpoint
from qlora.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--train.steps=2", "--train.eval_every=0", "--train.eval_batches=1", "--data.max_seq_len=512"]
TOLD_TO_WRITE = ("--out-dir=",)  # memory reports made for memory_reports/


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_commands() -> list[str]:
    """Every line that runs `python -m qlora...` in the bash blocks of README.md and docs/*.md, and in
    memory_reports/README.md, in order, without its trailing comment, each once."""
    text = "\n".join(page.read_text() for page in DOCS)
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))
    blocks += "\n" + (ROOT / "memory_reports" / "README.md").read_text()
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in blocks.splitlines()]
    # The two commands' last steps run qlora from the venv they make (`... && .venv/bin/python -m qlora.train ...`).
    parts = [part.removeprefix(".venv/bin/") for line in lines for part in line.split(" && ")]
    # A command a page repeats from another (the README's map, then the page it points to) runs once.
    return list(dict.fromkeys(part for part in parts if re.search(r"(^|\| )python -m qlora\.", part)))


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A git repository holding this checkout's files (tracked, and untracked but not ignored), committed; and the
    environment its commands run in."""
    root = tmp_path_factory.mktemp("readme") / "qlora"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "snapshot"]):
        subprocess.run([*git, *args], cwd=root, check=True)
    tiny = ensure_checkpoint(load_recipe(ROOT / "recipes" / "tiny.py"))
    cache = root.parent / "cache"
    cache.mkdir()
    for name in ("tiny-llama-v2", "smollm2-135m-instruct"):
        (cache / name).symlink_to(tiny)
    env = {**os.environ, "QLORA_CACHE": str(cache), "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    return root, env


def test_readme_commands_leave_the_checkout_clean(cli, clone: tuple[Path, dict[str, str]]) -> None:
    root, env = clone
    commands = readme_commands()
    assert len(commands) >= 10 and any("qlora.merge" in c for c in commands), commands
    for line in commands:
        if any(flag in line for flag in TOLD_TO_WRITE):
            continue
        fast = FAST if "qlora.train" in line and "--help" not in line else []
        words = shlex.split(line)
        if words[:2] == ["python", "-m"] and not set("|$;&<>").intersection(line):
            result = cli.run([*words[3:], *fast], cwd=root, module=words[2], env={"QLORA_CACHE": env["QLORA_CACHE"]})
            status, stdout, stderr = result.status, result.stdout, result.stderr
        else:
            run = line.replace("python -m", f"{sys.executable} -m") + "".join(f" {f}" for f in fast)
            proc = subprocess.run(["bash", "-c", run], cwd=root, env=env, capture_output=True, text=True, timeout=600)
            status, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        # Refused in one line, writing nothing: the 70B without a GPU, and a GGUF export of the tiny model standing in
        # for SmolLM2 (its byte tokenizer has no merges, which llama.cpp needs).
        refused = "llama70b.py" in line and "qlora.train" in line and not torch.cuda.is_available()
        expected = 2 if refused or "qlora.export" in line else 0
        assert status == expected, (line, stdout[-1000:], stderr[-1000:])
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
        assert status == "", (line, status)
    # The commands did run: the runs and the merged checkpoint exist, in ignored places.
    for path in ("runs/tiny/adapter_model.safetensors", "runs/smollm2_135m/adapter_model.safetensors",
                 "runs/smollm2_135m-merged/model.safetensors"):
        assert (root / path).is_file(), path


def test_the_peft_snippet_loads_the_adapter_on_the_base_as_trained(clone: tuple[Path, dict[str, str]],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The snippet, as written, on a run of the clone: the logits of the model it builds are ours."""
    root, env = clone
    run_dir = root / "runs" / "snippet"
    subprocess.run([sys.executable, "-m", "qlora.train", "recipes/tiny.py", f"--output.dir={run_dir}", *FAST],
                   cwd=root, env=env, check=True, capture_output=True)
    snippet = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "training.md").read_text(), re.S).group(1)
    snippet = snippet.replace('run = "runs/smollm2_135m"', f'run = "{run_dir}"')
    assert str(run_dir) in snippet
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 (README.md's own code)
    from qlora.training.assemble import load_run

    _, ours, _, _ = load_run(run_dir, "cpu")
    model = scope["model"].eval()  # the snippet turns bitsandbytes' bf16 CPU kernel off itself, as ours does
    x = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            assert (model(x).logits - ours(x).logits).abs().max() > 1e-4  # the adapter really contributes
