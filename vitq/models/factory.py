"""Build a ViT by name: the digits reference, or any timm model (tags included) with kwargs and a local checkpoint."""

from __future__ import annotations

import difflib
import hashlib
import logging
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vitq.models.reference import REFERENCES, build_reference
from vitq.models.vit import check_quantizable

__all__ = ["REFERENCE_NAME", "ModelError", "build_model", "check_weight_keys", "create_model", "file_sha256",
           "load_checkpoint", "read_weights", "weights_path"]

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


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")  # a hub snapshot's


def weights_path(path: str | Path, key: str = "model.checkpoint") -> Path:
    """``path`` as a weights file; a ModelError naming ``key`` when it is missing, or a folder (a model hub
    snapshot: the file in it to give instead)."""
    p = Path(path).expanduser()
    if p.is_dir():
        inside = [f for f in WEIGHT_FILES if (p / f).is_file()]
        hint = f"; give the weights file in it: {p / inside[0]}" if inside else ""
        raise ModelError(f"{key}: {p} is a folder, not a weights file{hint}")
    if not p.is_file():
        raise ModelError(f"{key}: file not found: {p}")
    return p


class _Unread:
    """Stands in for a pickled object that ``torch.load(weights_only=True)`` refuses (an optimizer factory, a
    LightningModule's hyperparameters, the model pickled whole): it takes its arguments and state, and nothing of
    the object's own code runs. A pickled ``nn.Module`` reads as its state dict (:meth:`items`)."""

    state: dict = {}  # (read only: an instance built by __new__ alone has no state of its own)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}

    def items(self) -> Iterator[tuple[str, Any]]:
        """Parameters and persistent buffers by dotted name, as ``nn.Module.state_dict`` lists them."""
        skip = self.state.get("_non_persistent_buffers_set") or ()
        for k, v in (self.state.get("_parameters") or {}).items():
            if v is not None:
                yield k, v
        for k, v in (self.state.get("_buffers") or {}).items():
            if v is not None and k not in skip:
                yield k, v
        for name, child in (self.state.get("_modules") or {}).items():
            if isinstance(child, _Unread):
                yield from ((f"{name}.{k}", v) for k, v in child.items())


def _placeholders(path: Path) -> list[tuple[type, str]]:
    """One :class:`_Unread` per global of ``path`` that the weights-only unpickler does not allow (torch lists them
    without unpickling)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file: nothing to list
        return []
    return [(type(n.rpartition(".")[2], (_Unread,), {"__module__": __name__}), n) for n in sorted(names)]


def read_weights(path: str | Path, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict in a local checkpoint, read by timm's ``load_state_dict`` with ``weights_only=True``, and the
    pickled objects left unread.

    Accepts what timm's tools write, in timm's order: ``state_dict_ema`` / ``model_ema`` (when ``use_ema``),
    ``state_dict``, ``model``, or a bare state dict, ``.safetensors`` too; ``module.`` prefixes are stripped. Objects
    the weights-only unpickler refuses (a LightningModule's hyperparameters, an optimizer factory, a model pickled
    whole) are read as inert placeholders, so nothing in the file runs; a model pickled whole yields its parameters
    and persistent buffers. Only tensors are taken.
    """
    from timm.models import load_state_dict

    path = weights_path(path)
    unread: list[str] = []
    try:
        try:
            state = load_state_dict(str(path), use_ema=use_ema, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError):  # (torch raises the unpickler's error from a RuntimeError)
            stubs = _placeholders(path)
            if not stubs:
                raise
            with torch.serialization.safe_globals(stubs):
                state = load_state_dict(str(path), use_ema=use_ema, weights_only=True)
            unread = [name for _, name in stubs]
    except (pickle.UnpicklingError, RuntimeError) as e:
        cause = e.__cause__ if isinstance(e.__cause__, pickle.UnpicklingError) else e
        text = " ".join(str(cause).split())
        if not isinstance(cause, pickle.UnpicklingError):
            raise ModelError(f"model.checkpoint: {path} is not a readable torch checkpoint ({type(e).__name__}: "
                             f"{text[:160]})") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)  # torch names the object it refused
        unpickler = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
        detail = (f"it holds {found.group(1)}" if found else
                  unpickler.group(1)[:120] if unpickler else "not a weights-only pickle")
        raise ModelError(f"model.checkpoint: {path} was refused: torch.load(weights_only=True) reads tensors and plain "
                         f"containers only ({detail}); if you trust the file, save the model's state dict alone: "
                         "torch.save(model.state_dict(), 'weights.pt')") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or non-torch file
        raise ModelError(f"model.checkpoint: {path} is not a readable torch checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"model.checkpoint: {path} does not contain a state dict of tensors")
    return state, unread


def _listed(keys: list[str], first: int = 8) -> str:
    """The first ``first`` keys, and how many more."""
    return ", ".join(keys[:first]) + (f" (+{len(keys) - first} more)" if len(keys) > first else "")


def _misfit(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> str | None:
    """Why ``state`` does not load into ``model`` strictly (the first mismatching shape, else the missing and
    unexpected keys), or None when it fits."""
    own = model.state_dict()
    for k in own:  # in the model's order, so "first" means the first layer that does not fit
        if k in state and tuple(state[k].shape) != tuple(own[k].shape):
            return (f"model.checkpoint: {path}: shape mismatch at {k}: checkpoint {tuple(state[k].shape)}, model "
                    f"{tuple(own[k].shape)} (check model.kwargs)")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if not missing and not unexpected:
        return None
    parts = [f"{label} keys: {_listed(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected))
             if keys]
    return f"model.checkpoint: {path} does not fit {type(model).__name__}: " + "; ".join(parts)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.getMessage().rstrip(".")))


RESAMPLE_LOGGERS = ("timm.layers.pos_embed", "timm.layers.patch_embed")  # timm's lines when it interpolates
BUILDER_LOGGER = "timm.models._builder"  # timm's lines when pretrained weights are adapted or left out


@contextmanager
def _timm_lines(*names: str) -> Iterator[list[tuple[str, str]]]:
    """(logger, message) of what timm's loggers ``names`` log at INFO and above inside the block (still passed on to
    the application's handlers)."""
    handler = _Records()
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


def _resampled(records: list[tuple[str, str]], what: str, resample: bool) -> list[str]:
    """timm's interpolation lines among ``records``; a ModelError naming ``what`` when there are some and
    ``resample`` is off."""
    lines = [m for name, m in records if name in RESAMPLE_LOGGERS]
    if lines and not resample:
        raise ModelError(f"{what} fit the model only after timm interpolates them ({'; '.join(lines)}); set "
                         "model.resample_weights=true to accept that, or build the model at their size (model.kwargs "
                         "img_size, patch_size)")
    return lines


def _load_numpy(model: nn.Module, path: Path, resample: bool) -> str:
    """A JAX/big_vision ``.npz`` read by timm's ``load_pretrained``; every parameter must come from the file."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ModelError(f"model.checkpoint: {path}: {type(model).__name__} cannot read NumPy checkpoints")
    with torch.no_grad():
        for p in model.parameters():  # what the file does not set stays NaN, and is named below
            p.fill_(float("nan"))
    try:
        with _timm_lines(*RESAMPLE_LOGGERS) as records:
            model.load_pretrained(str(path))
    except KeyError as e:  # numpy: "X is not a file in the archive"
        raise ModelError(f"model.checkpoint: {path}: {e.args[0] if e.args else e}, which timm's load_pretrained "
                         "reads for this model (check model.kwargs)") from None
    except Exception as e:  # noqa: BLE001 - not an npz, another layout, shapes that differ
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ModelError(f"model.checkpoint: {path} is not a JAX/big_vision checkpoint of this model "
                         f"({type(e).__name__}: {first})") from None
    unset = [n for n, p in model.named_parameters() if bool(torch.isnan(p).any())]
    if unset:
        why = (" (a head of another class count is not loaded: check model.kwargs num_classes)"
               if any(n.startswith("head.") for n in unset) else " (check model.kwargs)")
        raise ModelError(f"model.checkpoint: {path} does not set {_listed(unset)}{why}")
    lines = _resampled(records, f"model.checkpoint: {path}: its weights", resample)
    return "; ".join(["timm load_pretrained (JAX .npz)", *lines])


def _convert(model: nn.Module, state: dict[str, torch.Tensor], path: Path,
             resample: bool) -> tuple[dict[str, torch.Tensor], str] | None:
    """``state`` through timm's ``checkpoint_filter_fn`` (the conversion timm applies to pretrained weights:
    OpenAI CLIP, OpenCLIP, DINOv2, DeiT-3, ... layouts; position and patch embeddings resampled to the model), with
    what it did; None when the result does not fit either."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if not isinstance(model, VisionTransformer):
        return None
    try:
        with _timm_lines(*RESAMPLE_LOGGERS) as records:
            converted = checkpoint_filter_fn(dict(state), model, adapt_layer_scale=True)
    except Exception:  # noqa: BLE001 - not a layout timm knows: the misfit of the file as it is is reported
        return None
    if not isinstance(converted, dict) or _misfit(model, converted, path) is not None:
        return None
    lines = _resampled(records, f"model.checkpoint: {path}: its weights", resample)
    return converted, "; ".join(["timm checkpoint_filter_fn", *lines])


def _prefix_hint(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Where every key of ``model`` is in ``state`` under one prefix (a training module's attribute: ``net.``,
    ``model.``), the override that takes them; else ""."""
    own = list(model.state_dict())
    anchor = own[0]
    for prefix in sorted({k[:-len(anchor)] for k in state if k.endswith(anchor) and k != anchor}):
        if all(prefix + k in state for k in own):
            return f"; it holds the model's keys under {prefix!r}: set model.checkpoint_prefix={prefix}"
    return ""


def load_checkpoint(model: nn.Module, path: str | Path, use_ema: bool = True, resample: bool = False,
                    prefix: str | None = None) -> str:
    """Load a local checkpoint into ``model``; returns how it was converted ("" when loaded as it is).

    ``prefix`` takes the keys under it (``net.`` of a Lightning module), the prefix dropped. A state dict that fits
    the model is loaded as it is. One that does not goes through timm's conversion of pretrained weights
    (``checkpoint_filter_fn``); a JAX/big_vision ``.npz`` is read by timm's ``load_pretrained``. Interpolating a
    position or patch embedding changes the weights, so it needs ``resample``. A misfit names the first mismatching
    key (and both shapes)."""
    path = weights_path(path)
    if path.suffix.lower() == ".npz":
        if prefix:
            raise ModelError("model.checkpoint_prefix: a JAX .npz is read by timm's load_pretrained; leave it null")
        return _load_numpy(model, path, resample)
    state, unread = read_weights(path, use_ema)
    notes = [f"tensors only ({len(unread)} pickled objects left unread: {_listed(unread, 3)})"] if unread else []
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ModelError(f"model.checkpoint_prefix={prefix}: no key of {path} starts with it")
        notes.append(f"keys under {prefix!r}")
    misfit = _misfit(model, state, path)
    if misfit is not None:
        converted = _convert(model, state, path, resample)
        if converted is None:
            raise ModelError(misfit + ("" if prefix else _prefix_hint(model, state)))
        state, how = converted
        notes.append(how)
    model.load_state_dict(state)
    return "; ".join(notes)


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        base = name.split(".", 1)[0]
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; closest timm names: {', '.join(close)}" if close else ""
        raise ModelError(f"model.name: unknown timm model {name!r}{hint}")


def _pretrained_loaded(model: nn.Module, name: str, records: list[tuple[str, str]], resample: bool) -> str:
    """What timm did to its pretrained weights while building ``model`` (interpolated embeddings, an adapted input
    conv); a ModelError when it left weights at random init (a head of another class count, a layer it could not
    convert)."""
    what = f"model.pretrained: timm's weights for {name}"
    for logger, msg in records:
        if logger == BUILDER_LOGGER and (msg.startswith("Missing keys") or "random init" in msg):
            keys = re.search(r"Missing keys \((.*?)\) discovered", msg)
            cfg = getattr(model, "pretrained_cfg", None) or {}
            ncls = cfg.get("num_classes")
            head = (f" (model.kwargs num_classes={model.num_classes}, the weights have {ncls} classes: set "
                    "data.class_map to score some of their classes, or give a checkpoint with your head)"
                    if ncls is not None and ncls != getattr(model, "num_classes", ncls) else "")
            raise ModelError(f"{what} leave {keys.group(1) if keys else msg} at random init{head}")
    lines = _resampled(records, what, resample)
    adapted = [m for logger, m in records if logger == BUILDER_LOGGER and m.startswith("Converted input conv")]
    return "; ".join(["timm pretrained", *lines, *adapted]) if lines or adapted else ""


def check_weight_keys(name: str, pretrained: bool, checkpoint: str | None, use_ema: bool, resample_weights: bool,
                       checkpoint_prefix: str | None) -> None:
    """ModelError for a weights key that the other keys leave without effect: it would be ignored."""
    if checkpoint_prefix and checkpoint is None:
        raise ModelError("model.checkpoint_prefix: it selects keys of model.checkpoint, which is not set")
    if not use_ema and checkpoint is None:
        raise ModelError("model.use_ema=false: it chooses between the weights and the EMA weights of "
                         "model.checkpoint, which is not set")
    if pretrained and name in REFERENCES:
        raise ModelError(f"model.pretrained: {name} is vitq's digits reference, trained by vitq; pretrained weights "
                         "are timm's (model=timm model.name=...)")
    if pretrained and checkpoint is not None:
        raise ModelError("model.pretrained: model.checkpoint is set too, and its weights would replace timm's "
                         "pretrained ones; set one of them")
    if resample_weights and checkpoint is None and not pretrained:
        raise ModelError("model.resample_weights: it lets timm interpolate the weights of model.checkpoint or "
                         "model.pretrained, and neither is set")


def build_model(name: str = REFERENCE_NAME, pretrained: bool = False, checkpoint: str | None = None,
                kwargs: dict[str, Any] | None = None, use_ema: bool = True, resample_weights: bool = False,
                checkpoint_prefix: str | None = None) -> tuple[nn.Module, str]:
    """The model of :func:`create_model`, and how its weights were converted ("" when loaded as they are)."""
    kwargs = dict(kwargs or {})
    check_weight_keys(name, pretrained, checkpoint, use_ema, resample_weights, checkpoint_prefix)
    if name in REFERENCES:
        if kwargs:
            raise ModelError(f"model.kwargs: the digits reference has a fixed architecture; got {sorted(kwargs)} "
                             "(use model=timm for a timm model with kwargs)")
        model = build_reference(REFERENCES[name])
        how = (load_checkpoint(model, checkpoint, use_ema, resample_weights, checkpoint_prefix)
               if checkpoint is not None else "")
        return model.eval(), how
    _check_name(name)
    if "checkpoint_path" in kwargs:  # timm would load it itself, past vitq's checks, hash and provenance
        raise ModelError("model.kwargs.checkpoint_path: give the file as model.checkpoint=PATH (vitq checks, hashes "
                         "and records it)")
    fetch = pretrained and checkpoint is None
    try:
        with _timm_lines(*RESAMPLE_LOGGERS, BUILDER_LOGGER) as records, torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # weights left at random init are the same in every process (workers, resumes)
            model = timm.create_model(name, pretrained=fetch, **kwargs)
    except TypeError as e:  # an unknown or ill-typed kwarg
        raise ModelError(f"model.kwargs: timm.create_model({name!r}) rejected them: TypeError: "
                         f"{str(e).splitlines()[0][:200]}") from None
    except Exception as e:  # noqa: BLE001 - hub unreachable, bad kwarg values, weights of another shape
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        if fetch and "loading state_dict" in first:
            raise ModelError(f"model.pretrained: timm's weights for {name} do not fit the model that model.kwargs "
                             f"build: {' '.join(str(e).split())[:300]}") from None
        if fetch:
            raise ModelError(f"model.pretrained: could not fetch pretrained weights for {name!r} "
                             f"(no model hub reachable? use model.checkpoint=PATH) [{type(e).__name__}]") from None
        raise ModelError(f"model.kwargs: timm.create_model({name!r}) failed: {type(e).__name__}: {first}") from None
    try:
        check_quantizable(model)
    except TypeError as e:
        raise ModelError(f"model.name: {name} cannot be quantized by vitq: {e}") from None
    how = _pretrained_loaded(model, name, records, resample_weights) if fetch else ""
    if checkpoint is not None:
        how = load_checkpoint(model, checkpoint, use_ema, resample_weights, checkpoint_prefix)
    return model.eval(), how


def create_model(name: str = REFERENCE_NAME, pretrained: bool = False, checkpoint: str | None = None,
                 kwargs: dict[str, Any] | None = None, use_ema: bool = True, resample_weights: bool = False,
                 checkpoint_prefix: str | None = None) -> nn.Module:
    """The digits reference's architecture by default (its trained weights: ``checkpoint``, or the Session, which
    trains it once through ``vitq.reference``), else ``timm.create_model(name, **kwargs)``; always in eval mode.
    ``pretrained`` fetches timm's weights (unless a ``checkpoint`` is given); ``resample_weights`` lets timm
    interpolate position/patch embeddings to the model's size; ``checkpoint_prefix`` takes the checkpoint's keys under
    it."""
    return build_model(name, pretrained, checkpoint, kwargs, use_ema, resample_weights, checkpoint_prefix)[0]
