"""``python -m vitq.bench``: what a trial costs, as ratios measured in one process and one run.

Machine noise cancels in ratios, so every figure is a ratio to a reference measured beside it:

- ``trial_over_fp_eval``: median wall time of a full trial (config → ranges from cached statistics →
  evaluation → cost), trials 2..N with distinct configs, over the median FP evaluation pass of the same
  images (FP passes timed before and between the trials);
- ``calib_passes_after_first``: calibration forward passes spent by trials 2..N (goal 0);
- ``fakequant_over_fp_forward``: an int8-everywhere forward over the FP forward of the same batch;
- ``trials_per_hour``: the default ``mixed_precision`` search (TPE), MLflow tracking included;
- ``stats_memory_over_calib_batch``: bytes of the kept calibration statistics over the bytes of one
  calibration batch's activations at every quantization point;
- observers on one 1M-element activation tensor with an outlier channel: time and fake-quant MSE of
  vitq's OMSE and KL (ranges from the cached statistics), per tensor and per channel, against ``torch.ao``'s
  HistogramObserver and an FQ-ViT-style OMSE loop (PerChannelMinMaxObserver reported beside the per-channel ones).

Each model figure runs on the digits reference and on a ``vit_small_patch16_224``-sized timm model with
random weights (no download). ``--quick`` shrinks image counts and repetitions for CI.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import operator
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from vitq.calibrate import calibrated_model, clear_cache
from vitq.data import DataBundle, batches
from vitq.evaluate import evaluate
from vitq.paths import CONF_DIR
from vitq.quant.config import ACTIVATION_POINTS, BitTypeConfig, LayerQuantConfig, QuantConfig, load_config_from_yaml
from vitq.quant.modules import STATS_MAX_ELEMENTS
from vitq.quant.observers import BatchStats, create_observer
from vitq.quant.quantizers import affine_qparams, fake_quant_uniform, uniform_qparams
from vitq.trial import run_trial

__all__ = ["MODEL_FIGURES", "OBSERVER_FIGURES", "main", "run_bench"]

MODEL_FIGURES = ("trial_over_fp_eval", "calib_passes_after_first", "fakequant_over_fp_forward", "trials_per_hour",
                 "stats_memory_over_calib_batch", "fp_eval_ms", "trial_ms")
OBSERVER_FIGURES = ("omse_ms", "kl_ms", "omse_mse", "kl_mse", "reference_ms", "reference_mse", "fqvit_loop_ms",
                    "fqvit_loop_mse", "stats_ms", "omse_over_reference_time", "kl_over_reference_time",
                    "omse_speedup_vs_fqvit", "kl_speedup_vs_fqvit", "omse_mse_over_reference",
                    "kl_mse_over_reference")
GOALS = {"digits.trial_over_fp_eval": "<= 2.0", "vit_small.trial_over_fp_eval": "<= 1.3",
         "*.calib_passes_after_first": "== 0", "*.fakequant_over_fp_forward": "<= 1.5",
         "observers.*.{omse,kl}_over_reference_time": "<= 1", "observers.*.{omse,kl}_speedup_vs_fqvit": ">= 50",
         "observers.*.{omse,kl}_mse_over_reference": "<= 1"}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _times(fn: Callable[[], Any], reps: int) -> list[float]:
    """Wall times of ``fn`` (CUDA work synchronised before each clock read)."""
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    model: nn.Module
    data: DataBundle
    batch_size: int
    n_trials: int
    n_search_trials: int
    reps: int


def _session(overrides: list[str], device: str):  # noqa: ANN202
    from vitq.sweep import compose, session_of

    ov = [*overrides, f"device={device}"]
    return session_of(compose(ov), ov)[1]


def digits_workload(quick: bool, device: str = "cpu") -> Workload:
    s = _session([], device)
    return Workload("digits", s.model, s.data, 512, 6 if quick else 16, 6 if quick else 20, 5 if quick else 15)


def config_workload(quick: bool, device: str = "cpu", overrides: tuple[str, ...] = ()) -> Workload:
    """The model and data of the sweep's Hydra ``overrides`` (``model=timm ... data=folder ...``)."""
    s = _session(list(overrides), device)
    return Workload("config", s.model, s.data, s.eval_batch_size, 6 if quick else 16, 6 if quick else 20,
                    3 if quick else 8)


def vit_small_workload(quick: bool, device: str = "cpu", n_eval: int | None = None) -> Workload:
    """A ``vit_small_patch16_224``-sized timm ViT with random weights on random 224×224 images."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10).eval().to(device)
    n_calib, n_eval = (8, n_eval or 16) if quick else (32, n_eval or 256)
    g = torch.Generator().manual_seed(0)

    def images(n: int) -> TensorDataset:
        return TensorDataset(torch.randn(n, 3, 224, 224, generator=g), torch.randint(0, 10, (n,), generator=g))

    data = DataBundle("synthetic224", images(n_calib), images(n_eval), 10,
                      meta={"calib_fingerprint": f"synthetic224-{n_calib}",
                            "eval_fingerprint": f"synthetic224-{n_eval}"})
    return Workload("vit_small", model, data, 64, 3 if quick else 4, 3 if quick else 4, 2)


def trial_configs(n: int) -> list[LayerQuantConfig]:
    """``n`` distinct configs, as a search visits them: presets, other observers, bits and alpha."""
    int8 = load_config_from_yaml(CONF_DIR / "quant" / "int8.yaml")
    variants = [int8, load_config_from_yaml(CONF_DIR / "quant" / "w4a8.yaml")]
    observers = ["PercentileObserver", "OmseObserver", "KLObserver", "MinmaxObserver"]
    i = 0
    while len(variants) < n:
        obs = observers[i % len(observers)]
        bits = (8, 6, 4, 5)[i % 4]
        over = {f"{sec}.{p}.observer_type": obs for sec, p in (("attn_layer", "mlp_act"), ("layers", "norm1"),
                                                                 ("residual_layer", "residual1"))}
        over |= {"layers.mlp_fc1.bit_type.bits": bits, "layers.attn_qkv.bit_type.bits": bits,
                 "attn_layer.mlp_act.percentile_alpha": 0.999 - 0.001 * i}
        variants.append(int8.with_overrides(over))
        i += 1
    return variants[:n]


# ---------------------------------------------------------------------------------------------- model figures
def _activation_bytes(qmodel: nn.Module, points: list, x: Tensor) -> int:
    """Bytes of the activations every activation point sees for one batch ``x`` (FP forward)."""
    total = 0

    def hook(_m: nn.Module, args: tuple, _out: Any) -> None:
        nonlocal total
        total += args[0].numel() * args[0].element_size()

    handles = [p.register_forward_hook(hook) for p in points]
    states = [p.state for p in points]
    try:
        for p in points:
            p.state = "fp"
        with torch.inference_mode():
            qmodel(x)
    finally:
        for p, s in zip(points, states, strict=True):
            p.state = s
        for h in handles:
            h.remove()
    return total


def trials_per_hour(w: Workload, search: str = "mixed_precision") -> float:
    """Throughput of the search definition ``search`` (TPE, MLflow tracking to a temporary store)."""
    import optuna

    from vitq import tracking
    from vitq.search.space import load_search

    spec = load_search(search)
    base = load_config_from_yaml(CONF_DIR / "quant" / "int8.yaml")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=list(spec.objectives.values()), sampler=spec.make_sampler())
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        tracking.use_store(uri, "bench")  # create the store before timing
        times = []
        for _ in range(w.n_search_trials):
            t0 = time.perf_counter()
            trial = study.ask()
            cfg = base.with_overrides(spec.suggest_overrides(trial))
            with tracking.trial_run(uri, "bench", trial.number, cfg, params=trial.params) as run:
                res = run_trial(w.model, w.data, cfg, batch_size=w.batch_size)
                run.finish(res.metrics(), res.profile)
            study.tell(trial, [res.metrics()[k] for k in spec.objectives])
            times.append(time.perf_counter() - t0)
    return 3600.0 / statistics.mean(times[1:] or times)


def bench_model(w: Workload) -> dict[str, float]:
    clear_cache()
    torch.manual_seed(0)

    def fp_pass() -> None:
        evaluate(w.model, w.data.eval, w.batch_size)

    fp_pass()  # warm-up
    fp_times = _times(fp_pass, w.reps)
    times, passes = [], []
    for i, cfg in enumerate(trial_configs(w.n_trials)):
        t0 = time.perf_counter()
        res = run_trial(w.model, w.data, cfg, batch_size=w.batch_size)
        times.append(time.perf_counter() - t0)
        passes.append(res.calib_passes)
        if i:  # an FP pass beside every timed trial: slow drifts of the machine hit both sides
            fp_times += _times(fp_pass, 1)
    fp_eval, trial = statistics.median(fp_times), statistics.median(times[1:])

    int8 = trial_configs(1)[0]
    qm, _ = calibrated_model(w.model, w.data, int8)
    x, _ = next(batches(w.data.eval, w.batch_size))
    with torch.inference_mode():
        w.model(x), qm(x)  # warm-up
        fwd: dict[str, list[float]] = {"fp": [], "q": []}
        for _ in range(w.reps):  # in turn, as every ratio here
            fwd["fp"] += _times(lambda: w.model(x), 1)
            fwd["q"] += _times(lambda: qm(x), 1)
        fp_fwd, q_fwd = statistics.median(fwd["fp"]), statistics.median(fwd["q"])
    points = qm.points()
    stats_bytes = sum(s.nbytes for p in points for s in p.stats)
    cx, _ = next(batches(w.data.calib, 128))
    act_points = [p for p in points if p.key in ACTIVATION_POINTS]
    calib_bytes = _activation_bytes(qm, act_points, cx)
    return {"trial_over_fp_eval": trial / fp_eval, "calib_passes_after_first": float(sum(passes[1:])),
            "fakequant_over_fp_forward": q_fwd / fp_fwd, "trials_per_hour": trials_per_hour(w),
            "stats_memory_over_calib_batch": stats_bytes / calib_bytes, "fp_eval_ms": 1e3 * fp_eval,
            "trial_ms": 1e3 * trial, "first_trial_over_fp_eval": times[0] / fp_eval,
            "n_eval_images": float(len(w.data.eval)), "stats_mb": stats_bytes / 2**20}


# ---------------------------------------------------------------------------------------------- observers
def outlier_activation(rows: int = 4096, channels: int = 256, seed: int = 0) -> Tensor:
    """1M post-LayerNorm-like values with one outlier channel (as in ViT LayerNorm inputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, generator=g) * (0.5 + torch.rand(channels, generator=g))
    x[:, 7] = x[:, 7] * 20 + 5
    return x


def _qparams_mse(x: Tensor, scale: Tensor, zp: Tensor, bt: BitTypeConfig) -> float:
    """Fake-quant MSE of ``x`` (R, C) on a per-tensor (0-d) or per-column (C,) grid."""
    shape = (1, -1) if scale.ndim else ()
    q = fake_quant_uniform(x, scale.float().reshape(shape), zp.reshape(shape), bt.qmin, bt.qmax)
    return float((q - x).pow(2).mean())


def _fq_mse(x: Tensor, lo: Tensor, hi: Tensor, bt: BitTypeConfig, affine: bool = False) -> float:
    """Fake-quant MSE of the range (lo, hi) on the grid its observer quantizes it on (affine for OMSE)."""
    return _qparams_mse(x, *(affine_qparams if affine else uniform_qparams)(lo, hi, bt), bt)


def fqvit_omse_loop(x: Tensor, bt: BitTypeConfig, channel_wise: bool) -> tuple[Tensor, Tensor]:
    """FQ-ViT's OMSE: 90 clip candidates, each fake-quantizing the full tensor (a plain Python loop)."""
    lo0, hi0 = (x.amin(0), x.amax(0)) if channel_wise else (x.min(), x.max())
    best = torch.full(lo0.shape, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for i in range(90):
        lo, hi = lo0 * (1.0 - 0.01 * i), hi0 * (1.0 - 0.01 * i)
        scale, zp = affine_qparams(lo, hi, bt)
        q = (torch.clamp(torch.round(x / scale + zp), bt.qmin, bt.qmax) - zp) * scale
        score = (x - q).abs().pow(2).mean(0) if channel_wise else (x - q).abs().pow(2).mean()
        better = score < best
        best = torch.where(better, score, best)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


def bench_observers(quick: bool) -> dict[str, dict[str, float]]:
    """Our OMSE/KL (ranges from cached statistics) against torch.ao's HistogramObserver and the FQ-ViT loop.

    HistogramObserver (per tensor: torch.ao has no per-channel histogram observer) is the reference of both
    modes (the goals name it); PerChannelMinMaxObserver is reported beside the per-channel figures. Every
    repetition times each contender once, in turn, so a slow spell of the machine hits all of them.
    """
    from torch.ao.quantization.observer import HistogramObserver, PerChannelMinMaxObserver

    x = outlier_activation()
    bt = BitTypeConfig(bits=8, signed=True)
    reps, loop_reps = (3, 1) if quick else (7, 3)
    t0 = time.perf_counter()
    stats = BatchStats.from_2d(x, STATS_MAX_ELEMENTS, seed=0)
    stats_ms = 1e3 * (time.perf_counter() - t0)

    def ours(mode: str, obs_name: str) -> Callable[[], tuple[Tensor, Tensor]]:
        cfg = QuantConfig(calibration_mode=mode, bit_type=bt, observer_type=obs_name)

        def derive() -> tuple[Tensor, Tensor]:
            obs = create_observer(cfg)
            obs.update(stats)
            return obs.compute()
        return derive

    def histogram() -> tuple[Tensor, Tensor]:
        o = HistogramObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        o(x)
        return o.calculate_qparams()

    def minmax_per_channel() -> tuple[Tensor, Tensor]:
        o = PerChannelMinMaxObserver(ch_axis=1, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        o(x)
        return o.calculate_qparams()

    modes = {"per_tensor": "layer_wise", "per_channel": "channel_wise"}
    ranges = {f"{m}.{short}": ours(mode, obs) for m, mode in modes.items()
              for obs, short in (("OmseObserver", "omse"), ("KLObserver", "kl"))}
    fits = {"reference": histogram, "perchannel_minmax": minmax_per_channel}
    loops = {f"{m}.fqvit_loop": (lambda cw=(mode == "channel_wise"): fqvit_omse_loop(x, bt, cw))
             for m, mode in modes.items()}
    times: dict[str, list[float]] = {}
    last: dict[str, tuple[Tensor, Tensor]] = {}  # each contender's result, for its MSE
    for rep in range(reps):
        for name, fn in (ranges | fits | (loops if rep < loop_reps else {})).items():
            t0 = time.perf_counter()
            last[name] = fn()
            times.setdefault(name, []).append(time.perf_counter() - t0)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}

    ref_mse = _qparams_mse(x, *last["reference"], bt)
    out: dict[str, dict[str, float]] = {}
    for m, mode in modes.items():
        fig: dict[str, float] = {"stats_ms": stats_ms, "reference_ms": ms["reference"], "reference_mse": ref_mse,
                                 "fqvit_loop_ms": ms[f"{m}.fqvit_loop"],
                                 "fqvit_loop_mse": _fq_mse(x, *last[f"{m}.fqvit_loop"], bt, affine=True)}
        for short in ("omse", "kl"):
            fig[f"{short}_ms"] = ms[f"{m}.{short}"]
            fig[f"{short}_mse"] = _fq_mse(x, *last[f"{m}.{short}"], bt, affine=short == "omse")
            fig[f"{short}_over_reference_time"] = fig[f"{short}_ms"] / fig["reference_ms"]
            fig[f"{short}_speedup_vs_fqvit"] = fig["fqvit_loop_ms"] / fig[f"{short}_ms"]
            fig[f"{short}_mse_over_reference"] = fig[f"{short}_mse"] / fig["reference_mse"]
        if mode == "channel_wise":
            fig["perchannel_minmax_ms"] = ms["perchannel_minmax"]
            fig["perchannel_minmax_mse"] = _qparams_mse(x, *last["perchannel_minmax"], bt)
        out[m] = fig
    return out


# ---------------------------------------------------------------------------------------------- driver
def run_bench(quick: bool = False, models: tuple[str, ...] = ("digits", "vit_small"),
              log: Callable[[str], None] = print, device: str = "cpu",
              overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    torch.set_grad_enabled(False)
    from vitq.session import resolve_device

    dev = str(resolve_device(device))
    result: dict[str, Any] = {"meta": {"quick": quick, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                       "machine": platform.machine(), "python": platform.python_version(),
                                       "device": dev,
                                       "gpu": torch.cuda.get_device_name(dev) if dev.startswith("cuda") else None},
                              "goals": GOALS}
    makers: dict[str, Callable[[], Workload]] = {
        "digits": lambda: digits_workload(quick, dev), "vit_small": lambda: vit_small_workload(quick, dev),
        "config": lambda: config_workload(quick, dev, overrides)}
    for name in models:
        log(f"[bench] {name} on {dev} ...")
        result[name] = bench_model(makers[name]())
    log("[bench] observers ...")
    result["observers"] = bench_observers(quick)
    return result


def flat_figures(result: dict[str, Any]) -> dict[str, float]:
    """Every measured figure under a dotted name (``digits.trial_over_fp_eval``)."""
    out: dict[str, float] = {}
    for name, figs in result.items():
        if name in ("meta", "goals", "goal_status"):
            continue
        for k, v in figs.items():
            if isinstance(v, dict):
                out.update({f"{name}.{k}.{kk}": float(vv) for kk, vv in v.items()})
            else:
                out[f"{name}.{k}"] = float(v)
    return out


def _expand_braces(pattern: str) -> list[str]:
    """``a.{b,c}_d`` → ``[a.b_d, a.c_d]`` (the shorthand of :data:`GOALS`)."""
    m = re.search(r"\{([^}]*)\}", pattern)
    if m is None:
        return [pattern]
    return [p for alt in m.group(1).split(",") for p in _expand_braces(pattern[:m.start()] + alt + pattern[m.end():])]


_COMPARE: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}


def goal_status(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every figure a goal of :data:`GOALS` names: the goal and whether this run met it."""
    figures = flat_figures(result)
    status: dict[str, dict[str, Any]] = {}
    for pattern, goal in result.get("goals", GOALS).items():
        op, bound = goal.split()
        for pat in _expand_braces(pattern):
            for name in fnmatch.filter(figures, pat):
                status[name] = {"goal": goal, "met": _COMPARE[op](figures[name], float(bound))}
    return status


def format_table(result: dict[str, Any]) -> str:
    status = goal_status(result)
    rows = []
    for k, v in flat_figures(result).items():
        goal = status.get(k)
        mark = "" if goal is None else f"{goal['goal']:>8}  {'met' if goal['met'] else 'NOT MET'}"
        rows.append(f"{k:<55} {v:>14.4g}  {mark}".rstrip())
    met = sum(g["met"] for g in status.values())
    return "\n".join([f"{'figure':<55} {'value':>14}  {'goal':>8}", "-" * 88, *rows, "-" * 88,
                      f"goals met: {met} of {len(status)}"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vitq.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small image counts and repetitions (CI)")
    ap.add_argument("--out", default="bench.json", help="JSON file for the figures (default: bench.json)")
    ap.add_argument("--models", default=None,
                    help="comma-separated: digits, vit_small, config (default: digits,vit_small; config alone when "
                         "OVERRIDES are given)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    ap.add_argument("overrides", nargs="*", metavar="OVERRIDES",
                    help="the sweep's Hydra overrides for the config workload: model=timm ... data=folder ...")
    args = ap.parse_args(argv)
    models = tuple(m for m in (args.models or ("config" if args.overrides else "digits,vit_small")).split(",") if m)
    unknown = set(models) - {"digits", "vit_small", "config"}
    if unknown:
        ap.error(f"--models: unknown {sorted(unknown)}; choose from digits, vit_small, config")
    from vitq.session import SessionError

    try:
        result = run_bench(args.quick, models, device=args.device, overrides=tuple(args.overrides))
    except SessionError as e:
        print(f"vitq: {e}", file=sys.stderr)
        return 2
    result["goal_status"] = goal_status(result)
    print(format_table(result))
    bad = {k: v for k, v in flat_figures(result).items() if not math.isfinite(v)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"[bench] wrote {args.out}")
    if bad:
        print(f"[bench] non-finite figures: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
