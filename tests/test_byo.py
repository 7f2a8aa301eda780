"""Bring your own ViT and images, through the CLI: a non-default timm ViT, a timm-style EMA checkpoint, grayscale PNG
class folders calib/ and eval/ (tests/byo_case.py), checked against plain timm image for image."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import byo_case
import mlflow
import numpy as np
import optuna
import pytest
import timm
import torch
from _util import run, run_many, run_sweep, run_sweeps, trial_lines
from mlflow.tracking import MlflowClient
from PIL import Image

from vitq.data import DataError, labels_of, load_image_folder, resolve_transform, stratified_subset
from vitq.models.factory import ModelError, build_model, create_model, load_checkpoint
from vitq.session import Session, resolve_device
from vitq.sweep import compose, layer_config_from

PROVENANCE = ("model.name", "model.kwargs", "model.checkpoint", "model.checkpoint_sha256", "data.calib_root",
              "data.eval_root", "data.fingerprint", "data.n_calib", "data.n_eval", "data.transform", "device",
              "vitq.version", "vitq.git_commit")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("vitq: ")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------ single run
def test_single_run_fp_top1_equals_plain_timm(byo, tmp_path):
    r = run_sweep(tmp_path, *byo.cli(), "tracking=none", "data.n_calib=200")
    assert r.returncode == 0, r.stderr[-3000:]
    (metrics_file,) = tmp_path.glob("outputs/*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    pred, labels, paths = byo_case.plain_timm_predictions(byo)
    assert metrics["fp_top1"] == int((pred == labels).sum()) / len(labels)  # same images, transforms, weights
    assert metrics["n_eval"] == len(paths) == 797
    assert 0.5 < metrics["top1"] <= 1 and metrics["weight_bytes"] > 0 and metrics["bops"] > 0
    prov = metrics["provenance"]
    assert prov["model.checkpoint_sha256"] == _sha(byo.checkpoint)
    assert prov["data.calib_root"] == str(byo.calib.resolve()) and prov["data.eval_root"] == str(byo.eval.resolve())
    assert prov["data.n_calib"] == "200" and prov["device"] == "cpu"
    assert json.loads(prov["model.kwargs"]) == byo_case.KWARGS
    assert json.loads(prov["data.transform"])["input_size"] == [3, 16, 16]  # the model's size, not timm's 224


def test_fp_predictions_image_for_image(byo):
    session = Session.from_config(compose(byo.cli()))
    pred, _, paths = byo_case.plain_timm_predictions(byo)
    mine = dict(zip(session.data.meta["eval_files"], session.fp.predictions.tolist(), strict=True))
    plain = dict(zip(paths, pred.tolist(), strict=True))
    assert mine == plain
    other = Session.from_config(compose([*byo.cli()[:3], f"model.checkpoint={byo.other_checkpoint}", *byo.cli()[4:]]))
    assert other is not session and other.checkpoint_sha != session.checkpoint_sha
    assert not torch.equal(other.fp.predictions, session.fp.predictions)  # no FP result reused across weights


# ------------------------------------------------------------------------------------------------ data
def test_stratified_subsets_are_seeded_and_cover_every_class(byo):
    labels = np.repeat(np.arange(10), [30, 30, 30, 30, 30, 30, 30, 30, 30, 10])  # class-sorted, one small class
    a = stratified_subset(labels, 56, seed=0)
    assert len(a) == 56 and np.array_equal(a, stratified_subset(labels, 56, seed=0))
    assert not np.array_equal(a, stratified_subset(labels, 56, seed=1))
    counts = np.bincount(labels[a], minlength=10)
    assert counts[:9].tolist() == [6] * 9 and counts[9] == 2  # 56 * 30/280 = 6, 56 * 10/280 = 2
    session = Session.from_config(compose([*byo.cli(), "data.n_calib=50", "data.n_eval=40"]))
    for ds in (session.data.calib, session.data.eval):
        assert set(np.bincount(labels_of(ds), minlength=10)) <= {3, 4, 5, 6}  # every class, proportionally


def test_imagenet_synset_folders_are_scored_at_their_own_index(byo, tmp_path):
    """Ten ImageNet classes of a 1000-class model: folders named by synsets are scored at timm's index of each
    synset, so the FP top-1 is plain timm's on the digit folders (the trained 10-class head copied into those 10
    rows of a 1000-class head), not the ~0 % that folder i = output i gives."""
    from timm.data import ImageNetInfo

    from vitq.data import DataError
    from vitq.evaluate import evaluate

    synsets = ImageNetInfo("imagenet-1k").label_names()
    rows = [7, 51, 100, 230, 300, 420, 555, 640, 808, 999]
    for split, src in (("calib", byo.calib), ("eval", byo.eval)):
        for digit, row in enumerate(rows):
            shutil.copytree(src / f"digit_{digit}", tmp_path / split / synsets[row])
    ten = create_model(byo_case.MODEL_NAME, checkpoint=str(byo.checkpoint), kwargs=byo_case.KWARGS)
    big = create_model(byo_case.MODEL_NAME, kwargs={**byo_case.KWARGS, "num_classes": 1000})
    big.load_state_dict({k: v for k, v in ten.state_dict().items() if not k.startswith("head.")}, strict=False)
    with torch.no_grad():
        big.head.weight.zero_()
        big.head.bias.fill_(-1e4)  # the other 990 classes never win
        big.head.weight[rows] = ten.head.weight
        big.head.bias[rows] = ten.head.bias
    data = load_image_folder(big, calib_root=tmp_path / "calib", eval_root=tmp_path / "eval", n_eval=None,
                             cache=False)
    assert data.num_classes == 1000 and data.meta["label_space"] == "imagenet-1k"
    assert [synsets[lab] for lab in labels_of(data.eval)] == [Path(p).parent.name for p in data.meta["eval_files"]]
    pred, y, _ = byo_case.plain_timm_predictions(byo)
    plain = int((pred == y).sum()) / len(y)
    assert plain > 0.5 and evaluate(big, data.eval).top1 == pytest.approx(plain, abs=1e-12)
    (tmp_path / "eval" / synsets[999]).rename(tmp_path / "eval" / "n00000000")
    (tmp_path / "calib" / synsets[999]).rename(tmp_path / "calib" / "n00000000")
    with pytest.raises(DataError, match="data.calib_root: class folders n00000000 are not among the 1000 "
                                        "imagenet-1k synsets of the model's outputs"):
        load_image_folder(big, calib_root=tmp_path / "calib", eval_root=tmp_path / "eval", cache=False)


def test_a_class_map_scores_a_few_classes_of_a_model_at_their_outputs(byo, tmp_path):
    """Two of the ten classes, with timm's class-map file (names in output order): labels are the model's outputs
    3 and 7, and the FP top-1 is plain timm's on those images; without the map the folders are refused."""
    from vitq.data import DataError
    from vitq.evaluate import evaluate

    for split, src in (("calib", byo.calib), ("eval", byo.eval)):
        for c in ("digit_3", "digit_7"):
            shutil.copytree(src / c, tmp_path / split / c)
    (tmp_path / "classes.txt").write_text("".join(f"digit_{k}\n" for k in range(10)))
    model = create_model(byo_case.MODEL_NAME, checkpoint=str(byo.checkpoint), kwargs=byo_case.KWARGS)
    roots = {"calib_root": tmp_path / "calib", "eval_root": tmp_path / "eval", "n_calib": None, "n_eval": None,
             "cache": False}
    data = load_image_folder(model, **roots, class_map=str(tmp_path / "classes.txt"))
    assert data.num_classes == 10 and set(labels_of(data.eval)) == {3, 7}
    pred, y, _ = byo_case.plain_timm_predictions(byo)
    mask = (y == 3) | (y == 7)
    assert evaluate(model, data.eval).top1 == pytest.approx(int((pred[mask] == y[mask]).sum()) / int(mask.sum()),
                                                            abs=1e-12)
    cli = [a for a in byo.cli() if not a.startswith(("data.calib_root=", "data.eval_root="))]
    r = run_sweep(tmp_path, *cli, f"data.calib_root={tmp_path / 'calib'}", f"data.eval_root={tmp_path / 'eval'}",
                  f"data.class_map={tmp_path / 'classes.txt'}", "data.n_calib=null", "tracking=none")
    assert r.returncode == 0, r.stderr[-3000:]
    (metrics_file,) = tmp_path.glob("outputs/*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["fp_top1"] == evaluate(model, data.eval).top1
    assert metrics["provenance"]["data.class_map"] == json.dumps(str(tmp_path / "classes.txt"))
    assert metrics["provenance"]["data.label_space"] == "data.class_map"
    with pytest.raises(DataError, match="data.calib_root: 2 class folders for a model with 10 outputs"):
        load_image_folder(model, **roots)
    with pytest.raises(DataError, match="data.calib_root: class folders digit_7 are not among data.class_map"):
        load_image_folder(model, **roots, class_map={"digit_3": 3})
    with pytest.raises(DataError, match="data.class_map: the output of class digit_7 is 'seven', not an integer"):
        load_image_folder(model, **roots, class_map={"digit_3": 3, "digit_7": "seven"})
    with pytest.raises(DataError, match=r"data.class_map: it scores class folders digit_3, digit_7 all as output 3; "
                                        r"each folder must be its own class \(merge the folders"):
        load_image_folder(model, **roots, class_map={"digit_3": 3, "digit_7": 3})
    with pytest.raises(DataError, match="data.class_map: it maps folders to outputs 3..12"):
        load_image_folder(model, **roots, class_map={"digit_3": 3, "digit_7": 12})


def test_class_folders_numbered_as_timm_or_torchvision_trained_the_model(tmp_path):
    """Folders 0..11: timm's train script (its ImageDataset) counts them 0, 1, 2, ..., 11, torchvision's ImageFolder
    0, 1, 10, 11, 2, ...; vitq takes the order it is told, file for file as each library labels it, and refuses to
    guess (also through the CLI)."""
    from timm.data import ImageDataset
    from torchvision.datasets import ImageFolder

    from vitq.data import DataError

    rng = np.random.default_rng(0)
    for split in ("calib", "eval"):
        for c in range(12):
            folder = tmp_path / split / str(c)
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
    model = create_model(byo_case.MODEL_NAME, kwargs={**byo_case.KWARGS, "num_classes": 12})
    roots = {"calib_root": tmp_path / "calib", "eval_root": tmp_path / "eval", "n_calib": None, "n_eval": None,
             "cache": False}
    for order, ds in (("timm", ImageDataset(str(tmp_path / "eval"))),
                      ("torchvision", ImageFolder(str(tmp_path / "eval")))):
        theirs = {str(Path(p)): int(y) for p, y in (ds.reader.samples if order == "timm" else ds.samples)}
        data = load_image_folder(model, **roots, class_order=order)
        assert dict(zip(data.meta["eval_files"], labels_of(data.eval).tolist(), strict=True)) == theirs
    assert theirs[str(tmp_path / "eval" / "10" / "0.png")] == 2  # (torchvision: the orders do differ)
    with pytest.raises(DataError, match=r"data.calib_root: timm's train script numbers these class folders in "
                                        r"natural order \(2 is class 2\), torchvision's ImageFolder in plain order "
                                        r"\(10 is class 2\); set data.class_order=timm"):
        load_image_folder(model, **roots)
    kwargs = byo_case.KWARGS_CLI.replace("num_classes:10", "num_classes:12")
    r = run_sweep(tmp_path, "model=timm", f"model.name={byo_case.MODEL_NAME}", kwargs, "data=folder",
                  f"data.calib_root={tmp_path / 'calib'}", f"data.eval_root={tmp_path / 'eval'}", "tracking=none",
                  "data.n_calib=null")
    assert "set data.class_order=timm or data.class_order=torchvision" in _one_line_error(r)
    r = run_sweep(tmp_path, "model=timm", f"model.name={byo_case.MODEL_NAME}", kwargs, "data=folder",
                  f"data.calib_root={tmp_path / 'calib'}", f"data.eval_root={tmp_path / 'eval'}", "tracking=none",
                  "data.n_calib=null", "data.class_order=timm")
    assert r.returncode == 0, r.stderr[-3000:]
    (metrics_file,) = tmp_path.glob("outputs/*/*/metrics.json")
    prov = json.loads(metrics_file.read_text())["provenance"]
    assert prov["data.class_order"] == "timm" and prov["data.label_space"] == "timm natural order"


def test_images_below_their_class_folders_are_labelled_as_the_training_script_did(byo, tmp_path):
    """Images one folder below their class folder: timm's train script labels them by the folder that holds them,
    torchvision's ImageFolder by the class folder. Told which, vitq labels every file as that library does (the
    model then scores them as on the flat folders); not told, it refuses (through the CLI: the bad-inputs test)."""
    from timm.data import ImageDataset
    from torchvision.datasets import ImageFolder

    from vitq.data import DataError

    flat = {p.name: p.parent.name for p in byo.eval.glob("*/*.png")}
    for i, png in enumerate(sorted(byo.eval.glob("*/*.png"))):
        digit = png.parent.name
        for layout, rel in (("by_parity", Path("odd" if int(digit[-1]) % 2 else "even", digit)),  # timm: leaf
                            ("by_batch", Path(digit, "ab"[i % 2]))):  # torchvision: class folder
            (tmp_path / layout / rel).mkdir(parents=True, exist_ok=True)
            shutil.copy(png, tmp_path / layout / rel / png.name)
    model = create_model(byo_case.MODEL_NAME, checkpoint=str(byo.checkpoint), kwargs=byo_case.KWARGS)
    for layout, order, ds in (("by_parity", "timm", ImageDataset(str(tmp_path / "by_parity"))),
                              ("by_batch", "torchvision", ImageFolder(str(tmp_path / "by_batch")))):
        data = load_image_folder(model, calib_root=byo.calib, eval_root=tmp_path / layout, n_eval=None,
                                 n_calib=50, cache=False, class_order=order)
        theirs = ds.reader.samples if order == "timm" else ds.samples
        mine = dict(zip(data.meta["eval_files"], labels_of(data.eval).tolist(), strict=True))
        assert mine == {str(Path(p)): int(y) for p, y in theirs}, layout
        assert {Path(p).name: data.meta["classes"][y] for p, y in mine.items()} == flat, layout
        with pytest.raises(DataError, match=r"data.eval_root: images lie below their class folders \((even|[a-z_0-9]+)"
                                            r"/.*\): timm's train script labels them by the folder that holds them"):
            load_image_folder(model, calib_root=byo.calib, eval_root=tmp_path / layout, n_calib=50, cache=False)
    digits = {f"digit_{k}": k for k in range(10)}  # a class map names the folders that label the images
    data = load_image_folder(model, calib_root=byo.calib, eval_root=tmp_path / "by_parity", n_eval=None, n_calib=50,
                             cache=False, class_order="timm", class_map=digits)
    assert {Path(p).name: y for p, y in zip(data.meta["eval_files"], labels_of(data.eval).tolist(), strict=True)} == \
        {name: digits[c] for name, c in flat.items()}
    with pytest.raises(DataError, match=r"data.eval_root: images lie below their class folders"):
        load_image_folder(model, calib_root=byo.calib, eval_root=tmp_path / "by_parity", n_calib=50, cache=False,
                          class_map=digits)
    with pytest.raises(DataError, match=r"data.class_order: data.class_map already numbers the folders, and no "
                                        r"image lies below its class folder"):
        load_image_folder(model, calib_root=byo.calib, eval_root=byo.eval, n_calib=50, cache=False,
                          class_order="timm", class_map=digits)
    with pytest.raises(DataError, match=r"data.eval_root: class folders differ .* only in eval_root \['even', 'odd'\]"):
        load_image_folder(model, calib_root=byo.calib, eval_root=tmp_path / "by_parity", n_calib=50, cache=False,
                          class_order="torchvision")  # (torchvision would label them even and odd)
    base = [a for a in byo.cli() if not a.startswith("data.eval_root=")] + \
        [f"data.eval_root={tmp_path / 'by_parity'}", "data.n_calib=200", "tracking=none"]
    (tmp_path / "cli").mkdir()  # (without data.class_order: the bad-inputs test)
    r = run_sweep(tmp_path / "cli", *base, "data.class_order=timm")
    assert r.returncode == 0, r.stderr[-3000:]
    (metrics_file,) = (tmp_path / "cli").glob("outputs/*/*/metrics.json")
    preds, y, _ = byo_case.plain_timm_predictions(byo)
    assert json.loads(metrics_file.read_text())["fp_top1"] == int((preds == y).sum()) / len(y)


def test_grayscale_and_rgba_images_become_the_models_channels(byo, tmp_path):
    """Also what a user's folders hold beside the images: an upper-case extension is an image; a Finder or Explorer
    file and a note are not."""
    for split in ("calib", "eval"):
        shutil.copytree(byo.calib / "digit_0", tmp_path / split / "digit_0")
        shutil.copytree(byo.calib / "digit_1", tmp_path / split / "digit_1")
    rgba = next((tmp_path / "eval" / "digit_1").iterdir())
    Image.open(rgba).convert("RGBA").save(rgba)
    first = min((tmp_path / "eval" / "digit_0").iterdir())
    upper = first.rename(first.with_name("upper.PNG"))
    n_images = len(list((tmp_path / "eval").rglob("*.*")))
    for junk in (".DS_Store", "Thumbs.db", "notes.txt"):
        (tmp_path / "eval" / "digit_0" / junk).write_bytes(b"\0\0\0\1not an image")
    model = create_model(byo_case.MODEL_NAME, checkpoint=str(byo.checkpoint), kwargs=byo_case.KWARGS)
    data = load_image_folder(model, calib_root=tmp_path / "calib", eval_root=tmp_path / "eval", n_calib=None,
                             n_eval=None, cache=False, class_map={"digit_0": 0, "digit_1": 1})
    assert len(data.eval) == n_images and str(upper) in data.meta["eval_files"]
    assert not [p for p in data.meta["eval_files"] if Path(p).name in (".DS_Store", "Thumbs.db", "notes.txt")]
    x, _ = next(iter(torch.utils.data.DataLoader(data.eval, batch_size=len(data.eval))))
    assert x.shape[1:] == (3, 16, 16)
    i = data.meta["eval_files"].index(str(rgba))
    assert torch.equal(x[i, 0], x[i, 1]) and torch.equal(x[i, 1], x[i, 2])  # gray in, RGB out


@pytest.mark.parametrize("in_chans", [3, 1])
def test_a_hybrid_vit_reads_images_not_backbone_features(byo, in_chans):
    """A hybrid ViT's patch embedding is a ResNet: its proj reads 64 feature channels, the model reads images."""
    cli = ["model=timm", "model.name=vit_tiny_r_s16_p8_224",
           f"model.kwargs={{img_size:64,depth:2,num_classes:10,in_chans:{in_chans}}}", "data=folder",
           f"data.calib_root={byo.calib}", f"data.eval_root={byo.eval}", "data.n_calib=64", "data.n_eval=100"]
    if in_chans == 1:  # timm's mean and std have 3 values: one channel needs its own
        cli += ["data.mean=0.5", "data.std=0.25"]
    cfg = compose(cli)
    session = Session.from_config(cfg)
    assert session.model.patch_embed.proj.in_channels == 64
    assert json.loads(session.provenance()["data.transform"])["input_size"] == [in_chans, 64, 64]
    res = session.run_trial(layer_config_from(cfg), profile=False)
    assert res.n_eval == 100 and res.weight_bytes < res.fp32_bytes and np.isfinite(res.loss)


_DECODE_RSS = """
import sys, timm
from vitq.data import load_image_folder
def peak():  # this process's peak resident memory (VmHWM; ru_maxrss would carry the forking parent's peak)
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
model = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=2)
before = peak()
data = load_image_folder(model, root=sys.argv[1], n_calib=400, n_eval=400, num_workers=2)
mapped = any("/images/images_v" in line for line in open("/proc/self/maps"))  # the cache file, mapped
print(peak() - before, data.calib.images.numel() + data.eval.images.numel(), mapped, data.fingerprint)
"""


def test_decoding_holds_about_the_result_and_reads_the_cache_mapped(tmp_path):
    """Decoding keeps neither every file's bytes nor a second copy of every image: the process's peak memory grows
    by about the decoded set's size (2.1-2.8x that before). A cached set is read memory-mapped. 800 images (120 MB):
    with 400, the ~25 MB the process adds whatever the set (threads, libraries) read 1.40-1.49x on a 2-core Xeon."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(400):  # noise: a PNG as large as its pixels
            img = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / "imgs" / c / f"{i}.png")
    env = {"VITQ_CACHE": str(tmp_path / "cache")}
    runs = []
    for _ in range(2):  # decode (and write the cache), then read the cache
        r = run([sys.executable, "-c", _DECODE_RSS, str(tmp_path / "imgs")], tmp_path, env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        grown, decoded, mapped, fingerprint = r.stdout.split()
        runs.append((int(grown), int(decoded), mapped == "True", fingerprint))
    (grown, decoded, mapped, fp), (grown2, decoded2, mapped2, fp2) = runs
    assert decoded == decoded2 == 800 * 3 * 224 * 224 and fp == fp2
    assert grown < 1.4 * decoded, grown / decoded
    assert not mapped and mapped2 and grown2 < 0.2 * decoded, grown2 / decoded  # pages are read as batches need


def test_decoded_images_are_cached_by_content(byo, tmp_path, monkeypatch):
    import vitq.data as vd

    monkeypatch.setenv("VITQ_CACHE", str(tmp_path / "cache"))
    shutil.copytree(byo.eval, tmp_path / "eval")
    model = create_model(byo_case.MODEL_NAME, checkpoint=str(byo.checkpoint), kwargs=byo_case.KWARGS)
    calls = []
    real = vd._decode
    monkeypatch.setattr(vd, "_decode", lambda *a: calls.append(1) or real(*a))
    first = load_image_folder(model, root=tmp_path / "eval", n_calib=100, n_eval=200)
    assert len(calls) == 2
    again = load_image_folder(model, root=tmp_path / "eval", n_calib=100, n_eval=200)
    assert len(calls) == 2 and again.fingerprint == first.fingerprint  # read back, not decoded
    assert torch.equal(again.eval.images, first.eval.images)
    load_image_folder(model, root=tmp_path / "eval", n_calib=100, n_eval=200, transform={"crop_pct": 1.0})
    assert len(calls) == 4  # another transform is another entry
    victim = Path(first.meta["eval_files"][0])
    Image.fromarray(np.full((16, 16), 255, np.uint8), mode="L").save(victim)
    changed = load_image_folder(model, root=tmp_path / "eval", n_calib=100, n_eval=200)
    assert len(calls) == 5 and changed.fingerprint != first.fingerprint  # only the eval set is decoded again
    for f in (tmp_path / "cache" / "images").glob("*.pt"):
        f.write_bytes(b"torn")
    rebuilt = load_image_folder(model, root=tmp_path / "eval", n_calib=100, n_eval=200)
    assert len(calls) == 7 and rebuilt.fingerprint == changed.fingerprint


# ------------------------------------------------------------------------------------------------ model
def _plain_state(byo) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The checkpoint's EMA weights, as plain timm reads them."""
    return timm.models.load_state_dict(str(byo.checkpoint))


def test_timm_names_with_tags_and_checkpoint_formats(byo, tmp_path):
    tagged = create_model("vit_tiny_patch16_224.augreg_in21k", kwargs=byo_case.KWARGS)  # no download: not pretrained
    assert tagged.blocks[0].ls1.gamma.shape == (48,)
    with pytest.raises(pickle.UnpicklingError):  # timm's train script saves its args, which torch alone refuses
        torch.load(byo.checkpoint, weights_only=True)
    plain = _plain_state(byo)
    mine = create_model(byo_case.MODEL_NAME, checkpoint=str(byo.checkpoint), kwargs=byo_case.KWARGS)
    assert mine.state_dict().keys() == plain.keys()
    assert all(torch.equal(mine.state_dict()[k], v) for k, v in plain.items())
    sd = {f"module.{k}": v for k, v in plain.items()}  # as saved from a DDP-wrapped model
    blobs = {"bare": plain, "state_dict": {"state_dict": plain}, "model": {"model": sd, "epoch": 1},
             "ema": {"state_dict": {k: torch.zeros_like(v) for k, v in sd.items()}, "state_dict_ema": sd}}
    for name, blob in blobs.items():
        torch.save(blob, tmp_path / f"{name}.pth")
        m = create_model(byo_case.MODEL_NAME, checkpoint=str(tmp_path / f"{name}.pth"), kwargs=byo_case.KWARGS)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in plain.items()), name
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in plain.items()}, tmp_path / "model.safetensors")  # as the HF hub has it
    m = create_model(byo_case.MODEL_NAME, checkpoint=str(tmp_path / "model.safetensors"), kwargs=byo_case.KWARGS)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in plain.items())
    whole = timm.create_model(byo_case.MODEL_NAME, **byo_case.KWARGS)
    whole.load_state_dict(plain)
    for name, blob in {"whole": whole, "whole_in_dict": {"model": whole, "epoch": 1}}.items():  # torch.save(model)
        torch.save(blob, tmp_path / f"{name}.pth")
        m, how = build_model(byo_case.MODEL_NAME, checkpoint=str(tmp_path / f"{name}.pth"), kwargs=byo_case.KWARGS)
        assert m.state_dict().keys() == plain.keys(), name
        assert all(torch.equal(m.state_dict()[k], v) for k, v in plain.items()), name
        assert re.fullmatch(r"tensors only \(1\d pickled objects left unread: timm\.layers\..+\)", how), how
    no_ema = create_model(byo_case.MODEL_NAME, checkpoint=str(tmp_path / "ema.pth"), kwargs=byo_case.KWARGS,
                          use_ema=False)
    assert float(no_ema.head.weight.detach().abs().sum()) == 0  # use_ema=false reads state_dict
    wrong = create_model(byo_case.MODEL_NAME, kwargs={**byo_case.KWARGS, "embed_dim": 64})
    with pytest.raises(ModelError, match=r"shape mismatch at cls_token|shape mismatch at pos_embed"):
        load_checkpoint(wrong, byo.checkpoint)


def test_foreign_checkpoint_layouts_load_through_timms_conversion(byo, tmp_path):
    """Layouts timm converts when it loads pretrained weights (DINOv2's mask token, DeiT-3's gamma_N, OpenCLIP's
    visual.trunk. prefix) load to exactly the trained weights and say so; a file that fits is loaded as it is."""
    plain = _plain_state(byo)
    layouts = {"dinov2": {**plain, "mask_token": torch.zeros(1, 48)},
               "deit3": {re.sub(r"ls([12])\.gamma$", r"gamma_\1", k): v for k, v in plain.items()},
               "open_clip": {f"visual.trunk.{k}": v for k, v in plain.items()}}
    for name, state in layouts.items():
        assert set(state) != set(plain)
        torch.save(state, tmp_path / f"{name}.pth")
        model = timm.create_model(byo_case.MODEL_NAME, **byo_case.KWARGS)
        assert load_checkpoint(model, tmp_path / f"{name}.pth") == "timm checkpoint_filter_fn", name
        assert model.state_dict().keys() == plain.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.items()), name
    assert load_checkpoint(timm.create_model(byo_case.MODEL_NAME, **byo_case.KWARGS), byo.checkpoint) == ""


def test_a_training_modules_checkpoint_loads_its_models_keys_by_prefix(byo, tmp_path):
    """A real Lightning checkpoint of a lightning-hydra-template module holds the model's keys under ``net.`` and
    pickles the model and a ``functools.partial`` optimizer in its hyperparameters: those are left unread (torch
    alone refuses the file), the misfit says which prefix to set, and with model.checkpoint_prefix the model gets
    exactly the module's weights."""
    plain = _plain_state(byo)
    byo_case.lightning_checkpoint(plain, tmp_path / "last.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="functools.partial|VisionTransformer"):
        torch.load(tmp_path / "last.ckpt", weights_only=True)
    with pytest.raises(ModelError, match=re.escape("it holds the model's keys under 'net.': set "
                                                   "model.checkpoint_prefix=net.")):
        create_model(byo_case.MODEL_NAME, checkpoint=str(tmp_path / "last.ckpt"), kwargs=byo_case.KWARGS)
    model, how = build_model(byo_case.MODEL_NAME, checkpoint=str(tmp_path / "last.ckpt"), kwargs=byo_case.KWARGS,
                             checkpoint_prefix="net.")
    assert how.startswith("tensors only (") and how.endswith("; keys under 'net.'"), how
    assert "left unread: functools.partial, timm.layers." in how
    assert model.state_dict().keys() == plain.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.items())
    with pytest.raises(ModelError, match="model.checkpoint_prefix=model.: no key of .* starts with it"):
        create_model(byo_case.MODEL_NAME, checkpoint=str(tmp_path / "last.ckpt"), kwargs=byo_case.KWARGS,
                     checkpoint_prefix="model.")
    for name, kwargs in ((byo_case.MODEL_NAME, byo_case.KWARGS), ("digits_reference", None)):  # never ignored
        with pytest.raises(ModelError, match="model.checkpoint_prefix: it selects keys of model.checkpoint, which"):
            create_model(name, kwargs=kwargs, checkpoint_prefix="net.")
    with pytest.raises(ModelError, match=r"model.kwargs.checkpoint_path: give the file as model.checkpoint=PATH"):
        create_model(byo_case.MODEL_NAME, kwargs={**byo_case.KWARGS, "checkpoint_path": str(byo.checkpoint)})


def test_a_checkpoint_at_another_size_is_interpolated_only_when_asked(byo):
    """A model built at 24 px takes the 16 px checkpoint only with model.resample_weights: its position
    embedding is then timm's bicubic resampling of the 4×4 grid to 6×6, and every other weight is the file's."""
    from timm.layers import resample_abs_pos_embed

    kwargs = {**byo_case.KWARGS, "img_size": 24}
    expect = "its weights fit the model only after timm interpolates them (Resized position embedding: (4, 4) to (6, 6)"
    with pytest.raises(ModelError, match=re.escape(f"{expect}); set model.resample_weights=true")):
        create_model(byo_case.MODEL_NAME, checkpoint=str(byo.checkpoint), kwargs=kwargs)
    model = create_model(byo_case.MODEL_NAME, checkpoint=str(byo.checkpoint), kwargs=kwargs, resample_weights=True)
    plain = _plain_state(byo)
    want = resample_abs_pos_embed(plain["pos_embed"], new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=0,
                                  interpolation="bicubic", antialias=True)
    assert model.pos_embed.shape == (1, 36, 48) and torch.equal(model.pos_embed.detach(), want)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.items() if k != "pos_embed")


def test_pretrained_weights_that_timm_would_leave_random_or_interpolate_are_named(byo, tmp_path):
    """timm's pretrained path (a local file, through pretrained_cfg_overlay) drops a head of another class count and
    loads the rest; vitq names the random head instead of scoring it, interpolates only when asked, and loads
    weights that fit exactly as they are."""
    from timm.layers import resample_abs_pos_embed

    plain = _plain_state(byo)
    torch.save(plain, tmp_path / "w.pth")
    overlay = {"file": str(tmp_path / "w.pth")}
    with pytest.raises(ModelError, match=re.escape(
            "model.pretrained: timm's weights for vit_tiny_patch16_224 leave head.weight, head.bias at random init "
            "(model.kwargs num_classes=10, the weights have 1000 classes")):
        create_model(byo_case.MODEL_NAME, pretrained=True,
                     kwargs={**byo_case.KWARGS, "pretrained_cfg_overlay": overlay})
    overlay["num_classes"] = 10
    model, how = build_model(byo_case.MODEL_NAME, True, None, {**byo_case.KWARGS, "pretrained_cfg_overlay": overlay})
    assert how == "" and all(torch.equal(model.state_dict()[k], v) for k, v in plain.items())
    at24 = {**byo_case.KWARGS, "img_size": 24, "pretrained_cfg_overlay": overlay}
    expect = "fit the model only after timm interpolates them (Resized position embedding: (4, 4) to (6, 6)); set"
    with pytest.raises(ModelError, match=re.escape(expect)):
        create_model(byo_case.MODEL_NAME, pretrained=True, kwargs=at24)
    model, how = build_model(byo_case.MODEL_NAME, True, None, at24, resample_weights=True)
    assert how == "timm pretrained; Resized position embedding: (4, 4) to (6, 6)"
    assert torch.equal(model.pos_embed.detach(), resample_abs_pos_embed(
        plain["pos_embed"], new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=0, interpolation="bicubic",
        antialias=True))
    kwargs_cli = next(a for a in byo.cli() if a.startswith("model.kwargs="))[:-1] + \
        f",pretrained_cfg_overlay:{{file:'{tmp_path / 'w.pth'}',num_classes:10}}}}"
    args = [a if not a.startswith("model.kwargs=") else kwargs_cli for a in byo.cli()]
    session = Session.from_config(compose([*args, "model.pretrained=true", "model.checkpoint=null"]))
    assert session.checkpoint_sha == _sha(tmp_path / "w.pth")  # the weights' file is hashed, and resumes check it
    assert all(torch.equal(session.model.state_dict()[k], v) for k, v in plain.items())
    with pytest.raises(ModelError, match="timm's weights for vit_tiny_patch16_224 do not fit the model that "
                                         "model.kwargs build: Error.s. in loading state_dict .* Unexpected key"):
        create_model(byo_case.MODEL_NAME, pretrained=True, kwargs={**byo_case.KWARGS, "depth": 1,
                                                                   "pretrained_cfg_overlay": overlay})


NPZ_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 36, "depth": 3, "num_heads": 3, "num_classes": 10}


def test_a_jax_npz_checkpoint_loads_every_weight_or_names_what_it_lacks(tmp_path):
    """Google's JAX layout (.npz) is read by timm's load_pretrained, to exactly the weights written (and plain timm's
    result); what timm's reader would leave unset (another head size, layer scale, fc_norm) is named, not run."""
    torch.manual_seed(3)
    src = timm.create_model(byo_case.MODEL_NAME, **NPZ_KWARGS)
    path = tmp_path / "vit.npz"
    byo_case.jax_npz(src, path)
    plain = timm.create_model(byo_case.MODEL_NAME, **NPZ_KWARGS)
    plain.load_pretrained(str(path))
    mine = create_model(byo_case.MODEL_NAME, checkpoint=str(path), kwargs=NPZ_KWARGS)
    for k, v in src.state_dict().items():
        assert torch.equal(mine.state_dict()[k], v) and torch.equal(plain.state_dict()[k], v), k
    cases = {"num_classes": (5, "does not set head.weight, head.bias (a head of another class count"),
             "init_values": (1e-5, "does not set blocks.0.ls1.gamma, blocks.0.ls2.gamma, blocks.1.ls1.gamma"),
             "global_pool": ("avg", "does not set fc_norm.weight, fc_norm.bias"),
             "depth": (4, "Transformer/encoderblock_3/LayerNorm_0/scale is not a file in the archive"),
             "img_size": (24, "fit the model only after timm interpolates them (Resized position embedding")}
    for key, (value, expect) in cases.items():
        with pytest.raises(ModelError, match=re.escape(expect)):
            create_model(byo_case.MODEL_NAME, checkpoint=str(path), kwargs={**NPZ_KWARGS, key: value})
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ModelError, match="other.npz is not a JAX/big_vision checkpoint of this model"):
        create_model(byo_case.MODEL_NAME, checkpoint=str(tmp_path / "other.npz"), kwargs=NPZ_KWARGS)


def test_converted_checkpoints_through_the_cli(byo, tmp_path):
    """Through the CLI: a JAX .npz, the 16 px checkpoint on a 24 px model with model.resample_weights=true (without
    it: the bad-inputs test), and a Lightning checkpoint with model.checkpoint_prefix=net. FP top-1 equals plain
    timm's on the same weights and images; the conversion is recorded with the run."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(3)
    src = timm.create_model(byo_case.MODEL_NAME, **NPZ_KWARGS)
    byo_case.jax_npz(src, tmp_path / "vit.npz")
    kw24 = {**byo_case.KWARGS, "img_size": 24}
    resampled = timm.create_model(byo_case.MODEL_NAME, **kw24)
    plain = _plain_state(byo)
    plain["pos_embed"] = resample_abs_pos_embed(plain["pos_embed"], new_size=(6, 6), old_size=(4, 4),
                                                num_prefix_tokens=0, interpolation="bicubic", antialias=True)
    resampled.load_state_dict(plain)
    byo_case.lightning_checkpoint(_plain_state(byo), tmp_path / "last.ckpt")
    trained = timm.create_model(byo_case.MODEL_NAME, **byo_case.KWARGS)
    trained.load_state_dict(_plain_state(byo))
    kwargs_cli = next(a for a in byo.cli() if a.startswith("model.kwargs="))
    runs = {"npz": ([f"model.checkpoint={tmp_path / 'vit.npz'}",
                     "model.kwargs={" + ",".join(f"{k}:{v}" for k, v in NPZ_KWARGS.items()) + "}"], src, 16,
                    re.escape("timm load_pretrained (JAX .npz)")),
            "24px": ([kwargs_cli.replace("img_size:16", "img_size:24"), "model.resample_weights=true"], resampled,
                     24, re.escape("timm checkpoint_filter_fn; Resized position embedding: (4, 4) to (6, 6)")),
            "lightning": ([f"model.checkpoint={tmp_path / 'last.ckpt'}", kwargs_cli, "model.checkpoint_prefix=net."],
                          trained, 16, r"tensors only \(\d+ pickled objects left unread: functools\.partial, .+\); "
                                       r"keys under 'net\.'")}
    base = [a for a in byo.cli() if not a.startswith(("model.kwargs=", "model.checkpoint="))]
    fp_top1 = {}
    for name, (extra, model, size, conversion) in runs.items():
        out = tmp_path / name
        out.mkdir()
        args = [*base, *([f"model.checkpoint={byo.checkpoint}"] if name == "24px" else []), *extra, "tracking=none"]
        r = run_sweep(out, *args, "data.n_calib=200")
        assert r.returncode == 0, r.stderr[-3000:]
        (metrics_file,) = out.glob("outputs/*/*/metrics.json")
        metrics = json.loads(metrics_file.read_text())
        assert re.fullmatch(conversion, metrics["provenance"]["model.weights_conversion"]), name
        model.eval()
        x, y, _ = byo_case.folder_tensors(byo.eval, byo_case.plain_timm_transform(model, size))
        with torch.inference_mode():
            assert metrics["fp_top1"] == int((model(x).argmax(-1) == y).sum()) / len(y), name
        fp_top1[name] = metrics["fp_top1"]
    assert fp_top1["lightning"] > fp_top1["24px"] > 0.5  # interpolated, the trained weights still classify digits


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(Exception, match="device: expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="device: cuda:1: no CUDA device"):
            resolve_device("cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_cuda_trial_matches_cpu(byo):
    from conftest import PRESETS

    from vitq import load_config_from_yaml

    cfg = load_config_from_yaml(PRESETS / "int8.yaml")
    cpu = Session.from_config(compose(byo.cli())).run_trial(cfg)
    gpu = Session.from_config(compose([*byo.cli()[:-1], "device=cuda"])).run_trial(cfg)
    assert gpu.fp_top1 == pytest.approx(cpu.fp_top1, abs=2 / 797)
    assert gpu.top1 == pytest.approx(cpu.top1, abs=0.01) and gpu.weight_bytes == cpu.weight_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_cuda_batches_are_resident_and_a_trial_copies_nothing_per_batch(byo, monkeypatch):
    """On a GPU the image sets are copied to it once: kept and streamed batches are equal, within 1e-6 of the CPU's,
    and a trial's host<->device copies do not grow with its number of eval batches."""
    from conftest import PRESETS

    import vitq.data as vdata
    from vitq import load_config_from_yaml
    from vitq.bench import host_device_copies
    from vitq.data import batches
    from vitq.trial import run_trial

    s = Session.from_config(compose([*byo.cli()[:-1], "device=cuda"]))
    data = s.data
    cuda = torch.device("cuda")

    def fresh(ds):  # noqa: ANN001, ANN202  (a new set object: nothing of it kept on the device yet)
        if isinstance(ds, vdata.ImageSet):
            return vdata.ImageSet(ds.images, ds.labels, ds.mean.flatten().tolist(), ds.std.flatten().tolist())
        return torch.utils.data.TensorDataset(*ds.tensors)

    default = vdata.RESIDENT_FRACTION
    for ds in (data.eval, torch.utils.data.TensorDataset(torch.randn(50, 3, 8, 8), torch.arange(50))):
        cpu = list(batches(ds, 16))
        gpu = {}
        for fraction in (default, 0.0):  # kept, then too large to keep: copied per batch
            monkeypatch.setattr(vdata, "RESIDENT_FRACTION", fraction)
            one = fresh(ds)
            gpu[fraction] = [(x.cpu(), y.cpu()) for x, y in batches(one, 16, cuda)]
            assert (vdata.resident(one, cuda) is None) == (fraction == 0.0)
        kept, streamed = gpu.values()
        assert all(torch.equal(a, b) and torch.equal(y, z) for (a, y), (b, z) in zip(kept, streamed, strict=True))
        # CUDA divides by a scalar through its reciprocal: within an ulp of the CPU's normalization, not equal
        assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) and torch.equal(y, z)
                   for (a, y), (b, z) in zip(kept, cpu, strict=True))
    monkeypatch.undo()
    cfg = load_config_from_yaml(PRESETS / "int8.yaml")
    copies, n_batches = {}, {}
    for bs in (16, 128):
        run_trial(s.model, data, cfg, batch_size=bs)  # warm: FP reference, statistics and ranges cached
        copies[bs] = host_device_copies(lambda bs=bs: run_trial(s.model, data, cfg, batch_size=bs))
        n_batches[bs] = -(-len(data.eval) // bs)
    assert n_batches[16] >= 4 * n_batches[128]
    assert copies[16] == copies[128], (copies, n_batches)


def test_a_model_of_any_size_runs_at_its_built_size_and_costs_the_tokens_it_sees(byo, tmp_path):
    """``dynamic_img_size``: timm's data config (224 for vit_tiny_patch16_224) was used for a model built for 16 (at
    32, patch 4, its evaluation ran on 3136 tokens and was killed for memory); at another ``data.input_size`` the
    BOPs counted the tokens of the built size (the same at 64x64 as at 32x32)."""
    from torch.utils.flop_counter import FlopCounterMode

    kwargs = {**byo_case.KWARGS, "dynamic_img_size": True}
    model = timm.create_model(byo_case.MODEL_NAME, **kwargs).eval()
    assert resolve_transform(model)["input_size"] == (3, 16, 16)  # the size its position embedding is for
    assert resolve_transform(timm.create_model(byo_case.MODEL_NAME, **{**kwargs, "dynamic_img_size": False,
                                                                        "dynamic_img_pad": True}))["input_size"] \
        == (3, 16, 16)
    dyn = byo_case.KWARGS_CLI.replace("}", ",dynamic_img_size:true}")
    cli = [dyn if a == byo_case.KWARGS_CLI else a for a in byo.cli()]
    r = run_sweep(tmp_path, *cli, "tracking=none", "data.input_size=[20,16]")
    assert r.returncode == 0, r.stderr[-3000:]
    (metrics_file,) = tmp_path.glob("outputs/*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["mean_weight_bits"] == metrics["mean_act_bits"] == 8  # (int8: every point at 8 bits)
    for b in model.blocks:  # (torch's flop counter does not count the CPU's fused attention kernel)
        b.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 20, 16))
    macs = sum(counter.get_flop_counts()["VisionTransformer.blocks"].values()) / 2  # the blocks' matmuls, 20 tokens
    assert metrics["bops"] == 8 * 8 * macs


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(("kwargs", "overrides", "says"), [
    ({}, {"crop_pct": 0}, "data.crop_pct: must be in (0, 1], got 0"),  # timm reads 0 as its default 0.875
    ({}, {"crop_mode": "centre"}, "data.crop_mode: expected one of center, squash, border (timm crops any other as "
                                  "center), got 'centre'"),
    ({}, {"interpolation": "cubic"}, "data.interpolation: timm has no interpolation 'cubic'"),  # (a KeyError, rc 1)
    ({}, {"input_size": [1, 16, 16]}, "data.input_size: 1 channel(s), and the model takes 3; give [H, W]"),  # (ran
    # on 3 channels)
    ({}, {"input_size": 24}, "data.input_size: 24x24, and the model takes 16x16 only"),
    ({"dynamic_img_size": True}, {"input_size": [18, 16]}, "data.input_size: 18x16 is not a multiple of the model's "
                                                           "patch size 4x4"),
    ({}, {"std": [0.5, 0, 0.5]}, "data.std: must be finite and > 0, got [0.5, 0.0, 0.5]"),  # (NaN logits, rc 1)
    ({}, {"mean": [float("inf"), 0, 0]}, "data.mean: must be finite, got [inf, 0.0, 0.0]"),
    ({}, {"mean": ["x", 0, 0]}, "data.mean: expected a number or a list of numbers, got ['x', 0, 0]"),
])
def test_transform_fields_timm_would_ignore_or_fail_on_are_refused(kwargs, overrides, says):
    model = timm.create_model(byo_case.MODEL_NAME, **{**byo_case.KWARGS, **kwargs})
    with pytest.raises(DataError) as e:
        resolve_transform(model, overrides)
    assert str(e.value).startswith(says), str(e.value)
    if kwargs:  # a size the model takes: any multiple of the patch
        assert resolve_transform(model, {"input_size": [20, 16]})["input_size"] == (3, 20, 16)
    cfg = resolve_transform(model, {"crop_mode": "squash", "interpolation": "bilinear", "crop_pct": 1.0})
    assert (cfg["crop_mode"], cfg["interpolation"], cfg["crop_pct"]) == ("squash", "bilinear", 1.0)


@pytest.mark.parametrize("key", ["seed", "num_workers"])
def test_negative_data_seed_or_workers_are_refused(key):
    with pytest.raises(DataError, match=rf"^data\.{key}: must be >= 0, got -1$"):
        Session.from_config(compose([f"data.{key}=-1"]))


def test_a_class_map_with_numeric_and_named_folders_is_read_as_names():
    session = Session.from_config(compose(["data=folder", "data.root=/nowhere", "data.class_map={0:1,x:2}"]))
    assert json.loads(session.data_spec.class_map) == {"0": 1, "x": 2}  # (a TypeError, rc 1: int and str keys)


def test_bad_inputs_are_one_line_rc2_and_nothing_logged(byo, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    differ = tmp_path / "eval_missing_class"
    shutil.copytree(byo.eval, differ)
    shutil.rmtree(differ / "digit_7")
    broken = tmp_path / "eval_truncated"
    shutil.copytree(byo.eval, broken)
    victim = sorted((broken / "digit_3").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])
    nested, loose = tmp_path / "eval_nested", tmp_path / "eval_loose"
    shutil.copytree(byo.eval, loose)
    shutil.copy(victim, loose / "stray.png")
    for png in byo.eval.glob("*/*.png"):
        (nested / png.parent.name / "batch_1").mkdir(parents=True, exist_ok=True)
        shutil.copy(png, nested / png.parent.name / "batch_1" / png.name)
    snapshot = tmp_path / "snapshot"  # as huggingface_hub downloads a model: a folder with the weights and config
    snapshot.mkdir()
    for name in ("model.safetensors", "config.json"):
        (snapshot / name).write_bytes(b"{}")
    base = [a for a in byo.cli() if not a.startswith("model.kwargs=")]
    kwargs = next(a for a in byo.cli() if a.startswith("model.kwargs="))
    cases = {
        "missing root": ([kwargs, f"data.eval_root={tmp_path / 'nope'}"], "data.eval_root: image folder not found"),
        # the folders are checked before the model is built (a model fetched from the hub first: 50 s of retries
        # offline, then the model's error, before the folder's)
        "missing root, and a model that cannot be built": (["model.kwargs={img_sizee:16}",
                                                            f"data.calib_root={tmp_path / 'nope'}"],
                                                           "data.calib_root: image folder not found"),
        "class sets differ": ([kwargs, f"data.eval_root={differ}"], "class folders differ from data.calib_root"),
        "split-looking root": ([kwargs, "data.calib_root=null", "data.eval_root=null", f"data.root={byo.root}"],
                               f"data.root: {byo.root} has class folders named like splits (calib, eval)"),
        "truncated png": ([kwargs, f"data.eval_root={broken}", "data.cache=false"], f"cannot read image {victim}"),
        "unknown model": ([kwargs, "model.name=vit_tiny_patch16_2244"], "closest timm names: vit_tiny_patch16_224"),
        "kwargs typo": (["model.kwargs={img_sizee:16}"], "model.kwargs: timm.create_model('vit_tiny_patch16_224') "
                                                          "rejected them: TypeError"),
        "shape mismatch": (["model.kwargs={img_size:16,patch_size:4,embed_dim:64,depth:2,num_heads:2,"
                            "num_classes:10,init_values:1e-5,global_pool:avg,class_token:false}"],
                           "model.checkpoint: " + str(byo.checkpoint) + ": shape mismatch at"),
        "unsupported block": ([kwargs.replace("init_values:1e-5,global_pool:avg,class_token:false", "qkv_bias:true"),
                               "model.name=vit_base_patch16_rpn_224"],
                              "model.name: vit_base_patch16_rpn_224 cannot be quantized by vitq: blocks.0: "
                              "ResPostBlock is not a timm Block"),
        "token outputs": ([kwargs.replace("global_pool:avg", "global_pool:''"), "model.checkpoint=null"],
                          "vitq: model: it returns (1, 16, 10) for 1 image(s), not (1, 10) logits"),
        "more outputs than folders": ([kwargs.replace("num_classes:10", "num_classes:1000"), "model.checkpoint=null"],
                                      "data.calib_root: 10 class folders for a model with 1000 outputs"),
        "another image size": ([kwargs.replace("img_size:16", "img_size:24")],
                               "(Resized position embedding: (4, 4) to (6, 6)); set model.resample_weights=true"),
        "random pretrained head": ([kwargs.replace("class_token:false", f"class_token:false,pretrained_cfg_overlay:"
                                                    f"{{file:'{byo.checkpoint}'}}"), "model.pretrained=true",
                                    "model.checkpoint=null"],
                                   "head.weight, head.bias at random init (model.kwargs num_classes=10, the weights "
                                   "have 1000 classes"),
        "hub snapshot folder": ([kwargs, f"model.checkpoint={snapshot}"],
                                f"model.checkpoint: {snapshot} is a folder, not a weights file; give the weights "
                                f"file in it: {snapshot / 'model.safetensors'}"),
        "images below class folders": ([kwargs, f"data.eval_root={nested}"],
                                       "data.eval_root: images lie below their class folders (digit_0/batch_1/"),
        "images outside class folders": ([kwargs, f"data.eval_root={loose}"],
                                         f"data.eval_root: {loose} holds images outside any class folder (stray.png)"),
        "more images than the folder has": ([kwargs, "data.n_eval=5000"],
                                            f"data.n_eval=5000: {byo.eval} has 797 images; set data.n_eval to at most "
                                            "797, or null for all of them"),
        "class map missing": ([kwargs, f"data.class_map={tmp_path / 'nope.txt'}"],
                              f"data.class_map: cannot read {tmp_path / 'nope.txt'}"),
        "pretrained and a checkpoint": ([kwargs, "model.pretrained=true"],  # (pretrained was ignored)
                                        "model.pretrained: model.checkpoint is set too, and its weights would "
                                        "replace timm's pretrained ones; set one of them"),
        "a training split of folders": ([kwargs, "data.n_train=100"],  # (was ignored)
                                        "data.n_train=100: data=folder has no training split: calibration images "
                                        "come from data.calib_root"),
        "crop_pct 0": ([kwargs, "data.crop_pct=0"], "vitq: data.crop_pct: must be in (0, 1], got 0.0"),  # (timm's
        # default ran instead)
        "an image size the model cannot take": ([kwargs, "data.input_size=24"],  # (an AssertionError, rc 1)
                                                "vitq: data.input_size: 24x24, and the model takes 16x16 only"),
    }
    if not torch.cuda.is_available():
        cases["cuda without a GPU"] = ([kwargs, "device=cuda"], "vitq: device: cuda: no CUDA device is available")
    results = run_sweeps(tmp_path, [(*base, *extra, f"tracking.uri={uri}") for extra, _ in cases.values()])
    for (name, (_, expect)), (_, r) in zip(cases.items(), results, strict=True):
        line = _one_line_error(r)
        assert expect in line, (name, line)
    # the default data (digits, 1×8×8) with a timm model built for 3×16×16 images
    r = run_sweep(tmp_path, "model=timm", f"model.name={byo_case.MODEL_NAME}", kwargs,
                  f"model.checkpoint={byo.checkpoint}", f"tracking.uri={uri}", timeout=300)
    assert "vitq: data: data=digits gives 1×8×8 images, but model vit_tiny_patch16_224 takes 3×16×16; use " \
           "data=folder" in _one_line_error(r)
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_random_weights_are_named_and_the_same_in_every_process(byo, tmp_path):
    """A timm model with neither pretrained weights nor a checkpoint runs (cost studies, architecture checks), with a
    warning that names it, and with the same weights in every process, as a study's workers and resumes need (they
    were unseeded: FP top-1 10.83 % and 9.32 % in two runs of one command)."""
    args = (*[a for a in byo.cli() if not a.startswith("model.checkpoint=")], "tracking=none")
    scores = []
    for _, r in run_sweeps(tmp_path, [args, args]):
        assert r.returncode == 0, r.stderr[-2000:]
        out = r.stdout + r.stderr
        warning = f"model: {byo_case.MODEL_NAME} has random weights (model.pretrained=false and no model.checkpoint)"
        assert warning in out
        (line,) = trial_lines(out)
        scores.append(line.split("] - ", 1)[1].split(" | calib/eval")[0])  # (not the timings)
    assert scores[0] == scores[1], scores
    # with weights there is no such warning
    r = run_sweep(tmp_path, *byo.cli(), "tracking=none", timeout=300)
    assert r.returncode == 0 and "random weights" not in r.stdout + r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_a_gated_mlp_vit_runs_end_to_end(byo, tmp_path):
    """aimv2's architecture, unlike the byo model: SwiGLU MLPs (fc1_g, fc1_x), RmsNorm, no biases, no class token;
    trained briefly, through the CLI on the PNG folders, against plain timm; int8 and fqvit."""
    import timm

    from vitq.cost import model_cost

    name = "aimv2_large_patch14_224"
    kw = {"img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 2, "num_classes": 10}
    torch.manual_seed(0)
    model = timm.create_model(name, **kw)
    x, y, _ = byo_case.folder_tensors(byo.calib, byo_case.plain_timm_transform(model))
    byo_case.train(model, x, y, epochs=8)
    ckpt = tmp_path / "aimv2.pth"
    torch.save(model.state_dict(), ckpt)
    xe, ye, _ = byo_case.folder_tensors(byo.eval, byo_case.plain_timm_transform(model))
    with torch.inference_mode():
        fp_top1 = int((model(xe).argmax(-1) == ye).sum()) / len(ye)
    cli = ["model=timm", f"model.name={name}", "model.kwargs={" + ",".join(f"{k}:{v}" for k, v in kw.items()) + "}",
           f"model.checkpoint={ckpt}", "data=folder", f"data.calib_root={byo.calib}", f"data.eval_root={byo.eval}"]
    r = run_sweep(tmp_path, *cli, "tracking=none")
    assert r.returncode == 0, r.stderr[-3000:]
    (metrics_file,) = tmp_path.glob("outputs/*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["fp_top1"] == fp_top1 > 0.5  # same images, transforms and weights as plain timm
    assert metrics["top1"] >= fp_top1 - 0.05 and metrics["agreement"] > 0.9  # int8
    assert metrics["weight_bytes"] == model_cost(model, layer_config_from(compose(cli))).weight_bytes
    # fqvit: FQ-ViT's integer LayerNorm runs uncentered on the RmsNorms
    shutil.rmtree(tmp_path / "outputs")
    r = run_sweep(tmp_path, *cli, "tracking=none", "quant=fqvit")
    assert r.returncode == 0, r.stderr[-3000:]
    (metrics_file,) = tmp_path.glob("outputs/*/*/metrics.json")
    fq = json.loads(metrics_file.read_text())
    assert fq["top1"] >= fp_top1 - 0.05 and fq["agreement"] > 0.9  # measured: 0.698 against FP 0.689, 0.94
    # the gradient score reads the packed fc1 weight's gradient
    r = run([sys.executable, "-m", "vitq.search.sensitivity", "--granularity", "block", "--score", "grad_score",
             "--metric", "bops", "--budgets", "1e12", *cli], tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(grad_score, per block: 28 items)" in r.stdout


# ------------------------------------------------------------------------------------------------ sweeps
@pytest.mark.slow
def test_optuna_sweep_records_provenance_and_refuses_other_inputs(byo, tmp_path):
    common = ["-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.search=bits_only", "hydra.sweeper.n_trials=4",
              "hydra.sweeper.study_name=byo", "hydra.sweeper.enqueue_baselines=false"]
    r = run_sweep(tmp_path, *common, *byo.cli())
    assert r.returncode == 0, r.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = MlflowClient().get_experiment_by_name("byo")
    runs = mlflow.search_runs([exp.experiment_id])
    children = runs[runs["tags.vitq.role"] == "trial"]
    assert len(children) == 4 and (children["status"] == "FINISHED").all()
    for key in PROVENANCE:
        assert children[f"tags.{key}"].notna().all() and (children[f"tags.{key}"] != "").all(), key
    assert set(children["tags.model.checkpoint_sha256"]) == {_sha(byo.checkpoint)}
    assert set(children["tags.data.n_eval"]) == {"797"}
    fp = optuna.load_study(study_name="byo", storage=f"sqlite:///{tmp_path / 'optuna.db'}").user_attrs[
        "vitq:fingerprint"]
    assert fp["model.checkpoint_sha256"] == _sha(byo.checkpoint)
    other = [a if not a.startswith("model.checkpoint=") else f"model.checkpoint={byo.other_checkpoint}"
             for a in byo.cli()]
    r = run_sweep(tmp_path, *common[:-2], "hydra.sweeper.n_trials=6", "hydra.sweeper.study_name=byo", *other)
    line = _one_line_error(r)
    assert "hydra.sweeper.study_name=byo" in line and "model.checkpoint_sha256" in line
    assert len(mlflow.search_runs([exp.experiment_id])) == len(runs)  # nothing ran, nothing logged


@pytest.mark.slow
def test_sensitivity_cli_takes_a_timm_model_and_folders(byo, tmp_path):
    r = run([sys.executable, "-m", "vitq.search.sensitivity", "--budgets", "60000,1e9", "--n-eval", "100",
             *byo.cli()], tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"on {byo_case.MODEL_NAME} / folder:eval (100 eval images, cpu)" in r.stdout
    assert "budget 1e+09 weight_bytes: predicted" in r.stdout and "budget 60000 weight_bytes:" in r.stdout
    # per (block, point) by the gradient score: no evaluation pass, a width per block for each point
    r = run([sys.executable, "-m", "vitq.search.sensitivity", "--granularity", "block", "--score", "grad_score",
             "--metric", "bops", "--budgets", "1e12", "--min-act-bits", "4", *byo.cli()], tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    depth = byo_case.KWARGS["depth"]
    assert f"(grad_score, per block: {depth * 14} items)" in r.stdout and ": 0 evaluation passes" in r.stdout
    widths = [ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("  attn_qkv ")]
    assert widths == [["8"] * depth]  # an unbounded budget keeps every block at the widest width
    # below the cheapest config, told before measuring: every block weight at 2 bits with its per-channel scale,
    # everything else FP32 (counted here from the timm model itself)
    model = timm.create_model(byo_case.MODEL_NAME, **byo_case.KWARGS)
    linears = [m for name, m in model.named_modules() if name.startswith("blocks.") and isinstance(m, torch.nn.Linear)]
    weights = sum(m.weight.numel() for m in linears)
    others = sum(p.numel() for p in model.parameters()) - weights
    cheapest = (2 * weights + 32 * sum(m.out_features for m in linears) + 32 * others) / 8
    (tmp_path / "a_file").write_text("")
    lines = {  # (args, the error line): each checked before measuring
        ("model.name=nope_vit",): "vitq: model.name: unknown timm model 'nope_vit'",
        ("--tracking-uri", f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"):
            f"vitq: tracking.uri: cannot use the MLflow store sqlite:///{tmp_path}",
        # more images than the folder has were cut silently
        ("--n-eval", "5000", *byo.cli()): "vitq: --n-eval=5000: data 'folder:eval' has 797 evaluation images; give at "
                                          "most that many",
        ("--budgets", "60000,1", *byo.cli()): f"vitq: --budgets: 1 weight_bytes is below the cheapest config the "
                                              f"widths allow, {cheapest:,.0f} weight_bytes (every item at its "
                                              f"narrowest allowed width)",
    }
    usage = {  # argparse's errors: an experiment with no store to log to was ignored; budgets and widths no config
        #        meets gave rc 0 with "infeasible" after the whole measurement, or a traceback (rc 1)
        ("--study", "mine"): "error: --study=mine: names the MLflow experiment of --tracking-uri, which is not given",
        ("--budgets", "0"): "error: --budgets: a budget is a finite number > 0 (of weight bytes or BOPs), got 0.0",
        ("--budgets", "1e5", "--candidates", "1,8"): "error: --candidates: 1: a width is in 2..16",
        ("--budgets", "1e5", "--min-act-bits", "9"): "error: --min-act-bits: must be in 2..8 (the widest candidate), "
                                                     "got 9",
    }
    cases = [[sys.executable, "-m", "vitq.search.sensitivity", *(() if "--budgets" in a else ("--budgets", "1")), *a]
             for a in (*lines, *usage)]
    results = run_many(cases, [tmp_path] * len(cases))
    for (args, expect), r in zip((*lines.items(), *usage.items()), results, strict=True):
        if args in lines:
            line, exact = _one_line_error(r), "--budgets" in args or "--n-eval" in args
            assert (line == expect) if exact else line.startswith(expect), (args, line)
            assert "sensitivity (" not in r.stdout  # nothing measured
        else:
            assert r.returncode == 2 and r.stderr.strip().endswith(expect), (args, r.stderr)


def test_the_sensitivity_measure_calibrates_and_evaluates_as_the_trials_do(byo, tmp_path):
    """The sensitivity CLI, the sweep's warm start and compare measured at 512 images a batch, with the default
    values kept and no statistics folder, whatever the config said: a sweep with ``calib_max_values`` set was
    solved from other ranges than its trials ran with (and calibrated once more for it)."""
    from vitq.search.sensitivity import compute_sensitivity, session_settings
    from vitq.sweep import session_of

    stats = tmp_path / "stats"
    ov = [*byo.cli(), "calib_max_values=64", "eval_batch_size=50", "calib_batch_size=100", f"stats_dir={stats}"]
    base, session = session_of(compose(ov), ov)
    assert session_settings(session) == {"batch_size": 100, "eval_batch_size": 50, "max_values": 64,
                                         "stats_dir": str(stats)}
    trial = session.run_trial(base, profile=False)
    sens = compute_sensitivity(session.model, session.data, base, (8,), n_eval=None, cache=False, drops=False,
                               **session_settings(session))
    assert (sens.base_top1, sens.base_loss) == pytest.approx((trial.top1, trial.loss), rel=1e-6)
    assert sorted(p.name for p in stats.iterdir())  # the statistics were stored where the config said
    # the measure as it was: other calibration values, so another base loss than the trials'
    before = compute_sensitivity(session.model, session.data, base, (8,), n_eval=None, cache=False, drops=False,
                                 batch_size=100)
    assert before.base_loss != pytest.approx(trial.loss, rel=1e-6)
