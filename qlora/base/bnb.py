"""bitsandbytes, imported without the 3.7 s its import spends on torch.compile: `from qlora.base.bnb import bnb`.

Importing bitsandbytes wraps its default (fallback) kernels in torch.compile (bitsandbytes/backends/default/ops.py,
`_try_torch_compile`), and torch.compile imports torch._dynamo and inductor at once: 3.7 of the 8 s of CPU that
`python -m qlora.train` spent importing on these 2-core machines, paid again by every process a run, a probe or a
test starts. torch.compile compiles nothing before the first call anyway, and in training none of these fallbacks is
called: the CPU and CUDA backends register kernels of their own (a tiny-recipe run leaves dynamo's frame counters at
zero). So while bitsandbytes is imported, torch.compile hands back a function that compiles on its first call with
the same arguments: the same behaviour (a compile that fails there still falls back to the plain function, inside
bitsandbytes' own wrapper), the imports paid only by a process that calls one.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from types import ModuleType

import torch


def compiled_on_first_call(compile_: Callable) -> Callable:
    """`compile_` (torch.compile) deferred: what it would compile is compiled with the same options on its first call,
    so nothing it imports is imported before then."""

    def deferred(fn: Callable | None = None, **options: object) -> Callable:
        if fn is None:  # used as @torch.compile(**options)
            return lambda f: deferred(f, **options)
        compiled: Callable | None = None

        @functools.wraps(fn)
        def call(*args: object, **kwargs: object) -> object:
            nonlocal compiled
            if compiled is None:
                compiled = compile_(fn, **options)
            return compiled(*args, **kwargs)

        return call

    return deferred


def _import() -> ModuleType:
    if "bitsandbytes" in sys.modules:  # imported already (by a library, or a test): as it is
        return sys.modules["bitsandbytes"]
    compile_ = torch.compile
    torch.compile = compiled_on_first_call(compile_)
    try:
        return importlib.import_module("bitsandbytes")
    finally:
        torch.compile = compile_


bnb = _import()
__all__ = ["bnb"]
