"""``python -m vitq.bench --quick`` runs and reports every figure, finite and positive (no timing thresholds)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from _util import run

from vitq.bench import (
    GOALS,
    MODEL_FIGURES,
    OBSERVER_FIGURES,
    SWEEP_FIGURES,
    flat_figures,
    format_table,
    goal_status,
    pair_ratios,
)

pytestmark = pytest.mark.slow
COUNTS = {"calib_passes_after_first"}  # a count whose goal is 0: finite and >= 0


def test_bench_quick_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    r = run([sys.executable, "-m", "vitq.bench", "--quick", "--models", "digits,folder", "--sections", "sweep",
             "--out", str(out)], tmp_path, timeout=1200)  # (vit_small and scaling: minutes on CI's 2 cores)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    first = {}  # the first processor's fields
    for ln in Path("/proc/cpuinfo").read_text().splitlines():
        if ":" in ln:
            first.setdefault(ln.split(":")[0].strip(), ln.split(":", 1)[1].strip())
    cpu = f"{first['model name']} (family {first['cpu family']} model {first['model']})"
    assert result["meta"]["cpu"] == cpu and f"on {cpu}, {result['meta']['threads']} threads" in r.stdout
    figures = flat_figures(result)
    for model in ("digits", "folder"):
        for name in MODEL_FIGURES:
            v = figures[f"{model}.{name}"]
            assert math.isfinite(v) and (v >= 0 if name in COUNTS else v > 0), (model, name, v)
        for name in ("trial_over_fp_eval", "quant_eval_over_fp_eval", "trial_over_quant_eval",
                     "fakequant_over_fp_forward"):  # a median of pairs: inside their quartiles
            lo, hi = figures[f"{model}.{name}_pairs_q25"], figures[f"{model}.{name}_pairs_q75"]
            assert 0 < lo <= figures[f"{model}.{name}"] <= hi and math.isfinite(hi), (model, name, lo, hi)
    for mode in ("per_tensor", "per_channel"):
        for name in OBSERVER_FIGURES:
            v = figures[f"observers.{mode}.{name}"]
            assert math.isfinite(v) and v > 0, (mode, name, v)
        for name in ("omse_over_reference_time", "kl_over_reference_time", "kl_parallel_speedup"):
            lo, hi = figures[f"observers.{mode}.{name}_pairs_q25"], figures[f"observers.{mode}.{name}_pairs_q75"]
            assert 0 < lo <= figures[f"observers.{mode}.{name}"] <= hi, (mode, name, lo, hi)
    # the sweep section ran a real CLI search: its exit code, trial count and consistent derived figures
    sweep = result["sweep"]
    assert set(SWEEP_FIGURES) <= set(sweep) and sweep["exit_code"] == 0 and sweep["n_trials"] == 8
    assert sweep["marginal_over_compute"] == pytest.approx(sweep["marginal_ms"] / sweep["compute_ms"])
    assert sweep["bookkeeping_ms"] == pytest.approx(sweep["marginal_ms"] - sweep["compute_ms"])
    assert sweep["trials_per_hour"] == pytest.approx(3.6e6 / sweep["marginal_ms"])
    assert "vit_small" not in result and "scaling" not in result  # only what was asked for
    assert "trial_over_fp_eval" in r.stdout  # the printed table
    assert result["goal_status"] == {} and "goals: not judged in --quick" in r.stdout  # too few images to judge


def test_an_unwritable_out_is_refused_before_the_bench_runs(tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "bench.json"
    r = run([sys.executable, "-m", "vitq.bench", "--quick", "--out", str(out)], tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith(f"vitq: --out: cannot create {out.parent}: "), r.stderr
    assert "[bench]" not in r.stdout  # nothing measured
    r = run([sys.executable, "-m", "vitq.bench", "--quick", "--out", str(tmp_path)], tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == (f"vitq: --out: {tmp_path} is a folder; give the JSON file's path "
                                                      f"(e.g. {tmp_path / 'bench.json'})"), r.stderr
    assert "[bench]" not in r.stdout  # (it failed only when writing, after the minutes of measuring)


def test_overrides_are_refused_when_ignored_or_bad_before_any_workload(tmp_path):
    """OVERRIDES set the config workload only: with --models leaving it out they were ignored (rc 0); a bad one
    was found only when that workload came, after the others' minutes."""
    r = run([sys.executable, "-m", "vitq.bench", "--quick", "--models", "digits", "model=digits_deep"], tmp_path,
            timeout=120)
    assert r.returncode == 2 and "error: OVERRIDES (model=digits_deep) set the config workload, which " \
                                 "--models=digits leaves out: add config to --models" in r.stderr, r.stderr
    r = run([sys.executable, "-m", "vitq.bench", "--quick", "--models", "digits,config", "--sections=",
             f"model.checkpoint={tmp_path / 'missing.pth'}"], tmp_path, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().endswith(f"vitq: model.checkpoint: file not found: "
                                                           f"{tmp_path / 'missing.pth'}"), r.stderr
    assert "[bench] digits" not in r.stdout  # refused before the first workload


def test_a_full_run_judges_every_goal():
    """Every goal names figures a full run measures; each is judged by its comparison."""
    result = {"meta": {"quick": False}, "goals": GOALS}
    for model in ("digits", "vit_small", "folder"):
        result[model] = dict.fromkeys(MODEL_FIGURES, 1.0)
    result["sweep"] = dict.fromkeys(SWEEP_FIGURES, 1.0)
    result["observers"] = {m: dict.fromkeys(OBSERVER_FIGURES, 1.0) for m in ("per_tensor", "per_channel")}
    status = goal_status(result)
    assert len(status) == 3 + 3 + 3 + 3 + 1 + 4  # trial, calib passes, fake-quant, memory ×3; sweep; observers
    assert all(s["met"] == _meets(1.0, s["goal"]) for s in status.values())
    assert "goals met:" in format_table(result)


def _meets(value: float, goal: str) -> bool:
    op, bound = goal.split()
    return {"<=": value <= float(bound), ">=": value >= float(bound), "==": value == float(bound)}[op]


def test_goal_status_expands_patterns_and_judges_each_figure():
    result = {"goals": {"a.x": "<= 1.3", "*.{p,q}": ">= 50", "b.n": "== 0"},
              "a": {"x": 1.31, "p": 50.0, "y": 1.0}, "b": {"q": 49.9, "n": 0.0}}
    assert goal_status(result) == {"a.x": {"goal": "<= 1.3", "met": False}, "a.p": {"goal": ">= 50", "met": True},
                                   "b.q": {"goal": ">= 50", "met": False}, "b.n": {"goal": "== 0", "met": True}}
    table = format_table(result)
    assert "goals met: 2 of 4" in table and "NOT MET" in table.split("a.x")[1].splitlines()[0]


def test_pair_ratios_are_numpys_median_and_quartiles_of_the_pairwise_ratios():
    num, den = [3.0, 1.0, 8.0, 2.0, 5.0, 7.0], [1.0, 2.0, 4.0, 1.0, 2.0, 2.0]
    ratios = np.array(num) / np.array(den)
    q = pair_ratios("x", num, den)
    assert q == {"x": pytest.approx(np.median(ratios)), "x_pairs_q25": pytest.approx(np.percentile(ratios, 25)),
                 "x_pairs_q75": pytest.approx(np.percentile(ratios, 75))}
    # the median of the pairs (1, 1.25, 3), not the ratio of the medians (5 / 2): each pair shares its moment
    assert pair_ratios("x", [1.0, 5.0, 6.0], [1.0, 4.0, 2.0])["x"] == 1.25
    assert pair_ratios("x", [3.0], [2.0]) == {"x": 1.5, "x_pairs_q25": 1.5, "x_pairs_q75": 1.5}  # one pair: its ratio
    with pytest.raises(ValueError, match="x: no pairs"):  # a judged figure needs a measurement
        pair_ratios("x", [], [])
    with pytest.raises(ValueError):  # a measurement without its partner
        pair_ratios("x", [1.0, 2.0], [1.0])


def test_table_shows_the_pairs_beside_their_figure_and_names_a_miss_inside_them():
    result = {"meta": {"quick": False}, "goals": {"a.x": "<= 1.5", "a.y": "<= 1.5"},
              "a": {"x": 1.55, "x_pairs_q25": 1.42, "x_pairs_q75": 1.61,  # missed, the bound between the quartiles
                    "y": 1.7, "y_pairs_q25": 1.6, "y_pairs_q75": 1.8}}  # missed outright
    table = format_table(result)
    rows = {line.split()[0]: line for line in table.splitlines() if line.startswith("a.")}
    assert set(rows) == {"a.x", "a.y"}  # the quartiles are no rows of their own
    assert "NOT MET  (pairs 1.42-1.61)" in rows["a.x"] and "(pairs 1.6-1.8)" in rows["a.y"]
    assert table.splitlines()[-1] == "goals met: 0 of 2; not met, with the goal inside their pairs' quartiles: a.x"
