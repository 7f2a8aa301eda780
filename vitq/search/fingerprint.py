"""A study's fingerprint: everything its trials share and do not search, stored with the study so that a rerun or
another worker with other inputs (model, checkpoint, data, batch sizes, fixed quant keys) is refused."""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vitq.search.space import SearchSpec, expand_key

__all__ = ["FINGERPRINT_ATTR", "fingerprint_diff", "study_fingerprint"]


FINGERPRINT_ATTR = "vitq:fingerprint"


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def study_fingerprint(cfg: DictConfig, spec: SearchSpec, session: Any) -> dict[str, Any]:
    """Everything a study's trials share and do not search: model, checkpoint, data, batch sizes, and every
    quant key outside the search space (JSON values, so it round-trips through Optuna's storage)."""
    from vitq.sweep import QUANT_SECTIONS

    searched = {k for p in spec.params for k in expand_key(p.name)}
    quant = _flat({s: OmegaConf.to_container(cfg[s], resolve=True) for s in QUANT_SECTIONS if s in cfg})
    quant = {f"quant:{k}": v for k, v in sorted(quant.items()) if k not in searched and v is not None}
    fp = {**session.fingerprint(), "eval_batch_size": int(cfg.eval_batch_size),
          "calib_batch_size": int(cfg.calib_batch_size), **quant}
    return json.loads(json.dumps(fp, default=str))


def fingerprint_diff(stored: dict[str, Any], now: dict[str, Any], limit: int = 3) -> str:
    """``key: stored -> now`` for the first keys that differ."""
    keys = [k for k in dict.fromkeys([*stored, *now]) if stored.get(k) != now.get(k)]
    parts = [f"{k.removeprefix('quant:')}: {stored.get(k)!r} -> {now.get(k)!r}" for k in keys[:limit]]
    return "; ".join(parts) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
