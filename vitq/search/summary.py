"""The lines a sweep ends with: trial counts, the Pareto front as a small table, the best trial within the search's
constraint, where the runs were logged and the command that opens them."""

from __future__ import annotations

import shlex
from typing import Any

import optuna

from vitq.pareto import pareto_mask
from vitq.redact import redact
from vitq.search.space import SearchSpec

__all__ = ["format_metric", "sweep_summary"]

TrialState = optuna.trial.TrialState
_EXTRA = ("mean_weight_bits", "mean_act_bits")
MAX_ROWS = 12


def format_metric(name: str, value: float) -> str:
    if name in ("top1", "top5", "agreement", "top1_drop"):
        return f"{100 * value:.2f} %"
    if name in ("weight_bytes", "bops"):
        return f"{value:,.0f}" if name == "weight_bytes" else f"{value:.3e}"
    if name.startswith("mean_") and name.endswith("_bits"):
        return f"{value:.2f}"
    return f"{value:.4g}"


def _table(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
    cells = [["trial", *cols]] + [[str(r["trial"]), *(format_metric(c, r[c]) for c in cols)] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["  " + "  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]


def sweep_summary(study: optuna.Study, spec: SearchSpec, *, tracking_uri: str | None = None,
                  experiment_id: str | None = None, parent: str | None = None,
                  sweep_dir: str | None = None) -> list[str]:
    """The summary of ``study`` (every worker's trials): counts, front, best within the constraint, where to look."""
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)}
    lines = [f"study {spec.study_name}: {count[TrialState.COMPLETE]} complete, {count[TrialState.FAIL]} failed"
             + (f", {count[TrialState.RUNNING]} running in other workers" if count[TrialState.RUNNING] else "")
             + f" (Optuna storage {redact(spec.storage)})"]
    done = [t for t in trials if t.state == TrialState.COMPLETE and "metrics" in t.user_attrs]
    objectives = list(spec.objectives)
    if done:
        rows = [{"trial": t.number, **t.user_attrs["metrics"]} for t in done]
        mask = pareto_mask([[r[k] for k in objectives] for r in rows], list(spec.objectives.values()))
        front = sorted((r for r, m in zip(rows, mask, strict=True) if m), key=lambda r: r[objectives[-1]])
        cols = objectives + [c for c in _EXTRA if c not in objectives and c in rows[0]]
        senses = ", ".join(f"{k} {'max' if v == 'maximize' else 'min'}" for k, v in spec.objectives.items())
        lines.append(f"Pareto front ({senses}): {len(front)} of {len(rows)} trials"
                     + (f", {MAX_ROWS} shown" if len(front) > MAX_ROWS else ""))
        lines += _table(front[:MAX_ROWS], cols)
        if spec.constraint:
            metric, limit = spec.constraint["metric"], float(spec.constraint["max"])
            ok = [r for r in rows if r[metric] <= limit]
            first, sense = objectives[0], spec.objectives[objectives[0]]
            if ok:
                best = (max if sense == "maximize" else min)(ok, key=lambda r: r[first])
                lines.append(f"best within {metric} <= {limit:,.6g}: trial {best['trial']} ({first} "
                             f"{format_metric(first, best[first])}, {metric} {format_metric(metric, best[metric])})")
            else:
                lines.append(f"no trial within {metric} <= {limit:,.6g}")
    if parent is None:
        lines.append("MLflow: off (tracking=none)")
    else:
        uri = redact(tracking_uri or "")
        lines.append(f"MLflow: experiment {spec.study_name} (id {experiment_id}), parent run {parent} (the front's "
                     f"configs under its artifacts pareto/configs/), store {uri}")
        view = f"#/experiments/{experiment_id}?workflowType=machine_learning"
        if uri.startswith(("http://", "https://")):
            lines.append(f"open: {uri.rstrip('/')}/{view}")
        else:
            lines.append(f"open: mlflow ui --backend-store-uri {shlex.quote(uri)}  then  http://127.0.0.1:5000/{view}")
    if sweep_dir:
        lines.append(f"log: {sweep_dir}")
    return lines
