"""README's Layout section is true: the package's modules are in the stages its table lists, every import (those inside
functions included) goes to the same stage or an earlier one, and no module reaches itself through imports."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qlora"


def stages() -> list[list[str]]:
    """The path patterns of each stage, in order, from README's Layout table (`| stage | modules | owns |`)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Layout"):]
    end = section.find("\n## ", 1)
    section = section if end == -1 else section[:end]
    rows = [line for line in section.splitlines() if re.match(r"\|\s*\d+ ", line)]
    return [re.findall(r"`([^`]+)`", row.split("|")[2]) for row in rows]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package but the lever folders' tests."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if not p.name.startswith("test_")}


def stage_of(path: Path, table: list[list[str]]) -> int:
    """The stage whose pattern matches `path` most specifically: a file pattern before a folder pattern, and among
    those the longest."""
    rel = path.relative_to(ROOT).as_posix()
    found = [(not pattern.endswith("/"), len(pattern), n) for n, patterns in enumerate(table) for pattern in patterns
             if (rel.startswith(pattern) if pattern.endswith("/") else fnmatch.fnmatch(rel, pattern))]
    assert found, f"{rel} is in no stage of README's Layout table"
    return max(found)[2]


def imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `path` imports, at module level or inside functions: `from qlora.x import y` counts as
    qlora.x.y where that is a module, else as qlora.x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found - {module_name(path)}


def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports(path, modules) for name, path in modules.items()}


def test_every_import_goes_to_the_same_stage_or_an_earlier_one() -> None:
    table, modules = stages(), package_modules()
    assert len(table) >= 8, "README's Layout table lists the stages"
    upward = []
    for name, targets in graph().items():
        for target in targets:
            if stage_of(modules[target], table) > stage_of(modules[name], table):
                upward.append(f"{name} (stage {stage_of(modules[name], table) + 1}) imports {target} "
                              f"(stage {stage_of(modules[target], table) + 1})")
    assert not upward, "\n".join(upward)


def test_no_module_reaches_itself_through_imports() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_the_checks_can_fail() -> None:
    """The two rules above, on a made-up graph that breaks each: the check is not vacuous."""
    table = stages()
    errors = PACKAGE / "errors.py"
    train = PACKAGE / "train.py"
    assert stage_of(errors, table) < stage_of(train, table)  # so errors.py importing train.py would be caught
    assert "qlora.errors" in graph()["qlora.cli"]  # imports inside the package are seen
    source = "def f():\n    from qlora.train import main\n"
    tree_imports = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert tree_imports == {"qlora.train"}  # and so are those inside functions


def top_level_names(path: Path) -> set[str] | None:
    """The names a module defines at its top level (in `if` and `try` blocks too); None if it has a module
    `__getattr__`, which answers any name."""
    names: set[str] = set()
    body = list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            body += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                     *[s for h in getattr(node, "handlers", []) for s in h.body]]
    return None if "__getattr__" in names else names


def missing_imports(paths: list[Path]) -> list[str]:
    """Every `from qlora.x import name` in `paths` (inside functions too) whose module or name does not exist."""
    modules = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    and node.module.split(".")[0] == "qlora"):
                continue
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{node.lineno}"
            if node.module not in modules:
                out.append(f"{where}: no module {node.module}")
                continue
            defined = top_level_names(modules[node.module])
            out += [f"{where}: {node.module} has no {a.name}" for a in node.names
                    if defined is not None and a.name not in defined and f"{node.module}.{a.name}" not in modules]
    return out


def test_every_name_imported_from_the_package_exists(tmp_path: Path) -> None:
    """Also in the files CI skips (the GPU tests skip before their imports run): a name moved in a restructure and
    left behind there would otherwise be found only on a GPU, in its rare minutes."""
    paths = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
             ROOT / "conftest.py"]
    assert missing_imports(paths) == []
    stale = tmp_path / "test_stale.py"  # the check can fail: tests/test_gpu.py had this line until 2026-12-05
    stale.write_text("import torch\n\ndef test():\n    from qlora.levers.host_optimizer.optimizer import "
                     "embeddings_to_cpu, HostOptimizer\n    from qlora.levers.nowhere import x\n")
    assert missing_imports([stale]) == [
        "test_stale.py:4: qlora.levers.host_optimizer.optimizer has no embeddings_to_cpu",
        "test_stale.py:5: no module qlora.levers.nowhere"]


def private_imports(paths: list[Path]) -> list[str]:
    """Every `from qlora.x import _name` in `paths`, inside functions too: a leading underscore keeps a name to its
    module, so a second module that needs it needs it public."""
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "qlora":
                where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{node.lineno}"
                out += [f"{where}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    return out


def test_no_name_with_a_leading_underscore_is_imported_from_another_module(tmp_path: Path) -> None:
    paths = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
             ROOT / "conftest.py"]
    assert private_imports(paths) == []
    private = tmp_path / "test_private.py"  # the check can fail: tests/test_startup.py had this line until 2026-12-06
    private.write_text("def test():\n    from qlora.base.bnb import __all__, _compiled_on_first_call\n")
    assert private_imports([private]) == ["test_private.py:2: qlora.base.bnb._compiled_on_first_call"]
