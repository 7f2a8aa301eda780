"""Hydra structured-config schema: every quant key typed, so a misspelled key fails at composition."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from vitq.paths import cache_root
from vitq.quant.config import SECTIONS, unknown_choice


@dataclass
class BitTypeSchema:
    bits: int | None = None
    signed: bool | None = None
    name: str | None = None


@dataclass
class EntrySchema:
    """A (partial) QuantConfig: unset fields are None and inherit from ``default``."""

    calibration_mode: str | None = None
    bit_type: BitTypeSchema = field(default_factory=BitTypeSchema)
    observer_type: str | None = None
    quantization_method: str | None = None
    percentile_alpha: float | None = None
    percentile_sigma: float | None = None
    kv_bins: int | None = None
    enabled: bool | None = None


def _section(name: str) -> type:
    return make_dataclass(f"{name.title().replace('_', '')}Schema",
                          [(k, EntrySchema, field(default_factory=EntrySchema)) for k in SECTIONS[name]])


LayersSchema, AttnLayerSchema, ResidualLayerSchema = (_section(s) for s in SECTIONS)


@dataclass
class ModelSchema:
    name: str = "digits_reference"
    pretrained: bool = False
    checkpoint: str | None = None
    kwargs: Any = None  # a mapping passed to timm.create_model (null = none)
    use_ema: bool = True  # read state_dict_ema / model_ema from a timm checkpoint when it has one
    resample_weights: bool = False  # let timm interpolate the checkpoint's position/patch embeddings to the model
    checkpoint_prefix: str | None = None  # take the checkpoint's keys under this prefix (net. of a Lightning module)


@dataclass
class DataSchema:
    name: str = "digits"
    root: str | None = None  # one folder, split into calibration and evaluation
    calib_root: str | None = None  # or two folders (same class names)
    eval_root: str | None = None
    seed: int = 0
    n_train: int | None = None  # digits: null = the reference's own split
    n_calib: int | None = 256
    n_eval: int | None = None
    input_size: Any = None  # timm eval transform overrides (null = timm's value for the model)
    mean: Any = None
    std: Any = None
    crop_pct: float | None = None
    interpolation: str | None = None
    crop_mode: str | None = None
    class_map: Any = None  # a class-map file (names in output order) or {name: output}; null: folder i = output i
    class_order: str | None = None  # timm | torchvision: the script that labelled the folders for training
    num_workers: int = 4  # threads for the first decode
    cache: bool = True  # decoded images cached under $VITQ_CACHE/images


@dataclass
class TrackingSchema:
    uri: str | None = None
    enabled: bool = True


@dataclass
class VitqConfig:
    default: EntrySchema = field(default_factory=EntrySchema)
    layers: LayersSchema = field(default_factory=LayersSchema)  # type: ignore[valid-type]
    attn_layer: AttnLayerSchema = field(default_factory=AttnLayerSchema)  # type: ignore[valid-type]
    residual_layer: ResidualLayerSchema = field(default_factory=ResidualLayerSchema)  # type: ignore[valid-type]
    blocks: dict[str, Any] = field(default_factory=dict)
    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataSchema = field(default_factory=DataSchema)
    tracking: TrackingSchema = field(default_factory=TrackingSchema)
    device: str = "auto"
    study_name: str = "vitq"
    trial_number: int | None = None
    baseline: str | None = None  # set by the sweeper on an enqueued baseline (logged as tag vitq.baseline)
    trial_params: str | None = None  # set by the sweeper: the trial's searched params (JSON), its MLflow params
    eval_batch_size: int = 512
    calib_batch_size: int = 128
    calib_max_values: int | None = 262144  # values kept per point and calibration batch (null: all, exact)
    stats_dir: str | None = None
    export_dir: str | None = None


def check_known_keys(cfg: DictConfig) -> None:
    """ConfigError naming a key the schema does not have: one appended with Hydra's ``+`` (``+data.n_evl=100``)
    would be composed and then ignored. Free-form values (``model.kwargs``, ``data.class_map``, ``blocks``) take
    any key; ``blocks`` are checked by the quant config."""
    _check_keys(cfg, VitqConfig, "")


@functools.cache
def _fields(schema: type) -> tuple[dict[str, Any], list[str]]:
    """A schema's field types and names in order (read once: every trial checks its config)."""
    return typing.get_type_hints(schema), [f.name for f in dataclasses.fields(schema)]


def _check_keys(node: DictConfig, schema: type, path: str) -> None:
    hints, names = _fields(schema)
    for key in node:
        if not path and key == "hydra":  # (a callback's config carries Hydra's own node)
            continue
        if key not in hints:
            raise unknown_choice(f"{path}{key}", key, names, f"{path.rstrip('.') or 'top-level'} key")
        if dataclasses.is_dataclass(hints[key]) and isinstance(child := node.get(key), DictConfig):
            _check_keys(child, hints[key], f"{path}{key}.")


def register() -> None:
    """The schema node, and ``${vitq.cache:SUB}``: ``$VITQ_CACHE/SUB``, or the per-user temp folder ``cache_root``
    falls back to (with its warning) when the cache cannot be written: ``stats_dir``'s default."""
    ConfigStore.instance().store(name="vitq_schema", node=VitqConfig)
    OmegaConf.register_new_resolver("vitq.cache", lambda sub="": str(cache_root(sub)), replace=True)
