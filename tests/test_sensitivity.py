"""Sensitivity, the exact budget solver, and warm-started studies."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import optuna
import pytest
from _util import run_sweep
from conftest import PRESETS

from vitq.cost import model_cost
from vitq.quant.config import POINTS, load_config_from_yaml
from vitq.reference import reference_path
from vitq.search.sensitivity import (
    CostTable,
    allowed_widths,
    compute_sensitivity,
    configs_for_budgets,
    cost_table,
    enqueue_params,
    items_of,
    solve_mck,
    with_bits,
)
from vitq.search.space import load_search


def _brute(scores, table, budget):
    best, arg = np.inf, None
    P, K = scores.shape
    for choice in itertools.product(range(K), repeat=P):
        if table.cost(list(choice)) <= budget + 1e-9:
            s = sum(scores[i, k] for i, k in enumerate(choice))
            if s < best - 1e-12:
                best, arg = s, list(choice)
    return best, arg


@pytest.mark.parametrize("scale", [1.0, 1e-9])  # gradient scores are ~1e-9..1e-4: HiGHS's absolute gap is 1e-6
@pytest.mark.parametrize("seed", range(6))
def test_knapsack_is_optimal_against_brute_force(seed, scale):
    rng = np.random.default_rng(seed)
    P, K = 5, 3
    scores = rng.random((P, K)) * np.array([3.0, 1.0, 0.0]) * scale  # wider is never worse
    unary = np.sort(rng.integers(1, 20, (P, K)), axis=1).astype(float)
    pairs = {(0, 1): np.outer([1, 2, 4], [1, 2, 3]).astype(float), (2, 3): rng.integers(0, 5, (K, K)).astype(float)}
    table = CostTable("test", tuple(f"p{i}" for i in range(P)), (2, 4, 8), 7.0, unary, pairs if seed % 2 else {})
    lo = min(table.cost(list(c)) for c in itertools.product(range(K), repeat=P))
    hi = max(table.cost(list(c)) for c in itertools.product(range(K), repeat=P))
    for budget in np.linspace(lo, hi, 7):
        best, _ = _brute(scores, table, budget)
        choice = solve_mck(scores, table, budget)
        assert choice is not None and table.cost(choice) <= budget + 1e-9
        assert sum(scores[i, k] for i, k in enumerate(choice)) == pytest.approx(best, rel=1e-6, abs=1e-6 * scale)
    assert solve_mck(scores, table, lo - 1) is None  # below the cheapest config: infeasible
    # the cheapest config (what a budget is checked against before measuring), with and without allowed widths
    allowed = rng.random((P, K)) < 0.6
    allowed[np.arange(P), rng.integers(0, K, P)] = True  # a width for every item
    least = min(table.cost(list(c)) for c in itertools.product(range(K), repeat=P)
                if all(allowed[i, k] for i, k in enumerate(c)))
    assert table.least() == pytest.approx(lo, rel=1e-12) and table.least(allowed) == pytest.approx(least, rel=1e-12)
    assert solve_mck(scores, table, least, allowed) is not None and solve_mck(scores, table, least - 1, allowed) is None
    allowed[1] = False
    with pytest.raises(ValueError, match=r"^p1: none of the solver's widths \(2, 4, 8\) is allowed$"):
        table.least(allowed)


@pytest.mark.parametrize("metric", ["weight_bytes", "bops"])
def test_cost_table_is_exact_and_configs_respect_the_budget(reference, metric):
    model, _ = reference
    base = load_config_from_yaml(PRESETS / "int8.yaml")
    table = cost_table(model, base, (2, 4, 8), metric)
    rng = np.random.default_rng(0)
    for _ in range(5):
        choice = list(rng.integers(0, 3, len(POINTS)))
        bits = {p: table.candidates[k] for p, k in zip(POINTS, choice, strict=True)}
        assert table.cost(choice) == pytest.approx(getattr(model_cost(model, with_bits(base, bits)), metric),
                                                   rel=1e-12)
    scores = np.tile(np.array([4.0, 1.0, 0.0]), (len(POINTS), 1)) * (1 + np.arange(len(POINTS)))[:, None]

    class Fixed:
        candidates = (2, 4, 8)

        def matrix(self, score, points):
            return scores

    full = table.cost([2] * len(POINTS))  # every point at 8 bits
    cheapest = table.cost([0] * len(POINTS))  # every point at 2 bits
    for frac in (0.4, 0.6, 0.8):
        budget = table.const + frac * (full - table.const) if metric == "bops" else frac * full
        (sol,) = configs_for_budgets(Fixed(), table, [budget])
        assert sol["feasible"] == (budget >= cheapest), (frac, budget, cheapest)
        if not sol["feasible"]:
            continue
        actual = getattr(model_cost(model, with_bits(base, sol["bits"])), metric)
        assert actual <= budget and actual == pytest.approx(sol["predicted_cost"], rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_per_block_solver_is_optimal_against_brute_force(reference, seed):
    """(block, point) items with the real BOPs cost table: 2 blocks × a weight, its input and the softmax pair's two
    points, 3 widths (3^8 = 6561 configs enumerated), a 2-bit floor on weights and 4 on activations."""
    model, _ = reference
    base = load_config_from_yaml(PRESETS / "int8.yaml")
    items = tuple(f"blocks.{b}.{p}" for b in (0, 3) for p in ("attn_qkv", "norm1", "intSoft", "attn_qkv_output"))
    table = cost_table(model, base, (2, 4, 8), "bops", items)
    assert {(items[i], items[j]) for i, j in table.pairs} == {
        (f"blocks.{b}.{p}", f"blocks.{b}.{q}") for b in (0, 3) for p, q in (("attn_qkv", "norm1"),
                                                                           ("intSoft", "attn_qkv_output"))}
    allowed = allowed_widths(items, (2, 4, 8), min_act_bits=4)
    rng = np.random.default_rng(seed)
    scores = np.sort(rng.random((len(items), 3)), axis=1)[:, ::-1] * rng.random((len(items), 1)) * 10
    every = [c for c in itertools.product(range(3), repeat=len(items)) if all(allowed[i, k] for i, k in enumerate(c))]
    costs = {c: table.cost(list(c)) for c in every}
    for c in every[:: len(every) // 7]:  # the table is exact: the cost model of the config itself
        bits = {it: (2, 4, 8)[k] for it, k in zip(items, c, strict=True)}
        assert costs[c] == pytest.approx(model_cost(model, with_bits(base, bits)).bops, rel=1e-12)
    for budget in np.linspace(min(costs.values()), max(costs.values()), 6):
        best = min(sum(scores[i, k] for i, k in enumerate(c)) for c in every if costs[c] <= budget + 1e-6)
        choice = solve_mck(scores, table, budget, allowed)
        assert choice is not None and costs[tuple(choice)] <= budget + 1e-6
        assert sum(scores[i, k] for i, k in enumerate(choice)) == pytest.approx(best, abs=1e-6)


def test_per_block_solver_scales_to_a_deep_model():
    """12 blocks × 14 points × 6 widths with BOPs pairs (1,008 binaries, 60 pair tables): exact, in well under
    a second (the time is printed, not asserted)."""
    import time

    rng = np.random.default_rng(0)
    items = items_of(12, "block")
    K = 6
    unary = np.sort(rng.integers(10, 1000, (len(items), K)), axis=1).astype(float)
    pairs = {(i, i + 1): np.outer(np.arange(1, K + 1), np.arange(1, K + 1)) * 5.0 for i in range(0, 120, 2)}
    table = CostTable("bops", items, (2, 3, 4, 5, 6, 8), 0.0, unary, pairs)
    scores = np.sort(rng.random((len(items), K)), axis=1)[:, ::-1].copy()
    full = table.cost([K - 1] * len(items))
    t0 = time.perf_counter()
    choice = solve_mck(scores, table, 0.6 * full)
    print(f"per-block solve: {1e3 * (time.perf_counter() - t0):.0f} ms")
    assert choice is not None and table.cost(choice) <= 0.6 * full
    assert len(set(choice)) > 1  # a real trade-off: not every item at one width


def test_sensitivity_ranks_a_fragile_point_above_a_robust_one(reference, digits):
    model, _ = reference
    base = load_config_from_yaml(PRESETS / "int8.yaml")
    sens = compute_sensitivity(model, digits, base, candidates=(2, 4, 8), n_eval=200, cache=False)
    t = sens.table.set_index(["point", "bits"])
    assert t.loc[("residual1", 2), "drop_top1"] > 0.2  # a 2-bit residual stream (LayerNorm input) wrecks the model
    assert t.loc[("residual1", 2), "drop_loss"] > 5 * t.loc[("attn_proj", 2), "drop_loss"]
    assert t.loc[("kv_act", 2), "grad_score"] > 5 * t.loc[("attn_proj", 2), "grad_score"]
    assert sens.ranking(2, "drop_loss").index("residual1") < sens.ranking(2, "drop_loss").index("attn_proj")
    # 4-bit scores: the integer softmax holds (when it returned 0s, top-1 fell to chance, a drop of ~0.88); 2 of the
    # 200 images flip (measured), so allow a few: far from a broken softmax
    assert t.loc[("kv_act", 4), "drop_top1"] <= 0.03
    assert t.loc[("kv_act", 4), "drop_top1"] < 0.1 * t.loc[("residual1", 2), "drop_top1"]
    for p in POINTS:  # fewer bits, more quantization noise at the point
        assert t.loc[(p, 2), "grad_score"] > t.loc[(p, 8), "grad_score"]


@pytest.mark.slow
def test_warm_start_enqueues_solver_configs_then_baselines(reference, tmp_path):
    budgets = [110000, 140000]
    cache = tmp_path / "cache"  # a cache of its own (with the reference): the warm start measures, not reads, the
    cache.mkdir()               # sensitivity (a table another run cached leaves the first trial to calibrate)
    (cache / reference_path().name).symlink_to(reference_path())
    r = run_sweep(tmp_path, "-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.search=mixed_precision",
                  "hydra.sweeper.n_trials=7", "hydra.sweeper.study_name=warm",
                  f"hydra.sweeper.warm_start_budgets=[{budgets[0]},{budgets[1]}]", "calib_max_values=5000",
                  f"stats_dir={tmp_path / 'stats'}", env={"VITQ_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="warm", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert len([t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]) == 7
    # the warm start calibrated as the trials do (values kept, statistics folder): no trial calibrates again
    assert [t.user_attrs["metrics"]["calib_passes"] for t in trials] == [0] * 7
    assert list((tmp_path / "stats").iterdir()) and list((cache / "sensitivity").glob("sens_*.json"))
    spec = load_search("mixed_precision")
    baselines = spec.baseline_params(load_config_from_yaml(PRESETS / "int8.yaml"))
    assert len(baselines) == 4
    warm = [t.params for t in trials[:2]]
    for params, budget, t in zip(warm, budgets, trials[:2], strict=True):
        bits = {k: v for k, v in params.items() if k.endswith("bit_type.bits")}
        assert len(bits) == len(POINTS)
        assert t.user_attrs["metrics"]["weight_bytes"] <= budget  # the solver's config, as run, fits its budget
    names = {p.name for p in spec.params}
    for t, b in zip(trials[2:6], baselines, strict=True):
        assert {k: t.params[k] for k in names} == {k: b[k] for k in names}  # every searched parameter pinned
    assert enqueue_params({"kv_act": 4}) == {"attn_layer.kv_act.bit_type.bits": 4}


@pytest.mark.slow
def test_per_block_search_file_warm_start_and_front_export(tmp_path, reference):
    """A ``per_block: true`` search file plus a ``blocks.N`` sweep on the command line, warm-started by the per-block
    solver (grad_score): every trial runs exactly its per-block widths (its size is the cost model's for those
    params), the warm start fits its budget, and the front's exported configs carry ``blocks:`` and read back."""
    import mlflow

    model, _ = reference
    search = tmp_path / "pb.yaml"
    search.write_text("study_name: pb\nn_trials: 4\nper_block: true\nbaselines: [w8a8]\nparams:\n"
                      "  layers.mlp_fc1.bit_type.bits: [2, 3, 4, 5, 6, 8]\n"
                      "  attn_layer.kv_act.bit_type.bits: choice(4, 8)\n"
                      "  default.percentile_alpha: choice(0.999, 0.9999)\n")
    budget = 190000
    r = run_sweep(tmp_path, "-m", "hydra/sweeper=vitq_optuna", f"hydra.sweeper.search={search}",
                  "blocks.1.layers.attn_proj.bit_type.bits=choice(2,8)", f"hydra.sweeper.warm_start_budgets=[{budget}]",
                  "hydra.sweeper.warm_start_granularity=block", "hydra.sweeper.warm_start_score=grad_score")
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="pb", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    expect = {f"blocks.{b}.{k}" for b in range(4) for k in ("layers.mlp_fc1.bit_type.bits",
                                                             "attn_layer.kv_act.bit_type.bits")}
    expect |= {"blocks.1.layers.attn_proj.bit_type.bits", "default.percentile_alpha"}
    base = load_config_from_yaml(PRESETS / "int8.yaml")
    configs = {}
    for t in trials:
        assert set(t.params) == expect
        fixed = t.system_attrs.get("fixed_params", {})
        cfg = base.with_overrides({k: v for k, v in {**fixed, **t.params}.items() if k != "baseline"})
        configs[t.number] = cfg
        assert t.user_attrs["metrics"]["weight_bytes"] == model_cost(model, cfg).weight_bytes
    warm = trials[0]
    assert warm.user_attrs["metrics"]["weight_bytes"] <= budget
    assert len({warm.params[f"blocks.{b}.layers.mlp_fc1.bit_type.bits"] for b in range(4)}
               | {warm.params["blocks.1.layers.attn_proj.bit_type.bits"]}) > 1  # widths differ between blocks
    assert trials[1].system_attrs["fixed_params"]["baseline"] == "W8A8"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("pb")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`vitq.role` = 'parent'")
    exported = [a.path for a in client.list_artifacts(parent.info.run_id, "pareto/configs")]
    assert exported
    for path in exported:
        local = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path=path, dst_path=tmp_path)
        number = int(Path(path).stem.removeprefix("trial_"))
        back = load_config_from_yaml(local)
        assert back.blocks and back == configs[number]


def test_per_block_space_binds_to_the_model_depth():
    from vitq.quant.config import ConfigError
    from vitq.search.space import spec_from_mapping

    raw = {"per_block": True, "params": {"layers.attn_*.bit_type.bits": "choice(4, 8)",
                                         "blocks.0.attn_layer.kv_act.bit_type.bits": [4, 6],
                                         "default.percentile_alpha": "interval(0.99, 0.9999)"}}
    spec = spec_from_mapping(raw, "t")
    spec.bind_blocks(3)
    names = [p.name for p in spec.params]
    assert names == [f"blocks.{b}.layers.attn_*.bit_type.bits" for b in range(3)] + [
        "blocks.0.attn_layer.kv_act.bit_type.bits", "default.percentile_alpha"]
    assert spec.param_for("blocks.2.layers.attn_proj.bit_type.bits").name == "blocks.2.layers.attn_*.bit_type.bits"
    assert spec.param_for("layers.attn_proj.bit_type.bits") is None
    with pytest.raises(ConfigError, match=r"params.blocks.0.attn_layer.kv_act.bit_type.bits: block 0 does not exist"):
        spec_from_mapping(raw, "t").bind_blocks(0)
    with pytest.raises(ConfigError, match="per_block: must be true or false"):
        spec_from_mapping({**raw, "per_block": "yes"}, "t")


def test_block_granularity_grad_scores_split_the_point_scores(reference, digits):
    """One backward pass per batch scores every (block, point, width): the blocks' scores sum to the point's; drops
    not measured are NaN, and the solver refuses to use them."""
    model, _ = reference
    base = load_config_from_yaml(PRESETS / "int8.yaml")
    kw = {"candidates": (2, 4), "n_eval": 64, "cache": False}
    point = compute_sensitivity(model, digits, base, **kw)
    block = compute_sensitivity(model, digits, base, granularity="block", drops=False, **kw)
    assert block.items == items_of(4, "block") and len(block.table) == 4 * len(POINTS) * 2
    per_point = block.table.groupby(["point", "bits"])["grad_score"].sum()
    for _, row in point.table.iterrows():
        assert per_point[(row["point"], row["bits"])] == pytest.approx(row["grad_score"], rel=1e-9)
    assert block.table["drop_loss"].isna().all()
    with pytest.raises(ValueError, match="drop_loss: not measured at block granularity"):
        block.matrix("drop_loss")
    assert block.matrix("grad_score").shape == (4 * len(POINTS), 2)
