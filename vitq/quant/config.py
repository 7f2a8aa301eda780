"""The seed's per-layer quantization config: dataclasses, merge, validation and YAML round trip.

A config file has four sections (``default``, ``layers``, ``attn_layer``, ``residual_layer``) plus
vitq's optional ``blocks`` level. A layer entry overrides ``default`` field by field (nested
``bit_type`` too); a ``blocks.N`` entry overrides the layer entry for block N only.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from vitq.quant.points import POINT_TABLE

__all__ = [
    "ACTIVATION_POINTS", "BitTypeConfig", "CALIBRATION_MODES", "ConfigError", "LayerQuantConfig",
    "METHODS", "OBSERVERS", "POINTS", "QuantConfig", "SECTIONS", "WEIGHT_POINTS", "load_config_from_yaml",
    "split_block", "unknown_choice",
]

SECTIONS: dict[str, tuple[str, ...]] = {
    s: tuple(p.name for p in POINT_TABLE if p.section == s) for s in dict.fromkeys(p.section for p in POINT_TABLE)}
POINTS: tuple[str, ...] = tuple(k for keys in SECTIONS.values() for k in keys)
SECTION_OF: dict[str, str] = {p.name: p.section for p in POINT_TABLE}
WEIGHT_POINTS: tuple[str, ...] = tuple(p.name for p in POINT_TABLE if p.kind == "weight")
ACTIVATION_POINTS: tuple[str, ...] = tuple(k for k in POINTS if k not in WEIGHT_POINTS)
OBSERVERS: tuple[str, ...] = ("MinmaxObserver", "PercentileObserver", "OmseObserver", "KLObserver")
METHODS: tuple[str, ...] = ("Uniform", "Log2")
CALIBRATION_MODES: tuple[str, ...] = ("layer_wise", "channel_wise", "ptf")
LOG2_POINTS: tuple[str, ...] = ("intSoft",)
PTF_POINTS: tuple[str, ...] = ("residual1", "residual2")  # the tensors that feed a LayerNorm (norm2, next norm1)
_BLOCK_PREFIX = re.compile(r"blocks\.(\d+)\.")


def split_block(key: str) -> tuple[int | None, str]:
    """A dotted key of one block, ``blocks.3.layers.attn_qkv...``, as (3, ``layers.attn_qkv...``); any other key as
    (None, key)."""
    m = _BLOCK_PREFIX.match(key)
    return (int(m.group(1)), key[m.end():]) if m else (None, key)


class ConfigError(ValueError):
    """A bad quantization config; ``path`` is the dotted key that is wrong."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.detail = message
        super().__init__(f"{path}: {message}" if path else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` put in front of its path."""
        return ConfigError(".".join(p for p in (prefix, self.path) if p), self.detail)


def unknown_choice(path: str, name: object, choices: tuple[str, ...] | list[str], what: str) -> ConfigError:
    """ConfigError for a name not among ``choices``: the closest one, if any, and the valid ones."""
    hint = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    dym = f" Did you mean '{hint[0]}'?" if hint else ""
    return ConfigError(path, f"unknown {what} {name!r}.{dym} Valid: {', '.join(choices)}")


def _require_mapping(value: object, path: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
    return dict(value)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass(frozen=True)
class BitTypeConfig:
    """Integer grid of a quantizer. ``name`` is derived from bits/signed (``int8``, ``uint4``)."""

    bits: int = 8
    signed: bool = True
    name: str | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.bits):
            raise ConfigError("bits", f"must be an integer in 2..16, got {self.bits!r}")
        if not 2 <= self.bits <= 16:
            raise ConfigError("bits", f"must be in 2..16, got {self.bits}")
        if not isinstance(self.signed, bool):
            raise ConfigError("signed", f"must be true or false, got {self.signed!r}")
        derived = f"{'int' if self.signed else 'uint'}{self.bits}"
        if self.name is not None and self.name != derived:
            raise ConfigError("name", f"{self.name!r} contradicts bits={self.bits}, signed={self.signed} "
                                      f"(which give {derived!r}); drop the name or fix bits/signed")
        object.__setattr__(self, "name", derived)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @classmethod
    def from_dict(cls, data: object, path: str = "bit_type") -> BitTypeConfig:
        d = _require_mapping(data, path)
        allowed = [f.name for f in fields(cls)]
        for k in d:
            if k not in allowed:
                raise unknown_choice(f"{path}.{k}", k, allowed, "field")
        try:
            return cls(**d)
        except ConfigError as e:
            raise e.under(path) from None


@dataclass(frozen=True)
class QuantConfig:
    """Everything one quantization point needs; also the ``default`` section of a config file."""

    calibration_mode: str = "channel_wise"
    bit_type: BitTypeConfig = field(default_factory=BitTypeConfig)
    observer_type: str = "PercentileObserver"
    quantization_method: str = "Uniform"
    percentile_alpha: float = 0.95
    percentile_sigma: float = 0.01
    kv_bins: int = 2048
    enabled: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bit_type, Mapping):
            object.__setattr__(self, "bit_type", BitTypeConfig.from_dict(self.bit_type))
        if not isinstance(self.bit_type, BitTypeConfig):
            raise ConfigError("bit_type", f"expected a mapping with bits/signed, got {self.bit_type!r}")
        if self.calibration_mode not in CALIBRATION_MODES:
            raise unknown_choice("calibration_mode", self.calibration_mode, CALIBRATION_MODES, "calibration mode")
        if self.observer_type not in OBSERVERS:
            raise unknown_choice("observer_type", self.observer_type, OBSERVERS, "observer")
        if self.quantization_method not in METHODS:
            raise unknown_choice("quantization_method", self.quantization_method, METHODS, "quantization method")
        if self.quantization_method == "Log2" and self.bit_type.bits > 8:
            raise ConfigError("bit_type.bits", f"Log2 supports 2..8 bits, got {self.bit_type.bits}")
        a = self.percentile_alpha
        if not _is_number(a) or not 0.5 < a <= 1.0 or math.isnan(a):
            raise ConfigError("percentile_alpha", f"must be a number in (0.5, 1], got {a!r}")
        s = self.percentile_sigma
        if not _is_number(s) or not 0.0 < s <= 1.0 or math.isnan(s):
            raise ConfigError("percentile_sigma", f"must be a number in (0, 1], got {s!r}")
        if not _is_int(self.kv_bins) or not 16 <= self.kv_bins <= 1 << 16:
            raise ConfigError("kv_bins", f"must be an integer in 16..65536, got {self.kv_bins!r}")
        if self.calibration_mode == "ptf" and self.quantization_method != "Uniform":
            raise ConfigError("calibration_mode", "ptf (power-of-two factors) needs quantization_method Uniform")
        if not isinstance(self.enabled, bool):
            raise ConfigError("enabled", f"must be true or false, got {self.enabled!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, path: str = "default") -> QuantConfig:
        d = _require_mapping(data, path)
        allowed = [f.name for f in fields(cls)]
        for k in d:
            if k not in allowed:
                raise unknown_choice(f"{path}.{k}", k, allowed, "field")
        if "bit_type" in d:
            d["bit_type"] = BitTypeConfig.from_dict(d["bit_type"], f"{path}.bit_type")
        try:
            return cls(**d)
        except ConfigError as e:
            raise e.under(path) from None


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), dict(v))
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_entry(entry: object, path: str) -> dict:
    """Shape check of one layer entry (a partial QuantConfig); values are checked after the merge."""
    d = _require_mapping(entry, path)
    allowed = [f.name for f in fields(QuantConfig)]
    for k, v in d.items():
        if k not in allowed:
            raise unknown_choice(f"{path}.{k}", k, allowed, "field")
        if k == "bit_type":
            bt = _require_mapping(v, f"{path}.bit_type")
            bt_allowed = [f.name for f in fields(BitTypeConfig)]
            for bk in bt:
                if bk not in bt_allowed:
                    raise unknown_choice(f"{path}.bit_type.{bk}", bk, bt_allowed, "field")
            d[k] = bt
    return d


def _check_sections(raw: dict, path: str, allowed_sections: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for sec, entries in raw.items():
        spath = f"{path}.{sec}" if path else str(sec)
        if sec not in allowed_sections:
            raise unknown_choice(spath, sec, allowed_sections, "section")
        entries = _require_mapping(entries, spath)
        checked: dict[str, dict] = {}
        for key, entry in entries.items():
            if key not in SECTIONS[sec]:
                other = SECTION_OF.get(key)
                if other is not None:
                    raise ConfigError(f"{spath}.{key}", f"'{key}' belongs in section '{other}', not '{sec}'")
                raise unknown_choice(f"{spath}.{key}", key, SECTIONS[sec], f"{sec} key")
            checked[key] = _check_entry(entry, f"{spath}.{key}")
        out[sec] = checked
    return out


@dataclass(eq=False)
class LayerQuantConfig:
    """A whole config file: ``default`` plus partial per-point and per-block overrides.

    Read configs through :meth:`resolve`; equality compares the resolved configs of every point.
    """

    default: QuantConfig = field(default_factory=QuantConfig)
    layers: dict[str, dict] = field(default_factory=dict)
    attn_layer: dict[str, dict] = field(default_factory=dict)
    residual_layer: dict[str, dict] = field(default_factory=dict)
    blocks: dict[int, dict[str, dict[str, dict]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.default, Mapping):
            self.default = QuantConfig.from_dict(self.default, "default")
        sections = _check_sections(
            {"layers": self.layers, "attn_layer": self.attn_layer, "residual_layer": self.residual_layer}, "",
            tuple(SECTIONS))
        self.layers, self.attn_layer, self.residual_layer = (
            sections["layers"], sections["attn_layer"], sections["residual_layer"])
        blocks: dict[int, dict[str, dict[str, dict]]] = {}
        for b, secs in _require_mapping(self.blocks, "blocks").items():
            try:
                idx = int(b)
            except (TypeError, ValueError):
                raise ConfigError(f"blocks.{b}", "block index must be a non-negative integer") from None
            if idx < 0 or isinstance(b, bool):
                raise ConfigError(f"blocks.{b}", "block index must be a non-negative integer")
            blocks[idx] = _check_sections(_require_mapping(secs, f"blocks.{b}"), f"blocks.{idx}", tuple(SECTIONS))
        self.blocks = blocks
        self._cache: dict[tuple[str, int | None], QuantConfig] = {}
        for key in POINTS:  # validate every merged value now, so errors surface at load time
            self.resolve(key)
            for b in self.blocks:
                self.resolve(key, block=b)

    # ------------------------------------------------------------------ lookup
    def entry(self, key: str) -> dict:
        """The raw (partial) entry of ``key`` in its section."""
        return getattr(self, SECTION_OF[key]).get(key, {})

    def resolve(self, key: str, block: int | None = None) -> QuantConfig:
        """Fully merged, validated config of one point (block > layer > default)."""
        if key not in SECTION_OF:
            raise unknown_choice(key, key, POINTS, "quantization point")
        use_block = block if block in self.blocks else None
        ck = (key, use_block)
        if ck in self._cache:
            return self._cache[ck]
        sec = SECTION_OF[key]
        levels: list[tuple[str, dict]] = [(f"{sec}.{key}", self.entry(key))]
        if use_block is not None:
            levels.append((f"blocks.{use_block}.{sec}.{key}", self.blocks[use_block].get(sec, {}).get(key, {})))
        merged = self.default.to_dict()
        path = "default"
        for lpath, over in levels:
            if not over:
                continue
            path = lpath
            merged = _deep_merge(merged, over)
            bt = merged["bit_type"]
            given = over.get("bit_type", {}).get("name")
            bt["name"] = given  # a name is never inherited; one given here must match bits/signed
            try:
                BitTypeConfig.from_dict(bt, "bit_type")
            except ConfigError as e:
                raise e.under(lpath) from None
            bt["name"] = None
        try:
            cfg = QuantConfig.from_dict(merged, path)
        except ConfigError as e:
            raise e if e.path.startswith(path) else e.under(path) from None
        if cfg.quantization_method == "Log2" and key not in LOG2_POINTS:
            raise ConfigError(f"{path}.quantization_method",
                              f"Log2 is only for {', '.join(LOG2_POINTS)} (softmax output), not '{key}'")
        if cfg.calibration_mode == "ptf" and key not in PTF_POINTS:
            raise ConfigError(f"{path}.calibration_mode", f"ptf is only for the LayerNorm inputs "
                                                          f"({', '.join(PTF_POINTS)}), not '{key}'")
        self._cache[ck] = cfg
        return cfg

    def inherited_fields(self) -> set[str]:
        """Dotted fields of ``default`` (``observer_type``, ``bit_type.bits``) that at least one point inherits."""
        names = [f.name for f in fields(QuantConfig) if f.name != "bit_type"] + ["bit_type.bits", "bit_type.signed"]
        used: set[str] = set()
        for key in POINTS:
            entry = self.entry(key)
            for name in names:
                head, _, tail = name.partition(".")
                if head not in entry or (tail and tail not in (entry.get(head) or {})):
                    used.add(name)
        return used

    def check_default_reaches(self, fields_set: dict[str, str]) -> None:
        """ConfigError for a ``default`` field that was set (``{field: where}``) but that every point sets itself."""
        unused = sorted(set(fields_set) - self.inherited_fields())
        if unused:
            f = unused[0]
            raise ConfigError(fields_set[f], f"reaches no point: every point sets its own {f}, so default.{f} "
                                             f"changes nothing (set it per point, e.g. layers.attn_qkv.{f})")

    def resolved(self, block: int | None = None) -> dict[str, QuantConfig]:
        return {k: self.resolve(k, block) for k in POINTS}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerQuantConfig):
            return NotImplemented
        if set(self.blocks) != set(other.blocks) or self.default != other.default:
            return False
        return all(self.resolved(b) == other.resolved(b) for b in (None, *self.blocks))

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ construction
    @classmethod
    def uniform(cls, cfg: QuantConfig) -> LayerQuantConfig:
        """Every point uses ``cfg`` (the seed's third way); Log2 applies to ``intSoft`` only."""
        if cfg.quantization_method == "Log2":
            d = cfg.to_dict()
            d["quantization_method"] = "Uniform"
            return cls(default=QuantConfig.from_dict(d), attn_layer={"intSoft": {"quantization_method": "Log2"}})
        return cls(default=cfg)

    @classmethod
    def from_dict(cls, data: object, source: str = "") -> LayerQuantConfig:
        where = f" in {source}" if source else ""
        if not isinstance(data, Mapping):
            raise ConfigError("", f"a quant config{where} must be a mapping with sections "
                                  f"default/layers/attn_layer/residual_layer, got {type(data).__name__}")
        allowed = ("default", *SECTIONS, "blocks")
        for k in data:
            if k not in allowed:
                raise unknown_choice(str(k), k, allowed, "section")
        return cls(default=QuantConfig.from_dict(data.get("default"), "default"),
                   layers=_require_mapping(data.get("layers"), "layers"),
                   attn_layer=_require_mapping(data.get("attn_layer"), "attn_layer"),
                   residual_layer=_require_mapping(data.get("residual_layer"), "residual_layer"),
                   blocks=_require_mapping(data.get("blocks"), "blocks"))

    def to_dict(self) -> dict[str, Any]:
        """The seed format with every point written out in full (``bit_type.name`` included)."""
        out: dict[str, Any] = {"default": self.default.to_dict()}
        for sec, keys in SECTIONS.items():
            out[sec] = {k: self.resolve(k).to_dict() for k in keys}
        if self.blocks:  # string keys: Hydra refuses integer keys, so an export can be fed back as a preset
            out["blocks"] = {
                str(b): {sec: {k: self.resolve(k, b).to_dict() for k in entries} for sec, entries in secs.items()}
                for b, secs in self.blocks.items()}
        return out

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The seed format, headed ``# @package _global_`` so the file also works as a Hydra preset (conf/quant)."""
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml where PyYAML has it: ~10x faster
        text = "# @package _global_\n" + yaml.dump(self.to_dict(), Dumper=dumper, sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def with_overrides(self, overrides: Mapping[str, Any]) -> LayerQuantConfig:
        """A copy with dotted-key overrides applied (``layers.attn_qkv.bit_type.bits=4``)."""
        raw = self.to_dict()
        _strip_names(raw)
        if "blocks" in raw:
            raw["blocks"] = {str(b): v for b, v in raw["blocks"].items()}
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = raw
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return LayerQuantConfig.from_dict(raw)


def _strip_names(raw: dict) -> None:
    """Drop derived ``bit_type.name`` labels (they are re-derived on load)."""
    for v in raw.values():
        if isinstance(v, dict):
            if "bits" in v and "name" in v:
                v.pop("name")
            else:
                _strip_names(v)


YAML_MAX_BYTES = 1 << 20  # a config or search file larger than 1 MB is refused
YAML_MAX_ALIASES = 64


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and bounds alias references (no billion-laughs expansion)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > YAML_MAX_ALIASES:
                raise yaml.YAMLError(f"more than {YAML_MAX_ALIASES} alias references")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.YAMLError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's data: at most 1 MB, no duplicate keys, at most 64 aliases; problems are ConfigErrors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(p), f"file not found: {p}")
    if p.stat().st_size > YAML_MAX_BYTES:
        raise ConfigError(str(p), f"larger than {YAML_MAX_BYTES} bytes: not a config file")
    loader = _StrictLoader(p.read_text())
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(str(p), f"not valid YAML: {str(e).splitlines()[0][:200]}") from None
    finally:
        loader.dispose()


def load_config_from_yaml(path: str | Path) -> LayerQuantConfig:
    """Load and validate a seed-format YAML file; every problem is a :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(p), f"quant config file not found: {p}")
    data = read_yaml(p)
    try:
        return LayerQuantConfig.from_dict(data, source=str(p))
    except ConfigError as e:
        raise ConfigError(e.path, f"{e.detail} (in {p})") from None
