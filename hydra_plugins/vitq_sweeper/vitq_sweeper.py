"""Hydra plugin shim: Hydra discovers sweepers in the ``hydra_plugins`` namespace only."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from vitq.search.settings import SweeperSettings
from vitq.search.sweeper import VitqOptunaSweeperImpl


class VitqOptunaSweeper(VitqOptunaSweeperImpl):
    """vitq's Optuna 5 sweeper (implementation in ``vitq.search.sweeper``)."""


@dataclass
class VitqOptunaSweeperConf(SweeperSettings):
    _target_: str = "hydra_plugins.vitq_sweeper.vitq_sweeper.VitqOptunaSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="vitq_optuna", node=VitqOptunaSweeperConf, provider="vitq")
