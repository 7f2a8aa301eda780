"""MinmaxObserver: the running min/max."""

from __future__ import annotations

from vitq.quant.observers.base import Observer, register_observer
from vitq.quant.observers.stats import BatchStats

__all__ = ["MinmaxObserver"]


@register_observer
class MinmaxObserver(Observer):
    """Running min/max over all calibration batches."""

    name = "MinmaxObserver"

    def update(self, s: BatchStats) -> None:
        self._track_minmax(s)
