"""``python -m vitq.bench --quick`` runs and reports every figure, finite and positive (no timing thresholds)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from vitq.bench import MODEL_FIGURES, OBSERVER_FIGURES, flat_figures

pytestmark = pytest.mark.slow
COUNTS = {"calib_passes_after_first"}  # a count whose goal is 0: finite and >= 0


def test_bench_quick_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "vitq.bench", "--quick", "--out", str(out)], capture_output=True,
                       text=True, timeout=1200)
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
