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
from vitq.quant.config import ConfigError
from vitq.search.sensitivity import (
    CANDIDATES,
    bits_key,
    check_widths,
    compute_sensitivity,
    configs_for_budgets,
    cost_table,
    enqueue_params,
    session_settings,
)
from vitq.search.space import SearchSpec, load_search

__all__ = ["STRATEGIES", "compare", "main"]

STRATEGIES = ("tpe_warm", "nsga2_warm", "nsga2", "random", "aimet_greedy")


class Objective:
    """Runs one trial of a params dict on a session (its batch sizes, values kept, statistics folder) and returns
    its (top-1, size fraction)."""

    def __init__(self, session, base) -> None:  # noqa: ANN001
        self.session, self.base = session, base

    def __call__(self, overrides: dict) -> tuple[float, float]:
        res = self.session.run_trial(self.base.with_overrides(overrides), profile=False)
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
    objective = Objective(session, base)
    objective({})
    t0 = time.perf_counter()
    sens = compute_sensitivity(model, data, base, **session_settings(session))
    sens_s = time.perf_counter() - t0
    table = cost_table(model, base, sens.candidates, "weight_bytes", input_size=data.image_size)
    cheapest = table.least()  # every point at the narrowest candidate
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
                     "best_top1_at_half_size": max((float(p[p[:, 1] <= 0.5, 0].max()) for p in found[name]
                                                    if (p[:, 1] <= 0.5).any()), default=float("nan")),
                     "seconds_per_seed": seconds[name]})
    return {"table": rows, "n_trials": n_trials, "seeds": seeds, "reference_trials": reference_trials,
            "reference_hv": ref_hv, "reference_seconds": ref_s, "sensitivity_seconds": sens_s,
            "sensitivity_cached": sens.meta.get("cache"), "fronts": {k: [p.tolist() for p in v] for k, v in
                                                                     found.items()},
            "reference_front": ref_front.tolist()}


# ------------------------------------------------------------------------------------------------ matched budgets
UNIFORM = {"W8A8": (8, 8), "W6A8": (6, 8), "W5A8": (5, 8), "W4A8": (4, 8), "W3A8": (3, 8), "W4A4": (4, 4)}


def mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean of per-image values (correctness, or a paired difference of it) and its standard error."""
    x = np.asarray(x, float)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))


class Runner:
    """One evaluation pass per config over every held-out image: the search split's top-1 (what searches and
    selections see) and the test split's per-image correctness (what the table reports)."""

    def __init__(self, model, data, labels: np.ndarray, search_idx: np.ndarray, test_idx: np.ndarray,  # noqa: ANN001
                 settings: dict) -> None:
        self.model, self.data, self.settings, self.labels = model, data, settings, labels
        self.search_idx, self.test_idx = search_idx, test_idx
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, cfg) -> dict:  # noqa: ANN001
        from vitq.calibrate import calibrated_model
        from vitq.cost import model_cost
        from vitq.evaluate import evaluate

        t0 = time.perf_counter()
        st = self.settings
        qm, _ = calibrated_model(self.model, self.data, cfg, st["batch_size"], st["stats_dir"],
                                 max_values=st["max_values"])
        pred = evaluate(qm, self.data.eval, st["eval_batch_size"]).predictions.cpu().numpy()
        correct = pred == self.labels
        cost = model_cost(self.model, cfg, self.data.image_size)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return {"search_top1": float(correct[self.search_idx].mean()), "test_correct": correct[self.test_idx],
                "weight_bytes": cost.weight_bytes, "bops": cost.bops, "mean_weight_bits": cost.mean_weight_bits,
                "mean_act_bits": cost.mean_act_bits}


def _activation_floor(spec: SearchSpec, min_act_bits: int) -> None:
    """Drop the activation widths below ``min_act_bits`` from the space's bit choices."""
    from vitq.quant.config import WEIGHT_POINTS

    for p in spec.params:
        parts = p.name.split(".")
        if p.choices is not None and parts[-2:] == ["bit_type", "bits"] and parts[-3] not in WEIGHT_POINTS:
            p.choices = [b for b in p.choices if b >= min_act_bits]


def matched_budgets(n_trials: int = 30, seed: int = 0, min_act_bits: int = 4, n_search: int = 256,
                    block_drops: bool = False, search: str = "mixed_precision", log: Callable[[str], None] = print,
                    overrides: tuple[str, ...] = (), with_modelopt: bool = False) -> dict:
    """Every strategy at the budgets of the uniform W8A8, W6A8, W5A8, W4A8, W3A8 (weight bytes: mean weight bits 8,
    6, 5, 4, 3) and W4A4 (BOPs) configs. Searches, selections and sensitivities see a class-stratified
    ``n_search`` of the held-out images; top-1 is reported on the rest, with its standard error and each strategy's
    paired difference to the per-point solver. ``with_modelopt``: NVIDIA ModelOpt's ``auto_quantize`` at the weight
    budgets too (:mod:`vitq.search.modelopt_compare`)."""
    from vitq.data import DataBundle, DataError, labels_of, stratified_subset, subset
    from vitq.quant.config import POINTS, SECTION_OF, WEIGHT_POINTS
    from vitq.search.sensitivity import allowed_widths, with_bits
    from vitq.sweep import compose, session_of

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if with_modelopt:
        from vitq.search import modelopt_compare

        modelopt_compare.require()  # before any work: without the extra, the pip command
    base, session = session_of(compose(overrides), overrides)
    model, data = session.model, session.data
    labels = labels_of(data.eval)
    if not 0 < n_search < len(labels):
        raise DataError(f"--search-images={n_search}: the evaluation set has {len(labels)} images, and the search "
                        "images must leave some to test on (fewer, or a larger data.n_eval)")
    search_idx = stratified_subset(labels, n_search, seed)
    test_idx = np.setdiff1d(np.arange(len(labels)), search_idx)
    search_data = DataBundle(data.name, data.calib, subset(data.eval, search_idx), data.num_classes, data.train,
                             {**data.meta, "eval_fingerprint": f"{data.meta['eval_fingerprint']}/search{n_search}"})
    settings = session_settings(session)
    run = Runner(model, data, labels, search_idx, test_idx, settings)
    fp_correct = run(base.with_overrides({f"{SECTION_OF[p]}.{p}.enabled": False for p in POINTS}))
    uniform = {name: with_bits(base, {p: w if p in WEIGHT_POINTS else a for p in POINTS})
               for name, (w, a) in UNIFORM.items()}
    uniform_res = {name: run(cfg) for name, cfg in uniform.items()}
    budgets = {name: ("bops" if name == "W4A4" else "weight_bytes",
                      uniform_res[name]["bops" if name == "W4A4" else "weight_bytes"]) for name in UNIFORM}
    sens_point = compute_sensitivity(model, search_data, base, n_eval=None, **settings)
    sens_block = compute_sensitivity(model, search_data, base, n_eval=None, granularity="block", drops=block_drops,
                                     **settings)
    point_s, block_s = sens_point.seconds, sens_block.seconds  # (as measured when computed; then cached)
    log(f"[compare] sensitivity: per point {point_s:.1f} s, per block {block_s:.1f} s")
    solvers = [("per-point solver (drop_loss)", sens_point, "drop_loss"),
               ("per-point solver (grad_score)", sens_point, "grad_score"),
               ("per-block solver (grad_score)", sens_block, "grad_score")]
    if block_drops:
        solvers.append(("per-block solver (drop_loss)", sens_block, "drop_loss"))
    tables = {(sens.granularity, metric): cost_table(model, base, sens.candidates, metric, sens.items,
                                                     data.image_size)
              for sens in (sens_point, sens_block) for metric in ("weight_bytes", "bops")}
    rows: list[dict] = []
    picks: dict[tuple[str, str], dict] = {}
    solve_ms: list[float] = []
    warm: list[dict] = []
    spec = load_search(search)
    spec.bind_blocks(len(model.blocks))
    _activation_floor(spec, min_act_bits)
    allowed = {sens.granularity: allowed_widths(sens.items, sens.candidates, min_act_bits=min_act_bits)
               for sens in (sens_point, sens_block)}
    for name, (metric, budget) in budgets.items():
        picks[(name, f"uniform {name}")] = uniform_res[name]
        for label, sens, score in solvers:
            table = tables[(sens.granularity, metric)]
            (sol,) = configs_for_budgets(sens, table, [budget], score, allowed[sens.granularity])
            solve_ms.append(sol["solve_ms"])
            if not sol["feasible"]:
                continue
            cfg = with_bits(base, sol["bits"])
            picks[(name, label)] = run(cfg)
            if label == "per-point solver (drop_loss)":
                warm.append(spec.pinned_params(cfg, base, "warm start"))
        log(f"[compare] {name}: uniform and solvers done")
    warm += spec.baseline_params(base)
    samplers = {"TPE, warm-started": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True),
                "NSGA-II, warm-started": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=10),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed)}
    search_seconds = {}
    for label, make in samplers.items():
        t0 = time.perf_counter()
        trials = _budget_study(run, base, spec, make(), n_trials, warm if "warm" in label else [])
        search_seconds[label] = time.perf_counter() - t0
        for name, (metric, budget) in budgets.items():
            fits = [t for t in trials if t[metric] <= budget]
            if fits:
                picks[(name, f"{label} ({n_trials} trials)")] = max(fits, key=lambda t: t["search_top1"])
        log(f"[compare] {label}: {n_trials} trials in {search_seconds[label]:.0f} s")
    ref = {name: picks.get((name, "per-point solver (drop_loss)")) for name in budgets}

    def against_ref(name: str, correct: np.ndarray) -> dict:
        if ref[name] is None:
            return {}
        d, se = mean_se(correct.astype(float) - ref[name]["test_correct"])
        return {"vs_per_point": d, "vs_per_point_se": se}

    for (name, label), r in picks.items():
        top1, se = mean_se(r["test_correct"])
        rows.append({"budget": name, "metric": budgets[name][0], "budget_value": budgets[name][1], "strategy": label,
                     "test_top1": top1, "test_se": se, "search_top1": r["search_top1"],
                     "weight_bytes": r["weight_bytes"], "mean_weight_bits": r["mean_weight_bits"],
                     "mean_act_bits": r["mean_act_bits"], "bops": r["bops"], **against_ref(name, r["test_correct"])})
    if with_modelopt:
        t0 = time.perf_counter()
        weight_budgets = {name: float(w) for name, (w, a) in UNIFORM.items() if a == 8}
        for r in modelopt_compare.run_modelopt(model, data, labels, test_idx, weight_budgets,
                                               session.calib_batch_size, session.eval_batch_size):
            name = r["budget"]
            row = {"budget": name, "metric": budgets[name][0], "budget_value": budgets[name][1],
                   "strategy": r["strategy"], "effective_bits": r.get("effective_bits", r["effective_bits_target"])}
            if r["feasible"]:
                top1, se = mean_se(r["test_correct"])
                row.update(test_top1=top1, test_se=se, seconds=r["seconds"], layers=r["layers"],
                           **against_ref(name, r["test_correct"]))
            else:
                row.update(infeasible=r["reason"])
            rows.append(row)
        log(f"[compare] ModelOpt: {time.perf_counter() - t0:.0f} s")
    fp_top1, fp_se = mean_se(fp_correct["test_correct"])
    return {"table": rows, "n_test": len(test_idx), "n_search": len(search_idx), "n_trials": n_trials, "seed": seed,
            "min_act_bits": min_act_bits, "fp_test_top1": fp_top1, "fp_test_se": fp_se,
            "sensitivity_seconds": {"point": point_s, "block": block_s}, "solve_ms_max": max(solve_ms),
            "search_seconds": search_seconds, "model": session.model_spec.name, "n_blocks": len(model.blocks),
            "eval_seconds_per_config": run.seconds / max(run.calls, 1)}


def _budget_study(run: Runner, base, spec: SearchSpec, sampler: optuna.samplers.BaseSampler, n_trials: int,  # noqa: ANN001
                  enqueue: list[dict]) -> list[dict]:
    """``n_trials`` of a (search top-1 ↑, weight bytes ↓) study; every trial's result."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for params in enqueue:
        study.enqueue_trial(params, skip_if_exists=True)
    names = {p.name for p in spec.params}
    pending = list(enqueue)  # an enqueued config's keys outside the space (a per-block solver's) go with its trial
    out = []
    for _ in range(n_trials):
        t = study.ask()
        over = spec.suggest_overrides(t)
        mine = next((e for e in pending if all(t.params.get(k) == v for k, v in e.items() if k in names)), None)
        if mine is not None:
            pending.remove(mine)
            over.update({k: v for k, v in mine.items() if k not in names and k != "baseline"})
        r = run(base.with_overrides(over))
        study.tell(t, [r["search_top1"], r["weight_bytes"]])
        out.append(r)
    return out


def format_budgets(result: dict) -> str:
    """The matched-budget table as text: test top-1 ± SE and the paired difference to the per-point solver."""
    lines = [f"{result['model']} ({result['n_blocks']} blocks): FP top-1 {100 * result['fp_test_top1']:.2f} ± "
             f"{100 * result['fp_test_se']:.2f} % on {result['n_test']} test images (searches, selections and "
             f"sensitivities see {result['n_search']} other held-out images); activations >= "
             f"{result['min_act_bits']} bits"]
    t = pd.DataFrame(result["table"])
    for name, g in t.groupby("budget", sort=False):
        metric, value = g["metric"].iloc[0], g["budget_value"].iloc[0]
        lines.append(f"\nbudget {name}: {metric} <= {value:,.0f}")
        for _, r in g.sort_values("test_top1", ascending=False).iterrows():
            if isinstance(r.get("infeasible"), str):
                lines.append(f"  {r['strategy']:<38} infeasible: {r['infeasible']}")
                continue
            vs = (f"{100 * r['vs_per_point']:+.2f} ± {100 * r['vs_per_point_se']:.2f}"
                  if not np.isnan(r.get("vs_per_point", np.nan)) else "")
            what = (f"effective bits {r['effective_bits']:.2f}, {r['seconds']:.1f} s"
                    if not np.isnan(r.get("effective_bits", np.nan)) else
                    f"W {r['mean_weight_bits']:.2f} / A {r['mean_act_bits']:.2f} bits")
            lines.append(f"  {r['strategy']:<38} {100 * r['test_top1']:6.2f} ± {100 * r['test_se']:.2f} %  "
                         f"{what}  {vs}")
    return "\n".join(lines)


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


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def main(argv: list[str] | None = None, prog: str = "python -m vitq.search.compare") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=None, help="hypervolume mode (default 3)")
    ap.add_argument("--reference-trials", type=int, default=None, help="hypervolume mode (default 300)")
    ap.add_argument("--matched", action="store_true",
                    help="compare at matched budgets (uniform W8A8/W6A8/W5A8/W4A8/W3A8 sizes and W4A4 BOPs) on "
                         "held-out test images: uniform presets, per-point and per-block solvers, warm-started "
                         "TPE / NSGA-II and random search (e.g. with model=digits_deep)")
    ap.add_argument("--min-act-bits", type=int, default=None, help="--matched: narrowest activation width (4)")
    ap.add_argument("--search-images", type=int, default=None,
                    help="--matched: held-out images that searches, selections and sensitivities see (256)")
    ap.add_argument("--with-modelopt", action="store_true",
                    help="--matched: NVIDIA ModelOpt's auto_quantize at the weight budgets too (pip install "
                         "'vitq[compare]')")
    ap.add_argument("--block-drops", action="store_true",
                    help="--matched: also measure drop_loss per (block, point): blocks x 14 x widths eval passes")
    ap.add_argument("--out", type=Path, default=Path("compare"))
    ap.add_argument("overrides", nargs="*", metavar="OVERRIDES",
                    help="the sweep's Hydra overrides: base config, model=, data=, device=")
    args = ap.parse_args(argv)
    for flag in ("--trials", "--seeds", "--reference-trials", "--search-images"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < 1:
            ap.error(f"{flag}: must be >= 1, got {value}")
    modes = {"--matched": ("--min-act-bits", "--search-images", "--with-modelopt", "--block-drops"),
             "hypervolume": ("--seeds", "--reference-trials")}
    for flag in modes["hypervolume" if args.matched else "--matched"]:
        if getattr(args, flag[2:].replace("-", "_")) not in (None, False):
            ap.error(f"{flag} does not apply {'with' if args.matched else 'without'} --matched")
    from vitq.sweep import refuse_unread

    try:
        check_widths(CANDIDATES, args.min_act_bits)
        refuse_unread(args.overrides, "vitq compare", {"export_dir": "its results go to --out"})
    except ConfigError as e:
        ap.error(str(e))
    from vitq.paths import FolderError, output_folder
    from vitq.search.modelopt_compare import ModelOptMissing
    from vitq.session import SessionError

    try:
        output_folder(args.out, "--out")
    except FolderError as e:
        print(f"vitq: {e}", file=sys.stderr)
        return 2
    try:
        if args.matched:
            result = matched_budgets(args.trials, min_act_bits=_given(args.min_act_bits, 4),
                                     n_search=_given(args.search_images, 256), block_drops=args.block_drops,
                                     overrides=tuple(args.overrides), with_modelopt=args.with_modelopt)
        else:
            result = compare(args.trials, _given(args.seeds, 3), _given(args.reference_trials, 300),
                             overrides=tuple(args.overrides))
    except SessionError as e:
        print(f"vitq: {e}", file=sys.stderr)
        return 2
    except ModelOptMissing as e:  # --with-modelopt without the extra: the pip command
        print(f"vitq: {e}", file=sys.stderr)
        return 2
    if args.matched:
        table = pd.DataFrame(result["table"])
        table.to_csv(args.out / "budget_comparison.csv", index=False)
        (args.out / "budget_comparison.json").write_text(json.dumps(result, indent=2, default=float))
        print(format_budgets(result))
        print(f"sensitivity {result['sensitivity_seconds']['point']:.1f} s per point, "
              f"{result['sensitivity_seconds']['block']:.1f} s per block; slowest solve "
              f"{result['solve_ms_max']:.0f} ms; {result['eval_seconds_per_config']:.2f} s per config")
        print(f"[compare] wrote {args.out}/budget_comparison.{{csv,json}}")
        return 0
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
