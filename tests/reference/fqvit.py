"""FQ-ViT's (Lin et al., IJCAI 2022; megvii-research/FQ-ViT) PTF observer, integer LayerNorm and Log2 quantizer,
re-written in NumPy float64 from the paper and its code, and the float softmax of quantized scores."""

from __future__ import annotations

import numpy as np


def ptf(x: np.ndarray, qmin: int, qmax: int, k: int = 3) -> tuple[np.ndarray, float, np.ndarray]:
    """PtfObserver.get_quantization_params on (rows, channels) ``x``: per-channel scales, the zero point, factors.

    One layer-wise min/max; scale8 = (max - min) / (qmax - qmin); candidate scales scale8 / 2^(k - f), f = 0..k;
    each channel keeps the candidate with the least mean squared error (``lp_loss(..., reduction='all')``),
    the smallest scale on ties (``score.index(min(score))``).
    """
    x = x.astype(np.float64)
    lo, hi = x.min(), x.max()
    scale8 = max((hi - lo) / float(qmax - qmin), float(np.finfo(np.float32).eps))
    zp = float(np.clip(qmin - np.round(lo / scale8), qmin, qmax))
    scales = [scale8 / 2 ** (k - f) for f in range(k + 1)]
    factors = np.zeros(x.shape[1], dtype=np.int64)
    for j in range(x.shape[1]):
        col = x[:, j]
        scores = [np.mean(((np.clip(np.round(col / s + zp), qmin, qmax) - zp) * s - col) ** 2) for s in scales]
        factors[j] = scores.index(min(scores))
    return np.array([scales[f] for f in factors]), zp, factors


def int_layernorm(x: np.ndarray, in_scale: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                  out_scale: np.ndarray | float) -> np.ndarray:
    """QIntLayerNorm.forward in ``int`` mode over the last axis (get_MN with bit = 7)."""
    x = x.astype(np.float64)
    c = x.shape[-1]
    x_q = np.round(x / in_scale)
    s1 = in_scale.min()
    x_q = x_q * np.round(in_scale / s1)
    mean = x_q.mean(axis=-1) * s1
    std = (s1 / c) * np.sqrt(c * (x_q ** 2).sum(axis=-1) - x_q.sum(axis=-1) ** 2)
    a = (s1 / std)[..., None] * weight / out_scale
    n = np.clip(7 - np.floor(np.log2(np.abs(a))), 0, 31)
    m = np.clip(np.floor(np.abs(a) * 2.0 ** n), 0, 2 ** 8 - 1)
    b = np.round((bias - (mean / std)[..., None] * weight) / out_scale * 2.0 ** n)
    return np.round((np.sign(a) * m * x_q + b) / 2.0 ** n) * out_scale


def log2_quant(x: np.ndarray, bits: int) -> np.ndarray:
    """Log2Quantizer: rounds = round(-log2 x); outputs 2^-clamp(rounds, 0, 2^b - 1); 0 where rounds >= 2^b."""
    with np.errstate(divide="ignore"):
        rounds = np.round(-np.log2(x.astype(np.float64)))
    out = 2.0 ** -np.clip(rounds, 0, 2**bits - 1)
    out[rounds >= 2**bits] = 0.0
    return out


def softmax(scores: np.ndarray) -> np.ndarray:
    """The float softmax over the last axis (float64)."""
    z = scores.astype(np.float64) - scores.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def omse(x: np.ndarray, qmin: int, qmax: int, channel_wise: bool) -> tuple[np.ndarray, np.ndarray]:
    """OmseObserver, exhaustively on the whole of ``x`` (rows, channels): clip factors 1 - 0.01 i (i = 0..89) of
    min/max, an affine grid each (any sign), the first factor of least mean squared error (per channel when
    ``channel_wise``). Returns the chosen (min, max)."""
    x = x.astype(np.float64)
    lo0, hi0 = (x.min(0), x.max(0)) if channel_wise else (np.array(x.min()), np.array(x.max()))
    best = np.full(lo0.shape, np.inf)
    best_lo, best_hi = lo0.copy(), hi0.copy()
    for i in range(90):
        lo, hi = lo0 * (1.0 - 0.01 * i), hi0 * (1.0 - 0.01 * i)
        scale = np.maximum((hi - lo) / float(qmax - qmin), float(np.finfo(np.float32).eps))
        zp = np.clip(qmin - np.round(lo / scale), qmin, qmax)
        q = (np.clip(np.round(x / scale + zp), qmin, qmax) - zp) * scale
        score = ((q - x) ** 2).mean(0) if channel_wise else np.array(((q - x) ** 2).mean())
        better = score < best
        best = np.where(better, score, best)
        best_lo, best_hi = np.where(better, lo, best_lo), np.where(better, hi, best_hi)
    return best_lo, best_hi


def omse_error(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Mean squared error per column of ``x`` on the affine grid over [lo, hi] (float64)."""
    x = x.astype(np.float64)
    scale = np.maximum((hi - lo) / float(qmax - qmin), float(np.finfo(np.float32).eps))
    zp = np.clip(qmin - np.round(lo / scale), qmin, qmax)
    return (((np.clip(np.round(x / scale + zp), qmin, qmax) - zp) * scale - x) ** 2).mean(0)
