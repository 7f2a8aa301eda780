"""Search definitions (``sweeps/*.yaml``): parameters over dotted config keys, objectives, sampler, budget.

A parameter key may use ``*`` for a section or a point (``layers.*.observer_type``,
``*.*.percentile_alpha``): one sampled value is applied to every matching key.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from vitq.paths import PRESETS_DIR, SWEEPS_DIR
from vitq.quant.config import (
    POINTS,
    SECTION_OF,
    SECTIONS,
    WEIGHT_POINTS,
    ConfigError,
    LayerQuantConfig,
    load_config_from_yaml,
    read_yaml,
)

__all__ = ["SWEEPS_DIR", "SearchSpec", "expand_key", "load_search"]

SAMPLERS = ("tpe", "nsgaii", "gp", "random", "qmc")
METRICS = ("top1", "top5", "loss", "agreement", "top1_drop", "weight_bytes", "compression", "bops",
           "mean_weight_bits", "mean_act_bits")


def expand_key(key: str) -> list[str]:
    """Concrete dotted keys a (possibly wildcard) parameter key addresses."""
    parts = key.split(".")
    if "*" not in key or len(parts) < 3 or parts[0] not in (*SECTIONS, "*"):
        return [key]
    out = []
    for sec, points in SECTIONS.items():
        for p in points:
            if fnmatch.fnmatchcase(sec, parts[0]) and fnmatch.fnmatchcase(p, parts[1]):
                out.append(".".join([sec, p, *parts[2:]]))
    return out


@dataclass
class Param:
    name: str
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    type: str = "float"

    def accepts(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, int | float) and not isinstance(value, bool) and self.low <= value <= self.high

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)


@dataclass
class SearchSpec:
    name: str
    params: list[Param]
    objectives: dict[str, str] = field(default_factory=lambda: {"top1": "maximize", "weight_bytes": "minimize"})
    sampler: str = "tpe"
    seed: int | None = 0
    n_trials: int = 20
    study_name: str | None = None
    storage: str | None = None
    constraint: dict[str, float] | None = None  # {metric: weight_bytes, max: 150000}
    baselines: list[Any] = field(default_factory=list)  # "w8a8" style names, preset names, or override dicts

    def make_sampler(self, seed: int | None = None) -> optuna.samplers.BaseSampler:
        seed = self.seed if seed is None else seed
        cons = self.constraints_func if self.constraint else None
        if self.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, constraints_func=cons, multivariate=True)
        if self.sampler == "nsgaii":
            return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=cons)
        if self.sampler == "gp":
            return optuna.samplers.GPSampler(seed=seed, constraints_func=cons)
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.QMCSampler(seed=seed)

    @staticmethod
    def constraints_func(trial: optuna.trial.FrozenTrial) -> list[float]:
        return [float(trial.user_attrs.get("constraint_violation", 0.0))]

    def violation(self, metrics: dict[str, float]) -> float:
        if not self.constraint:
            return 0.0
        return float(metrics[self.constraint["metric"]]) - float(self.constraint["max"])

    def suggest_overrides(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample every parameter of ``trial`` and expand wildcards: concrete dotted key → value."""
        out: dict[str, Any] = {}
        for p in self.params:
            out.update(dict.fromkeys(expand_key(p.name), p.suggest(trial)))
        return out

    def baseline_params(self, base: LayerQuantConfig) -> list[dict[str, Any]]:
        """Each baseline as a whole config, to enqueue: every searched parameter pinned to the baseline's value,
        every other field where the baseline differs from ``base`` as a dotted override, and ``baseline: LABEL``.

        A baseline is ``wXaY`` (``base`` with every weight point at X bits and every activation point at Y), a preset
        ``preset:NAME`` from ``conf/quant/`` (that file as it is), or a mapping of params (enqueued as given). A
        searched parameter whose keys take different values in the baseline, or a value outside the space, is a
        ConfigError: nothing is rounded to the nearest choice.
        """
        out = []
        for b in self.baselines:
            if isinstance(b, dict):
                out.append(dict(b))
                continue
            label, cfg = _baseline_config(str(b), base)
            out.append({**self.pinned_params(cfg, base, f"search.baselines.{b}"), "baseline": label})
        return out

    def pinned_params(self, cfg: LayerQuantConfig, base: LayerQuantConfig, where: str) -> dict[str, Any]:
        """Params that make a trial run exactly ``cfg`` on top of ``base``: every searched parameter pinned to
        ``cfg``'s value, and every other field where ``cfg`` differs from ``base`` as a dotted override."""
        flat, flat_base = flat_resolved(cfg), flat_resolved(base)
        params: dict[str, Any] = {}
        covered: set[str] = set()
        for p in self.params:
            keys = expand_key(p.name)
            vals = {flat[k] for k in keys}
            if len(vals) != 1:
                raise ConfigError(where, f"{p.name} covers keys whose values differ in this config "
                                         f"({sorted(map(str, vals))}); split the parameter so it can be pinned")
            v = vals.pop()
            if not p.accepts(v):
                raise ConfigError(where, f"{p.name}={v} lies outside the search space")
            params[p.name] = v
            covered.update(keys)
        params.update({k: v for k, v in flat.items() if k not in covered and flat_base.get(k) != v})
        return params


def flat_resolved(cfg: LayerQuantConfig) -> dict[str, Any]:
    """Every resolved field of every point (block-independent part) under its dotted key."""
    out: dict[str, Any] = {}
    for k in POINTS:
        for f, v in cfg.resolve(k).to_dict().items():
            if isinstance(v, dict):
                out.update({f"{SECTION_OF[k]}.{k}.{f}.{bk}": bv for bk, bv in v.items() if bk != "name"})
            else:
                out[f"{SECTION_OF[k]}.{k}.{f}"] = v
    return out


def _baseline_config(name: str, base: LayerQuantConfig) -> tuple[str, LayerQuantConfig]:
    """``wXaY`` → ``base`` at those widths (label ``WXAY``); ``NAME`` or ``preset:NAME`` → ``conf/quant/NAME.yaml``."""
    m = re.fullmatch(r"w(\d+)a(\d+)", name.lower())
    if m and not name.startswith("preset:"):
        wb, ab = int(m.group(1)), int(m.group(2))
        over = {f"{SECTION_OF[k]}.{k}.bit_type.bits": wb if k in WEIGHT_POINTS else ab for k in POINTS}
        return f"W{wb}A{ab}", base.with_overrides(over)
    preset = PRESETS_DIR / f"{name.removeprefix('preset:')}.yaml"
    if not preset.is_file():
        avail = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"search.baselines.{name}", f"expected 'wXaY' (e.g. w8a8), a preset ({avail}) or a mapping")
    return preset.stem, load_config_from_yaml(preset)


def load_search(name_or_path: str) -> SearchSpec:
    """Load ``sweeps/<name>.yaml`` (or a path) and check it."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SWEEPS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        avail = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
        raise ConfigError("hydra.sweeper.search", f"search definition not found: {path} (available: {avail})")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError("hydra.sweeper.search", f"{path} must hold a mapping (params, objectives, ...)")
    params = []
    for name, spec in (raw.get("params") or {}).items():
        spec = spec if isinstance(spec, dict) else {"choices": list(spec)}
        unknown = set(spec) - {"choices", "low", "high", "step", "log", "type"}
        if unknown:
            raise ConfigError(f"params.{name}", f"unknown fields {sorted(unknown)} in {path}")
        if "choices" not in spec and ("low" not in spec or "high" not in spec):
            raise ConfigError(f"params.{name}", f"needs 'choices' or 'low'/'high' in {path}")
        params.append(Param(name=name, **spec))
    objectives = raw.get("objectives") or {"top1": "maximize", "weight_bytes": "minimize"}
    for k, v in objectives.items():
        if k not in METRICS or v not in ("maximize", "minimize"):
            raise ConfigError(f"objectives.{k}", f"metric must be one of {METRICS} with maximize|minimize in {path}")
    sampler = str(raw.get("sampler", "tpe")).lower()
    if sampler not in SAMPLERS:
        raise ConfigError("sampler", f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    return SearchSpec(name=path.stem, params=params, objectives=dict(objectives), sampler=sampler,
                      seed=raw.get("seed", 0), n_trials=int(raw.get("n_trials", 20)), study_name=raw.get("study_name"),
                      storage=raw.get("storage"), constraint=raw.get("constraint"),
                      baselines=list(raw.get("baselines") or []))
