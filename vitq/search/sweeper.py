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
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig
from optuna.storages import BaseStorage, RDBStorage

from vitq.faults import maybe_kill
from vitq.logs import quiet_libraries
from vitq.quant.config import ConfigError, split_block
from vitq.redact import fail, install_log_redaction, redact
from vitq.search.budgets import BUDGET_METRICS, BUDGETS_KEY, GRANULARITIES, SCORES, check_budget_values
from vitq.search.fingerprint import FINGERPRINT_ATTR, fingerprint_diff, study_fingerprint
from vitq.search.launch import InProcessLauncher
from vitq.search.settings import SweeperSettings
from vitq.search.space import SearchSpec, expand_key, search_mapping, spec_from_mapping, split_sweep_arguments
from vitq.search.storage import (
    STORAGE_ENV,
    StorageError,
    heartbeat,
    is_journal,
    make_storage,
    process_alive,
    retry_callback,
    storage_lock,
)
from vitq.search.summary import sweep_summary

if TYPE_CHECKING:
    from vitq.search.warm_start import WarmStart

log = logging.getLogger(__name__)
TrialState = optuna.trial.TrialState
WORKER_ATTR = "vitq:worker"
METRICS_ATTR = "metrics"  # a trial's metrics, one user attr (one storage write)
ENQUEUED_ATTR = "vitq:enqueued"  # the study's warm-start configs and baselines are in


def hydra_value(v: Any) -> str:
    """``v`` as a value of a Hydra command-line override: booleans lowercase, a string with characters outside
    Hydra's bare-value grammar quoted (quotes and backslashes escaped)."""
    if isinstance(v, bool):
        return str(v).lower()
    s = str(v)
    if isinstance(v, str) and not re.fullmatch(r"[\w.\-+/:@]*", s):
        return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return s


class VitqOptunaSweeperImpl(Sweeper):
    """Hydra sweeper over a ``sweeps/*.yaml`` search definition (CLI fields override the file's)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = SweeperSettings(**settings)
        self.config: DictConfig | None = None
        self._inproc: InProcessLauncher | None = None
        self._dead: list[int] = []
        self._rdb: RDBStorage | None = None  # trial numbers failed as stale/dead, whose MLflow runs must end KILLED
        self._parent: str | None = None  # this sweep's MLflow parent run
        self._extend: Any = None  # custom_search_space: fn(cfg, trial)
        self._storage: BaseStorage | None = None  # the study's storage (Optuna's public storage API)
        self._study_id: int | None = None
        self._ids: dict[int, int] = {}  # trial number -> storage trial id
        self._warm: WarmStart | None = None  # the warm start's budgets, checked before the study opens

    def _tid(self, number: int) -> int:
        """The storage's id of trial ``number`` (public storage API; asked once per trial)."""
        if number not in self._ids:
            assert self._storage is not None and self._study_id is not None
            self._ids[number] = self._storage.get_trial_id_from_study_id_trial_number(self._study_id, number)
        return self._ids[number]

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)
        self._task = (hydra_context, task_function)

    def _launch(self, arguments: list[str], jobs: list[dict[str, Any]], job_idx: int) -> Any:
        """Hydra's launcher, or in this process on the pre-composed config where every job only sets values."""
        lines = [[f"{'++' if split_block(k)[0] is not None else ''}{k}={hydra_value(v)}" for k, v in values.items()]
                 for values in jobs]  # ``blocks.N`` keys are added to the config
        if self._inproc is not None and all(self._inproc.accepts(list(values)) for values in jobs):
            return self._inproc.launch(list(zip(lines, jobs, strict=True)), initial_job_idx=job_idx)
        return self.launcher.launch([tuple(arguments) + tuple(ln) for ln in lines], initial_job_idx=job_idx)

    def _spec(self, arguments: list[str]) -> tuple[SearchSpec, list[str]]:
        """The search definition with the sweeper's fields and the command line's sweeps (``key=choice(4,8)``), and
        the other command-line overrides; bad values are ConfigErrors naming the key."""
        from omegaconf import OmegaConf

        cli_params, fixed_args = split_sweep_arguments(arguments)
        fields = {k: getattr(self.settings, k) for k in SweeperSettings.OFFICIAL}
        fields = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in fields.items()}
        search = self.settings.search or (None if cli_params or fields["params"] else "mixed_precision")
        path, raw = search_mapping(search) if search else (Path("hydra.sweeper"), {})
        raw = dict(raw)
        for k, v in fields.items():
            if v is not None:
                raw[k] = {**(raw.get("params") or {}), **v} if k == "params" else v
        sampler = self.settings.sampler
        if sampler is not None:
            raw["sampler"] = OmegaConf.to_container(sampler) if OmegaConf.is_config(sampler) else sampler
        where = f" in {path}" if search else " (hydra.sweeper)"
        cli_fields = {k for k, v in fields.items() if v is not None} | ({"sampler"} if sampler is not None else set())

        def named(e: ConfigError) -> ConfigError:
            """A field set on the sweeper (command line, config) is named as such, not by the search file."""
            if search and e.path.split(".")[0] not in cli_fields:
                return e
            return ConfigError(e.path, e.detail.removesuffix(where)).under("hydra.sweeper")

        try:
            spec = spec_from_mapping(raw, path.stem if search else "search", where)
        except ConfigError as e:
            raise named(e) from None
        by_name = {p.name: p for p in spec.params}
        by_name.update({p.name: p for p in cli_params})  # the command line's sweep wins over the file's
        spec.params = list(by_name.values())
        if not spec.params:
            raise ConfigError("hydra.sweeper.params", "the search has no parameters: give a search file, params, or "
                                                      "sweeps on the command line (key=choice(4,8))")
        try:
            spec.check(where)
        except ConfigError as e:
            raise named(e) from None
        fixed_args += [f"{k}={hydra_value(v)}" for k, v in spec.fixed.items()]
        if self.settings.n_trials is not None:
            spec.n_trials = int(self.settings.n_trials)
        if spec.n_trials < 1:
            raise ConfigError("hydra.sweeper.n_trials", f"must be >= 1, got {spec.n_trials}")
        spec.n_jobs = int(self.settings.n_jobs if self.settings.n_jobs is not None else spec.n_jobs or 1)
        if spec.n_jobs < 1:
            raise ConfigError("hydra.sweeper.n_jobs", f"must be >= 1, got {spec.n_jobs}")
        if self.settings.seed is not None:
            spec.seed = int(self.settings.seed)
        if spec.custom_search_space:
            from hydra.utils import get_method

            try:
                self._extend = get_method(spec.custom_search_space)
            except Exception as e:  # noqa: BLE001 - an import error of the user's module, named in one line
                raise ConfigError("hydra.sweeper.custom_search_space",
                                  f"cannot import {spec.custom_search_space}: {str(e).splitlines()[0]}") from None
        for key, name in (("hydra.sweeper.study_name", self.settings.study_name), ("study_name", spec.study_name)):
            if name is not None and not str(name).strip():
                raise ConfigError(key, "must be a name, got an empty one (leave it unset for the search's name)")
        spec.study_name = self.settings.study_name or spec.study_name or spec.name
        spec.storage = (self.settings.storage or os.environ.get(STORAGE_ENV) or spec.storage
                        or f"sqlite:///{Path.cwd() / 'optuna.db'}")
        return spec, fixed_args

    def _check_settings(self, spec: SearchSpec) -> None:
        """ConfigError naming a sweeper setting that is out of range (a warm-start budget that is not a number > 0),
        or that the others leave without effect: a warm-start choice without warm-start budgets, heartbeat settings
        on a journal file (Optuna gives it no heartbeats) or a grace period with heartbeats off, batches of
        ``n_jobs`` trials that the launcher runs one at a time, and ``reap_local=false`` where nothing else would
        fail a dead worker's trials (the study would wait for them for ever)."""
        st = self.settings
        if st.warm_start_budgets:  # (whether a config reaches them: once the model is built, before the study opens)
            check_budget_values(list(st.warm_start_budgets), BUDGETS_KEY)
        for name, valid in (("warm_start_metric", BUDGET_METRICS), ("warm_start_score", SCORES),
                            ("warm_start_granularity", GRANULARITIES)):
            value = getattr(st, name)
            if value not in valid:
                raise ConfigError(f"hydra.sweeper.{name}", f"expected one of {', '.join(valid)}, got {value!r}")
            if not st.warm_start_budgets and value != getattr(SweeperSettings, name):
                raise ConfigError(f"hydra.sweeper.{name}", "it chooses how the warm-start configs are solved, "
                                                           "and hydra.sweeper.warm_start_budgets is not set")
        for name, least in (("heartbeat_interval", 0), ("grace_period", 1)):
            value = getattr(st, name)
            if value is not None and value < least:
                raise ConfigError(f"hydra.sweeper.{name}", f"must be >= {least} seconds, got {value}")
        journal = is_journal(spec.storage)
        if journal:
            for name in ("heartbeat_interval", "grace_period"):
                value = getattr(st, name)
                if value and value != getattr(SweeperSettings, name):
                    raise ConfigError(f"hydra.sweeper.{name}",
                                      f"the journal storage {spec.storage} has no heartbeats in Optuna; use a "
                                      "database (sqlite:///..., postgresql://...) for them, or leave it unset")
        elif st.grace_period is not None and not st.heartbeat_interval:
            raise ConfigError("hydra.sweeper.grace_period", "heartbeats are off (hydra.sweeper.heartbeat_interval="
                                                            f"{st.heartbeat_interval}); set an interval, or leave "
                                                            "grace_period unset")
        assert self.config is not None
        launcher = self.config.hydra.launcher
        target = str(launcher.get("_target_", ""))
        if spec.n_jobs > 1 and target.endswith(".BasicLauncher"):
            raise ConfigError("hydra.sweeper.n_jobs", f"{spec.n_jobs} trials per batch, and Hydra's basic launcher "
                                                      "runs them one after another; add hydra/launcher=joblib "
                                                      f"hydra.launcher.n_jobs={spec.n_jobs} to run them at once")
        if spec.n_jobs == 1 and "joblib" in target.lower() and launcher.get("n_jobs") != 1:
            raise ConfigError("hydra.sweeper.n_jobs", "1: the joblib launcher gets one trial at a time (a batch of "
                                                      "hydra.sweeper.n_jobs); set it to the trials to run at once")
        if not st.reap_local and (journal or not st.heartbeat_interval):
            none = "the journal storage has no heartbeats" if journal else "heartbeats are off"
            raise ConfigError("hydra.sweeper.reap_local", f"false leaves a dead worker's trials to the heartbeat, and "
                                                          f"{none}: nothing would fail them")

    def _check_values(self, spec: SearchSpec, fixed: list[str]) -> None:
        """ConfigError naming the parameter when one of its values (each choice, an interval's ends) is not a value
        its keys take, before the study or the parent run opens: every trial that drew it would fail. Quant keys are
        checked as the trial's quant config checks them; other keys and config groups by composing each value."""
        from vitq.sweep import QUANT_SECTIONS, check_composable, layer_config_from

        assert self.config is not None
        base = layer_config_from(self.config)
        composed: list[str] = []
        for p in spec.params:
            values = p.choices if p.choices is not None else [p.low, p.high]
            if p.choices is None and p.type == "int":
                values = [int(v) for v in values]  # (as Optuna's suggest_int draws them)
            for key in expand_key(p.name):
                if "." not in key or key.split(".")[0] not in QUANT_SECTIONS:  # (``default=omse``: a group)
                    composed += [f"{key}={hydra_value(v)}" for v in values]
                    continue
                for v in values:
                    try:
                        base.with_overrides({key: v})
                    except ConfigError as e:
                        raise ConfigError(f"params.{p.name}", e.detail) from None
        check_composable(self.config, fixed, composed)

    def sweep(self, arguments: list[str]) -> list[Any]:
        """Open the study, enqueue the first configs once, ask/launch/tell until ``n_trials`` are COMPLETE, then
        write the front and the summary. Bad input exits 2 before any trial; failed trials exit 1 at the end."""
        assert self.config is not None
        install_log_redaction()
        quiet_libraries()
        try:
            spec, arguments = self._spec(arguments)
            self._check_settings(spec)
            self._check_values(spec, arguments)
        except ConfigError as e:
            fail(e)
        study, created, base, session = self._open(spec)
        from vitq import tracking  # (MLflow: imported once the inputs are checked, so bad input fails fast)

        if not created and spec.seed is not None:  # joining workers must not replay the creator's random draws
            study.sampler = spec.make_sampler(zlib.crc32(f"{spec.seed}/{_worker_id()}/{len(study.trials)}".encode()))
        cfg = self.config
        try:  # (a resumed or joining worker finds them enqueued: no warm start computed or logged again)
            first = [] if study.user_attrs.get(ENQUEUED_ATTR) else self._first_params(spec, base)
        except ConfigError as e:
            fail(e)
        experiment_id = self._start_parent(spec, session) if cfg.tracking.enabled else None
        maybe_kill("before_enqueue", None)  # (a test's fault hook: VITQ_FAULTS)
        self._enqueue_first(study, spec, first)
        if self.settings.in_process and str(cfg.hydra.launcher.get("_target_", "")).endswith(".BasicLauncher"):
            self._inproc = InProcessLauncher(*self._task, cfg, arguments)
        try:
            returns, failed = self._run(study, spec, arguments)
        except KeyboardInterrupt:
            if self._parent is not None:
                tracking.end_run(self._parent, "KILLED")
            fail(f"interrupted (Ctrl-C): the running trials of study {spec.study_name} are FAIL and their MLflow "
                 "runs KILLED; run the same command again to resume", code=130)
        finally:
            if self._inproc is not None:
                self._inproc.close()
        self._reap(study, spec)
        parent = self._parent
        if parent is not None:
            tracking.use_store(cfg.tracking.uri, spec.study_name)
            _finalize(parent, spec, "FAILED" if failed else "FINISHED")
            os.environ.pop(tracking.PARENT_ENV, None)
        self._summarize(study, spec, experiment_id)
        if failed:
            where = f"MLflow parent run {parent}" if parent else f"Optuna storage {redact(spec.storage)}"
            fail(f"{len(failed)} trial(s) failed in study {spec.study_name} (first: trial {failed[0][0]}: "
                 f"{failed[0][1]}); see {where}", code=1)
        return returns

    def _open(self, spec: SearchSpec) -> tuple[optuna.Study, bool, Any, Any]:
        """The storage, the study (created if new; True then), the base config and session; a study run with other
        inputs (its fingerprint) is refused."""
        assert self.config is not None
        st = self.settings
        try:
            storage = make_storage(spec.storage, st.heartbeat_interval or None, st.grace_period, st.max_retry,
                                   on_stale=lambda t: self._dead.append(t.number))
        except StorageError as e:
            fail(e)
        self._rdb = storage if isinstance(storage, RDBStorage) else None  # (the study wraps it in a cache)
        from vitq.search.warm_start import plan_warm_start
        from vitq.session import SessionError
        from vitq.sweep import session_of

        try:
            base, session = session_of(self.config)
            spec.bind_blocks(len(session.model.blocks))
            fingerprint = study_fingerprint(self.config, spec, session)
            if st.warm_start_budgets:
                self._warm = plan_warm_start(spec, session.model, base, list(st.warm_start_budgets),
                                             st.warm_start_metric, st.warm_start_score, st.warm_start_granularity,
                                             session.data.image_size)
        except SessionError as e:
            fail(e)
        study, created = _open_study(spec, storage)
        self._storage, self._study_id = storage, storage.get_study_id_from_name(spec.study_name)
        stored = study.user_attrs.get(FINGERPRINT_ATTR)
        if stored is None:
            study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
        elif stored != fingerprint:
            fail(f"hydra.sweeper.study_name={spec.study_name}: this study was run with other inputs "
                 f"({fingerprint_diff(stored, fingerprint)}); use another study_name or storage")
        return study, created, base, session

    def _start_parent(self, spec: SearchSpec, session: Any) -> str:
        """The sweep's MLflow parent run (found again on resume, shared by workers), with the data as its inputs;
        returns the experiment id."""
        from vitq import tracking

        cfg = self.config
        assert cfg is not None
        try:
            experiment_id = tracking.use_store(cfg.tracking.uri, spec.study_name)
        except tracking.TrackingError as e:
            fail(e)
        space = {p.name: p.choices or [p.low, p.high] for p in spec.params}
        # one worker at a time on the study's storage: the first creates the parent, the others find it. (On an MLflow
        # server, workers that created parents at once kept the earliest visible one; a parent whose request was
        # still in flight could come first later, and its creator then deleted the one another worker had kept.)
        with storage_lock(spec.storage, self._rdb):
            parent = tracking.start_parent(cfg.tracking.uri, spec.study_name, key=f"optuna:{spec.study_name}",
                                           params={"search": spec.name, "sampler": spec.sampler, "seed": spec.seed,
                                                   "storage": redact(spec.storage), "n_trials": spec.n_trials,
                                                   "objectives": spec.objectives, "space": space},
                                           tags=session.provenance(), on_create=lambda rid: (
                                               tracking.log_datasets(rid, session.datasets()),
                                               tracking.log_run_config(rid, cfg)))
        os.environ[tracking.PARENT_ENV] = parent
        self._parent = parent
        return experiment_id

    def _first_params(self, spec: SearchSpec, base: Any) -> list[dict[str, Any]]:
        """Warm-start configs, then baselines, as whole configs (a baseline outside the space: ConfigError)."""
        from vitq.search.warm_start import warm_start_params

        first = warm_start_params(self.config, spec, self._warm) if self._warm is not None else []
        if self.settings.enqueue_baselines:
            first += spec.baseline_params(base)
        return first

    def _enqueue_first(self, study: optuna.Study, spec: SearchSpec, first: list[dict[str, Any]]) -> None:
        """The first configs, enqueued exactly once by whichever worker comes first."""
        if study.user_attrs.get(ENQUEUED_ATTR):
            return
        with storage_lock(spec.storage, self._rdb):  # one worker at a time: exactly once
            if not study.user_attrs.get(ENQUEUED_ATTR):
                for params in first:
                    study.enqueue_trial(params, skip_if_exists=True)
                study.set_user_attr(ENQUEUED_ATTR, True)

    def _summarize(self, study: optuna.Study, spec: SearchSpec, experiment_id: str | None) -> None:
        """The summary: logged, in ``summary.txt`` in the sweep folder and on the parent run."""
        from vitq import tracking

        cfg = self.config
        assert cfg is not None
        parent = self._parent
        sweep_dir = Path(str(cfg.hydra.sweep.dir)).absolute()
        lines = sweep_summary(study, spec, tracking_uri=tracking.resolve_uri(cfg.tracking.uri) if parent else None,
                              experiment_id=experiment_id, parent=parent, sweep_dir=str(sweep_dir))
        text = "\n".join(lines) + "\n"
        log.info(text.rstrip("\n"))
        with contextlib.suppress(OSError):
            sweep_dir.mkdir(parents=True, exist_ok=True)
            (sweep_dir / "summary.txt").write_text(text)
        if parent is not None:
            with contextlib.suppress(Exception):
                tracking.log_text(parent, text, "summary.txt")

    def _run(self, study: optuna.Study, spec: SearchSpec, arguments: list[str]) -> tuple[list[Any], list[tuple]]:
        """Ask, launch, tell until the study has ``n_trials`` COMPLETE; returns results and (number, error) fails."""
        max_failures = self.settings.max_failures if self.settings.max_failures is not None else max(5, spec.n_trials)
        if spec.max_failure_rate is not None and self.settings.max_failures is None:  # the official plugin's knob
            max_failures = int(spec.max_failure_rate * spec.n_trials) + 1
        job_idx = 0
        returns: list[Any] = []
        failed: list[tuple[int, str]] = []
        worker = _worker_id()
        last_reap = -float("inf")
        while len(failed) < max_failures:
            if time.monotonic() - last_reap >= self.settings.poll_interval:  # dead workers' trials: at most every poll
                self._reap(study, spec)
                last_reap = time.monotonic()
            states = [t.state for t in study.get_trials(deepcopy=False)]
            complete, running = states.count(TrialState.COMPLETE), states.count(TrialState.RUNNING)
            if complete >= spec.n_trials:
                break
            free = spec.n_trials - complete - running
            if free <= 0:  # the other workers' trials fill the budget: wait for them (or for their heartbeat to lapse)
                time.sleep(self.settings.poll_interval)
                continue
            batch, fixed = [], []
            for i in range(min(spec.n_jobs or 1, free)):
                with storage_lock(spec.storage, self._rdb):  # SQLite has no row locks: two workers could pop one
                    t = study.ask()  # waiting trial; under the lock each pops its own
                self._storage.set_trial_system_attr(self._tid(t.number), WORKER_ATTR, worker)
                if self._rdb is not None and self.settings.heartbeat_interval:
                    self._rdb.record_heartbeat(self._tid(t.number))
                if over_budget(study, t, states, i, spec.n_trials):  # another worker asked at the same moment
                    t.set_user_attr("vitq:surplus", True)
                    study.tell(t, state=TrialState.PRUNED)
                    continue
                attrs = self._storage.get_trial_system_attrs(self._tid(t.number))  # (one read serves both uses)
                retried = attrs.get("failed_trial")
                if retried is not None and self._recorded(study, spec, t, retried):
                    log.warning("trial %d repeats trial %d, whose MLflow run had finished: recorded from it",
                                t.number, retried)
                    continue
                batch.append(t)
                fixed.append(attrs.get("fixed_params", {}))
            if not batch:
                continue
            jobs = [self._trial_values(t, spec, f) for t, f in zip(batch, fixed, strict=True)]
            try:
                with heartbeat(self._rdb, [self._tid(t.number) for t in batch], self.settings.heartbeat_interval):
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

    def _trial_values(self, trial: optuna.Trial, spec: SearchSpec, fixed: dict[str, Any]) -> dict[str, Any]:
        """The trial's config values by dotted key: its number and study, every sampled parameter (wildcards
        expanded), enqueued keys outside the space (``fixed``: the trial's enqueued params), and ``trial_params``
        (the params as searched, for MLflow)."""
        out: dict[str, Any] = {"trial_number": trial.number, "study_name": spec.study_name}
        names = {p.name for p in spec.params}
        out.update(spec.suggest_overrides(trial))
        if self._extend is not None:  # custom_search_space: its params are overrides too (as the official plugin)
            self._extend(self.config, trial)
            out.update({k: v for k, v in trial.params.items() if k not in names})
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
        from vitq import tracking

        metrics = tracking.finished_metrics(self._parent, number)
        if metrics is None or any(k not in metrics for k in spec.objectives):
            return False
        try:
            tid = self._tid(trial.number)
            self._storage.set_trial_user_attr(tid, METRICS_ATTR, {k: float(v) for k, v in metrics.items()})
            self._storage.set_trial_state_values(tid, TrialState.COMPLETE,
                                                  [float(metrics[k]) for k in spec.objectives])
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    def _reap(self, study: optuna.Study, spec: SearchSpec) -> None:
        """Fail trials of dead workers: stale heartbeats (any host), or a dead process on this host."""
        optuna.storages.fail_stale_trials(study)
        host = socket.gethostname()
        storage = self._storage
        retry = self._rdb.get_heartbeat_stale_trial_callback() if self._rdb is not None else None
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if self.settings.reap_local else []:
            h, _, pid = str(t.system_attrs.get(WORKER_ATTR, "")).rpartition(":")
            if h != host or not pid.isdigit() or process_alive(int(pid)):
                continue
            if self._recorded(study, spec, t, t.number):
                log.warning("trial %d: its worker (pid %s) died after the trial finished; recorded from its MLflow "
                            "run", t.number, pid)
                continue
            try:
                storage.set_trial_state_values(self._tid(t.number), state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first
            log.warning("trial %d: its worker (pid %s) is gone; marked FAIL", t.number, pid)
            if retry is not None:
                retry(study, storage.get_trial(self._tid(t.number)))
            else:
                retry_callback(self.settings.max_retry)(study, storage.get_trial(self._tid(t.number)))
                self._dead.append(t.number)
        if self._dead and self.config is not None and self.config.tracking.enabled:
            from vitq import tracking

            tracking.kill_runs(self.config.tracking.uri, spec.study_name, self._dead)
            self._dead.clear()


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
    from vitq import tracking

    for i in range(attempts):
        try:
            tracking.finalize_parent(parent, spec.objectives, terminate=False)
            tracking.end_run(parent, status)
            return
        except Exception as e:  # noqa: BLE001 - workers finishing together write the same tags: try again
            if i == attempts - 1:
                with contextlib.suppress(Exception):
                    tracking.end_run(parent, "FAILED")
                fail(f"could not write the Pareto front of parent run {parent}: {type(e).__name__}: {e}", code=1)
            time.sleep(0.2 + random.random())


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def over_budget(study: optuna.Study, trial: optuna.Trial, states: list[TrialState], asked: int,
                n_trials: int) -> bool:
    """Whether ``trial``, just asked, is past the budget: more than ``n_trials`` COMPLETE or RUNNING trials are
    numbered up to it. ``states``: every trial's state when the budget was last read (it left room for ``asked``
    + 1 more); ``asked``: trials this worker asked since. A new trial numbered right after those, when none was
    waiting then, means no other worker asked since: it fits without reading the study again."""
    if TrialState.WAITING not in states and trial.number == len(states) + asked:
        return False
    live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    return sum(1 for t in live if t.number <= trial.number) > n_trials
