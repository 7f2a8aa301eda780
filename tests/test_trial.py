"""One real trial end to end: reference accuracy, preset accuracy, statistics reuse, data, cost, checkpoints."""

from __future__ import annotations

import datetime
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PRESETS
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import TensorDataset

from vitq import BitTypeConfig, LayerQuantConfig, QuantConfig, load_config_from_yaml
from vitq.calibrate import calibrate, calibrated_model
from vitq.cost import model_cost
from vitq.data import DataError, digits_pixels, load_digits, load_image_folder
from vitq.evaluate import evaluate
from vitq.models.factory import ModelError, create_model, load_checkpoint
from vitq.models.vit import quantize_vit
from vitq.trial import run_trial


def test_reference_accuracy(reference, digits):
    model, meta = reference
    res = evaluate(model, digits.eval)
    print(f"reference top-1 {100 * res.top1:.2f} %")
    assert res.top1 >= 0.97 and res.top1 == pytest.approx(meta["top1"])


@pytest.mark.slow
def test_presets_accuracy_and_low_bits_bite(reference, digits):
    model, _ = reference
    r8 = run_trial(model, digits, load_config_from_yaml(PRESETS / "int8.yaml"))
    r48 = run_trial(model, digits, load_config_from_yaml(PRESETS / "w4a8.yaml"))
    r2 = run_trial(model, digits, LayerQuantConfig.uniform(QuantConfig(bit_type=BitTypeConfig(bits=2),
                                                                        observer_type="MinmaxObserver")))
    print(f"FP {r8.fp_top1:.4f} int8 {r8.top1:.4f} w4a8 {r48.top1:.4f} all-2-bit {r2.top1:.4f}")
    assert r8.top1 >= r8.fp_top1 - 0.01
    assert r48.top1 >= r48.fp_top1 - 0.03
    assert r2.top1 < r8.top1 - 0.5
    assert r48.weight_bytes < r8.weight_bytes < r8.fp32_bytes
    assert not r8.profile.empty and r8.profile["sqnr_db"].notna().any()


def test_statistics_reuse_zero_forward_passes(reference, digits):
    model, _ = reference
    first = LayerQuantConfig.uniform(QuantConfig(observer_type="MinmaxObserver"))
    second = LayerQuantConfig.uniform(QuantConfig(observer_type="PercentileObserver", percentile_alpha=0.99,
                                                  bit_type=BitTypeConfig(bits=6)))
    run_trial(model, digits, first)
    qm, _ = calibrated_model(model, digits, first)
    passes = []
    handle = qm.model.patch_embed.register_forward_hook(lambda *a: passes.append(1))
    calls_before = len(passes)
    res = run_trial(model, digits, second, profile=False)
    handle.remove()
    eval_batches = -(-len(digits.eval) // 512)
    assert res.calib_passes == 0 and len(passes) - calls_before == eval_batches  # only evaluation passes
    fresh = quantize_vit(model, second)
    calibrate(fresh, digits)
    for label, p in fresh.quantizers.items():
        mine = qm.quantizers[label]
        assert torch.equal(p.scale, mine.scale) and torch.equal(p.zero_point, mine.zero_point), label


def test_digits_are_read_from_scikit_learn_once_then_from_the_cache(tmp_path, monkeypatch, caplog):
    """The pixels a process reads from the cache equal scikit-learn's, without importing it; a torn file is rebuilt."""
    from sklearn.datasets import load_digits as sk_digits

    monkeypatch.setenv("VITQ_CACHE", str(tmp_path))
    first, labels = digits_pixels()
    sk = sk_digits()
    assert first.dtype == np.uint8 and np.array_equal(first, (sk.images * 15).astype(np.uint8))
    assert np.array_equal(labels, sk.target)
    (cached,) = (tmp_path / "data").glob("digits_sklearn-*.pt")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # an import of it now fails
    again, labels_again = digits_pixels()
    assert np.array_equal(again, first) and np.array_equal(labels_again, labels)
    cached.write_bytes(cached.read_bytes()[:100])
    with pytest.raises(ImportError):  # a torn file is not read as data: it sends the caller back to scikit-learn
        digits_pixels()
    assert "is unreadable" in caplog.text
    monkeypatch.delitem(sys.modules, "sklearn.datasets")
    rebuilt, _ = digits_pixels()
    assert np.array_equal(rebuilt, first) and cached.stat().st_size > 100


def test_image_folder_matches_in_memory(reference, tmp_path):
    model, _ = reference
    pixels, labels = digits_pixels()
    for i, (img, lab) in enumerate(zip(pixels, labels, strict=True)):
        d = tmp_path / f"class_{lab}"
        d.mkdir(exist_ok=True)
        Image.fromarray(img, mode="L").save(d / f"{i:04d}.png")
    folder = load_image_folder(model, root=tmp_path, n_calib=256, n_eval=600, seed=1, cache=False)
    orig = torch.as_tensor([int(Path(f).stem) for f in folder.meta["eval_files"]])
    # every digit in memory, as ToTensor + Normalize(0.5, 0.5) make them
    x = torch.from_numpy(pixels).float().div(255).unsqueeze(1).sub(0.5).div(0.5)
    mem_eval = TensorDataset(x[orig], torch.from_numpy(labels)[orig])
    assert torch.equal(torch.stack([folder.eval[k][0] for k in range(8)]), mem_eval.tensors[0][:8])
    acc_folder, acc_mem = evaluate(model, folder.eval).top1, evaluate(model, mem_eval).top1
    print(f"ImageFolder top-1 {acc_folder:.4f} vs in-memory {acc_mem:.4f}")
    assert acc_folder == acc_mem


def test_data_errors(tmp_path, reference):
    model, _ = reference
    with pytest.raises(DataError, match="data.root: image folder not found"):
        load_image_folder(model, root=tmp_path / "missing")
    with pytest.raises(DataError, match=r"data.n_calib=0: an empty split of data 'digits'"):
        load_digits(n_calib=0)
    with pytest.raises(DataError, match=r"data.n_eval=2000: data 'digits' has 1797 images; n_train=1400 \+ "
                                        r"n_eval=2000 do not fit"):
        load_digits(n_eval=2000)
    with pytest.raises(DataError, match=r"data.n_calib=1401: data 'digits' has 1400 images outside the 397 evaluation "
                                        r"images; set data.n_calib to at most 1400"):
        load_digits(n_calib=1401)  # (before: 1400 of them, silently)
    assert len(load_digits(n_calib=1400, n_eval=397).calib) == 1400
    big = load_digits()
    big.num_classes = 20
    with pytest.raises(DataError, match="20 classes but the model has 10 outputs"):
        run_trial(model, big, LayerQuantConfig())


def test_cost_hand_computed():
    m = VisionTransformer(img_size=4, patch_size=2, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2,
                          mlp_ratio=2.0)
    cfg = LayerQuantConfig.from_dict({
        "default": {"bit_type": {"bits": 8}, "calibration_mode": "layer_wise"},
        "layers": {"mlp_fc1": {"bit_type": {"bits": 4}, "calibration_mode": "channel_wise"},
                   "attn_proj": {"enabled": False}, "norm2": {"bit_type": {"bits": 6}}},
        "attn_layer": {"intSoft": {"bit_type": {"bits": 5, "signed": False}}}})
    c = model_cost(m, cfg)
    n_params = sum(p.numel() for p in m.parameters())
    assert c.fp32_bytes == n_params * 4
    # qkv 8x24 @8b + 1 scale; proj 8x8 FP; fc1 8x16 @4b + 16 scales; fc2 16x8 @8b + 1 scale
    q_bits = 192 * 8 + 32 + 128 * 4 + 16 * 32 + 128 * 8 + 32
    fp_bits = (n_params - 192 - 128 - 128) * 32
    assert c.weight_bytes == (q_bits + fp_bits) / 8
    assert c.compression == pytest.approx(c.fp32_bytes / c.weight_bytes)
    assert c.mean_weight_bits == pytest.approx((192 * 8 + 64 * 32 + 128 * 4 + 128 * 8) / 512)
    assert c.mean_act_bits == pytest.approx((9 * 8 + 6 - 8 + 5 - 8 + 8) / 10)
    n = 5  # 4 patches + cls
    bops = n * (8 * 24 * 8 * 8 + 8 * 8 * 32 * 8 + 8 * 16 * 4 * 6 + 16 * 8 * 8 * 8)
    bops += 2 * n * n * 4 * 8 * 8 + 2 * n * n * 4 * 5 * 8  # q·kᵀ (8b x 8b), attn·v (5b x 8b)
    assert c.bops == bops
    assert c.macs == n * (192 + 64 + 128 + 128) + 2 * 2 * n * n * 4


def test_cost_of_a_swiglu_counts_both_fc1_weights():
    from timm.layers import SwiGLU

    m = VisionTransformer(img_size=4, patch_size=2, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2,
                          mlp_ratio=2.0, mlp_layer=SwiGLU, act_layer=torch.nn.SiLU)
    cfg = LayerQuantConfig.from_dict({
        "default": {"bit_type": {"bits": 8}, "calibration_mode": "layer_wise"},
        "layers": {"mlp_fc1": {"bit_type": {"bits": 4}, "calibration_mode": "channel_wise"}}})
    c = model_cost(m, cfg)
    n_params = sum(p.numel() for p in m.parameters())
    # qkv 8x24 @8b + 1 scale; proj 8x8 @8b + 1; fc1_g and fc1_x 2 x 16x8 @4b + 32 scales; fc2 16x8 @8b + 1
    q_bits = 192 * 8 + 32 + 64 * 8 + 32 + 256 * 4 + 32 * 32 + 128 * 8 + 32
    assert c.weight_bytes == (q_bits + (n_params - 192 - 64 - 256 - 128) * 32) / 8
    assert c.mean_weight_bits == pytest.approx((192 * 8 + 64 * 8 + 256 * 4 + 128 * 8) / 640)
    n = 5  # 4 patches + cls
    assert c.macs == n * (192 + 64 + 256 + 128) + 2 * 2 * n * n * 4
    assert c.bops == n * (192 * 64 + 64 * 64 + 256 * 32 + 128 * 64) + 2 * n * n * 4 * 64 * 2


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


class _Payload:
    """Writes a marker file when unpickled: a live payload for the placeholder test."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_checkpoint_safety_and_mismatch(tmp_path, reference):
    model, _ = reference
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(ModelError, match="refused"):
        load_checkpoint(create_model("digits_reference"), evil)
    marker = tmp_path / "ran"  # a torch.save checkpoint: objects beside the state dict are read as placeholders
    loaded = create_model("digits_reference")
    torch.save({"state_dict": model.state_dict(), "saved": datetime.date(2026, 1, 1), "hook": _Payload(marker)},
               tmp_path / "payload.pt")
    how = load_checkpoint(loaded, tmp_path / "payload.pt")
    assert how == "tensors only (2 pickled objects left unread: builtins.exec, datetime.date)"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                   strict=True))
    assert not marker.exists()  # nothing in the file ran
    torch.load(tmp_path / "payload.pt", weights_only=False)
    assert marker.exists()  # ... though the payload is live
    torch.save({"state_dict": {**model.state_dict(), "extra": _Payload(marker)}}, tmp_path / "in_state.pt")
    with pytest.raises(ModelError, match="in_state.pt does not contain a state dict of tensors"):
        load_checkpoint(create_model("digits_reference"), tmp_path / "in_state.pt")
    wrong = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=2,
                              num_heads=4)
    path = tmp_path / "wrong.pt"
    torch.save(wrong.state_dict(), path)
    with pytest.raises(ModelError, match=r"missing keys: blocks\.2\."):
        load_checkpoint(create_model("digits_reference"), path)
    good = tmp_path / "good.pt"
    torch.save({"state_dict": model.state_dict()}, good)
    loaded = create_model("digits_reference", checkpoint=str(good))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                   strict=True))


def test_pretrained_without_hub_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="could not fetch pretrained weights"):
        create_model("vit_tiny_patch16_224", pretrained=True)


def test_reference_declares_the_digits_normalization():
    """The reference's timm data config (what resolve_data_config reads) is the digits loader's normalization."""
    from timm.data import resolve_data_config

    from vitq.data import DIGITS_MEAN, DIGITS_STD
    from vitq.models.reference import build_reference

    cfg = resolve_data_config(model=build_reference())
    assert cfg["mean"] == (DIGITS_MEAN,) and cfg["std"] == (DIGITS_STD,)
