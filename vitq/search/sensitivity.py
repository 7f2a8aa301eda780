"""Sensitivity and the budget solver that turns it into configs for any size or BOPs budget, per point or per
(block, point).

Sensitivity of every item — a quantization point in every block (``granularity='point'``), or a point in one block
(``'block'``: ``blocks.3.kv_act``) — at every candidate width ``b``, measured against a base config (the int8
preset by default):

- ``drop_top1`` / ``drop_loss``: what lowering only that item to ``b`` costs on an evaluation subset (AIMET AMP's
  one-at-a-time flips; the ranges come from the cached calibration statistics, so each flip is one eval pass:
  14 × widths passes per point, blocks × 14 × widths per block; ``drops=False`` skips them);
- ``grad_score``: Σ grad² · (Q_b(y) − y)² over the calibration images (NVIDIA ModelOpt's auto_quantize score),
  with ``y`` the values entering the point in the base-quantized model and ``grad`` the loss gradient there: one
  backward pass per batch scores every (block, point, width) at once, whatever the granularity.

Tables are cached on disk per (model, calibration set, evaluation subset, candidates, base config, granularity).

The solver picks one width per item minimizing the summed sensitivity subject to ``cost ≤ budget`` — a
multiple-choice knapsack solved exactly with ``scipy.optimize.milp``. The cost comes from :func:`model_cost`:
weight bytes are a sum of per-item terms; BOPs add products of a linear's weight and input-activation widths
(and of the softmax output and q·kᵀ widths), whose two items are decided jointly, so predicted costs are exact.

    python -m vitq.search.sensitivity --budgets 120000,150000,180000 [--metric weight_bytes|bops]
        [--granularity point|block] [--score drop_loss|drop_top1|grad_score] [--min-act-bits 4]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from vitq.calibrate import calib_key, calibrated_model, model_checksum
from vitq.cost import BOP_PAIRS, model_cost, resolved_cost
from vitq.data import DataBundle, batches, labels_of, stratified_subset, subset
from vitq.evaluate import evaluate, model_device
from vitq.paths import cache_root
from vitq.quant.config import (
    POINTS,
    SECTION_OF,
    WEIGHT_POINTS,
    BitTypeConfig,
    ConfigError,
    LayerQuantConfig,
    QuantConfig,
    split_block,
)
from vitq.quant.modules import STATS_MAX_ELEMENTS
from vitq.redact import redact
from vitq.search.budgets import BUDGET_METRICS, GRANULARITIES, SCORES, check_budget_values

__all__ = ["CANDIDATES", "CostTable", "Sensitivity", "allowed_widths", "bits_key", "check_budgets",
           "check_widths", "compute_sensitivity", "configs_for_budgets", "cost_table", "enqueue_params", "item_name",
           "items_of", "session_settings", "solve_mck", "with_bits"]

CANDIDATES = (2, 3, 4, 5, 6, 8)
N_EVAL = 256  # evaluation images of the drop measure, unless --n-eval says (or there are fewer)
SENSITIVITY_VERSION = 4  # bump when the measure changes (v2: stratified eval subset; v3: OMSE/KL see every value;
#                          v4: items per block)


# ------------------------------------------------------------------------------------------------ items
def item_name(point: str, block: int | None = None) -> str:
    """An item the solver decides: a point in every block (``kv_act``) or in one block (``blocks.3.kv_act``)."""
    return point if block is None else f"blocks.{block}.{point}"


def items_of(n_blocks: int, granularity: str = "point") -> tuple[str, ...]:
    """Every item at ``granularity``: the 14 points, or the 14 points of each of ``n_blocks`` blocks."""
    if granularity == "point":
        return POINTS
    if granularity == "block":
        return tuple(item_name(p, b) for b in range(n_blocks) for p in POINTS)
    raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")


def bits_key(item: str) -> str:
    """The dotted config key of an item's width (``blocks.N.`` in front for a block's item)."""
    block, point = split_block(item)
    key = f"{SECTION_OF[point]}.{point}.bit_type.bits"
    return key if block is None else f"blocks.{block}.{key}"


def with_bits(base: LayerQuantConfig, bits: dict[str, int]) -> LayerQuantConfig:
    """``base`` with the given items at the given widths (enabled). A point's item sets the point in every block
    (also where ``base`` has a ``blocks`` entry for it); a block's item then sets that block alone."""
    over: dict[str, object] = {}
    for item in sorted(bits, key=lambda it: split_block(it)[0] is not None):  # every-block items first
        block, point = split_block(item)
        sec = SECTION_OF[point]
        blocks = [block] if block is not None else [None, *(n for n, s in base.blocks.items()
                                                             if point in s.get(sec, {}))]
        for n in blocks:
            prefix = "" if n is None else f"blocks.{n}."
            over[f"{prefix}{sec}.{point}.bit_type.bits"] = int(bits[item])
            over[f"{prefix}{sec}.{point}.enabled"] = True
    return base.with_overrides(over)


def at_bits(cfg: QuantConfig, bits: int) -> QuantConfig:
    """One resolved point's config at ``bits`` (enabled): what :func:`with_bits` gives that point."""
    return replace(cfg, bit_type=BitTypeConfig(bits=int(bits), signed=cfg.bit_type.signed), enabled=True)


# ------------------------------------------------------------------------------------------------ sensitivity
@dataclass
class Sensitivity:
    """One row per (item, bits): top-1/loss with only that item lowered, their drops, and the gradient score.
    Items are points (``granularity='point'``) or (block, point) pairs (``'block'``); a drop that was not
    measured (``drops=False``) is NaN."""

    table: pd.DataFrame
    base_top1: float
    base_loss: float
    candidates: tuple[int, ...]
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)
    granularity: str = "point"

    @property
    def items(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.table["item"]))

    def matrix(self, score: str = "drop_loss", items: tuple[str, ...] | None = None) -> np.ndarray:
        """(items, candidates) scores, clipped at 0 (a lower width never helps)."""
        if score not in SCORES:
            raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
        items = self.items if items is None else items
        piv = self.table.pivot(index="item", columns="bits", values=score)
        m = piv.loc[list(items), list(self.candidates)].to_numpy(float)
        if np.isnan(m).any():
            raise ValueError(f"score {score}: not measured at {self.granularity} granularity (drops=False measures "
                             "grad_score only)")
        return np.clip(m, 0.0, None)

    def ranking(self, bits: int, score: str = "drop_loss") -> list[str]:
        """Items from most to least sensitive at ``bits``."""
        t = self.table[self.table["bits"] == bits].sort_values(score, ascending=False)
        return list(t["item"])


def _eval_subset(data: DataBundle, n_eval: int | None, seed: int = 0) -> object:
    """A class-stratified, seeded subset of ``n_eval`` evaluation images (all of them when None or more)."""
    if n_eval is None or n_eval >= len(data.eval):
        return data.eval
    return subset(data.eval, stratified_subset(labels_of(data.eval), n_eval, seed))


def _grad_scores(qm: nn.Module, data: DataBundle, base: LayerQuantConfig, candidates: tuple[int, ...],
                 batch_size: int) -> dict[tuple[int, str, int], float]:
    """Σ grad² · (Q_b(y) − y)² per (block, point, bits), summed over calibration batches: one backward pass per
    batch, whatever the granularity."""
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
    scores: dict[tuple[int, str, int], float] = {}
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
                for p in points:
                    saved = p.cfg
                    for b in candidates:
                        p.set_config(at_bits(base.resolve(p.key, p.block_index), b))
                        if p.key in WEIGHT_POINTS:
                            lin = linear_of[id(p)]
                            w, g = lin.weight.detach(), lin.weight_grad()
                            err = p.quantize(w) - w
                        else:
                            got = captured.get(id(p))
                            if got is None:
                                continue
                            v, out = got
                            g = out.grad
                            err = p.quantize(v.clone()) - v
                        if g is not None:
                            k = (p.block_index, p.key, b)
                            scores[k] = scores.get(k, 0.0) + float((g.pow(2) * err.pow(2)).sum())
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
                n_eval: int | None, batch_size: int, granularity: str, drops: bool, eval_batch_size: int,
                max_values: int | None) -> Path:
    key = "|".join([f"v{SENSITIVITY_VERSION}", model_checksum(model), calib_key(data, batch_size, max_values),
                    str(n_eval), str(candidates), data.meta["eval_fingerprint"], base.to_yaml(), granularity,
                    str(drops), str(eval_batch_size)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root("sensitivity") / f"sens_{digest}.json"


def drop_passes(n_blocks: int, candidates: tuple[int, ...], granularity: str = "point") -> int:
    """Evaluation passes the drop measures cost: one per (item, width), plus the base."""
    return len(items_of(n_blocks, granularity)) * len(candidates) + 1


def session_settings(session: Any) -> dict[str, Any]:
    """The batch sizes, calibration values kept and statistics folder of a :class:`~vitq.session.Session` (what its
    trials use), as :func:`compute_sensitivity`'s keywords."""
    return {"batch_size": session.calib_batch_size, "eval_batch_size": session.eval_batch_size,
            "max_values": session.calib_max_values, "stats_dir": session.stats_dir}


def compute_sensitivity(model: nn.Module, data: DataBundle, base: LayerQuantConfig,
                        candidates: tuple[int, ...] = CANDIDATES, n_eval: int | None = N_EVAL, batch_size: int = 128,
                        cache: bool = True, granularity: str = "point", drops: bool = True,
                        eval_batch_size: int = 512, max_values: int | None = STATS_MAX_ELEMENTS,
                        stats_dir: str | Path | None = None) -> Sensitivity:
    """Sensitivity of every (item, width) from cached calibration statistics: the gradient score (one backward pass
    per calibration batch at either granularity) and, with ``drops``, the drop measures (one evaluation pass of
    ``n_eval`` images per item and width: 14 × widths per point, blocks × 14 × widths per block). ``batch_size``,
    ``max_values`` and ``stats_dir`` are the calibration's (as a trial's), ``eval_batch_size`` the evaluations'."""
    candidates = tuple(sorted({int(b) for b in candidates}))
    n_blocks = len(getattr(model, "blocks", ()))
    items = items_of(n_blocks, granularity)
    path = _cache_path(model, data, base, candidates, n_eval, batch_size, granularity, drops, eval_batch_size,
                       max_values)
    if cache and path.is_file():
        blob = json.loads(path.read_text())
        return Sensitivity(pd.DataFrame(blob["table"]), blob["base_top1"], blob["base_loss"],
                           tuple(blob["candidates"]), blob["seconds"], {"cache": str(path)}, granularity)
    t0 = time.perf_counter()
    qm, _ = calibrated_model(model, data, base, batch_size, stats_dir, max_values=max_values)
    subset = _eval_subset(data, n_eval)
    qm.set_config(base)
    ref = evaluate(qm, subset, eval_batch_size)
    rows = []
    for item in items:
        block, point = split_block(item)
        for b in candidates:
            row = {"item": item, "block": -1 if block is None else block, "point": point, "bits": b}
            if drops:
                qm.set_config(with_bits(base, {item: b}))
                r = evaluate(qm, subset, eval_batch_size)
                row.update(top1=r.top1, loss=r.loss, drop_top1=ref.top1 - r.top1, drop_loss=r.loss - ref.loss)
            else:
                row.update(top1=math.nan, loss=math.nan, drop_top1=math.nan, drop_loss=math.nan)
            rows.append(row)
    qm.set_config(base)
    grads = _grad_scores(qm, data, base, candidates, batch_size)
    qm.set_config(base)
    table = pd.DataFrame(rows)
    every_block: dict[tuple[str, int], float] = {}
    for (_, point, b), v in grads.items():
        every_block[(point, b)] = every_block.get((point, b), 0.0) + v
    table["grad_score"] = [grads.get((blk, p, b), 0.0) if blk >= 0 else every_block.get((p, b), 0.0)
                           for blk, p, b in zip(table["block"], table["point"], table["bits"], strict=True)]
    sens = Sensitivity(table, ref.top1, ref.loss, candidates, time.perf_counter() - t0, {"cache": str(path)},
                       granularity)
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
    """cost(bits) = const + Σ_i unary[i, k_i] + Σ_(i,j) pair[(i,j)][k_i, k_j], exact for the cost model."""

    metric: str
    items: tuple[str, ...]
    candidates: tuple[int, ...]
    const: float
    unary: np.ndarray  # (items, K)
    pairs: dict[tuple[int, int], np.ndarray]  # (i, j) -> (K, K)

    def cost(self, choice: list[int]) -> float:
        c = self.const + sum(self.unary[i, k] for i, k in enumerate(choice))
        return float(c + sum(m[choice[i], choice[j]] for (i, j), m in self.pairs.items()))

    def least(self, allowed: np.ndarray | None = None) -> float:
        """The least cost of any choice of ``allowed`` widths (items × candidates, bool): a budget below it is
        infeasible. ValueError naming an item that no width is allowed for."""
        ok = np.ones(self.unary.shape, bool) if allowed is None else np.asarray(allowed, bool)
        for item, row in zip(self.items, ok, strict=True):
            if not row.any():
                raise ValueError(f"{item}: none of the solver's widths ({', '.join(map(str, self.candidates))}) "
                                 "is allowed")
        paired = {i for ij in self.pairs for i in ij}
        least = self.const + sum(self.unary[i][ok[i]].min() for i in range(len(self.items)) if i not in paired)
        for (i, j), m in self.pairs.items():
            joint = self.unary[i][:, None] + self.unary[j][None, :] + m
            least += joint[np.ix_(ok[i], ok[j])].min()
        return float(least)


def cost_table(model: nn.Module, base: LayerQuantConfig, candidates: tuple[int, ...] = CANDIDATES,
               metric: str = "weight_bytes", items: tuple[str, ...] = POINTS,
               input_size: tuple[int, int] | None = None) -> CostTable:
    """Decompose :func:`model_cost`'s ``metric`` (on ``input_size`` images) into per-item and per-pair terms
    (inclusion–exclusion around every item at the widest candidate; BOPs pair a weight with its input activation,
    and the softmax output with q·kᵀ, within a block)."""
    if metric not in BUDGET_METRICS:
        raise ValueError(f"metric: expected one of {', '.join(BUDGET_METRICS)}, got {metric!r}")
    n_blocks = len(getattr(model, "model", model).blocks)
    anchor_cfg = with_bits(base, dict.fromkeys(items, candidates[-1]))
    anchor = [anchor_cfg.resolved(b) for b in range(n_blocks)]

    def cost(change: dict[str, int]) -> float:
        per_block = [dict(r) for r in anchor]
        for item, bits in change.items():
            block, point = split_block(item)
            for b in range(n_blocks) if block is None else (block,):
                per_block[b][point] = at_bits(per_block[b][point], bits)
        return float(getattr(resolved_cost(model, per_block, input_size), metric))

    const = cost({})
    unary = np.array([[cost({it: b}) - const for b in candidates] for it in items])
    pairs: dict[tuple[int, int], np.ndarray] = {}
    if metric == "bops":
        idx = {it: i for i, it in enumerate(items)}
        blocks = dict.fromkeys(split_block(it)[0] for it in items)
        for (p, q), block in itertools.product(BOP_PAIRS, blocks):
            i, j = idx.get(item_name(p, block)), idx.get(item_name(q, block))
            if i is None or j is None or i == j:
                continue
            m = np.array([[cost({items[i]: bp, items[j]: bq}) - const - unary[i, a] - unary[j, c]
                           for c, bq in enumerate(candidates)] for a, bp in enumerate(candidates)])
            if np.abs(m).max() > 0:
                pairs[(i, j)] = m
    return CostTable(metric, tuple(items), tuple(candidates), const, unary, pairs)


# ------------------------------------------------------------------------------------------------ solver
def solve_mck(scores: np.ndarray, table: CostTable, budget: float,
              allowed: np.ndarray | None = None) -> list[int] | None:
    """Exact multiple-choice knapsack: one candidate per item, Σ score minimal, cost ≤ budget (None: infeasible).

    ``allowed`` (items × candidates, bool) excludes widths (e.g. activations below 4 bits). Ties prefer wider
    candidates (a nudge of 1e-6 of the largest score per step), so free items stay wide. The two items of a pair
    cost (BOPs: a weight and its input activation) are decided jointly, as one group of K² choices; pairs are
    disjoint, so the program stays a plain knapsack (12 blocks × 14 points × 6 widths: well under a second).
    """
    P, K = scores.shape
    paired = [i for ij in table.pairs for i in ij]
    if len(paired) != len(set(paired)):
        raise ValueError("solve_mck: pair costs must be disjoint (an item in at most one pair)")
    # HiGHS stops at an absolute gap of 1e-6 (scipy exposes only the relative one): scores of 1e-9..1e-4 (gradient
    # scores) would make any feasible point "optimal". Largest score → 1e6, so that gap is 1e-12 of it.
    s = scores * (1e6 / (float(np.abs(scores).max()) or 1.0))
    s = s + 1.0 * (K - 1 - np.arange(K))[None, :]  # the tie-break: 1e-6 of the largest score per step
    ok = np.ones((P, K), bool) if allowed is None else np.asarray(allowed, bool)
    # groups: (items, [(choice per item, score, cost)]) — single items, then the joint choices of each pair
    groups: list[tuple[tuple[int, ...], list[tuple[tuple[int, ...], float, float]]]] = []
    for i in (i for i in range(P) if i not in paired):
        groups.append(((i,), [((k,), s[i, k], table.unary[i, k]) for k in range(K) if ok[i, k]]))
    for (i, j), m in table.pairs.items():
        groups.append(((i, j), [((a, c), s[i, a] + s[j, c], table.unary[i, a] + table.unary[j, c] + m[a, c])
                                for a, c in itertools.product(range(K), range(K)) if ok[i, a] and ok[j, c]]))
    groups = [(members, _undominated(options)) for members, options in groups]
    if any(not options for _, options in groups):
        return None
    n = sum(len(options) for _, options in groups)
    cost = np.concatenate([[o[2] for o in options] for _, options in groups])
    obj = np.concatenate([[o[1] for o in options] for _, options in groups])
    one_hot = np.zeros((len(groups), n))
    start = 0
    for g, (_, options) in enumerate(groups):
        one_hot[g, start:start + len(options)] = 1
        start += len(options)
    res = milp(obj, constraints=[LinearConstraint(one_hot, 1, 1),
                                 LinearConstraint(cost[None, :], -np.inf, budget - table.const)],
               integrality=np.ones(n), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if res.status != 0 or res.x is None:
        return None
    choice = [0] * P
    start = 0
    for members, options in groups:
        best = options[int(np.argmax(res.x[start:start + len(options)]))][0]
        for i, k in zip(members, best, strict=True):
            choice[i] = k
        start += len(options)
    return choice


def _undominated(options: list[tuple[tuple[int, ...], float, float]]) -> list[tuple[tuple[int, ...], float, float]]:
    """Options no other option beats in both score and cost (a dominated one is never needed: exact)."""
    kept: list[tuple[tuple[int, ...], float, float]] = []
    for o in sorted(options, key=lambda o: (o[2], o[1])):
        if not kept or o[1] < kept[-1][1]:
            kept.append(o)
    return kept


def configs_for_budgets(sens: Sensitivity, table: CostTable, budgets: list[float], score: str = "drop_loss",
                        allowed: np.ndarray | None = None) -> list[dict]:
    """For each budget: the chosen width per item, predicted cost and summed sensitivity (or infeasible)."""
    m = sens.matrix(score, table.items)
    out = []
    for budget in budgets:
        t0 = time.perf_counter()
        choice = solve_mck(m, table, budget, allowed)
        ms = 1e3 * (time.perf_counter() - t0)
        if choice is None:
            out.append({"budget": budget, "feasible": False, "solve_ms": ms})
            continue
        bits = {it: table.candidates[k] for it, k in zip(table.items, choice, strict=True)}
        out.append({"budget": budget, "feasible": True, "bits": bits, "predicted_cost": table.cost(choice),
                    "predicted_score": float(sum(m[i, k] for i, k in enumerate(choice))), "solve_ms": ms})
    return out


def check_budgets(budgets: list[float], key: str, table: CostTable | None = None,
                  allowed: np.ndarray | None = None) -> None:
    """ConfigError naming ``key`` for a budget that is not a finite number > 0, or (given the cost ``table``) below
    the cheapest config of ``allowed`` widths, which needs no sensitivity: check before measuring it."""
    check_budget_values(budgets, key)
    if table is None:
        return
    try:
        least = table.least(allowed)
    except ValueError as e:
        raise ConfigError(key, f"no config is feasible: {e}") from None
    for b in budgets:
        if b < least:
            raise ConfigError(key, f"{b:,.0f} {table.metric} is below the cheapest config the widths allow, "
                                   f"{least:,.0f} {table.metric} (every item at its narrowest allowed width)")


def check_widths(candidates: tuple[int, ...], min_act_bits: int | None = None) -> tuple[int, ...]:
    """The solver's candidate widths, sorted and distinct; ConfigError naming ``--candidates`` or ``--min-act-bits``
    for a width outside 2..16, or a narrowest activation width that no candidate reaches."""
    if not candidates:
        raise ConfigError("--candidates", "give at least one width")
    for b in candidates:
        if not 2 <= b <= 16:
            raise ConfigError("--candidates", f"{b}: a width is in 2..16")
    widths = tuple(sorted(set(candidates)))
    if min_act_bits is not None and not 2 <= min_act_bits <= widths[-1]:
        raise ConfigError("--min-act-bits", f"must be in 2..{widths[-1]} (the widest candidate), got {min_act_bits}")
    return widths


def allowed_widths(items: tuple[str, ...], candidates: tuple[int, ...], min_weight_bits: int = 2,
                   min_act_bits: int = 2) -> np.ndarray:
    """(items × candidates) mask of the widths the solver may pick: weights ≥ ``min_weight_bits``, activations
    ≥ ``min_act_bits``."""
    return np.array([[b >= (min_weight_bits if split_block(it)[1] in WEIGHT_POINTS else min_act_bits)
                      for b in candidates] for it in items])


def enqueue_params(bits: dict[str, int]) -> dict[str, int]:
    """A solver config as dotted-key overrides (Optuna params where the search space has them); a block's item
    gives a ``blocks.N.`` key."""
    return {bits_key(it): int(b) for it, b in bits.items()}


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
    piv = sens.table.pivot(index="item", columns="bits", values=score).loc[list(sens.items)]
    fig, ax = plt.subplots(figsize=(6, max(6.0, 0.14 * len(piv))))
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
def bits_lines(bits: dict[str, int]) -> list[str]:
    """A solution as text: ``point=b`` per point, or per point its width in each block (``kv_act: 8 8 6 8``)."""
    per_point: dict[str, dict[int | None, int]] = {}
    for it, b in bits.items():
        block, point = split_block(it)
        per_point.setdefault(point, {})[block] = b
    if all(None in v for v in per_point.values()):
        return [" ".join(f"{p}={v[None]}" for p, v in per_point.items())]
    width = max(map(len, per_point))
    return [f"{p:<{width}}  " + " ".join(f"{v[b]:>2}" for b in sorted(v)) for p, v in per_point.items()]


def score_table(sens: Sensitivity, score: str) -> pd.DataFrame:
    """Point × width (per point), or point × block at the narrowest width (per block)."""
    t = sens.table
    if sens.granularity == "point":
        return t.pivot(index="point", columns="bits", values=score).loc[list(POINTS)]
    narrow = t[t["bits"] == min(sens.candidates)]
    return narrow.pivot(index="point", columns="block", values=score).loc[list(POINTS)]


def main(argv: list[str] | None = None, prog: str = "python -m vitq.search.sensitivity") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 epilog="OVERRIDES are the sweep's Hydra overrides: the base config (quant=int8 by "
                                        "default), model=, data=, device=, e.g. model=timm model.name=NAME "
                                        "model.checkpoint=PATH data=folder data.calib_root=A data.eval_root=B")
    ap.add_argument("--budgets", required=True, help="comma-separated budgets (bytes, or BOPs with --metric bops)")
    ap.add_argument("--metric", default="weight_bytes", choices=BUDGET_METRICS)
    ap.add_argument("--score", default="drop_loss", choices=SCORES)
    ap.add_argument("--granularity", default="point", choices=GRANULARITIES,
                    help="point: one width per point, shared by every block; block: one width per (block, point). "
                         "grad_score costs one backward pass per calibration batch either way; drop_loss/drop_top1 "
                         "cost one evaluation pass per item and width (14 × widths per point, blocks × 14 × widths "
                         "per block)")
    ap.add_argument("--candidates", default=",".join(map(str, CANDIDATES)))
    ap.add_argument("--min-act-bits", type=int, default=2, help="narrowest width the solver gives an activation")
    ap.add_argument("--n-eval", type=int, default=None,
                    help="evaluation images for the drop measure (a class-stratified subset; default: 256, or all "
                         "when there are fewer)")
    ap.add_argument("--tracking-uri", default=None, help="also log the table, plot and configs to this MLflow store")
    ap.add_argument("--study", default=None, help="MLflow experiment for --tracking-uri (default: sensitivity)")
    ap.add_argument("overrides", nargs="*", metavar="OVERRIDES")
    args = ap.parse_args(argv)
    from vitq.session import SessionError
    from vitq.sweep import compose, refuse_unread, session_of

    for flag, parse in (("--budgets", float), ("--candidates", int)):
        text = getattr(args, flag[2:])
        try:
            setattr(args, flag[2:], [parse(v) for v in text.split(",") if v.strip()])
        except ValueError:
            ap.error(f"{flag}: expected comma-separated {'numbers' if parse is float else 'integers'}, got {text!r}")
    try:
        candidates = check_widths(tuple(args.candidates), args.min_act_bits)
        check_budgets(args.budgets, "--budgets")
        refuse_unread(args.overrides, "vitq sensitivity",
                      {"tracking": "to log the table, give --tracking-uri (and --study)",
                       "study_name": "--study names the MLflow experiment of --tracking-uri"})
    except ConfigError as e:
        ap.error(str(e))
    if args.n_eval is not None and args.n_eval < 1:
        ap.error(f"--n-eval: must be >= 1, got {args.n_eval}")
    if args.study is not None and not args.tracking_uri:
        ap.error(f"--study={args.study}: names the MLflow experiment of --tracking-uri, which is not given")
    args.study = args.study or "sensitivity"
    from vitq import tracking

    try:
        base, session = session_of(compose(args.overrides), args.overrides)
        if args.tracking_uri:  # before the measurement, not after it
            tracking.use_store(args.tracking_uri, args.study)
    except (*SessionError, tracking.TrackingError) as e:
        print(f"vitq: {e}", file=sys.stderr)
        return 2
    model, data = session.model, session.data
    drops = args.granularity == "point" or args.score != "grad_score"
    if args.n_eval is not None and args.n_eval > len(data.eval):
        print(f"vitq: --n-eval={args.n_eval}: data {data.name!r} has {len(data.eval)} evaluation images; give at most "
              f"that many", file=sys.stderr)
        return 2
    n_eval = args.n_eval or min(N_EVAL, len(data.eval))
    items = items_of(len(model.blocks), args.granularity)
    table = cost_table(model, base, candidates, args.metric, items, data.image_size)
    allowed = allowed_widths(items, candidates, min_act_bits=args.min_act_bits)
    try:  # before the measurement: the cost model alone tells an infeasible budget
        check_budgets(args.budgets, "--budgets", table, allowed)
    except ConfigError as e:
        print(f"vitq: {e}", file=sys.stderr)
        return 2
    sens = compute_sensitivity(model, data, base, candidates, n_eval, granularity=args.granularity, drops=drops,
                               **session_settings(session))
    sols = configs_for_budgets(sens, table, args.budgets, args.score, allowed)
    n_drop = drop_passes(len(model.blocks), sens.candidates, args.granularity) if drops else 0
    print(f"sensitivity ({args.score}, per {args.granularity}: {len(sens.items)} items) on {session.model_spec.name}"
          f" / {data.name} ({n_eval} eval images, {session.device}), base top-1 "
          f"{100 * sens.base_top1:.2f} % ({sens.seconds:.1f} s: {n_drop} evaluation passes and one backward pass "
          f"per calibration batch; cache {sens.meta.get('cache')}):")
    if args.granularity == "block":
        print(f"(at {min(sens.candidates)} bits, per block)")
    print(score_table(sens, args.score).round(5).to_string())
    for s in sols:
        actual = getattr(model_cost(model, with_bits(base, s["bits"]), data.image_size), args.metric)
        print(f"\nbudget {s['budget']:.6g} {args.metric}: predicted {s['predicted_cost']:.6g} (cost model "
              f"{actual:.6g}), summed sensitivity {s['predicted_score']:.4g}, solved in {s['solve_ms']:.1f} ms")
        print("\n".join("  " + ln for ln in bits_lines(s["bits"])))
    if args.tracking_uri:
        rid = log_to_mlflow(sens, sols, args.tracking_uri, args.study, args.score)
        print(f"\nlogged to {redact(args.tracking_uri)} (experiment {args.study}, run {rid})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
