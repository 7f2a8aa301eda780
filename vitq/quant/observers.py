"""Range observers, looked up by the YAML names: Minmax, Percentile, OMSE and KL (TensorRT entropy).

Observers work on calibration statistics in a channel-last 2-D layout: a :class:`BatchStats` holds one
batch's exact per-channel min/max and a (bounded) sample of its rows. ``observe(x2d)`` builds one
from a raw tensor, so the same code serves direct use and ranges derived from cached statistics.
Every observer supports ``layer_wise`` (one range) and ``channel_wise`` (a range per column),
vectorized over channels and candidates.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from vitq.quant.config import QuantConfig
from vitq.quant.quantizers import UniformGrid, uniform_qparams

__all__ = ["BatchStats", "KLObserver", "MinmaxObserver", "OBSERVER_REGISTRY", "Observer", "OmseObserver",
           "PercentileObserver", "create_observer", "quantile", "to_channel_last"]

OMSE_MAX_ELEMENTS = 1 << 16  # bounded sample on which OMSE scores its 90 clip candidates


_SCRATCH = threading.local()


def _scratch(numel: int) -> Tensor:
    """A float32 work buffer of ``numel`` values, kept per thread and grown on demand.

    OMSE's ~8 MB buffer, freshly allocated on every call, is page-faulted anew whenever other work has handed
    the memory back to the OS in between (as it does during a trial): up to 1.75x the time of a reused one.
    """
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH.buf = torch.empty(numel)
    return buf[:numel]


def to_channel_last(x: Tensor, axis: int) -> Tensor:
    """``x`` as (rows, channels) with ``axis`` as the column axis."""
    x = x.detach()
    return x.movedim(axis, -1).reshape(-1, x.shape[axis])


@dataclass
class BatchStats:
    """One calibration batch of one point: exact per-channel min/max and a sample of rows (R, C)."""

    sample: Tensor
    cmin: Tensor
    cmax: Tensor
    n_rows: int = 0  # rows of the batch the sample was drawn from (0: unknown)

    @classmethod
    def from_2d(cls, x2d: Tensor, max_elements: int | None = None, seed: int = 0) -> BatchStats:
        x2d = x2d.detach().float()
        cmin, cmax = torch.aminmax(x2d, dim=0)
        rows, cols = x2d.shape
        if max_elements is not None and rows * cols > max_elements:
            keep = max(1, max_elements // cols)
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(rows, generator=g)[:keep].sort().values
            x2d = x2d.index_select(0, idx)
        return cls(x2d.clone(), cmin, cmax, rows)

    @property
    def exact(self) -> bool:
        """True when the sample holds every row of the batch (weights, small activations)."""
        return self.sample.shape[0] == self.n_rows

    def sorted(self, channel_wise: bool) -> Tensor:
        """The sample sorted per column (channel_wise) or flattened and sorted; computed once."""
        key = "_sorted_c" if channel_wise else "_sorted_t"
        cached = self.__dict__.get(key)
        if cached is None:
            cached = self.sample.sort(dim=0).values if channel_wise else self.sample.reshape(-1).sort().values
            self.__dict__[key] = cached
        return cached

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sample, self.cmin, self.cmax))


def quantile(x: Tensor, q: float, dim: int | None = None) -> Tensor:
    """``numpy.quantile`` (linear interpolation) along ``dim`` (all elements when None), any size."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    return quantile_sorted(x.sort(dim=dim).values, q, dim)


def quantile_sorted(s: Tensor, q: float, dim: int = 0) -> Tensor:
    """Quantile of values already sorted along ``dim`` (numpy's linear method and its ``_lerp``)."""
    n = s.shape[dim]
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    t = pos - lo
    a, b = s.select(dim, lo).double(), s.select(dim, hi).double()
    diff = b - a
    out = b - diff * (1 - t) if t >= 0.5 else a + diff * t
    return out.float()


class Observer:
    """Base class: ``update`` with batch statistics, then ``compute`` → (min, max) of the range."""

    name = "Observer"
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


@register_observer
class MinmaxObserver(Observer):
    """Running min/max over all calibration batches."""

    name = "MinmaxObserver"

    def update(self, s: BatchStats) -> None:
        self._track_minmax(s)


@register_observer
class PercentileObserver(Observer):
    """Per batch ``max = quantile(x, alpha)``, ``min = quantile(x, 1-alpha)``; smoothed ``v += sigma (cur - v)``."""

    name = "PercentileObserver"
    depends_on = ("percentile_alpha", "percentile_sigma")

    def update(self, s: BatchStats) -> None:
        a = self.cfg.percentile_alpha
        srt = s.sorted(self.channel_wise)
        lo, hi = quantile_sorted(srt, 1 - a), quantile_sorted(srt, a)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            sigma = self.cfg.percentile_sigma
            self.min_val = self.min_val + sigma * (lo - self.min_val)
            self.max_val = self.max_val + sigma * (hi - self.max_val)


def _subsample_rows(x: Tensor, max_elements: int) -> Tensor:
    rows, cols = x.shape
    if rows * cols <= max_elements:
        return x
    keep = max(1, max_elements // cols)
    idx = torch.linspace(0, rows - 1, keep).round().long()
    return x.index_select(0, idx)


@register_observer
class OmseObserver(Observer):
    """Clip factors ``1 - 0.01 i`` (i = 0..89) of min/max; keep the one of least fake-quant MSE.

    Scored on a bounded sample of all calibration batches, all candidates at once (in chunks of
    ~``chunk_elements`` values, on one buffer reused across calls). ``channel_wise`` ranges are the per-channel
    min/max times a clip factor chosen per channel when the scored rows are the whole data (weights) or at
    least ``min_rows_per_channel``; with fewer sampled rows a per-channel choice overfits the sample
    (it clips tails the sample missed: 8-40x the MSE of min/max on 256 rows), so one factor of least
    total MSE is shared by all channels (within ~1-15 % of per-channel OMSE on the full data).
    """

    name = "OmseObserver"
    depends_on = ("bit_type",)
    n_candidates = 90
    min_rows_per_channel = 4096
    chunk_elements = 1 << 21  # candidates scored together: ~8 MB of work buffer

    def __init__(self, cfg: QuantConfig, max_elements: int = OMSE_MAX_ELEMENTS) -> None:
        super().__init__(cfg)
        self.max_elements = max_elements
        self.samples: list[BatchStats] = []

    def update(self, s: BatchStats) -> None:
        self._track_minmax(s)
        self.samples.append(s)

    def candidate_errors(self, x: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Clip factors (K,) and the mean squared fake-quant error of ``x`` (R, C) under each: (K, C)."""
        bt = self.cfg.bit_type
        factors = 1.0 - 0.01 * torch.arange(self.n_candidates, dtype=torch.float32)
        chunk = max(1, min(self.n_candidates, self.chunk_elements // max(1, x.numel())))
        work = _scratch(chunk * x.numel()).view(chunk, *x.shape)  # one buffer for every chunk and call
        errs = []
        for start in range(0, self.n_candidates, chunk):
            f = factors[start:start + chunk].view(-1, 1)  # (k, 1)
            scale, zp = uniform_qparams(lo.reshape(1, -1) * f, hi.reshape(1, -1) * f, bt)  # (k, C)
            grid = UniformGrid(scale.unsqueeze(1), zp.unsqueeze(1), bt.qmin, bt.qmax)
            y = grid.kernel(x.unsqueeze(0), out=work[:len(f)])  # (k, R, C)
            errs.append(y.sub_(x).square_().mean(dim=1))
        return factors, torch.cat(errs)

    def compute(self) -> tuple[Tensor, Tensor]:
        lo, hi = super().compute()
        x = torch.cat([s.sample for s in self.samples])
        exact = all(s.exact for s in self.samples)
        xs = _subsample_rows(x, self.max_elements)
        exact = exact and xs.shape[0] == x.shape[0]
        if not self.channel_wise:
            xs = xs.reshape(-1, 1)
        factors, err = self.candidate_errors(xs, lo, hi)  # (K, C)
        if self.channel_wise and (exact or xs.shape[0] >= self.min_rows_per_channel):
            best_f = factors[err.argmin(dim=0)]  # first minimum: the least clipping among ties
        else:
            best_f = factors[err.sum(dim=1).argmin()]
        return lo * best_f, hi * best_f


@register_observer
class KLObserver(Observer):
    """TensorRT entropy calibration on a ``kv_bins``-bin histogram of |x|.

    The bin width is set by the first batch; a later batch with a larger max grows the histogram by
    merging adjacent bins (width doubles, exactly), so it always spans the data in ``kv_bins`` bins.
    Thresholds ``i`` from bin ``max(128, levels)`` to ``kv_bins`` are scanned: P = bins[:i] with the
    outliers added to bin i-1; Q = bins[:i] merged into ``levels`` groups (``i // levels`` bins each,
    the last one taking the rest) and spread back over the non-empty bins; the least KL(P‖Q) wins and
    the range is ±``i · width`` (unsigned: [max(min, -t), t]). levels = 2^(bits-1) signed, 2^bits unsigned.
    """

    name = "KLObserver"
    depends_on = ("bit_type", "kv_bins")
    start_bin = 128

    def __init__(self, cfg: QuantConfig) -> None:
        super().__init__(cfg)
        self.bins = cfg.kv_bins
        self.hist: Tensor | None = None  # (C, bins) float64
        self.width: Tensor | None = None  # (C,)

    def update(self, s: BatchStats) -> None:
        self._track_minmax(s)
        amax = torch.maximum(s.cmin.abs(), s.cmax.abs()).double()
        x = s.sample.abs().double()
        if not self.channel_wise:
            amax, x = amax.max().reshape(1), x.reshape(-1, 1)
        if self.hist is None or self.width is None:
            self.width = torch.where(amax > 0, amax / self.bins, torch.ones_like(amax))
            self.hist = torch.zeros(amax.numel(), self.bins, dtype=torch.float64)
        else:
            self._grow(amax)
        self._accumulate(x)

    def _grow(self, amax: Tensor) -> None:
        assert self.hist is not None and self.width is not None
        need = torch.clamp(torch.ceil(torch.log2(amax / (self.width * self.bins))), min=0).long()
        for k in need.unique().tolist():
            if k == 0:
                continue
            rows = (need == k).nonzero().view(-1)
            group = 2**k
            h = self.hist[rows]
            pad = (-self.bins) % group
            h = torch.nn.functional.pad(h, (0, pad)).view(len(rows), -1, group).sum(-1)
            self.hist[rows] = torch.nn.functional.pad(h, (0, self.bins - h.shape[1]))
            self.width[rows] = self.width[rows] * group

    def _accumulate(self, x: Tensor) -> None:
        assert self.hist is not None and self.width is not None
        cols = x.shape[1]
        idx = torch.clamp((x / self.width).floor().long(), max=self.bins - 1)
        flat = idx + torch.arange(cols).view(1, -1) * self.bins
        self.hist += torch.bincount(flat.reshape(-1), minlength=cols * self.bins).view(cols, self.bins).double()

    def levels(self) -> int:
        bt = self.cfg.bit_type
        return 2 ** (bt.bits - 1) if bt.signed else 2**bt.bits

    def compute(self) -> tuple[Tensor, Tensor]:
        lo, hi = super().compute()
        assert self.hist is not None and self.width is not None
        best_i = kl_best_bins(self.hist, self.levels(), self.start_bin)
        t = (best_i.double() * self.width).float()
        if not self.channel_wise:
            t = t[0]
        if self.cfg.bit_type.signed:
            return -t, t
        return torch.maximum(lo, -t), t


KL_CHUNK_ROWS = 64  # channels scored together: the (thresholds × channels) float64 arrays stay in cache


def kl_best_bins(hist: Tensor, levels: int, start_bin: int = 128) -> Tensor:
    """Per row of ``hist`` (C, B): the number of retained bins ``i`` of least KL(P‖Q) (first minimum).

    Rows are scored ``KL_CHUNK_ROWS`` at a time (~1.5x faster than all at once for 256 channels).
    """
    if hist.shape[0] > KL_CHUNK_ROWS:
        return torch.cat([_kl_best_bins(h, levels, start_bin) for h in hist.split(KL_CHUNK_ROWS)])
    return _kl_best_bins(hist, levels, start_bin)


def _kl_best_bins(hist: Tensor, levels: int, start_bin: int = 128) -> Tensor:
    """:func:`kl_best_bins` on one chunk of rows.

    KL is evaluated in closed form from prefix sums: within a merged group Q is constant over the
    non-empty bins, so Σ p log q reduces to a sum over the ``levels`` groups. Thresholds with the same
    group width ``m = i // levels`` share every group but the last, so those ``levels - 1`` group terms
    are computed once per ``m``: the cost is O(C · (widths · levels + thresholds)).
    """
    rows, nbins = hist.shape
    if levels > nbins:
        return torch.full((rows,), nbins, dtype=torch.long)
    start = min(max(start_bin, levels), nbins)
    h = hist.double()

    xlogy = torch.special.xlogy  # x · log(y), 0 where x == 0

    def group_mean(gsum: Tensor, gcnt: Tensor) -> Tensor:
        """Q's value on a merged group: its mass over its non-empty bins."""
        return gsum / gcnt.clamp(min=1)

    # bins-major layout (B + 1, C): gathering thresholds picks contiguous rows
    zero = torch.zeros(1, rows, dtype=torch.float64)
    ht = h.t().contiguous()
    cs = torch.cat([zero, ht.cumsum(0)])  # cs[j] = sum(h[:, :j])
    nz = torch.cat([zero, (ht > 0).double().cumsum(0)])
    hl = torch.cat([zero, xlogy(ht, ht).cumsum(0)])
    total = cs[-1:]  # (1, C)
    log_total = torch.log(total.clamp(min=1e-300))
    i = torch.arange(start, nbins + 1)  # (T,) candidate thresholds
    m = i // levels
    widths, m_idx = torch.unique(m, return_inverse=True)
    starts = widths.view(-1, 1) * torch.arange(levels - 1).view(1, -1)  # (W, L-1): the full groups [g·w, (g+1)·w)
    ends = starts + widths.view(-1, 1)
    gsum = cs[ends] - cs[starts]  # (W, L-1, C); W·(L-1) ≤ bins
    sum_head = xlogy(gsum, group_mean(gsum, nz[ends] - nz[starts])).sum(1)[m_idx]  # (T, C): Σ gsum log q
    last_start = (levels - 1) * m  # (T,) the last group runs to i
    s_i = cs[start:]  # (T, C) = cs[i] (i runs over consecutive bins: slices, not gathers): mass of Q
    head = cs[start - 1:-1]  # cs[i - 1]: mass of bins before the last retained one
    last_sum, last_cnt = s_i - cs[last_start], nz[start:] - nz[last_start]
    last_mean = group_mean(last_sum, last_cnt)
    h_last = s_i - head  # (T, C) the last retained bin (Q there: the last group's mean, if non-empty)
    # Σ_{j<i-1} p_j log p_j  and  Σ_{j<i-1} p_j log q_j, times the total count; the last group's bins
    # before i-1 hold (last_sum - h_last) at q = last_mean
    plogp = hl[start - 1:-1] - head * log_total
    plogq = (sum_head + xlogy(last_sum - h_last, last_mean)) - head * torch.log(s_i.clamp(min=1e-300))
    p_last = h_last + (total - s_i)  # the last bin takes the outliers
    q_last_n = torch.where(h_last > 0, last_mean / s_i.clamp(min=1e-300), 0.0).clamp_(min=1e-12)
    last = xlogy(p_last, p_last / q_last_n) - p_last * log_total
    kl = (plogp - plogq + last) / total.clamp(min=1e-300)  # (T, C)
    return i[kl.argmin(dim=0)]
