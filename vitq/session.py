"""The one place that builds the work of a config: model, data, device, FP reference and calibrated models.

``Session.from_config(cfg)`` takes the composed ``model`` / ``data`` / ``device`` / batch-size keys (a Hydra
config or a plain dict) and is memoized by content: the model spec with the checkpoint's SHA-256, the data
spec and the device. Everything below it is cached by content as well (model weights checksum, image
fingerprints), never by object identity. ``vitq.sweep``, the sweeper, sensitivity, compare and the bench build
their work here.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vitq
from vitq.allocator import retain_freed_memory
from vitq.data import (
    TRANSFORM_KEYS,
    DataBundle,
    DataError,
    FolderListing,
    list_image_folders,
    load_digits,
    load_listed_images,
    model_channels,
    model_img_size,
)
from vitq.evaluate import EvalResult, check_logits
from vitq.models.factory import (
    REFERENCE_NAME,
    ModelError,
    build_model,
    check_weight_keys,
    file_sha256,
    weights_path,
)
from vitq.models.reference import REFERENCES
from vitq.paths import REPO_ROOT
from vitq.quant.config import ConfigError, LayerQuantConfig
from vitq.quant.modules import STATS_MAX_ELEMENTS
from vitq.trial import TrialResult, fp_reference, run_trial

__all__ = ["DataSpec", "ModelSpec", "Session", "SessionError", "git_commit", "resolve_device"]

SessionError = (ConfigError, DataError, ModelError)  # what a bad model/data/device config raises
log = logging.getLogger(__name__)


def resolve_device(spec: str | None) -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a missing GPU is an error."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError("device", f"expected auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError("device", f"expected auto, cpu, cuda or cuda:N, got {spec!r}")
    if not torch.cuda.is_available():
        raise ConfigError("device", f"{spec}: no CUDA device is available here (use device=cpu or device=auto)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError("device", f"{spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


@functools.cache
def git_commit() -> str:
    """The git commit of the vitq checkout (``unknown`` when installed from a wheel)."""
    root = REPO_ROOT
    if not (root / ".git").exists():
        return "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class ModelSpec:
    name: str = REFERENCE_NAME
    pretrained: bool = False
    checkpoint: str | None = None
    kwargs: str = "{}"  # JSON, sorted keys: hashable
    use_ema: bool = True
    resample_weights: bool = False  # permits interpolating the checkpoint's position/patch embeddings
    checkpoint_prefix: str | None = None  # the checkpoint's keys under it (a training module's attribute)

    @property
    def kwargs_dict(self) -> dict[str, Any]:
        return json.loads(self.kwargs)

    @property
    def weights_file(self) -> tuple[str, str] | None:
        """(key, path) of the file the weights come from: ``model.checkpoint``, or the local file that timm's
        pretrained loading reads (``model.kwargs.pretrained_cfg_overlay.file``); None for the hub or random weights."""
        if self.checkpoint is not None:
            return "model.checkpoint", self.checkpoint
        overlay = self.kwargs_dict.get("pretrained_cfg_overlay")
        if self.pretrained and isinstance(overlay, dict) and overlay.get("file"):
            return "model.kwargs.pretrained_cfg_overlay.file", str(overlay["file"])
        return None


@dataclass(frozen=True)
class DataSpec:
    name: str = "digits"
    root: str | None = None
    calib_root: str | None = None
    eval_root: str | None = None
    seed: int = 0
    n_train: int | None = None  # digits: the reference's split (1400), else this many training images
    n_calib: int | None = 256
    n_eval: int | None = None
    transform: str = "{}"  # JSON of the data.* transform overrides that are set
    num_workers: int = 4
    cache: bool = True
    class_map: str = "null"  # JSON of data.class_map: a file of class names or a {name: output} mapping
    class_order: str | None = None  # timm | torchvision: the script that labelled the folders for training


@functools.cache
def _checkpoint_sha(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def checkpoint_sha256(path: str | None, key: str = "model.checkpoint") -> str | None:
    """SHA-256 of a weights file (named by ``key`` in errors), computed once per (path, size, mtime)."""
    if path is None:
        return None
    p = weights_path(path, key)
    st = p.stat()
    return _checkpoint_sha(str(p.resolve()), st.st_size, st.st_mtime_ns)


def _plain(node: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, DictConfig | ListConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with vitq
        pass
    return node


_SESSIONS: dict[tuple, Session] = {}


@dataclass(eq=False)
class Session:
    """Model, data and device of one config; builds each once and caches results by content."""

    model_spec: ModelSpec
    data_spec: DataSpec
    device: torch.device
    eval_batch_size: int = 512
    calib_batch_size: int = 128
    stats_dir: str | None = None
    calib_max_values: int | None = STATS_MAX_ELEMENTS
    checkpoint_sha: str | None = None
    _model: nn.Module | None = field(default=None, repr=False)
    _data: DataBundle | None = field(default=None, repr=False)
    _listing: FolderListing | None = field(default=None, repr=False)  # data=folder: the folders, listed once
    _outputs_checked: bool = field(default=False, repr=False)
    _conversion: str = field(default="", repr=False)  # how timm converted the weights ("" loaded as they are)

    @classmethod
    def from_config(cls, cfg: Any) -> Session:
        """The session of a composed config (``model``, ``data``, ``device``, batch sizes, ``stats_dir``)."""
        max_values = cfg.get("calib_max_values", STATS_MAX_ELEMENTS)
        cfg = {k: _plain(cfg.get(k)) for k in ("model", "data", "device", "eval_batch_size", "calib_batch_size",
                                                 "stats_dir")}  # not the whole config: Hydra's node may not resolve
        if max_values is not None and int(max_values) < 1:
            raise ConfigError("calib_max_values", f"must be >= 1 or null (keep every value), got {max_values}")
        m, d = cfg.get("model") or {}, cfg.get("data") or {}
        kwargs = m.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ModelError(f"model.kwargs: expected a mapping of timm.create_model arguments, got {kwargs!r}")
        mspec = ModelSpec(str(m.get("name") or REFERENCE_NAME), bool(m.get("pretrained", False)),
                          m.get("checkpoint"), json.dumps(kwargs, sort_keys=True, default=str),
                          bool(m.get("use_ema", True)), bool(m.get("resample_weights", False)),
                          m.get("checkpoint_prefix") or None)
        transform = {k: d.get(k) for k in TRANSFORM_KEYS if d.get(k) is not None}
        class_map = d.get("class_map")
        if isinstance(class_map, dict):  # folder names: Hydra reads {0: 3} with int keys (and a mix could not sort)
            class_map = {str(k): v for k, v in class_map.items()}
        dspec = DataSpec(str(d.get("name") or "digits"), d.get("root"), d.get("calib_root"), d.get("eval_root"),
                         int(d.get("seed") or 0), None if d.get("n_train") is None else int(d["n_train"]),
                         d.get("n_calib", 256),
                         d.get("n_eval"), json.dumps(transform, sort_keys=True), int(d.get("num_workers") or 0),
                         bool(d.get("cache", True)), json.dumps(class_map, sort_keys=True),
                         d.get("class_order"))
        sizes = {"eval_batch_size": cfg.get("eval_batch_size"), "calib_batch_size": cfg.get("calib_batch_size")}
        for key, v in sizes.items():
            if v is not None and int(v) < 1:
                raise ConfigError(key, f"must be >= 1, got {v}")
        for key in ("seed", "num_workers"):  # (a negative seed failed in NumPy; negative workers ran as 0)
            if (v := d.get(key)) is not None and int(v) < 0:
                raise DataError(f"data.{key}: must be >= 0, got {v}")
        eval_bs = 512 if sizes["eval_batch_size"] is None else int(sizes["eval_batch_size"])
        calib_bs = 128 if sizes["calib_batch_size"] is None else int(sizes["calib_batch_size"])
        device = resolve_device(cfg.get("device"))
        weights = mspec.weights_file
        sha = checkpoint_sha256(weights[1], weights[0]) if weights else None
        key = (mspec, sha, dspec, str(device), eval_bs, calib_bs, cfg.get("stats_dir"), max_values)
        if key not in _SESSIONS:
            retain_freed_memory()  # trials allocate the same large buffers pass after pass: reuse them
            _SESSIONS[key] = cls(mspec, dspec, device, eval_bs, calib_bs, cfg.get("stats_dir"), max_values, sha)
        return _SESSIONS[key]

    # ------------------------------------------------------------------------------------------- the work
    @property
    def model(self) -> nn.Module:
        """The FP model, float32, in eval mode, on the session's device."""
        if self._model is None:
            m = self.model_spec
            if m.name in REFERENCES and m.checkpoint is None and not m.kwargs_dict:
                # trained once, then cached (build_model checks the weights keys on the other path)
                check_weight_keys(m.name, m.pretrained, m.checkpoint, m.use_ema, m.resample_weights,
                                  m.checkpoint_prefix)
                from vitq.reference import load_reference

                model, _ = load_reference(REFERENCES[m.name])
            else:
                model, self._conversion = build_model(m.name, m.pretrained, m.checkpoint, m.kwargs_dict, m.use_ema,
                                                      m.resample_weights, m.checkpoint_prefix)
                if self._conversion:
                    log.info("model: weights loaded: %s", self._conversion)
                if not (m.pretrained or m.checkpoint):
                    log.warning("model: %s has random weights (model.pretrained=false and no model.checkpoint): its "
                                "accuracy says nothing of a trained model's; give model.checkpoint=PATH or "
                                "model.pretrained=true", m.name)
            self._model = model.float().to(self.device).eval()
        return self._model

    @property
    def data(self) -> DataBundle:
        """Calibration and evaluation sets (decoded once, cached on disk by content)."""
        if self._data is None:
            d = self.data_spec
            listing = self._check_data_inputs()
            if d.name == "digits":
                n_train, img_size = self._digits_split()
                self._check_digits_fit(img_size)
                n_calib = n_train if d.n_calib is None else d.n_calib  # null: every training image
                self._data = load_digits(seed=d.seed, n_train=n_train, n_calib=n_calib, n_eval=d.n_eval,
                                         img_size=img_size)
            else:
                self._data = load_listed_images(self.model, listing, seed=d.seed, transform=json.loads(d.transform),
                                                num_workers=d.num_workers, cache=d.cache)
            self._data.check_classes(self.num_classes)
        return self._data

    def _check_data_inputs(self) -> FolderListing | None:
        """DataError for what the data keys get wrong with no model to read: a dataset vitq does not know, keys the
        dataset takes none of, and every check of the folders (:func:`~vitq.data.list_image_folders`), whose
        listing is returned. Runs before the model is built: a mistyped folder fails before a model is fetched."""
        d = self.data_spec
        if d.name == "digits":
            if d.root or d.calib_root or d.eval_root:
                raise DataError("data.root: data=digits takes no folders (use data=folder)")
            for k, v in (("class_map", json.loads(d.class_map)), ("class_order", d.class_order),
                         *json.loads(d.transform).items()):  # (the digits are 8×8 pixels, scaled as trained)
                if v is not None:
                    raise DataError(f"data.{k}: data=digits takes no {k} (use data=folder)")
            self._digits_split()
            return None
        if d.name != "folder":
            raise DataError(f"data.name: unknown dataset {d.name!r}; valid: digits, folder")
        if d.n_train:
            raise DataError(f"data.n_train={d.n_train}: data=folder has no training split: calibration images come "
                            "from data.calib_root, or from data.root beside the evaluation images (data.n_calib sets "
                            "how many)")
        if self._listing is None:
            self._listing = list_image_folders(root=d.root, calib_root=d.calib_root, eval_root=d.eval_root,
                                               n_calib=d.n_calib, n_eval=d.n_eval, class_map=json.loads(d.class_map),
                                               class_order=d.class_order)
        return self._listing

    def _digits_split(self) -> tuple[int, int]:
        """(training images, image size) of the digits for this model: a digits reference's own split and size
        (another split would evaluate it on images it was trained on: refused), else 1400 by default at 8×8."""
        d, m = self.data_spec, self.model_spec
        spec = REFERENCES.get(m.name)
        if spec is None:
            return (1400 if d.n_train is None else d.n_train), 8
        if m.checkpoint is None:
            for key, given, own in (("n_train", d.n_train, spec.n_train), ("seed", d.seed, spec.data_seed)):
                if given is not None and given != own:
                    raise DataError(f"data.{key}={given}: model {m.name} was trained on the first {spec.n_train} "
                                    f"digits of seed {spec.data_seed}; another split would evaluate it on images it "
                                    f"was trained on (leave data.{key} unset)")
        return (spec.n_train if d.n_train is None else d.n_train), spec.img_size

    def _check_digits_fit(self, img_size: int) -> None:
        """DataError when the model does not take digits' 1×S×S images (a timm model built for other inputs)."""
        chans, fixed = model_channels(self.model), model_img_size(self.model)
        if chans not in (None, 1) or fixed not in (None, (img_size, img_size)):
            takes = "×".join(str(v) for v in (chans or "?", *(fixed or ("any", "any"))))
            raise DataError(f"data: data=digits gives 1×{img_size}×{img_size} images, but model {self.model_spec.name} "
                            f"takes {takes}; use data=folder with your images (or build the model for digits: "
                            f"'model.kwargs={{img_size:{img_size},in_chans:1,patch_size:2,...}}')")

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or self.data.num_classes)

    def build(self) -> Session:
        """Build model and data now, and run the model on one image (so a bad config fails before any trial)."""
        if not self._outputs_checked:
            x, _ = self.data.eval[0]  # (data first: its inputs are checked before the model is read or fetched)
            with torch.inference_mode():
                check_logits(self.model(x[None].to(self.device)), 1, self.data.num_classes)
            self._outputs_checked = True
        return self

    @property
    def fp(self) -> EvalResult:
        """The FP model's evaluation (memoized by model checksum and image fingerprint)."""
        return fp_reference(self.model, self.data, self.eval_batch_size)

    def run_trial(self, cfg: LayerQuantConfig, *, profile: bool = True, progress: bool = False) -> TrialResult:
        return run_trial(self.model, self.data, cfg, batch_size=self.eval_batch_size,
                         calib_batch_size=self.calib_batch_size, stats_dir=self.stats_dir, progress=progress,
                         profile=profile, calib_max_values=self.calib_max_values)

    # ------------------------------------------------------------------------------------------- provenance
    def fingerprint(self) -> dict[str, Any]:
        """What defines this work (not the searched quant config): compared when a study resumes."""
        m = self.model_spec
        out = {"model.name": m.name, "model.kwargs": m.kwargs, "model.pretrained": m.pretrained,
               "model.use_ema": m.use_ema, "model.checkpoint_sha256": self.checkpoint_sha,
               "data.fingerprint": self.data.fingerprint, "data.n_calib": self.data.meta.get("n_calib"),
               "data.n_eval": self.data.meta.get("n_eval"), "calib_max_values": self.calib_max_values}
        if m.checkpoint_prefix:  # other keys of the same file are other weights (only when set: older studies match)
            out["model.checkpoint_prefix"] = m.checkpoint_prefix
        return out

    def datasets(self) -> dict[str, dict[str, str]]:
        """The calibration and evaluation sets by context: name, content digest, source and size (MLflow inputs)."""
        meta = self.data.meta
        source = meta.get("root") or meta.get("calib_root") or f"scikit-learn digits (seed {meta.get('seed')})"
        return {split: {"name": f"{self.data.name}:{split}", "digest": str(meta.get(f"{split}_fingerprint") or ""),
                        "source": str(meta.get(f"{split}_root") or source), "n": str(meta.get(f"n_{split}"))}
                for split in ("calib", "eval")}

    def provenance(self) -> dict[str, str]:
        """Tags recorded on every run: model, checkpoint, data, device and vitq's version."""
        m, meta = self.model_spec, self.data.meta
        out = {"model.name": m.name, "model.kwargs": m.kwargs, "model.pretrained": str(m.pretrained),
               "model.checkpoint": str(Path(m.checkpoint).expanduser().resolve()) if m.checkpoint else "",
               "model.checkpoint_sha256": self.checkpoint_sha or "", "data.name": self.data_spec.name,
               "data.fingerprint": self.data.fingerprint, "data.n_calib": str(meta.get("n_calib")),
               "data.n_eval": str(meta.get("n_eval")), "device": str(self.device), "vitq.version": vitq.__version__,
               "vitq.git_commit": git_commit()}
        if self._conversion:  # timm converted the weights (and what it interpolated)
            out["model.weights_conversion"] = self._conversion
        for k in ("root", "calib_root", "eval_root"):
            if meta.get(k):
                out[f"data.{k}"] = meta[k]
        if meta.get("transform"):
            out["data.transform"] = json.dumps(meta["transform"], sort_keys=True)
        if meta.get("label_space"):  # where the labels' output indices come from (folder i = output i otherwise)
            out["data.label_space"] = meta["label_space"]
        if json.loads(self.data_spec.class_map) is not None:
            out["data.class_map"] = self.data_spec.class_map
        if self.data_spec.class_order is not None:
            out["data.class_order"] = self.data_spec.class_order
        return out


