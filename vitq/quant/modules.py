"""Quantization modules: one ``QAct`` per quantization point, ``QLinear`` (fake-quantized weight) and
``QIntSoftmax`` (I-BERT integer softmax with a quantized output).

A point goes through three states: ``fp`` (pass-through), ``calib`` (records :class:`BatchStats` of
the FP values, quantization off) and ``quant`` (ranges frozen, fake quantization on when enabled).
Statistics are kept after calibration, so :meth:`QAct.set_config` derives the ranges of any other
config (observer, bits, alpha, ...) without another forward pass. Ranges are memoized per observer key
(only the fields an observer reads), qparams and fake quantizers per config.
"""

from __future__ import annotations

import contextlib
import functools
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitq.quant.config import QuantConfig
from vitq.quant.observers import OBSERVER_REGISTRY, BatchStats, create_observer, scoring_rows, to_channel_last
from vitq.quant.quantizers import QUANTIZERS, UniformGrid, affine_qparams, ptf_qparams

__all__ = ["NonFiniteActivationError", "QAct", "QIntSoftmax", "QLinear", "QPoint", "QWeight", "calibration_of",
           "int_layernorm", "int_softmax", "profile_rows"]

STATS_MAX_ELEMENTS = 1 << 18  # per point and calibration batch; more rows are sampled (seeded)
PROFILE_MAX_ELEMENTS = 1 << 14  # per point and profiled batch; evenly spaced runs beyond that
PROFILE_RUN = 1 << 10
# per-config state of the points and QLinear: never a Parameter, buffer or Module
_PLAIN_STATE = frozenset({"cfg", "prof", "_d", "state", "profiling", "_cached", "_cached_key", "_cached_prof"})
SUMMARY_COLUMNS = ("range_min", "range_max", "scale", "zero_point")  # a derived range's columns of the profile


class NonFiniteActivationError(ValueError):
    """Calibration saw NaN or infinite values at a quantization point."""


@functools.lru_cache(maxsize=64)
def _sample_index(n: int, device: torch.device) -> Tensor:
    """Flat positions of ``PROFILE_MAX_ELEMENTS // PROFILE_RUN`` runs of ``PROFILE_RUN`` values, evenly spaced over
    ``n`` values."""
    runs = PROFILE_MAX_ELEMENTS // PROFILE_RUN
    starts = torch.arange(runs, device=device) * (n // runs)
    return (starts[:, None] + torch.arange(PROFILE_RUN, device=device)).reshape(-1)


class _Profile:
    """Signal and noise energy of sampled FP values and their quantized copies, summed on their device: nothing is
    read back while a forward runs (on a GPU, no copy to the host per point); :func:`profile_rows` reads ``sums``
    of every point in one copy."""

    __slots__ = ("count", "sums")

    def __init__(self) -> None:
        self.count = 0
        self.sums: Tensor | None = None  # (signal, noise), None before any add

    @staticmethod
    def sample(x: Tensor, copy: bool = True) -> Tensor:
        """At most ``PROFILE_MAX_ELEMENTS`` values of ``x`` as float: evenly spaced contiguous runs of its flattened
        values (a strided view's copy, or where ``x`` is not contiguous one gather: not a copy of all of ``x``); all
        of a smaller ``x``, copied unless ``copy`` is off."""
        f = x.detach()
        n = f.numel()
        if n > PROFILE_MAX_ELEMENTS:
            if f.is_contiguous():  # the runs as one strided view: a single copy
                runs = PROFILE_MAX_ELEMENTS // PROFILE_RUN
                f = f.as_strided((runs, PROFILE_RUN), (n // runs, 1)).reshape(-1)
            else:
                f = torch.take(f, _sample_index(n, f.device))
            return f.float()
        if f.dtype == torch.float32:
            return f.reshape(-1).clone() if copy else f.reshape(-1)
        return f.reshape(-1).float()

    def add(self, fp: Tensor, q: Tensor) -> None:
        """Accumulate signal and noise energy of FP values ``fp`` and their quantized copy ``q``."""
        f, g = self.sample(fp, copy=False), self.sample(q, copy=False)
        d = f - g
        sums = torch.stack((torch.dot(f, f), torch.dot(d, d)))
        self.sums = sums if self.sums is None else self.sums.add_(sums)
        self.count += f.numel()


class _Derived(NamedTuple):
    """What a config derives from the statistics: the range, qparams and the prepared fake quantizer."""

    range: tuple[Tensor, Tensor]
    scale: Tensor
    zero_point: Tensor
    fq: Callable[..., Tensor]
    summary: Tensor  # the profile table's SUMMARY_COLUMNS, on the range's device (read with the profile)


def _set_state(module: nn.Module, name: str, value: Any) -> None:
    """``__setattr__`` of the points and QLinear: their per-config state (``_PLAIN_STATE``) skips nn.Module's
    registry checks (a few µs each; ~270 per trial of the digits reference: 0.7 of its 2.1 ms of ``set_config``)."""
    if name in _PLAIN_STATE:
        object.__setattr__(module, name, value)
    else:
        nn.Module.__setattr__(module, name, value)


class QPoint(nn.Module):
    """What every quantization point has: its config, calibration statistics, the range derived from them
    (memoized per observer key), qparams, the prepared fake quantizer and a profile row.

    ``axis`` is the channel axis of the ``ndim``-dimensional tensors it sees (for ``channel_wise``).
    """

    __setattr__ = _set_state

    def __init__(self, key: str, cfg: QuantConfig, axis: int, ndim: int, block_index: int | None = None,
                 profiling: bool = False) -> None:
        super().__init__()
        self.key = key
        self.block_index = block_index
        self.axis = axis
        self.ndim = ndim
        self.cfg = cfg
        self.profiling = profiling
        self.state = "fp"
        self.stats: list[BatchStats] = []
        self._memo: dict[tuple, _Derived] = {}
        self._ranges: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._d: _Derived | None = None  # what the current config derived (None: disabled or not frozen)
        self._observed: tuple[float, float] | None = None
        self.prof = _Profile()

    # ------------------------------------------------------------------ identity
    @property
    def label(self) -> str:
        return self.key if self.block_index is None else f"blocks.{self.block_index}.{self.key}"

    @property
    def active(self) -> bool:
        """True when this point changes or watches values (calibrating, or quantizing and enabled)."""
        return self.state == "calib" or (self.state == "quant" and self.cfg.enabled)

    @property
    def fq(self) -> Callable[..., Tensor] | None:
        """The prepared fake quantizer of the current config."""
        return self._d.fq if self._d is not None else None

    @property
    def range(self) -> tuple[Tensor, Tensor] | None:
        return self._d.range if self._d is not None else None

    @property
    def scale(self) -> Tensor | None:
        return self._d.scale if self._d is not None else None

    @property
    def zero_point(self) -> Tensor | None:
        return self._d.zero_point if self._d is not None else None

    # ------------------------------------------------------------------ calibration
    def begin_calibration(self) -> None:
        self.stats = []
        self.clear_memo()
        self.state = "calib"

    def clear_memo(self) -> None:
        """Forget derived ranges (the statistics changed)."""
        self._memo.clear()
        self._ranges.clear()
        self._observed = None

    def freeze(self) -> None:
        """End calibration: derive ranges for the current config and switch quantization on."""
        self.state = "quant"
        self._derive()

    def set_config(self, cfg: QuantConfig) -> None:
        """Use another config; ranges come from the kept statistics (no forward pass)."""
        self.cfg = cfg
        self.prof = _Profile()
        if self.state == "quant":
            self._derive()

    def derived_key(self) -> tuple:
        c = self.cfg
        return (OBSERVER_REGISTRY[c.observer_type].range_key(c), c.quantization_method, c.bit_type)

    def _derive(self) -> None:
        """Range, qparams and fake quantizer of the current config.

        Memoized twice: ranges per observer key (a Minmax range serves every bit width, an OMSE range every
        alpha), and the derived qparams/fake quantizer per (range, method, bit type).
        """
        self._d = None
        if not self.cfg.enabled:
            return
        if not self.stats:
            raise RuntimeError(f"{self.label}: no calibration statistics; run calibration first")
        key = self.derived_key()
        d = self._memo.get(key)
        if d is None:
            rng = self._ranges.get(key[0])
            if rng is None:
                obs = create_observer(self.cfg)
                for s in self.stats:
                    obs.update(s)
                rng = self._ranges[key[0]] = obs.compute()
            lo, hi = rng
            quantizer = QUANTIZERS[self.cfg.quantization_method](self.cfg.bit_type)
            if self.cfg.calibration_mode == "ptf":  # per-channel power-of-two factors, scored on every value
                pieces = scoring_rows(self.stats, channel_wise=True)
                x = torch.cat([p[0] for p in pieces])
                w = None if all(p[1] is None for p in pieces) else torch.cat(
                    [torch.ones_like(p[0]) if p[1] is None else p[1] for p in pieces])
                scale, zero_point = ptf_qparams(lo, hi, x, self.cfg.bit_type, weight=w)
            elif OBSERVER_REGISTRY[self.cfg.observer_type].affine and self.cfg.quantization_method == "Uniform":
                scale, zero_point = affine_qparams(lo, hi, self.cfg.bit_type)
            else:
                scale, zero_point = quantizer.qparams(lo, hi)
            shape = (-1,) + (1,) * (self.ndim - 1 - self.axis) if scale.ndim else ()
            grid = quantizer.grid(scale.reshape(shape), zero_point.reshape(shape))
            summary = torch.stack((lo.min().float(), hi.max().float(), scale.float().mean(),
                                   zero_point.float().mean().to(scale.device)))
            d = self._memo[key] = _Derived((lo, hi), scale, zero_point, grid, summary)
        self._d = d

    def observed_minmax(self) -> tuple[float, float]:
        if not self.stats:
            return math.nan, math.nan
        if self._observed is None:
            self._observed = (float(torch.stack([s.cmin.min() for s in self.stats]).min()),
                              float(torch.stack([s.cmax.max() for s in self.stats]).max()))
        return self._observed

    # ------------------------------------------------------------------ forward
    def quantize(self, x: Tensor, inplace: bool = False) -> Tensor:
        assert self.fq is not None
        return self.fq(x, inplace)

    def profile_tensors(self) -> list[Tensor]:
        """The device values of this point's profile row, which :meth:`profile_row` takes back read, in order."""
        out = [self._d.summary] if self.cfg.enabled and self._d is not None else []
        return out if self.prof.sums is None else [*out, self.prof.sums]

    def profile_row(self, values: Iterator[float] | None = None) -> dict:
        """Observed range, derived range/scale/zero point, MSE and SQNR; ``values`` are :meth:`profile_tensors` read
        (by :func:`profile_rows`, for every point in one copy), else they are read here."""
        if values is None:
            return profile_rows([self])[0]
        lo, hi = self.observed_minmax()
        c = self.cfg
        row = {"block": self.block_index, "point": self.key, "enabled": c.enabled, "bits": c.bit_type.bits,
               "signed": c.bit_type.signed, "observer": c.observer_type, "mode": c.calibration_mode,
               "method": c.quantization_method, "observed_min": lo, "observed_max": hi,
               "range_min": math.nan, "range_max": math.nan, "scale": math.nan, "zero_point": math.nan,
               "n_channels": 0, "mse": math.nan, "sqnr_db": math.nan}
        if c.enabled and self._d is not None:
            row.update(zip(SUMMARY_COLUMNS, (next(values) for _ in SUMMARY_COLUMNS), strict=True))
            row["n_channels"] = self._d.scale.numel()
        if self.prof.sums is not None:
            signal, noise = next(values), next(values)
            row["mse"] = noise / self.prof.count
            if noise:
                row["sqnr_db"] = 10 * math.log10(signal / noise) if signal else -math.inf
            else:
                row["sqnr_db"] = math.inf if signal else math.nan
        return row


def profile_rows(points: Sequence[QPoint]) -> list[dict]:
    """The profile rows of ``points``, with every device value they need read back in one copy (on a GPU, one
    device-to-host copy per trial instead of several per point)."""
    tensors = [t for p in points for t in p.profile_tensors()]
    values = iter(torch.cat([t.to(tensors[0].device) for t in tensors]).tolist() if tensors else [])
    return [p.profile_row(values) for p in points]


class QAct(QPoint):
    """An activation point: records statistics of the values it sees during calibration, then fake-quantizes them
    (in place when its owner hands it fresh tensors)."""

    def __init__(self, key: str, cfg: QuantConfig, axis: int, ndim: int, block_index: int | None = None,
                 profiling: bool = False, max_sample_elements: int | None = STATS_MAX_ELEMENTS) -> None:
        super().__init__(key, cfg, axis, ndim, block_index, profiling)
        self.max_sample_elements = max_sample_elements
        self.inplace = False  # set by an owner that hands this point fresh tensors it may overwrite

    def record(self, x: Tensor) -> None:
        x2d = to_channel_last(x, self.axis)
        seed = zlib.crc32(f"{self.label}/{len(self.stats)}".encode())
        s = BatchStats.from_2d(x2d, self.max_sample_elements, seed)
        if not (torch.isfinite(s.cmin).all() and torch.isfinite(s.cmax).all()):
            raise NonFiniteActivationError(
                f"{self.label}: calibration saw NaN/inf activations (batch {len(self.stats)}); "
                "check the model's weights and the input images")
        self.stats.append(s)

    def forward(self, x: Tensor) -> Tensor:
        if self.state == "calib":
            self.record(x)
            return x
        if self.state != "quant" or not self.cfg.enabled:
            return x
        fp = _Profile.sample(x) if self.profiling else None
        q = self.quantize(x, inplace=self.inplace and not (torch.is_grad_enabled() and x.requires_grad))
        if fp is not None:
            self.prof.add(fp, q)
        return q


class QWeight(QPoint):
    """A weight point: its statistics are one exact look at the (static) weight tensor."""

    def observe(self, w: Tensor) -> None:
        self.stats = [BatchStats.from_2d(to_channel_last(w, self.axis), None)]
        self.clear_memo()


class QLinear(nn.Module):
    """A Linear whose weight is fake-quantized by the point ``wq`` (per output feature when channel_wise).

    Several Linears that read the same input (a SwiGLU's ``fc1_g`` and ``fc1_x``) form one point: their weights
    are observed and quantized as one packed (sum of outs, in) weight, and the output is their outputs side by
    side, as timm's packed ``GluMlp.fc1`` gives. With the point off, each Linear runs as timm runs it.

    Under inference/no-grad the quantized weight is computed once per config and reused; a config that derives
    the same weight quantizer (another point's bits changed) keeps it, unless a weight tensor changed.
    """

    __setattr__ = _set_state

    def __init__(self, linear: nn.Linear | Sequence[nn.Linear], wq: QWeight) -> None:
        super().__init__()
        self.parts = nn.ModuleList([linear] if isinstance(linear, nn.Linear) else linear)
        if len({lin.bias is None for lin in self.parts}) > 1 or len({lin.in_features for lin in self.parts}) > 1:
            raise ValueError("QLinear: the Linears of one point need the same input size, and biases on all or none")
        self.wq = wq
        self._cached: Tensor | None = None
        self._cached_key: tuple | None = None  # (derived quantizer, each weight's (storage, version))
        self._cached_prof = _Profile()

    @property
    def out_features(self) -> int:
        return sum(lin.out_features for lin in self.parts)

    @property
    def weight(self) -> Tensor:
        """The (packed) FP weight, (out_features, in_features)."""
        if len(self.parts) == 1:
            return self.parts[0].weight
        return torch.cat([lin.weight for lin in self.parts])

    @property
    def bias(self) -> Tensor | None:
        if len(self.parts) == 1 or self.parts[0].bias is None:
            return self.parts[0].bias
        return torch.cat([lin.bias for lin in self.parts])

    def weight_grad(self) -> Tensor | None:
        """The (packed) weight's gradient, None until every part has one."""
        grads = [lin.weight.grad for lin in self.parts]
        return None if any(g is None for g in grads) else torch.cat(grads)

    def weight_stats(self) -> None:
        """Weights are static: their 'calibration' is one exact look at the tensor."""
        with torch.no_grad():
            self.wq.observe(self.weight.detach())

    def _weight_key(self) -> tuple:
        return tuple((w.data_ptr(), None if w.is_inference() else w._version)  # inference tensors: no version
                     for w in (lin.weight.detach() for lin in self.parts))

    def refresh(self) -> None:
        if self.wq.state != "quant" or not self.wq.cfg.enabled:
            self._cached = self._cached_key = None
            return
        key = (self.wq._d, self._weight_key())
        old = self._cached_key
        if old is None or old[0] is not key[0] or old[1] != key[1]:  # (the key is None iff nothing is cached)
            with torch.no_grad():
                w = self.weight.detach()
                self._cached = self.wq.quantize(w)
            self._cached_key = key
            self._cached_prof = _Profile()
            self._cached_prof.add(w, self._cached)  # weight SQNR (cheap: once per config)
        self.wq.prof = self._cached_prof

    def quantized_weight(self) -> Tensor:
        if self.wq.state != "quant" or not self.wq.cfg.enabled:
            return self.weight
        if torch.is_grad_enabled() and any(lin.weight.requires_grad for lin in self.parts):
            return self.wq.quantize(self.weight)
        if self._cached is None:
            self.refresh()
        assert self._cached is not None
        return self._cached

    def forward(self, x: Tensor) -> Tensor:
        if self.wq.state != "quant" or not self.wq.cfg.enabled:
            if len(self.parts) == 1:
                return self.parts[0](x)
            return torch.cat([lin(x) for lin in self.parts], dim=-1)
        return F.linear(x, self.quantized_weight(), self.bias)


_IEXP_COEF = (0.35815147, 0.96963238, 1.0)
_LN2 = -0.6931
_IEXP_N = 30
IEXP_STEP = 0.6931 / 1024  # the coarsest input step i-exp runs at: ln2 spans >= 1024 codes


def iexp_refine(scale: Tensor) -> tuple[Tensor, Tensor]:
    """Integer factor ``m`` and the step ``scale / m <= IEXP_STEP`` at which i-exp runs.

    Codes times ``m`` are exact integers of the same values, so this is integer arithmetic; it keeps I-BERT's
    i-exp accurate at coarse score steps, where at the raw step ``floor(-ln2 / scale)`` is -1 (every code counts
    as one ln2) and, from a step of ~1.67, the polynomial's constant floors to 0 and every row is zero.
    """
    m = torch.ceil(scale / IEXP_STEP).clamp_(min=1)
    return m, scale / m


def _int_exp(x_int: Tensor, sf: Tensor) -> Tensor:
    """I-BERT i-exp of non-positive integers ``x_int`` (overwritten) at scale ``sf``; exp up to a constant.

    Every intermediate is an integer held exactly in float32, so the in-place order changes no bit.
    """
    x0_int = torch.floor(_LN2 / sf)
    x_int = torch.maximum(x_int, _IEXP_N * x0_int, out=x_int)
    q = torch.div(x_int, x0_int).floor_()
    r = x_int.sub_(q * x0_int)
    b_int = torch.floor(_IEXP_COEF[1] / _IEXP_COEF[0] / sf)
    c_int = torch.floor(_IEXP_COEF[2] / _IEXP_COEF[0] / sf**2)
    z = (r + b_int).mul_(r).add_(c_int)
    return z.mul_(q.neg_().add_(_IEXP_N).exp2_()).floor_().clamp_(min=0)


def int_softmax(scores: Tensor, scale: Tensor) -> Tensor:
    """Integer softmax (I-BERT) of scores that lie on the grid ``scale`` (already fake-quantized).

    With gradients on, the float softmax's gradient passes straight through (the integer path has none).
    """
    if torch.is_grad_enabled() and scores.requires_grad:
        soft = scores.softmax(dim=-1)
        with torch.no_grad():
            hard = _int_softmax(scores, scale)
        return soft + (hard - soft).detach()
    return _int_softmax(scores, scale)


def _int_softmax(scores: Tensor, scale: Tensor) -> Tensor:
    """Softmax of scores on the grid ``scale`` (any zero point: the shift by the row max removes it)."""
    x_int = torch.div(scores, scale).round_()
    x_int.sub_(x_int.amax(dim=-1, keepdim=True))
    m, step = iexp_refine(scale)
    e = _int_exp(x_int.mul_(m), step)
    return e.div_(e.sum(dim=-1, keepdim=True))


def _sampled_dequantized(x_int: Tensor, grid: UniformGrid) -> Tensor:
    """The profile's sample of the fake-quantized scores that the codes ``x_int`` stand for, dequantized after
    sampling (the same values as sampling ``(x_int - zp) * scale``, without two passes over every map)."""
    q = _Profile.sample(x_int)
    scale, zp = grid.scale, grid.zero_point
    if scale.ndim:  # per head: the same positions of the broadcast grid
        scale, zp = (_Profile.sample(t.expand_as(x_int)) for t in (scale, zp))
    if grid.has_zp:
        q.sub_(zp)
    return q.mul_(scale)


class QIntSoftmax(nn.Module):
    """Softmax over the last axis of scores quantized at ``kv_act``, its output quantized at ``intSoft``
    (Uniform, or Log2 = FQ-ViT's LIS).

    When both points quantize, the softmax itself runs in integer arithmetic (I-BERT i-exp on the codes shifted
    by their row max, so any zero point cancels; coarse steps are refined by an exact integer factor, see
    :func:`iexp_refine`). With either point disabled the float softmax runs, as the config asks. Without
    gradients it works on the integer codes directly: the shifted codes ``max - x`` take at most ``2^bits``
    values, so i-exp is a lookup table built once per scale (bit-identical to evaluating it per element).
    """

    def __init__(self, out_q: QAct) -> None:
        super().__init__()
        self.out_q = out_q
        self._lut_grid: UniformGrid | None = None
        self._lut = torch.empty(0)
        self._lut_offsets: Tensor | None = None

    def integer(self, score_q: QAct) -> bool:
        grid = score_q.fq
        if not (self.out_q.state == "quant" and self.out_q.cfg.enabled and score_q.state == "quant"
                and score_q.cfg.enabled):
            return False
        if not isinstance(grid, UniformGrid):  # validation only lets uniform grids reach kv_act
            raise TypeError(f"{score_q.label}: the integer softmax needs uniform scores, got {type(grid).__name__}")
        return True

    def forward(self, scores: Tensor, score_q: QAct) -> Tensor:
        """``scores`` (a fresh tensor: overwritten) → quantized at ``score_q`` → softmax → quantized."""
        integer = self.integer(score_q)
        if integer and not (torch.is_grad_enabled() and scores.requires_grad):
            grid = score_q.fq
            fp = _Profile.sample(scores) if score_q.profiling else None
            x_int = grid.to_int(scores, inplace=score_q.inplace)
            if fp is not None:
                score_q.prof.add(fp, _sampled_dequantized(x_int, grid))
            probs = self._lut_softmax(x_int, grid)
        else:
            scores = score_q(scores)
            probs = int_softmax(scores, score_q.fq.scale) if integer else scores.softmax(dim=-1)
        return self.out_q(probs)

    def _table(self, grid: UniformGrid) -> Tensor:
        """i-exp of -j for j = 0..qmax-qmin, one row per scale (per head when ``kv_act`` is channel_wise).

        Built when the grid changes; grids are prepared once per config (and held here), so identity is the key.
        """
        if grid is not self._lut_grid:
            n = grid.qmax - grid.qmin + 1
            m, sf = iexp_refine(grid.scale.reshape(-1, 1))
            dev = sf.device
            codes = torch.arange(n, dtype=torch.float32, device=dev).repeat(sf.shape[0], 1).mul_(m).neg_()
            self._lut = _int_exp(codes, sf).reshape(-1)
            self._lut_offsets = (torch.arange(sf.shape[0], dtype=torch.int32, device=dev) * n).view(grid.scale.shape) \
                if sf.shape[0] > 1 else None
            self._lut_grid = grid
        return self._lut

    def _lut_softmax(self, x_int: Tensor, grid: UniformGrid) -> Tensor:
        lut = self._table(grid)
        idx = torch.sub(x_int.amax(dim=-1, keepdim=True), x_int, out=x_int).to(torch.int32)  # max - x in [0, n)
        if self._lut_offsets is not None:
            idx += self._lut_offsets
        flat = idx.reshape(-1)
        e = None
        if not flat.is_cuda:  # (on CUDA an index out of the table is a device-side assert: no try there)
            with contextlib.suppress(IndexError):
                e = lut.index_select(0, flat).view(x_int.shape)
        if e is None:  # NaN scores have NaN codes, no index: NaN rows out, as the float softmax gives
            e = lut.index_select(0, flat.clamp(0, lut.numel() - 1)).view(x_int.shape)
            e = torch.where(torch.isnan(x_int), x_int, e)
        return e.div_(e.sum(dim=-1, keepdim=True))


def _mn(a: Tensor, bits: int = 7) -> tuple[Tensor, Tensor]:
    """FQ-ViT's ``get_MN``: ``a ≈ M / 2^N`` with an 8-bit multiplier ``M`` and a shift ``N`` in 0..31."""
    n = torch.clamp(bits - torch.floor(torch.log2(a)), 0, 31)
    m = torch.clamp(torch.floor(a * torch.pow(2, n)), 0, 2 ** (bits + 1) - 1)
    return m, n


def int_layernorm(x: Tensor, in_scale: Tensor, weight: Tensor, bias: Tensor | None, out_scale: Tensor,
                  eps: float = 0.0, center: bool = True) -> Tensor:
    """FQ-ViT's integer LayerNorm over the last axis of ``x``, which lies on a PTF grid (``in_scale`` per channel,
    powers of two apart): integer mean and variance, then ``(sign·M·x_q + B) >> N`` on the output grid.

    ``center=False`` is the same algorithm for an RMSNorm: the integer mean square in place of the variance, no mean
    subtracted (``bias`` None: no shift).

    ``eps`` is added to the variance, as the float LayerNorm adds it (pass the norm's ``eps``). FQ-ViT adds none:
    a token whose codes are all equal (a class or register token on a coarse grid) then divides by a zero
    standard deviation and turns the whole model NaN. Where the variance is far above ``eps`` it changes nothing.

    Returns the output on the grid ``out_scale`` (dequantized); the output point then clamps it to its range.
    """
    x_q = torch.round(x / in_scale)
    s1 = in_scale.min()
    x_q = x_q * torch.round(in_scale / s1)  # integers in units of the smallest channel scale
    c = x.shape[-1]
    var = c * x_q.square().sum(dim=-1)  # c² · the mean square (center: the variance), in units of s1²
    if center:
        var = var - x_q.sum(dim=-1).square()
    std = (s1 / c) * torch.sqrt(var + eps * (c / s1) ** 2 if eps else var)
    a = (s1 / std).unsqueeze(-1) * weight / out_scale
    m, n = _mn(a.abs())
    shift = bias if bias is not None else torch.zeros_like(weight)
    if center:
        shift = shift - (x_q.mean(dim=-1) * s1 / std).unsqueeze(-1) * weight
    b = torch.round(shift / out_scale * torch.pow(2, n))
    return torch.round((a.sign() * m * x_q + b) / torch.pow(2, n)) * out_scale


def calibration_of(points: Iterable[QAct], linears: Iterable[QLinear]) -> Iterator[None]:
    """Generator behind ``calibration()`` context managers of blocks and whole models."""
    points, linears = list(points), list(linears)
    for p in points:
        p.begin_calibration()
    for lin in linears:
        lin.wq.state = "calib"
        lin._cached = lin._cached_key = None
    try:
        yield
    except BaseException:
        for p in points:
            p.state, p.stats = "fp", []
        raise
    else:
        for lin in linears:
            lin.weight_stats()
        for p in points:
            p.freeze()
        for lin in linears:
            lin.refresh()

