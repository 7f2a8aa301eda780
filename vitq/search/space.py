"""Search definitions (``sweeps/*.yaml``): parameters over dotted config keys, objectives, sampler, budget.

A parameter key may use ``*`` for a section or a point (``layers.*.observer_type``,
``*.*.percentile_alpha``): one sampled value is applied to every matching key.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from vitq.quant.config import SECTIONS, WEIGHT_POINTS, ConfigError

__all__ = ["SWEEPS_DIR", "SearchSpec", "expand_key", "load_search"]

SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"
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

    def baseline_params(self) -> list[dict[str, Any]]:
        """Baselines as Optuna params: ``wXaY`` sets weight bits X and activation bits Y."""
        out = []
        for b in self.baselines:
            if isinstance(b, dict):
                out.append(dict(b))
                continue
            s = str(b).lower()
            if not (s.startswith("w") and "a" in s):
                raise ConfigError(f"search.baselines.{b}", "expected 'wXaY' (e.g. w8a8) or a mapping of params")
            wb, ab = (int(v) for v in s[1:].split("a"))
            params: dict[str, Any] = {}
            for p in self.params:
                if not p.name.endswith("bit_type.bits"):
                    continue
                keys = expand_key(p.name)
                is_w = all(k.split(".")[1] in WEIGHT_POINTS for k in keys)
                want = wb if is_w else ab
                params[p.name] = _nearest(p, want)
            out.append(params)
        return out


def _nearest(p: Param, want: int) -> Any:
    if p.choices is not None:
        return min(p.choices, key=lambda c: abs(int(c) - want))
    return int(min(max(want, p.low), p.high))


def load_search(name_or_path: str) -> SearchSpec:
    """Load ``sweeps/<name>.yaml`` (or a path) and check it."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SWEEPS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        avail = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
        raise ConfigError("hydra.sweeper.search", f"search definition not found: {path} (available: {avail})")
    raw = yaml.safe_load(path.read_text()) or {}
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
