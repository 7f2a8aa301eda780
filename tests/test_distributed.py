"""Many workers on one study over PostgreSQL (127.0.0.1:5432, database ``test``): totals, heartbeats, errors.

Each test uses its own study name (and MLflow database) and removes them afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
import sqlalchemy
from _util import free_port, mlflow_server, run_sweep, spawn, stop_group
from mlflow.tracking import MlflowClient

from vitq.search.space import load_search

pytestmark = pytest.mark.slow
PG = os.environ.get("VITQ_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
COMPLETE, RUNNING, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                           optuna.trial.TrialState.FAIL)


def _sweep_args(study: str, n_trials: int, tracking_uri: str, *extra: str) -> list[str]:
    return ["-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.search=mixed_precision",
            f"hydra.sweeper.study_name={study}", f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweeper.storage={PG}",
            "hydra.sweeper.poll_interval=0.5", f"tracking.uri={tracking_uri}", *extra]


@pytest.fixture
def workers():
    """Start sweep workers; every one's process group is killed at teardown, also when the test fails."""
    started: list[subprocess.Popen] = []

    def start(cwd: Path, args: list[str], env: dict | None = None) -> subprocess.Popen:
        cwd.mkdir(parents=True, exist_ok=True)
        proc = spawn([sys.executable, "-m", "vitq.sweep", *args], cwd, env, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        stop_group(proc)


@pytest.fixture
def study_name(pg_database):  # pg_database: skipped, with the reason, when no PostgreSQL server answers
    name = f"vitq_test_{uuid.uuid4().hex[:10]}"
    optuna.storages.RDBStorage(PG)  # tables exist before workers race to create them
    yield name
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=PG)


@pytest.fixture
def mlflow_db(pg_database):
    """A fresh PostgreSQL database for an MLflow backend store, dropped afterwards."""
    return pg_database()


def test_three_workers_share_one_study(tmp_path, study_name, mlflow_db, workers):
    with mlflow_server(tmp_path, backend_uri=mlflow_db) as url:
        procs = [workers(tmp_path / f"w{i}", _sweep_args(study_name, 9, url)) for i in range(3)]
        outs = [w.communicate(timeout=900)[0] for w in procs]
        assert all(w.returncode == 0 for w in procs), "\n".join(o[-2000:] for o in outs)
        study = optuna.load_study(study_name=study_name, storage=PG)
        done = study.get_trials(states=(COMPLETE,))
        assert len(done) == 9
        assert not study.get_trials(states=(RUNNING,))
        assert len({t.number for t in done}) == 9
        assert len({tuple(sorted(t.params.items())) for t in done}) == 9  # nothing sampled twice by a race
        assert len({t.system_attrs["vitq:worker"] for t in done}) >= 2  # the work was shared
        mlflow.set_tracking_uri(url)
        exp = MlflowClient().get_experiment_by_name(study_name)
        runs = mlflow.search_runs([exp.experiment_id], max_results=1000)
        parents = runs[runs["tags.vitq.role"] == "parent"]
        assert len(parents) == 1
        children = runs[runs["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]]
        finished = children[children["status"] == "FINISHED"]
        assert sorted(finished["tags.trial_number"].astype(int)) == sorted(t.number for t in done)


def test_killed_worker_trial_is_failed_after_grace_and_retried(tmp_path, study_name, workers):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    beat = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=4", "hydra.sweeper.reap_local=false"]
    a = workers(tmp_path / "a", _sweep_args(study_name, 4, uri, *beat, "hydra.sweeper.enqueue_baselines=false"),
                env={"VITQ_FAULTS": "sleep=120@*"})
    deadline = time.time() + 180
    running = []
    while not running:
        assert a.poll() is None and time.time() < deadline, a.communicate()[0][-3000:] if a.poll() else "timeout"
        with contextlib.suppress(KeyError):
            running = optuna.load_study(study_name=study_name, storage=PG).get_trials(states=(RUNNING,))
        time.sleep(0.5)
    killed = running[0].number
    mlflow.set_tracking_uri(uri)
    while True:  # wait until the trial is inside its body: its MLflow run is open
        assert a.poll() is None and time.time() < deadline, "worker A ended or never opened its run"
        exp = MlflowClient().get_experiment_by_name(study_name)
        if exp is not None and len(mlflow.search_runs([exp.experiment_id],
                                                      f"tags.trial_number = '{killed}' and status = 'RUNNING'")):
            break
        time.sleep(0.5)
    os.killpg(a.pid, signal.SIGKILL)
    a.wait(30)
    b = run_sweep(tmp_path / "a", *_sweep_args(study_name, 4, uri, *beat, "hydra.sweeper.enqueue_baselines=false"),
                  timeout=300)
    assert b.returncode == 0, b.stderr[-3000:]
    study = optuna.load_study(study_name=study_name, storage=PG)
    assert len(study.get_trials(states=(COMPLETE,))) == 4
    assert not study.get_trials(states=(RUNNING,))
    dead = study.trials[killed]
    assert dead.state == FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert retried and retried[0].state == COMPLETE and retried[0].params == dead.params
    with sqlalchemy.create_engine(PG).connect() as c:  # it waited out the grace period after the last beat
        last_beat = c.execute(sqlalchemy.text(
            "SELECT h.heartbeat FROM trial_heartbeats h JOIN trials t ON t.trial_id = h.trial_id "
            "JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = :s AND t.number = :n"),
            {"s": study_name, "n": killed}).scalar()
    assert last_beat is not None and (dead.datetime_complete - last_beat).total_seconds() >= 4
    runs = mlflow.search_runs([MlflowClient().get_experiment_by_name(study_name).experiment_id], max_results=100)
    mine = runs[runs["tags.trial_number"] == str(killed)]
    assert len(mine) == 1 and mine["status"].iloc[0] in ("KILLED", "FAILED")


def test_unreachable_postgres_gives_one_clear_error(tmp_path):
    port = free_port()
    url = f"postgresql://vitq:s3cret@127.0.0.1:{port}/test"
    t0 = time.time()
    r = run_sweep(tmp_path, "-m", "hydra/sweeper=vitq_optuna", f"hydra.sweeper.storage={url}",
                  "hydra.sweeper.n_trials=2", "tracking.enabled=false", timeout=120)
    assert r.returncode == 2 and time.time() - t0 < 60
    assert f"postgresql://vitq:***@127.0.0.1:{port}/test" in r.stderr
    assert "s3cret" not in r.stderr + r.stdout and "Traceback" not in r.stderr
    assert "Connection refused" in r.stderr or "connection" in r.stderr.lower()


def test_joblib_launcher_runs_trials_in_parallel(tmp_path):
    r = run_sweep(tmp_path, "-m", "hydra/sweeper=vitq_optuna", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                  "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=4", "hydra.sweeper.study_name=par",
                  env={"VITQ_FAULTS": f"meet={tmp_path / 'meet'}@*"})  # a trial waits until another process runs one
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="par", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.get_trials(states=(COMPLETE,))) == 4
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs([MlflowClient().get_experiment_by_name("par").experiment_id], max_results=100)
    parents = runs[runs["tags.vitq.role"] == "parent"]
    children = runs[runs["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]]
    assert len(parents) == 1 and len(children) == 4 and (children["status"] == "FINISHED").all()
    assert len({t.system_attrs["vitq:worker"] for t in study.trials}) == 1  # one sweeper process asked for them
    procs = children["tags.vitq.process"]
    assert procs.nunique() == 2  # joblib ran them in two worker processes...
    spans = list(zip(procs, children["start_time"], children["end_time"], strict=True))
    assert any(p != q and s1 < e2 and s2 < e1 for p, s1, e1 in spans for q, s2, e2 in spans)  # ...at the same time


def _cold_start(tmp_path: Path, workers, storage, rounds: int, tracking=None) -> None:  # noqa: ANN001
    """``rounds`` times: 3 workers started at once on an empty folder (and an empty study; with ``tracking``, a new
    MLflow store database of its own) all succeed, the study ends with exactly n_trials COMPLETE, each baseline runs
    exactly once, and one parent run holds the trials."""
    spec = load_search("bits_only")
    for k in range(rounds):
        cwd = tmp_path / f"round{k}"
        study = f"cold_{k}_{uuid.uuid4().hex[:6]}"
        store = tracking() if tracking else f"sqlite:///{cwd / 'mlflow.db'}"
        args = ["-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.search=bits_only", "hydra.sweeper.n_trials=5",
                f"hydra.sweeper.study_name={study}", f"hydra.sweeper.storage={storage(cwd)}",
                "hydra.sweeper.poll_interval=0.5", f"tracking.uri={store}"]
        procs = [workers(cwd, args) for _ in range(3)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        failing = "\n---\n".join(o[-4000:] for p, o in zip(procs, outs, strict=True) if p.returncode)
        assert [p.returncode for p in procs] == [0, 0, 0], failing
        s = optuna.load_study(study_name=study, storage=storage(cwd))
        done = s.get_trials(states=(COMPLETE,))
        assert len(done) == 5 and not s.get_trials(states=(RUNNING,))
        labels = [t.system_attrs.get("fixed_params", {}).get("baseline") for t in s.trials]
        assert sorted(x for x in labels if x) == sorted(f"W{b[1]}A{b[3]}" for b in spec.baselines)  # once each
        mlflow.set_tracking_uri(store)
        runs = mlflow.search_runs([MlflowClient().get_experiment_by_name(study).experiment_id], max_results=100)
        assert (runs["tags.vitq.role"] == "parent").sum() == 1 and "RUNNING" not in set(runs["status"])
        assert sorted(runs["status"]) == ["FINISHED"] * 6


def _check_each(root: Path, barrier, n: int) -> None:  # noqa: ANN001
    from vitq.paths import check_creatable

    for i in range(n):
        barrier.wait()
        check_creatable(root / str(i) / "multirun" / "day" / "time", "hydra.sweep.dir")


def test_output_folder_check_removes_no_folder_another_worker_makes(tmp_path):
    """The sweep folder's check, run by one worker while another creates that folder (as Hydra does, ``mkdir`` with
    its parents), each time at once: the other's ``mkdir`` never fails and its folders stay (the check removed the
    parents it had found missing: 134 of 1500 such ``mkdir`` failed, ENOENT, the cold start's rc 2), and the check
    leaves nothing of its own."""
    import multiprocessing

    n = 300
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    checker = ctx.Process(target=_check_each, args=(tmp_path, barrier, n))
    checker.start()
    failed = []
    try:
        for i in range(n):
            barrier.wait(timeout=60)
            try:
                (tmp_path / str(i) / "multirun" / "day" / "time").mkdir(parents=True, exist_ok=True)
            except OSError as e:
                failed.append(f"{i}: {e}")
    finally:
        checker.join(timeout=60)
        if checker.is_alive():
            checker.kill()
    assert checker.exitcode == 0 and failed == []
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == sorted(
        f"{i}{sub}" for i in range(n) for sub in ("", "/multirun", "/multirun/day", "/multirun/day/time"))


def test_three_workers_cold_start_sqlite(tmp_path, workers):
    _cold_start(tmp_path, workers, lambda cwd: f"sqlite:///{cwd / 'optuna.db'}", rounds=1)


def test_three_workers_cold_start_postgres(tmp_path, workers, pg_database):
    """MLflow's store on the database itself: two of three workers died on its schema migration (rc 2,
    ``UniqueViolation``) before the store lock."""
    url = pg_database()
    _cold_start(tmp_path, workers, lambda cwd: url, rounds=1, tracking=lambda: pg_database("postgresql+psycopg"))


def test_three_workers_cold_start_mysql(tmp_path, workers, mysql_database):
    """Unserialized before: in 2 of 3 rounds the workers enqueued baselines two or three times (7 trials, 2 left
    WAITING), and on a new MLflow store two of three died on its schema migration ('Duplicate column name')."""
    url = mysql_database()
    _cold_start(tmp_path, workers, lambda cwd: url, rounds=2, tracking=mysql_database)


def test_sqlite_stores_commit_with_synchronous_normal(tmp_path):
    """vitq's SQLite stores (MLflow's and Optuna's) are in WAL mode, and every connection SQLAlchemy opens to them
    in the process commits with synchronous=NORMAL (no fsync per commit); another SQLite file keeps SQLite's
    defaults. A killed process loses nothing it committed (the resume tests kill -9 workers mid-sweep)."""
    from vitq import tracking
    from vitq.search.storage import make_storage

    def pragmas(engine: sqlalchemy.Engine) -> tuple[str, int]:
        with engine.connect() as c:
            return c.exec_driver_sql("PRAGMA journal_mode").scalar(), c.exec_driver_sql("PRAGMA synchronous").scalar()

    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        tracking.use_store(uri, "sync")
        storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
        assert pragmas(sqlalchemy.create_engine(uri)) == ("wal", 1)  # any engine on the store, MLflow's among them
        assert pragmas(storage.engine) == ("wal", 1)
        assert pragmas(sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'other.db'}")) == ("delete", 2)
    finally:
        mlflow.set_tracking_uri(previous)


def test_over_budget_rereads_the_study_unless_no_other_worker_can_have_asked():
    """The budget check after ``ask``: a new trial right after those read (none waiting) fits; a trial asked after
    another worker's, or while a waiting trial could be popped by another worker, is counted against the budget."""
    from vitq.search.sweeper import over_budget

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def read(study: optuna.Study) -> list:
        return [t.state for t in study.get_trials(deepcopy=False)]

    study = optuna.create_study()  # budget 3, one COMPLETE: room for two
    study.tell(study.ask(), 1.0)
    states = read(study)
    mine = [study.ask(), study.ask()]
    assert [over_budget(study, t, states, i, 3) for i, t in enumerate(mine)] == [False, False]

    study = optuna.create_study()  # budget 2, one COMPLETE; another worker asks between the read and ours
    study.tell(study.ask(), 1.0)
    states = read(study)
    study.ask()
    mine = study.ask()
    assert mine.number == 2
    assert over_budget(study, mine, states, 0, 2)
    assert not over_budget(study, mine, states, 0, 3)

    study = optuna.create_study()  # budget 2, one COMPLETE, one WAITING that another worker pops first
    study.tell(study.ask(), 1.0)
    study.enqueue_trial({})
    states = read(study)
    assert optuna.trial.TrialState.WAITING in states
    assert study.ask().number == 1  # the other worker's
    mine = study.ask()  # numbered right after those read, yet past the budget
    assert mine.number == len(states)
    assert over_budget(study, mine, states, 0, 2)
