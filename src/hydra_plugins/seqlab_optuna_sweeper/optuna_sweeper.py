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
  are kept, a trial that was running when the search died is told its objective if its job had
  finished (its ``summary.json``), else marked failed and a new trial takes its place; a stored
  study with other settings (direction, fixed overrides, space) is refused. One sweeper a sweep
  directory (a lock on it): a second one started there while the first runs is refused.
- Several sweepers may share one storage (a database URL; each its own ``hydra.sweep.dir``):
  ``n_trials`` counts the study's trials, theirs included, and each seeds its sampler from
  ``seed`` and its sweep directory (with one seed they proposed the same parameters). A running
  trial's sweeper records every
  minute that it is alive; another sweeper takes a trial for interrupted only when that record is
  10 minutes old, or names a process of its own host that is gone (a trial asked elsewhere, with
  no record, counts as interrupted); a search started again in its own sweep directory takes its
  earlier attempt's running trials for interrupted at once.
- A trial whose job raises (an exception, out of memory) or returns a non-finite or missing
  objective, or whose sampled overrides Hydra cannot compose with each other, is told FAIL and the
  search goes on; so is one whose launcher raised (submitit, when a SLURM job of the batch died),
  unless its job wrote its ``summary.json`` (the objective is read from there, once the batch's
  jobs still training have ended); ``optimization_results.yaml`` lists the best trial and every failure. A search in
  which no trial finished exits with an error. A choice that does not compose with the fixed
  overrides at all is refused before the first trial.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, QuotedString, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"
#: seconds between a sweeper's records that its running trials are alive, and the age of that
#: record after which another sweeper takes the trial for interrupted
HEARTBEAT_S = 60.0
STALE_S = 600.0
#: a search whose first trials, this many, all failed with one error, whatever their parameters,
#: stops there: the rest would fail alike (data not found, a bad fixed override), each after its
#: own set-up (a download tried again, a data set tokenized again)
FAIL_FAST = 3


#: the errors a trial's parameters cannot be the cause of when trials with others fail alike: a
#: job's set-up refusing its data or configuration. (A diverged training, a NaN objective, say the
#: same thing for different parameters that all caused it: a search over the learning rate
#: whose first trials drew high ones goes on.)
SET_UP_ERRORS = ("DataError:", "ConfigError:", "FileNotFoundError:")


def failing_alike(study: Any) -> tuple[int, str] | None:
    """(how many, the error) where no trial of the study finished and at least ``FAIL_FAST``
    failed, all with one set-up error (``SET_UP_ERRORS``) and each with other parameters; else
    None."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    if any(trial.state == TrialState.COMPLETE for trial in trials):
        return None
    failed = [trial for trial in trials if not trial.user_attrs.get("interrupted")]
    errors = {trial.user_attrs.get("error") for trial in failed}
    params = {repr(sorted(trial.params.items())) for trial in failed}
    if len(failed) < FAIL_FAST or len(errors) != 1 or len(params) != len(failed):
        return None
    error = errors.pop()
    return (len(failed), error) if isinstance(error, str) and error.startswith(SET_UP_ERRORS) else None


def is_interrupted(trial: Any, now: float, sweep_dir: str | None = None) -> bool:
    """Whether a RUNNING trial's sweeper is gone: no alive record (asked by something else), a
    record older than ``STALE_S``, a process of this host that no longer runs, or an earlier
    attempt of this very search (the same ``sweep_dir``: one sweeper a sweep directory)."""
    from seqlab.utils.resume import marker_process

    attrs = trial.user_attrs
    if "worker" not in attrs or "alive_at" not in attrs or now - float(attrs["alive_at"]) > STALE_S:
        return True
    if sweep_dir is not None and attrs.get("sweep") == sweep_dir:
        return True
    host, pid = str(attrs["worker"]).split()
    return (
        host == socket.gethostname() and int(pid) != os.getpid() and marker_process(attrs["worker"]) is None
    )


class Heartbeat:
    """Records ``alive_at`` on the running trials every ``HEARTBEAT_S`` seconds, in a thread, while
    their jobs run (``with Heartbeat(study, trials):``)."""

    def __init__(self, study: Any, trials: list[Any], interval: float = HEARTBEAT_S) -> None:
        self.study, self.trials, self.interval = study, trials, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="optuna-heartbeat", daemon=True)

    def beat(self) -> None:
        for trial in self.trials:
            trial.set_user_attr("alive_at", time.time())

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.beat()
            except Exception as error:  # a storage hiccup: the next beat may get through
                log.warning("Optuna heartbeat not recorded: %s", error)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def first_free_job(sweep_dir: Path, trials: int) -> int:
    """The first job number to launch: after the study's trials (a resumed search writes new job
    directories) and after every job directory already in ``sweep_dir`` (a new study there, as the
    stored-study refusal suggests, would otherwise run its trials in the old study's finished job
    directories, which refuse them)."""
    from seqlab.utils.hydra_callbacks import sweep_jobs

    taken = []
    for job in sweep_jobs(sweep_dir):  # numbered, or named by hydra.sweep.subdir: its recorded number
        if job.name.isdigit():
            taken.append(int(job.name))
            continue
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            taken.append(int(OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.job.num))
    return max([trials, *(number + 1 for number in taken)])


#: seconds between looks at the jobs of a batch whose launcher failed while some of them ran on
JOB_POLL_S = 30.0


def wait_for_running_jobs(job_dirs: list[Path]) -> None:
    """Wait until no job of ``job_dirs`` is training any more (its ``.running`` marker gone or
    stale): the launcher raised for the whole batch at the first job that failed (submitit), while
    the others ran on, and their objectives would otherwise be lost (told failed with that error,
    their finished runs never read). Jobs not started yet (queued) are not waited for."""
    from seqlab.utils.resume import running_process

    while True:
        running = [job.name for job in job_dirs if running_process(job, this_job_gone=False)]
        if not running:
            return
        log.info("waiting for jobs %s of the batch, still training", running)
        time.sleep(JOB_POLL_S)


class SweepError(CompactHydraException, ValueError):
    """A search space or stored study this sweeper cannot use (the message names the key).
    Hydra prints a ``CompactHydraException`` as its message alone, not as a traceback."""


class SearchFailed(CompactHydraException, RuntimeError):
    """No trial of the search finished (the message gives the first trial's error)."""


def distribution(override: Override) -> Any:
    """The Optuna distribution of one sweep override (Hydra's override grammar)."""
    try:
        return _distribution(override)
    except SweepError:
        raise
    except ValueError as error:  # Optuna's own message names no key: "low <= high must hold"
        raise SweepError(f"hydra.sweeper.params: {override.input_line}: {error}") from None


def _distribution(override: Override) -> Any:
    import optuna

    value = override.value()
    if isinstance(value, ChoiceSweep) or override.is_choice_sweep():
        # quoted values ('a b',c) arrive as Hydra's QuotedString: the text is the value
        choices = [
            v.text if isinstance(v, QuotedString) else v
            for v in override.sweep_iterator(transformer=lambda x: x)
        ]
        nested = [c for c in choices if isinstance(c, list | dict)]
        if nested:  # Optuna stores scalars; a list would reach the trial as the text "[1, 2]"
            raise SweepError(
                f"hydra.sweeper.params: {override.input_line}: choice {nested[0]!r} is not a str, int, "
                "float, bool or null (a list or dict cannot be sampled; sample its parts as keys of their own)"
            )
        return optuna.distributions.CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):  # stop excluded, as in Hydra's basic sweeper and Python's range
        start, stop, step = value.start, value.stop, value.step
        if all(isinstance(v, int) for v in (start, stop, step)):
            values = range(int(start), int(stop), int(step))  # a descending one too: range(8,1,-2)
            if not values:
                raise SweepError(f"hydra.sweeper.params: {override.input_line}: the range holds no value")
            return optuna.distributions.IntDistribution(min(values), max(values), step=abs(int(step)))
        # range(0.1,0.5,0.1): 0.30000000000000004 would be a trial's value (and its override text)
        values = [round(v, 12) for v in override.sweep_iterator()]
        return optuna.distributions.CategoricalDistribution(values)
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return optuna.distributions.IntDistribution(value.start, value.end, log=log_scale)
        return optuna.distributions.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise SweepError(f"hydra.sweeper.params: {override.input_line} is not a sweep Optuna can sample")


#: fixed overrides that may differ when a search resumes: what shows or logs the trials, not
#: what they compute (narrower than a single run's RESUME_IGNORES: ckpt_path and extras count)
SWEEP_IGNORES = (
    "logger",
    "tags",
    "callbacks.rich_progress_bar",
    "callbacks.model_summary",
    "task.optimizer.fused",
)


def comparable(fixed: list[str]) -> list[str]:
    """The fixed overrides two attempts of one search must share, sorted."""
    from seqlab.utils.resume import override_key, under

    return sorted(o for o in fixed if not under(override_key(o), SWEEP_IGNORES))


def override_value(value: Any) -> str:
    """A sampled value as override text (strings with spaces or symbols quoted; None and booleans
    as Hydra spells them, or they would arrive as the strings 'None', 'True')."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and (not re.fullmatch(r"[\w./:+-]*", value) or not_a_string_to_hydra(value)):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def not_a_string_to_hydra(text: str) -> bool:
    """Whether Hydra reads ``text`` unquoted as another type: a number, a boolean, null, '' (a
    choice of '1' or 'true' arrived as the int 1 or the bool true)."""
    if text.lower() in ("true", "false", "null", "inf", "+inf", "-inf", "nan", ""):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def objective_value(result: JobReturn) -> tuple[float | None, str | None]:
    """(value, None) for a usable objective, else (None, why the trial failed)."""
    from seqlab.utils.hydra_callbacks import job_error

    error = job_error(result)
    if error is not None:
        return None, f"{type(error).__name__}: {error}"
    value = result.return_value
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
        direction: str | None,
        study_name: str,
        storage: str | None,
        n_trials: int,
        n_jobs: int,
        sampler: str,
        seed: int | None,
        n_startup_trials: int,
        params: dict[str, str] | None,
    ) -> None:
        if direction is None:  # ${task.monitor_mode} of a metric whose direction is not known
            raise ValueError(
                "hydra.sweeper.direction follows task.monitor_mode, which task.monitor leaves unknown (a "
                "metric of your own): give task.monitor_mode=min or max, or hydra.sweeper.direction="
                "minimize or maximize"
            )
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
            raise SweepError(
                "hydra/sweeper=optuna has nothing to search: give hydra.sweeper.params or sweep overrides "
                "(a=1,2 | range(..) | interval(..))"
            )
        return fixed, space

    def make_sampler(self, seed: int | None):
        import optuna

        if self.sampler_name == "tpe":
            # trials asked together (n_jobs) are spread out: the running ones count as bad (the
            # default from Optuna 5; before, every trial of a batch was proposed alike)
            return optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=self.n_startup_trials, constant_liar=self.n_jobs > 1
            )
        return optuna.samplers.RandomSampler(seed=seed)

    def create_study(self, sweep_dir: Path, fixed: list[str], space: dict[str, Any]):
        """The study, new or resumed. A resumed one must be this search: the same direction, fixed
        overrides and space (a shared storage would otherwise merge two searches, or run none
        when the other's trials already count); its sampler continues from a seed of its own (a
        fresh seeded sampler would propose the first trials' parameters again)."""
        import optuna

        from seqlab.utils.secrets import redact, redact_text

        storage = self.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            sampler=self.make_sampler(self.seed),
            direction=self.direction,
            load_if_exists=True,
        )
        search = {
            "direction": self.direction,
            "fixed": comparable(redact(fixed)),  # the storage may be a shared database
            "space": {key: optuna.distributions.distribution_to_json(d) for key, d in sorted(space.items())},
        }
        stored = study.direction.name.lower()  # optuna keeps the stored one, whatever was asked
        saved = study.user_attrs.get("seqlab_search") or {"direction": stored}
        if "fixed" not in saved:  # a new study (or one stored before its settings were)
            saved = {**search, "direction": stored}
            if stored == self.direction:
                study.set_user_attr("seqlab_search", saved)
        saved = {**saved, "fixed": comparable(redact(saved["fixed"]))}  # stored before the filter, too
        if saved != search:
            differences = []
            for part in ("direction", "fixed", "space"):
                then, now = saved.get(part), search[part]
                if part == "fixed" and then != now:
                    then, now = sorted(set(then) - set(now)), sorted(set(now) - set(then))
                elif part == "space" and then != now:
                    keys = sorted(k for k in {*then, *now} if then.get(k) != now.get(k))
                    then, now = {k: then.get(k) for k in keys}, {k: now.get(k) for k in keys}
                if then != now:
                    differences.append(f"{part}: {then} then, {now} now")
            raise SweepError(
                f"Optuna study {self.study_name!r} in {redact_text(storage)} holds another search ({'; '.join(differences)}): "
                "resume it with its own settings, or start another with hydra.sweeper.study_name=<new name> "
                "or another hydra.sweep.dir"
            )
        if study.trials or self.storage:
            study.sampler = self.make_sampler(self.sampler_seed(len(study.trials), sweep_dir))
        if study.trials:
            log.info("resuming Optuna study %r: %d trials so far", self.study_name, len(study.trials))
        return study

    def sampler_seed(self, trials: int, sweep_dir: Path) -> int | None:
        """The sampler's seed: ``seed``, plus the study's trials so far (a resumed search would
        otherwise propose its first trials' parameters again); with a shared ``storage``, mixed
        with this sweeper's sweep directory: sweepers started (or resumed) together with one seed
        proposed the same parameters, every trial twice."""
        if self.seed is None:
            return None
        seed = self.seed + trials
        if not self.storage:
            return seed
        digest = hashlib.sha256(f"{seed} {sweep_dir.resolve()}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    # ------------------------------------------------------------------ the search
    def composes(self, overrides: list[str]) -> str | None:
        """None if Hydra composes the config with ``overrides``, else why not."""
        try:
            self.validate_batch_is_legal([overrides])
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        return None

    def misspelt(self, fixed: list[str], key: str) -> str | None:
        """For a searched ``key`` whose parent is in the config ``fixed`` composes but not the key
        itself: the question whether it is one of that parent's keys it resembles (a typo was
        asked only whether the search's data= was given); None where none is alike."""
        import difflib

        parent, _, leaf = key.lstrip("+~").rpartition(".")
        try:
            with self.job_config(fixed, 0) as config:
                node = OmegaConf.select(config, parent) if parent else config
                names = [str(name) for name in node] if isinstance(node, DictConfig) else None
        except Exception:  # the fixed overrides do not compose: the trials will say why
            return None
        if names is None or leaf in names:
            return None
        close = [
            f"{parent}.{name}" if parent else name for name in difflib.get_close_matches(leaf, names, n=3)
        ]
        return f"did you mean {' or '.join(close)}? or is" if close else None

    @contextlib.contextmanager
    def job_config(self, overrides: list[str], job: int, output: bool = False) -> Iterator[DictConfig]:
        """The config job number ``job`` composes from ``overrides``, as Hydra's launchers give it
        (its number; with ``output``, an output directory), made the current Hydra config (for
        ``${hydra:...}``) while in use. Raises where Hydra cannot compose ``overrides``."""
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict

        assert self.hydra_context is not None and self.config is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = job
            config.hydra.job.num = job
            if output:  # (nothing is written there)
                config.hydra.runtime.output_dir = str(Path(config.hydra.sweep.dir) / str(job))
        hydra_config = HydraConfig.instance()
        before = hydra_config.cfg
        try:
            hydra_config.set_config(config)
            yield config
        finally:
            hydra_config.cfg = before

    def job_subdir(self, overrides: list[str], job: int) -> str:
        """The directory, under the sweep directory, that the launcher gives job number ``job``:
        ``hydra.sweep.subdir`` (``${hydra.job.num}`` by default, or named by the overrides)
        resolved as Hydra's launchers do. Raises where Hydra cannot compose ``overrides``. (A
        subdir naming ``hydra.job.id`` resolves to the number: submitit's ids are SLURM's, known
        only once the job is queued.)"""
        with self.job_config(overrides, job) as config:
            try:  # the overrides composed: a subdir that cannot be resolved is the search's own error
                return str(OmegaConf.select(config, "hydra.sweep.subdir"))
            except Exception as error:
                given = OmegaConf.to_container(self.config.hydra.sweep, resolve=False).get("subdir")
                raise SweepError(
                    f"hydra.sweep.subdir={given!r} cannot be resolved for job "
                    f"{job}: {type(error).__name__}: {error}"
                ) from None

    def job_refuses(self, overrides: list[str]) -> str | None:
        """Why a job would refuse the config ``overrides`` compose before it reads any data (a
        value of the wrong type for the class it configures: ``seqlab.train.check_choices``), or
        None (also where the check cannot run on this config: the trials will tell)."""
        from seqlab.errors import ConfigError

        try:
            with self.job_config(overrides, 0, output=True) as config:
                if "data" not in config or "task" not in config:
                    return None  # not a training config
                from seqlab.train import check_choices

                check_choices(config)
        except ConfigError as error:
            return str(error)
        except Exception:
            return None
        return None

    def check_choices(self, fixed: list[str], space: dict[str, Any]) -> None:
        """Refuse, before any trial, a config-group option that does not compose with the fixed
        overrides (misspelt, or without a key a fixed override sets): every trial that sampled
        it would fail. Config values are left to the trials (``model.nhead`` composes with
        ``model=transformer``, not with ``model=lstm``: only their combinations fail)."""
        import optuna

        for key, dist in space.items():
            if "." in key.lstrip("+~"):
                continue  # a config value: it may compose only with some options of a sampled group
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                for choice in dist.choices:
                    why = self.composes([*fixed, f"{key}={override_value(choice)}"])
                    if why is not None:
                        raise SweepError(f"hydra.sweeper.params: {key}={choice} cannot be composed: {why}")

    def check_direction(self) -> None:
        """The searches' direction follows the task's monitor mode (``${task.monitor_mode}``),
        right for the monitored metric's best: another ``optimized_metric`` (``val/loss`` under
        accuracy's ``max``) was silently optimised the wrong way. Refused unless the direction is
        given with it. A direction given against the monitor mode for the monitored metric's
        best (``minimize`` for ``val/acc_best``) is refused too."""
        assert self.config is not None
        node = OmegaConf.select(self.config, "hydra.sweeper", throw_on_missing=False)
        if not OmegaConf.is_dict(node):
            return
        raw = OmegaConf.to_container(node, resolve=False).get("direction")
        metric, monitor = self.config.get("optimized_metric"), OmegaConf.select(self.config, "task.monitor")
        if not monitor:
            return
        if "task.monitor_mode" in str(raw) and metric != f"{monitor}_best":
            raise SweepError(
                f"optimized_metric={metric!r} is not the monitored {monitor}_best, and "
                f"hydra.sweeper.direction follows task.monitor_mode ({self.direction}); give "
                "hydra.sweeper.direction=minimize|maximize for it"
            )
        mode = OmegaConf.select(self.config, "task.monitor_mode")
        wanted = {"min": "minimize", "max": "maximize"}.get(mode)
        if metric == f"{monitor}_best" and wanted and self.direction != wanted:
            raise SweepError(
                f"hydra.sweeper.direction={self.direction} for optimized_metric={metric!r}, the best "
                f"of {monitor}, which task.monitor_mode={mode} makes the highest value if max, the "
                f"lowest if min: the search would look for the worst trials; leave "
                f"hydra.sweeper.direction out (it follows task.monitor_mode)"
            )

    def check_values(self, fixed: list[str], space: dict[str, Any]) -> None:
        """Refuse, before any trial, a sampled config value that composes with no combination of
        the sampled groups' options (with none sampled: with the fixed overrides): every trial
        would fail, e.g. a classification search's ``task.embed_dropout`` with the default
        forecasting data. Over 64 combinations, nothing is refused (the trials will tell)."""
        import itertools

        import optuna

        def sample(dist: Any) -> Any:
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                return dist.choices[0]
            return dist.low

        assert self.config is not None and self.hydra_context is not None
        chosen = OmegaConf.select(self.config, "hydra.runtime.choices", throw_on_missing=False)
        group_names = set(chosen) if OmegaConf.is_dict(chosen) else set()
        group_options = getattr(self.hydra_context.config_loader, "get_group_options", None)

        def is_group(key: str) -> bool:
            """A config group: one of the defaults list's, or one Hydra has options for (an
            appended ``+study_backbone``, absent from the sweep config's choices)."""
            name = key.lstrip("+~")
            if name in group_names:
                return True
            if "." in name:
                return False
            if group_options is None:  # no loader to ask: a key without a dot
                return True
            try:
                return bool(group_options(name))
            except Exception:
                return False

        groups = {
            k: d.choices
            for k, d in space.items()
            if isinstance(d, optuna.distributions.CategoricalDistribution) and is_group(k)
        }
        options = list(itertools.islice(itertools.product(*groups.values()), 65))
        if len(options) > 64:
            return  # too many combinations to compose them all: the trials will tell
        for key, dist in space.items():
            if key in groups:
                continue
            value = f"{key}={override_value(sample(dist))}"
            samples = (
                dist.choices if isinstance(dist, optuna.distributions.CategoricalDistribution) else [dist.low]
            )
            first_why = refused = None
            for option in options:  # until one composes, and its job takes every sample
                grouped = [*fixed, *(f"{g}={override_value(c)}" for g, c in zip(groups, option))]
                why = self.composes([*grouped, value])
                if why is not None:
                    first_why = first_why or why
                    continue
                refusals = (self.job_refuses([*grouped, f"{key}={override_value(v)}"]) for v in samples[:8])
                refused = next((why for why in refusals if why is not None), None)
                if refused is None:
                    break
            else:
                if refused is not None:
                    hint = ""
                    if isinstance(dist, optuna.distributions.FloatDistribution) and "an integer" in refused:
                        hint = f"; integers are sampled by int(interval({dist.low:g}, {dist.high:g}))"
                    raise SweepError(f"hydra.sweeper.params: {key}: trials would be refused: {refused}{hint}")
                raise SweepError(
                    f"hydra.sweeper.params: {key} cannot be composed with any sampled option: {first_why} "
                    f"({self.misspelt(fixed, key) or 'is'} the data= or experiment= this search is for given?)"
                )

    def sweep(self, arguments: list[str]) -> None:
        from seqlab.utils.files import directory_lock

        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(self.config.hydra.sweep.dir)

        def busy() -> SweepError:
            return SweepError(
                f"{sweep_dir}: another sweeper is running this search (it holds the directory's lock); "
                "wait for it, or give this one another hydra.sweep.dir"
            )

        # one sweeper a sweep directory: a second one (the resume command run while the first is
        # alive) took the first's running trials for interrupted, and their job directories
        with directory_lock(sweep_dir, "searching", busy=busy):
            self.search(sweep_dir, arguments)

    def search(self, sweep_dir: Path, arguments: list[str]) -> None:
        import optuna
        from optuna.trial import TrialState

        from seqlab.utils.resume import this_process
        from seqlab.utils.secrets import redact, redact_text, scrub_yaml

        assert self.config is not None and self.launcher is not None
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        scrub_yaml(sweep_dir / "multirun.yaml")  # a search refused before its first job keeps it
        fixed, space = self.search_space(arguments)
        self.check_direction()
        self.check_choices(fixed, space)
        self.check_values(fixed, space)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = self.create_study(sweep_dir, fixed, space)
        here = str(sweep_dir.resolve())
        now = time.time()
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not is_interrupted(stale, now, here):
                continue  # another sweeper's, still running
            # a trial whose search died: told its objective where its job had finished (the
            # search was killed later in the batch, or as the job's process ended), else failed
            # and run again (unless another sweeper, or its own, told it meanwhile)
            job = stale.user_attrs.get("job") if stale.user_attrs.get("sweep") == here else None
            value = None
            if job is not None:
                job_dir = sweep_dir / stale.user_attrs.get("job_dir", str(job))
                value, _ = objective_value(self.result_from_summary(job_dir, RuntimeError("interrupted")))
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
                trial = optuna.trial.Trial(study, stale._trial_id)
                if value is not None:
                    trial.set_user_attr("recovered", True)
                    study.tell(stale.number, value)
                    log.info(
                        "trial %d (job %s) finished before the search stopped: %.6g", stale.number, job, value
                    )
                    continue
                trial.set_user_attr("interrupted", True)
                study.tell(stale.number, state=TrialState.FAIL)
        log.info(
            "Optuna study %r (%s, %s sampler, seed %s): %d trials, space %s",
            self.study_name, self.direction, self.sampler_name, self.seed, self.n_trials,
            {key: str(dist) for key, dist in space.items()},
        )  # fmt: skip

        def counted() -> int:
            """Finished trials, and those other sweepers are still running."""
            now = time.time()
            finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            return sum(1 for t in finished if not t.user_attrs.get("interrupted")) + sum(
                1 for t in running if not is_interrupted(t, now)
            )

        job_index = first_free_job(sweep_dir, len(study.trials))
        while (remaining := self.n_trials - counted()) > 0:
            trials, batch, job_dirs = [], [], []
            for _ in range(min(self.n_jobs, remaining)):
                trial = study.ask(space)
                trial.set_user_attr("worker", this_process())
                trial.set_user_attr("sweep", here)
                trial.set_user_attr("alive_at", time.time())
                overrides = [*fixed, *(f"{k}={override_value(v)}" for k, v in trial.params.items())]
                job = job_index + len(trials)
                try:
                    subdir, why = self.job_subdir(overrides, job), None
                except SweepError as error:  # every trial would fail so: the search stops here
                    trial.set_user_attr("error", str(error))
                    study.tell(trial, state=TrialState.FAIL)
                    raise
                except Exception as error:
                    why = f"{type(error).__name__}: {error}"
                if why is None:
                    # its job, known before it runs: a search stopped before telling it reads it back
                    trial.set_user_attr("job", job)
                    trial.set_user_attr("job_dir", redact_text(subdir))
                    trial.set_user_attr("overrides", redact(overrides))
                    trials.append(trial)
                    batch.append(overrides)
                    job_dirs.append(sweep_dir / subdir)
                    continue
                trial.set_user_attr("overrides", redact(overrides))
                trial.set_user_attr("error", f"the overrides do not compose: {why}")
                study.tell(trial, state=TrialState.FAIL)
                log.warning("trial %d: %s do not compose: %s", trial.number, trial.params, why)
            if not trials:
                continue
            jobs = range(job_index, job_index + len(batch))
            with Heartbeat(study, trials):
                try:
                    results = self.launcher.launch(batch, initial_job_idx=job_index)
                except Exception as error:  # the launcher's own failure (a SLURM job killed:
                    # submitit's FailedJobError, raised at the first failed job of the batch)
                    log.warning("the launcher failed on jobs %d-%d: %s", jobs[0], jobs[-1], error)
                    wait_for_running_jobs(job_dirs)
                    results = [self.result_from_summary(job_dir, error) for job_dir in job_dirs]
            for trial, job, result in zip(trials, jobs, results):
                value, error = objective_value(result)
                try:  # its job and overrides were recorded when it was asked
                    if error is None:
                        study.tell(trial, value)
                        log.info("trial %d (job %d): %s -> %.6g", trial.number, job, trial.params, value)
                    else:
                        trial.set_user_attr("error", error)
                        study.tell(trial, state=TrialState.FAIL)
                        log.warning("trial %d (job %d) failed: %s", trial.number, job, error)
                except optuna.exceptions.UpdateFinishedTrialError:  # another sweeper took it for
                    # interrupted (this one's alive record stopped for STALE_S: a storage outage)
                    log.warning(
                        "trial %d (job %d) was failed by another sweeper meanwhile", trial.number, job
                    )
            job_index += len(jobs)
            if (alike := failing_alike(study)) is not None:
                self.write_results(study, sweep_dir, alike)
        self.write_results(study, sweep_dir)

    def result_from_summary(self, job_dir: Path, error: Exception) -> JobReturn:
        """A job's result when its launcher raised instead of returning results (submitit raises for
        the whole batch when one SLURM job of it died): the objective from the ``summary.json`` the
        job wrote if it finished, else the launcher's error."""
        import json

        from hydra.core.utils import JobStatus

        metric = self.config.get("optimized_metric") if self.config is not None else None
        try:
            summary = json.loads((job_dir / "summary.json").read_text())
            value = {**summary.get("best", {}), **summary.get("metrics", {})}[metric]
        except (OSError, ValueError, KeyError, TypeError):
            return JobReturn(status=JobStatus.FAILED, _return_value=error)
        return JobReturn(status=JobStatus.COMPLETED, _return_value=value)

    def write_results(self, study: Any, sweep_dir: Path, alike: tuple[int, str] | None = None) -> None:
        """``optimization_results.yaml``; ``SearchFailed`` where no trial finished (``alike``: the
        search stopped after that many trials failed with one error, ``failing_alike``)."""
        from optuna.trial import TrialState

        from seqlab.utils.files import write_text_atomic

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
            if best.user_attrs.get("sweep") is not None:  # a shared storage: maybe another sweep's job
                job_dir = best.user_attrs.get("job_dir", str(best.user_attrs.get("job")))
                results["best_job_dir"] = str(Path(best.user_attrs["sweep"]) / job_dir)
            results.update(best_value=best.value, best_params=best.params)
            run = Path(best.user_attrs.get("sweep", sweep_dir)) / best.user_attrs.get(
                "job_dir", str(best.user_attrs.get("job"))
            )
            checkpoint = run / "checkpoints" / "best.ckpt"  # its summary's, where it names one
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                checkpoint = Path(
                    json.loads((run / "summary.json").read_text())["best_checkpoint"] or checkpoint
                )
            log.info(
                "best trial %d: %s = %.6g; its run: %s (python eval.py ckpt_path=%s)",
                best.number, best.params, best.value, run, checkpoint,
            )  # fmt: skip
        results["failed"] = failed
        write_text_atomic(sweep_dir / RESULTS_FILE, OmegaConf.to_yaml(OmegaConf.create(results)))
        if not completed and alike is not None:
            raise SearchFailed(
                f"the first {alike[0]} trials of Optuna study {self.study_name!r} failed alike, whatever "
                f"their parameters ({alike[1]}): the search stops here, as would every other trial; fix "
                f"that and run the same command again (hydra.sweep.dir={sweep_dir}); see {sweep_dir / RESULTS_FILE}"
            )
        if not completed:  # the command fails: scripts and CI see that nothing came of the search
            first = f": trial {failed[0]['trial']}: {failed[0]['error']}" if failed else ""
            raise SearchFailed(
                f"no trial of Optuna study {self.study_name!r} finished ({len(failed)} failed{first}); "
                f"see {sweep_dir / RESULTS_FILE}"
            )
