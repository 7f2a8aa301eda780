"""Warm start: the sensitivity solver's configs at given budgets, as whole configs to enqueue before the sampler."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from omegaconf import DictConfig

from vitq.search.space import SearchSpec

__all__ = ["warm_start_params"]

log = logging.getLogger(__name__)


def warm_start_params(cfg: DictConfig, spec: SearchSpec, budgets: list[float], metric: str = "weight_bytes",
                      score: str = "drop_loss", granularity: str = "point") -> list[dict[str, Any]]:
    """The sensitivity solver's configs at ``budgets`` of ``metric`` (cached sensitivity of the swept model; a width
    per point, or per (block, point), among the widths the search space allows there), each pinned as a whole config
    on top of the sweep's base; infeasible budgets are skipped with a warning."""
    from vitq.quant.config import split_block
    from vitq.search import sensitivity as sens_mod
    from vitq.sweep import session_of

    base, session = session_of(cfg)
    model, data = session.model, session.data
    sens = sens_mod.compute_sensitivity(model, data, base, batch_size=cfg.calib_batch_size, granularity=granularity,
                                        drops=granularity == "point" or score != "grad_score")
    table = sens_mod.cost_table(model, base, sens.candidates, metric, sens.items)
    n_blocks = len(model.blocks)

    def fits(item: str, bits: int) -> bool:  # every parameter that sets this item's width accepts ``bits``
        block, point = split_block(item)
        keys = [sens_mod.bits_key(item)] + ([sens_mod.bits_key(sens_mod.item_name(point, b)) for b in range(n_blocks)]
                                            if block is None else [])
        return all((p := spec.param_for(k)) is None or p.accepts(bits) for k in keys)

    allowed = np.array([[fits(it, b) for b in sens.candidates] for it in sens.items])
    sols = sens_mod.configs_for_budgets(sens, table, [float(b) for b in budgets], score, allowed)
    for s in sols:
        if not s["feasible"]:
            log.warning("warm start: budget %s %s is infeasible; skipped", s["budget"], metric)
    if cfg.tracking.enabled:
        sens_mod.log_to_mlflow(sens, sols, cfg.tracking.uri, spec.study_name, score)
    return [spec.pinned_params(base.with_overrides(sens_mod.enqueue_params(s["bits"])), base, "warm start")
            for s in sols if s["feasible"]]
