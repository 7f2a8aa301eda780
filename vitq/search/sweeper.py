"""vitq's Optuna sweeper for Hydra: Optuna 5 ask/tell through Hydra's launcher, one study over many workers.

Start the same command in N processes or on N machines with one ``study_name`` and a shared ``storage``
(PostgreSQL/MySQL through SQLAlchemy, SQLite on one machine, or ``journal:///path`` on a shared filesystem):
trials are numbered by the study, ``n_trials`` counts COMPLETE trials of all workers together, and a worker
asks for a trial only while COMPLETE + RUNNING < ``n_trials`` (a trial that races past that is PRUNED at
once). RDB storages run with a heartbeat: a worker killed mid-trial stops beating, and after the grace
period any other worker marks its trial FAIL (its MLflow run KILLED) and Optuna's
``RetryHeartbeatStaleTrialCallback`` enqueues a copy, which the next free worker runs. A restarted worker on the
same host reaps its dead predecessors' trials at once (their process is gone). A trial that raises is
FAIL/FAILED and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import optuna
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback

from vitq import tracking
from vitq.faults import maybe_kill
from vitq.logs import quiet_libraries
from vitq.paths import file_lock
from vitq.quant.config import ConfigError
from vitq.redact import fail, install_log_redaction, redact
from vitq.search.launch import InProcessLauncher
from vitq.search.space import SearchSpec, search_mapping, spec_from_mapping, split_sweep_arguments
from vitq.search.summary import sweep_summary

log = logging.getLogger(__name__)
TrialState = optuna.trial.TrialState
WORKER_ATTR = "vitq:worker"
METRICS_ATTR = "metrics"  # a trial's metrics, one user attr (one storage write)
ENQUEUED_ATTR = "vitq:enqueued"  # the study's warm-start configs and baselines are in
STORAGE_ENV = "VITQ_STORAGE"  # the storage URL from the environment: it never reaches Hydra's files


class StorageError(RuntimeError):
    """The Optuna storage cannot be opened (server down, bad URL); the message names the redacted URL."""


def make_storage(url: str, heartbeat_interval: int | None = 30, grace_period: int | None = None,
                 max_retry: int | None = 3, on_stale: Any = None) -> BaseStorage:
    """An Optuna storage for ``url``: RDB with heartbeat and retry of stale trials, or a journal file.

    A journal file is chosen only by ``journal:///path`` (or ``journal://relative/path``) or by a plain path
    without a scheme; anything else is parsed by SQLAlchemy's ``make_url`` (a bad URL is a StorageError).
    """
    from sqlalchemy.engine import make_url

    if url.startswith("journal:") or "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal://").removeprefix("journal:")).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise StorageError(f"hydra.sweeper.storage: cannot open the journal file {path}: {e.strerror}") from None
    try:
        make_url(url)
    except Exception as e:  # noqa: BLE001 - sqlalchemy.exc.ArgumentError and friends
        raise StorageError(f"hydra.sweeper.storage: {redact(url)} is not a database URL ({type(e).__name__}); use "
                           "dialect+driver://user:password@host:port/db, sqlite:///path or journal:///path") from None
    tracking.sqlite_file(url)  # a SQLite storage's folder must exist
    retry = _retry_callback(max_retry)

    def stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        retry(study, trial)
        if on_stale is not None:
            on_stale(trial)

    engine = {"pool_pre_ping": True} if not url.startswith("sqlite") else {}
    if url.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": 10}
    try:
        for attempt in range(3):  # workers creating one new database's tables together may collide: try again
            try:
                with storage_lock(url):
                    tracking.sqlite_wal(url)
                    return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_interval,
                                      grace_period=grace_period,
                                      heartbeat_stale_trial_callback=stale if heartbeat_interval else None)
            except Exception as e:  # noqa: BLE001
                if attempt == 2 or "connect" in str(e).lower():
                    raise
                time.sleep(0.5 + random.random())
        raise AssertionError("unreachable")
    except ImportError as e:  # the database driver is an extra
        extra = " (pip install 'vitq[postgres]')" if url.startswith("postgresql") else ""
        raise StorageError(f"cannot open the Optuna storage {redact(url)}: its driver is not installed: "
                           f"{e.name or e}{extra}") from None
    except Exception as e:  # noqa: BLE001 - any driver/SQLAlchemy error becomes one clear message
        cause = e.__cause__ if isinstance(e, ImportError) and e.__cause__ else getattr(e, "orig", None) or e
        reason = f"{type(cause).__name__}: {cause}".strip().splitlines()
        raise StorageError(f"cannot open the Optuna storage {redact(url)}: "
                           f"{reason[0] if reason else type(e).__name__}") from None


@contextmanager
def storage_lock(url: str, storage: BaseStorage | None = None) -> Iterator[None]:
    """Serialize workers on one storage: a file lock beside a SQLite database or a journal file, a PostgreSQL
    advisory lock on a PostgreSQL storage (``storage`` given); other databases run the body unlocked."""
    if url.startswith("journal:") or "://" not in url:
        with file_lock(Path(url.removeprefix("journal://").removeprefix("journal:")).expanduser().with_suffix(".lock")):
            yield
        return
    if (path := tracking.sqlite_file(url)) is not None:
        with file_lock(path.with_name(path.name + ".lock")):
            yield
        return
    engine = getattr(storage, "engine", None)
    if engine is None or engine.dialect.name != "postgresql":
        yield
        return
    import sqlalchemy

    key = zlib.crc32(b"vitq-study-setup")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


def hydra_value(v: Any) -> str:
    """``v`` as a value of a Hydra command-line override: booleans lowercase, a string with characters outside
    Hydra's bare-value grammar quoted (quotes and backslashes escaped)."""
    if isinstance(v, bool):
        return str(v).lower()
    s = str(v)
    if isinstance(v, str) and not re.fullmatch(r"[\w.\-+/:@]*", s):
        return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return s


def _retry_callback(max_retry: int | None) -> RetryHeartbeatStaleTrialCallback:
    """Optuna's retry of a dead worker's trial: a WAITING copy with the same params (``failed_trial`` attr)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def heartbeat(storage: RDBStorage | None, trial_ids: list[int], interval: int | None) -> Iterator[None]:
    """Record heartbeats of ``trial_ids`` every ``interval`` seconds while the body runs."""
    if not interval or storage is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for tid in trial_ids:
                try:
                    storage.record_heartbeat(tid)
                except Exception as e:  # noqa: BLE001 - a lost beat is retried; the trial must go on
                    log.warning("heartbeat of trial id %d failed: %s", tid, e)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="vitq-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class VitqOptunaSweeperImpl(Sweeper):
    """Hydra sweeper over a ``sweeps/*.yaml`` search definition (CLI fields override the file's)."""

    def __init__(self, search: str | None = None, n_trials: int | None = None, n_jobs: int | None = None,
                 study_name: str | None = None, storage: str | None = None, sampler: Any = None,
                 seed: int | None = None, params: Any = None, direction: Any = None,
                 custom_search_space: str | None = None, max_failure_rate: float | None = None,
                 enqueue_baselines: bool = True, max_failures: int | None = None,
                 heartbeat_interval: int | None = 30, grace_period: int | None = None, max_retry: int | None = 3,
                 poll_interval: float = 2.0, reap_local: bool = True, warm_start_budgets: list[float] | None = None,
                 warm_start_metric: str = "weight_bytes", warm_start_score: str = "drop_loss",
                 in_process: bool = True) -> None:
        self.search = search
        self.n_trials = n_trials
        self.n_jobs = n_jobs  # checked in _spec: 0 is an error, not 1
        self.study_name = study_name
        self.storage = storage
        self.sampler = sampler
        self.seed = seed
        self.fields = {"params": params, "direction": direction, "custom_search_space": custom_search_space,
                       "max_failure_rate": max_failure_rate}  # the official plugin's fields, over the file's
        self.enqueue_baselines = enqueue_baselines
        self.max_failures = max_failures
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.max_retry = max_retry
        self.poll_interval = poll_interval
        self.reap_local = reap_local
        self.warm_start_budgets = list(warm_start_budgets or [])
        self.warm_start_metric = warm_start_metric
        self.warm_start_score = warm_start_score
        self.in_process = in_process
        self.config: DictConfig | None = None
        self._inproc: InProcessLauncher | None = None
        self._dead: list[int] = []
        self._rdb: RDBStorage | None = None  # trial numbers failed as stale/dead, whose MLflow runs must end KILLED
        self._parent: str | None = None  # this sweep's MLflow parent run
        self._extend: Any = None  # custom_search_space: fn(cfg, trial)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)
        self._task = (hydra_context, task_function)

    def _launch(self, arguments: list[str], jobs: list[dict[str, Any]], job_idx: int) -> Any:
        """Hydra's launcher, or in this process on the pre-composed config where every job only sets values."""
        lines = [[f"{k}={hydra_value(v)}" for k, v in values.items()] for values in jobs]
        if self._inproc is not None and all(self._inproc.accepts(list(values)) for values in jobs):
            return self._inproc.launch(list(zip(lines, jobs, strict=True)), initial_job_idx=job_idx)
        return self.launcher.launch([tuple(arguments) + tuple(ln) for ln in lines], initial_job_idx=job_idx)

    def _spec(self, arguments: list[str]) -> tuple[SearchSpec, list[str]]:
        """The search definition with the sweeper's fields and the command line's sweeps (``key=choice(4,8)``), and
        the other command-line overrides; bad values are ConfigErrors naming the key."""
        from omegaconf import OmegaConf

        cli_params, fixed_args = split_sweep_arguments(arguments)
        fields = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in self.fields.items()}
        search = self.search or (None if cli_params or fields["params"] else "mixed_precision")
        path, raw = search_mapping(search) if search else (Path("hydra.sweeper"), {})
        raw = dict(raw)
        for k, v in fields.items():
            if v is not None:
                raw[k] = {**(raw.get("params") or {}), **v} if k == "params" else v
        if self.sampler is not None:
            raw["sampler"] = OmegaConf.to_container(self.sampler) if OmegaConf.is_config(self.sampler) else self.sampler
        where = f" in {path}" if search else " (hydra.sweeper)"
        cli_fields = {k for k, v in fields.items() if v is not None} | ({"sampler"} if self.sampler is not None
                                                                       else set())
        try:
            spec = spec_from_mapping(raw, path.stem if search else "search", where)
        except ConfigError as e:  # a field set on the sweeper (command line, config) is named as such
            raise e.under("hydra.sweeper") if not search or e.path.split(".")[0] in cli_fields else e from None
        by_name = {p.name: p for p in spec.params}
        by_name.update({p.name: p for p in cli_params})  # the command line's sweep wins over the file's
        spec.params = list(by_name.values())
        if not spec.params:
            raise ConfigError("hydra.sweeper.params", "the search has no parameters: give a search file, params, or "
                                                      "sweeps on the command line (key=choice(4,8))")
        try:
            spec.check(where)
        except ConfigError as e:
            raise e.under("hydra.sweeper") if not search or e.path.split(".")[0] in cli_fields else e from None
        fixed_args += [f"{k}={hydra_value(v)}" for k, v in spec.fixed.items()]
        if self.n_trials is not None:
            spec.n_trials = int(self.n_trials)
        if spec.n_trials < 1:
            raise ConfigError("hydra.sweeper.n_trials", f"must be >= 1, got {spec.n_trials}")
        spec.n_jobs = int(self.n_jobs if self.n_jobs is not None else spec.n_jobs or 1)
        if spec.n_jobs < 1:
            raise ConfigError("hydra.sweeper.n_jobs", f"must be >= 1, got {spec.n_jobs}")
        if self.seed is not None:
            spec.seed = int(self.seed)
        if spec.custom_search_space:
            from hydra.utils import get_method

            try:
                self._extend = get_method(spec.custom_search_space)
            except Exception as e:  # noqa: BLE001 - an import error of the user's module, named in one line
                raise ConfigError("hydra.sweeper.custom_search_space",
                                  f"cannot import {spec.custom_search_space}: {str(e).splitlines()[0]}") from None
        spec.study_name = self.study_name or spec.study_name or spec.name
        spec.storage = (self.storage or os.environ.get(STORAGE_ENV) or spec.storage
                        or f"sqlite:///{Path.cwd() / 'optuna.db'}")
        return spec, fixed_args

    def sweep(self, arguments: list[str]) -> list[Any]:
        assert self.config is not None
        install_log_redaction()
        quiet_libraries()
        try:
            spec, arguments = self._spec(arguments)
        except ConfigError as e:
            fail(e)
        try:
            storage = make_storage(spec.storage, self.heartbeat_interval, self.grace_period, self.max_retry,
                                   on_stale=lambda t: self._dead.append(t.number))
        except StorageError as e:
            fail(e)
        self._rdb = storage if isinstance(storage, RDBStorage) else None  # (the study wraps it in a cache)
        from vitq.session import SessionError
        from vitq.sweep import session_of

        try:
            base, session = session_of(self.config)
            fingerprint = study_fingerprint(self.config, spec, session)
        except SessionError as e:
            fail(e)
        study, created = _open_study(spec, storage)
        stored = study.user_attrs.get(FINGERPRINT_ATTR)
        if stored is None:
            study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
        elif stored != fingerprint:
            fail(f"hydra.sweeper.study_name={spec.study_name}: this study was run with other inputs "
                 f"({fingerprint_diff(stored, fingerprint)}); use another study_name or storage")
        if not created and spec.seed is not None:  # joining workers must not replay the creator's random draws
            study.sampler = spec.make_sampler(zlib.crc32(f"{spec.seed}/{_worker_id()}/{len(study.trials)}".encode()))
        cfg = self.config
        parent = experiment_id = None
        if cfg.tracking.enabled:
            try:
                experiment_id = tracking.use_store(cfg.tracking.uri, spec.study_name)
            except tracking.TrackingError as e:
                fail(e)
            parent = tracking.start_parent(cfg.tracking.uri, spec.study_name, key=f"optuna:{spec.study_name}",
                                           params={"search": spec.name, "sampler": spec.sampler, "seed": spec.seed,
                                                   "storage": redact(spec.storage), "n_trials": spec.n_trials,
                                                   "objectives": spec.objectives,
                                                   "space": {p.name: p.choices or [p.low, p.high]
                                                             for p in spec.params}},
                                           tags=session.provenance())
            tracking.log_datasets(parent, session.datasets())
            os.environ[tracking.PARENT_ENV] = parent
            self._parent = parent
        maybe_kill("before_enqueue", None)  # (a test's fault hook: VITQ_FAULTS)
        if not study.user_attrs.get(ENQUEUED_ATTR):  # whichever worker comes first, even if the creator died
            first = self._warm_start_params(spec) if self.warm_start_budgets else []
            if self.enqueue_baselines:
                first += spec.baseline_params(base)
            with storage_lock(spec.storage, self._rdb):  # one worker at a time: exactly once
                if not study.user_attrs.get(ENQUEUED_ATTR):
                    for params in first:
                        study.enqueue_trial(params, skip_if_exists=True)
                    study.set_user_attr(ENQUEUED_ATTR, True)
        if self.in_process and str(cfg.hydra.launcher.get("_target_", "")).endswith(".BasicLauncher"):
            self._inproc = InProcessLauncher(*self._task, cfg, arguments)
        try:
            returns, failed = self._run(study, spec, arguments)
        except KeyboardInterrupt:
            if parent is not None:
                mlflow.MlflowClient().set_terminated(parent, "KILLED")
            fail(f"interrupted (Ctrl-C): the running trials of study {spec.study_name} are FAIL and their MLflow "
                 "runs KILLED; run the same command again to resume", code=130)
        finally:
            if self._inproc is not None:
                self._inproc.close()
        self._reap(study, spec)
        if parent is not None:
            tracking.use_store(cfg.tracking.uri, spec.study_name)
            _finalize(parent, spec, "FAILED" if failed else "FINISHED")
            os.environ.pop(tracking.PARENT_ENV, None)
        sweep_dir = Path(str(cfg.hydra.sweep.dir)).absolute()
        lines = sweep_summary(study, spec, tracking_uri=tracking.resolve_uri(cfg.tracking.uri) if parent else None,
                              experiment_id=experiment_id, parent=parent, sweep_dir=str(sweep_dir))
        log.info("\n".join(lines))
        with contextlib.suppress(OSError):
            sweep_dir.mkdir(parents=True, exist_ok=True)
            (sweep_dir / "summary.txt").write_text("\n".join(lines) + "\n")
        if parent is not None:  # the study's summary on its parent run too
            with contextlib.suppress(Exception):
                mlflow.MlflowClient().log_text(parent, "\n".join(lines) + "\n", "summary.txt")
        if failed:
            where = f"MLflow parent run {parent}" if parent else f"Optuna storage {redact(spec.storage)}"
            fail(f"{len(failed)} trial(s) failed in study {spec.study_name} (first: trial {failed[0][0]}: "
                 f"{failed[0][1]}); see {where}", code=1)
        return returns

    def _run(self, study: optuna.Study, spec: SearchSpec, arguments: list[str]) -> tuple[list[Any], list[tuple]]:
        """Ask, launch, tell until the study has ``n_trials`` COMPLETE; returns results and (number, error) fails."""
        max_failures = self.max_failures if self.max_failures is not None else max(5, spec.n_trials)
        if spec.max_failure_rate is not None and self.max_failures is None:  # the official plugin's knob
            max_failures = int(spec.max_failure_rate * spec.n_trials) + 1
        job_idx = 0
        returns: list[Any] = []
        failed: list[tuple[int, str]] = []
        worker = _worker_id()
        last_reap = -float("inf")
        while len(failed) < max_failures:
            if time.monotonic() - last_reap >= self.poll_interval:  # dead workers' trials: at most every poll
                self._reap(study, spec)
                last_reap = time.monotonic()
            states = [t.state for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                                 TrialState.RUNNING))]
            complete, running = states.count(TrialState.COMPLETE), states.count(TrialState.RUNNING)
            if complete >= spec.n_trials:
                break
            free = spec.n_trials - complete - running
            if free <= 0:  # the other workers' trials fill the budget: wait for them (or for their heartbeat to lapse)
                time.sleep(self.poll_interval)
                continue
            batch = []
            for _ in range(min(spec.n_jobs or 1, free)):
                with storage_lock(spec.storage, self._rdb):  # SQLite has no row locks: two workers could pop one
                    t = study.ask()  # waiting trial; under the lock each pops its own
                study._storage.set_trial_system_attr(t._trial_id, WORKER_ATTR, worker)
                if self._rdb is not None and self.heartbeat_interval:
                    self._rdb.record_heartbeat(t._trial_id)
                if _rank(study, t) > spec.n_trials:  # another worker asked at the same moment
                    t.set_user_attr("vitq:surplus", True)
                    study.tell(t, state=TrialState.PRUNED)
                    continue
                retried = study._storage.get_trial_system_attrs(t._trial_id).get("failed_trial")
                if retried is not None and self._recorded(study, spec, t, retried):
                    log.warning("trial %d repeats trial %d, whose MLflow run had finished: recorded from it",
                                t.number, retried)
                    continue
                batch.append(t)
            if not batch:
                continue
            jobs = [self._trial_values(t, spec) for t in batch]
            try:
                with heartbeat(self._rdb, [t._trial_id for t in batch], self.heartbeat_interval):
                    results = self._launch(arguments, jobs, job_idx)
            except KeyboardInterrupt:
                for t in batch:
                    with contextlib.suppress(Exception):
                        study.tell(t, state=TrialState.FAIL)
                raise
            job_idx += len(batch)
            for t, ret in zip(batch, results, strict=True):
                try:
                    metrics = ret.return_value
                    values = [float(metrics[k]) for k in spec.objectives]
                    if spec.constraint:
                        t.set_user_attr("constraint_violation", spec.violation(metrics))
                    t.set_user_attr(METRICS_ATTR, {k: float(v) for k, v in metrics.items()})  # one write
                    study.tell(t, values)
                    returns.append(ret)
                except Exception as e:  # noqa: BLE001 - a failing trial is recorded and the sweep goes on
                    error = redact(f"{type(e).__name__}: {e}")
                    failed.append((t.number, error.splitlines()[0][:300] if error else type(e).__name__))
                    log.warning("trial %d failed: %s", t.number, error)
                    t.set_user_attr("error", error[:2000])
                    study.tell(t, state=TrialState.FAIL)
        return returns, failed

    def _warm_start_params(self, spec: SearchSpec) -> list[dict[str, Any]]:
        """The sensitivity solver's configs at ``warm_start_budgets`` (cached sensitivity of the swept model)."""
        from vitq.search import sensitivity as sens_mod
        from vitq.sweep import session_of

        cfg = self.config
        assert cfg is not None
        base, session = session_of(cfg)
        model, data = session.model, session.data
        sens = sens_mod.compute_sensitivity(model, data, base, batch_size=cfg.calib_batch_size)
        table = sens_mod.cost_table(model, base, sens.candidates, self.warm_start_metric)
        sols = sens_mod.configs_for_budgets(sens, table, [float(b) for b in self.warm_start_budgets],
                                            self.warm_start_score)
        for s in sols:
            if not s["feasible"]:
                log.warning("warm start: budget %s %s is infeasible; skipped", s["budget"], self.warm_start_metric)
        if cfg.tracking.enabled:
            sens_mod.log_to_mlflow(sens, sols, cfg.tracking.uri, spec.study_name, self.warm_start_score)
        return [spec.pinned_params(base.with_overrides(sens_mod.enqueue_params(s["bits"])), base, "warm start")
                for s in sols if s["feasible"]]

    def _trial_values(self, trial: optuna.Trial, spec: SearchSpec) -> dict[str, Any]:
        """The trial's config values by dotted key: its number and study, every sampled parameter (wildcards
        expanded), enqueued keys outside the space, and ``trial_params`` (the params as searched, for MLflow)."""
        out: dict[str, Any] = {"trial_number": trial.number, "study_name": spec.study_name}
        names = {p.name for p in spec.params}
        out.update(spec.suggest_overrides(trial))
        if self._extend is not None:  # custom_search_space: its params are overrides too (as the official plugin)
            self._extend(self.config, trial)
            out.update({k: v for k, v in trial.params.items() if k not in names})
        fixed = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("fixed_params", {})
        extra = {k: v for k, v in fixed.items() if k not in names}  # enqueued keys outside the space pass through
        out.update(extra)
        searched = {**trial.params, **{k: v for k, v in extra.items() if k != "baseline"}}
        out["trial_params"] = json.dumps(searched, sort_keys=True, default=str)
        return out

    def _recorded(self, study: optuna.Study, spec: SearchSpec, trial: Any, number: int) -> bool:
        """Exactly once: if trial ``number`` already has a FINISHED MLflow run under this sweep (its worker died
        between MLflow's record and Optuna's), tell ``trial`` COMPLETE with that run's metrics; True if it did."""
        if self._parent is None:
            return False
        metrics = tracking.finished_metrics(self._parent, number)
        if metrics is None or any(k not in metrics for k in spec.objectives):
            return False
        try:
            study._storage.set_trial_user_attr(trial._trial_id, METRICS_ATTR, {k: float(v) for k, v in metrics.items()})
            study._storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE,
                                                  [float(metrics[k]) for k in spec.objectives])
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    def _reap(self, study: optuna.Study, spec: SearchSpec) -> None:
        """Fail trials of dead workers: stale heartbeats (any host), or a dead process on this host."""
        optuna.storages.fail_stale_trials(study)
        host = socket.gethostname()
        storage = study._storage
        retry = self._rdb.get_heartbeat_stale_trial_callback() if self._rdb is not None else None
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if self.reap_local else []:
            h, _, pid = str(t.system_attrs.get(WORKER_ATTR, "")).rpartition(":")
            if h != host or not pid.isdigit() or _alive(int(pid)):
                continue
            if self._recorded(study, spec, t, t.number):
                log.warning("trial %d: its worker (pid %s) died after the trial finished; recorded from its MLflow "
                            "run", t.number, pid)
                continue
            try:
                storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first
            log.warning("trial %d: its worker (pid %s) is gone; marked FAIL", t.number, pid)
            if retry is not None:
                retry(study, storage.get_trial(t._trial_id))
            else:
                _retry_callback(self.max_retry)(study, storage.get_trial(t._trial_id))
                self._dead.append(t.number)
        if self._dead and self.config is not None and self.config.tracking.enabled:
            tracking.kill_runs(self.config.tracking.uri, spec.study_name, self._dead)
            self._dead.clear()


FINGERPRINT_ATTR = "vitq:fingerprint"


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def study_fingerprint(cfg: DictConfig, spec: SearchSpec, session: Any) -> dict[str, Any]:
    """Everything a study's trials share and do not search: model, checkpoint, data, batch sizes, and every
    quant key outside the search space (JSON values, so it round-trips through Optuna's storage)."""
    from omegaconf import OmegaConf

    from vitq.search.space import expand_key
    from vitq.sweep import QUANT_SECTIONS

    searched = {k for p in spec.params for k in expand_key(p.name)}
    quant = _flat({s: OmegaConf.to_container(cfg[s], resolve=True) for s in QUANT_SECTIONS if s in cfg})
    quant = {f"quant:{k}": v for k, v in sorted(quant.items()) if k not in searched and v is not None}
    fp = {**session.fingerprint(), "eval_batch_size": int(cfg.eval_batch_size),
          "calib_batch_size": int(cfg.calib_batch_size), **quant}
    return json.loads(json.dumps(fp, default=str))


def fingerprint_diff(stored: dict[str, Any], now: dict[str, Any], limit: int = 3) -> str:
    """``key: stored -> now`` for the first keys that differ."""
    keys = [k for k in dict.fromkeys([*stored, *now]) if stored.get(k) != now.get(k)]
    parts = [f"{k.removeprefix('quant:')}: {stored.get(k)!r} -> {now.get(k)!r}" for k in keys[:limit]]
    return "; ".join(parts) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _open_study(spec: SearchSpec, storage: BaseStorage) -> tuple[optuna.Study, bool]:
    """Load the study or create it; True when this call created it (workers may race to create)."""
    kwargs = {"study_name": spec.study_name, "storage": storage, "sampler": spec.make_sampler()}
    try:
        return optuna.load_study(**kwargs), False
    except KeyError:
        pass
    try:
        return optuna.create_study(directions=list(spec.objectives.values()), **kwargs), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**kwargs), False


def _finalize(parent: str, spec: SearchSpec, status: str = "FINISHED", attempts: int = 5) -> None:
    """Tag the front on the parent run and end it with ``status``; workers finishing together may collide on a
    tag, so retry. If the front cannot be written, the parent ends FAILED and the sweep exits 1."""
    for i in range(attempts):
        try:
            tracking.finalize_parent(parent, spec.objectives, terminate=False)
            mlflow.MlflowClient().set_terminated(parent, status)
            return
        except Exception as e:  # noqa: BLE001 - workers finishing together write the same tags: try again
            if i == attempts - 1:
                with contextlib.suppress(Exception):
                    mlflow.MlflowClient().set_terminated(parent, "FAILED")
                fail(f"could not write the Pareto front of parent run {parent}: {type(e).__name__}: {e}", code=1)
            time.sleep(0.2 + random.random())


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _rank(study: optuna.Study, trial: optuna.Trial) -> int:
    """1 + the number of COMPLETE or RUNNING trials numbered before ``trial`` (itself included)."""
    live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    return sum(1 for t in live if t.number <= trial.number)
