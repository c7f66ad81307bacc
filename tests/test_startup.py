"""What a process pays before it does anything: `python -m qlora.train` (and every probe, benchmark child and test
process that imports it) imports bitsandbytes without torch.compile's 3.7 s of dynamo and inductor
(qlora/base/bnb.py), and what bitsandbytes compiles still compiles, on its first call."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers

from qlora.base.bnb import compiled_on_first_call

CHECK = "import sys\nsys.exit(3 if 'torch._dynamo' in sys.modules else 0)\n"


def imports_dynamo(imports: str) -> bool:
    """Whether a fresh process that runs `imports` holds torch._dynamo afterwards."""
    return subprocess.run([sys.executable, "-c", f"{imports}\n{CHECK}"], timeout=120).returncode == 3


def test_importing_bitsandbytes_through_qlora_leaves_dynamo_unimported() -> None:
    assert not imports_dynamo("from qlora.base.bnb import bnb\nassert bnb.nn.Linear4bit")


def test_importing_the_trainer_leaves_dynamo_unimported(cli) -> None:
    if imports_dynamo("from transformers import AutoTokenizer, AutoModelForCausalLM"):
        # transformers 5.17 (the GPU image's) imports its generation and masking code with these classes, and that
        # imports torch._dynamo (transformers/masking_utils.py); the trainer needs both before it can do anything.
        pytest.skip(f"transformers {transformers.__version__} imports torch._dynamo itself")
    # The forked-CLI server imported qlora.train and qlora.merge, and nothing else; a child reads what it holds.
    assert cli.run([], prelude=CHECK).status == 0


def test_a_deferred_compile_compiles_on_its_first_call_with_its_options() -> None:
    """The options reach torch.compile: the backend given compiles each function once (left out, inductor would)."""
    import torch._dynamo.utils

    graphs = []

    def backend(graph: torch.fx.GraphModule, inputs: list) -> object:  # dynamo's backend contract: a callable back
        graphs.append(graph)
        return graph.forward

    frames = torch._dynamo.utils.counters["frames"]["total"]
    double = compiled_on_first_call(torch.compile)(lambda x: x * 2, backend=backend, dynamic=False)
    assert torch._dynamo.utils.counters["frames"]["total"] == frames  # nothing compiled yet
    assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))
    assert torch._dynamo.utils.counters["frames"]["total"] > frames  # compiled, by dynamo, at the call
    assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))
    assert len(graphs) == 1
    as_decorator = compiled_on_first_call(torch.compile)(backend=backend)(lambda x: x + 1)
    assert torch.equal(as_decorator(torch.zeros(2)), torch.ones(2)) and len(graphs) == 2


def test_importing_bitsandbytes_gives_torch_compile_back_and_a_decorator_defers_too() -> None:
    """torch.compile is deferred only while bitsandbytes is imported: left so, the process's every later compile
    (the user's own torch.compile(model) a function, not a module) would be; and @torch.compile(options) is deferred
    as the plain call is, importing no dynamo where it decorates."""
    code = ("import sys, torch\ncompile_ = torch.compile\nfrom qlora.base.bnb import bnb, compiled_on_first_call\n"
            "assert torch.compile is compile_, 'torch.compile left deferred'\n"
            "compiled_on_first_call(torch.compile)(backend='eager')(lambda x: x)\n")
    assert subprocess.run([sys.executable, "-c", f"{code}{CHECK}"], timeout=120).returncode == 0
