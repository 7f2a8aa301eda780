"""Drop-in for the official hydra-optuna-sweeper: its search-file format and its sweep syntax on the command line.

The three search files are the official plugin's example configs (plugins/hydra_optuna_sweeper/example: conf,
multi-objective-conf, custom-search-space), with their sphere keys x/y replaced by vitq keys and fewer trials.
"""

from __future__ import annotations

import textwrap

import optuna
import pytest
from _util import run_sweep

from vitq.quant.config import ConfigError
from vitq.search.space import load_search, split_sweep_arguments

EXAMPLE = """\
defaults:
  - override hydra/sweeper: optuna
  - override hydra/sweeper/sampler: tpe

hydra:
  sweeper:
    sampler:
      seed: 123
    direction: maximize
    study_name: sphere
    storage: null
    n_trials: 4
    n_jobs: 1
    params:
      layers.attn_qkv.bit_type.bits: range(4, 8, step=2)
      layers.mlp_fc1.bit_type.bits: choice(4 ,6 ,8)
"""

MULTI_OBJECTIVE = """\
defaults:
  - override hydra/sweeper: optuna
  - override hydra/sweeper/sampler: nsgaii

hydra:
  sweeper:
    sampler:
      seed: 123
    direction: [maximize, minimize]
    study_name: multi-objective
    storage: null
    n_trials: 4
    params:
      layers.attn_qkv.bit_type.bits: range(2, 8, step=2)
      attn_layer.mlp_act.percentile_alpha: interval(0.99, 0.9999)
"""

CUSTOM = """\
hydra:
  sweeper:
    sampler:
      _target_: optuna.samplers.TPESampler
      seed: 123
    direction: maximize
    study_name: custom-search-space
    storage: null
    n_trials: 3
    n_jobs: 1

    params:
      layers.attn_qkv.bit_type.bits: choice(4, 8)
      default.percentile_alpha: tag(log, interval(0.99, 0.9999))
    # `custom_search_space` should be a dotpath pointing to a
    # callable that provides search-space configuration logic:
    custom_search_space: custom_space.configure
"""

CONFIGURE = """\
def configure(cfg, trial):
    x = trial.params["layers.attn_qkv.bit_type.bits"]
    trial.suggest_int("layers.mlp_fc1.bit_type.bits", x - 2, x, step=2)
"""


def _write(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_official_example_files_parse(tmp_path):
    spec = load_search(str(_write(tmp_path, "example", EXAMPLE)))
    qkv, fc1 = spec.params
    assert (qkv.low, qkv.high, qkv.step, qkv.type) == (4, 8, 2, "int")  # the plugin's range: stop included
    assert fc1.choices == [4, 6, 8] and all(type(c) is int for c in fc1.choices)  # not split into characters
    assert spec.objectives == {"top1": "maximize"} and spec.study_name == "sphere" and spec.n_jobs == 1
    sampler = spec.make_sampler()
    assert isinstance(sampler, optuna.samplers.TPESampler) and not sampler._multivariate  # exactly its arguments

    spec = load_search(str(_write(tmp_path, "mo", MULTI_OBJECTIVE)))
    assert spec.objectives == {"top1": "maximize", "weight_bytes": "minimize"}
    assert isinstance(spec.make_sampler(), optuna.samplers.NSGAIISampler)
    alpha = spec.params[1]
    assert (alpha.low, alpha.high, alpha.log, alpha.type, alpha.choices) == (0.99, 0.9999, False, "float", None)

    spec = load_search(str(_write(tmp_path, "custom", CUSTOM)))
    assert spec.custom_search_space == "custom_space.configure" and spec.params[1].log
    assert spec.sampler == "tpe" and spec.sampler_kwargs == {} and spec.seed == 123


def test_command_line_sweep_syntax():
    params, fixed = split_sweep_arguments([
        "layers.attn_qkv.bit_type.bits=choice(4,8)", "default.percentile_alpha=interval(0.9,0.9999)",
        "layers.norm1.bit_type.bits=2,4", "attn_layer.kv_act.bit_type.bits=range(2,8)",
        "lr=tag(log, interval(1e-4, 1))", "model=timm", "eval_batch_size=64"])
    assert fixed == ["model=timm", "eval_batch_size=64"]
    by = {p.name: p for p in params}
    assert by["layers.attn_qkv.bit_type.bits"].choices == [4, 8]
    assert by["layers.norm1.bit_type.bits"].choices == [2, 4]
    assert (by["default.percentile_alpha"].low, by["default.percentile_alpha"].high) == (0.9, 0.9999)
    assert (by["attn_layer.kv_act.bit_type.bits"].low, by["attn_layer.kv_act.bit_type.bits"].high) == (2, 8)
    assert by["lr"].log and by["lr"].type == "float"


@pytest.mark.parametrize("text, key, valid", [
    ("n_trails: 3\nparams:\n  a: choice(1, 2)\n", "n_trails", "n_trials"),
    ("sampler: {_target_: optuna.samplers.FooSampler}\nparams:\n  a: choice(1, 2)\n", "sampler._target_",
     "optuna.samplers.TPESampler"),
    ("sampler: foo\nparams:\n  a: choice(1, 2)\n", "sampler", "nsgaii"),
    ("direction: [maximize, minimize, minimize]\nparams:\n  a: choice(1, 2)\n", "direction", "objectives"),
    ("direction: upward\nparams:\n  a: choice(1, 2)\n", "direction", "maximize"),
    ("params: {a: 'choice(1, 2'}\n", "params.a", "cannot parse"),
    ("search_space: {a: {type: int, low: 1, high: 2}}\n", "search_space", "use params"),
    # ranges Optuna cannot draw from: each failed after the study opened (rc 1), or (step 0) ran with step 1
    ("params: {a: 'interval(0.999, 0.99)'}\n", "params.a", "low 0.999 is above high 0.99"),
    ("params: {a: 'range(2, 8, step=0)'}\n", "params.a", "step must be > 0, got 0"),
    ("params: {a: 'tag(log, interval(0, 1))'}\n", "params.a", "a log scale needs low > 0 and no step"),
    ("params: {a: {low: 1, high: 4, step: 1, log: true}}\n", "params.a", "a log scale needs low > 0 and no step"),
    ("params: {a: {low: 1, high: .inf}}\n", "params.a", "low, high and step must be finite numbers, got inf"),
    ("params: {a: []}\n", "params.a", "no choices to draw from"),
])
def test_bad_search_files_name_the_key(tmp_path, text, key, valid):
    with pytest.raises(ConfigError) as e:
        load_search(str(_write(tmp_path, "bad", text)))
    assert e.value.path == key and valid in str(e.value)


@pytest.mark.slow
def test_command_line_sweeps_run_end_to_end(tmp_path):
    r = run_sweep(tmp_path, "-m", "hydra/sweeper=vitq_optuna", "layers.attn_qkv.bit_type.bits=choice(4,8)",
                  "default.percentile_alpha=interval(0.9,0.9999)", "hydra.sweeper.n_trials=4", "tracking=none",
                  "hydra.sweeper.study_name=cli")
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="cli", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 4
    for t in trials:  # exactly the command line's space, no search file's parameters
        assert set(t.params) == {"layers.attn_qkv.bit_type.bits", "default.percentile_alpha"}
        assert t.params["layers.attn_qkv.bit_type.bits"] in (4, 8)
        assert 0.9 <= t.params["default.percentile_alpha"] <= 0.9999
    # the sampled width reached the model: the weight size follows the qkv bits
    sizes = {}
    for t in trials:
        sizes.setdefault(t.params["layers.attn_qkv.bit_type.bits"], set()).add(t.user_attrs["metrics"]["weight_bytes"])
    assert all(len(v) == 1 for v in sizes.values()) and len(sizes) == 2  # (seeded: both widths are drawn)
    assert min(sizes[4]) < min(sizes[8])


@pytest.mark.slow
def test_official_custom_search_space_file_runs(tmp_path):
    path = _write(tmp_path, "custom", CUSTOM)
    (tmp_path / "custom_space.py").write_text(textwrap.dedent(CONFIGURE))
    r = run_sweep(tmp_path, "-m", "hydra/sweeper=vitq_optuna", f"hydra.sweeper.search={path}", "tracking=none")
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="custom-search-space", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE]
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 3
    for t in trials:
        x, z = t.params["layers.attn_qkv.bit_type.bits"], t.params["layers.mlp_fc1.bit_type.bits"]
        assert z in (x - 2, x) and 0.99 <= t.params["default.percentile_alpha"] <= 0.9999
        assert t.values[0] == t.user_attrs["metrics"]["top1"]
    r = run_sweep(tmp_path, "-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.sampler=foo",
                  "layers.attn_qkv.bit_type.bits=choice(4,8)", "tracking=none")
    lines = [ln for ln in r.stderr.splitlines() if "Error" in ln or "sampler" in ln]
    assert r.returncode == 2 and "unknown sampler 'foo'" in r.stderr and "nsgaii" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and lines
