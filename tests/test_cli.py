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


def test_reference_cli_writes_the_cached_reference_or_refuses_its_out_before_training(tmp_path, reference):
    """DVC's first stage. A --out it could not write failed with a traceback (rc 1) after the training."""
    import torch

    model, meta = reference
    out = tmp_path / "artifacts" / "reference.pt"
    r = run([sys.executable, "-m", "vitq.reference", "--out", str(out)], tmp_path, timeout=600)
    assert r.returncode == 0 and f"checkpoint -> {out}" in r.stdout, r.stderr[-2000:]
    assert f"held-out top-1 {100 * meta['top1']:.2f} %" in r.stdout
    blob = torch.load(out, weights_only=True)
    assert blob["meta"] == meta and blob["state_dict"].keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in blob["state_dict"].items())
    assert [p.name for p in out.parent.iterdir()] == ["reference.pt"]  # (no temporary file left)
    (tmp_path / "a_file").write_text("")
    for bad, says in ((tmp_path / "a_file" / "r.pt", f"vitq: --out: cannot create {tmp_path / 'a_file'}: "),
                      (tmp_path, f"vitq: --out: {tmp_path} is a folder; give the checkpoint's path")):
        r = run([sys.executable, "-m", "vitq.reference", "--out", str(bad)], tmp_path, timeout=600)
        assert r.returncode == 2 and r.stderr.strip().startswith(says) and "Traceback" not in r.stderr, r.stderr
        assert r.stdout == ""  # refused before loading or training anything


def test_report_cli(tmp_path):
    r = run([sys.executable, "-m", "vitq.report", "export", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}",
             "--study", "nope", "--out", str(tmp_path / "x")], tmp_path, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vitq: ")]
    assert r.returncode == 2 and len(lines) == 1 and "no study (experiment) 'nope'" in lines[0]
    r = run([sys.executable, "-m", "vitq.report", "notebook", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}",
             "--study", "nope", "--out", str(tmp_path / "nb")], tmp_path, timeout=300)  # checked before the kernel
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("vitq: tracking store sqlite:///") \
        and "Traceback" not in r.stderr, r.stderr[-2000:]
    (tmp_path / "a_file").write_text("")
    r = run([sys.executable, "-m", "vitq.report", "export", "--study", "nope", "--out", str(tmp_path / "a_file" / "x")],
            tmp_path, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == f"vitq: --out: cannot create {tmp_path / 'a_file' / 'x'}: Not a " \
        "directory", r.stderr[-2000:]
    for budgets in ("nan", "100.7", "0.5x", "nanx", "x", "8X"):  # nan: a traceback (rc 1); 100.7: a key named 100 B
        r = run([sys.executable, "-m", "vitq.report", "export", "--study", "nope", "--out", str(tmp_path / "x"),
                 "--size-budgets", f"150000,{budgets}"], tmp_path, timeout=300)
        assert r.returncode == 2 and r.stderr.strip().endswith(
            f"error: --size-budgets: {budgets}: a budget is a whole number of bytes > 0, or a compression such as 8x "
            "(at least 1x)"), r.stderr[-2000:]
    r = run([sys.executable, "-m", "vitq.report", "export", "--study", "nope", "--out", str(tmp_path / "x"),
             "--size-budgets", "150000,8x,1.5x"], tmp_path, timeout=300)  # both forms pass; the study is missing
    assert r.returncode == 2 and "no study (experiment) 'nope'" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    r = run([sys.executable, "-m", "vitq.report", "presets"], tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FQ-ViT: PTF + LIS (quant=fqvit)" in r.stdout and "MinMax W8A8, 4-bit attention maps" in r.stdout
    r = run([sys.executable, "-m", "vitq.report", "presets", "model.name=nope_vit"], tmp_path, timeout=300)
    assert r.returncode == 2 and "unknown timm model 'nope_vit'" in r.stderr


def test_compare_matched_budgets_table(tmp_path):
    """``--matched`` on the digits reference: every strategy at every budget, within it, with standard errors; the
    uniform rows are the uniform configs (a full-set trial of W8A8 averages its two splits)."""
    r = run([sys.executable, "-m", "vitq.search.compare", "--matched", "--trials", "3", "--search-images", "100",
             "--out", str(tmp_path / "cmp")], tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    t = pd.read_csv(tmp_path / "cmp" / "budget_comparison.csv")
    result = json.loads((tmp_path / "cmp" / "budget_comparison.json").read_text())
    n_test, n_search = result["n_test"], result["n_search"]
    assert n_search == 100 and n_test == 397 - 100
    assert list(dict.fromkeys(t["budget"])) == ["W8A8", "W6A8", "W5A8", "W4A8", "W3A8", "W4A4"]
    for name, bits in {"W8A8": 8, "W6A8": 6, "W5A8": 5, "W4A8": 4, "W3A8": 3, "W4A4": 4}.items():
        g = t[t["budget"] == name].set_index("strategy")
        assert g.loc[f"uniform {name}", "mean_weight_bits"] == bits
        assert {"per-point solver (drop_loss)", "per-point solver (grad_score)",
                "per-block solver (grad_score)"} <= set(g.index)
        metric = g["metric"].iloc[0]
        assert (g[metric] <= g["budget_value"] + 1e-6).all()  # every pick within the budget
        assert (g.drop(index=f"uniform {name}")["mean_act_bits"] >= 4).all()
        assert g.loc["per-point solver (drop_loss)", "vs_per_point"] == 0
        p = g["test_top1"]
        np.testing.assert_allclose(g["test_se"], np.sqrt(p * (1 - p) / (n_test - 1)), rtol=1e-9)
    from vitq import load_config_from_yaml
    from vitq.paths import PRESETS_DIR
    from vitq.session import Session
    from vitq.sweep import compose

    w8a8 = t[(t["budget"] == "W8A8") & (t["strategy"] == "uniform W8A8")].iloc[0]
    full = Session.from_config(compose([])).run_trial(load_config_from_yaml(PRESETS_DIR / "int8.yaml"), profile=False)
    assert full.top1 == pytest.approx((n_test * w8a8["test_top1"] + n_search * w8a8["search_top1"]) / 397, abs=1e-9)
    assert "budget W4A4: bops <=" in r.stdout and "per-block solver (grad_score)" in r.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--block-drops"], "--block-drops does not apply without --matched"),
    (["--search-images", "100"], "--search-images does not apply without --matched"),
    (["--matched", "--seeds", "2"], "--seeds does not apply with --matched"),
    (["--matched", "--min-act-bits", "9"], "--min-act-bits: must be in 2..8 (the widest candidate), got 9")])
def test_compare_refuses_a_flag_of_the_other_mode_or_out_of_range(capsys, args, message):
    from vitq.search.compare import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["sensitivity", "--budgets", "1e9", "tracking.uri=sqlite:///z.db"],
     "tracking.uri: vitq sensitivity does not read it; to log the table, give --tracking-uri (and --study)"),
    (["sensitivity", "--budgets", "1e9", "study_name=mine"],
     "study_name: vitq sensitivity does not read it; --study names the MLflow experiment of --tracking-uri"),
    (["sensitivity", "--budgets", "1e9", "trial_number=3"],
     "trial_number: vitq sensitivity does not read it: it numbers the trials of a sweep"),
    (["compare", "export_dir=out"], "export_dir: vitq compare does not read it; its results go to --out"),
    (["compare", "hydra.run.dir=x"], "hydra.run.dir: vitq compare does not read it: it sets Hydra's own run folders"),
    (["bench", "--quick", "device=cpu"], "device: vitq bench does not read it; give --device"),
    (["bench", "--quick", "blocks.0.layers.attn_qkv.bit_type.bits=4"],
     "blocks.0.layers.attn_qkv.bit_type.bits: vitq bench does not read it; the bench times its own configs"),
    (["bench", "--quick", "calib_max_values=null"], "calib_max_values: vitq bench does not read it; the bench "
                                                    "calibrates at its own settings"),
    (["report", "presets", "quant=w4a8"], "quant: vitq report presets does not read it; each of its recipes sets "
                                          "the whole quant config"),
    (["report", "presets", "tracking=none"], "tracking: vitq report presets does not read it: it sets how a sweep "
                                             "logs to MLflow")])
def test_sweep_settings_a_cli_does_not_read_are_refused(capsys, argv, message):
    """Each ran with rc 0 on a run without it: no MLflow run logged, the recipe's quant config, the --device's."""
    from vitq.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {message}" in err and err.startswith(f"usage: vitq {argv[0]} ")


def test_with_modelopt_without_the_extra_prints_the_pip_command(tmp_path):
    code = ("import runpy, sys; sys.modules['modelopt'] = None; sys.argv = ['compare', '--matched', '--with-modelopt'];"
            " runpy.run_module('vitq.search.compare', run_name='__main__')")  # as if ModelOpt were not installed
    r = run([sys.executable, "-c", code], tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "vitq: --with-modelopt needs NVIDIA ModelOpt: pip install 'vitq[compare]'  (installs nvidia-modelopt and "
        "requests)"]


def test_compare_with_modelopt_beside_vitq(tmp_path):
    """ModelOpt's auto_quantize at the weight budgets, on the same test images (the suite does not install it)."""
    import importlib.util

    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("NVIDIA ModelOpt is not installed (pip install 'vitq[compare]'); its rows cannot run")
    r = run([sys.executable, "-m", "vitq.search.compare", "--matched", "--with-modelopt", "--trials", "2",
             "--search-images", "100", "--out", str(tmp_path / "cmp")], tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    t = pd.read_csv(tmp_path / "cmp" / "budget_comparison.csv")
    mo = t[t["strategy"].str.startswith("ModelOpt")].set_index("budget")
    assert list(mo.index) == ["W8A8", "W6A8", "W5A8", "W4A8", "W3A8"]  # weight budgets: not W4A4 (BOPs)
    assert "cannot be lower than the num_bits" in mo.loc["W3A8", "infeasible"]  # W4 is its narrowest format
    ok = mo.drop(index="W3A8")
    assert ((ok["test_top1"] > 0.9) & (ok["seconds"] > 0)).all()
    from vitq.search.modelopt_compare import effective_bits
    from vitq.session import Session
    from vitq.sweep import compose

    model = Session.from_config(compose([])).model
    for name, bits in {"W8A8": 8, "W6A8": 6, "W5A8": 5, "W4A8": 4}.items():
        assert ok.loc[name, "effective_bits"] <= effective_bits(model, bits) + 1e-9


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
    from vitq.search.sensitivity import (
        compute_sensitivity,
        configs_for_budgets,
        cost_table,
        enqueue_params,
        session_settings,
    )
    from vitq.session import Session
    from vitq.sweep import compose

    session = Session.from_config(compose([]))
    base = load_config_from_yaml(PRESETS_DIR / "int8.yaml")
    sens = compute_sensitivity(session.model, session.data, base, **session_settings(session))  # the CLI's (cached)
    costs = cost_table(session.model, base, sens.candidates, "weight_bytes")
    lo, hi = costs.cost([0] * len(costs.items)), costs.cost([len(costs.candidates) - 1] * len(costs.items))
    expected = []
    for s in configs_for_budgets(sens, costs, [lo + f * (hi - lo) for f in (0.1, 0.2)]):
        res = session.run_trial(base.with_overrides(enqueue_params(s["bits"])), profile=False)
        expected.append([res.top1, res.weight_bytes / res.fp32_bytes])
    np.testing.assert_allclose(result["fronts"]["tpe_warm"][0], expected, rtol=1e-12)
    r = run([sys.executable, "-m", "vitq.search.compare", "--trials", "2", "data.n_calib=0"], tmp_path, timeout=300)
    assert r.returncode == 2 and "empty split" in r.stderr
    r = run([sys.executable, "-m", "vitq.search.compare", "--trials", "0"], tmp_path, timeout=300)
    assert r.returncode == 2 and "--trials: must be >= 1, got 0" in r.stderr
    (tmp_path / "a_file").write_text("")
    r = run([sys.executable, "-m", "vitq.search.compare", "--trials", "2", "--out", str(tmp_path / "a_file" / "x")],
            tmp_path, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == f"vitq: --out: cannot create {tmp_path / 'a_file' / 'x'}: Not " \
        "a directory", r.stderr[-2000:]
    r = run([sys.executable, "-m", "vitq.search.compare", "--matched", "--trials", "2", "--search-images", "397"],
            tmp_path, timeout=300)  # (the digits' 397 evaluation images: none left to test on)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "vitq: --search-images=397: the evaluation set has 397 images, and the search images must leave some to test "
        "on (fewer, or a larger data.n_eval)"), r.stderr[-2000:]
