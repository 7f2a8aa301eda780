"""Where vitq's output goes: library warnings filtered once, here; Optuna's log through Python logging (so Hydra's
job logging and ``sweep.log`` get it); progress bars only on a terminal."""

from __future__ import annotations

import logging
import sys
import warnings

__all__ = ["progress_enabled", "quiet_libraries"]

_QUIET = False


def quiet_libraries() -> None:
    """Once per process: drop the warnings Optuna and MLflow repeat on every call vitq makes by design (its
    heartbeat and experimental storage APIs, ask/tell outside ``Study.optimize``) and tqdm's notebook-widget
    warning (the report notebook calls this first), send Optuna's log records
    through the root logger, and route any other warning to logging (once per place, as Python does)."""
    global _QUIET
    if _QUIET:
        return
    # tqdm.auto in a notebook kernel without ipywidgets: a warning per import; vitq's bars are plain tqdm
    warnings.filterwarnings("ignore", message="IProgress not found")
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", message=".*Hint: Inferred schema contains integer column.*")
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.captureWarnings(True)
    _QUIET = True


def progress_enabled() -> bool:
    """Progress bars (tqdm) only when stderr is a terminal."""
    return sys.stderr.isatty()
