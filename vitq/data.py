"""Datasets: scikit-learn's bundled digits (offline default) and ImageNet-style folders (timm eval transforms).

A :class:`DataBundle` holds three deterministic, disjoint splits chosen by seed and size: ``train``
(used only to train the digits reference), ``calib`` (calibration images) and ``eval`` (held out).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "DataBundle", "DataError", "batches", "digits_pixels", "load_data",
           "load_digits", "load_image_folder"]

DIGITS_MEAN, DIGITS_STD = 0.5, 0.5  # applied after ToTensor-style scaling to [0, 1]
DIGITS_PIXEL_SCALE = 15  # digits values 0..16 → 0..240 as 8-bit PNG pixels


class DataError(ValueError):
    """A dataset problem a user can fix: missing folder, empty split, labels outside the model."""


@dataclass
class DataBundle:
    """Calibration and evaluation splits (plus the training split for the digits reference)."""

    name: str
    calib: Dataset
    eval: Dataset
    num_classes: int
    train: Dataset | None = None
    meta: dict = field(default_factory=dict)

    def check_classes(self, model_classes: int) -> None:
        if self.num_classes > model_classes:
            raise DataError(f"data '{self.name}' has {self.num_classes} classes but the model predicts only "
                            f"{model_classes}: labels would fall outside the model's classes")


def batches(ds: Dataset, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) batches in order; in-memory tensors are sliced without a DataLoader."""
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    yield from DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)


def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as uint8 pixels (0..240) and labels."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return (d.images * DIGITS_PIXEL_SCALE).astype(np.uint8), d.target.astype(np.int64)


def _split_sizes(n: int, n_train: int, n_calib: int, n_eval: int | None, name: str) -> tuple[int, int, int]:
    n_eval = n - n_train if n_eval is None else n_eval
    for label, k in (("n_train", n_train), ("n_calib", n_calib), ("n_eval", n_eval)):
        if k < 0:
            raise DataError(f"data.{label}={k}: must be >= 0")
    if n_calib == 0 or n_eval == 0:
        raise DataError(f"data '{name}': empty split (n_calib={n_calib}, n_eval={n_eval})")
    if n_train + n_eval > n:
        raise DataError(f"data '{name}' has {n} images; n_train={n_train} + n_eval={n_eval} do not fit")
    return n_train, min(n_calib, max(n_train, n - n_eval)), n_eval


def load_digits(seed: int = 0, n_train: int = 1400, n_calib: int = 256, n_eval: int | None = None) -> DataBundle:
    """Digits as normalized 1×8×8 tensors; calibration images come from the training split."""
    pixels, labels = digits_pixels()
    n = len(labels)
    n_train, n_calib, n_eval = _split_sizes(n, n_train, n_calib, n_eval, "digits")
    perm = np.random.default_rng(seed).permutation(n)
    tr, ev = perm[:n_train], perm[n - n_eval:]
    cal = perm[:n_calib] if n_train else perm[n_train:n_train + n_calib]
    x = torch.from_numpy(pixels).float().div(255).unsqueeze(1).sub_(DIGITS_MEAN).div_(DIGITS_STD)
    y = torch.from_numpy(labels)

    def ds(idx: np.ndarray) -> TensorDataset:
        t = torch.from_numpy(idx)
        return TensorDataset(x[t], y[t])

    return DataBundle("digits", calib=ds(cal), eval=ds(ev), num_classes=10, train=ds(tr),
                      meta={"seed": seed, "calib_indices": cal.tolist(), "eval_indices": ev.tolist()})


def load_image_folder(root: str | Path, model: torch.nn.Module, n_calib: int = 256, n_eval: int | None = None,
                      seed: int = 0) -> DataBundle:
    """An ImageNet-style folder (``root/class_x/img.png``) with the model's timm eval transforms.

    Calibration and evaluation images are disjoint random subsets (by ``seed``).
    """
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: image folder not found: {root}")
    cfg = resolve_data_config(model=model)
    mode = "L" if cfg["input_size"][0] == 1 else "RGB"

    def loader(path: str) -> Image.Image:
        with Image.open(path) as img:
            return img.convert(mode)

    try:
        full = ImageFolder(str(root), transform=create_transform(**cfg), loader=loader)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"data.root: {root}: {e}") from None
    n = len(full)
    n_eval = n - n_calib if n_eval is None else n_eval
    if n_calib <= 0 or n_eval <= 0 or n_calib + n_eval > n:
        raise DataError(f"data.root: {root} has {n} images; n_calib={n_calib}, n_eval={n_eval} "
                        "need a non-empty split of each")
    perm = np.random.default_rng(seed).permutation(n)
    cal, ev = perm[:n_calib], perm[n - n_eval:]
    return DataBundle(f"folder:{root.name}", calib=Subset(full, cal.tolist()), eval=Subset(full, ev.tolist()),
                      num_classes=len(full.classes),
                      meta={"root": str(root), "seed": seed, "classes": full.classes,
                            "calib_indices": cal.tolist(), "eval_indices": ev.tolist()})


def load_data(name: str = "digits", *, model: torch.nn.Module | None = None, root: str | None = None,
              seed: int = 0, n_calib: int = 256, n_eval: int | None = None, n_train: int = 1400) -> DataBundle:
    """Dispatch by name: ``digits`` or ``folder`` (needs ``root`` and the model for its transforms)."""
    if name == "digits":
        return load_digits(seed=seed, n_train=n_train, n_calib=n_calib, n_eval=n_eval)
    if name == "folder":
        if not root:
            raise DataError("data.root: required for data=folder (an ImageNet-style folder)")
        if model is None:
            raise DataError("data=folder needs the model to resolve its eval transforms")
        return load_image_folder(root, model, n_calib=n_calib, n_eval=n_eval, seed=seed)
    raise DataError(f"data.name: unknown dataset {name!r}; valid: digits, folder")
