"""NVIDIA ModelOpt's ``auto_quantize`` beside vitq's solvers (``compare --matched --with-modelopt``; the extra
``[compare]`` installs it): the same model, calibration images, test split and weight budgets.

ModelOpt decides one format per Linear/Conv layer (``patch_embed`` and ``head`` included) among INT8 (per-channel
weights, per-tensor activations) and an integer W4A8 built from its config dicts, both of which run on a CPU, or
leaves the layer unquantized. Its budget is ``effective_bits``: Σ weight elements × bits / Σ weight elements over
those layers, an unquantized layer counting 16. A vitq budget of uniform W\\ *b* (the blocks' four linears at *b*
bits, patch embedding and head kept in floating point) converts to (blocks' elements × *b* + other elements × 16) /
all elements. Scales and zero points are not counted by ModelOpt; vitq's weight bytes count them.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitq.data import DataBundle, batches
from vitq.evaluate import evaluate, model_device

__all__ = ["PIP", "ModelOptMissing", "effective_bits", "require", "run_modelopt"]

PIP = "pip install 'vitq[compare]'  (installs nvidia-modelopt and requests)"
W4A8_INT = {"quant_cfg": [{"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 4, "axis": 0}},
                          {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}}],
            "algorithm": "max"}


class ModelOptMissing(RuntimeError):
    """``--with-modelopt`` without NVIDIA ModelOpt installed."""


def require() -> Any:
    """``modelopt.torch.quantization``, or ModelOptMissing with the pip command."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError:
        raise ModelOptMissing(f"--with-modelopt needs NVIDIA ModelOpt: {PIP}") from None
    return mtq


def effective_bits(model: nn.Module, block_bits: float) -> float:
    """ModelOpt's effective bits of a vitq config whose blocks' linears are at ``block_bits`` (others at 16)."""
    total = blocks = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            total += m.weight.numel()
            blocks += m.weight.numel() if name.startswith("blocks.") else 0
    return (blocks * block_bits + (total - blocks) * 16) / total


def run_modelopt(model: nn.Module, data: DataBundle, labels: np.ndarray, test_idx: np.ndarray,
                 budgets: dict[str, float], batch_size: int = 128, eval_batch_size: int = 512) -> list[dict]:
    """``auto_quantize`` at each budget (uniform weight bits of vitq → effective bits): the test images' correctness
    (``labels``: the evaluation set's, in order) and the wall time."""
    mtq = require()
    calib = list(batches(data.calib, batch_size, model_device(model)))  # on the model's device, as evaluate's
    rows = []
    for name, bits in budgets.items():
        target = effective_bits(model, bits)
        row: dict[str, Any] = {"budget": name, "strategy": "ModelOpt auto_quantize (INT8, W4A8)",
                               "effective_bits_target": target}
        m = copy.deepcopy(model).eval()
        t0 = time.perf_counter()
        try:
            with torch.enable_grad():
                m, state = mtq.auto_quantize(
                    m, constraints={"effective_bits": target}, quantization_formats=[mtq.INT8_DEFAULT_CFG, W4A8_INT],
                    data_loader=calib, forward_step=lambda mod, b: mod(b[0]),
                    loss_func=lambda out, b: F.cross_entropy(out, b[1]), num_calib_steps=len(calib),
                    num_score_steps=len(calib), verbose=False)
        except (AssertionError, ValueError) as e:  # an infeasible target: below every layer at W4
            row.update(feasible=False, reason=str(e).splitlines()[0][:200])
            rows.append(row)
            continue
        row["seconds"] = time.perf_counter() - t0
        pred = evaluate(m.eval(), data.eval, eval_batch_size).predictions.cpu().numpy()
        best = state["best"]
        formats = [str(r) for r in best["recipe"].values()]
        row.update(feasible=True, test_correct=(pred == labels)[test_idx],
                   effective_bits=float(best["constraints"]["effective_bits"]),
                   layers={f: formats.count(f) for f in sorted(set(formats))})
        rows.append(row)
    return rows
