"""The CPU update's temporaries (terms.optimizer_bytes) against the resident memory a real bitsandbytes step adds.

bitsandbytes' CPU fallback (backends/cpu/ops.py) runs each parameter's update in torch ops; the 8-bit one first
dequantises m and v to fp32, so for the largest tensor it holds 8 bytes per element more than the 32-bit update.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import ROOT

from qlora.memory.terms import optimizer_bytes

N = 4 * 2**20  # elements of the one trained tensor: 16 MiB in fp32, far above what Python and torch move around

PROBE = f"""
import json, re, torch
from qlora.memory.readings import glibc_returns_freed_memory
from qlora.training.optimizer import build_optimizer
from qlora.config import load_recipe
glibc_returns_freed_memory()  # the resident set follows the live tensors
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
cfg = load_recipe({str(ROOT / 'recipes' / 'tiny.py')!r})
cfg.train.optimizer = "{{optimizer}}"
p = torch.nn.Parameter(torch.randn({N}))
opt = build_optimizer([p], cfg)
for step in range(3):
    p.grad = torch.randn({N})
    before = rss()
    open("/proc/self/clear_refs", "w").write("5")  # the peak from here
    opt.step()
    added = hwm() - before
print(json.dumps(added))
"""


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_cpu_update_temporaries_match_a_real_step(optimizer: str) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE.replace("{optimizer}", optimizer)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    _, _, transient, _ = optimizer_bytes((N,), optimizer, 4, "cpu")
    assert abs(transient / measured - 1) <= 0.15, (optimizer, transient / 2**20, measured / 2**20)
