"""Build a ViT by name: the digits reference, or any timm ViT (``pretrained`` or a local checkpoint)."""

from __future__ import annotations

import pickle
from pathlib import Path

import timm
import torch
from torch import nn

from vitq.models.reference import build_reference, load_reference

__all__ = ["ModelError", "create_model", "load_checkpoint"]

REFERENCE_NAME = "digits_reference"


class ModelError(ValueError):
    """A model that cannot be built or loaded, with the reason in one sentence."""


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local checkpoint with ``weights_only=True``; mismatched keys are reported by name."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"model.checkpoint: file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported object"
        raise ModelError(f"model.checkpoint: {path} holds more than tensors and plain containers, so it was "
                         f"refused (weights_only=True; {first[:160]})") from None
    except Exception as e:  # a corrupt or non-torch file
        raise ModelError(f"model.checkpoint: {path} is not a readable torch checkpoint ({type(e).__name__})") from None
    state = blob
    if isinstance(blob, dict):
        for k in ("state_dict", "model", "model_state_dict"):
            if isinstance(blob.get(k), dict):
                state = blob[k]
                break
    if not isinstance(state, dict):
        raise ModelError(f"model.checkpoint: {path} does not contain a state dict")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state)
                   if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", shape)):
            if keys:
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{label} keys: {', '.join(keys[:8])}{more}")
        raise ModelError(f"model.checkpoint: {path} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state)
    return model


def create_model(name: str = REFERENCE_NAME, pretrained: bool = False, checkpoint: str | None = None,
                 num_classes: int | None = None, **kwargs) -> nn.Module:  # noqa: ANN003
    """The digits reference by default, else ``timm.create_model(name, ...)``; always in eval mode."""
    if name == REFERENCE_NAME:
        if checkpoint is not None:  # the reference's architecture with saved weights: no training, no cache
            return load_checkpoint(build_reference(), checkpoint).eval()
        model, _ = load_reference()
        return model
    if name not in timm.list_models():
        raise ModelError(f"model.name: unknown timm model {name!r}")
    extra = dict(kwargs)
    if num_classes is not None:
        extra["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **extra)
    except Exception as e:
        if pretrained:
            raise ModelError(f"model.pretrained: could not fetch pretrained weights for {name!r} "
                             f"(no model hub reachable? use model.checkpoint=PATH) [{type(e).__name__}]") from None
        raise
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()
