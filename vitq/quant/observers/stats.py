"""Calibration statistics of one point: a batch's exact per-channel min/max, a bounded row sample and histograms of
the whole batch (:class:`BatchStats`), the quantiles read from them, and the rows observers score."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CHANNEL_HIST_BINS", "HIST_BINS", "BatchStats", "bin_centers", "hist_quantile", "quantile_sorted",
           "scoring_rows", "scratch", "to_channel_last"]


HIST_BINS = 1 << 16  # per-batch histogram of a sampled batch: layer-wise percentiles to (batch range) / 2^16
CHANNEL_HIST_BINS = 1 << 9  # and per channel: channel-wise percentiles to (channel range) / 2^9


_SCRATCH_TLS = threading.local()


def scratch(numel: int, device: torch.device | None = None) -> Tensor:
    """A float32 work buffer of ``numel`` values, kept per thread and grown on demand.

    OMSE's ~8 MB buffer, freshly allocated on every call, is page-faulted anew whenever other work has handed
    the memory back to the OS in between (as it does during a trial): up to 1.75x the time of a reused one.
    """
    buf = getattr(_SCRATCH_TLS, "buf", None)
    device = device or torch.device("cpu")
    if buf is None or buf.numel() < numel or buf.device != device:
        with torch.inference_mode(False):  # a normal tensor: calls outside inference mode may write to it too
            buf = _SCRATCH_TLS.buf = torch.empty(numel, device=device)
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




def bin_centers(counts: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Centers of the ``B`` equal bins over [lo, hi] per row of ``counts`` (C, B), as (B, C); clamped to [lo, hi]
    (a constant column, binned with width 1 by ``_bin_counts``, sits at its value)."""
    bins = counts.shape[1]
    width = (hi - lo) / bins
    idx = torch.arange(bins, dtype=torch.float32, device=counts.device).view(-1, 1) + 0.5
    return torch.minimum(lo.view(1, -1) + idx * width.view(1, -1), hi.view(1, -1))


def scoring_rows(stats: list[BatchStats], channel_wise: bool) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
    """What a scoring observer evaluates, as (rows (R, C), weights (R, C) or None, bin widths (C,) or None) pieces:
    the batches kept whole, row by row; then each sampled batch's histogram of every value, as bin centers weighted
    by their counts (per tensor: C = 1, occupied bins only)."""
    exact = [s.sample for s in stats if s.exact]
    pieces: list[tuple[Tensor, Tensor | None, Tensor | None]] = []
    if exact:
        xs = torch.cat(exact)
        pieces.append((xs if channel_wise else xs.reshape(-1, 1), None, None))
    for s in stats:
        if s.exact:
            continue
        if s.hist is None or s.chist is None:
            raise RuntimeError("a sampled calibration batch without histograms cannot be scored")
        if channel_wise:
            lo, hi, counts = s.cmin, s.cmax, s.chist
        else:
            lo, hi, counts = s.cmin.min().view(1), s.cmax.max().view(1), s.hist.view(1, -1)
        centers, weight = bin_centers(counts, lo, hi), counts.t().float().contiguous()  # (R, C) like the centers
        if not channel_wise:
            keep = weight[:, 0] > 0
            centers, weight = centers[keep], weight[keep]
        pieces.append((centers, weight, (hi - lo) / counts.shape[1]))
    return pieces
