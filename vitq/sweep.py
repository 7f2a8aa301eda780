"""Hydra entry point: one trial of the composed config (``python -m vitq.sweep``); ``-m`` sweeps it.

A trial resolves and validates the quant sections, quantizes the (cached) FP model, derives ranges
from cached calibration statistics, evaluates, costs, logs a child run to MLflow and returns its
metrics (the objectives of vitq's Optuna sweeper).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vitq.faults import fault, maybe_kill, maybe_meet
from vitq.logs import progress_enabled, quiet_libraries
from vitq.paths import CONF_DIR as PATHS_CONF_DIR
from vitq.paths import FolderError, check_creatable, grid_failures_dir, output_folder
from vitq.quant.config import POINTS, SECTIONS, ConfigError, LayerQuantConfig, split_block, unknown_choice
from vitq.redact import fail, install_log_redaction, redact, redact_tree, say
from vitq.schema import check_known_keys, register

register()
log = logging.getLogger("vitq")

QUANT_SECTIONS = ("default", *SECTIONS, "blocks")
GRID_FAILURES_ENV = "VITQ_GRID_FAILURES"  # a Hydra grid's folder of failed-job lines (set for its jobs)


def _clean(node: Any) -> Any:
    """Drop unset (None) fields and derived ``bit_type.name`` labels from a composed section."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if v is None or (k == "name" and "bits" in node):
                continue
            v = _clean(v)
            if isinstance(v, dict) and not v:
                continue
            out[k] = v
        return out
    return node


def layer_config_from(cfg: DictConfig) -> LayerQuantConfig:
    """The composed quant sections as a validated :class:`LayerQuantConfig` (ConfigError on bad values)."""
    raw = {s: _clean(OmegaConf.to_container(cfg[s], resolve=True)) for s in QUANT_SECTIONS if s in cfg}
    return LayerQuantConfig.from_dict(raw)


def _nan_data(data):  # noqa: ANN001, ANN202
    import torch
    from torch.utils.data import TensorDataset

    from vitq.data import batches

    x, y = zip(*batches(data.eval, len(data.eval)), strict=True)
    meta = {**data.meta, "eval_fingerprint": f"{data.meta.get('eval_fingerprint')}+nan"}
    return type(data)(data.name + "+nan", data.calib, TensorDataset(torch.full_like(x[0], float("nan")), y[0]),
                      data.num_classes, data.train, meta)


LOG2_READS_NOT = ("observer_type", "calibration_mode", "bit_type.signed", "percentile_alpha", "percentile_sigma",
                  "kv_bins")  # a Log2 point's grid is fixed (2^-q for q in 0..2^bits-1): it reads bits alone


def check_fields_read(qcfg: LayerQuantConfig, overrides: list[str] | tuple[str, ...]) -> None:
    """ConfigError for a command-line override that no enabled point it reaches reads, so that the run would be the
    one without it: an observer's own field (``percentile_alpha``, ``percentile_sigma``, ``kv_bins``) where every
    point there uses another observer, and a range or sign field where every point there quantizes Log2."""
    from vitq.quant.observers import OBSERVER_REGISTRY

    readers = {f: sorted(o.name for o in OBSERVER_REGISTRY.values() if f in o.depends_on)
               for f in ("percentile_alpha", "percentile_sigma", "kv_bins")}
    for o in overrides:
        key, _, _ = o.lstrip("+~").partition("=")
        block, rest = split_block(key)
        parts = rest.split(".")
        if parts[0] not in (*SECTIONS, "default") or len(parts) < (2 if parts[0] == "default" else 3) or "*" in rest:
            continue  # (a group: layers=w4, default=omse; a whole point: layers.attn_qkv={...})
        point = None if parts[0] == "default" else parts[1]  # section.point.field, or default.field
        field = ".".join(parts[1 if point is None else 2:])
        if field not in LOG2_READS_NOT:
            continue
        configs = [qcfg.resolved(b) for b in ((block,) if block is not None else (None, *qcfg.blocks))]
        reached = [c[k] for c in configs for k in ((point,) if point else POINTS) if c[k].enabled]
        if not reached:
            raise ConfigError(key, f"changes nothing: {f'{point} is' if point else 'every point is'} disabled")
        where = f"{point} uses" if point else "the points it reaches use"
        used = {c.observer_type for c in reached if c.quantization_method != "Log2"}
        if not used:
            raise ConfigError(key, f"changes nothing: {where} Log2 quantization, which reads bit_type.bits alone (a "
                                   "fixed power-of-two grid)")
        if field in readers and not used & set(readers[field]):
            raise ConfigError(key, f"changes nothing: only {', '.join(readers[field])} reads {field}, and "
                                   f"{where} {', '.join(sorted(used))}")


def default_fields_set(overrides: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``default`` fields that command-line ``overrides`` set: ``default.X=...`` and the group ``default=NAME``."""
    out: dict[str, str] = {}
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key.startswith("default."):
            out[key.removeprefix("default.")] = key
        elif key == "default" and value and value != "null":
            group = Path(CONF_DIR) / "default" / f"{value}.yaml"
            raw = OmegaConf.to_container(OmegaConf.load(group)) if group.is_file() else {}
            for f, v in (raw or {}).items():
                for sub in (v if isinstance(v, dict) else {None: v}):
                    out[f if sub is None else f"{f}.{sub}"] = f"default={value}"
    return out


def session_of(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()):  # noqa: ANN201
    """The validated quant config and the built :class:`~vitq.session.Session` of ``cfg`` (errors name the key). The
    config is checked before torch and timm are imported: a bad value fails in about a second."""
    qcfg = layer_config_from(cfg)
    if cfg.get("trial_number") is None:  # (a trial of vitq's sweeper: its values cannot add keys, and the sweep's
        check_known_keys(cfg)             # base config was checked when the study opened)
    _check_outputs(cfg)
    if not overrides and HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
    qcfg.check_default_reaches(default_fields_set(overrides))
    if not _is_multirun():  # (a grid or a search may set a field for the values where another key makes it read)
        check_fields_read(qcfg, overrides)
    from vitq.models.vit import check_block_indices
    from vitq.session import Session

    session = Session.from_config(cfg).build()
    check_block_indices(qcfg, len(session.model.blocks))
    return qcfg, session


def _check_outputs(cfg: DictConfig) -> None:
    """ConfigError naming the key, before any trial: an empty study name, an export or statistics folder that
    cannot be written, an MLflow store given while tracking is off (nothing would be logged to it)."""
    if "study_name" in cfg and not str(cfg.study_name or "").strip():
        raise ConfigError("study_name", "must be a name (the MLflow experiment), got an empty one")
    tr = cfg.get("tracking")
    if tr is not None and not tr.get("enabled", True) and tr.get("uri"):
        raise ConfigError("tracking.uri", f"{redact(str(tr.uri))}: tracking is off (tracking=none or "
                                          "tracking.enabled=false), so nothing would be logged there; drop one of them")
    if cfg.get("export_dir"):
        try:
            output_folder(cfg.export_dir, "export_dir")
        except FolderError as e:
            raise ConfigError(e.key, e.detail) from None
    if cfg.get("stats_dir"):  # (each run calibrated afresh, with a warning, where the workers meant to share them)
        try:
            output_folder(cfg.stats_dir, "stats_dir")
        except FolderError as e:
            raise ConfigError(e.key, f"{e.detail} (or stats_dir=null: calibration statistics kept in memory only; "
                                     "its default lies under $VITQ_CACHE)") from None


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The composed vitq config for Hydra ``overrides`` (``model=timm model.name=... data=folder ...``), outside
    a Hydra run: what the sensitivity, compare and bench CLIs take. Bad overrides raise ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except Exception as e:  # noqa: BLE001 - Hydra/OmegaConf errors: one line naming the key
        err = config_error(e)
        if err is not None:
            raise err from None
        msg = str(e).strip().splitlines()
        raise ConfigError("overrides", f"{' '.join(overrides)}: {msg[0] if msg else type(e).__name__}") from None


def config_error(e: BaseException) -> ConfigError | None:
    """Hydra's or OmegaConf's error on composing the config as one ConfigError naming the key, or None for any
    other exception: a misspelled key (with the closest one), a value of the wrong type, an unknown option of a
    config group (with the options), an override Hydra cannot parse."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return unknown_choice(f"{group}={option}", option, list(e.options or ()), f"{group} option")
    if isinstance(e, OverrideParseException):
        return ConfigError(e.override, f"Hydra cannot parse this override: {e.message.splitlines()[0]}")
    cause = e.__cause__ if isinstance(e, ConfigCompositionException) else e
    if isinstance(cause, OmegaConfBaseException):
        key = str(getattr(cause, "full_key", "") or "")
        parent = getattr(cause, "parent_node", None)
        if isinstance(cause, ConfigKeyError | ConfigAttributeError) and isinstance(parent, DictConfig):
            where = key.rpartition(".")[0]
            if OmegaConf.get_type(parent) is dict:  # a free-form mapping (model.kwargs): Hydra's + adds a key
                hint = next((ln.strip() for ln in str(e).splitlines() if ln.startswith("To append")), "")
                return ConfigError(key, f"{where or 'the config'} has no key {cause.key!r}"
                                        f"{'; ' + hint[0].lower() + hint[1:] if hint else ''}")
            return unknown_choice(key, cause.key, [str(k) for k in parent], f"{where or 'top-level'} key")
        return ConfigError(key, str(getattr(cause, "msg", cause)).splitlines()[0])
    if isinstance(e, ConfigCompositionException):
        return ConfigError("overrides", str(e).strip().splitlines()[0])
    return None


class Redact(Callback):
    """Secrets never reach Hydra's files or logs: log records are redacted from the start, and the config files
    Hydra writes (``.hydra/*.yaml``, ``multirun.yaml``) are rewritten redacted before the task runs."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        install_log_redaction()
        quiet_libraries()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        install_log_redaction()
        quiet_libraries()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        h = config.hydra
        if h.output_subdir is not None:
            redact_tree(Path(h.runtime.output_dir) / h.output_subdir)
        if h.mode == RunMode.MULTIRUN:
            redact_tree(Path(h.sweep.dir) / "multirun.yaml")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        redact_tree(Path(config.hydra.sweep.dir) / "multirun.yaml")


class CheckInputs(Callback):
    """Before a run or a sweep: its output folder can be created; before a Hydra grid sweep also every value composes
    and the model and data build once, so bad input fails with rc 2 before any run."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_mode_keys(config, multirun=False)
        _check_output_dir(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_mode_keys(config, multirun=True)
        _check_output_dir(config, "hydra.sweep.dir")
        if is_vitq_sweeper(config):
            return  # vitq's sweeper checks its inputs itself
        from vitq.session import SessionError

        try:
            _check_grid_values(config)
            session_of(config)
        except SessionError as e:
            fail(e)


_SWEEP_ONLY = ("sweeper", "launcher", "sweep")  # hydra.<these> (and the groups hydra/sweeper, hydra/launcher)
_RUN_ONLY = ("run",)


_SWEEPER_SETS = {  # keys the sweepers set on each trial: given by the user, a run would claim to be what it is not
    "trial_number": "numbers the trials of a sweep (vitq's sweeper and Hydra's grid set it)",
    "baseline": "marks the uniform baselines that vitq's sweeper enqueues (tag vitq.baseline)",
    "trial_params": "carries a search trial's values from vitq's sweeper (its MLflow params)",
}

SWEEP_KEYS = {  # what only a sweep reads: the other CLIs that take the sweep's overrides refuse these
    "tracking": "sets how a sweep logs to MLflow",
    "study_name": "names a sweep's MLflow experiment",
    "export_dir": "names the folder where a sweep run writes its resolved config",
    "hydra": "sets Hydra's own run folders, sweeper and launcher",
    **_SWEEPER_SETS,
}
QUANT_KEYS = ("quant", *QUANT_SECTIONS)  # the quant config: its preset group and its sections


def refuse_unread(overrides: list[str] | tuple[str, ...], prog: str, instead: dict[str, str] | None = None) -> None:
    """ConfigError for an override of a top-level key (or config group) that ``prog`` composes the sweep's config
    with but does not read, so that it would exit 0 on a run without it: those of :data:`SWEEP_KEYS`, and those of
    ``instead``, which maps each to what ``prog`` reads in its place."""
    for o in overrides:
        key = o.lstrip("+~").partition("=")[0]
        top = key.replace("/", ".").split(".")[0]
        if top in (instead or {}):
            raise ConfigError(key, f"{prog} does not read it; {instead[top]}")
        if top in SWEEP_KEYS:
            raise ConfigError(key, f"{prog} does not read it: it {SWEEP_KEYS[top]}")


def _check_mode_keys(config: DictConfig, multirun: bool) -> None:
    """ConfigError for a command-line setting that this mode ignores: a sweeper, a launcher or the sweep folder
    without ``-m`` (Hydra would run one trial, rc 0, where a search was asked for), ``hydra.run.dir`` with it (a
    multirun writes to ``hydra.sweep.dir``); or one that only the sweepers set (``baseline=W8A8`` tagged any run a
    W8A8 baseline, ``trial_number`` also turned the check of unknown keys off)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for o in parser.parse_overrides(list(config.hydra.overrides.task)):
        if o.key_or_group in _SWEEPER_SETS:
            fail(ConfigError(o.key_or_group, f"{_SWEEPER_SETS[o.key_or_group]}; leave it unset"))
    for o in parser.parse_overrides(list(config.hydra.overrides.hydra)):
        parts = o.key_or_group.replace("/", ".").split(".")
        if parts[0] != "hydra" or len(parts) < 2:
            continue
        if not multirun and parts[1] in _SWEEP_ONLY:
            fail(ConfigError(o.input_line, "takes effect only in a multirun: add -m (--multirun), as in "
                                           "python -m vitq.sweep -m ...; without it this is one run, which ignores it"))
        if multirun and parts[1] in _RUN_ONLY:
            fail(ConfigError(o.input_line, "a multirun ignores hydra.run.*: its jobs write under hydra.sweep.dir; set "
                                           "that instead"))


def _check_output_dir(config: DictConfig, key: str) -> None:
    """Hydra creates this folder itself, with a traceback when it cannot: one line and rc 2 instead, before any
    work (and before a sweep's MLflow parent run or study opens). The check creates nothing there, so bad input found
    later leaves no empty folders, and workers starting together do not race (:func:`check_creatable`)."""
    try:
        check_creatable(OmegaConf.select(config, key), key)
    except FolderError as e:
        fail(e)


def _check_grid_values(config: DictConfig) -> None:
    """ConfigError (:func:`config_error`) for a value of the grid that Hydra cannot compose, before the sweep's
    MLflow parent run starts: Hydra's sweeper would find it only then."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    check_composable(config, [o.input_line for o in overrides if not o.is_sweep_override()],
                     [f"{o.get_key_element()}={value}" for o in overrides if o.is_sweep_override()
                      for value in o.sweep_string_iterator()])


def check_composable(config: DictConfig, fixed: list[str], settings: list[str]) -> None:
    """ConfigError (:func:`config_error`) for the first override of ``settings`` that Hydra cannot compose beside
    the ``fixed`` ones: a sweep's values, each composed once (not the whole product), before anything starts."""
    from hydra import compose as hydra_compose

    for line in settings:
        try:
            hydra_compose(config_name=config.hydra.job.config_name, overrides=[*fixed, line])
        except Exception as e:  # noqa: BLE001 - Hydra/OmegaConf errors: one line naming the key
            err = config_error(e)
            if err is None:
                raise
            raise err from None


class GridFailures(Callback):
    """Exit 1 after a Hydra grid whose jobs failed, also without MLflow (with it, :class:`MlflowSweepCallback`
    counts them beside the parent's children: a job may fail before its run opens).

    Each failed job leaves one line in a folder of this multirun (any launcher, any process); the end reads them
    (:func:`take_grid_failures`).
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_vitq_sweeper(config):
            return
        import uuid

        os.environ[GRID_FAILURES_ENV] = str(grid_failures_dir(config.hydra.sweep.dir, uuid.uuid4().hex))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.tracking.enabled:
            return  # MlflowSweepCallback reads them
        lines = take_grid_failures()
        if lines:
            fail(f"{len(lines)} trial(s) of the grid failed (first: {lines[min(lines)]}); MLflow is off "
                 f"(tracking=none)", code=1)


def take_grid_failures() -> dict[int, str]:
    """The failed jobs of the grid that just ended, by number; their folder is removed (read once)."""
    folder = os.environ.pop(GRID_FAILURES_ENV, None)
    if folder is None:
        return {}
    import shutil

    lines = {int(p.stem): p.read_text().strip() for p in Path(folder).glob("*.txt")}
    shutil.rmtree(folder, ignore_errors=True)
    return lines


def _note_grid_failure(number: int | None, message: str) -> None:
    folder = os.environ.get(GRID_FAILURES_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{number or 0}.txt").write_text(redact(message) + "\n")


def is_vitq_sweeper(config: DictConfig) -> bool:
    target = str(config.hydra.sweeper.get("_target_", ""))
    return "vitq" in target.lower()


class MlflowSweepCallback(Callback):
    """Parent run around Hydra grid sweeps (vitq's Optuna sweeper manages its own parent)."""

    def __init__(self) -> None:
        self.parent: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_vitq_sweeper(config) or not config.tracking.enabled:
            return
        from vitq.session import Session
        from vitq.tracking import PARENT_ENV, TrackingError, start_parent

        try:
            self.parent = start_parent(config.tracking.uri, config.study_name,
                                       params={"sweeper": "hydra-basic",
                                               "overrides": [redact(o) for o in config.hydra.overrides.task]},
                                       tags=Session.from_config(config).provenance())
        except TrackingError as e:
            fail(e)
        except Exception as e:  # noqa: BLE001 - Hydra would only warn and run the grid without a parent
            fail(f"could not start the sweep's MLflow parent run: {type(e).__name__}: {e}", code=1)
        os.environ[PARENT_ENV] = self.parent

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is None:
            return
        from mlflow.tracking import MlflowClient

        from vitq.tracking import PARENT_ENV, child_runs, finalize_parent, use_store

        parent, self.parent = self.parent, None
        os.environ.pop(PARENT_ENV, None)
        grid_failed = take_grid_failures()  # first: its folder goes whatever happens below
        use_store(config.tracking.uri, config.study_name)
        client = MlflowClient()
        try:
            finalize_parent(parent, terminate=False)
        except Exception as e:  # noqa: BLE001 - the parent must not stay RUNNING, and the exit code must say so
            client.set_terminated(parent, "FAILED")
            fail(f"could not write the Pareto front of sweep run {parent}: {type(e).__name__}: {e}", code=1)
        runs = child_runs(parent)
        failed = runs[runs["status"] != "FINISHED"] if len(runs) else runs
        numbers = set(runs["tags.trial_number"].astype(str)) if "tags.trial_number" in runs else set()
        no_run = [n for n in grid_failed if str(n) not in numbers]  # jobs that failed before their run opened
        n_failed, n_total = len(failed) + len(no_run), len(runs) + len(no_run)
        client.set_terminated(parent, "FAILED" if n_failed else "FINISHED")
        if n_failed:
            fail(f"{n_failed} of {n_total} trials failed (MLflow parent run {parent}, experiment "
                 f"{config.study_name})", code=1)


def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run(cfg: DictConfig) -> dict[str, float]:
    """One trial; returns its metrics."""
    multirun = _is_multirun()
    number = cfg.trial_number
    grid = multirun and "vitq" not in str(HydraConfig.get().sweeper.get("_target_", "")).lower()
    if number is None and multirun:  # a Hydra grid job: its job number
        number = HydraConfig.get().job.num

    try:
        return _job(cfg, number, multirun)
    except KeyboardInterrupt:
        if multirun:
            raise
        fail("interrupted (Ctrl-C); the trial's MLflow run is KILLED", code=130)
    except Exception as e:  # noqa: BLE001 - one line for the user; vitq's sweeper records the failure itself
        bad = [getattr(sys.modules.get(m), name, ()) for m, name in (("vitq.session", "SessionError"),
                                                                     ("vitq.tracking", "TrackingError"))]
        bad_input = isinstance(e, (ConfigError, *bad))  # (a module not imported: the error cannot be one of its)
        if not multirun:
            fail(e if bad_input else f"{type(e).__name__}: {e}", code=2 if bad_input else 1)
        if not grid:
            raise
        message = f"trial {number} failed: {type(e).__name__}: {e}"
        say(message)  # the grid goes on; its end reports the count
        _note_grid_failure(number, message.splitlines()[0])
        return {}


def _job(cfg: DictConfig, number: int | None, multirun: bool) -> dict[str, float]:
    qcfg, session = session_of(cfg)
    from vitq.trial import run_trial

    if cfg.export_dir:
        qcfg.to_yaml(Path(cfg.export_dir).expanduser() / f"quant_config_{number or 0}.yaml")

    def trial() -> tuple[dict[str, float], Any]:
        maybe_kill("in_trial", number)
        maybe_meet(number)
        if (seconds := fault("sleep", number)) is not None:
            import time

            time.sleep(float(seconds))
        if fault("nan", number) is not None:
            res = run_trial(session.model, _nan_data(session.data), qcfg, batch_size=session.eval_batch_size,
                            calib_batch_size=session.calib_batch_size, stats_dir=session.stats_dir)
        else:
            res = session.run_trial(qcfg, progress=not multirun and progress_enabled())
        return res.metrics(), res.profile

    maybe_kill("before_run", number)
    if cfg.tracking.enabled:
        from vitq import tracking  # (MLflow: not imported with tracking off)

        with tracking.trial_run(cfg.tracking.uri, cfg.study_name, number, qcfg, params=run_params(cfg),
                                tags={**session.provenance(), "vitq.process": f"{socket.gethostname()}:{os.getpid()}",
                                      **({"vitq.baseline": cfg.baseline} if cfg.baseline else {})}) as run:
            if not multirun:  # (a sweep's parent run holds its data)
                tracking.log_datasets(run.id, session.datasets())
                tracking.log_run_config(run.id, cfg)
            metrics, profile = trial()
            run.finish(metrics, profile)
        maybe_kill("after_finish", number)
    else:
        metrics, profile = trial()
    if not multirun and HydraConfig.initialized():
        out = Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
        out.write_text(json.dumps({**metrics, "provenance": session.provenance()}, indent=2))
    _log_trial(metrics, number)
    return metrics


GROUPS = ("quant", "default", "layers", "attn_layer", "residual_layer", "model", "data")
_NOT_PARAMS = ("trial_number", "study_name", "trial_params", "baseline")


def run_params(cfg: DictConfig) -> dict[str, str]:
    """A trial's MLflow params: the config groups chosen, then what varies between trials: the sweeper's searched
    params (``trial_params``), else the run's command-line overrides (a grid's swept keys among them)."""
    out: dict[str, str] = {}
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        out.update({g: str(choices[g]) for g in GROUPS if choices.get(g) not in (None, "null")})
    if cfg.get("trial_params"):
        out.update({k: str(v) for k, v in json.loads(cfg.trial_params).items() if k not in _NOT_PARAMS})
    elif HydraConfig.initialized():
        for o in HydraConfig.get().overrides.task:
            key, _, value = o.partition("=")
            key = key.lstrip("+~")
            if key in _NOT_PARAMS or key in GROUPS or key.startswith(("hydra.", "tracking.")):
                continue  # (tracking.uri may hold a password: where runs go is not a param)
            out[key] = redact(value)
    return out


def _log_trial(metrics: dict[str, float], number: int | None) -> None:
    label = f"trial {number}" if number is not None else "trial"
    rows = [("top-1", f"{100 * metrics['top1']:.2f} %"), ("FP top-1", f"{100 * metrics['fp_top1']:.2f} %"),
            ("agreement", f"{100 * metrics['agreement']:.2f} %"), ("weight size", f"{metrics['weight_bytes']:,.0f} B"),
            ("compression", f"{metrics['compression']:.2f}x"), ("mean W/A bits",
             f"{metrics['mean_weight_bits']:.2f} / {metrics['mean_act_bits']:.2f}"),
            ("BOPs", f"{metrics['bops']:.3e}"), ("calib/eval s", f"{metrics['calib_seconds']:.3f} / "
                                                               f"{metrics['eval_seconds']:.3f}")]
    log.info("%s: %s", label, " | ".join(f"{k} {v}" for k, v in rows))


CONF_DIR = str(PATHS_CONF_DIR)  # absolute: works however the module is loaded


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float]:
    return run(cfg)


def cli() -> None:
    """``python -m vitq.sweep``: Hydra's app, whose config errors (:func:`config_error`) are one line naming the
    key with exit code 2; Hydra would print several lines and exit 1. ``HYDRA_FULL_ERROR=1`` keeps Hydra's own."""
    if os.environ.get("HYDRA_FULL_ERROR"):
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its errors instead of printing them and exiting 1
    try:
        main()
    except Exception as e:  # noqa: BLE001 - the task reports its own errors; these are Hydra's
        err = config_error(e)
        if err is not None:
            fail(err)
        fail(f"{type(e).__name__}: {e} (HYDRA_FULL_ERROR=1 shows where)", code=1)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    # run the importable module's entry point, so that process-based launchers (joblib) can pickle the task
    from vitq.sweep import cli as _cli

    _cli()
