"""Before the base is loaded: will the step fit where it runs? The trainer asks the estimator, with the allocator's
margin (qlora/memory/estimate.py), and refuses in one line a step that does not fit the card, or the host's available
memory on a CPU device (with what the process holds there beyond its tensors: process_margin), naming the longest
`data.max_seq_len` that does (and, for micro-batches of several rows, the largest `train.batch_size`). Loading a 70B
base takes minutes; running out of memory after it helps nobody (issue 22: `--train.device=cpu` would start a 70B run
the estimator puts at 49 GiB on a 23 GiB machine).

On CUDA the host side is checked too: what the plan keeps in host memory (offloaded layer inputs, the optimizer on the
CPU, the embedding table, a base streamed from there) against what the host has available, beside the process's own
use (each process of several on one host against its share: host_share); a streamed base the host cannot pin is
refused as such, for no shorter row would help. An architecture the estimator does not know, or adapters the model
cannot have (a rank above a layer's side, targets it lacks), is not checked: the loader's own refusal names the fix
(and the out-of-memory report still names what would fit).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch

from qlora.config import Config
from qlora.errors import ConfigError
from qlora.levers.tiling.settings import untiled_up_to
from qlora.memory.activations import adapted_layers
from qlora.memory.arch import Arch, BadConfigValue, load_arch
from qlora.memory.estimate import Estimate, estimate
from qlora.memory.readings import available_bytes, container_limit
from qlora.memory.terms import HOST_RUNTIME

GIB = 2**30
STEP = 64  # the suggested lengths are multiples of this
# On a CPU device the trainer's resident set outgrows its tensors, which MemAvailable at this check cannot know: the
# libraries and kernel caches its first load and step bring in, and malloc's free lists, which glibc's defaults let
# grow with the activations (the threshold for returning a freed block to the OS rises to the largest block freed,
# up to 32 MiB). A fixed 1 MiB threshold held them down at +26% CPU time a step (the demo +52%), so the trainer keeps
# the defaults and the check counts them. Measured (docs/memory.md): above the estimate, the tiny Llama at 4,096 and
# 8,192 tokens took 70 MiB + 2.07 x its activations, SmolLM2-135M (the demo) 70 MiB + about 1 x at its short rows
# and 1.6 to 2.49 x with them filled (8 x 512 tokens: 2.49 x in one run of two, 47 MiB under the 2.5 x counted
# then; the same command varied by 1.9 GiB between runs): 3 x leaves the demo's shape ~1.3 GiB to spare.
CPU_LIBRARIES = 96 * 2**20
CPU_FREE_LISTS = 3.0  # times the estimate's activations


def process_margin(est: Estimate) -> int:
    """What a CPU process holds at its peak beyond the estimated tensors: libraries and malloc's free lists (0 on
    CUDA, where the allocator's margin is the estimate's own)."""
    if est.device != "cpu":
        return 0
    return CPU_LIBRARIES + int(CPU_FREE_LISTS * est.components.get("activations", 0))


def room(device: torch.device, processes: int = 1, available: int | None = None) -> tuple[int, str]:
    """(bytes, what they are) of the memory a step on `device` has: the card's, or on a CPU device this process's
    share of the host (host_share) among the `processes` of the run on this host, of `available` bytes where the
    caller read them (None: read MemAvailable here)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"{props.name} has {props.total_memory / GIB:.2f} GiB"
    return this_host(processes, available)


def this_host(processes: int = 1, available: int | None = None) -> tuple[int, str]:
    """host_share of this machine's available memory (readings.available_bytes, or `available` where the caller read
    it), its memory cgroup's limit named where it has one. Other hosts (--host-gib's, a check given host_bytes) are
    host_share's alone: the limit is this machine's, and reading it for them read the cgroup's files for nothing."""
    return host_share(available_bytes() if available is None else available, processes, within=under_limit())


def host_share(available: int, processes: int = 1, host: str = "this host", within: str = "") -> tuple[int, str]:
    """(bytes, what they are) of a host's `available` memory (MemAvailable: what the kernel can hand out now, beside
    the processes' own use so far, or less under a container's limit: readings.available_bytes) that one of the
    run's `processes` on that host may count on: an equal share, the whole for one. Each loads and steps at once, so
    each weighing the whole host passed a step that together they asked of it `processes` times over. `within`: what
    bounds that memory beside the host's own (this_host: its memory cgroup's limit)."""
    if processes <= 1:
        return available, f"{host} has {available / GIB:.2f} GiB available{within}"
    each = available // processes
    return each, (f"{host}'s {available / GIB:.2f} GiB available{within}, shared by {processes} processes: "
                  f"{each / GIB:.2f} GiB each")


def under_limit() -> str:
    """Words for the available memory of a process in a memory cgroup whose limit is below the host's: the refusal
    that names only the available figure reads as a host with little free, not as the container's limit to raise."""
    limit = container_limit()
    return "" if limit is None else f" within its memory cgroup's limit of {limit / GIB:.2f} GiB"


def needs(est: Estimate) -> tuple[int, int]:
    """(device bytes, host bytes) a step needs: the peak with the allocator's margin (on a CPU device, the process's,
    process_margin), and on CUDA what its plan keeps in host memory beside the process's own allowance (which the
    available memory already excludes)."""
    return est.card_bytes + process_margin(est), est.host_bytes - est.host.get("runtime", 0)


def available_on(host_bytes: int) -> int:
    """The host memory the trainer finds available before loading (MemAvailable, what `needs` and the plan weigh) on
    a host of `host_bytes` (--host-gib: a machine's size, as --max-context and the estimate's host total count it):
    the host less the estimate's allowance for the process itself and the OS (HOST_RUNTIME)."""
    return host_bytes - HOST_RUNTIME


def divisors(rows: int, most: int | None = None) -> list[int]:
    """The micro-batch sizes (of at most `most` rows) that run `rows` rows a step in whole micro-batches, ascending.
    Found in pairs up to the square root: counting to `rows` hung the check before loading at 10^11 rows."""
    most = rows if most is None else min(most, rows)
    small = [b for b in range(1, min(most, math.isqrt(rows)) + 1) if rows % b == 0]
    return small + [rows // b for b in reversed(small) if b < rows // b <= most]


def fits(est: Estimate, device_bytes: int, host_bytes: int | None) -> bool:
    card, host = needs(est)
    return card <= device_bytes and (host_bytes is None or est.device == "cpu" or host <= host_bytes)


def largest(ok: Callable[[int], bool], below: int, step: int, drop: int = 0) -> int:
    """The largest multiple of `step` under `below` for which `ok` holds, else 0. `ok` holds for all smaller ones up
    to `drop`, and apart from that for all smaller ones past it: the need falls where tiles begin (untiled_up_to),
    so the side past `drop` is searched first, if its first value fits."""
    top = max(0, (below - 1) // step)
    edge = drop // step if 0 < drop // step < top else 0
    lo, hi = (edge + 1, top) if edge and ok((edge + 1) * step) else (0, edge or top)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid * step) else (lo, mid - 1)
    return lo * step


def fitting(cfg: Config, arch: Arch, device: str, device_bytes: int, host_bytes: int | None,
            gpus: int = 1) -> tuple[int, int]:
    """(the longest data.max_seq_len, the largest train.batch_size) below the recipe's that fit, each alone, the
    recipe otherwise as it is; 0 where none does."""
    def ok(section: str, key: str, value: int) -> bool:
        c = copy.copy(cfg)
        setattr(c, section, copy.copy(getattr(cfg, section)))
        setattr(getattr(c, section), key, value)
        return fits(estimate(c, arch, c.quant.method, device, gpus), device_bytes, host_bytes)

    method = cfg.quant.method
    return (largest(lambda n: ok("data", "max_seq_len", n), cfg.data.max_seq_len, STEP,
                    untiled_up_to(cfg, method, cfg.train.batch_size)),
            largest(lambda n: ok("train", "batch_size", n), cfg.train.batch_size, 1,
                    untiled_up_to(cfg, method, cfg.data.max_seq_len)))


def check_fits(cfg: Config, device: torch.device, gpus: int = 1, device_bytes: int | None = None,
               host_bytes: int | None = None, processes: int = 1, available: int | None = None) -> Estimate | None:
    """Refuse (ConfigError) a step whose estimate does not fit `device`: the card's memory (or, on a CPU device, this
    process's share of the host's available memory among the run's `processes` on this host) unless `device_bytes`
    is given, and on CUDA that share for what the plan keeps there unless `host_bytes` is. Returns the estimate, or
    None where nothing is checked: an architecture the estimator does not know, or a lora.r beyond an adapted layer's
    side (attach_lora refuses it). `available`: the host's MemAvailable as the caller read it (None: read here)."""
    try:
        arch = load_arch(cfg)
        adapted = adapted_layers(arch, cfg.lora.targets) if cfg.quant.method != "full" else {}
        est = estimate(cfg, arch, cfg.quant.method, device.type, gpus)
    except BadConfigValue:  # transformers would refuse it too, in a traceback, or train on a window of no tokens
        raise
    except (ConfigError, OSError, ValueError, KeyError):
        return None  # the loader says what is wrong with the model, or the out-of-memory report scales instead
    if any(cfg.lora.r > min(shape) for shape in adapted.values()):
        return None  # no such adapter: attach_lora refuses it, naming the layer and the largest rank
    where = host_where = None
    if device_bytes is None:
        device_bytes, where = room(device, processes, available)
    where = where or (f"the card has {device_bytes / GIB:.2f} GiB" if device.type == "cuda" else
                      f"the host has {device_bytes / GIB:.2f} GiB available")
    if device.type == "cuda" and host_bytes is None:
        host_bytes, host_where = this_host(processes, available)
    elif device.type == "cuda":
        host_bytes, host_where = host_share(host_bytes)
    if fits(est, device_bytes, host_bytes):
        return est
    card, host = needs(est)
    streamed = est.host.get("streamed_base", 0)
    # What no shorter row can shrink: the streamed base, and the optimizer, embeddings and data kept beside it.
    fixed = streamed + sum(est.host.get(key, 0) for key in ("optimizer", "embeddings", "tokenised_rows"))
    if streamed and card <= device_bytes and est.device == "cuda" and fixed > host_bytes:
        raise ConfigError(f"train.stream_base keeps the 4-bit base in pinned host memory: the plan keeps "
                          f"{host / GIB:.2f} GiB there ({streamed / GIB:.2f} GiB of it the base) and {host_where} "
                          "(python -m qlora.memory RECIPE estimates it, nothing loaded): use a host with more "
                          "memory, or a card that holds the base with --train.stream_base=false")
    t = cfg.train
    shape = f"data.max_seq_len={cfg.data.max_seq_len}" if t.batch_size == 1 else \
        f"train.batch_size={t.batch_size} x data.max_seq_len={cfg.data.max_seq_len}"
    if card > device_bytes:
        need = estimated_at(est, where)
    else:
        need = f"the plan keeps {host / GIB:.2f} GiB in host memory and {host_where}"
    longest, batch = fitting(cfg, arch, device.type, device_bytes, host_bytes, gpus)
    fixes = [f"--data.max_seq_len={longest}"] if longest else []
    if batch:  # as many rows per step, in smaller micro-batches: one that divides them
        rows = t.batch_size * t.grad_accum
        batch = divisors(rows, batch)[-1]
        fixes.append(f"--train.batch_size={batch} --train.grad_accum={rows // batch}")
    if fixes:
        fix = "set " + " or ".join(fixes) + ", the most that fits as the recipe stands" + \
            (" (python -m qlora.memory RECIPE --max-context finds plans that reach further)" if est.margin else "")
    else:
        fix = "not even one row of 64 tokens fits: " + ("use a larger card, or several with train.shard_base"
                                                       if device.type == "cuda" else
                                                       "use a GPU, or a machine with more memory")
    raise ConfigError(f"{shape}: {need} (python -m qlora.memory RECIPE estimates it, nothing loaded): {fix}")


def estimated_at(est: Estimate, where: str) -> str:
    """'the step is estimated at N GiB ... and {where}': what a step needs (`needs`), with what beside the tensors is
    counted in it, set against where it runs; the refusal and the line of a step that fits say it alike."""
    margin = " with the allocator's margin" if est.margin else \
        f" ({process_margin(est) / GIB:.2f} GiB of it the process's libraries and malloc's free lists beside " \
        "the tensors)" if est.device == "cpu" else ""
    return f"the step is estimated at {needs(est)[0] / GIB:.2f} GiB{margin} and {where}"


def say_fits(cfg: Config, device: torch.device, gpus: int = 1, processes: int = 1) -> Estimate | None:
    """check_fits, then one line of what the step is estimated to hold against what it has, and the memory levers
    that bring it there: before the base loads (minutes for 70B), the numbers the run's own memory line later sets
    against the measured peak. Nothing where the estimator does not know the architecture."""
    # Read once: read for the check and again for the line, a host whose memory fell between the two (another process
    # loading) was said to have less than the step the check had just passed.
    available = available_bytes()
    est = check_fits(cfg, device, gpus, processes=processes, available=available)
    if est is None:
        return None
    host = needs(est)[1]
    line = estimated_at(est, room(device, processes, available)[1])
    if est.device == "cuda" and host > 0:
        line += f"; {host / GIB:.2f} GiB in host memory, and {this_host(processes, available)[1]}"
    if levers := [said.split(":")[0] for said in est.levers]:
        line += "; memory levers: " + ", ".join(levers)
    print(line)
    return est


def cpu_instead(cfg: Config) -> str:
    """The fix for a recipe that asks for a GPU where none is visible: the CPU where the step fits the host's
    available memory, else a machine with a GPU. The refusal sent every recipe to --train.device=cpu, a 70B one too,
    which the check above then refused for needing 69 GiB of a 21 GiB host."""
    fix = "use --train.device=cpu or auto"
    try:
        est = estimate(cfg, load_arch(cfg), cfg.quant.method, "cpu")
    except (ConfigError, OSError, ValueError, KeyError):
        return fix  # the CPU run's own check says what it needs
    need, free = needs(est)[0], available_bytes()
    if need <= free:
        return f"{fix} (on the CPU the step is estimated at {need / GIB:.2f} GiB, and the host has {free / GIB:.2f} " \
               f"GiB available{under_limit()})"
    return f"on the CPU the step is estimated at {need / GIB:.2f} GiB and this host has {free / GIB:.2f} GiB " \
           f"available{under_limit()}: run it where a CUDA GPU is visible (python -m qlora.memory RECIPE " \
           "--max-context shows what fits each card)"
