"""Build a ViT by name: the digits reference, or any timm model (tags included) with kwargs and a local checkpoint."""

from __future__ import annotations

import difflib
import hashlib
import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vitq.models.reference import REFERENCES, build_reference
from vitq.models.vit import check_quantizable

__all__ = ["REFERENCE_NAME", "ModelError", "create_model", "file_sha256", "load_checkpoint", "read_state_dict"]

REFERENCE_NAME = "digits_reference"


class ModelError(ValueError):
    """A model that cannot be built or loaded, with the reason in one sentence naming the key."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


CHECKPOINT_KEYS = ("state_dict", "model")  # after state_dict_ema / model_ema when use_ema, as timm reads them


def read_state_dict(path: str | Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The state dict in a local checkpoint, read with ``weights_only=True``.

    Accepts what timm's tools write, in timm's order: ``state_dict_ema`` / ``model_ema`` (when ``use_ema``),
    ``state_dict``, ``model``, or a bare state dict; ``module.`` prefixes are stripped by timm's
    ``clean_state_dict``. ``.safetensors`` files are read by timm's ``load_state_dict``.
    """
    from timm.models import clean_state_dict, load_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"model.checkpoint: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_state_dict(str(path), use_ema=use_ema, weights_only=True)
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported object"
        raise ModelError(f"model.checkpoint: {path} holds more than tensors and plain containers, so it was "
                         f"refused (weights_only=True; {first[:160]})") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or non-torch file
        raise ModelError(f"model.checkpoint: {path} is not a readable torch checkpoint ({type(e).__name__})") from None
    state = blob
    if isinstance(blob, dict):
        keys = (("state_dict_ema", "model_ema") if use_ema else ()) + CHECKPOINT_KEYS
        state = next((blob[k] for k in keys if isinstance(blob.get(k), dict)), blob)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"model.checkpoint: {path} does not contain a state dict of tensors")
    return clean_state_dict(state)


def load_checkpoint(model: nn.Module, path: str | Path, use_ema: bool = True) -> nn.Module:
    """Load a local checkpoint into ``model``; a misfit names the first mismatching key (and both shapes)."""
    state = read_state_dict(path, use_ema)
    own = model.state_dict()
    for k in own:  # in the model's order, so "first" means the first layer that does not fit
        if k in state and tuple(state[k].shape) != tuple(own[k].shape):
            raise ModelError(f"model.checkpoint: {path}: shape mismatch at {k}: checkpoint "
                             f"{tuple(state[k].shape)}, model {tuple(own[k].shape)} (check model.kwargs)")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{label} keys: {', '.join(keys[:8])}{more}")
        raise ModelError(f"model.checkpoint: {path} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state)
    return model


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        base = name.split(".", 1)[0]
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; closest timm names: {', '.join(close)}" if close else ""
        raise ModelError(f"model.name: unknown timm model {name!r}{hint}")


def create_model(name: str = REFERENCE_NAME, pretrained: bool = False, checkpoint: str | None = None,
                 kwargs: dict[str, Any] | None = None, use_ema: bool = True) -> nn.Module:
    """The digits reference's architecture by default (its trained weights: ``checkpoint``, or the Session, which
    trains it once through ``vitq.reference``), else ``timm.create_model(name, **kwargs)``; always in eval mode."""
    kwargs = dict(kwargs or {})
    if name in REFERENCES:
        if kwargs:
            raise ModelError(f"model.kwargs: the digits reference has a fixed architecture; got {sorted(kwargs)} "
                             "(use model=timm for a timm model with kwargs)")
        model = build_reference(REFERENCES[name])
        return (load_checkpoint(model, checkpoint, use_ema) if checkpoint is not None else model).eval()
    _check_name(name)
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except TypeError as e:  # an unknown or ill-typed kwarg
        raise ModelError(f"model.kwargs: timm.create_model({name!r}) rejected them: TypeError: "
                         f"{str(e).splitlines()[0][:200]}") from None
    except Exception as e:  # noqa: BLE001 - hub unreachable, bad kwarg values
        if pretrained and checkpoint is None:
            raise ModelError(f"model.pretrained: could not fetch pretrained weights for {name!r} "
                             f"(no model hub reachable? use model.checkpoint=PATH) [{type(e).__name__}]") from None
        raise ModelError(f"model.kwargs: timm.create_model({name!r}) failed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    try:
        check_quantizable(model)
    except TypeError as e:
        raise ModelError(f"model.name: {name} cannot be quantized by vitq: {e}") from None
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, use_ema)
    return model.eval()
