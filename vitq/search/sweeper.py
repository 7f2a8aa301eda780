"""vitq's Optuna sweeper for Hydra: Optuna 5 ask/tell through Hydra's launcher.

Trials are numbered by the study, so a re-run with the same study name and storage resumes: finished
trials count toward ``n_trials``; trials left RUNNING by a killed run are marked FAIL (their MLflow
runs KILLED). A trial that raises is told FAIL and the sweep goes on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from vitq import tracking
from vitq.search.space import SearchSpec, expand_key, load_search

log = logging.getLogger(__name__)
TrialState = optuna.trial.TrialState


class VitqOptunaSweeperImpl(Sweeper):
    """Hydra sweeper over a ``sweeps/*.yaml`` search definition (CLI fields override the file's)."""

    def __init__(self, search: str = "mixed_precision", n_trials: int | None = None, n_jobs: int = 1,
                 study_name: str | None = None, storage: str | None = None, sampler: str | None = None,
                 seed: int | None = None, enqueue_baselines: bool = True, max_failures: int | None = None) -> None:
        self.search = search
        self.n_trials = n_trials
        self.n_jobs = max(1, int(n_jobs))
        self.study_name = study_name
        self.storage = storage
        self.sampler = sampler
        self.seed = seed
        self.enqueue_baselines = enqueue_baselines
        self.max_failures = max_failures
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def _spec(self) -> SearchSpec:
        spec = load_search(self.search)
        if self.n_trials is not None:
            spec.n_trials = int(self.n_trials)
        if self.sampler is not None:
            spec.sampler = self.sampler
        if self.seed is not None:
            spec.seed = int(self.seed)
        spec.study_name = self.study_name or spec.study_name or spec.name
        spec.storage = self.storage or spec.storage or f"sqlite:///{Path.cwd() / 'optuna.db'}"
        return spec

    def sweep(self, arguments: list[str]) -> list[Any]:
        assert self.config is not None
        spec = self._spec()
        tracking.sqlite_file(spec.storage)  # a SQLite storage's folder must exist
        directions = list(spec.objectives.values())
        study = optuna.create_study(study_name=spec.study_name, storage=spec.storage, sampler=spec.make_sampler(),
                                    directions=directions, load_if_exists=True)
        cfg = self.config
        track = bool(cfg.tracking.enabled)
        parent = None
        if track:
            parent = tracking.start_parent(cfg.tracking.uri, spec.study_name, key=f"optuna:{spec.study_name}",
                                           params={"search": spec.name, "sampler": spec.sampler, "seed": spec.seed,
                                                   "storage": _redact(spec.storage), "n_trials": spec.n_trials,
                                                   "objectives": spec.objectives,
                                                   "space": {p.name: p.choices or [p.low, p.high]
                                                             for p in spec.params}})
            os.environ[tracking.PARENT_ENV] = parent
        self._fail_stale(study, spec)
        if self.enqueue_baselines and not study.trials:
            for params in spec.baseline_params():
                study.enqueue_trial(params, skip_if_exists=True)
        max_failures = self.max_failures if self.max_failures is not None else max(5, spec.n_trials)
        failures = 0
        returns: list[Any] = []
        job_idx = 0
        while True:
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            remaining = spec.n_trials - done
            if remaining <= 0 or failures >= max_failures:
                break
            batch = [study.ask() for _ in range(min(self.n_jobs, remaining))]
            overrides = [tuple(arguments) + self._trial_overrides(t, spec) for t in batch]
            results = self.launcher.launch(overrides, initial_job_idx=job_idx)
            job_idx += len(batch)
            for t, ret in zip(batch, results, strict=True):
                try:
                    metrics = ret.return_value
                    values = [float(metrics[k]) for k in spec.objectives]
                    if spec.constraint:
                        t.set_user_attr("constraint_violation", spec.violation(metrics))
                    for k, v in metrics.items():
                        t.set_user_attr(k, float(v))
                    study.tell(t, values)
                    returns.append(ret)
                except Exception as e:  # noqa: BLE001 - a failing trial is recorded and the sweep goes on
                    failures += 1
                    log.warning("trial %d failed: %s: %s", t.number, type(e).__name__, e)
                    t.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
                    study.tell(t, state=TrialState.FAIL)
        if parent is not None:
            tracking.use_store(cfg.tracking.uri, spec.study_name)
            tracking.finalize_parent(parent, spec.objectives)
            os.environ.pop(tracking.PARENT_ENV, None)
        log.info("study %s: %d complete trials", spec.study_name,
                 len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))
        return returns

    def _trial_overrides(self, trial: optuna.Trial, spec: SearchSpec) -> tuple[str, ...]:
        out = [f"trial_number={trial.number}", f"study_name={spec.study_name}"]
        names = {p.name for p in spec.params}
        for p in spec.params:
            value = p.suggest(trial)
            out += [f"{k}={value}" for k in expand_key(p.name)]
        fixed = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("fixed_params", {})
        for k, v in fixed.items():  # enqueued keys outside the search space pass straight through
            if k not in names:
                out.append(f"{k}={str(v).lower() if isinstance(v, bool) else v}")
        return tuple(out)

    def _fail_stale(self, study: optuna.Study, spec: SearchSpec) -> None:
        """Trials left RUNNING by a killed single-worker run become FAIL; their MLflow runs KILLED."""
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in stale:
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        if stale and self.config is not None and self.config.tracking.enabled:
            tracking.kill_runs(self.config.tracking.uri, spec.study_name, [t.number for t in stale])


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url
