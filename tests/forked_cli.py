"""Run `python -m qlora.train ...` (or another qlora command) many times, each in its own process, paying for the
imports once.

Importing torch, transformers and bitsandbytes takes 5-15 s of CPU on the shared test machine, and the reliability
tests start the CLI dozens of times. So a server process imports qlora.train once and forks a child per command.
Each child is a real process with its own pid, exit status, stdout and stderr, that runs the module exactly as
`python -m qlora.train ARGS` does (runpy, as `__main__`), and that a test may SIGKILL or SIGTERM. Forking is safe here
because the server never runs a torch op (no thread pool exists yet), OMP_NUM_THREADS=1, and no GPU is visible:
importing bitsandbytes initialises CUDA where a GPU is (it reads each device's compute capability), and a forked
child of a process with CUDA initialised dies on its first CUDA call. These are CPU tests, wherever they run.

    with ForkedCLI() as cli:
        result = cli.run(["recipes/tiny.py", "--output.dir=/tmp/x"])  # Result(status, stdout, stderr)
        pid = cli.start([...]); ...; os.kill(pid, signal.SIGKILL); cli.wait(pid)

`prelude` is Python run in the child before the module, for tests that inject a fault (a forward hook that raises);
`module` runs another command (`qlora.eval`, `qlora.merge`, ...); `env` sets environment variables in the child
only (a model cache of its own: QLORA_CACHE).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds a child may run; the tiny recipe's longest run here takes a few
HUNG = -1000  # the status of a child killed for running past TIMEOUT


@dataclass
class Result:
    status: int
    """The exit code, or minus the signal that killed the process (as subprocess reports it)."""
    stdout: str
    stderr: str


class ForkedCLI:
    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        self.server = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, cwd=ROOT, env=env)
        self.logs = Path(tempfile.mkdtemp(prefix="forked-cli-"))
        self._files: dict[int, tuple[Path, Path]] = {}
        self._count = 0
        assert self._reply() == {"ready": True}

    def __enter__(self) -> ForkedCLI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)
        shutil.rmtree(self.logs, ignore_errors=True)  # each command's stdout and stderr, read by then

    def _reply(self) -> dict:
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError("the forked-CLI server died; run `python tests/forked_cli.py` to see why")
        return json.loads(line)

    def _send(self, message: dict) -> dict:
        self.server.stdin.write(json.dumps(message) + "\n")
        self.server.stdin.flush()
        return self._reply()

    def start(self, argv: list[str], prelude: str = "", cwd: Path = ROOT, module: str = "qlora.train",
              env: dict[str, str] | None = None) -> int:
        n = self._count = self._count + 1
        out, err = self.logs / f"{n}.out", self.logs / f"{n}.err"
        pid = self._send({"argv": argv, "prelude": prelude, "cwd": str(cwd), "stdout": str(out),
                          "stderr": str(err), "module": module, "env": env or {}})["pid"]
        self._files[pid] = (out, err)
        return pid

    def wait(self, pid: int) -> Result:
        status = self._send({"wait": pid})["status"]
        out, err = self._files.pop(pid)
        return Result(status, out.read_text(), err.read_text())

    def run(self, argv: list[str], prelude: str = "", cwd: Path = ROOT, module: str = "qlora.train",
            env: dict[str, str] | None = None) -> Result:
        return self.wait(self.start(argv, prelude, cwd, module, env))


def hangup_at_default() -> None:
    """SIGHUP at its default, as a terminal's shell starts a command (and a subprocess's preexec_fn here): a suite
    run under nohup passes SIG_IGN on to every process it starts, which the trainer then leaves ignored, as it must
    (docs/failures.md), and the tests that hang a run up saw it train to its end (exit 0 for 129)."""
    import signal

    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _child(command: dict) -> None:
    """In the forked child: become `python -m MODULE ARGV`, then exit with its status. Never returns."""
    import runpy
    import signal
    import traceback

    code = 1
    try:
        os.chdir(command["cwd"])
        os.environ.update(command["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, command["stdout"], os.O_WRONLY | os.O_CREAT),
                                (2, command["stderr"], os.O_WRONLY | os.O_CREAT)):
            os.dup2(os.open(path, flags | (os.O_TRUNC if fd else 0), 0o644), fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        hangup_at_default()
        if command["prelude"]:
            exec(command["prelude"], {"__name__": "prelude"})
        module = command["module"]
        sys.argv = [module, *command["argv"]]
        if not hasattr(sys.modules.get(module), "__path__"):  # a package (qlora.memory) runs its __main__ instead
            sys.modules.pop(module, None)  # runpy runs it afresh as __main__ (its imports stay cached), no warning
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        if isinstance(exit_.code, int) or exit_.code is None:
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
    except KeyboardInterrupt:  # as the interpreter does: die of SIGINT, so the parent sees it
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout: float = TIMEOUT) -> int:
    """The child's exit status; a child still running after `timeout` seconds is killed (a hang fails, not blocks)."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return HUNG
        time.sleep(0.01)


def _serve() -> None:
    import qlora.merge.checkpoint  # noqa: F401  the expensive imports (torch, transformers, bitsandbytes, the training
    import qlora.train  # noqa: F401  components), shared by every child

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if "wait" in command:
            print(json.dumps({"status": _wait(command["wait"])}), flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            _child(command)
        print(json.dumps({"pid": pid}), flush=True)


if __name__ == "__main__":
    # Run as a script, its path starts at tests/, and `import qlora` found the installed one: in another checkout of
    # the project (a second clone beside an editable install) the children ran that checkout's code, not this one's.
    sys.path.insert(0, str(ROOT))
    _serve()
