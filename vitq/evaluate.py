"""Evaluation: top-1, top-5, mean loss and agreement with FP predictions, under ``torch.inference_mode``."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from vitq.data import batches
from vitq.models.factory import ModelError

__all__ = ["EvalResult", "NonFiniteOutputError", "check_logits", "evaluate", "model_device"]


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


def check_logits(logits: Tensor, n_images: int, n_classes: int | None = None) -> None:
    """ModelError unless ``logits`` are (images, classes), with ``n_classes`` classes when given."""
    if logits.ndim != 2 or len(logits) != n_images or (n_classes is not None and logits.shape[1] != n_classes):
        want = f"({n_images}, {n_classes if n_classes is not None else 'classes'})"
        raise ModelError(f"model: it returns {tuple(logits.shape)} for {n_images} image(s), not {want} logits; vitq "
                         "evaluates classifiers (model.kwargs global_pool='' returns every token)")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def evaluate(model: nn.Module, dataset, batch_size: int = 512, fp_predictions: Tensor | None = None,
             progress: bool = False, on_first_batch=None) -> EvalResult:  # noqa: ANN001
    """Accuracy of ``model`` on ``dataset``; ``on_first_batch(flag)`` is called with True/False around batch 0.

    Batches go to the model's device; counts accumulate there and are read once at the end (no per-batch sync).
    """
    dev = model_device(model)
    t0 = time.perf_counter()
    correct1 = torch.zeros((), dtype=torch.int64, device=dev)
    correct5 = torch.zeros((), dtype=torch.int64, device=dev)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    finite: list[Tensor] = []
    preds: list[Tensor] = []
    with torch.inference_mode():
        for i, (x, y) in enumerate(tqdm(batches(dataset, batch_size, dev), desc="evaluate", disable=not progress,
                                        leave=False)):
            if i == 0 and on_first_batch is not None:
                on_first_batch(True)
            logits = model(x)
            if i == 0:
                if on_first_batch is not None:
                    on_first_batch(False)
                check_logits(logits, len(x))
            finite.append(torch.isfinite(logits).all())
            k = min(5, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices
            correct1 += (top[:, 0] == y).sum()
            correct5 += (top == y.unsqueeze(1)).any(1).sum()
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            preds.append(top[:, 0])
    if not preds:
        raise ValueError("evaluate: the dataset is empty")
    ok = torch.stack(finite).cpu()
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0])
        raise NonFiniteOutputError(f"the model produced NaN/inf logits on evaluation batch {bad}")
    pred = torch.cat(preds)
    n = len(pred)
    c1, c5, loss = int(correct1), int(correct5), float(loss_sum)
    agree = float((pred == fp_predictions.to(pred.device)).float().mean()) if fp_predictions is not None else None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return EvalResult(c1 / n, c5 / n, loss / n, n, time.perf_counter() - t0, pred, agree)
