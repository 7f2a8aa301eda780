"""TensorRT's entropy calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017), as a plain NumPy loop."""

from __future__ import annotations

import numpy as np


def entropy_best_bin(hist: np.ndarray, levels: int, start: int = 128, tie: str = "first") -> int:
    """The threshold bin i of least KL(P || Q) over i = max(start, levels) .. len(hist).

    P = hist[:i] with the outliers hist[i:] added to bin i-1; Q = hist[:i] merged into ``levels`` groups of
    i // levels bins (the last group takes the remainder), each group's count spread over its non-empty bins;
    KL over P > 0 with Q floored at 1e-12. Ties: ``tie="first"`` keeps the least i within 1e-12 (relative) of the
    least KL (thresholds that tie in exact arithmetic, e.g. past the last non-empty bin, differ here by float64
    rounding alone); ``tie="last"`` keeps the greatest, as NVIDIA's pytorch-quantization does.
    """
    kls = {}
    for i in range(max(start, levels), len(hist) + 1):
        p = hist[:i].astype(np.float64).copy()
        p[i - 1] += hist[i:].sum()
        m = i // levels
        q = np.zeros(i)
        for grp in range(levels):
            a, b = grp * m, (i if grp == levels - 1 else grp * m + m)
            seg = hist[a:b]
            nonzero = (seg > 0).sum()
            if nonzero:
                q[a:b] = np.where(seg > 0, seg.sum() / nonzero, 0.0)
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        kls[i] = float((p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))).sum())
    least = min(kls.values())
    near = [i for i, kl in kls.items() if kl <= least + 1e-12 * abs(least)]
    return near[0] if tie == "first" else near[-1]
