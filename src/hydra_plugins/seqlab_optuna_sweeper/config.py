"""Config of ``hydra/sweeper=optuna`` (see optuna_sweeper.py). No ``from __future__ import
annotations`` here: OmegaConf reads these annotations as types, and Hydra's plugin scanner runs
this module outside ``sys.modules``."""

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.seqlab_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    # minimize | maximize, or min | max; by default the task's monitor mode, right for the
    # default optimized_metric (the monitored metric's best: accuracy and BLEU are maximised)
    # (null: a task.monitor of no known direction, whose task.monitor_mode is to be given)
    direction: Optional[str] = "${oc.select:task.monitor_mode,minimize}"  # noqa: UP045  (minimize without a task)
    study_name: str = "seqlab"
    # an Optuna storage URL; null: SQLite file in the sweep directory (resumable)
    storage: Optional[str] = None  # noqa: UP045
    n_trials: int = 20
    # trials launched together (a parallel launcher runs them at once)
    n_jobs: int = 1
    # tpe | random
    sampler: str = "tpe"
    seed: Optional[int] = None  # noqa: UP045
    # TPE: random trials before the model kicks in
    n_startup_trials: int = 10
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="seqlab")
