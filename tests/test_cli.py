"""Every CLI path as a user runs it: exit code, the lines printed, the MLflow runs and the files written."""

from __future__ import annotations

import json
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from _util import run, run_sweep, trial_lines
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_plain_single_run_logs_one_complete_run(tmp_path):
    r = run_sweep(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = trial_lines(r.stdout)
    assert len(lines) == 1 and "top-1" in lines[0] and "weight size" in lines[0]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs([MlflowClient().get_experiment_by_name("vitq").experiment_id])
    assert len(runs) == 1 and runs["status"].iloc[0] == "FINISHED"
    rid = runs["run_id"].iloc[0]
    assert {a.path for a in MlflowClient().list_artifacts(rid)} == {"quant_config.yaml", "profile.csv", "config.yaml"}
    (metrics_file,) = tmp_path.glob("outputs/*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["top1"] == runs["metrics.top1"].iloc[0] and metrics["weight_bytes"] > 0 and metrics["bops"] > 0
    assert runs["tags.model.name"].iloc[0] == "digits_reference" and runs["tags.device"].iloc[0] == "cpu"
    profile = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="profile.csv"))
    assert len(profile) == 4 * 14 and profile["sqnr_db"].notna().all()


def test_report_cli(tmp_path):
    r = run([sys.executable, "-m", "vitq.report", "export", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}",
             "--study", "nope", "--out", str(tmp_path / "x")], tmp_path, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vitq: ")]
    assert r.returncode == 2 and len(lines) == 1 and "no study (experiment) 'nope'" in lines[0]
    r = run([sys.executable, "-m", "vitq.report", "presets"], tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FQ-ViT: PTF + LIS (quant=fqvit)" in r.stdout and "MinMax W8A8, 4-bit attention maps" in r.stdout
    r = run([sys.executable, "-m", "vitq.report", "presets", "model.name=nope_vit"], tmp_path, timeout=300)
    assert r.returncode == 2 and "unknown timm model 'nope_vit'" in r.stderr


def test_compare_cli_writes_its_table(tmp_path):
    r = run([sys.executable, "-m", "vitq.search.compare", "--trials", "2", "--seeds", "1", "--reference-trials", "2",
             "--out", str(tmp_path / "cmp")], tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    table = pd.read_csv(tmp_path / "cmp" / "search_comparison.csv")
    assert set(table["strategy"]) == {"tpe_warm", "nsga2_warm", "nsga2", "random", "aimet_greedy"}
    assert (tmp_path / "cmp" / "search_comparison.png").stat().st_size > 5000
    result = json.loads((tmp_path / "cmp" / "search_comparison.json").read_text())
    assert result["n_trials"] == 2 and result["reference_hv"] > 0 and "wrote" in r.stdout and "tpe_warm" in r.stdout
    # warm start runs the solver's configs first: tpe_warm's 2 trials are the first 2 of them, evaluated here anew
    from vitq import load_config_from_yaml
    from vitq.paths import PRESETS_DIR
    from vitq.search.sensitivity import compute_sensitivity, configs_for_budgets, cost_table, enqueue_params
    from vitq.session import Session
    from vitq.sweep import compose

    session = Session.from_config(compose([]))
    base = load_config_from_yaml(PRESETS_DIR / "int8.yaml")
    sens = compute_sensitivity(session.model, session.data, base)  # the CLI's, from the cache
    costs = cost_table(session.model, base, sens.candidates, "weight_bytes")
    lo, hi = costs.cost([0] * len(costs.points)), costs.cost([len(costs.candidates) - 1] * len(costs.points))
    expected = []
    for s in configs_for_budgets(sens, costs, [lo + f * (hi - lo) for f in (0.1, 0.2)]):
        res = session.run_trial(base.with_overrides(enqueue_params(s["bits"])), profile=False)
        expected.append([res.top1, res.weight_bytes / res.fp32_bytes])
    np.testing.assert_allclose(result["fronts"]["tpe_warm"][0], expected, rtol=1e-12)
    r = run([sys.executable, "-m", "vitq.search.compare", "--trials", "2", "data.n_calib=0"], tmp_path, timeout=300)
    assert r.returncode == 2 and "empty split" in r.stderr
