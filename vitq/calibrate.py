"""Calibration: FP activations of the calibration images, collected once per (model, calibration set).

Every quantization point keeps per-batch statistics (exact per-channel min/max and a bounded row
sample); any config's ranges are derived from them without another forward pass. Calibrated models
are cached in-process (for a sweep) and the statistics optionally on disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from vitq.data import DataBundle, batches
from vitq.evaluate import model_device
from vitq.models.vit import QuantViT, quantize_vit
from vitq.quant.config import LayerQuantConfig
from vitq.quant.modules import STATS_MAX_ELEMENTS
from vitq.quant.observers import BatchStats

__all__ = ["CalibrationInfo", "calibrate", "calibrated_model", "clear_cache", "load_stats", "model_checksum",
           "save_stats"]

log = logging.getLogger(__name__)
_CHECKSUMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODELS: dict[tuple[str, str], QuantViT] = {}


@dataclass
class CalibrationInfo:
    forward_passes: int
    seconds: float
    from_cache: str  # "memory" | "disk" | "" (freshly calibrated)


def model_checksum(model: nn.Module) -> str:
    """SHA-256 over the model's state dict (memoized per model object)."""
    if model in _CHECKSUMS:
        return _CHECKSUMS[model]
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    _CHECKSUMS[model] = h.hexdigest()[:16]
    return _CHECKSUMS[model]


STATS_VERSION = 4  # bump when the collected statistics change (4: histograms of sampled batches)


def calib_key(data: DataBundle, batch_size: int, max_values: int | None = STATS_MAX_ELEMENTS) -> str:
    """Content key of the calibration statistics: image fingerprint, batch size, values kept, statistics version."""
    fp = data.meta.get("calib_fingerprint")
    if fp is None:
        raise ValueError(f"data '{data.name}' has no calib_fingerprint in its meta: calibration cannot be cached")
    return hashlib.sha256(f"v{STATS_VERSION}|{fp}|{batch_size}|{max_values}".encode()).hexdigest()[:16]


def calibrate(qmodel: QuantViT, data: DataBundle, batch_size: int = 128, progress: bool = False) -> CalibrationInfo:
    """Run the calibration images through the model with observers on; freezes ranges on exit."""
    t0 = time.perf_counter()
    passes = 0
    dev = model_device(qmodel)
    with torch.inference_mode(), qmodel.calibration():
        for x, _ in tqdm(batches(data.calib, batch_size, dev), desc="calibrate", disable=not progress, leave=False):
            qmodel(x)
            passes += 1
    return CalibrationInfo(passes, time.perf_counter() - t0, "")


def save_stats(qmodel: QuantViT, path: str | Path) -> None:
    blob = {p.label: [(s.sample, s.cmin, s.cmax, s.n_rows, s.hist, s.chist) for s in p.stats]
            for p in qmodel.points()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # unique: workers may write the same file
    os.close(fd)
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_stats(qmodel: QuantViT, path: str | Path) -> None:
    """Install saved statistics and freeze ranges for the model's current config."""
    blob = torch.load(path, weights_only=True, map_location=model_device(qmodel))
    points = qmodel.quantizers
    missing = sorted(set(points) - set(blob))
    if missing:
        raise ValueError(f"{path}: statistics lack points {missing[:5]}")
    for label, p in points.items():
        p.stats = [BatchStats(*t) for t in blob[label]]
        p.clear_memo()
        p.freeze()
    for lin in qmodel.linears():
        lin.refresh()


def calibrated_model(model: nn.Module, data: DataBundle, cfg: LayerQuantConfig, batch_size: int = 128,
                     stats_dir: str | Path | None = None, progress: bool = False,
                     max_values: int | None = STATS_MAX_ELEMENTS) -> tuple[QuantViT, CalibrationInfo]:
    """A quantized copy of ``model`` set to ``cfg``, calibrated at most once per (model, calibration set).

    ``max_values``: calibration values kept per point and batch (a seeded row sample beyond; None keeps all)."""
    key = (model_checksum(model), calib_key(data, batch_size, max_values), str(model_device(model)))
    t0 = time.perf_counter()
    if key in _MODELS:
        qm = _MODELS[key]
        qm.set_config(cfg)
        return qm, CalibrationInfo(0, time.perf_counter() - t0, "memory")
    qm = quantize_vit(model, cfg, max_sample_elements=max_values)
    path = Path(stats_dir) / f"stats_{key[0]}_{key[1]}.pt" if stats_dir else None
    info = None
    if path is not None and path.is_file():
        try:
            load_stats(qm, path)
            info = CalibrationInfo(0, time.perf_counter() - t0, "disk")
        except Exception as e:  # noqa: BLE001 - a torn or stale file is rebuilt, never trusted
            log.warning("calibration statistics %s are unreadable (%s); recalibrating", path, type(e).__name__)
            qm = quantize_vit(model, cfg, max_sample_elements=max_values)
    if info is None:
        info = calibrate(qm, data, batch_size, progress)
        if path is not None:
            try:
                save_stats(qm, path)
            except OSError as e:
                log.warning("calibration statistics not cached (%s: %s)", path.parent, e.strerror or e)
    _MODELS[key] = qm
    return qm, info


def clear_cache() -> None:
    _MODELS.clear()
