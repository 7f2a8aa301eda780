"""Hydra plugin shim: Hydra discovers sweepers in the ``hydra_plugins`` namespace only, and imports every plugin at
start-up; the sweeper (Optuna, MLflow) is imported when a sweep uses it, as the official Optuna plugin does."""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper

from vitq.search.settings import SweeperSettings


class VitqOptunaSweeper(Sweeper):
    """vitq's Optuna 5 sweeper (implementation in ``vitq.search.sweeper``)."""

    def __init__(self, **settings: Any) -> None:
        from vitq.search.sweeper import VitqOptunaSweeperImpl

        self.sweeper = VitqOptunaSweeperImpl(**settings)

    def setup(self, **kwargs: Any) -> None:
        self.sweeper.setup(**kwargs)

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweeper.sweep(arguments)


@dataclass
class VitqOptunaSweeperConf(SweeperSettings):
    _target_: str = "hydra_plugins.vitq_sweeper.vitq_sweeper.VitqOptunaSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="vitq_optuna", node=VitqOptunaSweeperConf, provider="vitq")
