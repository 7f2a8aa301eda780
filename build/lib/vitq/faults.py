"""Fault injection for vitq's own tests: read from ``VITQ_FAULTS``, never from the user's config.

``VITQ_FAULTS="nan@0;sleep=120@*;kill_after_finish@1"``: entries ``NAME[=VALUE]@TRIALS`` separated by ``;``,
TRIALS being ``*`` or comma-separated trial numbers. Names: ``nan`` (evaluate NaN images), ``sleep`` (seconds
before evaluating), ``kill_before_run`` / ``kill_in_trial`` / ``kill_after_finish`` (SIGKILL the process before
the MLflow run opens, inside it, or after it is FINISHED and before the sweeper records the trial), and
``kill_before_enqueue@*`` (the sweeper dies after opening the study, before enqueueing its baselines).
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "fault", "maybe_kill"]

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
