"""Evaluation: top-1, top-5, mean loss and agreement with FP predictions, under ``torch.inference_mode``."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from vitq.data import batches

__all__ = ["EvalResult", "NonFiniteOutputError", "evaluate"]


class NonFiniteOutputError(ValueError):
    """The (quantized) model produced NaN or infinite logits."""


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    n: int
    seconds: float
    predictions: Tensor
    agreement: float | None = None


def evaluate(model: nn.Module, dataset, batch_size: int = 512, fp_predictions: Tensor | None = None,
             progress: bool = False, on_first_batch=None) -> EvalResult:  # noqa: ANN001
    """Accuracy of ``model`` on ``dataset``; ``on_first_batch(flag)`` is called with True/False around batch 0."""
    t0 = time.perf_counter()
    correct1 = correct5 = 0
    loss_sum = 0.0
    preds: list[Tensor] = []
    n = 0
    with torch.inference_mode():
        for i, (x, y) in enumerate(tqdm(batches(dataset, batch_size), desc="evaluate", disable=not progress,
                                        leave=False)):
            if i == 0 and on_first_batch is not None:
                on_first_batch(True)
            logits = model(x)
            if i == 0 and on_first_batch is not None:
                on_first_batch(False)
            if not torch.isfinite(logits).all():
                raise NonFiniteOutputError(f"the model produced NaN/inf logits on evaluation batch {i}")
            k = min(5, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y.unsqueeze(1)).any(1).sum())
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            preds.append(top[:, 0])
            n += len(y)
    pred = torch.cat(preds)
    agree = float((pred == fp_predictions).float().mean()) if fp_predictions is not None else None
    return EvalResult(correct1 / n, correct5 / n, loss_sum / n, n, time.perf_counter() - t0, pred, agree)
