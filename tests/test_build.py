"""The tiny checkpoints built into the cache (qlora/base/build.py): the same base from every build, in fp32, of the
config asked; a folder without config.json never taken for a built one, and one another process built kept."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.base import build
from qlora.config import Config
from qlora.errors import ConfigError, Stop


def header(path: Path) -> dict:
    """The safetensors file's JSON header as stored: 8 bytes of its length, then the JSON."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-tied"])
def test_every_build_of_a_tiny_base_is_the_same_fp32_checkpoint_of_its_config(tmp_path: Path, name: str) -> None:
    for out in ("one", "two"):
        build.BUILDERS[name](tmp_path / out)
    one, two = (load_file(tmp_path / out / "model.safetensors") for out in ("one", "two"))
    assert set(one) == set(two)
    for key, tensor in one.items():
        torch.testing.assert_close(two[key], tensor, rtol=0, atol=0)
    dtypes = {v["dtype"] for k, v in header(tmp_path / "one" / "model.safetensors").items() if k != "__metadata__"}
    assert dtypes == {"F32"}
    model_type, fields = build.TINY_ARCHITECTURES[name]
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config["model_type"] == model_type
    assert {k: config[k] for k in build.TINY_LLAMA} == {**build.TINY_LLAMA, **fields}
    assert ("lm_head.weight" in one) == (not config["tie_word_embeddings"])


def test_a_folder_without_config_json_is_refused_with_its_files_kept(tiny_config: Config, tmp_path: Path) -> None:
    """A copy cut short, or a folder made by hand, is no checkpoint, and was emptied to build into: a run's output dir
    given as model.path lost its adapter and checkpoints (h47). It is refused, every file kept; an empty one is built
    into."""
    tiny_config.model.path = str(tmp_path / "tiny")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"is a directory without config.json that holds other files"):
        build.ensure_checkpoint(tiny_config)
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["tokenizer.json"]
    (tmp_path / "tiny" / "tokenizer.json").unlink()
    assert build.ensure_checkpoint(tiny_config) == str(tmp_path / "tiny")
    assert (tmp_path / "tiny" / "config.json").is_file() and (tmp_path / "tiny" / "model.safetensors").is_file()
    # Every file as open() would make it (0644 under umask 022): the weights were 0600, unreadable to another user
    # of a shared QLORA_CACHE (or a container of another uid) though its config.json was not.
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "tiny").iterdir()}["model.safetensors"] == \
        0o666 & ~umask


@pytest.mark.parametrize("points_at", ["loop", "missing/tiny"])
def test_a_link_that_leads_nowhere_is_refused_before_the_build_is_announced(tiny_config: Config, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture,
                                                                             points_at: str) -> None:
    """A link in a loop announced the build, built, then failed its rename saying "Not a directory"; a link to a
    missing folder was replaced by the checkpoint. Both are refused first and alone, the link kept."""
    link = tmp_path / "loop"
    link.symlink_to(points_at)
    tiny_config.model.path = str(link)
    with pytest.raises(Stop, match=r"^model.path=.*loop is a link that leads nowhere \(a loop, or a missing target\)"):
        build.ensure_checkpoint(tiny_config)
    assert capsys.readouterr().out == ""
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


def test_a_checkpoint_another_process_built_first_is_kept(tiny_config: Config, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Two first runs build at once: the later one keeps the checkpoint in place, which the other may be reading."""
    target = tmp_path / "tiny"
    tiny_config.model.path = str(target)
    real = build.BUILDERS["tiny-llama"]

    def racing(out: Path) -> None:
        real(out)
        real(target)  # the other process's rename, while this one built
        (target / "theirs").write_text("")

    monkeypatch.setitem(build.BUILDERS, "tiny-llama", racing)
    assert build.ensure_checkpoint(tiny_config) == str(target)
    assert (target / "theirs").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_a_cache_that_cannot_be_created_names_qlora_cache(tiny_config: Config, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """HOME a file (or $QLORA_CACHE under one): the line said model.path cannot be created, a path the user never
    set (the recipe's, in the cache); it names QLORA_CACHE, where built models go. A model.path of one's own does
    not."""
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "afile" / "cache"))
    tiny_config.model.path = str(build.cache_dir() / "tiny-llama-v2")
    with pytest.raises(Stop, match=r"afile is a file: move it aside, or choose another path; built models go to "
                                   r"\$QLORA_CACHE, else ~/.cache/qlora: set QLORA_CACHE to a folder this user may "
                                   r"write$"):
        build.ensure_checkpoint(tiny_config)
    tiny_config.model.path = str(tmp_path / "afile" / "mine")
    with pytest.raises(Stop) as refused:
        build.ensure_checkpoint(tiny_config)
    assert str(refused.value).endswith("afile is a file: move it aside, or choose another path")
