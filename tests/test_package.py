"""The built wheel carries conf/, sweeps/ and the notebook, and runs from anywhere; the ``vitq`` command."""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
from _util import run, trial_lines

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_wheel_carries_configs_and_runs_a_trial_outside_the_checkout(tmp_path):
    r = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
             str(tmp_path / "dist"), str(REPO)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("vitq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"vitq/conf/config.yaml", "vitq/conf/quant/int8.yaml", "vitq/sweeps/mixed_precision.yaml",
            "vitq/notebooks/pareto_analysis.ipynb", "hydra_plugins/vitq_sweeper/vitq_sweeper.py"} <= names
    assert "vitq = vitq.cli:main" in zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    site = tmp_path / "site"
    r = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PYTHONPATH": str(site)}  # before the checkout's editable install
    probe = run([sys.executable, "-c", "import json, vitq.paths as p; print(json.dumps([str(p.CONF_DIR), "
                 "str(p.SWEEPS_DIR), str(p.NOTEBOOK)]))"], work, env)
    conf, sweeps, notebook = json.loads(probe.stdout)
    assert Path(conf).is_relative_to(site) and Path(sweeps).is_relative_to(site) and Path(notebook).is_file()
    trial = run([sys.executable, "-m", "vitq.cli", "sweep", "tracking=none", "quant=w4a8"], work, env)
    assert trial.returncode == 0, trial.stderr[-2000:]
    assert len(trial_lines(trial.stdout)) == 1
    (metrics,) = work.glob("outputs/*/*/metrics.json")
    assert json.loads(metrics.read_text())["mean_weight_bits"] == pytest.approx(4.0, abs=0.5)


def test_vitq_command(tmp_path):
    exe = shutil.which("vitq", path=str(Path(sys.executable).parent))
    assert exe is not None, "the vitq console script is not installed (pip install -e .)"
    r = run([exe, "--help"], tmp_path)
    assert r.returncode == 0 and "sweep" in r.stdout and "bench" in r.stdout
    r = run([exe, "--version"], tmp_path)
    from importlib.metadata import version

    assert r.returncode == 0 and r.stdout.startswith(f"vitq {version('vitq')} (torch {version('torch')}, timm ")
    bad = run([exe, "swep"], tmp_path)
    assert bad.returncode == 2 and "unknown command 'swep'" in bad.stderr
    for name in ("report", "sensitivity", "compare", "bench"):  # usage names the command the user typed
        r = run([exe, name, "--help"], tmp_path)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: vitq {name} "), r.stdout[:200]
    r = run([sys.executable, "-m", "vitq.report", "--help"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m vitq.report "), r.stdout[:200]
