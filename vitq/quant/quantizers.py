"""Quantizers: Uniform (torch.ao math, bit-exact) and Log2 (softmax), with a straight-through estimator.

A quantizer's ``grid(scale, zero_point)`` prepares a fake quantizer once per config. It dispatches on
grad mode: under ``torch.no_grad``/``inference_mode`` it runs an in-place kernel (the arithmetic of
``torch.fake_quantize_per_*_affine``, several times faster on CPU); with grad enabled it wraps the same
arithmetic in an autograd function whose backward is the identity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vitq.quant.config import BitTypeConfig

__all__ = ["FLOAT32_EPS", "PTF_K", "QUANTIZERS", "Log2Quantizer", "UniformGrid", "UniformQuantizer", "affine_qparams",
           "fake_quant_log2", "fake_quant_uniform", "ptf_qparams", "uniform_qparams"]

FLOAT32_EPS = torch.tensor(torch.finfo(torch.float32).eps)


def uniform_qparams(min_val: Tensor, max_val: Tensor, bit_type: BitTypeConfig) -> tuple[Tensor, Tensor]:
    """Scale and zero point from a range, exactly as ``torch.ao``'s MinMaxObserver computes them.

    Signed → symmetric (zero point 0); unsigned → affine with the range widened to include 0.
    """
    qmin, qmax = bit_type.qmin, bit_type.qmax
    min_val = min_val.float()
    max_val = max_val.float()
    min_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_pos = torch.max(max_val, torch.zeros_like(max_val))
    if bit_type.signed:
        max_pos = torch.max(-min_neg, max_pos)
        scale = max_pos / (float(qmax - qmin) / 2)
        scale = torch.max(scale, FLOAT32_EPS)
        zero_point = torch.zeros_like(min_val, dtype=torch.int64)
    else:
        scale = (max_pos - min_neg) / float(qmax - qmin)
        scale = torch.max(scale, FLOAT32_EPS)
        zero_point = qmin - torch.round(min_neg / scale).to(torch.int)
        zero_point = torch.clamp(zero_point, qmin, qmax).to(torch.int64)
    return scale, zero_point


def affine_qparams(min_val: Tensor, max_val: Tensor, bit_type: BitTypeConfig) -> tuple[Tensor, Tensor]:
    """FQ-ViT's affine grid for any sign: ``scale = (max - min) / (qmax - qmin)`` (at least float32 eps) and
    ``zp = clamp(qmin - round(min / scale), qmin, qmax)``; the range is not widened to include 0."""
    qmin, qmax = bit_type.qmin, bit_type.qmax
    scale = torch.clamp((max_val.float() - min_val.float()) / float(qmax - qmin), min=FLOAT32_EPS.item())
    zero_point = torch.clamp(qmin - torch.round(min_val.float() / scale), qmin, qmax).to(torch.int64)
    return scale, zero_point


PTF_K = 3  # FQ-ViT's power-of-two factors 2^0..2^K


def ptf_qparams(lo: Tensor, hi: Tensor, x: Tensor, bit_type: BitTypeConfig, k: int = PTF_K,
                weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """FQ-ViT's Power-of-Two Factor: one layer-wise range, a per-channel scale ``s·2^f / 2^K`` (f in 0..K).

    ``s = (hi - lo) / (qmax - qmin)`` and the zero point ``clamp(qmin - round(lo / s))`` come from the layer-wise
    range (as FQ-ViT's PtfObserver computes them); each channel of ``x`` (rows, channels) takes the factor with the
    least mean squared fake-quant error (the first on ties), its rows weighted by ``weight`` (rows, channels) if
    given. Returns per-channel scale and zero point (C,).
    """
    qmin, qmax = bit_type.qmin, bit_type.qmax
    base, zp = affine_qparams(lo, hi, bit_type)
    zp = zp.float()
    best_err, best_scale = None, None
    for f in range(k + 1):
        scale = base / 2 ** (k - f)
        err = ((torch.round(x / scale + zp).clamp_(qmin, qmax) - zp) * scale - x).square_()
        err = err.mean(dim=0) if weight is None else err.mul_(weight).sum(dim=0) / weight.sum(dim=0).clamp(min=1)
        if best_err is None:
            best_err, best_scale = err, torch.full_like(err, float(scale))
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale.expand_as(err), best_scale)
    assert best_scale is not None
    return best_scale, torch.full_like(best_scale, float(zp)).to(torch.int64)


class UniformGrid:
    """A uniform grid prepared once per config: scale, its reciprocal, zero point and integer bounds.

    Calling it fake-quantizes with the arithmetic of ``torch.fake_quantize_per_*_affine`` (bit-exact on finite
    values; NaN stays NaN, where ATen's kernel returns a grid value): ``round(x * (1/scale)) + zp``, clamped, minus
    ``zp``, times ``scale``. With gradients on it is a straight-through estimator; otherwise it runs in place on a
    fresh buffer, or on ``x`` itself when ``inplace`` (the caller owns ``x``). ``scale``/``zero_point`` must already
    broadcast against ``x``.
    ``has_zp`` says whether to add and subtract the zero point; left out, it is read from ``zero_point`` (on a GPU,
    one read back to the host).
    """

    __slots__ = ("has_zp", "inv_scale", "qmax", "qmin", "scale", "zero_point")

    def __init__(self, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, has_zp: bool | None = None) -> None:
        self.scale = scale
        self.inv_scale = torch.reciprocal(scale)
        self.zero_point = zero_point.to(scale.dtype)
        self.has_zp = bool(zero_point.any()) if has_zp is None else has_zp  # True: add/subtract it (exact if 0)
        self.qmin, self.qmax = qmin, qmax

    def to_int(self, x: Tensor, inplace: bool = False, out: Tensor | None = None) -> Tensor:
        """The integer codes ``clamp(round(x / scale) + zp)`` as floats (no gradient), in ``out`` if given."""
        if out is not None:
            y = torch.mul(x, self.inv_scale, out=out)
        else:
            y = x.mul_(self.inv_scale) if inplace else x * self.inv_scale
        y.round_()
        if self.has_zp:
            y.add_(self.zero_point)
        return y.clamp_(self.qmin, self.qmax)

    def kernel(self, x: Tensor, inplace: bool = False, out: Tensor | None = None) -> Tensor:
        y = self.to_int(x, inplace, out)
        if self.has_zp:
            y.sub_(self.zero_point)
        return y.mul_(self.scale)

    def __call__(self, x: Tensor, inplace: bool = False) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _UniformSTE.apply(x, self)
        return self.kernel(x, inplace)


class _UniformSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid):  # noqa: ANN001
        return grid.kernel(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        return grad, None


def fake_quant_uniform(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                       inplace: bool = False) -> Tensor:
    """Quantize-dequantize on the grid (``scale``, ``zero_point``, [qmin, qmax]); see :class:`UniformGrid`."""
    return UniformGrid(scale, zero_point, qmin, qmax)(x, inplace)


def _log2_kernel(x: Tensor, bits: int) -> Tensor:
    """FQ-ViT's Log2Quantizer: ``q = clamp(round(-log2 x), 0, 2^b - 1)`` dequantized to ``2^-q``; values whose
    rounded exponent is past the grid (``>= 2^b``, and 0) become 0; the top code ``2^b - 1`` is kept."""
    levels = 2**bits
    r = torch.round(-torch.log2(x.clamp(min=0)))
    return torch.where(r >= levels, torch.zeros_like(x), torch.exp2(-r.clamp(0, levels - 1)))


class _Log2STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits):  # noqa: ANN001
        return _log2_kernel(x, bits)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        return grad, None


def fake_quant_log2(x: Tensor, bits: int) -> Tensor:
    """Log2 quantization of values in [0, 1] (FQ-ViT's): ``2^-clamp(round(-log2 x), 0, 2^b-1)``, 0 past the grid."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Log2STE.apply(x, bits)
    return _log2_kernel(x, bits)


class UniformQuantizer:
    """Uniform integer grid: signed symmetric or unsigned affine."""

    def __init__(self, bit_type: BitTypeConfig) -> None:
        self.bit_type = bit_type

    def qparams(self, min_val: Tensor, max_val: Tensor) -> tuple[Tensor, Tensor]:
        return uniform_qparams(min_val, max_val, self.bit_type)

    def grid(self, scale: Tensor, zero_point: Tensor) -> UniformGrid:
        """The prepared fake quantizer ``fq(x, inplace)`` for broadcastable ``scale``/``zero_point``."""
        return UniformGrid(scale, zero_point, self.bit_type.qmin, self.bit_type.qmax)


class Log2Quantizer:
    """Power-of-two grid for softmax probabilities (FQ-ViT's log-int-softmax); scale is 1."""

    def __init__(self, bit_type: BitTypeConfig) -> None:
        self.bit_type = bit_type

    def qparams(self, min_val: Tensor, max_val: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(max_val.float()), torch.zeros_like(max_val, dtype=torch.int64)

    def grid(self, scale: Tensor, zero_point: Tensor) -> Callable[..., Tensor]:
        bits = self.bit_type.bits
        return lambda x, inplace=False: fake_quant_log2(x, bits)


QUANTIZERS: dict[str, type[UniformQuantizer] | type[Log2Quantizer]] = {
    "Uniform": UniformQuantizer, "Log2": Log2Quantizer}
