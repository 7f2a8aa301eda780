"""OmseObserver: FQ-ViT's OMSE, the clipping range with the least fake-quantization MSE."""

from __future__ import annotations

import torch
from torch import Tensor

from vitq.quant.chunks import chunked
from vitq.quant.config import QuantConfig
from vitq.quant.observers.base import Observer, register_observer
from vitq.quant.observers.stats import BatchStats, scoring_rows, scratch
from vitq.quant.quantizers import UniformGrid, affine_qparams

__all__ = ["OmseObserver"]


@register_observer
class OmseObserver(Observer):
    """Clip factors ``1 - 0.01 i`` (i = 0..89) of min/max; keep the one of least fake-quant MSE (FQ-ViT's OMSE).

    Candidates are affine grids over ``[f·min, f·max]`` for signed and unsigned types alike (FQ-ViT's
    ``OmseObserver``: ``scale = (max - min) / (qmax - qmin)``, ``zp = qmin - round(min / scale)``), and the chosen
    range is quantized on that affine grid (``affine = True``). All candidates are scored at once (in chunks of
    ~``chunk_elements`` values, on one buffer reused across calls) on every calibration value:

    - a batch kept whole (up to ``calib_max_values`` values; weights) is scored value by value, exactly;
    - a larger batch is scored on its histograms of every value (``HIST_BINS`` bins over the batch's range, layer
      wise; ``CHANNEL_HIST_BINS`` per channel), each value at its bin's center. A value x moved by |x - c| <= w/2
      changes its squared error e = (q(x) - x)^2 (continuous, |e'| = 2|q(x) - x|) by at most w·D, D the largest
      |q - x| of that candidate over the bin (s/2 inside the grid, the clipped distance at the bin's far edge
      outside). So each candidate's scored MSE lies within B = mean(w·D) of its MSE on every value, and the pick's
      MSE within B(pick) + B(best) of the best's: ``candidate_errors(bound=True)`` returns B beside the MSEs
      (tested against an exhaustive search over 1M values).

    ``channel_wise`` ranges are the per-channel min/max times a clip factor chosen per channel when the scored rows
    number at least ``min_rows_per_channel`` (or are the whole data); with fewer rows a per-channel choice overfits
    (it clips tails the rows missed: 8-40x the MSE of min/max on 256 rows), so one factor of least total MSE is
    shared by all channels.
    """

    name = "OmseObserver"
    depends_on = ("bit_type",)
    affine = True
    n_candidates = 90
    min_rows_per_channel = 4096
    chunk_elements = 1 << 21  # candidates scored together on a CPU: ~8 MB of work buffer
    device_chunk_elements = 1 << 25  # on a GPU (see vitq.quant.chunks): 128 MB, every candidate at once mostly

    def __init__(self, cfg: QuantConfig) -> None:
        super().__init__(cfg)
        self.samples: list[BatchStats] = []

    def update(self, s: BatchStats) -> None:
        self._track_minmax(s)
        self.samples.append(s)

    @property
    def factors(self) -> Tensor:
        return 1.0 - 0.01 * torch.arange(self.n_candidates, dtype=torch.float32)

    def candidate_sse(self, x: Tensor, lo: Tensor, hi: Tensor, weight: Tensor | None = None,
                      width: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sums over the rows of ``x`` (R, C), weighted by ``weight`` (R, C) if given, under every clip factor:
        the squared fake-quant errors (K, C), and where the rows are bin centers of ``width`` (C,), the bound
        ``sum(weight · width · D)`` on how far the first sum may lie from the binned values' own (else zeros).

        Rows are summed in float32 by torch's cascade summation: the terms are non-negative, so a sum is within a few
        ulps (2e-7 relative measured over 384-1536 rows), and it runs 3-30x faster than a float64-typed reduction over
        the middle axis. Chunks and pieces are added in float64."""
        bt = self.cfg.bit_type
        factors = self.factors.to(x.device)
        parts = 3 if width is not None else 1  # bins: the centers and both edges
        budget = self.chunk_elements if chunked(x.device) else self.device_chunk_elements
        chunk = max(1, min(self.n_candidates, budget // max(1, parts * x.numel())))
        work = scratch(chunk * x.numel(), x.device).view(chunk, *x.shape)  # one buffer for every chunk and call
        sse, bound = [], []
        for start in range(0, self.n_candidates, chunk):
            f = factors[start:start + chunk].view(-1, 1)  # (k, 1)
            scale, zp = affine_qparams(lo.reshape(1, -1) * f, hi.reshape(1, -1) * f, bt)  # (k, C)
            grid = UniformGrid(scale.unsqueeze(1), zp.unsqueeze(1), bt.qmin, bt.qmax, has_zp=True)  # no host read
            y = grid.kernel(x.unsqueeze(0), out=work[:len(f)]).sub_(x).square_()  # (k, R, C)
            if weight is None:
                sse.append(y.sum(dim=1).double())
                continue
            sse.append(y.mul_(weight).sum(dim=1).double())
            if width is None:
                continue
            half = width.reshape(1, -1) / 2
            ends = [torch.minimum(torch.maximum(x + d, lo.reshape(1, -1)), hi.reshape(1, -1)) for d in (-half, half)]
            worst = torch.maximum(*[(grid.kernel(e.unsqueeze(0)) - e).abs() for e in ends])  # |q - x| peaks at an end
            worst = torch.maximum(worst, scale.unsqueeze(1) / 2)  # (k, R, C): D of each bin
            bound.append((worst * weight).sum(dim=1).double() * width.reshape(1, -1).double())
        zeros = torch.zeros(self.n_candidates, x.shape[1], dtype=torch.float64, device=x.device)
        return torch.cat(sse), (torch.cat(bound) if bound else zeros)

    def candidate_errors(self, bound: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Clip factors (K,), each one's mean squared error over every calibration value (K, C), and if ``bound``
        how far that may lie from the MSE of the values themselves (K, C; zero when every batch was kept whole,
        or when not asked for)."""
        lo, hi = super().compute()
        sse = total_bound = None
        n = 0.0
        for x, w, width in scoring_rows(self.samples, self.channel_wise):
            part, part_bound = self.candidate_sse(x, lo, hi, w, width if bound else None)
            sse = part if sse is None else sse + part
            total_bound = part_bound if total_bound is None else total_bound + part_bound
            n += float(x.shape[0] if w is None else w[:, 0].sum())
        assert sse is not None and total_bound is not None
        return self.factors.to(lo.device), (sse / n).float(), (total_bound / n).float()

    def compute(self) -> tuple[Tensor, Tensor]:
        lo, hi = super().compute()
        factors, err, _ = self.candidate_errors()  # (K, C)
        rows = sum(s.n_rows or s.sample.shape[0] for s in self.samples)
        whole = all(s.exact for s in self.samples)
        if self.channel_wise and (whole or rows >= self.min_rows_per_channel):
            best_f = factors[err.argmin(dim=0)]  # first minimum: the least clipping among ties
        else:
            best_f = factors[err.sum(dim=1).argmin()]
        return lo * best_f, hi * best_f
