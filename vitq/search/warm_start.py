"""Warm start: the sensitivity solver's configs at given budgets, as whole configs to enqueue before the sampler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig

from vitq.quant.config import LayerQuantConfig, split_block
from vitq.search import sensitivity as sens_mod
from vitq.search.budgets import BUDGETS_KEY
from vitq.search.space import SearchSpec

__all__ = ["WarmStart", "plan_warm_start", "warm_start_params"]


@dataclass(frozen=True)
class WarmStart:
    """What the solver needs besides the sensitivity: budgets it can meet, their cost table, and the widths the
    search space allows per item (items × candidates)."""

    budgets: list[float]
    table: sens_mod.CostTable
    allowed: np.ndarray
    score: str
    granularity: str


def plan_warm_start(spec: SearchSpec, model: Any, base: LayerQuantConfig, budgets: list[float],
                    metric: str = "weight_bytes", score: str = "drop_loss", granularity: str = "point",
                    input_size: tuple[int, int] | None = None) -> WarmStart:
    """The warm start's cost table (on ``input_size`` images) and allowed widths (no sensitivity needed: 0.06-2 s on
    a 12-block ViT-S); a ConfigError naming ``hydra.sweeper.warm_start_budgets`` for a budget that no config of
    those widths reaches."""
    n_blocks = len(model.blocks)
    items, candidates = sens_mod.items_of(n_blocks, granularity), sens_mod.CANDIDATES
    table = sens_mod.cost_table(model, base, candidates, metric, items, input_size)

    def fits(item: str, bits: int) -> bool:  # every parameter that sets this item's width accepts ``bits``
        block, point = split_block(item)
        keys = [sens_mod.bits_key(item)] + ([sens_mod.bits_key(sens_mod.item_name(point, b)) for b in range(n_blocks)]
                                            if block is None else [])
        return all((p := spec.param_for(k)) is None or p.accepts(bits) for k in keys)

    allowed = np.array([[fits(it, b) for b in candidates] for it in items])
    budgets = [float(b) for b in budgets]
    sens_mod.check_budgets(budgets, BUDGETS_KEY, table, allowed)
    return WarmStart(budgets, table, allowed, score, granularity)


def warm_start_params(cfg: DictConfig, spec: SearchSpec, plan: WarmStart) -> list[dict[str, Any]]:
    """The sensitivity solver's configs at the planned budgets (cached sensitivity of the swept model; a width per
    point, or per (block, point), among the widths the search space allows there), each pinned as a whole config on
    top of the sweep's base."""
    from vitq.sweep import session_of

    base, session = session_of(cfg)
    sens = sens_mod.compute_sensitivity(session.model, session.data, base, plan.table.candidates,
                                        granularity=plan.granularity,
                                        drops=plan.granularity == "point" or plan.score != "grad_score",
                                        **sens_mod.session_settings(session))
    sols = sens_mod.configs_for_budgets(sens, plan.table, plan.budgets, plan.score, plan.allowed)
    if cfg.tracking.enabled:
        sens_mod.log_to_mlflow(sens, sols, cfg.tracking.uri, spec.study_name, plan.score)
    return [spec.pinned_params(base.with_overrides(sens_mod.enqueue_params(s["bits"])), base, "warm start")
            for s in sols]
