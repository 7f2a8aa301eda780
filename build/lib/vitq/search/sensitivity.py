"""Per-point sensitivity and the budget solver that turns it into configs for any size or BOPs budget.

Sensitivity of every quantization point ``p`` (all blocks together, as the config addresses it) at every
candidate width ``b``, measured against a base config (the int8 preset by default):

- ``drop_top1`` / ``drop_loss``: what lowering only ``p`` to ``b`` costs on an evaluation subset (AIMET AMP's
  one-at-a-time flips; the ranges come from the cached calibration statistics, so each flip is one eval pass);
- ``grad_score``: Σ grad² · (Q_b(y) − y)² over the calibration images (NVIDIA ModelOpt's auto_quantize score),
  with ``y`` the values entering ``p`` in the base-quantized model and ``grad`` the loss gradient there (one
  backward pass per batch through the straight-through estimator).

Tables are cached on disk per (model, calibration set, evaluation subset, candidates, base config).

The solver picks one width per point minimizing the summed sensitivity subject to ``cost ≤ budget`` — a
multiple-choice knapsack solved exactly with ``scipy.optimize.milp``. The cost comes from :func:`model_cost`:
weight bytes are a sum of per-point terms; BOPs add products of a linear's weight and input-activation widths,
which enter the program as McCormick-linearized pair variables, so predicted costs are exact.

    python -m vitq.search.sensitivity --budgets 120000,150000,180000 [--metric weight_bytes|bops]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from vitq.calibrate import calib_key, calibrated_model, model_checksum
from vitq.cost import BOP_PAIRS, model_cost
from vitq.data import DataBundle, batches, labels_of, stratified_subset, subset
from vitq.evaluate import evaluate, model_device
from vitq.paths import cache_root
from vitq.quant.config import POINTS, SECTION_OF, WEIGHT_POINTS, LayerQuantConfig

__all__ = ["CostTable", "Sensitivity", "compute_sensitivity", "configs_for_budgets", "cost_table", "solve_mck"]

CANDIDATES = (2, 3, 4, 5, 6, 8)
SENSITIVITY_VERSION = 3  # bump when the measure changes (v2: stratified eval subset; v3: OMSE/KL see every value)
SCORES = ("drop_loss", "drop_top1", "grad_score")


def bits_key(point: str) -> str:
    return f"{SECTION_OF[point]}.{point}.bit_type.bits"


def with_bits(base: LayerQuantConfig, bits: dict[str, int]) -> LayerQuantConfig:
    """``base`` with the given points at the given widths (enabled)."""
    over: dict[str, object] = {}
    for p, b in bits.items():
        over[bits_key(p)] = int(b)
        over[f"{SECTION_OF[p]}.{p}.enabled"] = True
    return base.with_overrides(over)


# ------------------------------------------------------------------------------------------------ sensitivity
@dataclass
class Sensitivity:
    """One row per (point, bits): top1/loss with only that point lowered, their drops, and the gradient score."""

    table: pd.DataFrame
    base_top1: float
    base_loss: float
    candidates: tuple[int, ...]
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    def matrix(self, score: str = "drop_loss", points: tuple[str, ...] = POINTS) -> np.ndarray:
        """(points, candidates) scores, clipped at 0 (a lower width never helps)."""
        if score not in SCORES:
            raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
        piv = self.table.pivot(index="point", columns="bits", values=score)
        return np.clip(piv.loc[list(points), list(self.candidates)].to_numpy(float), 0.0, None)

    def ranking(self, bits: int, score: str = "drop_loss") -> list[str]:
        """Points from most to least sensitive at ``bits``."""
        t = self.table[self.table["bits"] == bits].sort_values(score, ascending=False)
        return list(t["point"])


def _eval_subset(data: DataBundle, n_eval: int | None, seed: int = 0) -> object:
    """A class-stratified, seeded subset of ``n_eval`` evaluation images (all of them when None or more)."""
    if n_eval is None or n_eval >= len(data.eval):
        return data.eval
    return subset(data.eval, stratified_subset(labels_of(data.eval), n_eval, seed))


def _grad_scores(qm: nn.Module, data: DataBundle, base: LayerQuantConfig, candidates: tuple[int, ...],
                 batch_size: int) -> dict[tuple[str, int], float]:
    """Σ grad² · (Q_b(y) − y)² per (point, bits), summed over blocks and calibration batches."""
    points = qm.points()
    acts = [p for p in points if p.key not in WEIGHT_POINTS]
    captured: dict[int, torch.Tensor] = {}

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.retain_grad()
            captured[id(mod)] = (args[0].detach(), out)

    handles = [p.register_forward_hook(hook) for p in acts]
    params = list(qm.parameters())
    flags = [p.requires_grad for p in params]
    scores: dict[tuple[str, int], float] = {}
    cfg_at = {b: with_bits(base, dict.fromkeys(POINTS, b)) for b in candidates}
    linear_of = {id(lin.wq): lin for lin in qm.linears()}
    try:
        for p in params:
            p.requires_grad_(True)
        for x, y in batches(data.calib, batch_size, model_device(qm)):
            captured.clear()
            qm.zero_grad(set_to_none=True)
            with torch.enable_grad():
                F.cross_entropy(qm(x), y).backward()
            with torch.no_grad():
                for b in candidates:
                    for p in points:
                        saved = p.cfg
                        p.set_config(cfg_at[b].resolve(p.key, p.block_index))
                        if p.key in WEIGHT_POINTS:
                            lin = linear_of[id(p)]
                            w, g = lin.linear.weight.detach(), lin.linear.weight.grad
                            err = p.quantize(w) - w if p.cfg.enabled else torch.zeros_like(w)
                        else:
                            got = captured.get(id(p))
                            if got is None:
                                p.set_config(saved)
                                continue
                            v, out = got
                            g = out.grad
                            err = p.quantize(v.clone()) - v
                        if g is not None:
                            scores[(p.key, b)] = scores.get((p.key, b), 0.0) + float((g.pow(2) * err.pow(2)).sum())
                        p.set_config(saved)
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        qm.zero_grad(set_to_none=True)
        for lin in qm.linears():
            lin.refresh()
    return scores


def _cache_path(model: nn.Module, data: DataBundle, base: LayerQuantConfig, candidates: tuple[int, ...],
                n_eval: int | None, batch_size: int) -> Path:
    key = "|".join([f"v{SENSITIVITY_VERSION}", model_checksum(model), calib_key(data, batch_size), str(n_eval),
                    str(candidates), data.meta["eval_fingerprint"], base.to_yaml()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root("sensitivity") / f"sens_{digest}.json"


def compute_sensitivity(model: nn.Module, data: DataBundle, base: LayerQuantConfig,
                        candidates: tuple[int, ...] = CANDIDATES, n_eval: int | None = 256, batch_size: int = 128,
                        cache: bool = True) -> Sensitivity:
    """Both sensitivity measures for every (point, width), from cached calibration statistics."""
    candidates = tuple(sorted({int(b) for b in candidates}))
    path = _cache_path(model, data, base, candidates, n_eval, batch_size)
    if cache and path.is_file():
        blob = json.loads(path.read_text())
        return Sensitivity(pd.DataFrame(blob["table"]), blob["base_top1"], blob["base_loss"],
                           tuple(blob["candidates"]), blob["seconds"], {"cache": str(path)})
    t0 = time.perf_counter()
    qm, _ = calibrated_model(model, data, base, batch_size)
    subset = _eval_subset(data, n_eval)
    qm.set_config(base)
    ref = evaluate(qm, subset, 512)
    rows = []
    for p in POINTS:
        for b in candidates:
            qm.set_config(with_bits(base, {p: b}))
            r = evaluate(qm, subset, 512)
            rows.append({"point": p, "bits": b, "top1": r.top1, "loss": r.loss, "drop_top1": ref.top1 - r.top1,
                         "drop_loss": r.loss - ref.loss})
    qm.set_config(base)
    grads = _grad_scores(qm, data, base, candidates, batch_size)
    qm.set_config(base)
    table = pd.DataFrame(rows)
    table["grad_score"] = [grads.get((p, b), 0.0) for p, b in zip(table["point"], table["bits"], strict=True)]
    sens = Sensitivity(table, ref.top1, ref.loss, candidates, time.perf_counter() - t0, {"cache": str(path)})
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"table": table.to_dict(orient="list"), "base_top1": ref.top1,
                                   "base_loss": ref.loss, "candidates": list(candidates), "seconds": sens.seconds}))
        tmp.replace(path)
    return sens


# ------------------------------------------------------------------------------------------------ costs
@dataclass
class CostTable:
    """cost(bits) = const + Σ_p unary[p, k_p] + Σ_(p,q) pair[(p,q)][k_p, k_q], exact for the cost model."""

    metric: str
    points: tuple[str, ...]
    candidates: tuple[int, ...]
    const: float
    unary: np.ndarray  # (P, K)
    pairs: dict[tuple[int, int], np.ndarray]  # (i, j) -> (K, K)

    def cost(self, choice: list[int]) -> float:
        c = self.const + sum(self.unary[i, k] for i, k in enumerate(choice))
        return float(c + sum(m[choice[i], choice[j]] for (i, j), m in self.pairs.items()))


def cost_table(model: nn.Module, base: LayerQuantConfig, candidates: tuple[int, ...] = CANDIDATES,
               metric: str = "weight_bytes", points: tuple[str, ...] = POINTS) -> CostTable:
    """Decompose :func:`model_cost`'s ``metric`` into per-point and per-pair terms (inclusion–exclusion)."""
    if metric not in ("weight_bytes", "bops"):
        raise ValueError(f"metric: expected weight_bytes or bops, got {metric!r}")
    anchor = {p: candidates[-1] for p in points}  # every point at the widest candidate

    def cost(bits: dict[str, int]) -> float:
        return float(getattr(model_cost(model, with_bits(base, {**anchor, **bits})), metric))

    const = cost({})
    unary = np.array([[cost({p: b}) - const for b in candidates] for p in points])
    pairs: dict[tuple[int, int], np.ndarray] = {}
    if metric == "bops":
        idx = {p: i for i, p in enumerate(points)}
        for p, q in BOP_PAIRS:
            if p not in idx or q not in idx or p == q:
                continue
            i, j = idx[p], idx[q]
            m = np.array([[cost({p: bp, q: bq}) - const - unary[i, a] - unary[j, c]
                           for c, bq in enumerate(candidates)] for a, bp in enumerate(candidates)])
            if np.abs(m).max() > 0:
                pairs[(i, j)] = m
    return CostTable(metric, tuple(points), tuple(candidates), const, unary, pairs)


# ------------------------------------------------------------------------------------------------ solver
def solve_mck(scores: np.ndarray, table: CostTable, budget: float) -> list[int] | None:
    """Exact multiple-choice knapsack: one candidate per point, Σ score minimal, cost ≤ budget (None: infeasible).

    Ties prefer wider candidates (a nudge of 1e-6 of the largest score per step), so free points stay wide.
    """
    P, K = scores.shape
    pair_keys = list(table.pairs)
    n_x, n_z = P * K, len(pair_keys) * K * K
    scale = float(np.abs(scores).max()) or 1.0
    nudge = 1e-6 * scale * (K - 1 - np.arange(K))[None, :].repeat(P, 0)
    c = np.concatenate([(scores + nudge).reshape(-1), np.zeros(n_z)])
    rows, lo, hi = [], [], []

    def row() -> np.ndarray:
        return np.zeros(n_x + n_z)

    for i in range(P):  # exactly one candidate per point
        r = row()
        r[i * K:(i + 1) * K] = 1
        rows.append(r), lo.append(1), hi.append(1)
    r = row()
    r[:n_x] = table.unary.reshape(-1)
    for t, key in enumerate(pair_keys):
        r[n_x + t * K * K: n_x + (t + 1) * K * K] = table.pairs[key].reshape(-1)
    rows.append(r), lo.append(-np.inf), hi.append(budget - table.const)
    for t, (i, j) in enumerate(pair_keys):  # z = x_i,a · x_j,c  (McCormick; exact for binaries)
        for a, cc in itertools.product(range(K), range(K)):
            z = n_x + t * K * K + a * K + cc
            for lhs in ((z, i * K + a), (z, j * K + cc)):  # z ≤ x
                r = row()
                r[lhs[0]], r[lhs[1]] = 1, -1
                rows.append(r), lo.append(-np.inf), hi.append(0)
            r = row()  # z ≥ x_i + x_j − 1
            r[z], r[i * K + a], r[j * K + cc] = 1, -1, -1
            rows.append(r), lo.append(-1), hi.append(np.inf)
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi),
               integrality=np.concatenate([np.ones(n_x), np.zeros(n_z)]), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0.0})
    if res.status != 0 or res.x is None:
        return None
    x = res.x[:n_x].reshape(P, K)
    return [int(k) for k in x.argmax(1)]


def configs_for_budgets(sens: Sensitivity, table: CostTable, budgets: list[float],
                        score: str = "drop_loss") -> list[dict]:
    """For each budget: the chosen width per point, predicted cost and summed sensitivity (or infeasible)."""
    m = sens.matrix(score, table.points)
    out = []
    for budget in budgets:
        t0 = time.perf_counter()
        choice = solve_mck(m, table, budget)
        ms = 1e3 * (time.perf_counter() - t0)
        if choice is None:
            out.append({"budget": budget, "feasible": False, "solve_ms": ms})
            continue
        bits = {p: table.candidates[k] for p, k in zip(table.points, choice, strict=True)}
        out.append({"budget": budget, "feasible": True, "bits": bits, "predicted_cost": table.cost(choice),
                    "predicted_score": float(sum(m[i, k] for i, k in enumerate(choice))), "solve_ms": ms})
    return out


def enqueue_params(bits: dict[str, int]) -> dict[str, int]:
    """A solver config as dotted-key overrides (Optuna params where the search space has them)."""
    return {bits_key(p): int(b) for p, b in bits.items()}


# ------------------------------------------------------------------------------------------------ tracking
def log_to_mlflow(sens: Sensitivity, solutions: list[dict], uri: str | None, study: str, score: str) -> str:
    """A ``sensitivity`` run in the study's experiment: the table (CSV), a heat map (PNG) and the configs."""
    import matplotlib

    matplotlib.use("Agg")
    import tempfile

    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    from vitq import tracking

    exp_id = tracking.use_store(uri, study)
    client = MlflowClient()
    run = client.create_run(exp_id, tags={"vitq.role": "sensitivity", "mlflow.runName": "sensitivity"})
    rid = run.info.run_id
    client.log_text(rid, sens.table.to_csv(index=False), "sensitivity/sensitivity.csv")
    client.log_text(rid, json.dumps(solutions, indent=2), "sensitivity/budget_configs.json")
    piv = sens.table.pivot(index="point", columns="bits", values=score).loc[list(POINTS)]
    fig, ax = plt.subplots(figsize=(6, 6))
    im = ax.imshow(piv.to_numpy(float), aspect="auto", cmap="magma")
    ax.set_xticks(range(len(piv.columns)), piv.columns)
    ax.set_yticks(range(len(piv.index)), piv.index)
    ax.set_xlabel("bits")
    ax.set_title(f"sensitivity ({score})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "sensitivity.png"
        fig.savefig(png, dpi=110)
        client.log_artifact(rid, str(png), "sensitivity")
    plt.close(fig)
    client.log_metric(rid, "base_top1", sens.base_top1)
    client.set_terminated(rid, "FINISHED")
    return rid


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vitq.search.sensitivity", description=__doc__.split("\n\n")[0],
                                 epilog="OVERRIDES are the sweep's Hydra overrides: the base config (quant=int8 by "
                                        "default), model=, data=, device=, e.g. model=timm model.name=NAME "
                                        "model.checkpoint=PATH data=folder data.calib_root=A data.eval_root=B")
    ap.add_argument("--budgets", required=True, help="comma-separated budgets (bytes, or BOPs with --metric bops)")
    ap.add_argument("--metric", default="weight_bytes", choices=("weight_bytes", "bops"))
    ap.add_argument("--score", default="drop_loss", choices=SCORES)
    ap.add_argument("--candidates", default=",".join(map(str, CANDIDATES)))
    ap.add_argument("--n-eval", type=int, default=256,
                    help="evaluation images for the drop measure (a class-stratified subset)")
    ap.add_argument("--tracking-uri", default=None, help="also log the table, plot and configs to this MLflow store")
    ap.add_argument("--study", default="sensitivity", help="MLflow experiment for --tracking-uri")
    ap.add_argument("overrides", nargs="*", metavar="OVERRIDES")
    args = ap.parse_args(argv)
    from vitq.session import SessionError
    from vitq.sweep import compose, session_of

    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
        candidates = tuple(int(b) for b in args.candidates.split(",") if b.strip())
    except ValueError as e:
        ap.error(f"--budgets/--candidates: {e}")
    if args.n_eval < 1:
        ap.error(f"--n-eval: must be >= 1, got {args.n_eval}")
    try:
        base, session = session_of(compose(args.overrides), args.overrides)
    except SessionError as e:
        print(f"vitq: {e}", file=sys.stderr)
        return 2
    model, data = session.model, session.data
    sens = compute_sensitivity(model, data, base, candidates, args.n_eval, session.calib_batch_size)
    table = cost_table(model, base, sens.candidates, args.metric)
    sols = configs_for_budgets(sens, table, budgets, args.score)
    print(f"sensitivity ({args.score}) on {session.model_spec.name} / {data.name} ({min(args.n_eval, len(data.eval))}"
          f" eval images, {session.device}), base top-1 {100 * sens.base_top1:.2f} % ({sens.seconds:.1f} s; "
          f"cache {sens.meta.get('cache')}):")
    print(sens.table.pivot(index="point", columns="bits", values=args.score).loc[list(POINTS)].round(5).to_string())
    for s in sols:
        if not s["feasible"]:
            print(f"\nbudget {s['budget']:.6g} {args.metric}: infeasible (below the cheapest config)")
            continue
        actual = getattr(model_cost(model, with_bits(base, s["bits"])), args.metric)
        print(f"\nbudget {s['budget']:.6g} {args.metric}: predicted {s['predicted_cost']:.6g} (cost model "
              f"{actual:.6g}), summed sensitivity {s['predicted_score']:.4g}, solved in {s['solve_ms']:.1f} ms")
        print("  " + " ".join(f"{p}={b}" for p, b in s["bits"].items()))
    if args.tracking_uri:
        rid = log_to_mlflow(sens, sols, args.tracking_uri, args.study, args.score)
        print(f"\nlogged to {args.tracking_uri} (experiment {args.study}, run {rid})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
