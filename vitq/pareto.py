"""Pareto fronts: non-dominated mask for mixed maximize/minimize objectives, and hypervolume (2-D)."""

from __future__ import annotations

import numpy as np

__all__ = ["hypervolume_2d", "pareto_mask"]


def _as_minimization(values: np.ndarray, directions: list[str]) -> np.ndarray:
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return np.asarray(values, dtype=float) * sign


def pareto_mask(values: np.ndarray, directions: list[str]) -> np.ndarray:
    """True for rows no other row dominates (≥ as good in every objective and better in one)."""
    v = _as_minimization(values, directions)
    if len(v) == 0:
        return np.zeros(0, dtype=bool)
    le = (v[:, None, :] <= v[None, :, :]).all(-1)  # le[j, i]: j at least as good as i everywhere
    lt = (v[:, None, :] < v[None, :, :]).any(-1)
    dominated = (le & lt).any(0)
    return ~dominated


def hypervolume_2d(values: np.ndarray, directions: list[str], reference: np.ndarray) -> float:
    """Area dominated by the points up to ``reference`` (both objectives, any directions)."""
    v = _as_minimization(values, directions)
    ref = _as_minimization(np.asarray(reference)[None], directions)[0]
    v = v[(v < ref).all(1)]
    if len(v) == 0:
        return 0.0
    v = v[pareto_mask(v, ["minimize", "minimize"])]
    v = v[np.argsort(v[:, 0])]
    hv, prev_y = 0.0, ref[1]
    for x, y in v:
        hv += (ref[0] - x) * (prev_y - y)
        prev_y = y
    return float(hv)
