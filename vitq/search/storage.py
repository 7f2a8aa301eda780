"""The Optuna storage of a study: opening it from a URL (RDB with heartbeats and retries of dead workers' trials, or a
journal file), serializing workers on it, heartbeats while trials run. Optuna's public storage API only."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback

from vitq.db import MYSQL_DIALECTS, database_lock, sqlite_file, sqlite_wal
from vitq.paths import file_lock
from vitq.redact import redact

__all__ = ["STORAGE_ENV", "StorageError", "heartbeat", "is_journal", "make_storage", "process_alive", "retry_callback",
           "storage_lock"]

log = logging.getLogger(__name__)
STORAGE_ENV = "VITQ_STORAGE"  # the storage URL from the environment: it never reaches Hydra's files


class StorageError(RuntimeError):
    """The Optuna storage cannot be opened (server down, bad URL); the message names the redacted URL."""


DATABASES = ("sqlite", "postgresql", *MYSQL_DIALECTS)  # the SQL databases whose workers vitq serializes


def is_journal(url: str) -> bool:
    """Whether ``url`` names Optuna's journal file (``journal:///path``, or a plain path without a scheme)."""
    return url.startswith("journal:") or "://" not in url


def make_storage(url: str, heartbeat_interval: int | None = 30, grace_period: int | None = None,
                 max_retry: int | None = 3, on_stale: Any = None) -> BaseStorage:
    """An Optuna storage for ``url``: RDB with heartbeat and retry of stale trials, or a journal file.

    A journal file is chosen only by ``journal:///path`` (or ``journal://relative/path``) or by a plain path
    without a scheme; anything else is parsed by SQLAlchemy's ``make_url`` (a bad URL is a StorageError).
    """
    from sqlalchemy.engine import make_url

    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal://").removeprefix("journal:")).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise StorageError(f"hydra.sweeper.storage: cannot open the journal file {path}: {e.strerror}") from None
    try:
        backend = make_url(url).get_backend_name()
    except Exception as e:  # noqa: BLE001 - sqlalchemy.exc.ArgumentError and friends
        raise StorageError(f"hydra.sweeper.storage: {redact(url)} is not a database URL ({type(e).__name__}); use "
                           "dialect+driver://user:password@host:port/db, sqlite:///path or journal:///path") from None
    if backend not in DATABASES:
        raise StorageError(f"hydra.sweeper.storage: {backend} databases are not supported: vitq serializes a study's "
                           "workers on SQLite, PostgreSQL and MySQL/MariaDB (or a journal:/// file)")
    try:
        sqlite_file(url)  # a SQLite storage's folder must exist
    except OSError as e:
        raise StorageError(f"hydra.sweeper.storage: cannot create the folder of {redact(url)}: "
                           f"{e.strerror or e}") from None
    retry = retry_callback(max_retry)

    def stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        retry(study, trial)
        if on_stale is not None:
            on_stale(trial)

    engine = {"pool_pre_ping": True} if not url.startswith("sqlite") else {}
    if backend != "sqlite":
        engine["connect_args"] = {"connect_timeout": 10}
    try:
        for attempt in range(3):  # workers creating one new database's tables together may collide: try again
            try:
                with storage_lock(url):
                    sqlite_wal(url)
                    return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_interval,
                                      grace_period=grace_period,
                                      heartbeat_stale_trial_callback=stale if heartbeat_interval else None)
            except Exception as e:  # noqa: BLE001
                if attempt == 2 or "connect" in str(e).lower():
                    raise
                time.sleep(0.5 + random.random())
        raise AssertionError("unreachable")
    except ImportError as e:  # the database driver is an extra
        extra = {"postgresql": " (pip install 'vitq[postgres]')", "mysql": " (pip install 'vitq[mysql]')",
                 "mariadb": " (pip install 'vitq[mysql]')"}.get(backend, "")
        raise StorageError(f"cannot open the Optuna storage {redact(url)}: its driver is not installed: "
                           f"{e.name or e}{extra}") from None
    except Exception as e:  # noqa: BLE001 - any driver/SQLAlchemy error becomes one clear message
        cause = e.__cause__ if isinstance(e, ImportError) and e.__cause__ else getattr(e, "orig", None) or e
        reason = f"{type(cause).__name__}: {cause}".strip().splitlines()
        raise StorageError(f"cannot open the Optuna storage {redact(url)}: "
                           f"{reason[0] if reason else type(e).__name__}") from None


@contextmanager
def storage_lock(url: str, storage: BaseStorage | None = None) -> Iterator[None]:
    """Serialize workers on one storage: a file lock beside a SQLite database or a journal file; with ``storage``
    given, a PostgreSQL advisory lock or a MySQL/MariaDB named lock (``GET_LOCK``) on that database (without it, a
    server database runs the body unlocked: opening the storage, which retries instead)."""
    if url.startswith("journal:") or "://" not in url:
        with file_lock(Path(url.removeprefix("journal://").removeprefix("journal:")).expanduser().with_suffix(".lock")):
            yield
        return
    if (path := sqlite_file(url)) is not None:
        with file_lock(path.with_name(path.name + ".lock")):
            yield
        return
    engine = getattr(storage, "engine", None)
    if engine is None:
        yield
        return
    with database_lock(engine, "vitq-study-setup"):  # (make_storage refuses the dialects it cannot lock)
        yield


def retry_callback(max_retry: int | None) -> RetryHeartbeatStaleTrialCallback:
    """Optuna's retry of a dead worker's trial: a WAITING copy with the same params (``failed_trial`` attr)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def heartbeat(storage: RDBStorage | None, trial_ids: list[int], interval: int | None) -> Iterator[None]:
    """Record heartbeats of ``trial_ids`` every ``interval`` seconds while the body runs, the first one
    ``interval`` seconds in (the sweeper records one when it takes a trial)."""
    if not interval or storage is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            for tid in trial_ids:
                try:
                    storage.record_heartbeat(tid)
                except Exception as e:  # noqa: BLE001 - a lost beat is retried; the trial must go on
                    log.warning("heartbeat of trial id %d failed: %s", tid, e)

    thread = threading.Thread(target=beat, name="vitq-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
