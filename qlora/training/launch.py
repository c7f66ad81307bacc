"""How the processes of a run meet and part: `torchrun --nproc-per-node=N -m qlora.train RECIPE.py` (or `accelerate
launch`) starts them, `joined` makes them one run (the process group, the base built once) for its length, and says
how a run of several ends. What the joined processes do together at each step is qlora/training/distributed.py's.

Only rank 0 writes (checkpoints, adapter, metrics, memory report) and prints; an error every rank meets alike prints
once. An error one rank meets alone that it does not print itself (a data file missing on its machine) it posts in
the store the processes met through, and rank 0, losing it, says it; one rank 0 meets alone (its own data file
missing) it posts too, and the others, losing it, end with its exit status in silence. A rank that dies breaks the
others' next collective within a second (gloo: "Connection reset by peer"); one that hangs trips
`train.dist_timeout`. Either way the others stop with exit 6 and one line, and the newest checkpoint, which only
rank 0 writes, atomically, is intact.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from qlora.base.build import ensure_checkpoint
from qlora.base.load import resolve_device
from qlora.config import Config
from qlora.console import announce, since
from qlora.errors import EXIT_OOM, EXIT_PEER, ConfigError, Session, Stop, exit_status, launched_ranks
from qlora.training.checkpoint import checkpoint_dirs, list_checkpoints
from qlora.training.distributed import Ranks
from qlora.training.guard import broken_collective
from qlora.training.runconfig import flat

# The store key where a rank posts an ending it does not print; torchrun --max-restarts keeps its store across the
# attempts of a run, so each attempt posts under its own number.
ENDED = "qlora/ended/{attempt}/{rank}"
OWN_PATHS = ("model.path", "model.config_json", "data.train", "data.eval", "output.dir")
GLOO_DRAIN_S = 0.2  # what gloo's worker threads are given to finish with the GIL before the interpreter exits
WAIT_POLL_S = 0.2  # how often a rank launched by hand looks for rank 0's store before it connects
LAUNCHER_POLL_S = 1.0  # how often a process torchrun started checks that torchrun is still there


def from_env() -> Ranks:
    """This process's rank, from the variables torchrun and accelerate launch set (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE)."""
    return Ranks(*launched_ranks())


def quiet() -> None:
    """Ranks but 0 print nothing of their own: rank 0 speaks for the run. Their errors still reach stderr."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115  for the life of the process
    warnings.simplefilter("ignore")
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def start(cfg: Config, ranks: Ranks) -> None:
    """Join the run's other processes (nothing to do when alone) and build the base checkpoint once, on rank 0."""
    if not ranks.several:
        if cfg.train.shard_base:
            print("train.shard_base: one process, nothing to shard (launch with torchrun --nproc-per-node=N)")
        return
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={ranks.local_rank} but {torch.cuda.device_count()} GPU(s) are visible: "
                              f"launch at most --nproc-per-node={torch.cuda.device_count()}")
        torch.cuda.set_device(ranks.local_rank)  # "cuda" means this rank's GPU from here on
        device = torch.device("cuda", ranks.local_rank)
    ranks.device = device
    if not ranks.main:
        quiet()
    timeout = datetime.timedelta(seconds=cfg.train.dist_timeout)
    place = meeting_point(ranks)
    # Said before the wait: a process launched alone with WORLD_SIZE=2 waited the whole timeout without a word.
    started = announce(f"joining {ranks.size} processes "
                       f"(each has train.dist_timeout={cfg.train.dist_timeout} s to arrive)")
    store = meet(ranks, place, timeout)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=ranks.rank,
                            world_size=ranks.size, timeout=timeout)
    if ranks.main:
        print(f"joined by all {ranks.size} processes ({dist.get_backend()}) in {since(started)}")
    ranks.store = store
    # Where each machine keeps the base and the data is its own; the rows read are compared once read (assemble).
    ranks.check_same({k: v for k, v in flat(cfg.to_dict()).items() if k not in OWN_PATHS},
                     "launch every process with the same recipe and overrides")
    ranks.on_main(ensure_checkpoint, cfg)  # a builder run by every rank at once would race for the same folder


def meet(ranks: Ranks, place: tuple[str, int], timeout: datetime.timedelta) -> dist.Store:
    """The store the processes meet through: init_process_group's own rendezvous (env://), done here to keep the
    store, where a rank posts the ending it leaves unsaid. Under torchrun its agent holds the store; launched by hand,
    rank 0 hosts it, and another rank waits here, at most `timeout`, for rank 0 to listen at `place` (MASTER_ADDR and
    MASTER_PORT) before it connects. torch's client waited the timeout, then a random delay of up to about as long,
    then the timeout again (measured: 15 s for train.dist_timeout=5, 20-30 min at the default), and printed 40 lines
    of c10d's log and C++ frames before the run's own line."""
    if not ranks.main and "TORCHELASTIC_RUN_ID" not in os.environ:
        wait_for_main(ranks, *place, timeout)
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    return store


def meeting_point(ranks: Ranks) -> tuple[str, int]:
    """MASTER_ADDR and MASTER_PORT, where the processes meet (rank 0's store), checked: unset, each rank ended in
    torch's env:// traceback, exit 1."""
    host, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not (host and port.isascii() and port.isdigit() and 0 < int(port) < 2**16):
        raise ConfigError(f"WORLD_SIZE={ranks.size} needs MASTER_ADDR (rank 0's host) and MASTER_PORT (a free port "
                          f"there, 1 to 65535), where the processes meet: MASTER_ADDR={host!r}, MASTER_PORT="
                          f"{port[:20]!r}; launch with torchrun --nproc-per-node=N -m qlora.train RECIPE.py, which "
                          "sets them")
    return host, int(port)


def wait_for_main(ranks: Ranks, host: str, port: int, timeout: datetime.timedelta) -> None:
    """Return once something listens at host:port (rank 0's store, whose client then connects at once); a Stop with
    exit 6 and one line where nothing did within `timeout`. A bare connection, closed unused, is nothing to the store:
    its server counts the clients that join it, not the connections it accepts."""
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                return
        except OSError as err:
            why = err.strerror or str(err) or type(err).__name__  # a timeout's strerror is None
        if time.monotonic() >= deadline:
            raise Stop(EXIT_PEER, f"waited train.dist_timeout={timeout.total_seconds():g}s for rank 0 at "
                                  f"MASTER_ADDR:MASTER_PORT={host}:{port}, which never answered ({why.lower()}): "
                                  f"start rank 0 of this run's {ranks.size} processes with the same MASTER_ADDR, "
                                  "MASTER_PORT and WORLD_SIZE (if it ended, its own output says why), or launch them "
                                  "all with torchrun")
        time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))


def check_same_checkpoints(ranks: Ranks, run_dir: Path) -> None:
    """Refuse a --resume whose processes find other newest checkpoints in their output.dir (a path of each machine's
    own: OWN_PATHS). Without a shared file system one resumed at step 3 and another started afresh: they waited for
    each other until train.dist_timeout (600 s), then each said it had lost the other."""
    newest = found[-1].name if (found := checkpoint_dirs(run_dir)) else None
    ranks.check_same({"output.dir's newest checkpoint": newest},
                     "give every process the same output.dir, on a file system they share")


@contextlib.contextmanager
def joined(cfg: Config) -> Iterator[Ranks]:
    """The run's processes, for the length of a run: a collective broken by a process that died or hung becomes a
    `Stop` with exit 6 and one line; the process group is taken down at the end (a gloo group left to the
    interpreter's exit aborts it with "terminate called without an active exception")."""
    ranks = from_env()
    launcher = LauncherWatch(ranks).start() if "TORCHELASTIC_RUN_ID" in os.environ else None
    try:
        start(cfg, ranks)
        yield ranks
    except Exception as err:
        if launcher:
            launcher.end()
            launcher.say()
        if ranks.several and broken_collective(err):
            # torchrun stops the rest of a run whose process died with SIGTERM, as this one takes its group down and
            # says which checkpoint is intact (or what the rank that ended posted): the ending is decided
            code, line = posted_ending(ranks) or (EXIT_PEER, peer_lost(err, cfg))
            Session.ended = code
            raise Stop(code, line) from err
        post_ending(ranks, err)
        raise
    finally:
        if launcher:
            launcher.end()
        if dist.is_initialized():
            gloo = dist.get_backend() == "gloo"
            dist.destroy_process_group()
            # gloo's worker threads outlive it here, and one may still hold the last collective's tensors, whose
            # release takes the GIL: at interpreter exit that aborts the process ("terminate called without an
            # active exception", SIGABRT, after a run that succeeded; pytorch PR 179291, abandoned). Hand them the
            # GIL now (NCCL has no such threads).
            if gloo:
                time.sleep(GLOO_DRAIN_S)


class LauncherWatch:
    """Under torchrun (or accelerate launch, which runs it), stop as for a SIGTERM when the launcher is gone. Its
    kill -9 left the processes it started running on their own (measured: 2 ranks of the tiny recipe at 1,000,000
    steps went on from step 4 to 180 and beyond, with no terminal to stop them and the run's lock held); a SIGTERM to
    torchrun reaches them, a kill -9 does not. They stop after the step in flight, with a checkpoint, as for SIGTERM
    (every rank agrees on the step: Ranks.agree_signal). Not for a process launched otherwise: a run left behind by
    the shell that started it (nohup, a closed ssh session) is meant to go on."""

    def __init__(self, ranks: Ranks) -> None:
        self.pid, self.main = os.getppid(), ranks.main
        self._unsaid = threading.Lock()  # held once the line is said: said once, by whichever thread comes first
        self._ended = threading.Event()  # the run is ending: nothing left to stop
        self.thread = threading.Thread(target=self._watch, name="qlora: launcher watch", daemon=True)

    def start(self) -> LauncherWatch:
        self.thread.start()
        return self

    def end(self) -> None:
        """The run is ending (joined's exit): the watch stops looking. Where another rank saw the launcher gone first
        and the run stopped for it, this watch may look only now; its SIGTERM then met the command's own handler
        while the run ended, and a `stopped by SIGTERM` without the step took the place of the run's own line."""
        self._ended.set()

    def _watch(self) -> None:
        while not self.gone():
            if self._ended.wait(LAUNCHER_POLL_S):
                return
        if not self._ended.is_set():  # a run going on: stop it as for SIGTERM
            self.say()
            os.kill(os.getpid(), signal.SIGTERM)

    def gone(self) -> bool:
        return os.getppid() != self.pid  # the launcher's children are handed to init (or a subreaper) when it dies

    def say(self) -> None:
        """On rank 0, once, where the launcher is gone: why the run stopped. Also said as a run ends, for another
        rank may have seen it first and passed the SIGTERM on (Ranks.agree_signal) before rank 0's watch looked (a
        fresh clone's CI: "stopped by SIGTERM after step 6" alone); all are handed on at the launcher's death."""
        if self.main and self.gone() and self._unsaid.acquire(blocking=False):
            with contextlib.suppress(OSError):
                os.write(2, f"\nthe launcher (pid {self.pid}) that started this run's processes is gone\n".encode())


def post_ending(ranks: Ranks, err: BaseException) -> None:
    """Post this rank's ending, where it is not this rank's own to say (exit 4 and 6 are): for rank 0 to say (an
    error of bad input met alone would otherwise leave rank 0's "see the other processes' output" pointing at
    nothing), or, from rank 0, for the others to end with in silence (each said it had lost rank 0, exit 6)."""
    ending = exit_status(err)
    if ranks.store is None or ending is None or ending[0] in (EXIT_OOM, EXIT_PEER):
        return
    with contextlib.suppress(RuntimeError):  # a store already gone: rank 0 says it lost this rank, as before
        ranks.store.set(ended_key(ranks.rank), json.dumps(ending))


def posted_ending(ranks: Ranks) -> tuple[int, str] | None:
    """The ending another rank posted (its exit status, and its line after its rank), or None: on rank 0 any
    other's; on the others rank 0's (its line is rank 0's to say: qlora.cli prints none of it there), where the store
    outlives rank 0 (torchrun's agent holds it)."""
    # Launched by hand (no torchrun), rank 0 hosts the store itself, and asking a dead one prints a TCPStore warning.
    if ranks.store is None or not (ranks.main or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        return None
    for rank in range(1, ranks.size) if ranks.main else (0,):
        key = ended_key(rank)
        with contextlib.suppress(RuntimeError):
            if ranks.store.check([key]):
                code, line = json.loads(ranks.store.get(key))
                return code, f"rank {rank}: {line.removeprefix('error: ')}"
    return None


def ended_key(rank: int) -> str:
    return ENDED.format(attempt=os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), rank=rank)


def peer_lost(err: BaseException, cfg: Config) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    reason = text.split("] ", 1)[-1].split(". This is", 1)[0]  # gloo: "[.../pair.cc:537] Read error ...: why."
    latest = list_checkpoints(Path(cfg.output.dir))
    kept = (f"{latest[-1]} is intact: see the other processes' output, then continue with --resume" if latest else
            "no checkpoint was written yet: see the other processes' output and start again")
    return (f"lost the other processes of this run ({reason}): one died or hung (train.dist_timeout="
            f"{cfg.train.dist_timeout}s); {kept}")
