"""Where vitq's output goes: library warnings filtered once, here; Optuna's log through Python logging (so Hydra's
job logging and ``sweep.log`` get it); progress bars only on a terminal."""

from __future__ import annotations

import logging
import sys
import warnings

__all__ = ["progress_enabled", "quiet_libraries"]

_QUIET: set[str] = set()


def quiet_libraries() -> None:
    """Drop the warnings Optuna and MLflow repeat on every call vitq makes by design (its heartbeat and
    experimental storage APIs, ask/tell outside ``Study.optimize``) and tqdm's notebook-widget warning (the report
    notebook calls this first); route any other warning to logging (once per place, as Python does); once Optuna
    is loaded, send its log records through the root logger. Imports nothing heavy: a trial that fails on its
    inputs stays fast."""
    if "warnings" not in _QUIET:
        warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto in a kernel without widgets
        warnings.filterwarnings("ignore", message=r".*is an experimental feature")
        warnings.filterwarnings("ignore", message=r".* is experimental \(supported from")
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        warnings.filterwarnings("ignore", message=".*Hint: Inferred schema contains integer column.*")
        logging.captureWarnings(True)
        _QUIET.add("warnings")
    optuna = sys.modules.get("optuna")
    if optuna is not None and "optuna" not in _QUIET:
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        _QUIET.add("optuna")


def progress_enabled() -> bool:
    """Progress bars (tqdm) only when stderr is a terminal."""
    return sys.stderr.isatty()
