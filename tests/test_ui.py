"""What a user sees in the MLflow UI, rendered by headless Chromium (Playwright): the experiment's training view,
the compare view of the front's runs, and the parent run's artifacts. ``VITQ_SCREENSHOTS=DIR`` keeps the pictures
(docs/img holds the ones in the docs)."""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
from pathlib import Path

import mlflow
import pytest
from _util import mlflow_server, run_sweep
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium); "
                                             "Playwright drives the system browser, nothing is downloaded")
def test_mlflow_ui_shows_the_front(tmp_path):
    from playwright.sync_api import sync_playwright

    r = run_sweep(tmp_path, "-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.n_trials=4",
                  "hydra.sweeper.study_name=ui")
    assert r.returncode == 0, r.stderr[-3000:]
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(db)
    client = MlflowClient()
    exp = client.get_experiment_by_name("ui")
    runs = mlflow.search_runs([exp.experiment_id])
    parent = runs.loc[runs["tags.vitq.role"] == "parent", "run_id"].iloc[0]
    front = runs.loc[runs["tags.pareto"] == "true", "run_id"].tolist()
    assert len(front) >= 2
    keep = Path(os.environ["VITQ_SCREENSHOTS"]) if os.environ.get("VITQ_SCREENSHOTS") else tmp_path
    shots = {}
    with mlflow_server(tmp_path, db) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        try:
            # the URL the sweep's summary prints opens MLflow 3's training view (without it: the GenAI overview)
            page.goto(f"{url}/#/experiments/{exp.experiment_id}?workflowType=machine_learning")
            page.get_by_text("sweep-ui").first.wait_for(timeout=60_000)
            page.wait_for_timeout(3000)
            assert page.get_by_text("Judges", exact=True).count() == 0  # GenAI's navigation is not shown
            closer = page.get_by_role("button", name="Close")
            if closer.count():  # MLflow's assistant panel: out of the picture
                closer.first.click()
            page.get_by_text("5 matching runs").first.wait_for(timeout=10_000)  # the parent and its 4 trials
            shots["runs"] = keep / "mlflow_runs.png"
            page.screenshot(path=shots["runs"])
            # the compare view of the front's runs: the searched params against top1 and weight_bytes
            q = urllib.parse.urlencode({"runs": json.dumps(front), "experiments": json.dumps([exp.experiment_id]),
                                        "workflowType": "machine_learning"})
            page.goto(f"{url}/#/compare-runs?{q}")
            page.get_by_text("weight_bytes").first.wait_for(timeout=60_000)
            page.wait_for_timeout(3000)
            shots["compare"] = keep / "mlflow_compare_front.png"
            page.screenshot(path=shots["compare"], full_page=True)
            assert page.get_by_text("top1").count() and page.get_by_text("layers.attn_qkv.bit_type.bits").count()
            # the parent run's artifacts: the front as CSV/PNG/HTML and its configs
            page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{parent}/artifacts?workflowType=machine_learning")
            page.get_by_text("pareto", exact=True).first.wait_for(timeout=60_000)
            page.get_by_text("pareto", exact=True).first.click()
            page.get_by_text("pareto_front.png").first.click()
            page.wait_for_timeout(3000)
            shots["artifacts"] = keep / "mlflow_parent_artifacts.png"
            page.screenshot(path=shots["artifacts"])
            assert page.get_by_text("pareto_front.csv").count() and page.get_by_text("configs").count()
        finally:
            browser.close()
    for name, path in shots.items():
        assert path.stat().st_size > 20_000, name  # a rendered page, not a blank one
