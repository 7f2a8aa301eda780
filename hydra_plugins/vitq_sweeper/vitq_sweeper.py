"""Hydra plugin shim: Hydra discovers sweepers in the ``hydra_plugins`` namespace only."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from vitq.search.sweeper import VitqOptunaSweeperImpl


class VitqOptunaSweeper(VitqOptunaSweeperImpl):
    """vitq's Optuna 5 sweeper (implementation in ``vitq.search.sweeper``)."""


@dataclass
class VitqOptunaSweeperConf:
    _target_: str = "hydra_plugins.vitq_sweeper.vitq_sweeper.VitqOptunaSweeper"
    search: str = "mixed_precision"
    n_trials: int | None = None
    n_jobs: int = 1
    study_name: str | None = None
    storage: str | None = None
    sampler: str | None = None
    seed: int | None = None
    enqueue_baselines: bool = True
    max_failures: int | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="vitq_optuna", node=VitqOptunaSweeperConf, provider="vitq")
