"""What a budget of the solver is: the units it is counted in, the scores that rank items, the granularities, and
the check of budget values. Light (no torch), so that the sweeper checks its warm-start settings at once."""

from __future__ import annotations

import math

from vitq.quant.config import ConfigError

__all__ = ["BUDGETS_KEY", "BUDGET_METRICS", "GRANULARITIES", "SCORES", "check_budget_values"]

BUDGETS_KEY = "hydra.sweeper.warm_start_budgets"
SCORES = ("drop_loss", "drop_top1", "grad_score")
BUDGET_METRICS = ("weight_bytes", "bops")  # what a budget is counted in
GRANULARITIES = ("point", "block")


def check_budget_values(budgets: list[float], key: str) -> None:
    """ConfigError naming ``key`` for no budget, or one that is not a finite number > 0."""
    if not budgets:
        raise ConfigError(key, "give at least one budget")
    for b in budgets:
        if not math.isfinite(b) or b <= 0:
            raise ConfigError(key, f"a budget is a finite number > 0 (of weight bytes or BOPs), got {b!r}")
