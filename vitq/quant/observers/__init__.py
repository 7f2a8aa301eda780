"""Range observers, looked up by the YAML names: Minmax, Percentile, OMSE and KL (TensorRT entropy), one per file
over a small base class (as FQ-ViT's ``ptq/observer/``).

Observers work on calibration statistics in a channel-last 2-D layout: a :class:`BatchStats` holds one
batch's exact per-channel min/max and a (bounded) sample of its rows. ``observe(x2d)`` builds one
from a raw tensor, so the same code serves direct use and ranges derived from cached statistics.
Every observer supports ``layer_wise`` (one range) and ``channel_wise`` (a range per column),
vectorized over channels and candidates.
"""

from vitq.quant.observers.base import OBSERVER_REGISTRY, Observer, create_observer, register_observer
from vitq.quant.observers.kl import KLObserver, kl_best_bins
from vitq.quant.observers.minmax import MinmaxObserver
from vitq.quant.observers.omse import OmseObserver
from vitq.quant.observers.percentile import PercentileObserver
from vitq.quant.observers.stats import (
    CHANNEL_HIST_BINS,
    HIST_BINS,
    BatchStats,
    bin_centers,
    hist_quantile,
    scoring_rows,
    to_channel_last,
)

__all__ = ["CHANNEL_HIST_BINS", "HIST_BINS", "OBSERVER_REGISTRY", "BatchStats", "KLObserver", "MinmaxObserver",
           "Observer", "OmseObserver", "PercentileObserver", "bin_centers", "create_observer", "hist_quantile",
           "kl_best_bins", "register_observer", "scoring_rows", "to_channel_last"]
