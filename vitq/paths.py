"""Every path vitq computes: the configs, search files and notebook (at a checkout's top, or inside the installed
package), and the cache root.

The cache root is ``$VITQ_CACHE`` (default ``~/.cache/vitq``). When it cannot be written, a per-user folder in
the system's temp dir is used instead, with one warning.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["CONF_DIR", "NOTEBOOK", "PRESETS_DIR", "REPO_ROOT", "SWEEPS_DIR", "FolderError", "cache_root",
           "check_creatable", "file_lock", "output_folder"]

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
# a checkout keeps conf/, sweeps/ and notebooks/ at its top; an installed wheel carries them inside the package
_DATA = REPO_ROOT if (REPO_ROOT / "conf" / "config.yaml").is_file() else Path(__file__).resolve().parent
CONF_DIR = _DATA / "conf"
PRESETS_DIR = CONF_DIR / "quant"
SWEEPS_DIR = _DATA / "sweeps"
NOTEBOOK = _DATA / "notebooks" / "pareto_analysis.ipynb"


@functools.cache
def _writable_root(wanted: str) -> Path:
    root = Path(wanted).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe", delete=True)  # noqa: SIM115
        probe.close()
        return root
    except OSError as e:
        fallback = Path(tempfile.gettempdir()) / f"vitq-cache-{os.getuid()}"
        fallback.mkdir(parents=True, exist_ok=True)
        log.warning("cache folder %s is not writable (%s); using %s (set VITQ_CACHE to choose another)", root,
                    e.strerror or e, fallback)
        return fallback


class FolderError(ValueError):
    """A folder to write results into that cannot be created or written; ``detail`` is the reason, without the key."""

    def __init__(self, key: str, detail: str) -> None:
        self.key, self.detail = key, detail
        super().__init__(f"{key}: {detail}")


def output_folder(folder: str | Path, key: str) -> Path:
    """``folder`` (``~`` expanded), created with its parents; a FolderError naming ``key`` when it cannot be created or
    written, before the work that would fill it."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FolderError(key, f"cannot create {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise FolderError(key, f"{path} is not writable")
    return path


def check_creatable(folder: str | Path, key: str) -> None:
    """A FolderError naming ``key`` when ``folder`` could not be created or written, found without creating it: its
    missing part is made, and removed, inside a private probe folder in its deepest existing ancestor. So workers of
    one sweep, started together, never remove a folder that another is creating (which failed that one's ``mkdir``)."""
    path = Path(folder).expanduser().absolute()
    base = path
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent
    missing = path.relative_to(base)
    try:
        probe = Path(tempfile.mkdtemp(prefix=".vitq-probe-", dir=base))
        try:
            (probe / missing).mkdir(parents=True, exist_ok=True)
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    except OSError as e:
        raise FolderError(key, f"cannot create {path}: {e.strerror or e}") from None


def cache_root(sub: str = "") -> Path:
    """``$VITQ_CACHE/sub`` (created), or a temp-dir fallback when the cache cannot be written."""
    path = _writable_root(os.environ.get("VITQ_CACHE", "~/.cache/vitq")) / sub
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created) for the body: processes starting together take turns."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def grid_failures_dir(sweep_dir: str | Path, token: str) -> Path:
    """Where a Hydra grid's failed jobs leave one line each (``token``: this multirun's own), read at its end."""
    return Path(sweep_dir) / f".vitq_failed-{token}"  # one per multirun: removing it never races another one
