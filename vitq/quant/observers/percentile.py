"""PercentileObserver: per-batch quantiles, smoothed across batches."""

from __future__ import annotations

from vitq.quant.observers.base import Observer, register_observer
from vitq.quant.observers.stats import BatchStats

__all__ = ["PercentileObserver"]


@register_observer
class PercentileObserver(Observer):
    """Per batch ``max = quantile(x, alpha)``, ``min = quantile(x, 1-alpha)``; smoothed ``v += sigma (cur - v)``."""

    name = "PercentileObserver"
    depends_on = ("percentile_alpha", "percentile_sigma")

    def update(self, s: BatchStats) -> None:
        a = self.cfg.percentile_alpha
        lo, hi = s.quantile(1 - a, self.channel_wise), s.quantile(a, self.channel_wise)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            sigma = self.cfg.percentile_sigma
            self.min_val = self.min_val + sigma * (lo - self.min_val)
            self.max_val = self.max_val + sigma * (hi - self.max_val)
