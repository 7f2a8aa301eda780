"""Calibration: FP activations of the calibration images, collected once per (model, calibration set).

Every quantization point keeps per-batch statistics (exact per-channel min/max and a bounded row
sample); any config's ranges are derived from them without another forward pass. Calibrated models
are cached in-process (for a sweep) and the statistics optionally on disk.
"""

from __future__ import annotations

import hashlib
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from vitq.data import DataBundle, batches
from vitq.models.vit import QuantViT, quantize_vit
from vitq.quant.config import LayerQuantConfig
from vitq.quant.observers import BatchStats

__all__ = ["CalibrationInfo", "calibrate", "calibrated_model", "clear_cache", "load_stats", "model_checksum",
           "save_stats"]

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


def calib_key(data: DataBundle, batch_size: int) -> str:
    ids = data.meta.get("calib_indices")
    payload = f"{data.name}|{batch_size}|{ids if ids is not None else id(data.calib)}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def calibrate(qmodel: QuantViT, data: DataBundle, batch_size: int = 128, progress: bool = False) -> CalibrationInfo:
    """Run the calibration images through the model with observers on; freezes ranges on exit."""
    t0 = time.perf_counter()
    passes = 0
    with torch.inference_mode(), qmodel.calibration():
        for x, _ in tqdm(batches(data.calib, batch_size), desc="calibrate", disable=not progress, leave=False):
            qmodel(x)
            passes += 1
    return CalibrationInfo(passes, time.perf_counter() - t0, "")


def save_stats(qmodel: QuantViT, path: str | Path) -> None:
    blob = {p.label: [(s.sample, s.cmin, s.cmax, s.n_rows) for s in p.stats] for p in qmodel.points()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # workers may write the same file
    torch.save(blob, tmp)
    tmp.replace(path)


def load_stats(qmodel: QuantViT, path: str | Path) -> None:
    """Install saved statistics and freeze ranges for the model's current config."""
    blob = torch.load(path, weights_only=True)
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
                     stats_dir: str | Path | None = None, progress: bool = False) -> tuple[QuantViT, CalibrationInfo]:
    """A quantized copy of ``model`` set to ``cfg``, calibrated at most once per (model, calibration set)."""
    key = (model_checksum(model), calib_key(data, batch_size))
    t0 = time.perf_counter()
    if key in _MODELS:
        qm = _MODELS[key]
        qm.set_config(cfg)
        return qm, CalibrationInfo(0, time.perf_counter() - t0, "memory")
    qm = quantize_vit(model, cfg)
    path = Path(stats_dir) / f"stats_v2_{key[0]}_{key[1]}.pt" if stats_dir else None
    if path is not None and path.is_file():
        load_stats(qm, path)
        info = CalibrationInfo(0, time.perf_counter() - t0, "disk")
    else:
        info = calibrate(qm, data, batch_size, progress)
        if path is not None:
            save_stats(qm, path)
    _MODELS[key] = qm
    return qm, info


def clear_cache() -> None:
    _MODELS.clear()
