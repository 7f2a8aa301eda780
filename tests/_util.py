"""Helpers shared by the end-to-end tests: run the sweep CLI, pick a free port, run an MLflow server."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TRIAL_LINE = re.compile(r"\[vitq\]\[INFO\] - trial( \d+)?: top-1 ")  # a trial's line in Hydra's job log format
STARTED: list[int] = []  # process-group ids of every process the suite starts (checked at the session's end)


def spawn(args: list[str], cwd: Path, env: dict | None = None, **kw) -> subprocess.Popen:  # noqa: ANN003
    """A child in its own process group, recorded so that the session can prove it did not outlive the suite."""
    full = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # mlflow.set_tracking_uri in this
    full.update(PYTHONUNBUFFERED="1", **(env or {}))  # process exports it: a child would log to the last test's store
    proc = subprocess.Popen(args, cwd=cwd, env=full, start_new_session=True, **kw)
    STARTED.append(proc.pid)
    return proc


def trial_lines(text: str) -> list[str]:
    """The one line each trial logs (stdout of a sweep, or its ``sweep.log``)."""
    return [ln for ln in text.splitlines() if TRIAL_LINE.search(ln)]


def run(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command to its end (text output captured); on timeout or interruption its whole group is killed."""
    proc = spawn(args, cwd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop_group(proc)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def run_sweep(cwd: Path, *args: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "vitq.sweep", *args], cwd, env, timeout)


def run_many(commands: list[list[str]], cwds: list[Path], timeout: int = 300, workers: int = 2,
             envs: list[dict | None] | None = None) -> list[subprocess.CompletedProcess]:
    """:func:`run` of independent commands (each with its ``envs`` entry), ``workers`` at a time (the bad-input
    tests: each case is a process that mostly imports and fails); results in the commands' order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda args, cwd, env: run(args, cwd, env, timeout), commands, cwds,
                             envs or [None] * len(commands)))


def run_sweeps(root: Path, cases: list[tuple[str, ...]], timeout: int = 300,
               workers: int = 2) -> list[tuple[Path, subprocess.CompletedProcess]]:
    """:func:`run_many` of ``python -m vitq.sweep`` with independent argument lists, each in a folder of its own under
    ``root``; (folder, result) in the cases' order."""
    folders = [root / f"case{i}" for i in range(len(cases))]
    for cwd in folders:
        cwd.mkdir()
    results = run_many([[sys.executable, "-m", "vitq.sweep", *args] for args in cases], folders, timeout, workers)
    return list(zip(folders, results, strict=True))


def alive_groups() -> list[int]:
    """Recorded process groups that still have a member."""
    out = []
    for pgid in STARTED:
        try:
            os.killpg(pgid, 0)
            out.append(pgid)
        except (ProcessLookupError, PermissionError):
            pass
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group we started (then SIGKILL if it lingers) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError):  # children of the group that outlived the leader
        os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def mlflow_server(tmp: Path, backend_uri: str | None = None) -> Iterator[str]:
    """An ``mlflow server`` on 127.0.0.1 at a free port (one worker, no job execution); yields its URL."""
    port = free_port()
    backend = backend_uri or f"sqlite:///{tmp / 'server.db'}"
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp / "mlflow_server.log", "w")  # noqa: SIM115 - closed below
    proc = spawn([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                  "--artifacts-destination", str(tmp / "server_artifacts"), "--host", "127.0.0.1",
                  "--port", str(port), "--workers", "1"], tmp, env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(tmp / 'mlflow_server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(proc)
        log.close()
