"""Shared fixtures: a temporary cache root, the digits reference trained once before any test, PostgreSQL and
MySQL/MariaDB databases made per test, and the guarantee that no process the suite starts outlives it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "conf" / "quant"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads in tests: fail at once instead of timing out

# A cache root of this session (VITQ_TEST_CACHE reuses one across sessions, e.g. to keep the trained reference);
# subprocesses inherit it through the environment, and so do pytest-xdist's workers: the process that starts them
# makes it (and removes it at the end), so that the reference is trained once.
_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if _WORKER:  # two workers on two cores: one torch thread each (and in the processes they start), not two each
    os.environ["OMP_NUM_THREADS"] = "1"
_OWN_CACHE = not os.environ.get("VITQ_TEST_CACHE") and not _WORKER
if not _WORKER:
    os.environ["VITQ_CACHE"] = os.environ.get("VITQ_TEST_CACHE") or tempfile.mkdtemp(prefix="vitq-test-cache-")


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")  # pytest then runs every finalizer (stopping the processes tests started)


def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGTERM, _sigterm)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Train the digits reference (or read it from the cache) before any test, in the process that starts the
    workers and with its torch threads: a reference trained on one thread has other weights."""
    if not _WORKER:
        from vitq.reference import load_reference

        load_reference()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session if a process a test started is still alive (then end it)."""
    from _util import alive_groups

    left = alive_groups()
    for pgid in left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    if left:
        print(f"\nprocess groups started by tests outlived them: {left}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if _OWN_CACHE:
        shutil.rmtree(os.environ["VITQ_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def reference():
    """The digits reference, trained (or read from the cache) once, before the first test and any subprocess."""
    from vitq.reference import load_reference

    return load_reference()


@pytest.fixture(scope="session")
def digits():
    from vitq.data import load_digits

    return load_digits()


@pytest.fixture(scope="session")
def byo(tmp_path_factory):
    """The bring-your-own case (tests/byo_case.py): a small non-default timm ViT, its timm-style EMA checkpoint
    and grayscale PNG folders calib/ and eval/, built once per test session."""
    import byo_case

    return byo_case.build(tmp_path_factory.mktemp("byo"))


PG_URL = os.environ.get("VITQ_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("VITQ_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def _databases(server: str, url: str, quote: str, drop_suffix: str = ""):  # noqa: ANN202
    """Yield a factory of throwaway databases on the test server at ``url`` (dropped afterwards); skip the test,
    with the reason, when no server answers. The factory takes the URL's scheme (a driver) and returns the URL."""
    import uuid

    import sqlalchemy

    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        admin.connect().close()
    except sqlalchemy.exc.OperationalError as e:
        pytest.skip(f"no {server} server at {url}: {str(e.orig).splitlines()[0]}")
    made: list[str] = []
    scheme, rest = url.split("://", 1)

    def make(driver: str = scheme) -> str:
        name = f"vitq_test_{uuid.uuid4().hex[:10]}"
        with admin.connect() as c:
            c.execute(sqlalchemy.text(f"CREATE DATABASE {quote}{name}{quote}"))
        made.append(name)
        return f"{driver}://{rest.rsplit('/', 1)[0]}/{name}"

    yield make
    with admin.connect() as c:
        for name in made:
            c.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {quote}{name}{quote}{drop_suffix}"))
    admin.dispose()


@pytest.fixture
def pg_database():
    """Throwaway PostgreSQL databases (``VITQ_TEST_PG_URL``): ``pg_database("postgresql+psycopg")`` is a URL."""
    yield from _databases("PostgreSQL", PG_URL, '"', " WITH (FORCE)")


@pytest.fixture
def mysql_database():
    """Throwaway MySQL/MariaDB databases (``VITQ_TEST_MYSQL_URL``)."""
    yield from _databases("MySQL/MariaDB", MYSQL_URL, "`")
