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
from vitq.quant.quantizers import UniformGrid, affine_qparams

__all__ = ["BatchStats", "KLObserver", "MinmaxObserver", "OBSERVER_REGISTRY", "Observer", "OmseObserver",
           "PercentileObserver", "create_observer", "hist_quantile", "to_channel_last"]

HIST_BINS = 1 << 16  # per-batch histogram of a sampled batch: layer-wise percentiles to (batch range) / 2^16
CHANNEL_HIST_BINS = 1 << 9  # and per channel: channel-wise percentiles to (channel range) / 2^9


_SCRATCH = threading.local()


def _scratch(numel: int, device: torch.device | None = None) -> Tensor:
    """A float32 work buffer of ``numel`` values, kept per thread and grown on demand.

    OMSE's ~8 MB buffer, freshly allocated on every call, is page-faulted anew whenever other work has handed
    the memory back to the OS in between (as it does during a trial): up to 1.75x the time of a reused one.
    """
    buf = getattr(_SCRATCH, "buf", None)
    device = device or torch.device("cpu")
    if buf is None or buf.numel() < numel or buf.device != device:
        with torch.inference_mode(False):  # a normal tensor: calls outside inference mode may write to it too
            buf = _SCRATCH.buf = torch.empty(numel, device=device)
    return buf[:numel]


def to_channel_last(x: Tensor, axis: int) -> Tensor:
    """``x`` as (rows, channels) with ``axis`` as the column axis."""
    x = x.detach()
    return x.movedim(axis, -1).reshape(-1, x.shape[axis])


def _bin_counts(x: Tensor, lo: Tensor, hi: Tensor, bins: int) -> Tensor:
    """Counts of the columns of ``x`` (R, C) in ``bins`` equal bins over [lo, hi] per column: (C, bins) int32."""
    width = torch.where(hi > lo, (hi - lo) / bins, torch.ones_like(hi))
    idx = ((x - lo) / width).floor_().clamp_(0, bins - 1).long()
    cols = x.shape[1]
    idx += torch.arange(0, cols * bins, bins, device=x.device).view(1, -1)
    return torch.bincount(idx.view(-1), minlength=cols * bins).view(cols, bins).to(torch.int32)


@dataclass
class BatchStats:
    """One calibration batch of one point: exact per-channel min/max and a sample of rows (R, C).

    When the sample is not the whole batch, histograms of the whole batch are kept too (``hist``: layer-wise,
    ``HIST_BINS`` bins over the batch's range; ``chist``: ``CHANNEL_HIST_BINS`` per channel over its range), so
    percentiles see every value, to the bin width.
    """

    sample: Tensor
    cmin: Tensor
    cmax: Tensor
    n_rows: int = 0  # rows of the batch the sample was drawn from (0: unknown)
    hist: Tensor | None = None
    chist: Tensor | None = None

    @classmethod
    def from_2d(cls, x2d: Tensor, max_elements: int | None = None, seed: int = 0) -> BatchStats:
        x2d = x2d.detach().float()
        cmin, cmax = torch.aminmax(x2d, dim=0)
        rows, cols = x2d.shape
        hist = chist = None
        if max_elements is not None and rows * cols > max_elements:
            hist = _bin_counts(x2d.reshape(-1, 1), cmin.min().view(1), cmax.max().view(1), HIST_BINS)[0]
            chist = _bin_counts(x2d, cmin, cmax, CHANNEL_HIST_BINS)
            keep = max(1, max_elements // cols)
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(rows, generator=g)[:keep].sort().values
            x2d = x2d.index_select(0, idx.to(x2d.device))
        return cls(x2d.clone(), cmin, cmax, rows, hist, chist)

    def quantile(self, q: float, channel_wise: bool) -> Tensor:
        """``numpy.quantile`` (linear) of the whole batch: exact from the sample when it is the whole batch, else
        from the histograms, within one bin width (each order statistic lies in the bin its rank falls in)."""
        if self.exact or self.hist is None or self.chist is None:
            return quantile_sorted(self.sorted(channel_wise), q)
        if channel_wise:
            return hist_quantile(self.chist, self.cmin, self.cmax, q)
        return hist_quantile(self.hist.view(1, -1), self.cmin.min().view(1), self.cmax.max().view(1), q)[0]

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
        return sum(t.numel() * t.element_size() for t in (self.sample, self.cmin, self.cmax, self.hist, self.chist)
                   if t is not None)


def hist_quantile(counts: Tensor, lo: Tensor, hi: Tensor, q: float) -> Tensor:
    """Quantile ``q`` (numpy's linear method) per row of ``counts`` (C, B), bins equal over [lo, hi] per row.

    Order statistic k is placed at its rank's share of its bin (values spread evenly in a bin); the least and the
    greatest are the exact min and max. The error is at most one bin width, ``(hi - lo) / B``.
    """
    c = counts.double()
    n = c.sum(dim=1)
    bins = c.shape[1]
    width = (hi.double() - lo.double()) / bins
    cum = c.cumsum(dim=1)
    pos = q * (n - 1)
    k0 = pos.floor()
    k1 = torch.minimum(k0 + 1, n - 1)

    def value(k: Tensor) -> Tensor:
        b = torch.searchsorted(cum, k.view(-1, 1), right=True).clamp_(max=bins - 1)  # first bin with cum > k
        before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(k.view(-1, 1)))
        inside = c.gather(1, b).clamp(min=1)
        v = lo.double() + width * (b.view(-1).double() + ((k.view(-1, 1) - before + 0.5) / inside).view(-1))
        v = torch.where(k <= 0, lo.double(), v)
        return torch.where(k >= n - 1, hi.double(), v)

    v0, v1 = value(k0), value(k1)
    t = pos - k0
    return torch.where(t >= 0.5, v1 - (v1 - v0) * (1 - t), v0 + (v1 - v0) * t).float()


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
        lo, hi = s.quantile(1 - a, self.channel_wise), s.quantile(a, self.channel_wise)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            sigma = self.cfg.percentile_sigma
            self.min_val = self.min_val + sigma * (lo - self.min_val)
            self.max_val = self.max_val + sigma * (hi - self.max_val)


@register_observer
class OmseObserver(Observer):
    """Clip factors ``1 - 0.01 i`` (i = 0..89) of min/max; keep the one of least fake-quant MSE (FQ-ViT's OMSE).

    Candidates are affine grids over ``[f·min, f·max]`` for signed and unsigned types alike (FQ-ViT's
    ``OmseObserver``: ``scale = (max - min) / (qmax - qmin)``, ``zp = qmin - round(min / scale)``), and the chosen
    range is quantized on that affine grid (``affine = True``). Scored on every kept calibration value (the whole
    batch up to ``STATS_MAX_ELEMENTS`` values per batch, a seeded row sample beyond), all candidates at once (in
    chunks of ~``chunk_elements`` values, on one buffer reused across calls). ``channel_wise`` ranges are the
    per-channel min/max times a clip factor chosen per channel when the scored rows are the whole data (weights) or at
    least ``min_rows_per_channel``; with fewer sampled rows a per-channel choice overfits the sample
    (it clips tails the sample missed: 8-40x the MSE of min/max on 256 rows), so one factor of least
    total MSE is shared by all channels (within ~1-15 % of per-channel OMSE on the full data).
    """

    name = "OmseObserver"
    depends_on = ("bit_type",)
    affine = True
    n_candidates = 90
    min_rows_per_channel = 4096
    chunk_elements = 1 << 21  # candidates scored together: ~8 MB of work buffer

    def __init__(self, cfg: QuantConfig) -> None:
        super().__init__(cfg)
        self.samples: list[BatchStats] = []

    def update(self, s: BatchStats) -> None:
        self._track_minmax(s)
        self.samples.append(s)

    def candidate_errors(self, x: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Clip factors (K,) and the mean squared fake-quant error of ``x`` (R, C) under each: (K, C)."""
        bt = self.cfg.bit_type
        factors = 1.0 - 0.01 * torch.arange(self.n_candidates, dtype=torch.float32, device=x.device)
        chunk = max(1, min(self.n_candidates, self.chunk_elements // max(1, x.numel())))
        work = _scratch(chunk * x.numel(), x.device).view(chunk, *x.shape)  # one buffer for every chunk and call
        errs = []
        for start in range(0, self.n_candidates, chunk):
            f = factors[start:start + chunk].view(-1, 1)  # (k, 1)
            scale, zp = affine_qparams(lo.reshape(1, -1) * f, hi.reshape(1, -1) * f, bt)  # (k, C)
            grid = UniformGrid(scale.unsqueeze(1), zp.unsqueeze(1), bt.qmin, bt.qmax)
            y = grid.kernel(x.unsqueeze(0), out=work[:len(f)])  # (k, R, C)
            errs.append(y.sub_(x).square_().mean(dim=1))
        return factors, torch.cat(errs)

    def compute(self) -> tuple[Tensor, Tensor]:
        lo, hi = super().compute()
        xs = torch.cat([s.sample for s in self.samples])
        exact = all(s.exact for s in self.samples)
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
        self.hist: Tensor | None = None  # (C, bins) int64 counts
        self.width: Tensor | None = None  # (C,)

    def update(self, s: BatchStats) -> None:
        self._track_minmax(s)
        amax = torch.maximum(s.cmin.abs(), s.cmax.abs()).double()
        x = s.sample.to(torch.float64, copy=True, memory_format=torch.contiguous_format).abs_()
        if not self.channel_wise:
            amax, x = amax.max().reshape(1), x.view(-1, 1)
        if self.width is None:  # the first batch sets the bin width; _accumulate makes the counts
            self.width = torch.where(amax > 0, amax / self.bins, torch.ones_like(amax))
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
        """Add the rows of |x| (R, C), float64, to the histograms; ``x`` is overwritten."""
        assert self.width is not None
        cols = x.shape[1]
        idx = x.div_(self.width).floor_().clamp_(max=self.bins - 1).long()
        idx += torch.arange(0, cols * self.bins, self.bins, device=idx.device).view(1, -1)
        counts = torch.bincount(idx.view(-1), minlength=cols * self.bins).view(cols, self.bins)
        if self.hist is None:
            self.hist = counts
        else:
            self.hist += counts

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


KL_CHUNK_ROWS = 32  # channels scored together: each (channels × thresholds) float64 array (~0.5 MB) stays in L2
_TINY = 1e-300  # log(max(x, _TINY)): x · log x is 0 at x = 0
_LOG_Q_FLOOR = math.log(1e-12)  # the reference floors Q at 1e-12 where P has mass


def kl_best_bins(hist: Tensor, levels: int, start_bin: int = 128) -> Tensor:
    """Per row of ``hist`` (C, B): the number of retained bins ``i`` of least KL(P‖Q) (first minimum).

    Rows are scored ``KL_CHUNK_ROWS`` at a time, so the ~30 passes over each chunk stay in cache: for the
    256 channels of a ViT-S activation, 2x faster than all rows at once or chunks of 64, 1.2-1.5x faster than 16.
    """
    if hist.shape[0] > KL_CHUNK_ROWS:
        return torch.cat([_kl_best_bins(h, levels, start_bin) for h in hist.split(KL_CHUNK_ROWS)])
    return _kl_best_bins(hist, levels, start_bin)


def _kl_best_bins(hist: Tensor, levels: int, start_bin: int = 128) -> Tensor:
    """:func:`kl_best_bins` on one chunk of rows, in closed form from prefix sums.

    Within a merged group Q is constant over the non-empty bins, so Σ p log q reduces to a sum over the
    ``levels`` groups, and thresholds of the same group width ``m = i // levels`` share every group but
    the last. Thresholds are laid out as (widths, levels) blocks, one width per block (padded at both
    ends, then masked), so per-width terms broadcast instead of being gathered. With n_j the counts,
    S = Σ n, s_i = Σ_{j<i} n_j, P's last bin p = S - s_{i-1} (it takes the outliers), c the count before the
    last group [(levels-1)·m, i) and g that group's mean over its non-empty bins, the score minimised is
    S·KL(P‖Q) less a per-row constant:

        Σ_{j<i-1} n_j log n_j + p log p + S log s_i - Σ_full groups n log(mean) - (S - c) log g
            - [n_{i-1} = 0] · p · (log s_i - log g + log 1e-12)

    (the last line: Q's floor 1e-12 where P has mass but Q none). Where p = 0, as past the last
    non-empty bin, consecutive thresholds of one width get bit-identical scores, so exact ties go to the
    first threshold, as in exact arithmetic. The floor elsewhere (q > 0 but below 1e-12) would take
    counts 1e12 apart, past what these float64 prefix sums resolve.
    """
    rows, nbins = hist.shape
    if levels > nbins:
        return torch.full((rows,), nbins, dtype=torch.long, device=hist.device)
    start = min(max(start_bin, levels), nbins)
    m0, m1 = start // levels, nbins // levels  # group widths of the first and last threshold
    n_w = m1 - m0 + 1
    first, stop = m0 * levels, (m1 + 1) * levels  # padded thresholds [first, stop), as (n_w, levels)
    h = torch.nn.functional.pad(hist.double(), (1, stop - 1 - nbins))  # h[:, j] = hist[:, j-1]; 0 past the end
    cs = h.cumsum(1)  # cs[:, j] = sum(hist[:, :j]), constant past the end
    nz = (h > 0).cumsum(1, dtype=torch.float64)  # non-empty bins among hist[:, :j]
    nlogn = h.clamp(min=_TINY).log_().mul_(h).cumsum(1)
    dev = hist.device
    bounds = torch.arange(m0, m1 + 1, device=dev).view(-1, 1) * torch.arange(levels, device=dev).view(1, -1)  # groups

    def at(a: Tensor, idx: Tensor) -> Tensor:
        return a.gather(1, idx.reshape(1, -1).expand(rows, -1)).view(rows, *idx.shape)

    gsum = at(cs, bounds).diff(dim=2)  # (C, n_w, levels-1)
    gmean = at(nz, bounds).diff(dim=2).clamp_(min=1).reciprocal_().mul_(gsum)
    full_groups = gmean.clamp_(min=_TINY).log_().mul_(gsum).sum(2, keepdim=True)  # (C, n_w, 1)
    step = levels - 1
    last_start = slice(m0 * step, m1 * step + 1, step)  # the last group starts at (levels-1)·m

    def blocks(a: Tensor, shift: int) -> Tensor:
        """a[:, i - shift] for the padded thresholds i, as (C, n_w, levels)."""
        return a[:, first - shift:stop - shift].reshape(rows, n_w, levels)

    total = cs[:, nbins:nbins + 1].unsqueeze(2)  # S, (C, 1, 1)
    s_i = blocks(cs, 0)
    before_last = cs[:, last_start].unsqueeze(2)  # c, (C, n_w, 1)
    p = total - blocks(cs, 1)
    log_s = s_i.clamp(min=_TINY).log_()
    g = (s_i - before_last).div_((blocks(nz, 0) - nz[:, last_start].unsqueeze(2)).clamp_(min=1))
    log_g = g.clamp_(min=_TINY).log_()
    score = p.clamp(min=_TINY).log_().mul_(p).add_(blocks(nlogn, 1)).sub_(full_groups)
    score.addcmul_(log_s, total).addcmul_(log_g, before_last - total)
    empty_last = (h[:, first:stop] == 0).view(rows, n_w, levels)  # n_{i-1} = 0
    floor = log_s.sub_(log_g).add_(_LOG_Q_FLOOR).mul_(p).mul_(empty_last)
    score = score.sub_(floor).view(rows, -1)
    score[:, :start - first] = float("inf")
    score[:, nbins + 1 - first:] = float("inf")
    return first + score.argmin(dim=1)
