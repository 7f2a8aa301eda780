"""Quantizers: Uniform (torch.ao math, bit-exact) and Log2 (softmax), with a straight-through estimator.

``fake_quant`` dispatches on grad mode: under ``torch.no_grad``/``inference_mode`` it runs an in-place
kernel (the arithmetic of ``torch.fake_quantize_per_*_affine``, several times faster on CPU); with
grad enabled it wraps the same arithmetic in an autograd function whose backward is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitq.quant.config import BitTypeConfig

__all__ = ["FLOAT32_EPS", "Log2Quantizer", "QUANTIZERS", "UniformQuantizer", "fake_quant_log2",
           "fake_quant_uniform", "uniform_qparams"]

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
        zero_point = torch.zeros(min_val.shape, dtype=torch.int64)
    else:
        scale = (max_pos - min_neg) / float(qmax - qmin)
        scale = torch.max(scale, FLOAT32_EPS)
        zero_point = qmin - torch.round(min_neg / scale).to(torch.int)
        zero_point = torch.clamp(zero_point, qmin, qmax).to(torch.int64)
    return scale, zero_point


def _fq_kernel(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, has_zp: bool,
               inplace: bool = False) -> Tensor:
    # torch's fake_quantize kernel: round(x * (1/scale)) + zp, clamped, minus zp, times scale (bit-exact)
    y = x.mul_(torch.reciprocal(scale)) if inplace else x * torch.reciprocal(scale)
    y.round_()
    if has_zp:
        y.add_(zero_point)
    y.clamp_(qmin, qmax)
    if has_zp:
        y.sub_(zero_point)
    return y.mul_(scale)


class _UniformSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, has_zp):  # noqa: ANN001
        return _fq_kernel(x, scale, zero_point, qmin, qmax, has_zp)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        return grad, None, None, None, None, None


def fake_quant_uniform(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                       inplace: bool = False) -> Tensor:
    """Quantize-dequantize; ``scale``/``zero_point`` must already broadcast against ``x``.

    With gradients on, a straight-through estimator; otherwise the arithmetic runs in place on a fresh
    buffer, or on ``x`` itself when ``inplace`` (the caller owns ``x``).
    """
    zp = zero_point.to(x.dtype)
    has_zp = bool(zero_point.any())
    if torch.is_grad_enabled() and x.requires_grad:
        return _UniformSTE.apply(x, scale, zp, qmin, qmax, has_zp)
    return _fq_kernel(x, scale, zp, qmin, qmax, has_zp, inplace)


def _log2_kernel(x: Tensor, bits: int) -> Tensor:
    top = 2**bits - 1
    q = torch.clamp(torch.round(-torch.log2(x.clamp(min=0))), 0, top)
    return torch.where(q >= top, torch.zeros_like(x), torch.exp2(-q))


class _Log2STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits):  # noqa: ANN001
        return _log2_kernel(x, bits)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        return grad, None


def fake_quant_log2(x: Tensor, bits: int) -> Tensor:
    """Log2 quantization of values in [0, 1]: ``q = clamp(round(-log2 x), 0, 2^b-1)``, ``2^-q`` (top → 0)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Log2STE.apply(x, bits)
    return _log2_kernel(x, bits)


class UniformQuantizer:
    """Uniform integer grid: signed symmetric or unsigned affine."""

    def __init__(self, bit_type: BitTypeConfig) -> None:
        self.bit_type = bit_type

    def qparams(self, min_val: Tensor, max_val: Tensor) -> tuple[Tensor, Tensor]:
        return uniform_qparams(min_val, max_val, self.bit_type)

    def fake_quant(self, x: Tensor, scale: Tensor, zero_point: Tensor, inplace: bool = False) -> Tensor:
        return fake_quant_uniform(x, scale, zero_point, self.bit_type.qmin, self.bit_type.qmax, inplace)


class Log2Quantizer:
    """Power-of-two grid for softmax probabilities (FQ-ViT's log-int-softmax); scale is 1."""

    def __init__(self, bit_type: BitTypeConfig) -> None:
        self.bit_type = bit_type

    def qparams(self, min_val: Tensor, max_val: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(max_val.float()), torch.zeros(max_val.shape, dtype=torch.int64)

    def fake_quant(self, x: Tensor, scale: Tensor, zero_point: Tensor, inplace: bool = False) -> Tensor:
        return fake_quant_log2(x, self.bit_type.bits)


QUANTIZERS: dict[str, type[UniformQuantizer] | type[Log2Quantizer]] = {
    "Uniform": UniformQuantizer, "Log2": Log2Quantizer}
