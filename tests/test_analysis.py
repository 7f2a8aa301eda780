"""Analysis and reproducibility: the Pareto notebook, the DVC pipeline, and sweeps against an MLflow server."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from _util import mlflow_server, run, run_sweep

from vitq.report import (
    ReportError,
    SizeBudget,
    front_metrics,
    load_study,
    observer_table,
    run_notebook,
    sensitivity_table,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _parent_front(uri: str, study: str) -> pd.DataFrame:
    s = load_study(uri, study)
    text = mlflow.artifacts.load_text(f"runs:/{s.parent_id}/pareto/pareto_front.csv")
    return pd.read_csv(io.StringIO(text))


def test_notebook_runs_against_a_small_sweep(tmp_path, capfd):
    r = run_sweep(tmp_path, "-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.search=mixed_precision",
                  "hydra.sweeper.n_trials=6", "hydra.sweeper.study_name=nb_study")
    assert r.returncode == 0, r.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "report"
    capfd.readouterr()
    html = run_notebook(uri, ["nb_study"], out)
    assert html.is_file() and html.stat().st_size > 50_000
    kernel = capfd.readouterr()  # the kernel talks over Unix sockets in a private folder: no TCP port to read
    assert "TCP" not in kernel.err + kernel.out and not list(tmp_path.glob("**/kernel-*")), kernel.err[-2000:]
    for fig in ("pareto_front.png", "bits_heatmap_nb_study.png", "sensitivity.png", "observers.png"):
        assert (out / fig).stat().st_size > 5_000, fig
    table = pd.read_csv(out / "pareto_configs_nb_study.csv")
    parent = _parent_front(uri, "nb_study")
    assert sorted(table["run_id"]) == sorted(parent["run_id"])
    merged = table.merge(parent, on="run_id", suffixes=("", "_parent"))
    for k in ("top1", "weight_bytes"):
        assert (merged[k] == merged[f"{k}_parent"]).all()
    assert {"attn_qkv.bits", "kv_act.observer", "mlp_act.alpha"} <= set(table.columns)
    study = load_study(uri, "nb_study")
    baselines = set(study.trials["baseline"]) - {""}
    assert {"W8A8", "W6A6", "W4A8"} <= baselines  # the enqueued uniform baselines are recognised
    m = front_metrics(study, [SizeBudget.parse(b) for b in ("150000", "1000", "5x", "1e3x")])
    t = study.trials
    assert m["best_top1_at_150000B"] == t.loc[t["metrics.weight_bytes"] <= 150_000, "metrics.top1"].max() > 0.9
    assert 0 < m["hypervolume"] < 1 and m["best_top1_at_1000B"] is None  # no trial fits (it read 0.0: a 0 % model)
    # a compression over the FP32 weights: at most a fifth of their bytes, read from the sizes the trials logged
    fifth = t["metrics.weight_bytes"] * 5 <= t["metrics.fp32_bytes"]
    assert 0 < fifth.sum() < len(t) and m["best_top1_at_5x"] == t.loc[fifth, "metrics.top1"].max() > 0.9
    assert m["best_top1_at_1000x"] is None
    old = dataclasses.replace(study, trials=t.drop(columns=["metrics.fp32_bytes", "metrics.compression"]))
    with pytest.raises(ReportError, match="'nb_study': its trials have no metric fp32_bytes, compression"):
        front_metrics(old, [SizeBudget.parse("8x")])  # it normalized the hypervolume by the largest trial instead
    # offline and honest: plotly embedded, no warnings in the rendered notebook, no mean of fewer than 3 trials
    page = mlflow.artifacts.load_text(f"runs:/{study.parent_id}/pareto/pareto_front.html")
    assert not re.search(r"<script[^>]*src=[\"']https?:", page) and "Plotly.newPlot" in page
    assert "Warning" not in html.read_text() and "Traceback" not in html.read_text()
    executed = json.loads((out / "pareto_analysis.ipynb").read_text())
    streams = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert not streams, streams
    sens = sensitivity_table(study.trials)
    assert len(sens) and (sens["n"] >= 3).all()
    obs, n = observer_table(study.trials)
    assert (obs.isna() == (n.reindex_like(obs).fillna(0) < 3)).all().all()


def _copy_checkout(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=dst, check=True)


def test_dvc_repro_twice_in_a_clone(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    _copy_checkout(clone)
    env = {"DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return run([sys.executable, "-m", "dvc", *args], clone, env, timeout=900)

    r = dvc("repro")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    metrics = json.loads((clone / "artifacts/front/metrics.json").read_text())
    assert metrics["n_trials"] == 8 and 0 < metrics["hypervolume"] < 1
    assert {"best_top1_at_100000B", "best_top1_at_150000B", "best_top1_at_200000B"} <= set(metrics)
    front = pd.read_csv(clone / "artifacts/front/pareto_front.csv")
    assert len(front) >= 1 and {"top1", "weight_bytes"} <= set(front.columns)
    assert (clone / "reports/mixed_precision_dvc/pareto_analysis.html").is_file()
    r = dvc("status")
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout
    r = dvc("repro")
    assert r.returncode == 0 and "Running stage" not in r.stdout, r.stdout


def test_dvc_repro_on_your_own_model(byo, tmp_path):
    """The DVC pipeline on a user's model and folders (params.yaml's sweep.overrides): the study runs on them, its
    trials carry the checkpoint's SHA-256, and the FP top-1 they record is plain timm's on those images."""
    import byo_case
    import yaml

    clone = tmp_path / "clone"
    clone.mkdir()
    _copy_checkout(clone)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    kwargs = next(a for a in byo.cli() if a.startswith("model.kwargs="))
    rest = [a for a in byo.cli() if not a.startswith(("model.kwargs=", "model.name="))]
    params["sweep"] |= {"n_trials": 3, "study": "own_model",
                        "overrides": " ".join([f"model.name={byo_case.MODEL_NAME}", f"'{kwargs}'", *rest])}
    params["report"]["size_budgets"] = "1x,6x,1000x"  # compressions fit any model, where bytes must be the user's
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    env = {"DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = run([sys.executable, "-m", "dvc", "repro"], clone, env, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    metrics = json.loads((clone / "artifacts/front/metrics.json").read_text())
    assert metrics["n_trials"] == 3
    mlflow.set_tracking_uri(f"sqlite:///{clone / 'artifacts/sweep/mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["own_model"], filter_string="tags.`vitq.role` = 'trial'")
    assert len(runs) == 3
    assert metrics["best_top1_at_1x"] == runs["metrics.top1"].max() and metrics["best_top1_at_1000x"] is None
    six = runs.loc[runs["metrics.weight_bytes"] * 6 <= runs["metrics.fp32_bytes"], "metrics.top1"]
    assert metrics["best_top1_at_6x"] == (six.max() if len(six) else None)
    sha = hashlib.sha256(byo.checkpoint.read_bytes()).hexdigest()
    assert set(runs["tags.model.checkpoint_sha256"]) == {sha}
    pred, labels, _ = byo_case.plain_timm_predictions(byo)
    assert set(runs["metrics.fp_top1"]) == {int((pred == labels).sum()) / len(labels)}
    assert (clone / "reports/own_model/pareto_analysis.html").is_file()


def _rest(url: str, path: str, body: dict | None = None) -> dict:
    if body is None:
        req = urllib.request.Request(f"{url}{path}")
    else:
        req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_sweep_logs_to_an_mlflow_server(tmp_path):
    with mlflow_server(tmp_path) as url:
        r = run_sweep(tmp_path, "-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.search=mixed_precision",
                      "hydra.sweeper.n_trials=3", "hydra.sweeper.study_name=server_study", f"tracking.uri={url}")
        assert r.returncode == 0, r.stderr[-3000:]
        exp = _rest(url, "/api/2.0/mlflow/experiments/get-by-name?"
                    + urllib.parse.urlencode({"experiment_name": "server_study"}))["experiment"]
        search = "/api/2.0/mlflow/runs/search"
        parents = _rest(url, search, {"experiment_ids": [exp["experiment_id"]],
                                      "filter": "tags.`vitq.role` = 'parent'"}).get("runs", [])
        assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
        pid = parents[0]["info"]["run_id"]
        children = _rest(url, search, {"experiment_ids": [exp["experiment_id"]],
                                       "filter": f"tags.mlflow.parentRunId = '{pid}'"}).get("runs", [])
        assert len(children) == 3
        numbers = set()
        for c in children:
            tags = {t["key"]: t["value"] for t in c["data"]["tags"]}
            metrics = {m["key"]: m["value"] for m in c["data"]["metrics"]}
            assert c["info"]["status"] == "FINISHED" and 0 < metrics["top1"] <= 1 and metrics["weight_bytes"] > 0
            numbers.add(tags["trial_number"])
        assert numbers == {"0", "1", "2"}
        arts = _rest(url, "/api/2.0/mlflow/artifacts/list?" + urllib.parse.urlencode({"run_id": pid,
                                                                                      "path": "pareto"}))
        assert "pareto/pareto_front.csv" in {f["path"] for f in arts.get("files", [])}
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local default store
