"""Sweep jobs run in the sweeper's process on one pre-composed config: what Hydra's basic launcher does per job,
without composing the config again, parsing the override strings, reconfiguring logging and writing three YAML
files for every trial.

A job runs here only when each of its keys is a value leaf of the composed config
(``layers.attn_qkv.bit_type.bits``, ``trial_number``): then setting the sweeper's values with OmegaConf gives the
config that Hydra would compose from the override strings (checked by a test). Config groups (``quant=w4a8``),
unknown keys and ``hydra.*`` keys are left to Hydra's launcher, which composes them as usual.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, env_override
from hydra.types import HydraContext, TaskFunction
from omegaconf import Container, DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)
_MISSING = object()


class InProcessLauncher:
    """Runs sweep jobs on ``base_overrides`` composed once, with each job's value overrides applied by OmegaConf.

    Per job it sets ``hydra.job.num``/``id``, ``hydra.overrides.task`` and ``hydra.runtime.output_dir`` (the
    sweep folder: no per-job folder or files), runs Hydra's job callbacks and the task function, and returns a
    Hydra ``JobReturn``. Job logging is configured once, to ``<sweep dir>/<job name>.log``.
    """

    def __init__(self, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig,
                 base_overrides: Sequence[str]) -> None:
        self.context = hydra_context
        self.task_function = task_function
        self.config = config
        self.base_overrides = list(base_overrides)
        self._base: DictConfig | None = None
        self._leaf: dict[str, bool] = {}  # key -> a value leaf (not a config group) of the composed config
        self._logging = False

    @property
    def base(self) -> DictConfig:
        """The job config of ``base_overrides``, composed by Hydra once."""
        if self._base is None:
            self._base = self.context.config_loader.load_sweep_config(self.config, self.base_overrides)
        return self._base

    def accepts(self, keys: Sequence[str]) -> bool:
        """True when every key is a value leaf of the composed config (not a group, not ``hydra.*``)."""
        return all(self._is_leaf(k) for k in keys)

    def _is_leaf(self, key: str) -> bool:
        if key.startswith("blocks."):  # the free ``blocks`` mapping: a block's key is added to it
            return True
        if key not in self._leaf:
            node = OmegaConf.select(self.base, key, default=_MISSING, throw_on_missing=False)
            self._leaf[key] = not (key == "hydra" or key.startswith("hydra.") or node is _MISSING
                                   or isinstance(node, Container)
                                   or self.context.config_loader.get_group_options(key))  # groups: Hydra composes
        return self._leaf[key]

    def launch(self, jobs: Sequence[tuple[Sequence[str], dict[str, Any]]], initial_job_idx: int) -> list[JobReturn]:
        """Run ``jobs``, each its override strings (as Hydra records them) and their values by key (applied)."""
        return [self._run(list(lines), values, initial_job_idx + i) for i, (lines, values) in enumerate(jobs)]

    def _prepare(self) -> None:
        """Once: the sweep's job config (its Hydra node serves every job) and the task config without it."""
        full = copy.deepcopy(self.base)
        with read_write(full.hydra), open_dict(full.hydra):
            full.hydra.runtime.output_dir = str(Path(str(self.config.hydra.sweep.dir)).absolute())
        task = copy.deepcopy(full)
        with read_write(task), open_dict(task):
            del task["hydra"]
        self._full, self._task = full, task
        self._work = copy.deepcopy(task)  # every job's config (see _job_config)
        OmegaConf.set_readonly(self._work, True)
        self._work_keys: set[str] = set()
        Path(full.hydra.runtime.output_dir).mkdir(parents=True, exist_ok=True)
        self._previous = HydraConfig.instance().cfg  # the sweep's, given back by close()
        OmegaConf.set_readonly(full.hydra, True)  # as HydraConfig.set_config, which would serve a masked copy of
        HydraConfig.instance().cfg = full  # the node: _set_job sets this one node, and HydraConfig.get() reads it
        configure_log(full.hydra.job_logging, full.hydra.verbose)  # the job log of the whole sweep
        self._logging = True

    def _set_job(self, overrides: list[str], idx: int) -> None:
        """This job's number and overrides in the Hydra node that ``HydraConfig.get()`` and the callbacks read."""
        node = self._full.hydra  # (also what ``HydraConfig.get()`` returns)
        with read_write(node), open_dict(node):
            node.job.num = idx
            node.job.id = idx
            node.overrides.task = overrides

    def _job_config(self, values: dict[str, Any]) -> DictConfig:
        """The task config with ``values`` set, as a deep copy of it with them set would be.

        One read-only working copy serves every job (a deep copy per job took ~5 ms, against ~60 ms of a digits
        trial's bookkeeping): keys that the previous job set and this one does not go back to the task config's
        values, a mapping or list value is set on the task config's (``merge`` as on a fresh copy), and ``blocks``
        (where ``blocks.N`` keys are added) starts again from the task config's whenever a job touches it.
        """
        work, base = self._work, self._task
        with read_write(work), open_dict(work):
            if any(k.startswith("blocks.") for k in (*self._work_keys, *values)):
                if "blocks" in base:
                    work.blocks = base.blocks  # (OmegaConf copies a node it sets)
                elif "blocks" in work:
                    del work["blocks"]
            for key in self._work_keys - values.keys():
                if not key.startswith("blocks."):
                    OmegaConf.update(work, key, OmegaConf.select(base, key), merge=False)
            for key, value in values.items():
                block = key.startswith("blocks.")
                if isinstance(value, (dict, list)) and not block:
                    OmegaConf.update(work, key, OmegaConf.select(base, key), merge=False)
                OmegaConf.update(work, key, value, merge=True, force_add=block)
        self._work_keys = set(values)
        return work

    def _run(self, lines: list[str], values: dict[str, Any], idx: int) -> JobReturn:
        """One job, as Hydra's ``run_job``: its config is the task config with ``values`` set; the callbacks get
        the sweep's job config with this job's Hydra node."""
        callbacks = self.context.callbacks
        if not self._logging:
            self._prepare()
        overrides = [*self.base_overrides, *lines]
        self._set_job(overrides, idx)
        task_cfg = self._job_config(values)
        ret = JobReturn(overrides=overrides, cfg=task_cfg, hydra_cfg=HydraConfig.instance().cfg,
                        working_dir=str(Path.cwd()))
        with env_override(dict(self._full.hydra.job.env_set)):
            callbacks.on_job_start(config=self._full, task_function=self.task_function)
            try:
                ret.return_value = self.task_function(task_cfg)
                ret.status = JobStatus.COMPLETED
            except Exception as e:  # noqa: BLE001 - as Hydra's run_job: the sweeper reads the failure
                ret.return_value = e
                ret.status = JobStatus.FAILED
        callbacks.on_job_end(config=self._full, job_return=ret)
        return ret

    def close(self) -> None:
        """Hand the Hydra config and logging back to the sweep."""
        if self._logging:
            HydraConfig.instance().cfg = self._previous
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            self._logging = False
