"""No silent wrong numbers: the integer softmax at every kv_act setting, FQ-ViT's PTF, integer LayerNorm and Log2
against NumPy references (tests/reference), presets that inherit from ``default``, and honest baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PRESETS
from reference import fqvit as ref

from vitq import ConfigError, LayerQuantConfig, QuantConfig, load_config_from_yaml
from vitq.quant.config import BitTypeConfig
from vitq.quant.modules import PROFILE_MAX_ELEMENTS, QAct, QIntSoftmax, int_layernorm
from vitq.quant.quantizers import fake_quant_log2, ptf_qparams

INT_SOFTMAX_ABS = 2e-3  # I-BERT's second-order i-exp: measured max |error| vs the float softmax is 1.0e-3


def _calibrated(key: str, cfg: QuantConfig, x: torch.Tensor, axis: int = 1) -> QAct:
    q = QAct(key, cfg, axis, x.ndim, max_sample_elements=None)
    q.begin_calibration()
    q(x)
    q.freeze()
    return q


@pytest.mark.parametrize("mode", ["layer_wise", "channel_wise"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", range(2, 9))
def test_integer_softmax_against_float_softmax_of_the_same_codes(bits, signed, mode):
    g = torch.Generator().manual_seed(bits)
    scores = torch.randn(6, 4, 17, 17, generator=g) * torch.tensor([2.0, 6.0, 12.0, 20.0]).view(1, 4, 1, 1)
    kv = _calibrated("kv_act", QuantConfig(calibration_mode=mode, bit_type=BitTypeConfig(bits=bits, signed=signed),
                                           observer_type="MinmaxObserver"), scores)
    soft_cfg = QuantConfig(calibration_mode="layer_wise", bit_type=BitTypeConfig(bits=16, signed=False),
                           observer_type="MinmaxObserver")
    out_q = _calibrated("intSoft", soft_cfg, torch.rand(2, 4, 17, 17).clamp_(max=1.0).index_fill_(-1,
                                                                                                  torch.tensor([0]), 1))
    soft = QIntSoftmax(out_q)
    assert soft.integer(kv)  # zero point or not, per tensor or per head: the integer path runs
    codes = kv(scores.clone())  # the scores as kv_act quantizes them
    with torch.inference_mode():
        got = soft(scores.clone(), kv).double().numpy()
    expect = ref.softmax(codes.numpy())
    step = float(out_q.scale)
    assert np.abs(got - expect).max() <= INT_SOFTMAX_ABS + step
    assert np.abs(got.sum(-1) - 1).max() <= 17 * step / 2 + 1e-6  # every row sums to 1 (to the intSoft grid)
    assert (got.max(-1) > 0).all()


@pytest.mark.parametrize("mode", ["layer_wise", "channel_wise"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(40, 4, 17, 17), (2, 4, 9, 9)])  # sampled runs; every value
def test_integer_softmax_profiles_the_scores_as_kv_act_alone_does(shape, signed, mode):
    """Through the integer softmax, ``kv_act``'s profile row (sampled codes, dequantized after sampling) is the row
    that ``kv_act`` quantizing the same scores alone gives: per tensor and per head, with and without zero point."""
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(*shape, generator=g) * torch.tensor([2.0, 6.0, 12.0, 20.0]).view(1, 4, 1, 1) + 1.5
    cfg = QuantConfig(calibration_mode=mode, bit_type=BitTypeConfig(bits=6, signed=signed),
                      observer_type="MinmaxObserver")
    kv, alone = _calibrated("kv_act", cfg, scores), _calibrated("kv_act", cfg, scores)
    out_q = _calibrated("intSoft", QuantConfig(bit_type=BitTypeConfig(bits=8, signed=False),
                                               observer_type="MinmaxObserver"), scores.softmax(-1))
    soft = QIntSoftmax(out_q)
    assert soft.integer(kv) and kv.fq.has_zp == (not signed) and kv.fq.scale.numel() == (4 if mode != "layer_wise"
                                                                                         else 1)
    kv.profiling = alone.profiling = True
    with torch.inference_mode():
        soft(scores.clone(), kv)
        alone(scores.clone())
    got, want = kv.profile_row(), alone.profile_row()
    assert kv.prof.count == alone.prof.count == min(scores.numel(), PROFILE_MAX_ELEMENTS)
    assert got["mse"] == want["mse"] and got["sqnr_db"] == want["sqnr_db"] and 0 < got["mse"] < 1


def test_integer_softmax_off_only_where_the_config_says_so():
    scores = torch.randn(2, 2, 5, 5) * 10
    on = QuantConfig(observer_type="MinmaxObserver", calibration_mode="layer_wise")
    kv = _calibrated("kv_act", on, scores)
    out_q = _calibrated("intSoft", on, torch.rand(2, 2, 5, 5))
    assert QIntSoftmax(out_q).integer(kv)
    out_q.set_config(QuantConfig(enabled=False))
    assert not QIntSoftmax(out_q).integer(kv)  # intSoft disabled: the float softmax, as asked


@pytest.mark.parametrize("bits", range(2, 9))
def test_log2_matches_fqvit(bits):
    top = 2**bits - 1
    x = np.concatenate([[0.0, 1.0, 0.75, 2.0**-top, 2.0**-(top + 0.49), 2.0**-(top + 0.51), 2.0**-(top + 3)],
                        np.random.default_rng(bits).random(2000) ** 6]).astype(np.float32)
    got = fake_quant_log2(torch.from_numpy(x), bits).double().numpy()
    assert np.array_equal(got, ref.log2_quant(x, bits))
    if top <= 149:  # representable in float32 (2^-149 is its least subnormal), as in FQ-ViT's float32 code
        assert got[3] == 2.0**-top  # the top code is kept


def _outlier_tensor() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 48, generator=g)
    x[:, 3] *= 40  # outlier channels, as in ViT LayerNorm inputs
    x[:, 17] = x[:, 17] * 12 + 30
    x[:, 30] *= 0.05
    return x


def test_ptf_scales_and_factors_match_the_numpy_reference():
    x = _outlier_tensor()
    bt = BitTypeConfig(bits=8, signed=False)
    scale, zp = ptf_qparams(x.min(), x.max(), x, bt)
    r_scale, r_zp, r_factors = ref.ptf(x.numpy(), bt.qmin, bt.qmax)
    assert np.allclose(scale.numpy(), r_scale, rtol=1e-6) and (zp.numpy() == r_zp).all()
    base = r_scale.max() / 2 ** r_factors.max()
    assert np.array_equal(np.round(np.log2(scale.numpy() / base)).astype(int), r_factors)
    assert len(set(r_factors.tolist())) >= 3  # the tensor exercises several factors
    assert r_factors[3] == 3 and r_factors[30] == 0


def test_ptf_through_qact_and_integer_layernorm_match_the_reference():
    x = _outlier_tensor().view(8, 64, 48)
    cfg = QuantConfig(calibration_mode="ptf", bit_type=BitTypeConfig(bits=8, signed=False),
                      observer_type="MinmaxObserver")
    q = _calibrated("residual1", cfg, x, axis=2)
    r_scale, r_zp, _ = ref.ptf(x.reshape(-1, 48).numpy(), 0, 255)
    assert np.allclose(q.fq.scale.numpy(), r_scale, rtol=1e-6)
    xq = q(x.clone())
    ln = torch.nn.LayerNorm(48)
    with torch.no_grad():
        ln.weight.copy_(torch.linspace(0.5, 1.5, 48))
        ln.bias.copy_(torch.linspace(-0.2, 0.2, 48))
        out_scale = torch.tensor(0.03)
        got = int_layernorm(xq, q.fq.scale, ln.weight, ln.bias, out_scale)
        fp = ln(xq)
    expect = ref.int_layernorm(xq.double().numpy(), r_scale, ln.weight.detach().double().numpy(),
                               ln.bias.detach().double().numpy(),
                               0.03)
    codes_got, codes_ref = torch.round(got / out_scale).numpy(), np.round(expect / 0.03)
    assert (np.abs(codes_got - codes_ref) <= 1).all() and (codes_got == codes_ref).mean() > 0.995
    assert (got - fp).abs().max() <= 3 * 0.03  # the integer LayerNorm is the LayerNorm, to a few output steps


@pytest.mark.parametrize("kind", ["timm", "torch", "layernorm_without_bias"])
def test_integer_rmsnorm_is_the_rmsnorm_to_a_few_output_steps(kind):
    """The integer LayerNorm without centering (its mean square for the variance) on a PTF grid is timm's and
    torch's RMSNorm to a few output steps, and not the LayerNorm (the rows' means are far from 0); a LayerNorm
    without a bias takes none."""
    from timm.layers import RmsNorm

    x = _outlier_tensor().view(8, 64, 48) + 0.5
    cfg = QuantConfig(calibration_mode="ptf", bit_type=BitTypeConfig(bits=8, signed=False),
                      observer_type="MinmaxObserver")
    q = _calibrated("residual1", cfg, x, axis=2)
    xq = q(x.clone())
    norm = {"timm": lambda: RmsNorm(48, eps=1e-6), "torch": lambda: torch.nn.RMSNorm(48, eps=1e-6),
            "layernorm_without_bias": lambda: torch.nn.LayerNorm(48, eps=1e-6, bias=False)}[kind]()
    center = kind == "layernorm_without_bias"
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 48))
        out_scale = torch.tensor(0.03)
        got = int_layernorm(xq, q.fq.scale, norm.weight, None, out_scale, norm.eps, center=center)
        fp = norm(xq)
        other = torch.nn.functional.layer_norm(xq, (48,), norm.weight, None, 1e-6) if not center else \
            torch.nn.functional.rms_norm(xq, (48,), norm.weight, 1e-6)
    assert (got - fp).abs().max() <= 3 * 0.03
    assert (torch.round(got / out_scale) == torch.round(fp / out_scale)).float().mean() > 0.9
    assert (other - fp).abs().max() > 10 * 0.03


def test_fqvit_preset_runs_integer_softmax_and_integer_layernorm(reference, digits, monkeypatch):
    import vitq.models.vit_block as vb
    from vitq.trial import run_trial

    calls = {"softmax": 0, "layernorm": 0}
    real_lut, real_ln = QIntSoftmax._lut_softmax, vb.int_layernorm

    def lut(self, *a):
        calls["softmax"] += 1
        return real_lut(self, *a)

    def ln(*a):
        calls["layernorm"] += 1
        return real_ln(*a)

    monkeypatch.setattr(QIntSoftmax, "_lut_softmax", lut)
    monkeypatch.setattr(vb, "int_layernorm", ln)
    model, _ = reference
    cfg = load_config_from_yaml(PRESETS / "fqvit.yaml")
    res = run_trial(model, digits, cfg, profile=False)
    depth = len(model.blocks)
    assert calls["softmax"] == depth and calls["layernorm"] == 2 * depth - 1  # block 0's norm1 has FP input
    assert res.top1 >= res.fp_top1 - 0.02
    calls.update(softmax=0, layernorm=0)
    run_trial(model, digits, load_config_from_yaml(PRESETS / "int8.yaml"), profile=False)
    assert calls["softmax"] == depth and calls["layernorm"] == 0  # no PTF input: the float LayerNorm


def test_ptf_only_at_layernorm_inputs():
    with pytest.raises(ConfigError, match="layers.norm1.calibration_mode: ptf is only for the LayerNorm inputs"):
        LayerQuantConfig.from_dict({"layers": {"norm1": {"calibration_mode": "ptf"}}})
    with pytest.raises(ConfigError, match="kv_bins: must be an integer in 16..65536"):
        QuantConfig(kv_bins=1 << 20)


# ------------------------------------------------------------------------------------------------ presets
def test_presets_inherit_from_default(reference, digits):
    from vitq.session import Session
    from vitq.sweep import compose, session_of

    small = ["data.n_calib=32", "data.n_eval=64"]  # the observers' names are asserted, not their accuracy
    q, _ = session_of(compose(["quant=int8", "default=omse", *small]), ["quant=int8", "default=omse", *small])
    res = Session.from_config(compose(small)).run_trial(q)
    obs = res.profile.groupby("point")["observer"].first()
    weights = ["attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2"]
    assert set(obs[weights]) == {"MinmaxObserver"}  # the preset pins the weights' observer
    assert set(obs.drop(weights)) == {"OmseObserver"}  # every point it does not name follows default
    q, _ = session_of(compose(["default.percentile_alpha=0.99"]), ["default.percentile_alpha=0.99"])
    assert {q.resolve(k).percentile_alpha for k in ("norm1", "kv_act", "residual2")} == {0.99}


def test_default_override_that_reaches_no_point_is_an_error():
    from vitq.sweep import compose, session_of

    every = ["layers.norm1.bit_type.bits=8", "layers.norm2.bit_type.bits=8", "layers=w4", "attn_layer=a4",
             "residual_layer=r4"]
    session_of(compose(every), every)
    with pytest.raises(ConfigError, match=r"default.bit_type.bits: reaches no point"):
        session_of(compose([*every, "default.bit_type.bits=6"]), [*every, "default.bit_type.bits=6"])


def test_baselines_are_whole_presets(reference, digits):
    from vitq.search.space import load_search
    from vitq.session import Session
    from vitq.sweep import compose

    base = load_config_from_yaml(PRESETS / "int8.yaml")
    spec = load_search("mixed_precision")
    w8a8 = spec.baseline_params(base)[0]
    assert w8a8["baseline"] == "W8A8"
    names = {p.name for p in spec.params}
    assert names <= set(w8a8)  # every searched parameter is pinned
    overrides = {}
    from vitq.search.space import expand_key

    for k, v in w8a8.items():
        for concrete in (expand_key(k) if k in names else [k] if k != "baseline" else []):
            overrides[concrete] = v
    cfg = base.with_overrides(overrides)
    assert cfg == base  # the W8A8 baseline IS quant=int8
    session = Session.from_config(compose([]))
    assert session.run_trial(cfg, profile=False).top1 == session.run_trial(base, profile=False).top1
    spec.baselines = ["preset:fqvit"]
    fq = spec.baseline_params(base)[0]
    over = {c: v for k, v in fq.items() if k != "baseline" for c in (expand_key(k) if k in names else [k])}
    assert base.with_overrides(over).resolved() == load_config_from_yaml(PRESETS / "fqvit.yaml").resolved()
    spec.params[0].choices = [2, 4]
    spec.baselines = ["w8a8"]
    with pytest.raises(ConfigError, match="layers.attn_qkv.bit_type.bits=8 lies outside the search space"):
        spec.baseline_params(base)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "small"])
def test_profile_mse_and_sqnr_against_numpy_on_the_same_sampled_values(layout):
    """A point's profile row: MSE and SQNR of its evenly spaced runs of flattened values (``PROFILE_RUN`` values
    every ``n // runs``; all values of a small tensor), as NumPy computes them from the FP and quantized tensors."""
    from vitq.quant.modules import PROFILE_MAX_ELEMENTS, PROFILE_RUN

    g = torch.Generator().manual_seed(3)
    shape = {"contiguous": (37, 29, 61), "transposed": (37, 61, 29), "small": (5, 7, 11)}[layout]
    x = torch.randn(*shape, generator=g) * 3
    if layout == "transposed":
        x = x.transpose(1, 2)  # not contiguous: the same logical values in another memory order
    cfg = QuantConfig(calibration_mode="layer_wise", bit_type=BitTypeConfig(bits=4, signed=True),
                      observer_type="MinmaxObserver")
    q = _calibrated("mlp_act", cfg, x)
    q.profiling = True
    with torch.inference_mode():
        out = q(x.clone())
    fp, qv = x.numpy().reshape(-1).astype(np.float64), out.numpy().reshape(-1).astype(np.float64)
    if fp.size > PROFILE_MAX_ELEMENTS:
        runs = PROFILE_MAX_ELEMENTS // PROFILE_RUN
        pick = (np.arange(runs)[:, None] * (fp.size // runs) + np.arange(PROFILE_RUN)).reshape(-1)
        fp, qv = fp[pick], qv[pick]
    row = q.profile_row()
    noise = np.sum((fp - qv) ** 2)
    assert q.prof.count == fp.size
    assert row["mse"] == pytest.approx(noise / fp.size, rel=1e-5)
    assert row["sqnr_db"] == pytest.approx(10 * np.log10(np.sum(fp**2) / noise), abs=1e-4)
    assert 10 < row["sqnr_db"] < 25  # 4 bits over ~4 sigma: not a degenerate row


def test_integer_layernorm_takes_the_norms_eps_where_a_row_is_constant():
    """A row whose codes are all equal (a class or register token on a coarse grid): FQ-ViT's formula divides by a
    zero standard deviation; with the LayerNorm's eps it gives the LayerNorm's output (the bias), as float does."""
    x = _outlier_tensor().view(8, 64, 48)[0].clone()
    cfg = QuantConfig(calibration_mode="ptf", bit_type=BitTypeConfig(bits=8, signed=False),
                      observer_type="MinmaxObserver")
    q = _calibrated("residual1", cfg, x.unsqueeze(0), axis=2)
    xq = q(x.unsqueeze(0).clone())[0]
    xq[5] = 0.0  # a constant row (on the grid: code 0 times every channel's scale)
    ln = torch.nn.LayerNorm(48, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(torch.linspace(0.5, 1.5, 48))
        ln.bias.copy_(torch.linspace(-0.2, 0.2, 48))
        out_scale = torch.tensor(0.03)
        bare = int_layernorm(xq, q.fq.scale, ln.weight, ln.bias, out_scale)
        got = int_layernorm(xq, q.fq.scale, ln.weight, ln.bias, out_scale, eps=ln.eps)
        fp = ln(xq)
    assert not torch.isfinite(bare[5]).all()  # FQ-ViT's published formula: NaN on that row
    assert torch.equal(got[5], torch.round(ln.bias / out_scale) * out_scale)  # the bias, on the output grid
    others = torch.arange(64) != 5
    assert (got[others] - fp[others]).abs().max() <= 3 * 0.03
    codes_bare, codes_got = torch.round(bare[others] / out_scale), torch.round(got[others] / out_scale)
    assert (codes_bare - codes_got).abs().max() <= 1 and (codes_bare == codes_got).float().mean() > 0.995


def test_fqvit_on_a_timm_vit_with_register_tokens_is_finite():
    """Register tokens and a class token without position embedding start near zero: on the PTF grid every code
    of such a token is equal, which used to turn the integer LayerNorm NaN and the integer softmax's lookup into
    an IndexError."""
    import timm

    from vitq.models.vit import quantize_vit

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=32, patch_size=8, depth=2, embed_dim=64,
                              num_heads=2, num_classes=5).eval()
    assert model.num_prefix_tokens == 5 and model.no_embed_class
    x = torch.randn(48, 3, 32, 32)
    q = quantize_vit(model, load_config_from_yaml(PRESETS / "fqvit.yaml"))
    with torch.inference_mode():
        with q.calibration():
            q(x[:16])
        assert q.qblocks[1].softmax.integer(q.qblocks[1].quantizers["kv_act"])
        out, ref_out = q(x[16:]), model(x[16:])
    assert torch.isfinite(out).all() and out.shape == ref_out.shape


def test_integer_softmax_passes_nan_scores_through_as_nan():
    """NaN scores (a broken FP model) give NaN rows, as the float softmax does, not an index error."""
    cfg = QuantConfig(bit_type=BitTypeConfig(bits=8, signed=False), observer_type="MinmaxObserver")
    scores = torch.randn(2, 3, 5, 5)
    kv = _calibrated("kv_act", cfg, scores)
    out_q = _calibrated("intSoft", cfg, scores.softmax(-1))
    sm = QIntSoftmax(out_q)
    bad = scores.clone()
    bad[1, 2, 3, 1] = float("nan")
    with torch.inference_mode():
        good = sm(scores.clone(), kv)
        got = sm(bad.clone(), kv)
    assert torch.isnan(got[1, 2, 3]).all() and torch.isfinite(got[0]).all()
    mask = torch.ones_like(got, dtype=torch.bool)
    mask[1, 2, 3] = False
    assert torch.equal(got[mask], good[mask])
