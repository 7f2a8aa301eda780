"""The observer base class and the registry that the YAML names (``observer_type``) look up."""

from __future__ import annotations

import torch
from torch import Tensor

from vitq.quant.config import QuantConfig
from vitq.quant.observers.stats import BatchStats

__all__ = ["OBSERVER_REGISTRY", "Observer", "create_observer", "register_observer"]


class Observer:
    """Base class: ``update`` with batch statistics, then ``compute`` → (min, max) of the range.

    ``affine``: the range is quantized on an affine grid whatever the sign (else signed types are symmetric).
    """

    name = "Observer"
    affine = False
    depends_on: tuple[str, ...] = ()  # config fields besides observer and mode that change the range

    @classmethod
    def range_key(cls, cfg: QuantConfig) -> tuple:
        """What the range of ``cfg`` depends on: equal keys, equal ranges (from the same statistics)."""
        return (cls.name, cfg.calibration_mode, *(getattr(cfg, f) for f in cls.depends_on))

    def __init__(self, cfg: QuantConfig) -> None:
        self.cfg = cfg
        self.channel_wise = cfg.calibration_mode == "channel_wise"
        self.min_val: Tensor | None = None
        self.max_val: Tensor | None = None

    def observe(self, x2d: Tensor) -> Observer:
        """Feed a raw (rows, channels) tensor in full."""
        self.update(BatchStats.from_2d(x2d))
        return self

    def _reduce_minmax(self, s: BatchStats) -> tuple[Tensor, Tensor]:
        return (s.cmin, s.cmax) if self.channel_wise else (s.cmin.min(), s.cmax.max())

    def _track_minmax(self, s: BatchStats) -> None:
        lo, hi = self._reduce_minmax(s)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)

    def update(self, s: BatchStats) -> None:
        raise NotImplementedError

    def compute(self) -> tuple[Tensor, Tensor]:
        if self.min_val is None or self.max_val is None:
            raise RuntimeError(f"{self.name}: no calibration data was observed")
        return self.min_val, self.max_val


OBSERVER_REGISTRY: dict[str, type[Observer]] = {}


def register_observer(cls: type[Observer]) -> type[Observer]:
    OBSERVER_REGISTRY[cls.name] = cls
    return cls


def create_observer(cfg: QuantConfig) -> Observer:
    return OBSERVER_REGISTRY[cfg.observer_type](cfg)
