"""The settings of vitq's Optuna sweeper (``hydra.sweeper.*``): one dataclass, which Hydra's config store holds
(through the ``hydra_plugins`` shim) and the sweeper reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SweeperSettings"]


@dataclass
class SweeperSettings:
    search: str | None = None  # sweeps/<name>.yaml or a path; none: mixed_precision, or only the params given here
    n_trials: int | None = None
    n_jobs: int | None = None
    study_name: str | None = None
    storage: str | None = None
    sampler: Any = None  # a name (tpe, nsgaii, ...) or {_target_: optuna.samplers.TPESampler, seed: 0, ...}
    seed: int | None = None
    params: Any = None  # the official plugin's {key: "choice(4, 8)" | "interval(a, b)" | "range(a, b)" | value}
    direction: Any = None  # maximize | minimize | a list: over what a trial returns (top1, weight_bytes)
    custom_search_space: str | None = None  # dotted path of fn(cfg, trial) that suggests more params
    max_failure_rate: float | None = None
    enqueue_baselines: bool = True
    max_failures: int | None = None
    heartbeat_interval: int | None = 30  # seconds; RDB storages (0/null: off)
    grace_period: int | None = None  # seconds without a heartbeat before a trial is failed (Optuna: 2x interval)
    max_retry: int | None = 3  # retries of a trial whose worker died
    poll_interval: float = 2.0  # seconds between checks while other workers' trials fill n_trials
    warm_start_budgets: list[float] | None = None  # enqueue the sensitivity solver's configs at these budgets
    warm_start_metric: str = "weight_bytes"  # or bops
    warm_start_score: str = "drop_loss"  # or drop_top1, grad_score
    warm_start_granularity: str = "point"  # or block: a width per (block, point) (drop scores: blocks × 14 × widths
    #                                        evaluation passes; grad_score: one backward pass per calibration batch)
    in_process: bool = True  # run trials in the sweeper's process on the pre-composed config (no per-job folders)
    reap_local: bool = True  # fail RUNNING trials of dead processes on this host at once (else: heartbeat only)

    OFFICIAL = ("params", "direction", "custom_search_space", "max_failure_rate")  # over a search file's fields
