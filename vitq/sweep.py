"""Hydra entry point: one trial of the composed config (``python -m vitq.sweep``); ``-m`` sweeps it.

A trial resolves and validates the quant sections, quantizes the (cached) FP model, derives ranges
from cached calibration statistics, evaluates, costs, logs a child run to MLflow and returns its
metrics (the objectives of vitq's Optuna sweeper).
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vitq.quant.config import SECTIONS, ConfigError, LayerQuantConfig
from vitq.schema import register

register()

QUANT_SECTIONS = ("default", *SECTIONS, "blocks")


def _clean(node: Any) -> Any:
    """Drop unset (None) fields and derived ``bit_type.name`` labels from a composed section."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if v is None or (k == "name" and "bits" in node):
                continue
            v = _clean(v)
            if isinstance(v, dict) and not v:
                continue
            out[k] = v
        return out
    return node


def layer_config_from(cfg: DictConfig) -> LayerQuantConfig:
    """The composed quant sections as a validated :class:`LayerQuantConfig` (ConfigError on bad values)."""
    raw = {s: _clean(OmegaConf.to_container(cfg[s], resolve=True)) for s in QUANT_SECTIONS if s in cfg}
    return LayerQuantConfig.from_dict(raw)


@cache
def _model(name: str, pretrained: bool, checkpoint: str | None):  # noqa: ANN202
    from vitq.models.factory import create_model

    return create_model(name, pretrained=pretrained, checkpoint=checkpoint)


@cache
def _data(name: str, root: str | None, seed: int, n_train: int, n_calib: int, n_eval: int | None,
          model_args: tuple[str, bool, str | None]):  # noqa: ANN202
    from vitq.data import load_data

    model = _model(*model_args) if name == "folder" else None
    return load_data(name, model=model, root=root, seed=seed, n_calib=n_calib, n_eval=n_eval, n_train=n_train)


def _nan_data(data):  # noqa: ANN001, ANN202
    import torch
    from torch.utils.data import TensorDataset

    x, y = next(iter(torch.utils.data.DataLoader(data.eval, batch_size=len(data.eval))))
    return type(data)(data.name + "+nan", data.calib, TensorDataset(torch.full_like(x, float("nan")), y),
                      data.num_classes, data.train, dict(data.meta))


def run(cfg: DictConfig) -> dict[str, float]:
    """One trial; returns its metrics."""
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        qcfg = layer_config_from(cfg)
    except ConfigError as e:
        if not multirun:
            print(f"vitq: invalid quant config: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    from vitq import tracking
    from vitq.data import DataError
    from vitq.models.factory import ModelError
    from vitq.trial import run_trial

    m, d = cfg.model, cfg.data
    try:
        model = _model(m.name, m.pretrained, m.checkpoint)
        data = _data(d.name, d.root, d.seed, d.n_train, d.n_calib, d.n_eval, (m.name, m.pretrained, m.checkpoint))
    except (DataError, ModelError) as e:
        if not multirun:
            print(f"vitq: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    if cfg.debug.inject_nan:
        data = _nan_data(data)
    if cfg.export_dir:

        Path(cfg.export_dir).mkdir(parents=True, exist_ok=True)
        qcfg.to_yaml(Path(cfg.export_dir) / f"quant_config_{cfg.trial_number or 0}.yaml")

    def trial() -> dict[str, float]:
        if cfg.debug.sleep_s:
            import time

            time.sleep(cfg.debug.sleep_s)
        res = run_trial(model, data, qcfg, batch_size=cfg.eval_batch_size, calib_batch_size=cfg.calib_batch_size,
                        stats_dir=cfg.stats_dir)
        return res.metrics(), res.profile

    if cfg.tracking.enabled:
        with tracking.trial_run(cfg.tracking.uri, cfg.study_name, cfg.trial_number, qcfg) as rid:
            metrics, profile = trial()
            tracking.log_result(rid, metrics, profile)
    else:
        metrics, profile = trial()
    _print_table(metrics, cfg.trial_number)
    return metrics


def _print_table(metrics: dict[str, float], number: int | None) -> None:
    label = f"trial {number}" if number is not None else "trial"
    rows = [("top-1", f"{100 * metrics['top1']:.2f} %"), ("FP top-1", f"{100 * metrics['fp_top1']:.2f} %"),
            ("agreement", f"{100 * metrics['agreement']:.2f} %"), ("weight size", f"{metrics['weight_bytes']:,.0f} B"),
            ("compression", f"{metrics['compression']:.2f}x"), ("mean W/A bits",
             f"{metrics['mean_weight_bits']:.2f} / {metrics['mean_act_bits']:.2f}"),
            ("BOPs", f"{metrics['bops']:.3e}"), ("calib/eval s", f"{metrics['calib_seconds']:.3f} / "
                                                               f"{metrics['eval_seconds']:.3f}")]
    print(f"[vitq] {label}: " + " | ".join(f"{k} {v}" for k, v in rows), flush=True)


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: works however the module is loaded


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float]:
    return run(cfg)


if __name__ == "__main__":
    # run the importable module's entry point, so that process-based launchers (joblib) can pickle the task
    from vitq.sweep import main as _main

    _main()
