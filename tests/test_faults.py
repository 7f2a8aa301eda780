"""What a user sees when things go wrong: secrets never written, one-line errors with honest exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
import sqlalchemy
from _util import run, run_many, run_sweep, run_sweeps

from vitq.redact import redact

MARK = "Pw4Vitq9Zq"  # a password that must appear nowhere


def _error_line(r: subprocess.CompletedProcess, rc: int = 2) -> str:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("vitq: ")]
    assert r.returncode == rc, r.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(("text", "expect"), [
    ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql+psycopg://u:p%40ss@h/db", "postgresql+psycopg://u:***@h/db"),
    ("http://a:b@c@host:5000/x", "http://a:***@host:5000/x"),
    ("mysql+pymysql://u:pa:ss@h/db?ssl=1", "mysql+pymysql://u:***@h/db?ssl=1"),
    ("postgresql://h/db?user=u&password=xyz", "postgresql://h/db?user=u&password=***"),
    ("https://host/api?token=abc&x=1", "https://host/api?token=***&x=1"),
    ("http://h/?api_key=k1;secret=s2", "http://h/?api_key=***;secret=***"),
    ("sqlite:///tmp/optuna.db", "sqlite:///tmp/optuna.db"),
    ("journal:///shared/study.log", "journal:///shared/study.log"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_redact(text, expect):
    assert redact(text) == expect
    assert redact(f"tracking.uri={text} and more") == f"tracking.uri={expect} and more"


def _mlflow_texts(url: str) -> str:
    """Every text column of every table of an MLflow store on PostgreSQL."""
    engine = sqlalchemy.create_engine(url)
    meta = sqlalchemy.MetaData()
    meta.reflect(engine)
    out = []
    with engine.connect() as c:
        for table in meta.sorted_tables:
            out += [str(row) for row in c.execute(table.select())]
    engine.dispose()
    return "\n".join(out)


@pytest.mark.slow
def test_secrets_never_written(tmp_path, pg_database):
    track_db, store_db = pg_database("postgresql+psycopg"), pg_database("postgresql+psycopg")
    with_pw = lambda url: url.replace("postgres@", f"postgres:{MARK}@")  # noqa: E731 - trust auth ignores it
    track, store = with_pw(track_db), with_pw(store_db)
    assert MARK in track and MARK in store
    sweep, cli = [sys.executable, "-m", "vitq.sweep"], [sys.executable, "-m"]

    def stage(jobs: dict[str, tuple[list[str], dict | None]]) -> dict[str, subprocess.CompletedProcess]:
        """Independent processes, two at a time, each in a folder of its own (Hydra's run folders are named by the
        second)."""
        for name in jobs:
            (tmp_path / name).mkdir()
        results = run_many([args for args, _ in jobs.values()], [tmp_path / name for name in jobs], timeout=600,
                           envs=[env for _, env in jobs.values()])
        return dict(zip(jobs, results, strict=True))

    # first the sweep that creates the MLflow store's schema, beside a bad config and an unreachable storage (both
    # fail before the MLflow store is opened)
    done = stage({
        "sweep": ([*sweep, "-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.search=bits_only",
                   "hydra.sweeper.n_trials=3", "hydra.sweeper.study_name=secret", f"hydra.sweeper.storage={store}",
                   f"tracking.uri={track}"], None),
        "bad": ([*sweep, "layers.attn_qkv.bit_type.bits=1", f"tracking.uri={track}"], None),
        "unreachable": ([*sweep, "-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.n_trials=2",
                         f"hydra.sweeper.storage={with_pw('postgresql://postgres@127.0.0.1:1/nope')}"], None),
    })
    r = done.pop("sweep")
    assert r.returncode == 0, redact(r.stderr[-3000:])
    # then what reads or writes that store: a grid whose trials all fail, the sensitivity table logged to it, and the
    # CLIs that read it: the notebook (papermill wrote the URI into the executed notebook's parameters and its HTML),
    # the export, and the export of a study that is not there
    done |= stage({
        "grid": ([*sweep, "-m", "layers.attn_qkv.bit_type.bits=4,8", "study_name=grid", f"tracking.uri={track}"],
                 {"VITQ_FAULTS": "nan@*"}),
        "sensitivity": ([*cli, "vitq.search.sensitivity", "--budgets", "1e9", "--tracking-uri", track, "--study",
                         "sens"], None),
        **{name: ([*cli, "vitq.report", verb, "--tracking-uri", track, "--study", study, "--out", str(tmp_path / out)],
                  None)
           for name, verb, study, out in (("notebook", "notebook", "secret", "nb"),
                                          ("export", "export", "secret", "export"),
                                          ("missing", "export", "nope", "export_nope"))},
    })
    outputs = [r, *done.values()]
    assert done["grid"].returncode == 1, redact(done["grid"].stderr[-3000:])
    assert done["bad"].returncode == 2, redact(done["bad"].stderr[-3000:])
    assert "postgres:***@127.0.0.1:1/nope" in _error_line(done["unreachable"])
    r = done["sensitivity"]
    assert r.returncode == 0 and "logged to postgresql+psycopg://postgres:***@" in r.stdout, redact(r.stderr[-3000:])
    r = done["notebook"]
    assert r.returncode == 0 and (tmp_path / "nb" / "pareto_analysis.html").is_file(), redact(r.stderr[-3000:])
    r = done["export"]
    assert r.returncode == 0 and (tmp_path / "export" / "metrics.json").is_file(), redact(r.stderr[-3000:])
    assert "tracking store postgresql+psycopg://postgres:***@" in _error_line(done["missing"])
    for r in outputs:
        assert MARK not in r.stdout and MARK not in r.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and MARK.encode() in p.read_bytes()]
    assert written == []
    # the files were written, redacted: the grid's two jobs and the single run (vitq's sweeper runs its trials in
    # process: no job folders), and the grid's multirun.yaml
    assert len(list(tmp_path.rglob(".hydra/overrides.yaml"))) >= 3 and len(list(tmp_path.rglob("multirun.yaml"))) >= 1
    assert MARK not in _mlflow_texts(track_db) and MARK not in _mlflow_texts(store_db)
    assert "secret" in _mlflow_texts(track_db)  # the runs are there


@pytest.mark.slow
def test_bad_sweeper_arguments_fail_before_any_trial(tmp_path):
    base = ["-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.search=bits_only"]
    (tmp_path / "a_file").write_text("")  # (a folder under a file cannot be created)
    cases = {
        "hydra.sweeper.n_trials=0": "hydra.sweeper.n_trials: must be >= 1, got 0",
        "hydra.sweeper.n_trials=-1": "hydra.sweeper.n_trials: must be >= 1, got -1",
        "hydra.sweeper.n_jobs=0": "hydra.sweeper.n_jobs: must be >= 1, got 0",
        "hydra.sweeper.sampler=cmaes": "hydra.sweeper.sampler: cmaes optimizes one objective; this search has 2",
        "hydra.sweeper.sampler=foo": "hydra.sweeper.sampler: unknown sampler 'foo'; valid: tpe, nsgaii",
        "hydra.sweeper.storage=postgresql://nobody@127.0.0.1:1/db.log":
            "cannot open the Optuna storage postgresql://nobody@127.0.0.1:1/db.log",
        "hydra.sweeper.storage=notadialect://x/y": "vitq: hydra.sweeper.storage: notadialect databases are not "
                                                   "supported: vitq serializes a study's workers on SQLite, "
                                                   "PostgreSQL and MySQL/MariaDB (or a journal:/// file)",
        "hydra.sweeper.storage=mssql+pyodbc://u:pw@h/db": "vitq: hydra.sweeper.storage: mssql databases are not "
                                                          "supported",  # (they ran with the workers unserialized)
        "hydra.sweeper.storage=mysql+notadriver://root@127.0.0.1:3306/test": "cannot open the Optuna storage "
                                                                             "mysql+notadriver://",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'a_file' / 'o.db'}":
            f"vitq: hydra.sweeper.storage: cannot create the folder of sqlite:///{tmp_path / 'a_file' / 'o.db'}",
        "blocks.9.layers.attn_qkv.bit_type.bits=choice(4,8)":
            "params.blocks.9.layers.attn_qkv.bit_type.bits: block 9 does not exist: the model has 4 blocks (0..3)",
        # values no trial could run, found before the study and the parent run open (each trial drawing one failed)
        "layers.attn_qkv.bit_type.bits=choice(4,6,8,four)":
            "vitq: params.layers.attn_qkv.bit_type.bits: must be an integer in 2..16, got 'four'",
        "layers.attn_qkv.bit_type.bits=choice(4,6,8,1)":
            "vitq: params.layers.attn_qkv.bit_type.bits: must be in 2..16, got 1",
        "default.percentile_alpha=interval(0.999,0.99)":  # (Optuna's ValueError after the study opened, rc 1)
            "vitq: default.percentile_alpha: low 0.999 is above high 0.99",
        "default.percentile_alpha=interval(0.9,1.5)": "vitq: params.default.percentile_alpha: must be a number in "
                                                      "(0.5, 1], got 1.5",
        "quant=choice(int8,int88)": "vitq: quant=int88: unknown quant option 'int88'. Did you mean 'int8'?",
        "eval_batch_size=choice(64,big)": "vitq: eval_batch_size: Value 'big' of type 'str' could not be converted "
                                          "to Integer",
        # settings that the others leave without effect (each ran with rc 0), or out of range
        "hydra.sweeper.warm_start_metric=bops": "vitq: hydra.sweeper.warm_start_metric: it chooses how the warm-start "
                                                "configs are solved, and hydra.sweeper.warm_start_budgets is not set",
        "hydra.sweeper.warm_start_score=grad": "vitq: hydra.sweeper.warm_start_score: expected one of drop_loss, "
                                               "drop_top1, grad_score, got 'grad'",
        "hydra.sweeper.heartbeat_interval=0 hydra.sweeper.grace_period=10":
            "vitq: hydra.sweeper.grace_period: heartbeats are off (hydra.sweeper.heartbeat_interval=0)",
        "hydra.sweeper.grace_period=0": "vitq: hydra.sweeper.grace_period: must be >= 1 seconds, got 0",
        "hydra.sweeper.n_jobs=2": "vitq: hydra.sweeper.n_jobs: 2 trials per batch, and Hydra's basic launcher runs "
                                  "them one after another; add hydra/launcher=joblib hydra.launcher.n_jobs=2",
        "hydra/launcher=joblib": "vitq: hydra.sweeper.n_jobs: 1: the joblib launcher gets one trial at a time",
        "hydra.sweeper.storage=journal://j.log hydra.sweeper.heartbeat_interval=5":
            "vitq: hydra.sweeper.heartbeat_interval: the journal storage journal://j.log has no heartbeats in Optuna",
        "hydra.sweeper.storage=journal://j.log hydra.sweeper.reap_local=false":
            "vitq: hydra.sweeper.reap_local: false leaves a dead worker's trials to the heartbeat, and the journal "
            "storage has no heartbeats: nothing would fail them",
        # warm-start budgets no config meets (each ran without its warm start, rc 0, after a warning)
        "hydra.sweeper.warm_start_budgets=[0]": "vitq: hydra.sweeper.warm_start_budgets: a budget is a finite number "
                                                "> 0 (of weight bytes or BOPs), got 0.0",
        "hydra.sweeper.warm_start_budgets=[1000]": "vitq: hydra.sweeper.warm_start_budgets: 1,000 weight_bytes is "
                                                   "below the cheapest config the widths allow, ",
        "hydra.sweeper.warm_start_budgets=[1e12] layers.attn_qkv.bit_type.bits=choice(7)":
            "vitq: hydra.sweeper.warm_start_budgets: no config is feasible: attn_qkv: none of the solver's widths "
            "(2, 3, 4, 5, 6, 8) is allowed",
    }
    results = run_sweeps(tmp_path, [(*base, *override.split(" ")) for override in cases])
    for (override, expect), (cwd, r) in zip(cases.items(), results, strict=True):
        assert expect in _error_line(r), (override, r.stderr[-1000:])
        assert not (cwd / "mlflow.db").exists() and not (cwd / "db.log").exists(), override
        if "storage" not in override:  # no study opened: no trial left RUNNING
            db = cwd / "optuna.db"
            assert not db.exists() or optuna.get_all_study_names(f"sqlite:///{db}") == [], override
        assert not (cwd / "j.log").exists(), override
    # heartbeat_interval=0 is "off", as documented (Optuna refused 0: every such sweep failed to open its storage)
    r = run_sweep(tmp_path, *base, "hydra.sweeper.heartbeat_interval=0", "hydra.sweeper.n_trials=1",
                  "hydra.sweeper.enqueue_baselines=false", "tracking=none", timeout=300)
    assert r.returncode == 0 and "vitq: " not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize(("args", "expect"), [
    (["tracking=none", "default.bit_type.bits=99"], "vitq: default.bit_type.bits: must be in 2..16, got 99"),
    (["tracking=none", "stats_dir=/dev/null/stats"], "vitq: stats_dir: cannot create /dev/null/stats"),
    (["-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.n_trials=0"], "vitq: hydra.sweeper.n_trials: must be >= 1"),
    (["-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.warm_start_budgets=[0]"],
     "vitq: hydra.sweeper.warm_start_budgets: a budget is a finite number > 0"),
])
def test_bad_config_fails_before_torch_is_imported(tmp_path, args, expect):
    """A bad quant value, folder or sweeper setting fails (rc 2, its line) before torch, timm and MLflow load: in
    about a second, not the seconds their imports take."""
    code = ("import runpy, sys\nsys.argv = ['vitq.sweep', *sys.argv[1:]]\ntry:\n"
            "    runpy.run_module('vitq.sweep', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print('exit', e.code, sorted({'torch', 'timm', 'mlflow'} & set(sys.modules)))\n")
    r = run([sys.executable, "-c", code, *args], tmp_path)
    assert expect in r.stderr, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1] == "exit 2 []"


def test_env_vars_keep_urls_out_of_the_config(monkeypatch, tmp_path):
    from vitq import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    assert tracking.resolve_uri(None) == f"sqlite:///{tmp_path / 'env.db'}"
    assert tracking.resolve_uri("http://h:1") == "http://h:1"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.resolve_uri(None) == f"sqlite:///{os.getcwd()}/mlflow.db"


@pytest.mark.slow
def test_bad_inputs_each_one_line_rc2(tmp_path):
    bad_db = tmp_path / "corrupt.db"
    bad_db.write_text("not a database " * 40)
    blocker = tmp_path / "a_file"  # (a folder under a file cannot be created)
    blocker.write_text("")
    dup = tmp_path / "dup.yaml"
    dup.write_text("study_name: d\nparams:\n  layers.attn_qkv.bit_type.bits: [4, 8]\n"
                   "  layers.attn_qkv.bit_type.bits: [2]\n")
    cases = {
        ("+blocks.99.layers.mlp_fc1.bit_type.bits=3",): "blocks.99: the model has 4 blocks (0..3)",
        ("eval_batch_size=0",): "eval_batch_size: must be >= 1, got 0",
        (f"tracking.uri=sqlite:///{bad_db}",): f"tracking.uri: cannot use the MLflow store sqlite:///{bad_db}",
        ("tracking.uri=http://127.0.0.1:9",): "tracking.uri: cannot use the MLflow store http://127.0.0.1:9",
        ("-m", "hydra/sweeper=vitq_optuna", f"hydra.sweeper.search={dup}"): "duplicate key 'layers.attn_qkv.bit_type",
        ("attn_layer.kv_act.kv_bins=1000000",): "kv_bins: must be an integer in 16..65536",
        ("data.n_train=1000",): "data.n_train=1000: model digits_reference was trained on the first 1400 digits",
        ("data.mean=[0.5]",): "vitq: data.mean: data=digits takes no mean (use data=folder)",  # (was ignored)
        # an observer's own field where no point reads it (each ran, the same run as without it)
        ("layers.attn_qkv.percentile_alpha=0.99",): "vitq: layers.attn_qkv.percentile_alpha: changes nothing: only "
                                                    "PercentileObserver reads percentile_alpha, and attn_qkv uses "
                                                    "MinmaxObserver",
        ("attn_layer.kv_act.kv_bins=512",): "vitq: attn_layer.kv_act.kv_bins: changes nothing: only KLObserver reads "
                                            "kv_bins, and kv_act uses PercentileObserver",
        ("default.observer_type=MinmaxObserver", "default.percentile_alpha=0.99"):
            "vitq: default.percentile_alpha: changes nothing: only PercentileObserver reads percentile_alpha, and the "
            "points it reaches use MinmaxObserver",
        ("attn_layer.kv_act.enabled=false", "attn_layer.kv_act.percentile_alpha=0.99"):
            "vitq: attn_layer.kv_act.percentile_alpha: changes nothing: kv_act is disabled",
        ("quant=fqvit", "attn_layer.intSoft.observer_type=KLObserver"):
            "vitq: attn_layer.intSoft.observer_type: changes nothing: intSoft uses Log2 quantization, which reads "
            "bit_type.bits alone",
        # weights keys that the others leave without effect (each was ignored)
        ("model.pretrained=true",): "vitq: model.pretrained: digits_reference is vitq's digits reference, trained by "
                                    "vitq; pretrained weights are timm's",
        ("model.use_ema=false",): "vitq: model.use_ema=false: it chooses between the weights and the EMA weights of "
                                  "model.checkpoint, which is not set",
        ("model.resample_weights=true",): "vitq: model.resample_weights: it lets timm interpolate the weights of "
                                          "model.checkpoint or model.pretrained, and neither is set",
        ("study_name=",): "vitq: study_name: must be a name (the MLflow experiment), got an empty one",
        ("tracking=none", "tracking.uri=sqlite:///x.db"): "vitq: tracking.uri: sqlite:///x.db: tracking is off "
                                                          "(tracking=none or tracking.enabled=false)",  # (ignored)
        # keys only the sweepers set (a single int8 run was tagged a W8A8 baseline, rc 0)
        ("baseline=W8A8",): "vitq: baseline: marks the uniform baselines that vitq's sweeper enqueues (tag "
                            "vitq.baseline); leave it unset",
        ("-m", "trial_number=3", "layers.attn_qkv.bit_type.bits=4,8"): "vitq: trial_number: numbers the trials of a "
                                                                        "sweep",
        ("-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.study_name="): "vitq: hydra.sweeper.study_name: must be a "
                                                                          "name, got an empty one",
        (f"export_dir={blocker / 'configs'}",): f"vitq: export_dir: cannot create {blocker / 'configs'}: Not a "
                                                "directory",
        (f"stats_dir={blocker / 'stats'}",): f"vitq: stats_dir: cannot create {blocker / 'stats'}: Not a directory "
                                             "(or stats_dir=null",  # (rc 0: each run calibrated afresh, a warning)
        (f"tracking.uri=sqlite:///{blocker / 'mlflow.db'}",): f"vitq: tracking.uri: cannot use the MLflow store "
                                                             f"sqlite:///{blocker / 'mlflow.db'}: FileExistsError",
        (f"hydra.run.dir={blocker / 'out'}",): f"vitq: hydra.run.dir: cannot create {blocker / 'out'}: Not a "
                                               "directory",  # (Hydra's own mkdir: a traceback and rc 1 before)
        ("-m", f"hydra.sweep.dir={blocker / 'multi'}", "layers.attn_qkv.bit_type.bits=4,8"):
            f"vitq: hydra.sweep.dir: cannot create {blocker / 'multi'}: Not a directory",
        ("-m", "hydra/sweeper=vitq_optuna", f"hydra.sweep.dir={blocker / 'multi'}"):
            f"vitq: hydra.sweep.dir: cannot create {blocker / 'multi'}: Not a directory",
        # what one mode ignores (each ran with rc 0: one int8 trial where a search was asked for, or another folder)
        ("hydra/sweeper=vitq_optuna", "hydra.sweeper.search=mixed_precision"):
            "vitq: hydra/sweeper=vitq_optuna: takes effect only in a multirun: add -m (--multirun)",
        ("hydra/launcher=joblib",): "vitq: hydra/launcher=joblib: takes effect only in a multirun",
        (f"hydra.sweep.dir={tmp_path / 'sw'}",): f"vitq: hydra.sweep.dir={tmp_path / 'sw'}: takes effect only in a "
                                                 "multirun",
        ("-m", f"hydra.run.dir={tmp_path / 'r'}", "layers.attn_qkv.bit_type.bits=4,8"):
            f"vitq: hydra.run.dir={tmp_path / 'r'}: a multirun ignores hydra.run.*: its jobs write under "
            "hydra.sweep.dir",
    }
    for (args, expect), (cwd, r) in zip(cases.items(), run_sweeps(tmp_path, list(cases)), strict=True):
        assert expect in _error_line(r), (args, r.stderr[-1500:])
        assert not (cwd / "mlflow.db").exists(), args


@pytest.mark.slow
def test_per_block_export_feeds_back_as_a_preset(tmp_path):
    r = run_sweep(tmp_path, "+blocks.2.layers.mlp_fc1.bit_type.bits=3", "+blocks.2.attn_layer.kv_act.enabled=false",
                  "layers.attn_qkv.bit_type.bits=6", "tracking=none", f"export_dir={tmp_path / 'a'}")
    assert r.returncode == 0, r.stderr[-2000:]
    exported = (tmp_path / "a" / "quant_config_0.yaml").read_text()
    assert "'2':" in exported and exported.startswith("# @package _global_")
    (tmp_path / "conf" / "quant").mkdir(parents=True)
    (tmp_path / "conf" / "quant" / "mine.yaml").write_text(exported)
    r = run_sweep(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "quant=mine", "tracking=none",
                  f"export_dir={tmp_path / 'b'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "b" / "quant_config_0.yaml").read_text() == exported


@pytest.mark.slow
def test_unwritable_cache_falls_back_with_a_warning(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    unwritable = blocker / "cache"  # under a file: no user, root included, can create it
    from byo_case import KWARGS_CLI, MODEL_NAME, write_folders

    calib, ev = write_folders(tmp_path / "images")  # a random-weight timm ViT: nothing to train without a cache
    r = run_sweep(tmp_path, "tracking=none", "model=timm", f"model.name={MODEL_NAME}", KWARGS_CLI, "data=folder",
                  f"data.calib_root={calib}", f"data.eval_root={ev}", env={"VITQ_CACHE": str(unwritable)}, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert f"cache folder {unwritable} is not writable" in out
    assert "calibration statistics not cached" not in out  # stats_dir's default follows the fallback too


@pytest.mark.slow
@pytest.mark.parametrize("step", ["before_run", "in_trial", "after_finish"])
def test_a_kill_at_any_step_loses_nothing_and_duplicates_nothing(tmp_path, step):
    """SIGKILL at trial 1 before its MLflow run opens, inside it, or after it is FINISHED but before Optuna records
    it; the rerun ends with exactly n_trials COMPLETE trials, one FINISHED run each, and nothing RUNNING."""
    import mlflow
    import optuna
    from mlflow.tracking import MlflowClient

    args = ["-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.search=bits_only", "hydra.sweeper.n_trials=3",
            "hydra.sweeper.study_name=once", "hydra.sweeper.enqueue_baselines=false"]
    r = run_sweep(tmp_path, *args, env={"VITQ_FAULTS": f"kill_{step}@1"})
    assert r.returncode == -9, r.stderr[-2000:]  # the fault fired
    r = run_sweep(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="once", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state for t in study.trials]
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 3 and optuna.trial.TrialState.RUNNING not in states
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs([MlflowClient().get_experiment_by_name("once").experiment_id])
    kids = runs[runs["tags.vitq.role"] == "trial"]
    finished = kids[kids["status"] == "FINISHED"]
    assert len(finished) == 3 and finished["tags.trial_number"].is_unique  # no duplicate of the killed trial
    assert "RUNNING" not in set(runs["status"]) and len(kids) <= len(study.trials)
    by_number = {int(n): m for n, m in zip(finished["tags.trial_number"], finished["metrics.top1"], strict=True)}
    for t in complete:  # each COMPLETE trial's value is its own run's (or, for a retry, the original's)
        assert t.values[0] in {by_number.get(t.number), by_number.get(t.system_attrs.get("failed_trial", -1))}
    if step == "after_finish":
        assert study.trials[1].state == optuna.trial.TrialState.COMPLETE  # recorded from its FINISHED run
        assert len(study.trials) == 3


@pytest.mark.slow
def test_baselines_enqueued_once_even_if_the_creator_dies(tmp_path):
    import optuna

    args = ["-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.search=bits_only", "hydra.sweeper.n_trials=4",
            "hydra.sweeper.study_name=orphan"]
    r = run_sweep(tmp_path, *args, env={"VITQ_FAULTS": "kill_before_enqueue@*"})
    assert r.returncode == -9  # the study exists, nothing enqueued
    study = optuna.load_study(study_name="orphan", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.trials == [] and not study.user_attrs.get("vitq:enqueued")
    r = run_sweep(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    labels = [t.system_attrs.get("fixed_params", {}).get("baseline") for t in study.trials]
    assert sorted(x for x in labels if x) == ["W4A8", "W6A6", "W8A8"]


@pytest.mark.slow
def test_ctrl_c_one_line_trial_fail_parent_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import mlflow
    import optuna
    from _util import spawn, stop_group
    from mlflow.tracking import MlflowClient

    proc = spawn([sys.executable, "-m", "vitq.sweep", "-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.n_trials=3",
                  "hydra.sweeper.search=bits_only", "hydra.sweeper.study_name=ctrlc"], tmp_path,
                 {"VITQ_FAULTS": "sleep=60@0"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        study = None
        while time.time() < deadline and proc.poll() is None:  # until trial 0 sleeps inside its MLflow run
            try:
                study = optuna.load_study(study_name="ctrlc", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
                if study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                    time.sleep(3)
                    break
            except KeyError:
                pass
            time.sleep(0.5)
        assert proc.poll() is None and study is not None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        stop_group(proc)
    lines = [ln for ln in err.splitlines() if ln.startswith("vitq: ")]
    assert proc.returncode == 130 and len(lines) == 1 and "interrupted (Ctrl-C)" in lines[0], err[-2000:]
    assert "Traceback" not in err
    study = optuna.load_study(study_name="ctrlc", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state for t in study.trials]  # trial 0 FAIL; the baselines not yet run still WAITING
    assert states[0] == optuna.trial.TrialState.FAIL and set(states[1:]) <= {optuna.trial.TrialState.WAITING}
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs([MlflowClient().get_experiment_by_name("ctrlc").experiment_id])
    assert set(runs["status"]) == {"KILLED"}  # the trial's run and the parent


@pytest.mark.slow
def test_study_name_with_a_quote_and_an_alias_bomb(tmp_path):
    quoted = "hydra.sweeper.study_name=\"it's\""  # Hydra's grammar: a quote needs a quoted value
    r = run_sweep(tmp_path, "-m", "hydra/sweeper=vitq_optuna", "hydra.sweeper.search=bits_only",
                  "hydra.sweeper.n_trials=1", quoted, "hydra.sweeper.enqueue_baselines=false")
    assert r.returncode == 0, r.stderr[-2000:]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)))
    r = run_sweep(tmp_path, "-m", "hydra/sweeper=vitq_optuna", f"hydra.sweeper.search={bomb}", timeout=120)
    assert "more than 64 alias references" in _error_line(r) and len(r.stderr) < 5000


def test_dataset_inputs_survive_a_concurrent_insert(tmp_path, monkeypatch):
    """Workers creating parent runs together in one experiment of a server store race on MLflow's dataset rows (a
    unique-key violation, seen in CI): the losing insert is retried and links the row; other errors still raise."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from vitq import tracking

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.create_experiment("race")
    data = {"calib": {"name": "digits:calib", "digest": "a84c538cc4012585", "source": "digits", "n": "256"}}
    real = MlflowClient.log_inputs
    calls = []

    def racing(self, run_id, datasets=None, **kw):  # noqa: ANN001, ANN003
        calls.append(run_id)
        if len(calls) == 1:
            raise MlflowException('(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint '
                                  '"dataset_pk"')
        return real(self, run_id, datasets=datasets, **kw)

    monkeypatch.setattr(MlflowClient, "log_inputs", racing)
    rid = client.create_run(exp).info.run_id
    tracking.log_datasets(rid, data)
    assert len(calls) == 2
    assert [d.dataset.name for d in client.get_run(rid).inputs.dataset_inputs] == ["digits:calib"]

    def broken(self, run_id, datasets=None, **kw):  # noqa: ANN001, ANN003
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run gone")

    monkeypatch.setattr(MlflowClient, "log_inputs", broken)
    with pytest.raises(MlflowException, match="run gone"):
        tracking.log_datasets(client.create_run(exp).info.run_id, data)


def test_trial_run_made_in_the_background_ends_with_the_trial(tmp_path):
    """A trial's MLflow run is created while the trial computes: a finished trial's run is FINISHED with its
    metrics and params, a failing trial's FAILED with its params; a run that cannot be created (its experiment
    deleted under the sweep) fails the trial with MLflow's error, and a trial that fails itself raises its own."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from vitq import LayerQuantConfig, QuantConfig, tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = LayerQuantConfig.uniform(QuantConfig())
    exp = tracking.use_store(uri, "bg")
    with tracking.trial_run(uri, "bg", 0, cfg, params={"layers.attn_*.bits": 4}) as run:
        run.finish({"top1": 0.5}, None)
    with pytest.raises(ZeroDivisionError), tracking.trial_run(uri, "bg", 1, cfg, params={"k": 8}):
        _ = 1 / 0
    client = MlflowClient()
    runs = {r.data.tags["trial_number"]: r for r in client.search_runs([exp])}
    assert runs["0"].info.status == "FINISHED" and runs["0"].data.metrics == {"top1": 0.5}
    assert runs["0"].data.params == {"layers.attn_ALL.bits": "4"}
    assert runs["1"].info.status == "FAILED" and runs["1"].data.params == {"k": "8"}
    client.delete_experiment(exp)  # (the experiment's id stays cached in the process)
    with pytest.raises(MlflowException, match="active"), tracking.trial_run(uri, "bg", 2, cfg) as run:
        run.finish({"top1": 0.5}, None)
    with pytest.raises(ZeroDivisionError), tracking.trial_run(uri, "bg", 3, cfg):
        _ = 1 / 0
