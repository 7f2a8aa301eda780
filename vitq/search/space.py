"""Search definitions (``sweeps/*.yaml``): parameters over dotted config keys, objectives, sampler, budget.

A parameter key may use ``*`` for a section or a point (``layers.*.observer_type``,
``*.*.percentile_alpha``): one sampled value is applied to every matching key.

The official ``hydra-optuna-sweeper``'s format is read as well: ``params`` values in Hydra's sweep syntax
(``choice(4, 8)``, ``interval(0.9, 0.9999)``, ``range(2, 8)``, ``tag(log, interval(1e-4, 1))``; a plain value is
fixed for every trial), ``direction``, ``sampler: {_target_: optuna.samplers.TPESampler, seed: 0}``,
``custom_search_space``, ``n_jobs`` and ``max_failure_rate``, and the same sweep syntax on the command line.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field, replace
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
    split_block,
)

__all__ = ["SWEEPS_DIR", "Param", "SearchSpec", "expand_key", "load_search", "param_from_override",
           "search_mapping", "spec_from_mapping", "split_sweep_arguments"]

SAMPLER_CLASSES = {"tpe": "TPESampler", "nsgaii": "NSGAIISampler", "nsgaiii": "NSGAIIISampler", "gp": "GPSampler",
                   "random": "RandomSampler", "qmc": "QMCSampler", "cmaes": "CmaEsSampler",
                   "bruteforce": "BruteForceSampler"}
SAMPLERS = tuple(SAMPLER_CLASSES)
SAMPLER_TARGETS = {f"optuna.samplers.{c}": n for n, c in SAMPLER_CLASSES.items()}
TASK_RETURN = ("top1", "weight_bytes")  # what a trial returns, in order: the metrics ``direction`` applies to
SEARCH_KEYS = ("study_name", "sampler", "seed", "n_trials", "objectives", "constraint", "baselines", "params",
               "storage", "direction", "custom_search_space", "n_jobs", "max_failure_rate", "per_block")
METRICS = ("top1", "top5", "loss", "agreement", "top1_drop", "weight_bytes", "compression", "bops",
           "mean_weight_bits", "mean_act_bits")


def expand_key(key: str) -> list[str]:
    """Concrete dotted keys a (possibly wildcard) parameter key addresses (``blocks.N.`` in front kept)."""
    block, rest = split_block(key)
    prefix = "" if block is None else f"blocks.{block}."
    parts = rest.split(".")
    if "*" not in rest or len(parts) < 3 or parts[0] not in (*SECTIONS, "*"):
        return [key]
    out = []
    for sec, points in SECTIONS.items():
        for p in points:
            if fnmatch.fnmatchcase(sec, parts[0]) and fnmatch.fnmatchcase(p, parts[1]):
                out.append(prefix + ".".join([sec, p, *parts[2:]]))
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

    def check(self, key: str, where: str = "") -> Param:
        """Itself; ConfigError naming ``key`` where Optuna cannot draw from it (it failed after the study opened, or a
        step of 0 ran as 1): no choices, ends that are not numbers or in the wrong order, a step <= 0, a log scale
        with a step or reaching 0."""
        if self.choices is not None:
            if not self.choices:
                raise ConfigError(key, f"no choices to draw from{where}")
            return self
        for end in (self.low, self.high, *(() if self.step is None else (self.step,))):
            if not isinstance(end, int | float) or isinstance(end, bool) or not math.isfinite(end):
                raise ConfigError(key, f"low, high and step must be finite numbers, got {end!r}{where}")
        if self.low > self.high:
            raise ConfigError(key, f"low {self.low} is above high {self.high}{where}")
        if self.step is not None and self.step <= 0:
            raise ConfigError(key, f"step must be > 0, got {self.step}{where}")
        if self.log and (self.step is not None or self.low <= 0):
            raise ConfigError(key, f"a log scale needs low > 0 and no step, got low {self.low}, step "
                                   f"{self.step}{where}")
        return self

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
    sampler_kwargs: dict[str, Any] | None = None  # a ``_target_`` sampler's arguments (None: vitq's defaults)
    n_jobs: int | None = None
    max_failure_rate: float | None = None
    custom_search_space: str | None = None  # dotted path of ``fn(cfg, trial)`` that suggests more params
    fixed: dict[str, Any] = field(default_factory=dict)  # ``params`` entries without sweep syntax: every trial's
    per_block: bool = False  # one parameter per block for each section parameter (see bind_blocks)

    def bind_blocks(self, n_blocks: int) -> None:
        """Fit the parameters to a model of ``n_blocks`` blocks: a ``blocks.N`` parameter beyond its depth is a
        ConfigError; with ``per_block``, each parameter over a section (``layers.attn_qkv.bit_type.bits``,
        ``*.*.observer_type``) becomes one parameter per block (``blocks.0.layers.attn_qkv.bit_type.bits``, ...);
        ``default.*`` parameters stay shared."""
        for p in self.params:
            b = split_block(p.name)[0]
            if b is not None and b >= n_blocks:
                raise ConfigError(f"params.{p.name}", f"block {b} does not exist: the model has {n_blocks} blocks "
                                                      f"(0..{n_blocks - 1})")
        if not self.per_block:
            return
        out: list[Param] = []
        for p in self.params:
            head = p.name.split(".")[0]
            if split_block(p.name)[0] is None and head in (*SECTIONS, "*"):
                out += [replace(p, name=f"blocks.{b}.{p.name}") for b in range(n_blocks)]
            else:
                out.append(p)
        self.params = out
        self.per_block = False  # bound: binding again changes nothing

    def make_sampler(self, seed: int | None = None) -> optuna.samplers.BaseSampler:
        seed = self.seed if seed is None else seed
        cons = self.constraints_func if self.constraint else None
        if self.sampler_kwargs is not None:  # ``_target_``: the class with exactly the given arguments
            import inspect

            cls = getattr(optuna.samplers, SAMPLER_CLASSES[self.sampler])
            kwargs = dict(self.sampler_kwargs)
            accepted = inspect.signature(cls).parameters
            if seed is not None and "seed" in accepted:
                kwargs["seed"] = seed
            if cons is not None:
                if "constraints_func" not in accepted:
                    raise ConfigError("sampler._target_", f"{cls.__name__} takes no constraints_func; the search's "
                                                          "constraint needs tpe, nsgaii, nsgaiii or gp")
                kwargs["constraints_func"] = cons
            return cls(**kwargs)
        if self.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, constraints_func=cons, multivariate=True)
        if self.sampler == "nsgaii":
            return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=cons)
        if self.sampler == "gp":
            return optuna.samplers.GPSampler(seed=seed, constraints_func=cons)
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.sampler == "qmc":
            return optuna.samplers.QMCSampler(seed=seed)
        return getattr(optuna.samplers, SAMPLER_CLASSES[self.sampler])(seed=seed)

    def check(self, where: str = "") -> None:
        """ConfigError where the sampler cannot run this search: CMA-ES with several objectives, brute force over a
        continuous parameter."""
        if self.sampler == "cmaes" and len(self.objectives) > 1:
            n = len(self.objectives)
            raise ConfigError("sampler", f"cmaes optimizes one objective; this search has {n} "
                                         f"({', '.join(self.objectives)}): use tpe, nsgaii, nsgaiii, gp, random or "
                                         f"qmc, or direction: maximize (top1 only){where}")
        if self.sampler == "bruteforce":
            for p in self.params:
                if p.choices is None and p.type != "int" and p.step is None:
                    raise ConfigError(f"params.{p.name}", f"bruteforce enumerates discrete spaces: give this "
                                                          f"interval a step or choices{where}")

    def param_for(self, key: str) -> Param | None:
        """The parameter that sets the concrete dotted ``key`` (a ``blocks.N`` key: its block's parameter, else the
        every-block one), or None."""
        block, every = split_block(key)
        for k in (key,) if block is None else (key, every):
            for p in self.params:
                if k in expand_key(p.name):
                    return p
        return None

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
        blocks = sorted(set(cfg.blocks) | set(base.blocks) | {b for p in self.params
                                                              if (b := split_block(p.name)[0]) is not None})
        flat, flat_base = flat_resolved(cfg, blocks), flat_resolved(base, blocks)
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
        for k, v in flat.items():
            b, every = split_block(k)
            if k in covered or k.startswith("default."):  # points carry their resolved values: default is not needed
                continue
            if b is None:
                if flat_base[k] != v:
                    params[k] = v
                continue
            # flat[every]: what the block gets from the every-block keys (cfg's value)
            if v != flat[every] or (b in base.blocks and flat_base[k] != v):
                params[k] = v
        return params


def flat_resolved(cfg: LayerQuantConfig, blocks: list[int] | tuple[int, ...] = ()) -> dict[str, Any]:
    """Every field of ``default`` and every resolved field of every point under its dotted key, for every block and,
    with ``blocks.N.`` in front, for each of ``blocks``."""
    def fields_of(prefix: str, qc: Any) -> dict[str, Any]:  # ``bit_type`` flattened, its derived name left out
        out: dict[str, Any] = {}
        for f, v in qc.to_dict().items():
            if isinstance(v, dict):
                out.update({f"{prefix}{f}.{bk}": bv for bk, bv in v.items() if bk != "name"})
            else:
                out[f"{prefix}{f}"] = v
        return out

    out = fields_of("default.", cfg.default)
    for block in (None, *blocks):
        prefix = "" if block is None else f"blocks.{block}."
        for k in POINTS:
            out.update(fields_of(f"{prefix}{SECTION_OF[k]}.{k}.", cfg.resolve(k, block)))
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


def search_mapping(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """The mapping of ``sweeps/<name>.yaml`` (or a path). A file in the official plugin's layout (``hydra:
    sweeper: ...`` with ``defaults`` that override ``hydra/sweeper`` and ``hydra/sweeper/sampler``) is unwrapped."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SWEEPS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        avail = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
        raise ConfigError("hydra.sweeper.search", f"search definition not found: {path} (available: {avail})")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError("hydra.sweeper.search", f"{path} must hold a mapping (params, objectives, ...)")
    if "hydra" in raw:
        sampler = None
        for entry in raw.get("defaults") or []:
            (k, v), = (entry.items() if isinstance(entry, dict) else [(entry, None)])
            if k == "override hydra/sweeper/sampler":
                sampler = v
            elif k != "override hydra/sweeper":
                raise ConfigError(f"defaults.{k}", f"a search file's defaults may only override hydra/sweeper and "
                                                   f"hydra/sweeper/sampler ({path})")
        extra = sorted(set(raw) - {"hydra", "defaults"})
        if extra:
            raise ConfigError(extra[0], f"a search file holds the sweeper only (hydra.sweeper); set task keys such as "
                                        f"{extra[0]} on the command line or in the config ({path})")
        sweeper = (raw["hydra"] or {}).get("sweeper") or {}
        if sampler is not None:
            node = sweeper.get("sampler") or {}
            if not isinstance(node, dict):
                raise ConfigError("hydra.sweeper.sampler", f"expected a mapping of sampler arguments ({path})")
            if sampler not in SAMPLERS:
                raise ConfigError("defaults.override hydra/sweeper/sampler",
                                  f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)} ({path})")
            sweeper = {**sweeper, "sampler": {"_target_": f"optuna.samplers.{SAMPLER_CLASSES[sampler]}", **node}}
        raw = sweeper
    return path, raw


def load_search(name_or_path: str) -> SearchSpec:
    """Load ``sweeps/<name>.yaml`` (or a path) and check it."""
    path, raw = search_mapping(name_or_path)
    spec = spec_from_mapping(raw, path.stem, f" in {path}")
    spec.check(f" in {path}")
    return spec


def spec_from_mapping(raw: dict[str, Any], name: str, where: str = "") -> SearchSpec:
    """A checked :class:`SearchSpec` from a search mapping (vitq's fields or the official plugin's)."""
    unknown = sorted(set(raw) - set(SEARCH_KEYS))
    if unknown:
        hint = "; search_space is deprecated: use params" if "search_space" in unknown else ""
        raise ConfigError(unknown[0], f"unknown search field{where}; valid: {', '.join(SEARCH_KEYS)}{hint}")
    params, fixed = [], {}
    for key, spec in (raw.get("params") or {}).items():
        p = param_from_value(str(key), spec, f"params.{key}", where)
        if isinstance(p, Param):
            params.append(p)
        else:
            fixed[str(key)] = p
    objectives = _objectives(raw, where)
    sampler, kwargs, seed = _sampler(raw.get("sampler"), raw.get("seed", 0), where)
    rate = raw.get("max_failure_rate")
    if rate is not None and not (isinstance(rate, int | float) and 0 <= rate <= 1):
        raise ConfigError("max_failure_rate", f"must be a number in [0, 1], got {rate!r}{where}")
    return SearchSpec(name=name, params=params, objectives=objectives, sampler=sampler, seed=seed,
                      n_trials=int(raw.get("n_trials", 20)), study_name=raw.get("study_name"),
                      storage=raw.get("storage"), constraint=raw.get("constraint"),
                      baselines=list(raw.get("baselines") or []), sampler_kwargs=kwargs,
                      n_jobs=raw.get("n_jobs"), max_failure_rate=rate,
                      custom_search_space=raw.get("custom_search_space"), fixed=fixed,
                      per_block=_flag(raw.get("per_block", False), "per_block", where))


def _flag(v: Any, key: str, where: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(key, f"must be true or false, got {v!r}{where}")
    return v


def _objectives(raw: dict[str, Any], where: str) -> dict[str, str]:
    """``objectives: {metric: sense}``, or ``direction`` (one sense or a list) over ``objectives: [metric, ...]``,
    by default over what a trial returns: top1, then weight_bytes."""
    senses = ("maximize", "minimize")
    objectives = raw.get("objectives")
    if "direction" in raw:
        d = raw["direction"]
        dirs = [d] if isinstance(d, str) else list(d or [])
        if not dirs or any(str(x).lower() not in senses for x in dirs):
            raise ConfigError("direction", f"expected maximize|minimize or a list of them, got {d!r}{where}")
        if isinstance(objectives, dict):
            raise ConfigError("direction", f"give objectives as {{metric: sense}} or direction with objectives as a "
                                           f"list of metrics, not both{where}")
        metrics = list(objectives) if objectives is not None else list(TASK_RETURN[:len(dirs)])
        if len(metrics) != len(dirs):
            raise ConfigError("direction", f"{len(dirs)} directions for the metrics {metrics}{where}; a trial returns "
                                           f"{', '.join(TASK_RETURN)}: name others with objectives: [metric, ...]")
        objectives = dict(zip(metrics, [str(x).lower() for x in dirs], strict=True))
    objectives = objectives or {"top1": "maximize", "weight_bytes": "minimize"}
    if not isinstance(objectives, dict):
        raise ConfigError("objectives", f"expected {{metric: maximize|minimize}} (a list needs direction){where}")
    for k, v in objectives.items():
        if k not in METRICS or v not in senses:
            raise ConfigError(f"objectives.{k}", f"metric must be one of {METRICS} with maximize|minimize{where}")
    return dict(objectives)


def _sampler(node: Any, seed: Any, where: str) -> tuple[str, dict[str, Any] | None, int | None]:
    """(name, ``_target_`` arguments or None, seed) from ``sampler: tpe`` or ``sampler: {_target_: ..., ...}``."""
    if node is None:
        return "tpe", None, seed
    if isinstance(node, str):
        if node.lower() not in SAMPLERS:
            raise ConfigError("sampler", f"unknown sampler {node!r}; valid: {', '.join(SAMPLERS)}{where}")
        return node.lower(), None, seed
    if not isinstance(node, dict):
        raise ConfigError("sampler", f"expected a sampler name or {{_target_: optuna.samplers.X, ...}}{where}")
    kwargs = dict(node)
    target = kwargs.pop("_target_", "optuna.samplers.TPESampler")
    if target not in SAMPLER_TARGETS:
        raise ConfigError("sampler._target_", f"unknown sampler {target!r}; valid: {', '.join(SAMPLER_TARGETS)}{where}")
    seed = kwargs.pop("seed", seed)
    return SAMPLER_TARGETS[target], kwargs, seed


def param_from_value(name: str, spec: Any, key: str, where: str = "") -> Param | Any:
    """A search parameter from vitq's forms (a list of choices, ``{choices}``, ``{low, high, step, log, type}``)
    or from Hydra's sweep syntax in a string; a string without sweep syntax is a fixed value (returned as is)."""
    if isinstance(spec, str):
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException

        try:  # a placeholder key: vitq's keys may hold ``*``, which Hydra's key grammar does not
            override = OverridesParser.create().parse_override(f"x={spec}")
        except HydraException as e:
            raise ConfigError(key, f"cannot parse {spec!r}{where}: {str(e).splitlines()[0]}") from None
        return param_from_override(name, override, key)
    if isinstance(spec, list):
        spec = {"choices": list(spec)}
    if not isinstance(spec, dict):
        return spec
    unknown = set(spec) - {"choices", "low", "high", "step", "log", "type"}
    if unknown:
        raise ConfigError(key, f"unknown fields {sorted(unknown)}{where}; valid: choices, low, high, step, log, type")
    if "choices" not in spec and ("low" not in spec or "high" not in spec):
        raise ConfigError(key, f"needs 'choices' or 'low'/'high'{where}")
    return Param(name=name, **spec).check(key, where)


def param_from_override(name: str, override: Any, key: str) -> Param | Any:
    """The official plugin's reading of a Hydra override: ``choice`` and a shuffled ``range`` are categorical,
    ``range(a, b[, step])`` is uniform over a..b (b included) on the step, ``interval(a, b)`` uniform (``tag(log,
    ...)``: log-uniform; integers if both ends are), anything else a fixed value."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    if not override.is_sweep_override():
        return override.value()
    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return Param(name=name, choices=list(override.sweep_iterator())).check(key)
    if isinstance(value, RangeSweep):
        ints = all(isinstance(v, int) for v in (value.start, value.stop, value.step))
        return Param(name=name, low=value.start, high=value.stop, step=value.step,
                     type="int" if ints else "float").check(key)
    if isinstance(value, IntervalSweep):
        ints = isinstance(value.start, int) and isinstance(value.end, int)
        return Param(name=name, low=value.start, high=value.end, log="log" in value.tags,
                     type="int" if ints else "float").check(key)
    raise ConfigError(key, f"sweep {override.input_line!r} is not supported: use choice, range or interval")


def split_sweep_arguments(arguments: list[str]) -> tuple[list[Param], list[str]]:
    """Command-line overrides → (search parameters from those in sweep syntax, the other overrides as given)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params, fixed = [], []
    for line, override in zip(arguments, OverridesParser.create().parse_overrides(arguments), strict=True):
        if override.is_sweep_override():
            if override.is_delete() or override.is_add() or override.is_force_add():
                raise ConfigError(override.get_key_element(), "a sweep cannot add or delete a key")
            key = override.get_key_element()
            params.append(param_from_override(key, override, key))
        else:
            fixed.append(line)
    return params, fixed
