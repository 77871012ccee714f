"""How the tests run a command: here in the pytest process (one rank), in ranks forked from it (several), or
in fresh interpreters (python / torchrun / run_train.sh) where the process boundary is what is tested.

A fresh interpreter costs about 5 s of imports (three for a 2-rank torchrun launch: the agent and two workers)
for a command that does well under a second of work at test sizes; the suite ran ~150 of them. Each way
returns a `subprocess.CompletedProcess` (exit code, stdout, stderr), so a test reads the same either way.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
Main = Callable[[], "int | None"]


def free_port() -> int:
    """A TCP port free now for a rendezvous or store, below Linux's ephemeral range (32768+), where another
    process's outgoing connection cannot take it before the launcher binds it; each pytest-xdist worker
    draws from its own band, so two workers do not pick the same port."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    low = 20000 + 3000 * (worker % 4)
    for port in random.Random().sample(range(low, low + 3000), 3000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}..{low + 2999}")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched command: this one without torchrun's rank variables, the repo
    importable, one OpenMP thread per process, `extra` on top."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a crash in a child prints every thread's Python stack
    env.update(extra or {})
    return env


def launch(target: list[str], nproc: int = 1, env: dict[str, str] | None = None, timeout: int = 300):
    """Run `target` (`["-m", module, ...]` or `[script, ...]`) in fresh processes: plain python for one rank,
    torchrun over gloo with a free c10d port for more."""
    if nproc == 1:
        cmd = [sys.executable, *target]
    else:
        rdzv = [
            f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{free_port()}",
        ]
        cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, *target]
    return subprocess.run(cmd, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=timeout)


def _exit_code(e: SystemExit) -> int:
    """What the interpreter exits with on SystemExit(e.code) (argparse's usage errors, --help)."""
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def run_here(main: Main, argv: list[str]) -> subprocess.CompletedProcess:
    """Call a command's `main` in this process as a one-rank launch of `python ARGV` would run it.

    What a command changes in its process is put back afterwards: the working directory (REPO, as for a
    launch), torch's deterministic mode, thread count (1, as OMP_NUM_THREADS=1 gives a launch) and RNGs,
    sys.argv, os.environ and the signal handlers. Output written below Python (C++ warnings) and log records
    (pytest's handler takes them) are not in the result."""
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_argv, cwd = dict(os.environ), sys.argv, os.getcwd()
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()
    # A forked DataLoader worker that garbage-collects an earlier run's process group or FSDP state crashes
    # (SIGSEGV): that garbage is freed here, in this process, before and after each command.
    gc.collect()
    os.chdir(REPO)
    torch.set_num_threads(1)
    sys.argv = list(argv)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main() or 0
            except SystemExit as e:
                code = _exit_code(e)
            except Exception:  # what an uncaught error does to a process: traceback, exit code 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        torch.set_rng_state(rngs[0])
        random.setstate(rngs[1])
        np.random.set_state(rngs[2])
        gc.collect()
    return subprocess.CompletedProcess([sys.executable, *argv], code, out.getvalue(), err.getvalue())


def _rank_process(main: Main, argv: list[str], rank: int, nproc: int, port: int, logs: Path) -> None:
    """A forked rank: torchrun's variables for env:// init, its own stdout/stderr files, then `main`, then
    `os._exit` (never back into pytest, whose state this process shares)."""
    code = 1
    try:
        for fd, name in ((1, "out"), (2, "err")):
            target = os.open(logs / f"{rank}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # fds 1 and 2 stay open until os._exit
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        torch.set_num_threads(1)
        os.chdir(REPO)
        sys.argv = list(argv)
        try:
            code = main() or 0
        except SystemExit as e:
            code = _exit_code(e)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def run_ranks(main: Main, argv: list[str], nproc: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `main` on `nproc` ranks forked from this process, joined by env:// over gloo as torchrun's workers
    are, with torch already imported: a 2-rank run costs its work, not three interpreter starts. As under
    torchrun, a failed rank's peers get 30 s to finish before they are killed; the exit code is the first
    failed rank's (-N: killed by signal N) and stdout/stderr are the ranks' in rank order."""
    gc.collect()  # garbage of earlier runs is freed here, not by a forked rank (see run_here)
    sys.stdout.flush()
    sys.stderr.flush()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        pids = []
        for rank in range(nproc):
            pid = os.fork()
            if pid == 0:
                _rank_process(main, argv, rank, nproc, port, logs)
            pids.append(pid)
        codes: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while len(codes) < nproc:
            for rank, pid in enumerate(pids):
                if rank not in codes:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[rank] = os.waitstatus_to_exitcode(status)
            if any(codes.values()):
                deadline = min(deadline, time.monotonic() + 30)
            if time.monotonic() > deadline:
                for rank, pid in enumerate(pids):
                    if rank not in codes:
                        os.kill(pid, signal.SIGKILL)
                        codes[rank] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            time.sleep(0.02)
        failed = [codes[r] for r in range(nproc) if codes[r]]
        out, err = (
            "".join((logs / f"{r}.{name}").read_text() for r in range(nproc)) for name in ("out", "err")
        )
    return subprocess.CompletedProcess([sys.executable, *argv], failed[0] if failed else 0, out, err)


def run(main: Main, argv: list[str], nproc: int, timeout: float) -> subprocess.CompletedProcess:
    """One rank here, more forked (see the module docstring)."""
    return run_here(main, argv) if nproc == 1 else run_ranks(main, argv, nproc, timeout)


_SCRIPTS: dict[Path, object] = {}


def script_main(path: Path) -> Main:
    """The `main()` of a script (tools/*.py, tests/dist_scripts/*.py), imported once as a module: its
    `__main__` block, which ends the process, does not run. Each main reads sys.argv and returns the exit
    code (None: 0)."""
    if path not in _SCRIPTS:
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[path] = module
    return _SCRIPTS[path].main


def _one_rank_worker(rank: int, fn, args: tuple, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from titan_mem.distributed import exit_process

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        torch.save(fn(*args), out)
    finally:
        dist.destroy_process_group()
    exit_process(0)  # skip interpreter teardown, which can abort after gloo use (see exit_process)


def run_one_rank(fn, tmp_path: Path, *args):
    """fn(*args) in a fresh spawned process holding a 1-rank gloo group (FSDP2 needs one), returning its
    result: the test process never holds a process group, and a gloo teardown abort cannot end pytest."""
    import torch.multiprocessing as mp

    out = tmp_path / "one_rank_result.pt"
    mp.spawn(_one_rank_worker, args=(fn, args, str(tmp_path / "init"), str(out)), nprocs=1, join=True)
    return torch.load(out, weights_only=False)
