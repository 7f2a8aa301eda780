"""The sweep harness end to end: Hydra grid, vitq's Optuna sweeper, MLflow runs, Pareto fronts, failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from _util import run, run_sweep, spawn, stop_group, trial_lines
from mlflow.tracking import MlflowClient

from vitq.pareto import pareto_mask
from vitq.search.space import load_search

pytestmark = pytest.mark.slow


_sweep = run_sweep


def _runs(cwd, experiment):
    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = MlflowClient().get_experiment_by_name(experiment)
    return mlflow.search_runs([exp.experiment_id], max_results=1000)


def test_bad_override_fails_with_config_error(tmp_path):
    r = _sweep(tmp_path, "attn_layer.kv_act.observer_type=MinMaxObserver")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "attn_layer.kv_act.observer_type" in r.stderr and "Did you mean 'MinmaxObserver'" in r.stderr
    r = _sweep(tmp_path, "layers.attn_qkv.bit_type.bits=1")
    assert r.returncode == 2 and "layers.attn_qkv.bit_type.bits: must be in 2..16" in r.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started


def _one_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("vitq: ")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def test_hydra_config_errors_are_one_line_rc2_before_anything_starts(tmp_path):
    """What Hydra rejects while composing (a misspelled key, a value of the wrong type, an unknown preset, an
    override it cannot parse), what it would accept and vitq ignore (a key appended with +), and a grid value
    that cannot be composed: each one line naming the key, exit code 2, no MLflow store, no trial."""
    cases = {
        ("layers.attn_qvk.bit_type.bits=4",):
            "vitq: layers.attn_qvk: unknown layers key 'attn_qvk'. Did you mean 'attn_qkv'? Valid: attn_qkv,",
        ("data.n_evl=100",): "vitq: data.n_evl: unknown data key 'n_evl'. Did you mean 'n_eval'?",
        ("+data.n_evl=100",): "vitq: data.n_evl: unknown data key 'n_evl'. Did you mean 'n_eval'?",  # Hydra's advice
        ("+model.use_emma=false",): "vitq: model.use_emma: unknown model key 'use_emma'. Did you mean 'use_ema'?",
        ("+seed=3",): "vitq: seed: unknown top-level key 'seed'. Valid: default, layers,",
        ("layers.attn_qkv.bit_type.bits=four",):
            "vitq: layers.attn_qkv.bit_type.bits: Value 'four' of type 'str' could not be converted to Integer",
        ("tracking.enabled=maybe",): "vitq: tracking.enabled: Value 'maybe' is not a valid bool",
        ("quant=int88",): "vitq: quant=int88: unknown quant option 'int88'. Did you mean 'int8'? Valid: fqvit, int8, "
                          "w4a8",
        ("hydra/sweeper=optuna",): "vitq: hydra/sweeper=optuna: unknown hydra/sweeper option 'optuna'.",
        ("calib_batch_size=64=2",): "vitq: calib_batch_size=64=2: Hydra cannot parse this override",
        ("model=timm", "model.kwargs.depth=2"):
            "vitq: model.kwargs.depth: model.kwargs has no key 'depth'; to append to your config use "
            "+model.kwargs.depth=2",
        ("-m", "layers.attn_qkv.bit_type.bits=4,four"):
            "vitq: layers.attn_qkv.bit_type.bits: Value 'four' of type 'str' could not be converted to Integer",
        ("-m", "layers.attn_qkv.bit_type.bits=4,8", "quant=int8,int88"): "vitq: quant=int88: unknown quant option",
    }
    for args, expect in cases.items():
        line = _one_line(_sweep(tmp_path, *args, timeout=300))
        assert line.startswith(expect), (args, line)
    line = _one_line(run([sys.executable, "-m", "vitq.cli", "sweep", "quant=int88"], tmp_path, timeout=300))
    assert line.startswith(cases[("quant=int88",)])
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()  # nothing was started
    r = _sweep(tmp_path, "quant=int88", env={"HYDRA_FULL_ERROR": "1"}, timeout=300)  # Hydra's own report, asked for
    assert r.returncode == 1 and "MissingConfigException" in r.stderr and "vitq: " not in r.stderr


def test_grid_sweep_parent_and_children(tmp_path):
    r = _sweep(tmp_path, "-m", "layers.attn_qkv.bit_type.bits=4,8", "study_name=grid")
    assert r.returncode == 0, r.stderr[-3000:]
    runs = _runs(tmp_path, "grid")
    parents = runs[runs["tags.vitq.role"] == "parent"]
    children = runs[runs["tags.vitq.role"] == "trial"]
    assert len(parents) == 1 and len(children) == 2
    assert set(children["tags.mlflow.parentRunId"]) == {parents["run_id"].iloc[0]}
    assert parents["status"].iloc[0] == "FINISHED" and set(children["tags.trial_number"]) == {"0", "1"}
    arts = {a.path for a in MlflowClient().list_artifacts(parents["run_id"].iloc[0], "pareto")}
    assert {"pareto/pareto_front.csv", "pareto/pareto_front.png", "pareto/pareto_front.html",
            "pareto/all_trials.csv", "pareto/configs"} <= arts
    assert "Traceback" not in r.stderr and "raised" not in r.stderr
    by_bits = children.set_index("params.layers.attn_qkv.bit_type.bits")  # the swept key is a param
    assert set(by_bits.index) == {"4", "8"}
    assert by_bits.loc["4", "metrics.weight_bytes"] < by_bits.loc["8", "metrics.weight_bytes"]
    assert by_bits["metrics.top1"].notna().all()
    assert by_bits.loc["4", "params.quant"] == "int8"  # the preset chosen
    assert json.loads(by_bits.loc["4", "tags.vitq.points"])["attn_qkv"][0] == 4  # resolved, for the reports
    params = [c for c in children.columns if c.startswith("params.") and children[c].notna().any()]
    assert len(params) <= 10  # what varies and the groups chosen, not ~140 resolved fields
    # a front config runs again as a preset: the parent's pareto/configs/trial_N.yaml put in DIR/quant/
    front = children[children["tags.pareto"] == "true"].sort_values("metrics.weight_bytes").iloc[0]
    name = f"trial_{front['tags.trial_number']}"
    got = mlflow.artifacts.download_artifacts(run_id=parents["run_id"].iloc[0],
                                              artifact_path=f"pareto/configs/{name}.yaml", dst_path=str(tmp_path))
    (tmp_path / "mine" / "quant").mkdir(parents=True)
    Path(got).rename(tmp_path / "mine" / "quant" / f"{name}.yaml")
    r = _sweep(tmp_path, "--config-dir", str(tmp_path / "mine"), f"quant={name}", "study_name=again")
    assert r.returncode == 0, r.stderr[-3000:]
    again = _runs(tmp_path, "again").iloc[0]
    assert again["params.quant"] == name and again["tags.vitq.points"] == front["tags.vitq.points"]
    for k in ("metrics.top1", "metrics.weight_bytes", "metrics.bops", "metrics.agreement"):
        assert again[k] == front[k], k


def _study(tmp_path, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def test_optuna_study_pareto_front(tmp_path):
    r = _sweep(tmp_path, "-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.n_trials=12",
               "hydra.sweeper.study_name=mp12")
    assert r.returncode == 0, r.stderr[-3000:]
    study = _study(tmp_path, "mp12")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 12
    runs = _runs(tmp_path, "mp12")
    parent = runs[runs["tags.vitq.role"] == "parent"]
    children = runs[(runs["tags.vitq.role"] == "trial") & (runs["status"] == "FINISHED")]
    assert len(parent) == 1 and len(children) == 12
    front = mlflow.artifacts.load_text(f"runs:/{parent['run_id'].iloc[0]}/pareto/pareto_front.csv")
    import io

    import pandas as pd

    front = pd.read_csv(io.StringIO(front))
    vals = children[["metrics.top1", "metrics.weight_bytes"]].to_numpy()
    # independent dominance check
    on_front = set(front["run_id"])
    for rid, (acc, size) in zip(children["run_id"], vals, strict=True):
        dominated = any((a >= acc and s <= size) and (a > acc or s < size) for a, s in vals)
        assert dominated == (rid not in on_front)
    tagged = set(children.loc[children["tags.pareto"] == "true", "run_id"])
    assert tagged == on_front
    assert pareto_mask(vals, ["maximize", "minimize"]).sum() == len(on_front)
    assert np.isfinite(front["weight_bytes"]).all()
    # trials ran in the sweeper's process: one job log, no per-job folders or Hydra files
    (sweep_dir,) = (tmp_path / "multirun").glob("*/*")
    assert not [p for p in sweep_dir.iterdir() if p.is_dir()] and (sweep_dir / "sweep.log").is_file()
    # clean MLflow runs: the searched params only (wildcards as ALL), real metric timestamps, MLflow's system tags
    spec_params = {p.name.replace("*", "ALL") for p in load_search("mixed_precision").params}
    client = MlflowClient()
    for _, row in children.iterrows():
        run = client.get_run(row["run_id"])
        assert set(run.data.params) <= spec_params | {"quant", "model", "data"} and len(run.data.params) <= 40
        assert spec_params <= set(run.data.params)
        (m,) = client.get_metric_history(row["run_id"], "top1")
        assert m.timestamp > 1.7e12 and m.value == row["metrics.top1"]
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
        assert {a.path for a in client.list_artifacts(row["run_id"])} == {"quant_config.yaml", "profile.csv"}
    assert all(t.user_attrs["metrics"]["top1"] == t.values[0] for t in complete)
    # what the user reads at the end: counts, the front as a table, where it was logged and how to open it
    out = r.stdout + r.stderr
    summary = (sweep_dir / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("study mp12: 12 complete, 0 failed") and summary[0] in out
    assert summary[1] == f"Pareto front (top1 max, weight_bytes min): {len(on_front)} of 12 trials"
    rows = [ln.split() for ln in summary[3:3 + len(on_front)]]
    front_numbers = set(children.loc[children["run_id"].isin(on_front), "tags.trial_number"].astype(int))
    assert {int(r[0]) for r in rows} == front_numbers
    assert [int(r[-3].replace(",", "")) for r in rows] == sorted(int(r[-3].replace(",", "")) for r in rows)
    exp_id = parent["experiment_id"].iloc[0]
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in summary[-2]
    assert summary[-2].endswith(f"http://127.0.0.1:5000/#/experiments/{exp_id}?workflowType=machine_learning")
    pid = parent["run_id"].iloc[0]
    assert mlflow.artifacts.load_text(f"runs:/{pid}/summary.txt").splitlines() == summary
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{pid}/pareto/pareto_front_table.json"))
    assert sorted(row[table["columns"].index("run_id")] for row in table["data"]) == sorted(on_front)
    inputs = {d.tags[0].value: d.dataset for d in client.get_run(pid).inputs.dataset_inputs}
    assert set(inputs) == {"calib", "eval"} and inputs["eval"].name == "digits:eval" and inputs["eval"].digest
    log_lines = (sweep_dir / "sweep.log").read_text().splitlines()  # trials log through Hydra's job logging
    assert len(trial_lines("\n".join(log_lines))) == 12
    assert "ExperimentalWarning" not in out and "Heartbeat of storage" not in out


def test_in_process_trials_equal_hydra_launched_ones(tmp_path):
    """The in-process path sets the sweeper's values on the composed config; Hydra's launcher composes each job
    from its override strings. The same seeded search gives the same configs and the same numbers either way."""
    out = {}
    for mode in ("true", "false"):
        cwd = tmp_path / mode
        cwd.mkdir()
        r = _sweep(cwd, "-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.n_trials=6", "hydra.sweeper.study_name=ip",
                   f"hydra.sweeper.in_process={mode}")
        assert r.returncode == 0, r.stderr[-3000:]
        runs = _runs(cwd, "ip")
        children = runs[runs["tags.vitq.role"] == "trial"].sort_values("tags.trial_number")
        configs = [mlflow.artifacts.load_text(f"runs:/{rid}/quant_config.yaml") for rid in children["run_id"]]
        baselines = children["tags.vitq.baseline"].fillna("").tolist()  # set by the first 4 trials only
        out[mode] = (configs, children["metrics.top1"].tolist(), children["params.quant"].tolist(), baselines)
        (sweep_dir,) = (cwd / "multirun").glob("*/*")
        assert (sweep_dir / "0" / ".hydra" / "overrides.yaml").exists() == (mode == "false")
    assert out["true"] == out["false"]
    assert len(set(out["true"][0])) >= 5  # the configs differ between trials
    assert out["true"][3] == ["W8A8", "W6A6", "W4A8", "W4A4", "", ""]  # a key set by a job only: the next has none


def test_failing_trial_is_recorded_and_sweep_continues(tmp_path):
    sweep_file = tmp_path / "nan.yaml"
    sweep_file.write_text(
        "study_name: nan\nsampler: random\nn_trials: 3\n"
        "baselines: [{layers.attn_qkv.bit_type.bits: 8}]\n"
        "params:\n  layers.attn_qkv.bit_type.bits: [4, 8]\n")
    r = _sweep(tmp_path, "-m", "hydra/sweeper=vitq_optuna", f"hydra.sweeper.search={sweep_file}",
               env={"VITQ_FAULTS": "nan@0"})  # trial 0 evaluates NaN images
    assert r.returncode == 1, r.stderr[-3000:]  # not every trial completed
    summary = [ln for ln in r.stderr.splitlines() if ln.startswith("vitq: ")]
    assert len(summary) == 1 and "1 trial(s) failed in study nan (first: trial 0: NonFiniteOutputError" in summary[0]
    study = _study(tmp_path, "nan")
    states = [t.state for t in study.trials]
    assert states[0] == optuna.trial.TrialState.FAIL
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3
    runs = _runs(tmp_path, "nan")
    first = runs[runs["tags.trial_number"] == "0"]
    assert list(first["status"]) == ["FAILED"]
    parent = runs[runs["tags.vitq.role"] == "parent"]
    assert list(parent["status"]) == ["FAILED"]  # the sweep did not do all it was asked
    arts = {a.path for a in MlflowClient().list_artifacts(parent["run_id"].iloc[0], "pareto")}
    assert {"pareto/pareto_front.csv", "pareto/pareto_front.png", "pareto/all_trials.csv"} <= arts


def test_grid_without_mlflow_exits_1_when_a_trial_fails(tmp_path):
    r = _sweep(tmp_path, "-m", "layers.attn_qkv.bit_type.bits=4,8", "tracking=none",
               env={"VITQ_FAULTS": "nan@0"})  # job 0 evaluates NaN images
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vitq: ")]
    assert lines[0].startswith("vitq: trial 0 failed: NonFiniteOutputError")  # as it happens; the grid goes on
    assert lines[-1].startswith("vitq: 1 trial(s) of the grid failed (first: trial 0 failed: NonFiniteOutputError")
    assert lines[-1].endswith("MLflow is off (tracking=none)") and len(lines) == 2
    assert len(trial_lines(r.stdout + r.stderr)) == 1  # job 1 ran
    assert not list(tmp_path.rglob(".vitq_failed*")) and not (tmp_path / "mlflow.db").exists()
    r = _sweep(tmp_path, "-m", "layers.attn_qkv.bit_type.bits=4,8", "tracking=none")
    assert r.returncode == 0 and "vitq: " not in r.stderr, r.stderr[-3000:]


def test_grid_job_failing_before_its_run_opens_counts(tmp_path):
    """A job whose input is refused fails before its MLflow run opens: the parent still counts it (FAILED, rc 1)."""
    r = _sweep(tmp_path, "-m", "data.n_calib=0,16", "study_name=early")
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vitq: ")]
    assert lines[0].startswith("vitq: trial 0 failed: DataError: data.n_calib=0: an empty split")
    assert lines[-1].startswith("vitq: 1 of 2 trials failed (MLflow parent run ") and len(lines) == 2
    runs = _runs(tmp_path, "early")
    parent = runs[runs["tags.vitq.role"] == "parent"]
    children = runs[runs["tags.vitq.role"] == "trial"]
    assert list(parent["status"]) == ["FAILED"] and list(children["tags.trial_number"]) == ["1"]
    assert list(children["status"]) == ["FINISHED"]
    assert not list(tmp_path.rglob(".vitq_failed*"))  # the failure lines were read once and removed


def test_kill_and_resume(tmp_path):
    args = [sys.executable, "-m", "vitq.sweep", "-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.n_trials=6",
            "hydra.sweeper.study_name=resume", "hydra.sweeper.search=bits_only"]
    proc = spawn(args, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = 0
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            seen += bool(trial_lines(line))
            if seen >= 2:
                proc.kill()
                break
        proc.wait(timeout=60)
    finally:
        stop_group(proc)
    assert seen == 2 and proc.returncode == -9  # killed mid-sweep, after its second trial
    before = _study(tmp_path, "resume")  # trial 1 may have died between its MLflow run and Optuna's record
    assert len(before.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING))) == 2
    r = run(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(trial_lines(r.stdout)) == 4  # the second run did only the rest
    study = _study(tmp_path, "resume")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6
    assert optuna.trial.TrialState.RUNNING not in states
    runs = _runs(tmp_path, "resume")
    kids = runs[runs["tags.vitq.role"] == "trial"]
    assert kids["tags.trial_number"].is_unique
    assert len(runs[runs["tags.vitq.role"] == "parent"]) == 1
    assert "RUNNING" not in set(kids["status"])
