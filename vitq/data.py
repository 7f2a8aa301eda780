"""Datasets: scikit-learn's bundled digits (offline default) and ImageNet-style class folders.

A :class:`DataBundle` holds deterministic calibration and evaluation sets (plus the training split that trains
the digits reference). Folder images are decoded and transformed (timm's eval transform, resolved from the
model, any field overridable) once, kept as uint8 tensors, and cached on disk keyed by the files (path, size,
mtime), the transform and the subset; normalization runs per batch on the target device, exactly as timm's
``ToTensor`` + ``Normalize`` compute it on a CPU (within 1e-6 of it on a GPU: an H200 did not match bit for bit).
A CUDA device keeps a set whole when it fits (:func:`resident`): its batches are then cut there, without copies.
Every bundle carries a content fingerprint of its images.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from vitq.paths import cache_root

__all__ = ["CLASS_ORDERS", "DIGITS_MEAN", "DIGITS_STD", "RESIDENT_FRACTION", "DataBundle", "DataError", "FolderListing",
           "ImageSet", "batches", "class_indices", "digits_pixels", "labels_of", "list_image_folders", "load_digits",
           "load_image_folder", "load_listed_images", "normalize", "resident", "resolve_transform",
           "stratified_subset", "subset"]

log = logging.getLogger(__name__)
DIGITS_MEAN, DIGITS_STD = 0.5, 0.5  # applied after ToTensor-style scaling to [0, 1]
DIGITS_PIXEL_SCALE = 15  # digits values 0..16 → 0..240 as 8-bit PNG pixels
_DIGITS_SHAPE = (1797, 8, 8)  # scikit-learn's digits: images, rows, columns
IMAGE_CACHE_VERSION = 1  # bump when decoding or the cache layout changes
RESIDENT_FRACTION = 0.25  # a CUDA device keeps a set whose tensors take at most this share of its free memory
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "calib", "calibration", "eval",
                         "evaluation", "test", "testing"})
TRANSFORM_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")
CROP_MODES = ("center", "squash", "border")  # timm's eval transform (others crop as center)
SYNSET = re.compile(r"n\d{8}")  # a WordNet id, as ImageNet's class folders are named


class DataError(ValueError):
    """A dataset problem a user can fix, naming the key or path: missing folder, unreadable image, bad split."""


class ImageSet(Dataset):
    """Decoded images as uint8 (N, C, H, W) with labels; items are normalized float32 like timm's eval transform."""

    def __init__(self, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float]) -> None:
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return normalize(self.images[i:i + 1], self.mean, self.std)[0], int(self.labels[i])


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 → float32 in [0, 1] → (x - mean) / std: the arithmetic of ToTensor + Normalize (bit for bit on a CPU)."""
    return x.float().div_(255).sub_(mean.to(x.device)).div_(std.to(x.device))


@dataclass
class DataBundle:
    """Calibration and evaluation sets (plus the training split for the digits reference) and their provenance."""

    name: str
    calib: Dataset
    eval: Dataset
    num_classes: int
    train: Dataset | None = None
    meta: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Content hash of the calibration and evaluation images, labels and transform."""
        return self.meta.get("fingerprint") or _digest(self.meta.get("calib_fingerprint"),
                                                       self.meta.get("eval_fingerprint"))

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the evaluation images, as the model sees them."""
        return tuple(int(v) for v in self.eval[0][0].shape[-2:])

    def check_classes(self, model_classes: int) -> None:
        """DataError unless the labels index the model's outputs one to one (a label space of their size)."""
        if self.num_classes != model_classes:
            raise DataError(f"data '{self.name}' has {self.num_classes} classes but the model has {model_classes} "
                            f"outputs: labels would be scored against the wrong classes (build the model with "
                            f"num_classes={self.num_classes})")


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


_RESIDENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # set -> {device: its tensors there, or None}


def _tensors(ds: ImageSet | TensorDataset) -> tuple[Tensor, ...]:
    return (ds.images, ds.labels, ds.mean, ds.std) if isinstance(ds, ImageSet) else tuple(ds.tensors)


def resident(ds: ImageSet | TensorDataset, device: torch.device) -> tuple[Tensor, ...] | None:
    """The tensors of ``ds`` on the CUDA ``device``, copied there once and kept while ``ds`` lives, so that its
    batches need no host→device copy; None where they would take more than :data:`RESIDENT_FRACTION` of the
    device's free memory (its batches are then copied as they are cut). The values are the same either way."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    per_device = _RESIDENT.setdefault(ds, {})
    if device not in per_device:
        tensors = _tensors(ds)
        nbytes = sum(t.nbytes for t in tensors)
        free, _ = torch.cuda.mem_get_info(device)
        fits = nbytes <= RESIDENT_FRACTION * free
        per_device[device] = tuple(t.to(device) for t in tensors) if fits else None
        log.info("%s: %.1f MB of images %s on %s (%.1f GB free)", type(ds).__name__, nbytes / 2**20,
                 "kept" if fits else "copied per batch: too large to keep", device, free / 2**30)
    return per_device[device]


def batches(ds: Dataset, batch_size: int, device: torch.device | str | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) batches in order, on ``device``; in-memory sets are sliced without a DataLoader, on a CUDA
    device from their :func:`resident` copy where it fits."""
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else None
    if isinstance(ds, ImageSet | TensorDataset):
        kept = resident(ds, dev) if dev is not None and dev.type == "cuda" else None
        x_all, y_all, *norm = kept or _tensors(ds)
        for i in range(0, len(x_all), batch_size):
            x, y = x_all[i:i + batch_size], y_all[i:i + batch_size]
            if dev is not None and kept is None:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            yield (normalize(x, *norm) if norm else x), y
        return
    for xb, yb in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        yield (xb.to(dev), yb.to(dev)) if dev is not None else (xb, yb)


def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as uint8 pixels (0..240) and labels: from scikit-learn once per its version, then from the
    cache, so that a process that reads them does not import scikit-learn (2 s on a slow CPU)."""
    from importlib.metadata import version

    path = cache_root("data") / f"digits_sklearn-{version('scikit-learn')}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=True)
            if blob["pixels"].shape == _DIGITS_SHAPE and blob["labels"].shape == _DIGITS_SHAPE[:1]:
                return blob["pixels"].numpy(), blob["labels"].numpy()
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: rebuild it
            log.warning("digits cache %s is unreadable (%s); rebuilding it", path, type(e).__name__)
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    pixels, labels = (d.images * DIGITS_PIXEL_SCALE).astype(np.uint8), d.target.astype(np.int64)
    _write_cache(path, {"pixels": torch.from_numpy(pixels), "labels": torch.from_numpy(labels)}, "digits")
    return pixels, labels


def _write_cache(path: Path, blob: dict[str, Tensor | str], what: str) -> None:
    """``torch.save`` of ``blob`` to ``path`` through a temp file and a rename (readers never see a torn file); an
    unwritable cache is skipped with a warning."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save(blob, tmp)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        log.warning("%s cache not written (%s: %s)", what, path.parent, e.strerror or e)


def stratified_subset(labels: np.ndarray, n: int | None, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of ``n`` items drawn per class in proportion to its share (largest remainder), seeded.

    ``n=None`` (or ≥ the pool) takes the whole pool; ``exclude`` removes indices from the pool first.
    """
    pool = np.arange(len(labels))
    if exclude is not None and len(exclude):
        pool = np.setdiff1d(pool, exclude)
    if n is None or n >= len(pool):
        return pool
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels[pool], return_counts=True)
    share = counts * n / len(pool)
    quota = np.floor(share).astype(int)
    extra = n - int(quota.sum())
    quota[np.argsort(-(share - quota), kind="stable")[:extra]] += 1
    picks = [rng.permutation(pool[labels[pool] == c])[:q] for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(picks))


def _split_sizes(n: int, n_train: int, n_calib: int, n_eval: int | None, name: str) -> tuple[int, int, int]:
    n_eval = n - n_train if n_eval is None else n_eval
    for label, k in (("n_train", n_train), ("n_calib", n_calib), ("n_eval", n_eval)):
        if k < 0:
            raise DataError(f"data.{label}={k}: must be >= 0")
    for label, k in (("n_calib", n_calib), ("n_eval", n_eval)):
        if k == 0:
            raise DataError(f"data.{label}=0: an empty split of data '{name}' (n_calib={n_calib}, n_eval={n_eval})")
    if n_train + n_eval > n:
        raise DataError(f"data.n_eval={n_eval}: data '{name}' has {n} images; n_train={n_train} + n_eval={n_eval} do "
                        "not fit")
    room = max(n_train, n - n_eval)  # calibration images come from the training split, never from the eval set
    if n_calib > room:
        raise DataError(f"data.n_calib={n_calib}: data '{name}' has {room} images outside the {n_eval} evaluation "
                        f"images; set data.n_calib to at most {room}")
    return n_train, n_calib, n_eval


def load_digits(seed: int = 0, n_train: int = 1400, n_calib: int = 256, n_eval: int | None = None,
                img_size: int = 8) -> DataBundle:
    """Digits as normalized 1×8×8 tensors (``img_size``: upsampled bilinearly to that size); calibration images come
    from the training split."""
    pixels, labels = digits_pixels()
    n = len(labels)
    n_train, n_calib, n_eval = _split_sizes(n, n_train, n_calib, n_eval, "digits")
    perm = np.random.default_rng(seed).permutation(n)
    tr, ev = perm[:n_train], perm[n - n_eval:]
    cal = perm[:n_calib] if n_train else perm[n_train:n_train + n_calib]
    x = torch.from_numpy(pixels).float().div(255).unsqueeze(1).sub_(DIGITS_MEAN).div_(DIGITS_STD)
    if img_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(labels)

    def ds(idx: np.ndarray) -> TensorDataset:
        t = torch.from_numpy(idx)
        return TensorDataset(x[t], y[t])

    def content(idx: np.ndarray) -> str:
        size = b"" if img_size == 8 else str(img_size).encode()  # (8×8 keeps the fingerprints it always had)
        return hashlib.sha256(pixels[idx].tobytes() + labels[idx].tobytes() + size).hexdigest()[:16]

    return DataBundle("digits", calib=ds(cal), eval=ds(ev), num_classes=10, train=ds(tr),
                      meta={"seed": seed, "img_size": img_size, "calib_indices": cal.tolist(),
                            "eval_indices": ev.tolist(), "calib_fingerprint": content(cal),
                            "eval_fingerprint": content(ev), "n_calib": len(cal), "n_eval": len(ev)})


# ------------------------------------------------------------------------------------------------ folders
def model_channels(model: torch.nn.Module) -> int | None:
    """The image channels a timm ViT takes: a hybrid's patch embedding states them (its ``proj`` reads the CNN
    backbone's features), a plain one's ``proj`` reads the image."""
    pe = getattr(model, "patch_embed", None)
    chans = getattr(pe, "in_chans", None)
    if chans is None:
        chans = getattr(getattr(pe, "proj", None), "in_channels", None)
    return chans


def model_built_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """The input size a timm ViT was built for (``img_size``: its position embedding's grid), or None."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return tuple(int(s) for s in size) if size is not None else None


def model_img_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """The input size a timm ViT is fixed to (None when it takes any size)."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(pe, "dynamic_img_pad", False) or not getattr(pe, "strict_img_size", True):
        return None
    if getattr(model, "dynamic_img_size", False):
        return None
    return model_built_size(model)


def resolve_transform(model: torch.nn.Module, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm's eval data config for ``model`` with the ``data.*`` overrides (None = timm's value).

    ``input_size`` takes an int, [H, W] or [C, H, W]. Where timm's resolved size differs from the size the
    model is built for (e.g. ``model.kwargs.img_size``), the model's own size is used, also by a model that takes
    any size (``dynamic_img_size``, ``dynamic_img_pad``): the size its position embedding is for.
    """
    from timm.data import resolve_data_config
    from timm.data.transforms import str_to_interp_mode

    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    bad = sorted(set(ov) - set(TRANSFORM_KEYS))
    if bad:
        raise DataError(f"data.{bad[0]}: not a transform field; valid: {', '.join(TRANSFORM_KEYS)}")
    cfg = resolve_data_config(model=model)
    chans = model_channels(model) or cfg["input_size"][0]
    if "input_size" in ov:
        size = ov.pop("input_size")
        size = [size] if isinstance(size, int) else list(size)
        if len(size) == 1:
            size = [chans, size[0], size[0]]
        elif len(size) == 2:
            size = [chans, *size]
        if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size):
            raise DataError(f"data.input_size: expected an int, [H, W] or [C, H, W] of positive ints, got {size}")
        if size[0] != chans:
            raise DataError(f"data.input_size: {size[0]} channel(s), and the model takes {chans}; give [H, W]")
        if (fixed := model_img_size(model)) is not None and tuple(size[1:]) != fixed:
            raise DataError(f"data.input_size: {size[1]}x{size[2]}, and the model takes {fixed[0]}x{fixed[1]} only "
                            "(model.kwargs.img_size builds it for another size, dynamic_img_size=true for any)")
        pe = getattr(model, "patch_embed", None)
        patch = getattr(pe, "patch_size", None)
        if patch is not None and not getattr(pe, "dynamic_img_pad", False) and (size[1] % patch[0] or
                                                                                  size[2] % patch[1]):
            raise DataError(f"data.input_size: {size[1]}x{size[2]} is not a multiple of the model's patch size "
                            f"{patch[0]}x{patch[1]} (model.kwargs.dynamic_img_pad=true pads it)")
        cfg["input_size"] = tuple(size)
    elif (built := model_built_size(model)) is not None and tuple(cfg["input_size"][1:]) != built:
        cfg["input_size"] = (chans, *built)  # (a model of any size too: at 224, timm's, a model built for 32 ran
        # on 3136 tokens with its position embedding interpolated 7x, and its evaluation was killed for memory)
    for k in ("mean", "std"):
        if k in ov:
            v = ov.pop(k)
            try:
                cfg[k] = tuple(float(x) for x in (v if isinstance(v, list | tuple) else [v]))
            except (TypeError, ValueError):
                raise DataError(f"data.{k}: expected a number or a list of numbers, got {v!r}") from None
    cfg.update(ov)
    cfg["input_size"] = (chans, *cfg["input_size"][1:])
    for k in ("mean", "std"):
        vals = tuple(cfg[k])
        if len(vals) == 1 and chans > 1:
            vals = vals * chans
        if len(vals) != chans:
            raise DataError(f"data.{k}: {len(vals)} values for a model with {chans} input channels; "
                            f"set data.{k} to {chans} value(s)")
        if not all(math.isfinite(v) for v in vals) or (k == "std" and min(vals) <= 0):
            raise DataError(f"data.{k}: must be finite{' and > 0' if k == 'std' else ''}, got {list(vals)}")
        cfg[k] = vals
    if cfg.get("crop_pct") is not None and not 0 < float(cfg["crop_pct"]) <= 1.0:  # (timm reads 0 as its default)
        raise DataError(f"data.crop_pct: must be in (0, 1], got {cfg['crop_pct']}")
    if cfg.get("crop_mode") is not None and cfg["crop_mode"] not in CROP_MODES:
        raise DataError(f"data.crop_mode: expected one of {', '.join(CROP_MODES)} (timm crops any other as center), "
                        f"got {cfg['crop_mode']!r}")
    try:
        str_to_interp_mode(cfg["interpolation"])
    except KeyError:
        raise DataError(f"data.interpolation: timm has no interpolation {cfg['interpolation']!r} (bilinear, bicubic, "
                        "nearest, box, hamming, lanczos)") from None
    return cfg


def _list_folder(root: Path, key: str,
                 class_order: str | None = None) -> tuple[list[str], list[tuple[str, int]], bool]:
    """Class names (sorted), (file, index into them) and whether any image lies below its class folder, in ``root``.

    An image below its class folder (``cat/2024/x.png``) is labelled by its class folder (``cat``) in torchvision's
    ImageFolder, by the folder that holds it (``2024``) in timm's train script (with or without a class map); where
    there are such images, ``class_order`` must say which trained the model (``timm``: timm's own reader lists the
    folder). Images in ``root`` itself are refused: neither labels them as a class folder would."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not root.is_dir():
        raise DataError(f"{key}: image folder not found: {root}")
    loose = sorted(f.name for f in root.iterdir() if f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS))
    if loose:
        more = f" and {len(loose) - 1} more" if len(loose) > 1 else ""
        raise DataError(f"{key}: {root} holds images outside any class folder ({loose[0]}{more}); move them into "
                        "their class folders")
    try:
        classes, idx = find_classes(str(root))
        samples = make_dataset(str(root), idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{key}: {root}: {str(e).splitlines()[0]}") from None
    splits = sorted(c for c in classes if c.lower() in SPLIT_NAMES)
    if splits:
        raise DataError(f"{key}: {root} has class folders named like splits ({', '.join(splits)}); point "
                        "data.calib_root and data.eval_root at the split folders themselves")
    inside = len(os.path.join(str(root), ""))  # make_dataset joins root, class folder and the path below it
    below = next((p for p, _ in samples if p.count(os.sep, inside) > 1), None)
    if below is None or class_order == "torchvision":
        return classes, samples, below is not None
    nested = Path(below).relative_to(root)
    if class_order is None:
        raise DataError(f"{key}: images lie below their class folders ({nested}): timm's train script labels them by "
                        f"the folder that holds them ({nested.parent.name}), torchvision's ImageFolder by the class "
                        f"folder ({nested.parts[0]}); set data.class_order=timm or data.class_order=torchvision, as "
                        "the model was trained")
    from timm.data import ImageDataset

    reader = ImageDataset(str(root)).reader  # timm's train script lists a folder with this reader
    name = {i: c for c, i in reader.class_to_idx.items()}
    classes = sorted(reader.class_to_idx)
    at = {c: i for i, c in enumerate(classes)}
    return classes, [(str(p), at[name[t]]) for p, t in reader.samples], True


CLASS_ORDERS = ("timm", "torchvision")  # the script that labelled the class folders for training (data.class_order)


def _check_order(class_order: str | None) -> None:
    if class_order is not None and class_order not in CLASS_ORDERS:
        raise DataError(f"data.class_order={class_order!r}: valid: {', '.join(CLASS_ORDERS)} (or null)")


def _check_order_and_map(class_order: str | None, class_map: object, nested: bool) -> None:
    """With a class map, ``class_order`` only says which folder labels an image below its class folder."""
    if class_order is not None and class_map is not None and not nested:
        raise DataError("data.class_order: data.class_map already numbers the folders, and no image lies below its "
                        "class folder; set one of the two")


def class_indices(model: torch.nn.Module, classes: list[str], key: str, class_map: str | dict[str, int] | None = None,
                  class_order: str | None = None) -> tuple[np.ndarray, int, str | None]:
    """The model's output index of each class folder (``classes``, sorted by name), the number of outputs and where
    the indices come from.

    - ``class_map`` (``data.class_map``): timm's class map, a ``.txt`` file of class names in output order (or a
      ``.pkl``), or a ``{name: output}`` mapping; every folder must be in it.
    - Folders named by ImageNet synsets (``n01440764`` ...) for a model with the outputs of an ImageNet subset
      (timm's ``infer_imagenet_subset``: 1000, 11821, 21843 ...) are scored at timm's index of their synset, so a
      few classes of ImageNet evaluate an ImageNet model.
    - Otherwise the i-th folder is output i, which needs as many folders as outputs: anything else would score
      images against the wrong classes. timm's train script counts folders in natural order (``2`` before ``10``,
      case-insensitive), torchvision's ImageFolder in plain order (``10`` before ``2``); where the two differ,
      ``class_order`` (``data.class_order``) must say which trained the model.
    """
    _check_order(class_order)
    n = int(getattr(model, "num_classes", 0) or 0)
    index: dict[str, int] | None = None
    if class_map is not None:
        from timm.data.readers.class_map import load_class_map

        try:
            source = dict(class_map) if isinstance(class_map, dict) else str(Path(class_map).expanduser())
            index = load_class_map(source)
        except (AssertionError, OSError, ValueError, pickle.UnpicklingError) as e:
            raise DataError(f"data.class_map: cannot read {class_map}: {type(e).__name__}: {e}") from None
        space = "data.class_map"
    elif n and classes and all(SYNSET.fullmatch(c) for c in classes):
        from timm.data import ImageNetInfo, infer_imagenet_subset

        space = infer_imagenet_subset(model)
        names = ImageNetInfo(space).label_names() if space else []
        index = {name: i for i, name in enumerate(names)} if len(names) == n else None
    if index is not None:
        missing = [c for c in classes if c not in index]
        if missing:
            where = "data.class_map" if class_map is not None else f"the {n} {space} synsets of the model's outputs"
            raise DataError(f"{key}: class folders {', '.join(missing[:5])} are not among {where}")
        bad = [c for c in classes if isinstance(index[c], bool) or not isinstance(index[c], int)]
        if bad:
            raise DataError(f"data.class_map: the output of class {bad[0]} is {index[bad[0]]!r}, not an integer")
        out = np.array([index[c] for c in classes], dtype=np.int64)
        shared, counts = np.unique(out, return_counts=True)
        if (counts > 1).any():  # (only a class map can: synsets and their indices are unique)
            dup = shared[counts > 1][0]
            raise DataError(f"data.class_map: it scores class folders {', '.join(np.array(classes)[out == dup])} all "
                            f"as output {dup}; each folder must be its own class (merge the folders to score them "
                            "as one)")
        if n and not (out.min() >= 0 and out.max() < n):
            raise DataError(f"data.class_map: it maps folders to outputs {out.min()}..{out.max()}, but the model "
                            f"has {n} outputs")
        return out, n or int(out.max()) + 1, space
    if n and n != len(classes):
        raise DataError(f"{key}: {len(classes)} class folders for a model with {n} outputs; folder i (sorted) is "
                        f"scored as output i, so the counts must match, or set data.class_map (folders named by "
                        f"ImageNet synsets, n01440764 ..., are scored at their own index by an ImageNet model)")
    from timm.utils import natural_key

    natural = sorted(classes, key=natural_key)
    if natural != classes and class_order is None:
        first = next(i for i, (a, b) in enumerate(zip(natural, classes, strict=True)) if a != b)
        raise DataError(f"{key}: timm's train script numbers these class folders in natural order ({natural[first]} "
                        f"is class {first}), torchvision's ImageFolder in plain order ({classes[first]} is class "
                        f"{first}); set data.class_order=timm or data.class_order=torchvision, as the model was "
                        "trained")
    if class_order == "timm":
        at = {c: i for i, c in enumerate(natural)}
        return np.array([at[c] for c in classes], dtype=np.int64), len(classes), "timm natural order"
    return np.arange(len(classes), dtype=np.int64), len(classes), None


def _decode_one(path: str, mode: str, transform: Any) -> tuple[np.ndarray, bytes]:
    """One file's uint8 image and the SHA-256 of its bytes (the bytes themselves are not kept)."""
    from PIL import Image

    try:
        raw = Path(path).read_bytes()
        with Image.open(io.BytesIO(raw)) as img:
            img = img.convert(mode)
            x = transform(img)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or unreadable file: name it
        raise DataError(f"data: cannot read image {path}: {type(e).__name__}: {str(e).splitlines()[0][:160]}") \
            from None
    return np.asarray(x), hashlib.sha256(raw).digest()


def _decode(samples: list[tuple[str, int]], tcfg: dict[str, Any], num_workers: int) -> tuple[Tensor, Tensor, str]:
    """Decode and transform every file once: uint8 (N, C, H, W), labels and a content hash of files + labels.

    Each image is copied into one preallocated tensor as it comes, so the peak memory is about the result's size
    (an ImageNet-sized folder would otherwise hold every file's bytes and every image twice)."""
    from timm.data import create_transform

    transform = create_transform(**tcfg, is_training=False, use_prefetcher=True)  # no ToTensor/Normalize: uint8
    mode = "L" if tcfg["input_size"][0] == 1 else "RGB"
    paths = [p for p, _ in samples]
    h = hashlib.sha256()
    x: np.ndarray | None = None  # (filled with NumPy: a torch copy would wake its OpenMP threads for every image)
    pool = ThreadPoolExecutor(num_workers) if num_workers > 1 else None
    decoded = pool.map(lambda p: _decode_one(p, mode, transform), paths) if pool else \
        (_decode_one(p, mode, transform) for p in paths)
    try:
        for i, ((img, digest), (_, label)) in enumerate(zip(decoded, samples, strict=True)):
            img = img if img.ndim == 3 else img[None]
            if x is None:
                x = np.empty((len(samples), *img.shape), dtype=img.dtype)
            x[i] = img
            h.update(digest)
            h.update(int(label).to_bytes(8, "little"))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # a bad file stops the decoding of the rest
    if x is None:
        raise DataError("data: no images to decode")
    return torch.from_numpy(x), torch.tensor([lab for _, lab in samples], dtype=torch.int64), h.hexdigest()[:16]


def _cached_images(samples: list[tuple[str, int]], tcfg: dict[str, Any], num_workers: int,
                   cache: bool) -> tuple[Tensor, Tensor, str]:
    """:func:`_decode` through the on-disk cache; a corrupt entry is rebuilt, an unwritable cache is skipped."""
    stat = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns, lab) for p, lab in samples]
    key = _digest(IMAGE_CACHE_VERSION, {k: tcfg[k] for k in sorted(tcfg)}, stat)
    path = cache_root("images") / f"images_v{IMAGE_CACHE_VERSION}_{key}.pt"
    if cache and path.is_file():
        try:
            blob = torch.load(path, weights_only=True, mmap=True)  # file-backed pages: read as batches need them
            return blob["x"], blob["y"], blob["content"]
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: rebuild it
            log.warning("image cache %s is unreadable (%s); rebuilding it", path, type(e).__name__)
    x, y, content = _decode(samples, tcfg, num_workers)
    if cache:
        _write_cache(path, {"x": x, "y": y, "content": content}, "image")
    return x, y, content


@dataclass(frozen=True)
class FolderListing:
    """Image folders listed and checked with no model: the class folder names (sorted), each folder's (file, class
    position) samples by its key (``data.root``, or ``data.calib_root`` and ``data.eval_root``), and the folders."""

    classes: list[str]
    samples: dict[str, list[tuple[str, int]]]
    roots: dict[str, str]
    n_calib: int | None
    n_eval: int | None
    class_map: str | dict[str, int] | None
    class_order: str | None


def list_image_folders(*, root: str | Path | None = None, calib_root: str | Path | None = None,
                       eval_root: str | Path | None = None, n_calib: int | None = 256, n_eval: int | None = None,
                       class_map: str | dict[str, int] | None = None,
                       class_order: str | None = None) -> FolderListing:
    """What :func:`load_image_folder` checks without a model: which folders, their class folders and images
    (missing or split-looking folders, images outside or below class folders, class sets that differ) and the
    subset sizes they can give. A ``data=folder`` session runs it before it builds, reads or fetches the model."""
    if root is not None and (calib_root is not None or eval_root is not None):
        raise DataError("data.root: set either data.root (one folder, split) or data.calib_root and data.eval_root")
    if root is None and (calib_root is None or eval_root is None):
        missing = "data.calib_root" if calib_root is None else "data.eval_root"
        raise DataError(f"{missing}: required for data=folder (or set data.root to split one folder)")
    for k, v in (("n_calib", n_calib), ("n_eval", n_eval)):
        if v is not None and v < 1:
            raise DataError(f"data.{k}={v}: must be >= 1 (or null for all images)")
    _check_order(class_order)
    request = (n_calib, n_eval, class_map, class_order)
    if root is not None:
        root = Path(root).expanduser()
        classes, samples, nested = _list_folder(root, "data.root", class_order)
        _check_order_and_map(class_order, class_map, nested)
        if n_calib is None or (n_calib >= len(samples)):
            raise DataError(f"data.n_calib: {root} has {len(samples)} images; splitting one folder needs "
                            "n_calib below that (or use data.calib_root/data.eval_root)")
        return FolderListing(classes, {"data.root": samples}, {"root": str(root.resolve())}, *request)
    calib_root, eval_root = Path(calib_root).expanduser(), Path(eval_root).expanduser()
    classes, c_samples, c_nested = _list_folder(calib_root, "data.calib_root", class_order)
    e_classes, e_samples, e_nested = _list_folder(eval_root, "data.eval_root", class_order)
    _check_order_and_map(class_order, class_map, c_nested or e_nested)
    if classes != e_classes:
        only_c, only_e = sorted(set(classes) - set(e_classes)), sorted(set(e_classes) - set(classes))
        raise DataError(f"data.eval_root: class folders differ from data.calib_root: only in calib_root "
                        f"{only_c[:8]}, only in eval_root {only_e[:8]}")
    for key, want, found, folder in (("n_calib", n_calib, c_samples, calib_root),
                                     ("n_eval", n_eval, e_samples, eval_root)):
        if want is not None and want > len(found):
            raise DataError(f"data.{key}={want}: {folder} has {len(found)} images; set data.{key} to at most "
                            f"{len(found)}, or null for all of them")
    return FolderListing(classes, {"data.calib_root": c_samples, "data.eval_root": e_samples},
                         {"calib_root": str(calib_root.resolve()), "eval_root": str(eval_root.resolve())}, *request)


def load_image_folder(model: torch.nn.Module, *, root: str | Path | None = None,
                      calib_root: str | Path | None = None, eval_root: str | Path | None = None,
                      n_calib: int | None = 256, n_eval: int | None = None, seed: int = 0,
                      transform: dict[str, Any] | None = None, num_workers: int = 4, cache: bool = True,
                      class_map: str | dict[str, int] | None = None, class_order: str | None = None) -> DataBundle:
    """Class folders with the model's timm eval transform (``transform`` overrides timm's fields).

    Either two folders, ``calib_root`` and ``eval_root`` (e.g. train and val, with the same class names), or one
    ``root`` split into disjoint calibration and evaluation sets. Subsets of ``n_calib`` / ``n_eval`` images
    (None = all) are class-stratified and seeded. Labels are the model's outputs (:func:`class_indices`).
    """
    listing = list_image_folders(root=root, calib_root=calib_root, eval_root=eval_root, n_calib=n_calib,
                                 n_eval=n_eval, class_map=class_map, class_order=class_order)
    return load_listed_images(model, listing, seed=seed, transform=transform, num_workers=num_workers, cache=cache)


def load_listed_images(model: torch.nn.Module, listing: FolderListing, *, seed: int = 0,
                       transform: dict[str, Any] | None = None, num_workers: int = 4,
                       cache: bool = True) -> DataBundle:
    """:func:`load_image_folder` of folders :func:`list_image_folders` listed already (the subset sizes and class
    names are the listing's)."""
    n_calib, n_eval, class_map, class_order = listing.n_calib, listing.n_eval, listing.class_map, listing.class_order
    tcfg = resolve_transform(model, transform)
    classes, roots = listing.classes, listing.roots
    outputs, n_out, space = class_indices(model, classes, next(iter(listing.samples)), class_map, class_order)
    labelled = {k: [(p, int(outputs[lab])) for p, lab in ss] for k, ss in listing.samples.items()}
    if "data.root" in labelled:
        samples = labelled["data.root"]
        labels = np.array([lab for _, lab in samples])
        cal = stratified_subset(labels, n_calib, seed)
        ev = stratified_subset(labels, n_eval, seed + 1, exclude=cal)
        if n_eval is not None and len(ev) < n_eval:
            raise DataError(f"data.n_eval: {roots['root']} has {len(samples)} images; n_calib={n_calib} + "
                            f"n_eval={n_eval} do not fit")
        cal_samples, ev_samples = [samples[i] for i in cal], [samples[i] for i in ev]
    else:
        c_samples, e_samples = labelled["data.calib_root"], labelled["data.eval_root"]
        cal = stratified_subset(np.array([lab for _, lab in c_samples]), n_calib, seed)
        ev = stratified_subset(np.array([lab for _, lab in e_samples]), n_eval, seed + 1)
        cal_samples, ev_samples = [c_samples[i] for i in cal], [e_samples[i] for i in ev]
    xc, yc, fc = _cached_images(cal_samples, tcfg, num_workers, cache)
    xe, ye, fe = _cached_images(ev_samples, tcfg, num_workers, cache)
    tmeta = {k: list(v) if isinstance(v, tuple) else v for k, v in tcfg.items()}
    name = "folder:" + Path(roots.get("root") or roots["eval_root"]).name
    return DataBundle(name, calib=ImageSet(xc, yc, tcfg["mean"], tcfg["std"]),
                      eval=ImageSet(xe, ye, tcfg["mean"], tcfg["std"]), num_classes=n_out,
                      meta={**roots, "seed": seed, "classes": classes, "label_space": space, "transform": tmeta,
                            "calib_files": [p for p, _ in cal_samples], "eval_files": [p for p, _ in ev_samples],
                            "calib_fingerprint": _digest(fc, tmeta), "eval_fingerprint": _digest(fe, tmeta),
                            "n_calib": len(cal_samples), "n_eval": len(ev_samples)})


def labels_of(ds: Dataset) -> np.ndarray:
    """The labels of a dataset, in order."""
    if isinstance(ds, ImageSet):
        return ds.labels.cpu().numpy()
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].cpu().numpy()
    return np.array([int(ds[i][1]) for i in range(len(ds))])


def subset(ds: Dataset, idx: Sequence[int] | np.ndarray) -> Dataset:
    """The items ``idx`` of ``ds``, as the same in-memory kind where it is one."""
    t = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    if isinstance(ds, ImageSet):
        out = ImageSet(ds.images[t], ds.labels[t], (), ())
        out.mean, out.std = ds.mean, ds.std
        return out
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(x[t] for x in ds.tensors))
    return torch.utils.data.Subset(ds, t.tolist())
