"""Fault injection for vitq's own tests: read from ``VITQ_FAULTS``, never from the user's config.

``VITQ_FAULTS="nan@0;sleep=120@*;kill_after_finish@1"``: entries ``NAME[=VALUE]@TRIALS`` separated by ``;``,
TRIALS being ``*`` or comma-separated trial numbers. Names: ``nan`` (evaluate NaN images), ``sleep`` (seconds
before evaluating), ``kill_before_run`` / ``kill_in_trial`` / ``kill_after_finish`` (SIGKILL the process before
the MLflow run opens, inside it, or after it is FINISHED and before the sweeper records the trial),
``kill_before_enqueue@*`` (the sweeper dies after opening the study, before enqueueing its baselines), and
``meet=DIR`` (inside the run, wait up to a minute until a trial of another process has also reached this point:
the launcher's parallelism made observable).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

__all__ = ["ENV", "fault", "maybe_kill", "maybe_meet"]

ENV = "VITQ_FAULTS"


def fault(name: str, number: int | None) -> str | None:
    """The value of fault ``name`` for trial ``number`` ('' when it has none), or None when it is not set."""
    for entry in os.environ.get(ENV, "").split(";"):
        spec, _, trials = entry.strip().partition("@")
        key, _, value = spec.partition("=")
        if key != name:
            continue
        if trials.strip() == "*" or (number is not None and str(number) in {t.strip() for t in trials.split(",")}):
            return value
    return None


def maybe_kill(step: str, number: int | None) -> None:
    """SIGKILL this process when ``kill_<step>`` is set for this trial."""
    if fault(f"kill_{step}", number) is not None:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_meet(number: int | None, timeout: float = 60.0) -> None:
    """With ``meet=DIR`` set for this trial: mark DIR with this process's id, then wait until another process has
    marked it too (or ``timeout`` seconds have passed)."""
    folder = fault("meet", number)
    if folder is None:
        return
    here = Path(folder)
    here.mkdir(parents=True, exist_ok=True)
    (here / str(os.getpid())).touch()
    end = time.monotonic() + timeout
    while time.monotonic() < end and not any(p.name != str(os.getpid()) for p in here.iterdir()):
        time.sleep(0.05)
