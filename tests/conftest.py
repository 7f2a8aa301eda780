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
# subprocesses inherit it through the environment.
_OWN_CACHE = not os.environ.get("VITQ_TEST_CACHE")
os.environ["VITQ_CACHE"] = os.environ.get("VITQ_TEST_CACHE") or tempfile.mkdtemp(prefix="vitq-test-cache-")


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")  # pytest then runs every finalizer (stopping the processes tests started)


def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGTERM, _sigterm)


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


@pytest.fixture
def pg_database():
    """A factory of throwaway PostgreSQL databases on the test server (dropped afterwards); the test is skipped,
    with the reason, when no server answers at ``VITQ_TEST_PG_URL``."""
    import uuid

    import sqlalchemy

    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        admin.connect().close()
    except sqlalchemy.exc.OperationalError as e:
        pytest.skip(f"no PostgreSQL server at {PG_URL}: {str(e.orig).splitlines()[0]}")
    made: list[str] = []

    def make(driver: str = "postgresql") -> str:
        name = f"vitq_test_{uuid.uuid4().hex[:10]}"
        with admin.connect() as c:
            c.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return driver + PG_URL.split("postgresql", 1)[1].rsplit("/", 1)[0] + f"/{name}"

    yield make
    with admin.connect() as c:
        for name in made:
            c.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


MYSQL_URL = os.environ.get("VITQ_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


@pytest.fixture
def mysql_database():
    """A factory of throwaway MySQL/MariaDB databases on the test server (dropped afterwards); the test is skipped,
    with the reason, when no server answers at ``VITQ_TEST_MYSQL_URL``."""
    import uuid

    import sqlalchemy

    admin = sqlalchemy.create_engine(MYSQL_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        admin.connect().close()
    except sqlalchemy.exc.OperationalError as e:
        pytest.skip(f"no MySQL/MariaDB server at {MYSQL_URL}: {str(e.orig).splitlines()[0]}")
    made: list[str] = []

    def make() -> str:
        name = f"vitq_test_{uuid.uuid4().hex[:10]}"
        with admin.connect() as c:
            c.execute(sqlalchemy.text(f"CREATE DATABASE `{name}`"))
        made.append(name)
        return MYSQL_URL.rsplit("/", 1)[0] + f"/{name}"

    yield make
    with admin.connect() as c:
        for name in made:
            c.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS `{name}`"))
    admin.dispose()
