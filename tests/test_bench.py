"""``python -m vitq.bench --quick`` runs and reports every figure, finite and positive (no timing thresholds)."""

from __future__ import annotations

import json
import math
import sys

import pytest
from _util import run

from vitq.bench import MODEL_FIGURES, OBSERVER_FIGURES, flat_figures, format_table, goal_status

pytestmark = pytest.mark.slow
COUNTS = {"calib_passes_after_first"}  # a count whose goal is 0: finite and >= 0


def test_bench_quick_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    r = run([sys.executable, "-m", "vitq.bench", "--quick", "--out", str(out)], tmp_path, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    figures = flat_figures(result)
    for model in ("digits", "vit_small"):
        for name in MODEL_FIGURES:
            v = figures[f"{model}.{name}"]
            assert math.isfinite(v) and (v >= 0 if name in COUNTS else v > 0), (model, name, v)
    for mode in ("per_tensor", "per_channel"):
        for name in OBSERVER_FIGURES:
            v = figures[f"observers.{mode}.{name}"]
            assert math.isfinite(v) and v > 0, (mode, name, v)
    assert "trial_over_fp_eval" in r.stdout  # the printed table
    status = result["goal_status"]  # every goal judged, on the figures this run measured
    assert set(status) == set(goal_status(result)) and len(status) == 18
    assert all(status[k]["met"] == _meets(figures[k], status[k]["goal"]) for k in status)
    assert f"goals met: {sum(s['met'] for s in status.values())} of 18" in r.stdout


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
