"""Training the digits reference (once; then read from the cache): the work that joins its architecture
(``vitq.models.reference``) and scikit-learn's digits (``vitq.data``).

Deterministic, cached under ``$VITQ_CACHE`` (default ``~/.cache/vitq``) keyed by its hyperparameters.
``python -m vitq.reference`` trains (or reuses) it and prints its held-out accuracy.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from tqdm import tqdm

from vitq.data import DIGITS_MEAN, DIGITS_STD, DataBundle, load_digits
from vitq.logs import progress_enabled
from vitq.models.reference import ReferenceSpec, build_reference
from vitq.paths import cache_root, file_lock

__all__ = ["load_reference", "reference_path", "train_reference"]

log = logging.getLogger(__name__)


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Light random affine: rotation ±10°, scale ±10 %, shift ±0.5 px (background = -1 after normalize)."""
    n, _, h, _ = x.shape
    ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(10)
    sc = 1 + (torch.rand(n, generator=g) * 2 - 1) * 0.1
    sh = (torch.rand(n, 2, generator=g) * 2 - 1) * (0.5 * 2 / h)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, sh[:, 0]], 1), torch.stack([sin, cos, sh[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    bg = -DIGITS_MEAN / DIGITS_STD
    return F.grid_sample(x - bg, grid, align_corners=False, padding_mode="zeros") + bg


def train_reference(spec: ReferenceSpec, data: DataBundle) -> VisionTransformer:
    with torch.enable_grad():  # callers (the bench) may have switched autograd off globally
        return _train(spec, data)


def _train(spec: ReferenceSpec, data: DataBundle) -> VisionTransformer:
    torch.manual_seed(spec.seed)
    model = build_reference(spec)
    assert data.train is not None
    x, y = data.train.tensors  # type: ignore[attr-defined]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = math.ceil(len(x) / spec.batch_size)
    total, warm = spec.epochs * steps_per_epoch, spec.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    g = torch.Generator().manual_seed(spec.seed)
    model.train()
    t0 = time.time()
    bar = tqdm(total=spec.epochs, desc="train reference", unit="epoch", disable=not progress_enabled(),
               leave=False)
    for epoch in range(spec.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), spec.batch_size):
            idx = perm[i:i + spec.batch_size]
            loss = F.cross_entropy(model(_augment(x[idx], g)), y[idx], label_smoothing=spec.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (epoch + 1) % 20 == 0:
            log.info("epoch %d/%d loss %.3f (%.0f s)", epoch + 1, spec.epochs, loss.item(), time.time() - t0)
    bar.close()
    return model.eval()


def _accuracy(model: nn.Module, data: DataBundle) -> float:
    x, y = data.eval.tensors  # type: ignore[attr-defined]
    with torch.inference_mode():
        return float((model(x).argmax(-1) == y).float().mean())


def reference_path(spec: ReferenceSpec | None = None) -> Path:
    """Where the reference of ``spec`` is cached (keyed by its settings)."""
    return cache_root() / f"digits_vit_{(spec or ReferenceSpec()).key()}.pt"


def load_reference(spec: ReferenceSpec | None = None) -> tuple[VisionTransformer, dict]:
    """The trained reference (trained once, then read from the cache) and its metadata. Processes that start
    together take turns: one trains, the others then read its checkpoint."""
    spec = spec or ReferenceSpec()
    path = reference_path(spec)
    if not path.is_file():
        with file_lock(path.with_suffix(".lock")):
            if not path.is_file():
                _train_and_save(spec, load_digits(seed=spec.data_seed, n_train=spec.n_train, img_size=spec.img_size),
                                path)
    blob = torch.load(path, weights_only=True)
    model = build_reference(spec)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["meta"]


def _train_and_save(spec: ReferenceSpec, data: DataBundle, path: Path) -> None:
    log.info("training the digits reference ViT once (%d epochs, about 1-2 min on 2 cores); cached at %s",
             spec.epochs, path)
    t0 = time.time()
    model = train_reference(spec, data)
    meta = {"top1": _accuracy(model, data), "train_seconds": time.time() - t0, "spec": asdict(spec),
            "key": spec.key(), "n_params": sum(p.numel() for p in model.parameters())}
    _save(model, meta, path)


def _save(model: nn.Module, meta: dict, path: Path) -> None:
    """The checkpoint (state_dict + meta) written whole or not at all: a killed write leaves no partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from vitq.paths import FolderError, output_folder

    ap = argparse.ArgumentParser(prog="python -m vitq.reference",
                                 description="Train (or read from the cache) the digits reference ViT.")
    ap.add_argument("--out", help="also write the checkpoint here (state_dict + meta), e.g. for DVC")
    args = ap.parse_args(argv)
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:  # before the training, not after it
        try:
            output_folder(out.parent, "--out")
        except FolderError as e:
            print(f"vitq: {e}", file=sys.stderr)
            return 2
        if out.is_dir():
            print(f"vitq: --out: {out} is a folder; give the checkpoint's path (e.g. {out / 'reference.pt'})",
                  file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, meta = load_reference()
    print(f"digits reference ViT ({meta['n_params']:,} params, key {meta['key']}): held-out top-1 "
          f"{100 * meta['top1']:.2f} % (trained in {meta['train_seconds']:.0f} s)")
    if out is not None:
        _save(model, meta, out)
        print(f"checkpoint -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
