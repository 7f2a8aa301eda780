"""MLflow tracking: one experiment per study, a parent run per sweep, a nested child run per trial,
and the Pareto front (CSV, PNG, interactive HTML, configs) logged on the parent at the end.

``vitq.sweep.MlflowSweepCallback`` opens/closes the parent for Hydra's grid sweeps through it;
vitq's Optuna sweeper does the same itself (it knows the study). Trials find their parent through
the ``VITQ_PARENT_RUN_ID`` environment variable.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from vitq.db import MYSQL_DIALECTS, database_lock, sqlite_file, sqlite_wal
from vitq.pareto import pareto_mask
from vitq.paths import file_lock
from vitq.quant.config import POINTS, SECTIONS, LayerQuantConfig
from vitq.redact import redact

__all__ = ["DEFAULT_OBJECTIVES", "TrialRun", "finalize_parent", "point_summary", "start_parent",
           "trial_run"]

PARENT_ENV = "VITQ_PARENT_RUN_ID"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in sweep logs
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # not two lines per run on a server store
# an unreachable tracking server fails within ~30 s (MLflow's defaults retry for minutes)
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "8")


class TrackingError(RuntimeError):
    """The MLflow store cannot be used (server down, corrupt database); the message names the redacted URI."""


def _database(uri: str) -> str | None:
    """The dialect of a PostgreSQL or MySQL/MariaDB store's URI, else None."""
    scheme = uri.partition("://")[0].partition("+")[0]
    return scheme if "://" in uri and scheme in ("postgresql", *MYSQL_DIALECTS) else None


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Workers starting together on one new store would race on MLflow's schema migration (on PostgreSQL two of
    three died with ``UniqueViolation``): a file lock beside a SQLite store, the database's own lock on PostgreSQL
    and MySQL/MariaDB; a tracking server migrates once itself."""
    if (path := sqlite_file(uri)) is not None:
        with file_lock(path.with_name(path.name + ".lock")):
            yield
        return
    if _database(uri) is None:
        yield
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args={"connect_timeout": 10})
    try:
        with database_lock(engine, "vitq-mlflow-store"):
            yield
    finally:
        engine.dispose()
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


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts live beside the database (``<dir>/mlartifacts``), not in the cwd."""
    path = sqlite_file(uri)
    return None if path is None else (path.parent / "mlartifacts").as_uri()


_EXPERIMENTS: dict[tuple[str, str], str] = {}  # (store, experiment) -> id, looked up once per process


def use_store(uri: str | None, experiment: str) -> str:
    """Point MLflow at ``uri`` and the study's experiment (created if new); returns the experiment id."""
    uri = resolve_uri(uri)
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    if (known := _EXPERIMENTS.get((uri, experiment))) is not None:
        return known
    try:
        root = artifact_root(uri)  # (creates a SQLite store's folder)
        with _store_lock(uri):
            sqlite_wal(uri)
            if root is not None and mlflow.get_experiment_by_name(experiment) is None:
                location = f"{root}/{uuid.uuid5(uuid.NAMESPACE_URL, experiment).hex}"
                with contextlib.suppress(mlflow.exceptions.MlflowException):  # another worker created it first
                    mlflow.create_experiment(experiment, artifact_location=location)
            exp = mlflow.set_experiment(experiment)
    except Exception as e:  # noqa: BLE001 - server down, corrupt database, bad URI: one line naming the store
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TrackingError(f"tracking.uri: cannot use the MLflow store {redact(uri)}: {type(e).__name__}: "
                            f"{redact(first)}") from None
    _EXPERIMENTS[(uri, experiment)] = exp.experiment_id
    return exp.experiment_id


def point_summary(cfg: LayerQuantConfig) -> dict[str, list]:
    """Each point's resolved ``[bits, observer, percentile_alpha]`` (bits None when disabled): the ``vitq.points``
    tag of a trial run, which the reports read (the full config is the run's ``quant_config.yaml``)."""
    out = {}
    for key in POINTS:
        q = cfg.resolve(key)
        out[key] = [q.bit_type.bits if q.enabled else None, q.observer_type, q.percentile_alpha]
    return out


_SYSTEM_TAGS: dict[str, str] | None = None


def system_tags() -> dict[str, str]:
    """MLflow's own run context (user, source, git commit), resolved once per process."""
    global _SYSTEM_TAGS
    if _SYSTEM_TAGS is None:
        from mlflow.tracking.context.registry import resolve_tags

        _SYSTEM_TAGS = {k: str(v) for k, v in resolve_tags().items()}
    return _SYSTEM_TAGS


def start_parent(uri: str | None, study: str, key: str | None = None, params: dict[str, Any] | None = None,
                 tags: dict[str, str] | None = None, on_create: Callable[[str], None] | None = None) -> str:
    """Find the parent run of ``key`` (resume, other workers) or create it; returns its id.

    Workers starting together may each create one: all then keep the earliest and the others delete theirs.
    ``on_create(run_id)`` fills a run this call created (its inputs, files) before any other worker can pick it.
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
    if on_create is not None:
        on_create(rid)
    if sqlite_file(resolve_uri(uri)) is None:  # a server store has no lock: let simultaneous creators all appear,
        time.sleep(0.2 + 0.3 * random.random())  # then every worker agrees on the earliest (start time, run id)
    winner = earliest(key) or rid
    if winner != rid:  # another worker's parent came first
        client.delete_run(rid)
    return winner


def param_key(name: str) -> str:
    """A search parameter's name as an MLflow param key, which takes no ``*``: ``layers.attn_*.observer_type`` is
    logged as ``layers.attn_ALL.observer_type``."""
    return name.replace("*", "ALL")


@dataclass
class TrialRun:
    """A trial's MLflow run: created, with its params and ``quant_config.yaml``, while the trial starts computing;
    its metrics and profile are written when it ends."""

    created: Future[mlflow.entities.Run]
    client: MlflowClient

    @property
    def info(self) -> mlflow.entities.RunInfo:
        """The run's info (waits for its creation; raises its error)."""
        return self.created.result().info

    @property
    def id(self) -> str:
        return self.info.run_id

    def finish(self, metrics: dict[str, float], profile: pd.DataFrame | None) -> None:
        """The metrics in one ``log_batch`` (stamped now), then the profile file."""
        now = int(time.time() * 1000)
        ms = [mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items() if np.isfinite(v)]
        self.client.log_batch(self.id, metrics=ms)
        if profile is not None and not profile.empty:
            _log_files(self.info.artifact_uri, {"profile.csv": profile.to_csv(index=False)})


def _log_files(artifact_uri: str, files: dict[str, str]) -> None:
    """Text files into a run's artifacts (its repository directly: the client would fetch the run again)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        get_artifact_repository(artifact_uri).log_artifacts(tmp)


def _open_run(client: MlflowClient, exp_id: str, tags: dict[str, str], params: dict[str, str],
              cfg: LayerQuantConfig) -> mlflow.entities.Run:
    """Create a trial run with its ``params`` and ``quant_config.yaml``; if those fail, end it FAILED and raise."""
    run = client.create_run(exp_id, tags=tags)
    try:
        if params:
            client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
        _log_files(run.info.artifact_uri, {"quant_config.yaml": cfg.to_yaml()})
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(run.info.run_id, "FAILED")
        raise
    return run


@functools.cache
def _creator() -> ThreadPoolExecutor:
    """The thread that creates trial runs in the background, in order (one per process)."""
    return ThreadPoolExecutor(1, thread_name_prefix="vitq-mlflow")


@contextmanager
def trial_run(uri: str | None, study: str, trial_number: int | None, cfg: LayerQuantConfig,
              tags: dict[str, str] | None = None, params: dict[str, Any] | None = None) -> Iterator[TrialRun]:
    """A child run (nested under the sweep's parent when there is one) with provenance ``tags``, MLflow's system
    tags, the points' summary, ``params`` (the searched keys) and the config file; ``finish`` logs the metrics.
    If the body raises, the run ends FAILED (KILLED on Ctrl-C).

    The run is created by a background thread while the body starts (its store round trips overlap the trial's
    compute); its id waits for it, and the run is ended only once it exists. An error creating it is raised
    where the body first needs the run, or after a body that failed."""
    exp_id = use_store(uri, study)
    client = MlflowClient()
    parent = os.environ.get(PARENT_ENV)
    tags = {**system_tags(), **(tags or {}), "vitq.role": "trial", "vitq.study": study, "pareto": "false",
            "vitq.points": json.dumps(point_summary(cfg))}
    if trial_number is not None:
        tags["trial_number"] = str(trial_number)
    if parent:
        tags["mlflow.parentRunId"] = parent
    name = f"trial-{trial_number}" if trial_number is not None else "trial"
    params = {param_key(k): str(v)[:6000] for k, v in (params or {}).items()}
    created = _creator().submit(_open_run, client, exp_id, {**tags, "mlflow.runName": name}, params, cfg)
    handle = TrialRun(created, client)
    status = "FINISHED"
    try:
        yield handle
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        error = created.exception()  # (waits for the run)
        if error is None:
            client.set_terminated(handle.id, status)
        elif status == "FINISHED":  # (a failed body raises its own error: there is no run to end)
            raise error


def log_run_config(run_id: str, cfg: DictConfig) -> None:
    """``config.yaml`` on the run: the composed config without Hydra's node and the quant sections (model, data,
    batch sizes, tracking: what ``quant_config.yaml`` and the params leave out), secrets redacted. Once per run."""
    from omegaconf import OmegaConf

    client = MlflowClient()
    if any(a.path == "config.yaml" for a in client.list_artifacts(run_id)):
        return
    try:
        full = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that needs Hydra's runtime: keep it as written
        full = OmegaConf.to_container(cfg, resolve=False)
    quant = {"hydra", "default", "blocks", *SECTIONS}  # the quant sections are the run's quant_config.yaml
    task = {k: v for k, v in full.items() if k not in quant}
    client.log_text(run_id, redact(OmegaConf.to_yaml(OmegaConf.create(task))), "config.yaml")


def log_datasets(run_id: str, datasets: dict[str, dict[str, str]]) -> None:
    """The data a run used as its MLflow inputs (the UI's Dataset column): per context (calib, eval) a dataset named
    by the data and split, with the content fingerprint as its digest. Logged once per run."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    client = MlflowClient()
    inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"][:36], source_type="local",
                                   source=json.dumps({"uri": d["source"]}), profile=json.dumps({"num_rows": d["n"]})),
                           tags=[InputTag("mlflow.data.context", context)])
              for context, d in datasets.items()]
    for attempt in range(5):
        if client.get_run(run_id).inputs.dataset_inputs:
            return
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as e:
            # MLflow looks a dataset up, then inserts it: two workers creating parent runs together in one
            # experiment (a server store) can both insert it, and one gets a unique-key violation; once the other's
            # row is in, the next attempt links it.
            if attempt == 4 or not any(m in str(e) for m in ("duplicate key", "UNIQUE constraint", "IntegrityError")):
                raise
            time.sleep(0.1 + 0.3 * random.random())


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
    client.log_table(parent_id, data=table, artifact_file="pareto/pareto_front_table.json")  # MLflow's table view
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
        include_plotlyjs=True)  # embedded: the page works offline
    client.log_text(parent_id, html, "pareto/pareto_front.html")


def end_run(run_id: str, status: str) -> None:
    """End run ``run_id`` with ``status`` (FINISHED, FAILED, KILLED)."""
    MlflowClient().set_terminated(run_id, status)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    """``text`` as the artifact ``artifact_file`` of run ``run_id``."""
    MlflowClient().log_text(run_id, text, artifact_file)


def kill_runs(uri: str | None, study: str, trial_numbers: list[int]) -> None:
    """Mark the RUNNING MLflow runs of these (dead) trials as KILLED."""
    exp_id = use_store(uri, study)
    client = MlflowClient()
    for n in trial_numbers:
        for r in client.search_runs([exp_id], f"tags.trial_number = '{n}' and attributes.status = 'RUNNING'"):
            client.set_terminated(r.info.run_id, "KILLED")
