"""``python -m vitq.bench``: what a trial and a sweep cost, as ratios measured in one process and one run.

Machine noise cancels in ratios, so every figure is a ratio to a reference measured beside it:

- ``trial_over_fp_eval``: wall time of a full trial (config → ranges from cached statistics → evaluation →
  cost) over the FP evaluation pass of the same images timed right after it, median over trials 2..N with
  distinct configs (CUDA events on a GPU);
- what that ratio is made of (informational): ``quant_eval_over_fp_eval``, the trial's quantized model evaluated
  alone (no profile, no cost; timed after the FP pass) over that FP pass, and ``trial_over_quant_eval``, the trial
  over that pass (the trial's own work beyond its forward passes: new ranges, the profile, the cost);
- ``calib_passes_after_first``: calibration forward passes spent by trials 2..N (goal 0);
- ``fakequant_over_fp_forward``: an int8-everywhere forward over the FP forward of the same batch, timed in turn
  (median of the pairs);
- ``peak_memory_over_fp_eval``: peak memory of a trial over that of an FP evaluation pass (resident set on the
  CPU, CUDA's peak allocation on a GPU);
- ``trials_per_hour``: in-process ``run_trial`` calls of the ``mixed_precision`` search with MLflow logging;
- ``sweep``: a real ``python -m vitq.sweep -m`` search on digits: marginal wall time per trial against the trials'
  own calibration + evaluation time (``marginal_over_compute``; ``bookkeeping_ms`` is the difference);
- ``scaling``: trial cost against model size (timm ViT-Ti/S/B, random weights) and eval image count;
- ``stats_memory_over_calib_batch``: bytes of the kept calibration statistics over the bytes of one
  calibration batch's activations at every quantization point;
- observers on one 1M-element activation tensor with an outlier channel: time and fake-quant MSE of vitq's OMSE
  and KL (ranges from the cached statistics) against ``torch.ao``'s HistogramObserver in the same run, per tensor
  and per channel; FQ-ViT's OMSE loop, PerChannelMinMaxObserver and ``kl_parallel_speedup`` (KL on one thread
  over KL as it runs: what the other cores gave in this run) are informational rows.

Each judged timing ratio is the median of the ratios of measurements taken one right after the other (a trial and
the FP pass after it, the two forwards of one repetition, one observer repetition), so a drift of the machine cancels
pair by pair. ``<ratio>_pairs_q25`` and ``_pairs_q75`` are those ratios' quartiles: they show how far this run's
machine moved the figure, and the verdict names a missed goal whose bound lies between them.

Model figures run on the digits reference, a ``vit_small_patch16_224``-sized timm model with random weights (no
download) and a small-image timm ViT on PNG folders (``folder``). ``--quick`` shrinks image counts and repetitions
for CI and judges no goals.
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

from vitq.allocator import release_freed_memory, retain_freed_memory
from vitq.calibrate import calibrated_model, clear_cache
from vitq.data import DataBundle, batches
from vitq.evaluate import evaluate, model_device
from vitq.paths import CONF_DIR
from vitq.quant.config import (
    ACTIVATION_POINTS,
    BitTypeConfig,
    ConfigError,
    LayerQuantConfig,
    QuantConfig,
    load_config_from_yaml,
)
from vitq.quant.modules import STATS_MAX_ELEMENTS
from vitq.quant.observers import BatchStats, create_observer
from vitq.quant.quantizers import affine_qparams, fake_quant_uniform, uniform_qparams
from vitq.trial import run_trial

__all__ = ["MODEL_FIGURES", "OBSERVER_FIGURES", "SWEEP_FIGURES", "bench_sweep", "host_device_copies", "main",
           "run_bench"]

MODEL_FIGURES = ("trial_over_fp_eval", "quant_eval_over_fp_eval", "trial_over_quant_eval", "calib_passes_after_first",
                 "fakequant_over_fp_forward", "trials_per_hour", "stats_memory_over_calib_batch", "fp_eval_ms",
                 "trial_ms", "peak_memory_over_fp_eval")
SWEEP_FIGURES = ("n_trials", "marginal_ms", "compute_ms", "compute_median_ms", "marginal_over_compute",
                 "bookkeeping_ms", "trials_per_hour", "exit_code")
OBSERVER_FIGURES = ("omse_ms", "kl_ms", "omse_mse", "kl_mse", "reference_ms", "reference_mse", "fqvit_loop_ms",
                    "fqvit_loop_mse", "stats_ms", "omse_over_reference_time", "kl_over_reference_time",
                    "omse_speedup_vs_fqvit", "kl_speedup_vs_fqvit", "omse_mse_over_reference",
                    "kl_mse_over_reference", "kl_1thread_ms", "kl_parallel_speedup")
GOALS = {"digits.trial_over_fp_eval": "<= 1.5", "{vit_small,folder}.trial_over_fp_eval": "<= 1.2",
         "*.calib_passes_after_first": "== 0", "*.fakequant_over_fp_forward": "<= 1.3",
         "*.peak_memory_over_fp_eval": "<= 1.5", "sweep.marginal_over_compute": "<= 1.5",
         "observers.per_tensor.{omse_over_reference_time,omse_mse_over_reference,kl_over_reference_time}": "<= 1",
         "observers.per_channel.kl_over_reference_time": "<= 1.5"}
PAIRS_Q25, PAIRS_Q75 = "_pairs_q25", "_pairs_q75"  # suffixes of a judged ratio's spread (pair_ratios)

_CUDA = False  # set by run_bench when the bench runs on a GPU


def _times(fn: Callable[[], Any], reps: int) -> list[float]:
    """Wall times of ``fn``: on a GPU from CUDA events around it (synchronised), else the host clock."""
    times = []
    for _ in range(reps):
        if _CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def pair_ratios(name: str, num: list[float], den: list[float]) -> dict[str, float]:
    """The ratio ``name`` of measurements taken one right after the other (``num[i] / den[i]``): the median of the
    pairs' ratios, which a goal judges, and their quartiles ``{name}_pairs_q25``/``_q75``, which show how far this
    run's machine moved it. A drift of the machine hits both sides of a pair, so it cancels pair by pair."""
    r = [a / b for a, b in zip(num, den, strict=True)]
    if not r:
        raise ValueError(f"{name}: no pairs measured")
    q = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else r * 3
    return {name: statistics.median(r), f"{name}{PAIRS_Q25}": q[0], f"{name}{PAIRS_Q75}": q[2]}


def host_device_copies(fn: Callable[[], Any]) -> int:
    """The profiler's host→device and device→host copies (Memcpy HtoD / DtoH records) while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.key.startswith(("Memcpy HtoD", "Memcpy DtoH")))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_memory(fn: Callable[[], Any]) -> float:
    """Peak memory while ``fn`` runs: CUDA's peak allocation on a GPU; else the process's resident set, sampled
    every millisecond (Linux ``/proc``)."""
    if _CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated())
    import gc
    import threading

    gc.collect()
    release_freed_memory()  # the heap kept for reuse is not this pass's memory
    peak = [_rss()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.001):
            peak[0] = max(peak[0], _rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    return float(max(peak[0], _rss()))


# ---------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    model: nn.Module
    data: DataBundle
    batch_size: int
    n_trials: int
    n_search_trials: int
    reps: int  # alternated FP / fake-quant forwards of one batch


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
    return Workload("vit_small", model, data, 64, 3 if quick else 5, 3 if quick else 4, 2 if quick else 4)


def folder_workload(quick: bool, device: str = "cpu", n_eval: int | None = None) -> Workload:
    """A small-image timm ViT (32×32, patch 4, 4 blocks, dim 96; random weights) on PNG class folders written from
    digits upsampled to 32×32, read through the decoded-image cache like a user's folders."""
    import timm
    from PIL import Image

    from vitq.data import digits_pixels, load_image_folder
    from vitq.paths import cache_root

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4,
                              depth=4, embed_dim=96, num_heads=3).eval().to(device)
    pixels, labels = digits_pixels()
    root = cache_root("bench") / "digits32"
    for i, (img, label) in enumerate(zip(pixels, labels, strict=True)):
        split = "calib" if i % 4 == 0 else "eval"
        path = root / split / str(int(label)) / f"{i:04d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).resize((32, 32), Image.BILINEAR).convert("RGB").save(path)
    n_eval = n_eval or (64 if quick else 1024)
    data = load_image_folder(model, calib_root=root / "calib", eval_root=root / "eval", n_calib=64 if quick else 256,
                             n_eval=n_eval, num_workers=2)
    return Workload("folder", model, data, 256, 6 if quick else 12, 6 if quick else 20, 3 if quick else 20)


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
    """In-process throughput of the search definition ``search`` (TPE, MLflow tracking to a temporary store):
    ``run_trial`` called in a loop, without Hydra or the sweeper; the ``sweep`` section measures what a user runs."""
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


def _paired_trials(w: Workload) -> tuple[list[float], list[float], list[float], list[float]]:
    """Trials of ``trial_configs(w.n_trials)`` from a cold cache (the first calibrates); each of trials 2..N is
    followed by an FP evaluation pass of the same images, then by an evaluation pass of that trial's quantized model
    alone (no profile, no cost): (trial times, FP times and quantized-eval times of trials 2..N, calibration passes).
    """
    clear_cache()
    _fp_eval(w)  # warm-up
    times: list[float] = []
    fp_times: list[float] = []
    q_times: list[float] = []
    passes: list[float] = []
    for i, cfg in enumerate(trial_configs(w.n_trials)):
        out: list = []
        times += _times(lambda cfg=cfg, out=out: out.append(run_trial(w.model, w.data, cfg, batch_size=w.batch_size)),
                        1)
        passes.append(float(out[0].calib_passes))
        if i:  # an FP pass right after every timed trial: both sides of the ratio come from the same minutes
            fp_times += _times(lambda: _fp_eval(w), 1)
            qm = calibrated_model(w.model, w.data, cfg)[0]  # set to cfg outside the timing (the trial paid for it)
            q_times += _times(lambda qm=qm: evaluate(qm, w.data.eval, w.batch_size), 1)
    return times, fp_times, q_times, passes


def _fp_eval(w: Workload) -> None:
    evaluate(w.model, w.data.eval, w.batch_size)


def _trial_ratios(times: list[float], fp_times: list[float], q_times: list[float]) -> dict[str, float]:
    """``trial_over_fp_eval`` (each trial, the FP pass after it) and what it is made of: the quantized model's own
    eval pass over FP's, and the trial over that pass; each with its pairs' quartiles (:func:`pair_ratios`)."""
    return (pair_ratios("trial_over_fp_eval", times[1:], fp_times)
            | pair_ratios("quant_eval_over_fp_eval", q_times, fp_times)
            | pair_ratios("trial_over_quant_eval", times[1:], q_times))


def bench_model(w: Workload) -> dict[str, float]:
    torch.manual_seed(0)
    times, fp_times, q_times, passes = _paired_trials(w)
    fp_eval, trial = statistics.median(fp_times), statistics.median(times[1:])
    ratios = _trial_ratios(times, fp_times, q_times)

    int8 = trial_configs(1)[0]
    qm, _ = calibrated_model(w.model, w.data, int8)
    dev = model_device(w.model)
    x, _ = next(batches(w.data.eval, w.batch_size, dev))
    with torch.inference_mode():
        w.model(x), qm(x)  # warm-up
        fwd: dict[str, list[float]] = {"fp": [], "q": []}
        for _ in range(w.reps):  # in turn, as every ratio here
            fwd["fp"] += _times(lambda: w.model(x), 1)
            fwd["q"] += _times(lambda: qm(x), 1)
        ratios |= pair_ratios("fakequant_over_fp_forward", fwd["q"], fwd["fp"])
    copies = {}
    if _CUDA:  # host<->device copies of a trial, at the batch size and at a quarter of it (4× the eval batches)
        cfg = trial_configs(w.n_trials + 2)[-1]
        for key, bs in (("", w.batch_size), ("_quarter_batch", max(1, w.batch_size // 4))):
            run_trial(w.model, w.data, cfg, batch_size=bs)  # warm: this batch size's FP reference
            copies[f"host_device_copies_per_trial{key}"] = float(
                host_device_copies(lambda bs=bs: run_trial(w.model, w.data, cfg, batch_size=bs)))
            copies[f"eval_batches{key}"] = float(math.ceil(len(w.data.eval) / bs))
    fp_peak = peak_memory(lambda: _fp_eval(w))
    trial_peak = peak_memory(lambda: run_trial(w.model, w.data, trial_configs(w.n_trials + 1)[-1],
                                               batch_size=w.batch_size))
    points = qm.points()
    stats_bytes = sum(s.nbytes for p in points for s in p.stats)
    cx, _ = next(batches(w.data.calib, 128, dev))
    act_points = [p for p in points if p.key in ACTIVATION_POINTS]
    calib_bytes = _activation_bytes(qm, act_points, cx)
    return {"trial_over_fp_eval": ratios.pop("trial_over_fp_eval"),
            "quant_eval_over_fp_eval": ratios.pop("quant_eval_over_fp_eval"),
            "trial_over_quant_eval": ratios.pop("trial_over_quant_eval"),
            "calib_passes_after_first": float(sum(passes[1:])),
            "fakequant_over_fp_forward": ratios.pop("fakequant_over_fp_forward"), "trials_per_hour": trials_per_hour(w),
            "peak_memory_over_fp_eval": trial_peak / fp_peak, "peak_memory_mb": trial_peak / 2**20,
            "stats_memory_over_calib_batch": stats_bytes / calib_bytes, "fp_eval_ms": 1e3 * fp_eval,
            "trial_ms": 1e3 * trial, "first_trial_over_fp_eval": times[0] / fp_eval,
            "n_eval_images": float(len(w.data.eval)), "stats_mb": stats_bytes / 2**20, **copies, **ratios}


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
    repetition times each contender once, in turn, so a slow spell of the machine hits all of them. KL also runs on
    one thread: ``kl_parallel_speedup`` (one thread's time over the usual) shows what the other cores gave in this
    run. KL's passes run on every core, the reference's mostly on one, so a spell in which a VM's second core runs
    slow moves KL's ratio and hardly the reference (docs/performance.md).
    """
    from torch.ao.quantization.observer import HistogramObserver, PerChannelMinMaxObserver

    x = outlier_activation()
    bt = BitTypeConfig(bits=8, signed=True)
    reps, loop_reps = (3, 1) if quick else (25, 3)  # medians of 25: a 10-30 ms figure swings ±50 % on a busy VM
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

    def one_thread(fn: Callable[[], tuple[Tensor, Tensor]]) -> Callable[[], tuple[Tensor, Tensor]]:
        def run() -> tuple[Tensor, Tensor]:
            n = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return fn()
            finally:
                torch.set_num_threads(n)
        return run

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
    ranges |= {f"{m}.kl_1thread": one_thread(ranges[f"{m}.kl"]) for m in modes}  # how much the 2nd core gave
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
            fig |= pair_ratios(f"{short}_over_reference_time", times[f"{m}.{short}"], times["reference"])
            fig[f"{short}_speedup_vs_fqvit"] = fig["fqvit_loop_ms"] / fig[f"{short}_ms"]
            fig[f"{short}_mse_over_reference"] = fig[f"{short}_mse"] / fig["reference_mse"]
        fig["kl_1thread_ms"] = ms[f"{m}.kl_1thread"]
        fig |= pair_ratios("kl_parallel_speedup", times[f"{m}.kl_1thread"], times[f"{m}.kl"])
        if mode == "channel_wise":
            fig["perchannel_minmax_ms"] = ms["perchannel_minmax"]
            fig["perchannel_minmax_mse"] = _qparams_mse(x, *last["perchannel_minmax"], bt)
        out[m] = fig
    return out


# ---------------------------------------------------------------------------------------------- end to end
def bench_sweep(n_trials: int, warmup: int, device: str = "cpu") -> dict[str, float]:
    """A real ``python -m vitq.sweep -m`` search of ``n_trials`` on digits into a temporary store: marginal wall
    time per trial after ``warmup`` trials (the child runs' start times, to the last one's end) against the trials'
    own calibration + evaluation time (mean over the same trials)."""
    import os
    import subprocess

    import mlflow
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        cmd = [sys.executable, "-m", "vitq.sweep", "-m", "hydra/sweeper=vitq_optuna",
               "hydra.sweeper.search=mixed_precision", f"hydra.sweeper.n_trials={n_trials}", f"device={device}"]
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        exp = client.get_experiment_by_name("mixed_precision")
        runs = client.search_runs([exp.experiment_id], "tags.`vitq.role` = 'trial'", max_results=10000) if exp else []
    runs = sorted(runs, key=lambda r: r.info.start_time)[warmup:]
    if proc.returncode != 0 or len(runs) < 2:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"bench sweep: rc {proc.returncode}, {len(runs)} timed trials: {tail}")
    start = runs[0].info.start_time / 1e3
    end = max(r.info.end_time for r in runs) / 1e3
    compute = np.array([r.data.metrics["calib_seconds"] + r.data.metrics["eval_seconds"] for r in runs])
    marginal = (end - start) / len(runs)
    return {"n_trials": float(n_trials), "marginal_ms": 1e3 * marginal, "compute_ms": 1e3 * float(compute.mean()),
            "compute_median_ms": 1e3 * float(np.median(compute)),
            "marginal_over_compute": marginal / float(compute.mean()),
            "bookkeeping_ms": 1e3 * (marginal - float(compute.mean())), "trials_per_hour": 3600.0 / marginal,
            "exit_code": float(proc.returncode)}


def bench_scaling(quick: bool, device: str = "cpu") -> dict[str, float]:
    """How a trial's cost grows: with model size (timm ViT-Ti/S/B, random weights, the same 224×224 images) and
    with the number of eval images (the folder model at 256 and 1024); each as trial ms and trial / FP eval."""
    import timm

    out: dict[str, float] = {}
    n = 8 if quick else 32
    base = vit_small_workload(quick, device, n_eval=n)
    for name in ("vit_tiny", "vit_small") if quick else ("vit_tiny", "vit_small", "vit_base"):
        torch.manual_seed(0)
        model = timm.create_model(f"{name}_patch16_224", pretrained=False, num_classes=10).eval().to(device)
        w = Workload(name, model, base.data, 64, 3, 0, 1)
        out.update({f"{name}_{n}img.{k}": v for k, v in _trial_cost(w).items()})
    for n_eval in ((64, 128) if quick else (256, 1024)):
        w = folder_workload(quick, device, n_eval=n_eval)
        out.update({f"folder_{n_eval}img.{k}": v for k, v in _trial_cost(w).items()})
    return out


def _trial_cost(w: Workload) -> dict[str, float]:
    times, fp_times, q_times, _ = _paired_trials(w)
    ratios = _trial_ratios(times, fp_times, q_times)
    return {"trial_ms": 1e3 * statistics.median(times[1:]), "trial_over_fp_eval": ratios["trial_over_fp_eval"],
            "quant_eval_over_fp_eval": ratios["quant_eval_over_fp_eval"]}


# ---------------------------------------------------------------------------------------------- driver
def cpu_name() -> str:
    """The CPU's model name with its family and model number: the judged ratios depend on it (a 2-core AVX-512 Xeon
    ran timm's FP GEMMs 1.8x faster than the AMD EPYC of earlier runs, and vitq's elementwise passes hardly faster;
    docs/performance.md), and a VM may name different CPUs alike (``Intel(R) Xeon(R) Processor``: models 207, 167)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" in fields:
        return f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"
    return platform.processor() or platform.machine()


def run_bench(quick: bool = False, models: tuple[str, ...] = ("digits", "vit_small", "folder"),
              log: Callable[[str], None] = print, device: str = "cpu", overrides: tuple[str, ...] = (),
              sections: tuple[str, ...] = ("sweep", "scaling")) -> dict[str, Any]:
    torch.set_grad_enabled(False)
    retain_freed_memory()  # as a Session does for every trial the CLI runs
    from vitq.session import resolve_device

    dev = str(resolve_device(device))
    result: dict[str, Any] = {"meta": {"quick": quick, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                       "machine": platform.machine(), "cpu": cpu_name(),
                                       "python": platform.python_version(),
                                       "device": dev,
                                       "gpu": torch.cuda.get_device_name(dev) if dev.startswith("cuda") else None},
                              "goals": GOALS}
    global _CUDA
    _CUDA = dev.startswith("cuda")
    makers: dict[str, Callable[[], Workload]] = {
        "digits": lambda: digits_workload(quick, dev), "vit_small": lambda: vit_small_workload(quick, dev),
        "folder": lambda: folder_workload(quick, dev), "config": lambda: config_workload(quick, dev, overrides)}
    built = {"config": makers["config"]()} if "config" in models else {}  # the user's input: refused before the rest
    for name in models:
        log(f"[bench] {name} on {dev} ...")
        result[name] = bench_model(built.pop(name, None) or makers[name]())
    if "sweep" in sections:
        log("[bench] sweep: a real `python -m vitq.sweep -m` search ...")
        result["sweep"] = bench_sweep(8 if quick else 40, 2 if quick else 4, dev)
    if "scaling" in sections:
        log("[bench] scaling ...")
        result["scaling"] = bench_scaling(quick, dev)
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
    """Every figure a goal of :data:`GOALS` names: the goal and whether this run met it. A ``--quick`` run judges
    nothing: with its few images the fixed costs of a trial dominate, so its ratios would give other verdicts."""
    if result.get("meta", {}).get("quick"):
        return {}
    figures = flat_figures(result)
    status: dict[str, dict[str, Any]] = {}
    for pattern, goal in result.get("goals", GOALS).items():
        for pat in _expand_braces(pattern):
            for name in fnmatch.filter(figures, pat):
                status[name] = {"goal": goal, "met": _meets(figures[name], goal)}
    return status


def _meets(value: float, goal: str) -> bool:
    """Whether ``value`` meets ``goal`` (``"<= 1.5"``)."""
    op, bound = goal.split()
    return _COMPARE[op](value, float(bound))


def format_table(result: dict[str, Any]) -> str:
    """One row per figure, judged ones with their goal and, where measured, the quartiles of their pairs' ratios;
    the verdict names the goals missed whose pairs' quartiles straddle the bound (this run's noise)."""
    status = goal_status(result)
    figures = flat_figures(result)
    rows, within = [], []
    for k, v in figures.items():
        if any(k.endswith(sfx) and k.removesuffix(sfx) in figures for sfx in (PAIRS_Q25, PAIRS_Q75)):
            continue  # shown beside its figure
        goal = status.get(k)
        mark = "" if goal is None else f"{goal['goal']:>8}  {'met' if goal['met'] else 'NOT MET'}"
        lo, hi = figures.get(k + PAIRS_Q25), figures.get(k + PAIRS_Q75)
        if lo is not None and hi is not None:
            mark += f"  (pairs {lo:.3g}-{hi:.3g})"
            if goal is not None and not goal["met"] and _meets(lo, goal["goal"]) != _meets(hi, goal["goal"]):
                within.append(k)  # the bound lies between the quartiles
        rows.append(f"{k:<55} {v:>14.4g}  {mark}".rstrip())
    met = sum(g["met"] for g in status.values())
    verdict = (f"goals met: {met} of {len(status)}" if not result.get("meta", {}).get("quick")
               else "goals: not judged in --quick (too few images for the ratios to mean what a full run's do)")
    if within:
        verdict += f"; not met, with the goal inside their pairs' quartiles: {', '.join(within)}"
    meta = result.get("meta", {})
    where = f"on {meta.get('cpu', '?')}, {meta.get('threads', '?')} threads, device {meta.get('device', '?')}"
    return "\n".join([where, f"{'figure':<55} {'value':>14}  {'goal':>8}", "-" * 88, *rows, "-" * 88, verdict])


def main(argv: list[str] | None = None, prog: str = "python -m vitq.bench") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small image counts and repetitions (CI)")
    ap.add_argument("--out", default="bench.json", help="JSON file for the figures (default: bench.json)")
    ap.add_argument("--models", default=None,
                    help="comma-separated: digits, vit_small, folder, config (default: digits,vit_small,folder; "
                         "config alone when OVERRIDES are given)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    ap.add_argument("--sections", default="sweep,scaling",
                    help="comma-separated extra sections: sweep (a real CLI search), scaling; '' for none")
    ap.add_argument("overrides", nargs="*", metavar="OVERRIDES",
                    help="the sweep's Hydra overrides for the config workload: model=timm ... data=folder ...")
    args = ap.parse_args(argv)
    models = tuple(m for m in (args.models or ("config" if args.overrides else "digits,vit_small,folder")).split(",")
                   if m)
    unknown = set(models) - {"digits", "vit_small", "folder", "config"}
    if args.overrides and "config" not in models:
        ap.error(f"OVERRIDES ({' '.join(args.overrides)}) set the config workload, which --models={args.models} "
                 "leaves out: add config to --models")
    if unknown:
        ap.error(f"--models: unknown {sorted(unknown)}; choose from digits, vit_small, folder, config")
    from vitq.sweep import QUANT_KEYS, refuse_unread

    own = "the bench calibrates at its own settings (128 images a batch, the default values kept, in memory)"
    try:
        refuse_unread(args.overrides, "vitq bench", {
            **dict.fromkeys(QUANT_KEYS, "the bench times its own configs (int8, w4a8, and variants of observers and "
                                        "widths)"),
            "device": "give --device", **dict.fromkeys(("calib_batch_size", "calib_max_values", "stats_dir"), own)})
    except ConfigError as e:
        ap.error(str(e))
    sections = tuple(x for x in args.sections.split(",") if x)
    if set(sections) - {"sweep", "scaling"}:
        ap.error(f"--sections: unknown {sorted(set(sections) - {'sweep', 'scaling'})}; choose from sweep, scaling")
    from vitq.paths import FolderError, output_folder

    out = Path(args.out).expanduser()
    try:  # before the bench's minutes, not after them
        output_folder(out.parent, "--out")
    except FolderError as e:
        print(f"vitq: {e}", file=sys.stderr)
        return 2
    if out.is_dir():
        print(f"vitq: --out: {out} is a folder; give the JSON file's path (e.g. {out / 'bench.json'})", file=sys.stderr)
        return 2
    from vitq.session import SessionError

    try:
        result = run_bench(args.quick, models, device=args.device, overrides=tuple(args.overrides), sections=sections)
    except SessionError as e:
        print(f"vitq: {e}", file=sys.stderr)
        return 2
    result["goal_status"] = goal_status(result)
    print(format_table(result))
    bad = {k: v for k, v in flat_figures(result).items() if not math.isfinite(v)}
    out.write_text(json.dumps(result, indent=2))
    print(f"[bench] wrote {args.out}")
    if bad:
        print(f"[bench] non-finite figures: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
