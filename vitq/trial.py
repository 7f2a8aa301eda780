"""One trial: config → quantized model (cached calibration statistics) → evaluation → cost."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pandas as pd
from torch import nn

from vitq.calibrate import calibrated_model, model_checksum
from vitq.cost import model_cost
from vitq.data import DataBundle
from vitq.evaluate import EvalResult, evaluate, model_device
from vitq.quant.config import LayerQuantConfig
from vitq.quant.modules import STATS_MAX_ELEMENTS

__all__ = ["TrialResult", "fp_reference", "run_trial"]

_FP: dict[tuple[str, str, str, int], EvalResult] = {}


@dataclass
class TrialResult:
    """Every metric of one trial (see :meth:`metrics`) plus the per-point profiling table."""

    top1: float
    top5: float
    loss: float
    fp_top1: float
    top1_drop: float
    agreement: float
    weight_bytes: float
    fp32_bytes: float
    compression: float
    mean_weight_bits: float
    mean_act_bits: float
    bops: float
    calib_seconds: float
    eval_seconds: float
    calib_passes: int
    n_eval: int
    profile: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items() if k != "profile"}


def fp_reference(model: nn.Module, data: DataBundle, batch_size: int = 512) -> EvalResult:
    """FP evaluation of ``model`` on the evaluation split (memoized by model and image content, and device)."""
    fp = data.meta.get("eval_fingerprint")
    if fp is None:
        raise ValueError(f"data '{data.name}' has no eval_fingerprint in its meta: its FP result cannot be cached")
    key = (model_checksum(model), fp, str(model_device(model)), batch_size)
    if key not in _FP:
        _FP[key] = evaluate(model.eval(), data.eval, batch_size)
    return _FP[key]


def run_trial(model: nn.Module, data: DataBundle, cfg: LayerQuantConfig, *, batch_size: int = 512,
              calib_batch_size: int = 128, stats_dir: str | None = None, progress: bool = False,
              profile: bool = True, calib_max_values: int | None = STATS_MAX_ELEMENTS) -> TrialResult:
    """Quantize ``model`` with ``cfg``, derive ranges from cached statistics, evaluate and cost it."""
    data.check_classes(getattr(model, "num_classes", data.num_classes))
    fp = fp_reference(model, data, batch_size)
    t0 = time.perf_counter()
    qm, info = calibrated_model(model, data, cfg, calib_batch_size, stats_dir, progress, calib_max_values)
    calib_seconds = time.perf_counter() - t0
    res = evaluate(qm, data.eval, batch_size, fp.predictions, progress,
                   on_first_batch=qm.set_profiling if profile else None)
    cost = model_cost(qm, cfg, data.image_size)
    table = qm.profile() if profile else pd.DataFrame()
    assert res.agreement is not None
    return TrialResult(top1=res.top1, top5=res.top5, loss=res.loss, fp_top1=fp.top1, top1_drop=fp.top1 - res.top1,
                       agreement=res.agreement, weight_bytes=cost.weight_bytes, fp32_bytes=cost.fp32_bytes,
                       compression=cost.compression, mean_weight_bits=cost.mean_weight_bits,
                       mean_act_bits=cost.mean_act_bits, bops=cost.bops, calib_seconds=calib_seconds,
                       eval_seconds=res.seconds, calib_passes=info.forward_passes, n_eval=res.n, profile=table)


