"""MLflow tracking: one experiment per study, a parent run per sweep, a nested child run per trial,
and the Pareto front (CSV, PNG, interactive HTML, configs) logged on the parent at the end.

The Hydra callback :class:`MlflowSweepCallback` opens/closes the parent for Hydra's grid sweeps;
vitq's Optuna sweeper does the same itself (it knows the study). Trials find their parent through
the ``VITQ_PARENT_RUN_ID`` environment variable.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from vitq.paths import file_lock
from vitq.quant.config import POINTS, SECTION_OF, LayerQuantConfig
from vitq.redact import fail, redact
from vitq.search.pareto import pareto_mask

__all__ = ["DEFAULT_OBJECTIVES", "MlflowSweepCallback", "finalize_parent", "flat_params", "start_parent",
           "trial_run"]

PARENT_ENV = "VITQ_PARENT_RUN_ID"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in sweep logs
# an unreachable tracking server fails within ~30 s (MLflow's defaults retry for minutes)
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "8")


class TrackingError(RuntimeError):
    """The MLflow store cannot be used (server down, corrupt database); the message names the redacted URI."""


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Workers starting together on one new SQLite store would race on MLflow's schema migration: serialize them."""
    path = sqlite_file(uri)
    if path is None:
        yield
        return
    with file_lock(path.with_name(path.name + ".lock")):
        yield
DEFAULT_OBJECTIVES: dict[str, str] = {"top1": "maximize", "weight_bytes": "minimize"}


def literal(value: str) -> str:
    """``value`` as a string literal of MLflow's search filter (single quotes, or double when it holds one)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r}: a name with both ' and \" cannot be searched in MLflow")


def resolve_uri(uri: str | None) -> str:
    """The tracking URI: ``tracking.uri``, else ``MLFLOW_TRACKING_URI`` (keeps a password out of Hydra's files),
    else a SQLite database in the working folder."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (its folder is created), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri.removeprefix("sqlite:///")).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts live beside the database (``<dir>/mlartifacts``), not in the cwd."""
    path = sqlite_file(uri)
    return None if path is None else (path.parent / "mlartifacts").as_uri()


def use_store(uri: str | None, experiment: str) -> str:
    """Point MLflow at ``uri`` and the study's experiment (created if new); returns the experiment id."""
    uri = resolve_uri(uri)
    mlflow.set_tracking_uri(uri)
    root = artifact_root(uri)
    try:
        with _store_lock(uri):
            if root is not None and mlflow.get_experiment_by_name(experiment) is None:
                location = f"{root}/{uuid.uuid5(uuid.NAMESPACE_URL, experiment).hex}"
                with contextlib.suppress(mlflow.exceptions.MlflowException):  # another worker created it first
                    mlflow.create_experiment(experiment, artifact_location=location)
            exp = mlflow.set_experiment(experiment)
    except Exception as e:  # noqa: BLE001 - server down, corrupt database, bad URI: one line naming the store
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TrackingError(f"tracking.uri: cannot use the MLflow store {redact(uri)}: {type(e).__name__}: "
                            f"{redact(first)}") from None
    return exp.experiment_id


def flat_params(cfg: LayerQuantConfig) -> dict[str, str]:
    """Every resolved per-layer field under its dotted name (``layers.attn_qkv.bit_type.bits``)."""
    out: dict[str, str] = {}
    blocks: list[int | None] = [None, *sorted(cfg.blocks)]
    for b in blocks:
        prefix = "" if b is None else f"blocks.{b}."
        for key in POINTS:
            if b is not None and key not in cfg.blocks[b].get(SECTION_OF[key], {}):
                continue
            q = cfg.resolve(key, b)
            base = f"{prefix}{SECTION_OF[key]}.{key}"
            for f, v in q.to_dict().items():
                if isinstance(v, dict):
                    for bk, bv in v.items():
                        out[f"{base}.{f}.{bk}"] = str(bv)
                else:
                    out[f"{base}.{f}"] = str(v)
    return out


def start_parent(uri: str | None, study: str, key: str | None = None, params: dict[str, Any] | None = None,
                 tags: dict[str, str] | None = None) -> str:
    """Find the parent run of ``key`` (resume, other workers) or create it; returns its id.

    Workers starting together may each create one: all then keep the earliest and the others delete theirs.
    """
    exp_id = use_store(uri, study)
    client = MlflowClient()

    def earliest(key: str) -> str | None:
        query = f"tags.`vitq.sweep_key` = {literal(key)} and tags.`vitq.role` = 'parent'"
        runs = client.search_runs([exp_id], query, max_results=100)
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if runs else None

    with _store_lock(resolve_uri(uri)):  # a SQLite store: workers take turns, so exactly one creates the parent
        if key is not None and (found := earliest(key)) is not None:
            return found
        key = key or uuid.uuid4().hex
        run = client.create_run(exp_id, tags={**(tags or {}), "vitq.role": "parent", "vitq.sweep_key": key,
                                              "vitq.study": study, "mlflow.runName": f"sweep-{study}"})
    rid = run.info.run_id
    for k, v in (params or {}).items():
        client.log_param(rid, k, str(v)[:6000])
    if sqlite_file(resolve_uri(uri)) is None:  # a server store has no lock: let simultaneous creators all appear,
        time.sleep(0.2 + 0.3 * random.random())  # then every worker agrees on the earliest (start time, run id)
    winner = earliest(key) or rid
    if winner != rid:  # another worker's parent came first
        client.delete_run(rid)
    return winner


@contextmanager
def trial_run(uri: str | None, study: str, trial_number: int | None, cfg: LayerQuantConfig,
              tags: dict[str, str] | None = None) -> Iterator[str]:
    """A child run (nested under the sweep's parent when there is one) with provenance ``tags``; FAILED if the
    body raises."""
    exp_id = use_store(uri, study)
    client = MlflowClient()
    parent = os.environ.get(PARENT_ENV)
    tags = {**(tags or {}), "vitq.role": "trial", "vitq.study": study, "pareto": "false"}
    if trial_number is not None:
        tags["trial_number"] = str(trial_number)
    if parent:
        tags["mlflow.parentRunId"] = parent
    name = f"trial-{trial_number}" if trial_number is not None else "trial"
    run = client.create_run(exp_id, tags={**tags, "mlflow.runName": name})
    rid = run.info.run_id
    try:
        params = flat_params(cfg)
        items = [mlflow.entities.Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(rid, params=items[i:i + 100])
        client.log_text(rid, cfg.to_yaml(), "quant_config.yaml")
        yield rid
    except KeyboardInterrupt:
        client.set_terminated(rid, "KILLED")
        raise
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")


def log_result(run_id: str, metrics: dict[str, float], profile: pd.DataFrame | None) -> None:
    client = MlflowClient()
    ms = [mlflow.entities.Metric(k, float(v), 0, 0) for k, v in metrics.items() if np.isfinite(v)]
    client.log_batch(run_id, metrics=ms)
    if profile is not None and not profile.empty:
        client.log_text(run_id, profile.to_csv(index=False), "profile.csv")


def finished_metrics(parent_id: str, trial_number: int) -> dict[str, float] | None:
    """The metrics of trial ``trial_number``'s FINISHED run under ``parent_id`` (the current store), if any."""
    client = MlflowClient()
    exp_id = client.get_run(parent_id).info.experiment_id
    query = (f"tags.mlflow.parentRunId = {literal(parent_id)} and tags.trial_number = {literal(str(trial_number))} "
             "and attributes.status = 'FINISHED'")
    runs = client.search_runs([exp_id], query, max_results=1)
    return dict(runs[0].data.metrics) if runs else None


def child_runs(parent_id: str) -> pd.DataFrame:
    client = MlflowClient()
    exp_id = client.get_run(parent_id).info.experiment_id
    return mlflow.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=50000)


def finalize_parent(parent_id: str, objectives: dict[str, str] | None = None, terminate: bool = True) -> pd.DataFrame:
    """Tag children ``pareto=true|false``; log the front as CSV/PNG/HTML and its configs on the parent."""
    objectives = objectives or DEFAULT_OBJECTIVES
    client = MlflowClient()
    runs = child_runs(parent_id)
    if "tags.trial_number" not in runs.columns:  # runs logged without a number (older vitq): keep the column
        runs["tags.trial_number"] = None
    cols = [f"metrics.{k}" for k in objectives]
    ok = runs[(runs["status"] == "FINISHED")] if len(runs) else runs
    ok = ok.dropna(subset=[c for c in cols if c in ok.columns]) if len(ok) else ok
    if len(ok) == 0 or not all(c in ok.columns for c in cols):
        if terminate:
            client.set_terminated(parent_id, "FINISHED")
        return pd.DataFrame()
    mask = pareto_mask(ok[cols].to_numpy(), list(objectives.values()))
    for rid, is_p in zip(ok["run_id"], mask, strict=True):
        client.set_tag(rid, "pareto", "true" if is_p else "false")
    front = ok[mask].copy()
    keep = ["run_id", "tags.trial_number", *cols] + [c for c in ok.columns if c.startswith("metrics.")
                                                     and c not in cols]
    table = front[keep].rename(columns=lambda c: c.split(".", 1)[1] if "." in c else c)
    table = table.sort_values(list(objectives)[1])
    client.log_text(parent_id, table.to_csv(index=False), "pareto/pareto_front.csv")
    all_pts = ok[["run_id", "tags.trial_number", *cols]].rename(columns=lambda c: c.split(".", 1)[-1])
    all_pts["pareto"] = mask
    client.log_text(parent_id, all_pts.to_csv(index=False), "pareto/all_trials.csv")
    _log_plots(client, parent_id, all_pts, list(objectives))
    for rid, num in zip(front["run_id"], front["tags.trial_number"], strict=True):
        try:
            text = mlflow.artifacts.load_text(f"runs:/{rid}/quant_config.yaml")
        except Exception:  # noqa: BLE001 - a missing artifact must not lose the front
            continue
        client.log_text(parent_id, text, f"pareto/configs/trial_{num if isinstance(num, str) else rid}.yaml")
    client.set_tag(parent_id, "pareto_size", str(int(mask.sum())))
    if terminate:
        client.set_terminated(parent_id, "FINISHED")
    return table


def _log_plots(client: MlflowClient, parent_id: str, pts: pd.DataFrame, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.express as px

    x, y = names[1], names[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(pts[x], pts[y], c="lightgray", label="trials")
    f = pts[pts["pareto"]].sort_values(x)
    ax.plot(f[x], f[y], "o-", c="tab:red", label="Pareto front")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend()
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "pareto_front.png")
        fig.savefig(png, dpi=120)
        plt.close(fig)
        client.log_artifact(parent_id, png, "pareto")
    html = px.scatter(pts, x=x, y=y, color="pareto", hover_data=["trial_number", "run_id"]).to_html(
        include_plotlyjs="cdn")
    client.log_text(parent_id, html, "pareto/pareto_front.html")


def _is_vitq_sweeper(config: DictConfig) -> bool:
    target = str(config.hydra.sweeper.get("_target_", ""))
    return "vitq" in target.lower()


class MlflowSweepCallback(Callback):
    """Parent run around Hydra grid sweeps (vitq's Optuna sweeper manages its own parent)."""

    def __init__(self) -> None:
        self.parent: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _is_vitq_sweeper(config) or not config.tracking.enabled:
            return
        from vitq.session import Session

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
        parent, self.parent = self.parent, None
        os.environ.pop(PARENT_ENV, None)
        use_store(config.tracking.uri, config.study_name)
        client = MlflowClient()
        try:
            finalize_parent(parent, terminate=False)
        except Exception as e:  # noqa: BLE001 - the parent must not stay RUNNING, and the exit code must say so
            client.set_terminated(parent, "FAILED")
            fail(f"could not write the Pareto front of sweep run {parent}: {type(e).__name__}: {e}", code=1)
        runs = child_runs(parent)
        failed = runs[runs["status"] != "FINISHED"] if len(runs) else runs
        client.set_terminated(parent, "FAILED" if len(failed) else "FINISHED")
        if len(failed):
            fail(f"{len(failed)} of {len(runs)} trials failed (MLflow parent run {parent}, experiment "
                 f"{config.study_name})", code=1)


def kill_runs(uri: str | None, study: str, trial_numbers: list[int]) -> None:
    """Mark the RUNNING MLflow runs of these (dead) trials as KILLED."""
    exp_id = use_store(uri, study)
    client = MlflowClient()
    for n in trial_numbers:
        for r in client.search_runs([exp_id], f"tags.trial_number = '{n}' and attributes.status = 'RUNNING'"):
            client.set_terminated(r.info.run_id, "KILLED")
