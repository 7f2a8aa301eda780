"""Reports on finished studies, read back from MLflow: trials, Pareto configs, front metrics and figures.

Used by ``notebooks/pareto_analysis.ipynb`` and the DVC pipeline::

    python -m vitq.report export   --tracking-uri sqlite:///mlflow.db --study mixed_precision --out artifacts/sweep
    python -m vitq.report notebook --tracking-uri sqlite:///mlflow.db --study mixed_precision --out reports/
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from vitq.pareto import hypervolume_2d, pareto_mask
from vitq.paths import NOTEBOOK, FolderError, output_folder
from vitq.quant.config import POINTS, WEIGHT_POINTS, ConfigError
from vitq.redact import redact, say
from vitq.tracking import DEFAULT_OBJECTIVES, resolve_uri

__all__ = ["ReportError", "SizeBudget", "Study", "front_metrics", "load_study", "observer_table", "pareto_configs",
           "point_bits", "points", "sensitivity_table"]



class ReportError(ValueError):
    """The tracking store lacks what a report needs (no such study, no finished trials)."""


@dataclass
class Study:
    """One study's finished trials (one row per MLflow child run) and its parent run."""

    name: str
    parent_id: str
    objectives: dict[str, str]
    trials: pd.DataFrame

    @property
    def front(self) -> pd.DataFrame:
        return self.trials[self.trials["pareto"]]


def points(trials: pd.DataFrame) -> pd.DataFrame:
    """Per trial (rows) and point: resolved ``<point>.bits`` (NaN when disabled), ``.observer`` and ``.alpha``, read
    from each run's ``vitq.points`` tag (a run logged without it gives NaN)."""
    rows = []
    for raw in trials.get("tags.vitq.points", pd.Series([None] * len(trials), index=trials.index)):
        summary = json.loads(raw) if isinstance(raw, str) else {}
        row = {}
        for p in POINTS:
            bits, observer, alpha = summary.get(p, (None, None, None))
            row.update({f"{p}.bits": bits, f"{p}.observer": observer, f"{p}.alpha": alpha})
        rows.append(row)
    out = pd.DataFrame(rows, index=trials.index)
    for p in POINTS:
        out[f"{p}.bits"] = pd.to_numeric(out[f"{p}.bits"], errors="coerce")
        out[f"{p}.alpha"] = pd.to_numeric(out[f"{p}.alpha"], errors="coerce")
    return out


def load_study(uri: str | None, study: str) -> Study:
    """The latest sweep (parent run) of ``study`` and its finished trials, with the Pareto mask recomputed."""
    uri = resolve_uri(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(study)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"tracking store {redact(uri)}: no study (experiment) {study!r}; found {names}")
    parents = client.search_runs([exp.experiment_id], "tags.`vitq.role` = 'parent'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise ReportError(f"study {study!r} in {redact(uri)}: no sweep (parent run) found")
    parent = parents[0]
    raw = parent.data.params.get("objectives")
    objectives = ast.literal_eval(raw) if raw else dict(DEFAULT_OBJECTIVES)
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                              max_results=50000)
    cols = [f"metrics.{k}" for k in objectives]
    if len(runs):
        runs = runs[runs["status"] == "FINISHED"]
        runs = runs.dropna(subset=[c for c in cols if c in runs.columns])
    if len(runs) == 0 or not all(c in runs.columns for c in cols):
        raise ReportError(f"study {study!r} in {redact(uri)}: no finished trials with metrics {list(objectives)}")
    runs = runs.reset_index(drop=True)
    runs["pareto"] = pareto_mask(runs[cols].to_numpy(), list(objectives.values()))
    runs["trial_number"] = pd.to_numeric(runs.get("tags.trial_number"), errors="coerce")
    runs["study"] = study
    runs["baseline"] = [baseline_label(r) for _, r in runs.iterrows()]
    return Study(study, parent.info.run_id, objectives, runs)


def point_bits(trials: pd.DataFrame) -> pd.DataFrame:
    """Bits of every quantization point (columns) per trial (rows); disabled points are NaN."""
    pts = points(trials)
    return pd.DataFrame({p: pts[f"{p}.bits"] for p in POINTS}, index=trials.index)


def baseline_label(row: pd.Series) -> str:
    """The name an enqueued baseline was logged under (``W8A8``, ``int8``), else ''."""
    v = row.get("tags.vitq.baseline")
    return v if isinstance(v, str) else ""


def pareto_configs(study: Study) -> pd.DataFrame:
    """The Pareto configs: objectives, then per point its bits, observer and alpha, sorted by the 2nd objective."""
    front = study.front
    table = pd.DataFrame({"run_id": front["run_id"], "trial_number": front["trial_number"]})
    for k in study.objectives:
        table[k] = front[f"metrics.{k}"]
    pts = points(front)
    for p in POINTS:
        for f in ("bits", "observer", "alpha"):
            table[f"{p}.{f}"] = pts[f"{p}.{f}"]
    return table.sort_values(list(study.objectives)[-1]).reset_index(drop=True)


MIN_TRIALS = 3  # a sensitivity or observer mean from fewer trials is hidden


def sensitivity_table(trials: pd.DataFrame, metric: str = "top1", min_n: int = MIN_TRIALS) -> pd.DataFrame:
    """Mean ``metric`` per (point, bits) across trials and ``n``, the number of trials it averages: how accuracy
    follows one point's width. Means of fewer than ``min_n`` trials are left out."""
    bits = point_bits(trials)
    rows = []
    for p in POINTS:
        for b, grp in trials.groupby(bits[p]):
            rows.append({"point": p, "bits": int(b), "mean": grp[f"metrics.{metric}"].mean(), "n": len(grp)})
    table = pd.DataFrame(rows, columns=["point", "bits", "mean", "n"])
    return table[table["n"] >= min_n].reset_index(drop=True)


def observer_table(trials: pd.DataFrame, metric: str = "top1",
                   min_n: int = MIN_TRIALS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean ``metric`` per activation point (rows) and observer (columns), and the number of trials behind each
    mean; means of fewer than ``min_n`` trials are NaN."""
    means, counts = {}, {}
    pts = points(trials)
    for p in POINTS:
        if p in WEIGHT_POINTS:
            continue
        obs = pts[f"{p}.observer"]
        if obs.notna().any():
            g = trials.groupby(obs)[f"metrics.{metric}"]
            means[p], counts[p] = g.mean(), g.size()
    mean, n = pd.DataFrame(means).T, pd.DataFrame(counts).T.fillna(0).astype(int)
    return mean.where(n >= min_n), n


@dataclass(frozen=True)
class SizeBudget:
    """A weight-size budget: whole bytes (``150000``), or a compression over the model's FP32 weights (``8x``: at
    most an eighth of their bytes), which fits any model."""

    bytes: int | None = None
    ratio: float | None = None

    RULE = "a budget is a whole number of bytes > 0, or a compression such as 8x (at least 1x)"

    @classmethod
    def parse(cls, text: str) -> SizeBudget:
        """ValueError with :attr:`RULE` unless ``text`` is one of the two forms."""
        ratio = text.endswith("x")
        try:
            v = float(text[:-1] if ratio else text)
        except ValueError:
            v = math.nan
        if ratio and math.isfinite(v) and v >= 1:
            return cls(ratio=v)
        if not ratio and math.isfinite(v) and v > 0 and v == int(v):
            return cls(bytes=int(v))
        raise ValueError(cls.RULE)

    @property
    def key(self) -> str:
        return f"best_top1_at_{self.bytes}B" if self.ratio is None else f"best_top1_at_{self.ratio:g}x"

    def fits(self, trials: pd.DataFrame) -> pd.Series:
        """Which trials are within the budget."""
        if self.ratio is None:
            return trials["metrics.weight_bytes"] <= self.bytes
        return trials["metrics.compression"] >= self.ratio


def front_metrics(study: Study, size_budgets: list[SizeBudget]) -> dict[str, float | None]:
    """Best top-1 within each weight-size budget (None where no trial fits) and the front's normalized
    hypervolume.

    The hypervolume is over (top-1, weight bytes / FP32 bytes) up to the reference point (0, 1): 1.0 would
    be 100 % top-1 at zero size.
    """
    t = study.trials
    lacking = [m for m in ("top1", "weight_bytes", "fp32_bytes", "compression") if f"metrics.{m}" not in t]
    if lacking:  # (a study of another tool or version: no size to measure budgets and the hypervolume against)
        raise ReportError(f"study {study.name!r}: its trials have no metric {', '.join(lacking)}")
    out: dict[str, float | None] = {"n_trials": float(len(t)), "pareto_size": float(t["pareto"].sum()),
                                    "best_top1": float(t["metrics.top1"].max())}
    for b in size_budgets:
        ok = t[b.fits(t)]
        out[b.key] = float(ok["metrics.top1"].max()) if len(ok) else None
    fp32 = float(t["metrics.fp32_bytes"].max())
    pts = np.stack([t["metrics.top1"].to_numpy(), t["metrics.weight_bytes"].to_numpy() / fp32], axis=1)
    out["hypervolume"] = hypervolume_2d(pts, ["maximize", "minimize"], np.array([0.0, 1.0]))
    return out


# -------------------------------------------------------------------------------------------- CLI
def export(uri: str | None, study: str, out: Path, size_budgets: list[SizeBudget]) -> dict[str, float | None]:
    """Write ``pareto_front.csv`` (the parent run's own artifact), ``all_trials.csv`` and ``metrics.json``."""
    s = load_study(uri, study)
    out.mkdir(parents=True, exist_ok=True)
    try:
        text = mlflow.artifacts.load_text(f"runs:/{s.parent_id}/pareto/pareto_front.csv")
    except Exception as e:  # noqa: BLE001 - a parent without a front is a report error, not a crash
        raise ReportError(f"study {study!r}: the sweep's parent run has no pareto/pareto_front.csv ({e})") from None
    (out / "pareto_front.csv").write_text(text)
    cols = ["run_id", "trial_number", "pareto", "baseline"] + [c for c in s.trials.columns if c.startswith("metrics.")]
    s.trials[cols].rename(columns=lambda c: c.removeprefix("metrics.")).sort_values("trial_number").to_csv(
        out / "all_trials.csv", index=False)
    metrics = front_metrics(s, size_budgets)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    """``values`` in ``os.environ`` (so in the processes started meanwhile), then the environment as it was."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_notebook(uri: str | None, studies: list[str], out: Path, timeout: int = 600) -> Path:
    """Execute the Pareto notebook headless (papermill) and render it to HTML; returns the HTML path. A URI with a
    password reaches the kernel as ``MLFLOW_TRACKING_URI``: the executed notebook and its HTML hold no secret."""
    try:
        import nbformat
        import papermill as pm
        from nbconvert import HTMLExporter
    except ImportError as e:
        raise ReportError(f"the notebook report needs the [report] extra ({e.name} is missing): "
                          "pip install 'vitq[report]'") from None

    from jupyter_client.manager import AsyncKernelManager

    for study in studies:  # a missing study or one without finished trials: one line here, not a notebook traceback
        load_study(uri, study)
    out.mkdir(parents=True, exist_ok=True)
    executed = out / "pareto_analysis.ipynb"
    with tempfile.TemporaryDirectory(prefix="vitq-kernel-") as sockets:

        class LocalKernel(AsyncKernelManager):
            """The kernel on Unix sockets in a private folder (no TCP port: nothing on the network to read)."""

            def __init__(self, **kwargs: Any) -> None:
                super().__init__(transport="ipc", ip=str(Path(sockets) / "kernel"), **kwargs)

        uri = resolve_uri(uri)
        given = uri if redact(uri) == uri else None  # a password reaches the kernel by its environment, not the file
        with _environ(MLFLOW_TRACKING_URI=uri):
            pm.execute_notebook(str(NOTEBOOK), str(executed), parameters={
                "tracking_uri": given, "studies": ",".join(studies), "output_dir": str(out.resolve())},
                progress_bar=False, execution_timeout=timeout, kernel_name="python3", kernel_manager_class=LocalKernel)
    html, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    path = out / "pareto_analysis.html"
    path.write_text(html)
    return path


PRESET_RECIPES: dict[str, list[str]] = {
    "MinMax W8A8 (per-tensor uint8 activations)": [
        "quant=fqvit", "residual_layer.residual1.calibration_mode=layer_wise",
        "residual_layer.residual2.calibration_mode=layer_wise", "attn_layer.intSoft.quantization_method=Uniform",
        "attn_layer.intSoft.bit_type.bits=8"],
    "MinMax W8A8, 4-bit attention maps": [
        "quant=fqvit", "residual_layer.residual1.calibration_mode=layer_wise",
        "residual_layer.residual2.calibration_mode=layer_wise", "attn_layer.intSoft.quantization_method=Uniform",
        "attn_layer.intSoft.bit_type.bits=4"],
    "FQ-ViT: PTF + LIS (quant=fqvit)": ["quant=fqvit"],
    "int8 preset (Percentile, per channel)": ["quant=int8"],
}


def presets_table(overrides: list[str]) -> pd.DataFrame:
    """Each recipe of :data:`PRESET_RECIPES` as one trial on the model/data of ``overrides``."""
    from vitq.sweep import compose, session_of

    rows = []
    for name, recipe in PRESET_RECIPES.items():
        ov = [*overrides, *recipe]
        qcfg, session = session_of(compose(ov), ov)
        r = session.run_trial(qcfg, profile=False)
        rows.append({"recipe": name, "top1": r.top1, "fp_top1": r.fp_top1, "drop": r.top1_drop,
                     "weight_bytes": r.weight_bytes, "mean_act_bits": r.mean_act_bits, "n_eval": r.n_eval,
                     "stderr": float(np.sqrt(r.top1 * (1 - r.top1) / r.n_eval))})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None, prog: str = "python -m vitq.report") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("export", "notebook"):
        p = sub.add_parser(name)
        p.add_argument("--tracking-uri", default=None, help="MLflow store (default sqlite:///./mlflow.db)")
        p.add_argument("--study", required=True, help="study (MLflow experiment) name; comma-separated for notebook")
        p.add_argument("--out", required=True, type=Path)
        if name == "export":
            p.add_argument("--size-budgets", default="100000,150000,200000",
                           help="comma-separated weight-size budgets: bytes, or compressions over the FP32 weights "
                                "(8x)")
    p = sub.add_parser("presets", help="FQ-ViT (PTF + LIS) against MinMax W8A8 and 4-bit attention maps")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDES", help="model=, data=, device= (the sweep's)")
    args = ap.parse_args(argv)
    if args.cmd == "export":
        budgets = []
        for text in filter(None, (b.strip() for b in args.size_budgets.split(","))):
            try:
                budgets.append(SizeBudget.parse(text))
            except ValueError as e:
                ap.error(f"--size-budgets: {text}: {e}")
    if args.cmd == "presets":
        from vitq.sweep import QUANT_KEYS, refuse_unread

        try:
            refuse_unread(args.overrides, "vitq report presets",
                          dict.fromkeys(QUANT_KEYS, "each of its recipes sets the whole quant config"))
        except ConfigError as e:
            ap.error(str(e))
    if args.cmd in ("export", "notebook"):
        try:
            output_folder(args.out, "--out")
        except FolderError as e:
            say(e)
            return 2
    try:
        if args.cmd == "presets":
            from vitq.session import SessionError

            try:
                table = presets_table(args.overrides)
            except SessionError as e:
                say(e)
                return 2
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        elif args.cmd == "export":
            print(json.dumps(export(args.tracking_uri, args.study, args.out, budgets), indent=2))
        else:
            print(f"[vitq.report] {run_notebook(args.tracking_uri, args.study.split(','), args.out)}")
    except ReportError as e:
        say(e)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
