"""Optuna search as a Hydra sweeper (``hydra/sweeper=optuna``), on Optuna's ask-and-tell API.

The published ``hydra-optuna-sweeper`` (1.3.0) requires ``optuna<3`` (lightning-hydra-template
#362, #568). This sweeper works with current Optuna: each batch of ``n_jobs`` trials is asked
from the study, launched through the configured Hydra launcher (each trial is a normal job
directory), and told its objective, the value the task function returns (seqlab's
``optimized_metric``, e.g. ``val/acc_best``).

- Search space: ``hydra.sweeper.params`` and sweep overrides on the command line, in Hydra's
  override grammar: ``a=1,2,3`` or ``choice(...)`` -> categorical, ``range(1,8)`` -> integer,
  ``interval(1e-4,1e-2)`` -> float, ``tag(log, interval(...))`` -> log scale. Plain overrides are
  fixed for every trial.
- Persistence: the study lives in ``storage`` (default SQLite in the sweep directory), so running
  the same command with the same ``hydra.sweep.dir`` resumes an interrupted search: finished trials
  are kept, a trial that was running when the search died is marked failed and run again.
- A trial whose job raises (an exception, out of memory) or returns a non-finite or missing
  objective is told FAIL and the search goes on; ``optimization_results.yaml`` lists the best
  trial and every failure.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"


def distribution(override: Override) -> Any:
    """The Optuna distribution of one sweep override (Hydra's override grammar)."""
    import optuna

    key = override.get_key_element()
    value = override.value()
    if isinstance(value, ChoiceSweep) or override.is_choice_sweep():
        choices = list(override.sweep_iterator(transformer=lambda x: x))
        return optuna.distributions.CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if all(isinstance(v, int) for v in (start, stop, step)):
            return optuna.distributions.IntDistribution(int(start), int(stop) - 1, step=int(step))
        return optuna.distributions.CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return optuna.distributions.IntDistribution(value.start, value.end, log=log_scale)
        return optuna.distributions.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"hydra.sweeper.params: {key}={override.input_line} is not a sweep Optuna can sample")


def override_value(value: Any) -> str:
    """A sampled value as override text (strings with spaces or symbols quoted)."""
    if isinstance(value, str) and not re.fullmatch(r"[\w./:+-]*", value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def objective_value(result: JobReturn) -> tuple[float | None, str | None]:
    """(value, None) for a usable objective, else (None, why the trial failed)."""
    try:
        value = result.return_value  # re-raises the job's exception
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"
    if value is None:
        return None, "the job returned no objective (set optimized_metric)"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, f"the job returned {value!r}, not a number"
    if not math.isfinite(number):
        return None, f"the objective is {number} (diverged)"
    return number, None


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        direction: str,
        study_name: str,
        storage: str | None,
        n_trials: int,
        n_jobs: int,
        sampler: str,
        seed: int | None,
        n_startup_trials: int,
        params: dict[str, str] | None,
    ) -> None:
        direction = {"min": "minimize", "max": "maximize"}.get(direction, direction)  # a task's monitor_mode
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"hydra.sweeper.direction={direction!r}: expected 'minimize' or 'maximize'")
        if sampler not in ("tpe", "random"):
            raise ValueError(f"hydra.sweeper.sampler={sampler!r}: expected 'tpe' or 'random'")
        if n_trials < 1 or n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_trials={n_trials} and n_jobs={n_jobs} must be >= 1")
        self.direction, self.study_name, self.storage = direction, study_name, storage
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.sampler_name, self.seed, self.n_startup_trials = sampler, seed, n_startup_trials
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ------------------------------------------------------------------ search space
    def search_space(self, arguments: list[str]) -> tuple[list[str], dict[str, Any]]:
        """(fixed overrides, {key: distribution}); the command line wins over ``params``."""
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        lines = [f"{key}={value}" for key, value in self.params.items()] + list(arguments)
        by_key: dict[str, Override] = {}
        for override in parser.parse_overrides(lines):
            by_key[override.get_key_element()] = override
        fixed = [o.input_line for o in by_key.values() if not o.is_sweep_override()]
        space = {key: distribution(o) for key, o in by_key.items() if o.is_sweep_override()}
        if not space:
            raise ValueError(
                "hydra/sweeper=optuna has nothing to search: give hydra.sweeper.params or sweep overrides "
                "(a=1,2 | range(..) | interval(..))"
            )
        return fixed, space

    def create_study(self, sweep_dir: Path):
        import optuna

        storage = self.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
        if self.sampler_name == "tpe":
            sampler = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.n_startup_trials)
        else:
            sampler = optuna.samplers.RandomSampler(seed=self.seed)
        return optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            sampler=sampler,
            direction=self.direction,
            load_if_exists=True,
        )

    # ------------------------------------------------------------------ the search
    def sweep(self, arguments: list[str]) -> None:
        import optuna
        from optuna.trial import TrialState

        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        fixed, space = self.search_space(arguments)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = self.create_study(sweep_dir)
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # a trial the previous search was running when it died: failed, and run again
            optuna.trial.Trial(study, stale._trial_id).set_user_attr("interrupted", True)
            study.tell(stale.number, state=TrialState.FAIL)
        log.info(
            "Optuna study %r (%s, %s sampler, seed %s): %d trials, space %s",
            self.study_name, self.direction, self.sampler_name, self.seed, self.n_trials,
            {key: str(dist) for key, dist in space.items()},
        )  # fmt: skip

        def finished() -> int:
            trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
            return sum(1 for t in trials if not t.user_attrs.get("interrupted"))

        job_index = len(study.trials)  # a resumed search writes new job directories
        while (remaining := self.n_trials - finished()) > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, remaining))]
            batch = [[*fixed, *(f"{k}={override_value(v)}" for k, v in t.params.items())] for t in trials]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=job_index)
            for trial, overrides, result in zip(trials, batch, results):
                value, error = objective_value(result)
                trial.set_user_attr("job", job_index)
                trial.set_user_attr("overrides", overrides)
                if error is None:
                    study.tell(trial, value)
                    log.info("trial %d (job %d): %s -> %.6g", trial.number, job_index, trial.params, value)
                else:
                    trial.set_user_attr("error", error)
                    study.tell(trial, state=TrialState.FAIL)
                    log.warning("trial %d (job %d) failed: %s", trial.number, job_index, error)
                job_index += 1
        self.write_results(study, sweep_dir)

    def write_results(self, study: Any, sweep_dir: Path) -> None:
        from optuna.trial import TrialState

        failed = [
            {
                "trial": t.number,
                "job": t.user_attrs.get("job"),
                "params": t.params,
                "error": t.user_attrs.get("error"),
            }
            for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if not t.user_attrs.get("interrupted")
        ]
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        results: dict[str, Any] = {
            "name": self.study_name,
            "direction": self.direction,
            "n_trials": len(completed) + len(failed),
            "n_failed": len(failed),
        }
        if completed:
            best = study.best_trial
            results.update(best_trial=best.number, best_job=best.user_attrs.get("job"))
            results.update(best_value=best.value, best_params=best.params)
            log.info("best trial %d: %s = %.6g", best.number, best.params, best.value)
        else:
            log.warning("no trial of the Optuna study finished")
        results["failed"] = failed
        OmegaConf.save(OmegaConf.create(results), sweep_dir / RESULTS_FILE)
