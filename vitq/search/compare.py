"""``python -m vitq.search.compare``: how good a front each search strategy finds in a fixed number of trials.

On the digits reference (or the model/data of the sweep's Hydra overrides), for the ``mixed_precision`` space
(bits per point, observers, alpha) and objectives
(top-1 ↑, weight bytes ↓), each strategy gets ``--trials`` trials per seed:

- ``tpe_warm`` / ``nsga2_warm``: the sensitivity solver's configs at five size budgets (10-70 % of the way from
  the all-2-bit size to the all-8-bit size) plus the uniform baselines (W8A8, W6A6, W4A8, W4A4) enqueued
  first, then TPE / NSGA-II;
- ``nsga2`` and ``random``: plain samplers;
- ``aimet_greedy``: AIMET AMP's list — one-at-a-time flips ranked by accuracy drop, applied cumulatively
  (deterministic; observers stay at the base's).

Score: hypervolume of the found front in (top-1, size / FP32 size) up to (0, 1), divided by the hypervolume
of a reference front (a long random run pooled with every point any strategy found). Mean ± std over seeds,
as a table (stdout, CSV, JSON) and a plot. Trials run in-process (no MLflow); the sensitivity table is
computed once and cached, and its cost is reported separately.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from vitq.pareto import hypervolume_2d, pareto_mask
from vitq.search.sensitivity import bits_key, compute_sensitivity, configs_for_budgets, cost_table, enqueue_params
from vitq.search.space import SearchSpec, load_search

__all__ = ["STRATEGIES", "compare", "main"]

STRATEGIES = ("tpe_warm", "nsga2_warm", "nsga2", "random", "aimet_greedy")


class Objective:
    """Runs one trial of a params dict; remembers every (top-1, size fraction) it measured."""

    def __init__(self, model, data, base) -> None:  # noqa: ANN001
        from vitq.trial import run_trial

        self.model, self.data, self.base, self._run = model, data, base, run_trial

    def __call__(self, overrides: dict) -> tuple[float, float]:
        res = self._run(self.model, self.data, self.base.with_overrides(overrides), profile=False)
        return res.top1, res.weight_bytes / res.fp32_bytes


def _study_points(objective: Objective, spec: SearchSpec, sampler: optuna.samplers.BaseSampler, n_trials: int,
                  enqueue: list[dict]) -> np.ndarray:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for params in enqueue:
        study.enqueue_trial(params, skip_if_exists=True)
    pts = []
    for _ in range(n_trials):
        t = study.ask()
        over = spec.suggest_overrides(t)
        val = objective(over)
        study.tell(t, list(val))
        pts.append(val)
    return np.array(pts)


def aimet_greedy(objective: Objective, sens_table: pd.DataFrame, n_trials: int) -> np.ndarray:
    """AIMET AMP: flips ranked by accuracy drop (ties: larger width first), applied cumulatively."""
    flips = sens_table[sens_table["bits"] < sens_table["bits"].max()].sort_values(["drop_top1", "bits"],
                                                                                  ascending=[True, False])
    current: dict[str, int] = {}
    pts = [objective({})]
    for _, row in flips.iterrows():
        if len(pts) >= n_trials:
            break
        if current.get(row["item"], 99) <= row["bits"]:
            continue  # already at or below this width
        current[row["item"]] = int(row["bits"])
        pts.append(objective({bits_key(p): b for p, b in current.items()}))
    return np.array(pts)


def _hv(points: np.ndarray) -> float:
    return hypervolume_2d(points, ["maximize", "minimize"], np.array([0.0, 1.0]))


def compare(n_trials: int = 30, seeds: int = 3, reference_trials: int = 300, search: str = "mixed_precision",
            budgets_frac: tuple[float, ...] = (0.1, 0.2, 0.35, 0.5, 0.7), log: Callable[[str], None] = print,
            overrides: tuple[str, ...] = ()) -> dict:
    """Every strategy on the model/data/base config of the sweep's Hydra ``overrides`` (digits + int8 by default)."""
    from vitq.sweep import compose, session_of

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base, session = session_of(compose(overrides), overrides)
    model, data = session.model, session.data
    spec = load_search(search)
    objective = Objective(model, data, base)
    objective({})
    t0 = time.perf_counter()
    sens = compute_sensitivity(model, data, base)
    sens_s = time.perf_counter() - t0
    table = cost_table(model, base, sens.candidates, "weight_bytes")
    cheapest = table.cost([0] * len(table.items))  # every point at the narrowest candidate
    widest = table.cost([len(table.candidates) - 1] * len(table.items))
    sols = configs_for_budgets(sens, table, [cheapest + f * (widest - cheapest) for f in budgets_frac])
    warm = [spec.pinned_params(base.with_overrides(enqueue_params(s["bits"])), base, "warm start")
            for s in sols if s["feasible"]] + spec.baseline_params(base)
    samplers = {"tpe_warm": lambda s: optuna.samplers.TPESampler(seed=s, multivariate=True),
                "nsga2_warm": lambda s: optuna.samplers.NSGAIISampler(seed=s, population_size=10),
                "nsga2": lambda s: optuna.samplers.NSGAIISampler(seed=s, population_size=10),
                "random": lambda s: optuna.samplers.RandomSampler(seed=s)}
    found: dict[str, list[np.ndarray]] = {k: [] for k in STRATEGIES}
    seconds: dict[str, float] = {}
    for name in STRATEGIES:
        t0 = time.perf_counter()
        for seed in range(seeds):
            if name == "aimet_greedy":
                pts = aimet_greedy(objective, sens.table, n_trials)
            else:
                pts = _study_points(objective, spec, samplers[name](seed), n_trials,
                                    warm if name.endswith("_warm") else [])
            found[name].append(pts)
            log(f"[compare] {name} seed {seed}: hv {_hv(pts):.4f}")
        seconds[name] = (time.perf_counter() - t0) / seeds
    t0 = time.perf_counter()
    ref_pts = _study_points(objective, spec, optuna.samplers.RandomSampler(seed=12345), reference_trials, [])
    ref_s = time.perf_counter() - t0
    pooled = np.concatenate([ref_pts, *[p for v in found.values() for p in v]])
    ref_front = pooled[pareto_mask(pooled, ["maximize", "minimize"])]
    ref_hv = _hv(ref_front)
    rows = []
    for name in STRATEGIES:
        hvs = np.array([_hv(p) / ref_hv for p in found[name]])
        rows.append({"strategy": name, "hv_ratio_mean": float(hvs.mean()), "hv_ratio_std": float(hvs.std()),
                     "hv_ratio_min": float(hvs.min()), "hv_ratio_max": float(hvs.max()),
                     "best_top1_at_half_size": float(max((p[p[:, 1] <= 0.5, 0].max() if (p[:, 1] <= 0.5).any()
                                                          else 0.0) for p in found[name])),
                     "seconds_per_seed": seconds[name]})
    return {"table": rows, "n_trials": n_trials, "seeds": seeds, "reference_trials": reference_trials,
            "reference_hv": ref_hv, "reference_seconds": ref_s, "sensitivity_seconds": sens_s,
            "sensitivity_cached": sens.meta.get("cache"), "fronts": {k: [p.tolist() for p in v] for k, v in
                                                                     found.items()},
            "reference_front": ref_front.tolist()}


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = pd.DataFrame(result["table"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    a.bar(t["strategy"], t["hv_ratio_mean"], yerr=t["hv_ratio_std"], capsize=4, color="tab:blue")
    a.set_ylabel("hypervolume / reference")
    a.set_ylim(max(0.0, t["hv_ratio_mean"].min() - 0.1), 1.0)
    a.set_title(f"{result['n_trials']} trials, {result['seeds']} seeds (mean ± std)")
    a.tick_params(axis="x", rotation=20)
    ref = np.array(result["reference_front"])
    ref = ref[np.argsort(ref[:, 1])]
    b.step(ref[:, 1], ref[:, 0], where="post", color="k", lw=2, label="reference front")
    for i, (name, fronts) in enumerate(result["fronts"].items()):
        p = np.array(fronts[0])
        f = p[pareto_mask(p, ["maximize", "minimize"])]
        f = f[np.argsort(f[:, 1])]
        b.step(f[:, 1], f[:, 0], where="post", color=f"C{i}", label=f"{name} (seed 0)")
    b.set_xlabel("weight size / FP32 size")
    b.set_ylabel("top-1")
    b.set_ylim(0.8, 1.0)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vitq.search.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--reference-trials", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("compare"))
    ap.add_argument("overrides", nargs="*", metavar="OVERRIDES",
                    help="the sweep's Hydra overrides: base config, model=, data=, device=")
    args = ap.parse_args(argv)
    from vitq.session import SessionError

    try:
        result = compare(args.trials, args.seeds, args.reference_trials, overrides=tuple(args.overrides))
    except SessionError as e:
        print(f"vitq: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(result["table"])
    table.to_csv(args.out / "search_comparison.csv", index=False)
    (args.out / "search_comparison.json").write_text(json.dumps(result, indent=2))
    _plot(result, args.out / "search_comparison.png")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"reference front: {result['reference_trials']} random trials pooled with every strategy's points; "
          f"sensitivity {result['sensitivity_seconds']:.1f} s (cached: {result['sensitivity_cached']})")
    print(f"[compare] wrote {args.out}/search_comparison.{{csv,json,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
