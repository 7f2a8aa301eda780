"""Observers and quantizers against torch.ao, numpy and a plain TensorRT entropy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import fqvit as fqvit_ref
from reference import tensorrt as trt
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

from vitq import BitTypeConfig, QuantConfig
from vitq.quant.observers import BatchStats, KLObserver, MinmaxObserver, OmseObserver, PercentileObserver, kl_best_bins
from vitq.quant.quantizers import fake_quant_log2, fake_quant_uniform, uniform_qparams

g = torch.Generator().manual_seed(0)
ADVERSARIAL = {
    "random": torch.randn(64, 32, generator=g),
    "positive": torch.rand(64, 32, generator=g) + 0.1,
    "negative": -torch.rand(64, 32, generator=g) - 0.1,
    "constant": torch.full((64, 32), 3.25),
    "zero": torch.zeros(64, 32),
    "tiny": torch.randn(64, 32, generator=g) * 1e-30,
    "huge": torch.randn(64, 32, generator=g) * 1e30,
    "outlier": torch.cat([torch.randn(63, 32, generator=g), torch.full((1, 32), 80.0)]),
}


def _cfg(obs="MinmaxObserver", mode="layer_wise", bits=8, signed=True, **kw):
    return QuantConfig(observer_type=obs, calibration_mode=mode, bit_type=BitTypeConfig(bits=bits, signed=signed), **kw)


@pytest.mark.parametrize("name", list(ADVERSARIAL))
@pytest.mark.parametrize(("signed", "bits"), [(True, 8), (False, 8), (True, 4), (False, 3)])
def test_minmax_per_tensor_equals_torch_ao(name, signed, bits):
    x = ADVERSARIAL[name]
    bt = BitTypeConfig(bits=bits, signed=signed)
    ao = MinMaxObserver(dtype=torch.qint8 if signed else torch.quint8, quant_min=bt.qmin, quant_max=bt.qmax,
                        qscheme=torch.per_tensor_symmetric if signed else torch.per_tensor_affine)
    for chunk in x.split(16):  # several batches: running min/max
        ao(chunk)
    ref_s, ref_z = ao.calculate_qparams()
    obs = MinmaxObserver(_cfg(bits=bits, signed=signed))
    for chunk in x.split(16):
        obs.observe(chunk)
    s, z = uniform_qparams(*obs.compute(), bt)
    assert torch.equal(s.reshape(1), ref_s.reshape(1)) and torch.equal(z.reshape(1), ref_z.reshape(1).long())
    out = fake_quant_uniform(x, s, z, bt.qmin, bt.qmax)
    ref = torch.fake_quantize_per_tensor_affine(x, float(ref_s), int(ref_z), bt.qmin, bt.qmax)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", list(ADVERSARIAL))
@pytest.mark.parametrize("signed", [True, False])
def test_minmax_per_channel_weights_equal_torch_ao(name, signed):
    w = ADVERSARIAL[name].T.contiguous()  # (out=32, in=64), channel axis 0
    bt = BitTypeConfig(bits=8, signed=signed)
    ao = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8 if signed else torch.quint8, quant_min=bt.qmin,
                                  quant_max=bt.qmax,
                                  qscheme=torch.per_channel_symmetric if signed else torch.per_channel_affine)
    ao(w)
    ref_s, ref_z = ao.calculate_qparams()
    obs = MinmaxObserver(_cfg(mode="channel_wise", signed=signed)).observe(w.T)
    s, z = uniform_qparams(*obs.compute(), bt)
    assert torch.equal(s, ref_s) and torch.equal(z, ref_z.long())
    out = fake_quant_uniform(w, s.view(-1, 1), z.view(-1, 1), bt.qmin, bt.qmax)
    ref = torch.fake_quantize_per_channel_affine(w, ref_s, ref_z.int(), 0, bt.qmin, bt.qmax)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("signed", [True, False])
def test_fake_quant_keeps_nan_and_clamps_infinities(signed):
    """A NaN value stays NaN (a trial that meets one then fails at the logits' finite check), ±inf clamp to the
    grid's ends, and finite values match torch.ao's. (ATen's fused ``fake_quantize_per_tensor_affine`` casts to an
    integer before clamping: it returns a grid value for NaN, one reason vitq runs its own passes.)"""
    bt = BitTypeConfig(bits=8, signed=signed)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, -0.25, 3.0])
    s, z = uniform_qparams(torch.tensor(-1.0), torch.tensor(1.0), bt)
    for inplace in (False, True):
        out = fake_quant_uniform(x.clone(), s, z, bt.qmin, bt.qmax, inplace=inplace)
        assert torch.isnan(out[0]) and not torch.isnan(out[1:]).any()
        assert out[1] == (bt.qmax - z) * s and out[2] == (bt.qmin - z) * s
        assert torch.equal(out[3:], torch.fake_quantize_per_tensor_affine(x[3:], float(s), int(z), bt.qmin, bt.qmax))


def test_fake_quant_has_straight_through_gradient():
    x = torch.randn(16, 8, requires_grad=True)
    s, z = uniform_qparams(x.min(), x.max(), BitTypeConfig(bits=4))
    y = fake_quant_uniform(x, s, z, -8, 7)
    assert not torch.equal(y, x)
    y.pow(2).sum().backward()
    assert torch.allclose(x.grad, 2 * y.detach())
    p = torch.rand(4, 8).softmax(-1).requires_grad_()
    fake_quant_log2(p, 4).sum().backward()
    assert torch.equal(p.grad, torch.ones_like(p))


def test_log2_quantizer():
    x = torch.tensor([1.0, 0.5, 0.3, 0.25, 1e-9, 0.0])
    out = fake_quant_log2(x, 3)  # codes 0..7; code 7 means 0
    expected = torch.tensor([1.0, 0.5, 2.0 ** -round(-np.log2(0.3)), 0.25, 0.0, 0.0])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("alpha", [0.9, 0.99, 0.9999])
def test_percentile_matches_numpy_and_smoothing(alpha):
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(500, 12, generator=gen) * (i + 1) for i in range(3)]
    sigma = 0.2
    for mode in ("layer_wise", "channel_wise"):
        obs = PercentileObserver(_cfg("PercentileObserver", mode, percentile_alpha=alpha, percentile_sigma=sigma))
        ref_lo = ref_hi = None
        for x in xs:
            obs.observe(x)
            axis = 0 if mode == "channel_wise" else None
            lo, hi = np.quantile(x.numpy(), 1 - alpha, axis=axis), np.quantile(x.numpy(), alpha, axis=axis)
            if ref_lo is None:
                ref_lo, ref_hi = lo, hi
            else:
                ref_lo, ref_hi = ref_lo + sigma * (lo - ref_lo), ref_hi + sigma * (hi - ref_hi)
            if x is xs[0]:  # the first batch alone is exactly numpy's quantile
                np.testing.assert_allclose(obs.min_val.numpy(), lo, rtol=1e-6, atol=1e-7)
                np.testing.assert_allclose(obs.max_val.numpy(), hi, rtol=1e-6, atol=1e-7)
        got_lo, got_hi = obs.compute()
        np.testing.assert_allclose(got_lo.numpy(), ref_lo, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_hi.numpy(), ref_hi, rtol=1e-5, atol=1e-6)


def _mse(x, lo, hi, bt, axis_shape=None):
    s, z = uniform_qparams(lo, hi, bt)
    if axis_shape is not None:
        s, z = s.view(axis_shape), z.view(axis_shape)
    return float((fake_quant_uniform(x, s, z, bt.qmin, bt.qmax) - x).pow(2).mean())


@pytest.mark.parametrize("mode", ["layer_wise", "channel_wise"])
@pytest.mark.parametrize("bits", [4, 8])
def test_omse_beats_minmax_on_heavy_tails(mode, bits):
    torch.manual_seed(7)
    x = torch.distributions.StudentT(3.0).sample((4000, 16))
    bt = BitTypeConfig(bits=bits)
    shape = (1, -1) if mode == "channel_wise" else None
    mm = MinmaxObserver(_cfg(mode=mode, bits=bits)).observe(x).compute()
    om = OmseObserver(_cfg("OmseObserver", mode, bits=bits)).observe(x).compute()
    assert _mse(x, *om, bt, shape) < _mse(x, *mm, bt, shape)
    if bits == 4:  # at 4 bits the clipping of heavy tails pays off clearly
        assert _mse(x, *om, bt, shape) < 0.85 * _mse(x, *mm, bt, shape)


@pytest.mark.parametrize("mode", ["layer_wise", "channel_wise"])
@pytest.mark.parametrize(("bits", "signed"), [(8, True), (4, True), (3, False)])
@pytest.mark.parametrize("dist", ["student", "relu", "outlier"])
def test_omse_matches_an_exhaustive_numpy_search(mode, bits, signed, dist):
    """All 90 candidates at once, in chunks on a reused buffer: the range FQ-ViT's affine loop picks on all of x."""
    torch.manual_seed(3)
    x = {"student": torch.distributions.StudentT(3.0).sample((1500, 12)),
         "relu": torch.randn(1500, 12).clamp(min=0) * torch.linspace(0.5, 3, 12),
         "outlier": torch.randn(1500, 12) + torch.where(torch.arange(12) == 5, 20.0, 0.0) * torch.rand(1500, 1)}[dist]
    bt = BitTypeConfig(bits=bits, signed=signed)
    cw = mode == "channel_wise"
    lo, hi = OmseObserver(_cfg("OmseObserver", mode, bits, signed)).observe(x).compute()  # the whole data
    r_lo, r_hi = fqvit_ref.omse(x.numpy(), bt.qmin, bt.qmax, cw)
    ours = fqvit_ref.omse_error(x.numpy() if cw else x.numpy().reshape(-1, 1), lo.double().numpy(),
                                hi.double().numpy(), bt.qmin, bt.qmax)
    best = fqvit_ref.omse_error(x.numpy() if cw else x.numpy().reshape(-1, 1), r_lo, r_hi, bt.qmin, bt.qmax)
    np.testing.assert_allclose(ours, best, rtol=1e-5, atol=0)  # float32 scoring: equal, or a float64 near-tie
    assert (np.isclose(lo.double().numpy(), r_lo, rtol=1e-6) | np.isclose(ours, best, rtol=1e-6)).all()


def test_omse_through_qact_sees_every_value():
    """The path real activations take: calibration batches through QAct, the range from the kept statistics."""
    from vitq.quant.modules import QAct

    torch.manual_seed(0)
    batches = [torch.distributions.StudentT(2.5).sample((40, 65, 48)) * (1 + i) for i in range(2)]  # 125k / batch
    cfg = _cfg("OmseObserver", "layer_wise", bits=4, signed=True)
    q = QAct("mlp_act", cfg, 2, 3)
    q.begin_calibration()
    for b in batches:
        q(b)
    q.freeze()
    assert all(s.exact for s in q.stats)  # below the per-batch budget: every value is kept
    x = torch.cat([b.reshape(-1, 48) for b in batches]).numpy().reshape(-1, 1)
    r_lo, r_hi = fqvit_ref.omse(x, -8, 7, False)
    assert np.isclose(float(q.range[0]), r_lo, rtol=1e-6) and np.isclose(float(q.range[1]), r_hi, rtol=1e-6)


def _qact_beyond_budget(obs, mode, bits, signed, seed=0):
    """A 1M-value batch through QAct at the default budget: the observer sees a sample plus histograms."""
    from vitq.quant.modules import QAct

    torch.manual_seed(seed)
    x = torch.distributions.StudentT(3.0).sample((1, 20000, 50)) * torch.linspace(0.2, 5, 50)
    x = x if signed else x.clamp(min=0)
    cfg = _cfg(obs, mode, bits, signed)
    q = QAct("mlp_act", cfg, 2, 3)
    q.begin_calibration()
    q(x)
    q.freeze()
    assert not q.stats[0].exact
    return q, cfg, x.reshape(-1, 50).double().numpy()


@pytest.mark.parametrize("mode", ["layer_wise", "channel_wise"])
@pytest.mark.parametrize(("bits", "signed"), [(8, True), (4, True), (4, False)])
def test_omse_beyond_the_budget_within_its_stated_bound(mode, bits, signed):
    """Batches larger than calib_max_values are scored on histograms of every value: per tensor the same range as
    an exhaustive search on all 1M values; per channel (2^9 bins) the pick's true MSE within the bound B(pick) +
    B(best) that the observer states."""
    q, cfg, x2d = _qact_beyond_budget("OmseObserver", mode, bits, signed)
    bt = cfg.bit_type
    cw = mode == "channel_wise"
    xx = x2d if cw else x2d.reshape(-1, 1)
    lo, hi = (t.double().numpy() for t in q.range)
    r_lo, r_hi = fqvit_ref.omse(x2d, bt.qmin, bt.qmax, cw)
    ours = fqvit_ref.omse_error(xx, lo, hi, bt.qmin, bt.qmax)
    best = fqvit_ref.omse_error(xx, r_lo, r_hi, bt.qmin, bt.qmax)
    if not cw:
        np.testing.assert_allclose([lo, hi], [r_lo, r_hi], rtol=1e-6)
        return
    obs = OmseObserver(cfg)
    for s in q.stats:
        obs.update(s)
    bound = obs.candidate_errors(bound=True)[2].double().numpy()  # (K, C)
    hi0 = xx.max(0)
    k_ours, k_best = (np.rint((1 - h / hi0) / 0.01).astype(int) for h in (hi, r_hi))
    cols = np.arange(xx.shape[1])
    assert (ours - best <= (bound[k_ours, cols] + bound[k_best, cols]) * (1 + 1e-5)).all()
    assert (ours - best).max() > 0  # 2^9 bins per channel: not always the exhaustive pick (the bound is needed)


@pytest.mark.parametrize("mode", ["layer_wise", "channel_wise"])
@pytest.mark.parametrize(("bits", "signed"), [(8, True), (4, True), (8, False)])
def test_kl_beyond_the_budget_counts_every_value(mode, bits, signed):
    """KL's histogram of a batch beyond the budget comes from the batch histograms: every value counted within one
    source bin of itself (CDF checked at every edge), and per tensor the threshold of the whole data."""
    from vitq.quant.observers import CHANNEL_HIST_BINS, HIST_BINS

    q, cfg, x2d = _qact_beyond_budget("KLObserver", mode, bits, signed)
    cw = mode == "channel_wise"
    xx = np.abs(x2d) if cw else np.abs(x2d).reshape(-1, 1)
    obs = KLObserver(cfg)
    for s in q.stats:
        obs.update(s)
    exact = KLObserver(cfg).observe(torch.from_numpy(x2d if cw else x2d.reshape(-1, 1)).float())
    src_w = (x2d.max(0) - x2d.min(0)) / CHANNEL_HIST_BINS if cw else np.array([(x2d.max() - x2d.min()) / HIST_BINS])
    width = obs.width.numpy()
    np.testing.assert_allclose(width, exact.width.numpy(), rtol=1e-6)
    got = obs.hist.double().numpy().cumsum(1)[:, :-1]  # values with |x| below each inner edge
    edges = np.arange(1, cfg.kv_bins) * width.reshape(-1, 1)
    for c in range(xx.shape[1]):
        col = np.sort(xx[:, c])
        lo_b = np.searchsorted(col, edges[c] - src_w[c], side="left")  # CDF one source bin either side
        hi_b = np.searchsorted(col, edges[c] + src_w[c], side="right")
        assert (got[c] >= lo_b - 1e-6).all() and (got[c] <= hi_b + 1e-6).all()
    assert obs.hist.sum().item() == pytest.approx(x2d.size, rel=1e-9)
    if not cw:
        assert torch.equal(obs.compute()[1], exact.compute()[1])


@pytest.mark.parametrize("value", [0.7, -3.0, 0.0])
def test_kl_beyond_the_budget_counts_a_constant_channel_as_the_exact_histogram(value):
    """A constant channel of a sampled batch (its histogram has no width) lands in the bin of |value|, as when every
    value is binned; the other channels' counts sum to their row count."""
    torch.manual_seed(0)
    x = torch.randn(40000, 8) * torch.linspace(0.5, 4, 8)
    x[:, 3] = value
    stats = BatchStats.from_2d(x, max_elements=4096)
    assert not stats.exact
    cfg = _cfg("KLObserver", "channel_wise")
    sampled, exact = KLObserver(cfg), KLObserver(cfg).observe(x)
    sampled.update(stats)
    assert torch.equal(sampled.hist[3], exact.hist[3].double())
    assert sampled.hist.sum(1).tolist() == pytest.approx([40000.0] * 8, rel=1e-12)


@pytest.mark.parametrize("bits", [8, 4])
def test_ptf_beyond_the_budget_scores_every_value(bits):
    """PTF's per-channel factors for a batch beyond calib_max_values, scored on its per-channel histograms: the
    factors of ptf_qparams on all 1.3M values (outlier channels 8x)."""
    from vitq.quant.modules import QAct
    from vitq.quant.quantizers import ptf_qparams

    torch.manual_seed(0)
    x = torch.randn(1, 20000, 64) * torch.where(torch.arange(64) % 9 == 0, 8.0, 1.0) + torch.linspace(-2, 2, 64)
    cfg = _cfg("MinmaxObserver", "ptf", bits=bits, signed=False)
    q = QAct("residual2", cfg, 2, 3)
    q.begin_calibration()
    q(x)
    q.freeze()
    assert not q.stats[0].exact
    full, _ = ptf_qparams(x.min(), x.max(), x.reshape(-1, 64), cfg.bit_type)
    got = q.scale.reshape(-1)
    assert torch.equal(got, full) and len(set(full.tolist())) > 1


@pytest.mark.parametrize("alpha", [0.99, 0.999, 0.99999])
@pytest.mark.parametrize("mode", ["layer_wise", "channel_wise"])
def test_percentile_through_qact_sees_every_value(alpha, mode):
    """1M values in one batch, beyond the kept sample: percentiles come from histograms of every value, within a
    bin width of numpy.quantile; with every value kept (max_sample_elements=None) they are exact."""
    from vitq.quant.modules import STATS_MAX_ELEMENTS, QAct
    from vitq.quant.observers import CHANNEL_HIST_BINS, HIST_BINS

    torch.manual_seed(1)
    x = torch.distributions.StudentT(3.0).sample((1, 20000, 50)) * torch.linspace(0.2, 5, 50)
    x2d = x.reshape(-1, 50).double().numpy()
    cw = mode == "channel_wise"
    axis = 0 if cw else None
    r_lo, r_hi = np.quantile(x2d, 1 - alpha, axis=axis), np.quantile(x2d, alpha, axis=axis)
    width = (x2d.max(0) - x2d.min(0)) / CHANNEL_HIST_BINS if cw else (x2d.max() - x2d.min()) / HIST_BINS
    cfg = _cfg("PercentileObserver", mode, percentile_alpha=alpha)
    for budget in (STATS_MAX_ELEMENTS, None):
        q = QAct("mlp_act", cfg, 2, 3, max_sample_elements=budget)
        q.begin_calibration()
        q(x)
        q.freeze()
        lo, hi = (t.double().numpy() for t in q.range)
        if budget is None:
            np.testing.assert_allclose(hi, r_hi, rtol=1e-6)
            np.testing.assert_allclose(lo, r_lo, rtol=1e-6)
        else:
            assert not q.stats[0].exact
            assert (np.abs(hi - r_hi) <= width * (1 + 1e-6)).all() and (np.abs(lo - r_lo) <= width * (1 + 1e-6)).all()
            sample_hi = np.quantile(q.stats[0].sample.double().numpy(), alpha, axis=axis)
            assert np.abs(hi - r_hi).max() < np.abs(sample_hi - r_hi).max()  # better than the sample it replaces


def test_omse_buffer_is_per_thread():
    """Concurrent OMSE calls (one scratch buffer per thread) give the sequential results."""
    from concurrent.futures import ThreadPoolExecutor

    xs = [torch.distributions.StudentT(2.0 + i).sample((3000, 16)) for i in range(4)]
    cfg = _cfg("OmseObserver", "channel_wise", bits=4)

    def omse(x):
        return OmseObserver(cfg).observe(x).compute()

    expected = [omse(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(omse, xs * 3))
    for (lo, hi), (elo, ehi) in zip(got, expected * 3, strict=True):
        assert torch.equal(lo, elo) and torch.equal(hi, ehi)


def test_omse_buffer_made_in_inference_mode_serves_later_calls():
    """A thread's first OMSE call, under inference mode, allocates its buffer; calls outside it reuse it."""
    from concurrent.futures import ThreadPoolExecutor

    x = torch.distributions.StudentT(3.0).sample((3000, 16))
    cfg = _cfg("OmseObserver", "channel_wise", bits=4)

    def both() -> tuple:
        with torch.inference_mode():
            first = OmseObserver(cfg).observe(x).compute()
        return first, OmseObserver(cfg).observe(x).compute()

    with ThreadPoolExecutor(1) as pool:  # a fresh thread: no buffer yet
        (lo1, hi1), (lo2, hi2) = pool.submit(both).result()
    assert torch.equal(lo1, lo2) and torch.equal(hi1, hi2)


def tensorrt_entropy_reference(hist: np.ndarray, levels: int, start: int = 128) -> int:
    """vitq keeps the first of tied thresholds (as exact arithmetic and TensorRT's description do)."""
    return trt.entropy_best_bin(hist, levels, start, tie="first")


@pytest.mark.parametrize("bits", [8, 4])
def test_kl_matches_tensorrt_reference(bits):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(9)
    x = torch.cat([torch.distributions.StudentT(3.0).sample((20000,)), torch.randn(50, generator=gen) * 25])
    bins = 512
    obs = KLObserver(_cfg("KLObserver", bits=bits, kv_bins=bins)).observe(x.view(-1, 1))
    amax = float(x.abs().max())
    hist = np.histogram(x.abs().numpy(), bins=bins, range=(0, amax))[0]
    assert np.array_equal(obs.hist[0].numpy(), hist)
    ref_i = tensorrt_entropy_reference(hist, levels=2 ** (bits - 1))
    lo, hi = obs.compute()
    assert float(hi) == pytest.approx(ref_i * amax / bins, rel=1e-6)
    assert float(lo) == -float(hi)
    assert 128 <= ref_i < bins  # the outliers really were clipped


@pytest.mark.parametrize(("levels", "bins", "start"), [(128, 512, 128), (8, 512, 128), (128, 300, 128), (256, 400, 128),
                                                     (8, 300, 20)])
def test_kl_best_bins_rows_match_tensorrt_reference(levels, bins, start):
    """The closed-form scan (chunked over rows, prefix sums) picks the plain loop's bin on every row:
    sparse rows (a few hundred values over 512 bins, as per-channel samples are), heavy tails, ReLU mass at 0.
    Bin counts and first bins that are no multiple of ``levels``, and ``levels`` above the first scanned bin
    (unsigned 8 bit), exercise the padded ends of the (group width, threshold) blocks."""
    gen = torch.Generator().manual_seed(11)
    rows = [torch.randn(300, generator=gen).abs(), torch.distributions.StudentT(2.5).sample((4000,)).abs(),
            (torch.randn(3000, generator=gen) * 3).relu(), torch.rand(200, generator=gen) ** 4,
            torch.cat([torch.randn(2000, generator=gen).abs(), torch.full((5,), 40.0)]),
            torch.randint(0, 6, (1000,), generator=gen).float(),  # few distinct values: many empty bins
            torch.cat([torch.randn(3000, generator=gen).abs() * 0.02, torch.ones(1)])]  # best bin: the first allowed
    hist = torch.stack([torch.histc(r, bins=bins, min=0, max=float(r.max())) for r in rows]).double()
    hist = hist.repeat(12, 1)  # 84 rows: more than one chunk of rows
    got = kl_best_bins(hist, levels, start)
    for k, row in enumerate(hist[:len(rows)]):
        want = tensorrt_entropy_reference(row.numpy(), levels, start)
        assert all(int(got[k + j * len(rows)]) == want for j in range(12)), (k, int(got[k]), want)


@pytest.mark.parametrize(("levels", "n_rows"), [(8, 48), (128, 16)])
def test_kl_ties_past_the_data_go_to_the_first_threshold(levels, n_rows):
    """A per-channel sample rarely reaches its channel's exact max, the top of the histogram: thresholds past the
    last non-empty bin (one group width) tie in exact arithmetic, and the first of them wins, as in the loop."""
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(n_rows, 300, generator=gen).abs()
    hist = torch.stack([torch.histc(r, bins=512, min=0, max=1.3 * float(r.max())) for r in rows]).long()
    got = kl_best_bins(hist, levels)
    want = [tensorrt_entropy_reference(row.numpy(), levels) for row in hist]
    assert got.tolist() == want


@pytest.mark.parametrize("mode", ["layer_wise", "channel_wise"])
def test_kl_reads_a_strided_sample(mode):
    """Statistics of a token-major activation can hold a transposed sample: the histogram is the same."""
    x = torch.randn(16, 3000, generator=torch.Generator().manual_seed(2))
    strided = BatchStats.from_2d(x.t())
    assert not strided.sample.is_contiguous()
    a, b = KLObserver(_cfg("KLObserver", mode)), KLObserver(_cfg("KLObserver", mode))
    a.update(strided)
    b.update(BatchStats.from_2d(x.t().contiguous()))
    assert torch.equal(a.hist, b.hist) and torch.equal(a.compute()[1], b.compute()[1])


def test_kl_histogram_grows_by_merging_bins():
    obs = KLObserver(_cfg("KLObserver", kv_bins=64))
    obs.observe(torch.linspace(0, 1, 1000).view(-1, 1))
    obs.observe(torch.linspace(0, 3.5, 1000).view(-1, 1))  # 3.5x larger: width doubles twice
    assert float(obs.width[0]) == pytest.approx(4 / 64)
    assert float(obs.hist.sum()) == 2000
    assert float(obs.hist[0, 16:].sum()) == pytest.approx(float((torch.linspace(0, 3.5, 1000) >= 1.0).sum()))


@pytest.mark.parametrize("obs_name", ["MinmaxObserver", "PercentileObserver", "OmseObserver", "KLObserver"])
def test_channel_wise_equals_per_column_layer_wise(obs_name):
    """Vectorized channel_wise gives each column the range layer_wise gives it alone."""
    torch.manual_seed(8)
    x = torch.distributions.StudentT(3.0).sample((3000, 5)) * torch.arange(1, 6)
    cw = _make(obs_name, "channel_wise").observe(x).compute()
    for c in range(5):
        lw = _make(obs_name, "layer_wise").observe(x[:, c:c + 1]).compute()
        assert float(cw[0][c]) == pytest.approx(float(lw[0]), rel=1e-5, abs=1e-6)
        assert float(cw[1][c]) == pytest.approx(float(lw[1]), rel=1e-5, abs=1e-6)


def _make(name, mode):
    from vitq.quant.observers import OBSERVER_REGISTRY

    return OBSERVER_REGISTRY[name](_cfg(name, mode, kv_bins=256, percentile_alpha=0.99))


def test_batch_stats_sample_is_bounded_and_seeded():
    x = torch.randn(10000, 8)
    a, b = BatchStats.from_2d(x, 8000, seed=5), BatchStats.from_2d(x, 8000, seed=5)
    assert a.sample.shape == (1000, 8) and torch.equal(a.sample, b.sample)
    assert torch.equal(a.cmax, x.max(0).values)  # min/max stay exact
