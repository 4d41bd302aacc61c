"""The Optuna sweeper's pieces without running trials: a resumed study, a study of another search,
sampled values as overrides, bad bounds, a search in which nothing finished."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.trial import TrialState

from hydra_plugins.seqlab_optuna_sweeper.optuna_sweeper import (
    OptunaSweeper,
    distribution,
    objective_value,
    override_value,
)

SPACE_LINES = ["task.optimizer.lr=tag(log, interval(1e-4, 1e-2))", "model.d_model=choice(16, 32, 64)"]


def space(lines: list[str] = SPACE_LINES) -> dict:
    parser = OverridesParser.create()
    return {o.get_key_element(): distribution(o) for o in parser.parse_overrides(lines)}


def sweeper(direction: str = "minimize", sampler: str = "random") -> OptunaSweeper:
    return OptunaSweeper(
        direction=direction, study_name="s", storage=None, n_trials=3, n_jobs=1, sampler=sampler,
        seed=0, n_startup_trials=2, params={},
    )  # fmt: skip


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_seeded_study_proposes_new_trials(tmp_path: Path, sampler: str) -> None:
    """A fresh sampler with the study's seed would propose the first trials' parameters again."""
    first = sweeper(sampler=sampler).create_study(tmp_path, ["data=a"], space())
    for _ in range(3):
        trial = first.ask(space())
        first.tell(trial, 1.0)
    resumed = sweeper(sampler=sampler).create_study(tmp_path, ["data=a"], space())
    assert len(resumed.trials) == 3
    seen = [t.params for t in resumed.trials]
    proposed = [resumed.ask(space()).params for _ in range(3)]
    assert not any(params in seen for params in proposed), (seen, proposed)


def test_a_stored_study_of_another_search_is_refused(tmp_path: Path) -> None:
    study = sweeper().create_study(tmp_path, ["data=a", "model=gru"], space())
    study.tell(study.ask(space()), 1.0)
    with pytest.raises(
        ValueError, match=r"holds another search \(fixed: \['data=a'\] then, \['data=b'\] now\)"
    ):
        sweeper().create_study(tmp_path, ["data=b", "model=gru"], space())
    with pytest.raises(ValueError, match=r"space: \{'model.d_model': .*16, 32, 64.*\} then, .*16, 32\]"):
        sweeper().create_study(
            tmp_path, ["data=a", "model=gru"], space([SPACE_LINES[0], "model.d_model=choice(16,32)"])
        )
    with pytest.raises(ValueError, match=r"direction: minimize then, maximize now"):
        sweeper("maximize").create_study(tmp_path, ["data=a", "model=gru"], space())
    assert len(sweeper().create_study(tmp_path, ["model=gru", "data=a"], space()).trials) == 1  # its own
    # what shows or logs the trials may change (loggers, progress bar); a checkpoint to start from may not
    shown = ["model=gru", "data=a", "logger=wandb", "callbacks.rich_progress_bar=null"]
    assert len(sweeper().create_study(tmp_path, shown, space()).trials) == 1
    with pytest.raises(ValueError, match=r"fixed: \[\] then, \['ckpt_path=/b.ckpt'\] now"):
        sweeper().create_study(tmp_path, ["model=gru", "data=a", "ckpt_path=/b.ckpt"], space())


def test_a_study_stored_without_its_settings_keeps_its_direction(tmp_path: Path) -> None:
    """A study of an earlier seqlab (no stored settings): the direction it was created with wins,
    on every later attempt (not only the first)."""
    study = optuna.create_study(
        study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="minimize"
    )
    study.tell(study.ask(space()), 1.0)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"direction: minimize then, maximize now"):
            sweeper("maximize").create_study(tmp_path, [], space())
    assert len(sweeper("minimize").create_study(tmp_path, [], space()).trials) == 1


def test_sampled_values_become_the_overrides_hydra_reads_back() -> None:
    parser = OverridesParser.create()
    for value in (None, True, False, 3, 0.5, "mean", "a b", "it's", "1", "true", "null", "1e-3", "nan", ""):
        override = parser.parse_override(f"key={override_value(value)}")
        assert override.value() == value, (value, override_value(value))
    choices = distribution(parser.parse_override("model.scan=null,blocked")).choices
    assert None in choices  # sampled as None, written back as null
    # a quoted value is its text (Hydra's QuotedString could not be stored: a TypeError)
    for line in ("data.text_column='the review',text", "data.text_column=choice('the review',text)"):
        spaced = distribution(parser.parse_override(line))
        assert spaced.choices == ("the review", "text")
        assert parser.parse_override(f"k={override_value(spaced.choices[0])}").value() == "the review"
    # a choice of quoted numbers stays text; a float range has no float noise
    assert [
        override_value(c) for c in distribution(parser.parse_override("k=choice('1','true')")).choices
    ] == ["'1'", "'true'"]
    assert distribution(parser.parse_override("k=range(0.1,0.5,0.1)")).choices == (0.1, 0.2, 0.3, 0.4)
    assert distribution(parser.parse_override("k=range(1,4)")).high == 3  # stop excluded, as Hydra's
    down = distribution(parser.parse_override("k=range(8,1,-2)"))  # 8, 6, 4, 2 in Hydra's basic sweeper
    assert (down.low, down.high, down.step) == (2, 8, 2)


def test_a_list_choice_is_refused_by_name() -> None:
    """Optuna stores scalars: a list choice reached every trial as the string "[1, 2]"."""
    with pytest.raises(ValueError, match=r"task.optimizer.betas=choice.*: choice \[0.9, 0.99\] is not a str"):
        distribution(
            OverridesParser.create().parse_override("task.optimizer.betas=choice([0.9,0.99],[0.8,0.9])")
        )


@pytest.mark.parametrize(
    "line",
    [
        "model.num_layers=range(0,10,-2)",
        "model.dropout=interval(0.5,0.1)",
        "task.optimizer.lr=tag(log, interval(0, 1))",
    ],
)
def test_bad_bounds_name_the_key(line: str) -> None:
    with pytest.raises(ValueError, match=rf"^hydra.sweeper.params: {re.escape(line)}: "):
        distribution(OverridesParser.create().parse_override(line))


def test_a_search_in_which_no_trial_finished_fails(tmp_path: Path) -> None:
    """The command fails with the first trial's error, which Hydra prints alone (a
    ``CompactHydraException``), not under a traceback of the sweeper's frames."""
    from hydra.errors import CompactHydraException

    chosen = sweeper()
    study = chosen.create_study(tmp_path, [], space())
    for _ in range(2):
        trial = study.ask(space())
        trial.set_user_attr("error", "KeyError: 'val/mse_bset'")
        study.tell(trial, state=TrialState.FAIL)
    with pytest.raises(
        RuntimeError, match=r"no trial of Optuna study 's' finished \(2 failed: trial 0: KeyError"
    ) as failed:
        chosen.write_results(study, tmp_path)
    assert isinstance(failed.value, CompactHydraException)
    assert (tmp_path / "optimization_results.yaml").is_file()  # the failures are still listed
    optuna.delete_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")


@pytest.mark.parametrize("alike", [True, False, "diverged"])
def test_a_search_whose_first_trials_fail_alike_stops(tmp_path: Path, alike: bool | str) -> None:
    """Data not found failed every trial of a search alike, each after its own set-up (online, a
    download tried again): three trials with other parameters failing with one set-up error stop
    it; errors that differ (they depend on the parameters) do not, nor one the parameters cause
    alike (three high learning rates, each diverged)."""
    from hydra.core.utils import JobReturn, JobStatus

    from seqlab.errors import DataError

    sweep = tmp_path / "sweep"
    chosen = sweeper_in(sweep, n_trials=6, n_jobs=1)
    launched: list[int] = []

    class Launcher:
        def launch(self, batch: list, initial_job_idx: int) -> list:
            launched.append(initial_job_idx)
            if alike == "diverged":
                return [JobReturn(status=JobStatus.COMPLETED, _return_value=float("nan"))]
            error = DataError("data not found: /data/sst2/train.tsv" + ("" if alike else f" ({batch[0]})"))
            return [JobReturn(status=JobStatus.FAILED, _return_value=error)]

    chosen.launcher = Launcher()
    with pytest.raises(RuntimeError) as failed:
        chosen.sweep(["model.d_model=choice(16,32,64,128)", "model.dropout=interval(0,0.5)"])
    if alike is True:
        assert launched == [0, 1, 2]
        assert re.search(
            r"the first 3 trials of Optuna study 's' failed alike, whatever their parameters \(DataError: data "
            rf"not found: /data/sst2/train.tsv\): the search stops .*hydra.sweep.dir={sweep}",
            str(failed.value),
        ), failed.value
    else:
        assert launched == [0, 1, 2, 3, 4, 5] and "no trial of Optuna study 's' finished (6 failed" in str(
            failed.value
        )
    assert (sweep / "optimization_results.yaml").is_file()


def test_the_results_name_the_best_jobs_directory(tmp_path: Path) -> None:
    """With a shared storage two sweeps number their jobs alike: job 0 of the best trial may be
    another sweep's job 0. The results give its directory."""
    chosen = sweeper()
    study = chosen.create_study(tmp_path, [], space())
    for sweep, value in (("/runs/a", 0.9), ("/runs/b", 0.3)):
        trial = study.ask(space())
        trial.set_user_attr("sweep", sweep)
        trial.set_user_attr("job", 0)
        trial.set_user_attr("job_dir", "0")
        study.tell(trial, value)
    chosen.write_results(study, tmp_path)
    results = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_job: 0" in results and "best_job_dir: /runs/b/0" in results and "best_value: 0.3" in results
    optuna.delete_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def test_a_trial_without_a_usable_objective_fails_with_the_reason() -> None:
    """A diverged job (TrainingDiverged), a NaN or infinite objective, none or a non-number: the
    trial is told as FAIL with why, never COMPLETE with a NaN that would rank first or last."""
    from hydra.core.utils import JobReturn, JobStatus

    from seqlab.callbacks import TrainingDiverged

    def job(value, status=JobStatus.COMPLETED) -> JobReturn:
        return JobReturn(status=status, _return_value=value)

    assert objective_value(job(0.25)) == (0.25, None)
    assert objective_value(job(3)) == (3.0, None)
    diverged = job(TrainingDiverged("the training loss is nan at step 7"), JobStatus.FAILED)
    assert objective_value(diverged) == (None, "TrainingDiverged: the training loss is nan at step 7")
    assert objective_value(job(float("nan"))) == (None, "the objective is nan (diverged)")
    assert objective_value(job(float("-inf"))) == (None, "the objective is -inf (diverged)")
    assert objective_value(job(None)) == (None, "the job returned no objective (set optimized_metric)")
    assert objective_value(job("x")) == (None, "the job returned 'x', not a number")


def test_a_new_study_in_a_sweep_directory_numbers_its_jobs_after_the_old_ones(tmp_path: Path) -> None:
    """The refusal of a stored study of another search suggests a new study_name: in the same
    sweep directory its trials ran in the old study's job directories 0, 1 ... and every one
    was refused there (a finished run)."""
    from hydra_plugins.seqlab_optuna_sweeper.optuna_sweeper import first_free_job

    assert first_free_job(tmp_path / "missing", 0) == 0
    for name in ("0", "1", "10", "wandb", "optuna.db"):
        (tmp_path / name).mkdir()
    assert first_free_job(tmp_path, 0) == 11  # a new study there
    assert first_free_job(tmp_path, 14) == 14  # a resumed one whose trials ran further
    # job directories named by hydra.sweep.subdir: the number Hydra recorded in each
    named = tmp_path / "model=gru,seed=1"
    (named / ".hydra").mkdir(parents=True)
    (named / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    num: 23\n")
    assert first_free_job(tmp_path, 0) == 24


def test_only_trials_whose_sweeper_is_gone_count_as_interrupted(tmp_path: Path) -> None:
    """Sweepers sharing one storage: a new one failed every RUNNING trial, the others' too (whose
    own tell then crashed). Only a trial with no alive record, an old one, or one that names a
    process of this host that is gone counts as interrupted."""
    import socket
    import subprocess
    import sys
    import time

    from hydra_plugins.seqlab_optuna_sweeper.optuna_sweeper import STALE_S, Heartbeat, is_interrupted
    from seqlab.utils.resume import this_process

    study = sweeper().create_study(tmp_path, [], space())
    here = socket.gethostname()
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    now = time.time()
    cases = {
        "asked elsewhere, no record": ({}, True),
        "another host, alive a minute ago": ({"worker": "other-host 12", "alive_at": now - 60}, False),
        "another host, silent for long": ({"worker": "other-host 12", "alive_at": now - STALE_S - 1}, True),
        "this host, process gone": ({"worker": f"{here} {gone.stdout.strip()}", "alive_at": now}, True),
        "this host, process alive": ({"worker": f"{here} {os.getppid()}", "alive_at": now}, False),
        "this sweeper": ({"worker": this_process(), "alive_at": now}, False),
        # an earlier attempt of this search (requeued onto another node within STALE_S, or in a
        # container whose pid is always the same): its sweep directory is this one
        "this search, before": (
            {"worker": "other-host 12", "alive_at": now - 60, "sweep": "/sweeps/a"},
            True,
        ),
        "another search": ({"worker": "other-host 12", "alive_at": now - 60, "sweep": "/sweeps/b"}, False),
    }
    for name, (attrs, interrupted) in cases.items():
        trial = study.ask(space())
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        stored = study._storage.get_trial(trial._trial_id)
        assert is_interrupted(stored, now, "/sweeps/a") is interrupted, name
    # a running trial's sweeper keeps its record fresh
    trial = study.ask(space())
    trial.set_user_attr("alive_at", 0.0)
    with Heartbeat(study, [trial], interval=0.05):
        deadline = time.monotonic() + 30  # a busy machine may schedule the thread late, not never
        while study._storage.get_trial(trial._trial_id).user_attrs["alive_at"] == 0.0:
            assert time.monotonic() < deadline, "no heartbeat in 30 s"
            time.sleep(0.05)
    assert time.time() - study._storage.get_trial(trial._trial_id).user_attrs["alive_at"] < 60


#: Hydra's default ``hydra.sweep.subdir``, and one naming the job directories by their overrides
NUMBERED, NAMED = "${hydra.job.num}", "${hydra.job.override_dirname}_${hydra.job.num}"


def sweeper_in(
    sweep: Path, n_trials: int, n_jobs: int, load_sweep_config=None, subdir: str = NUMBERED, **config
) -> OptunaSweeper:
    """A sweeper as Hydra sets it up, writing into ``sweep``, without Hydra: every override set
    composes unless ``load_sweep_config`` raises for it; ``config``: more keys of the run config.
    (Its refusals are caught as ``ValueError``: Hydra's plugin scan, which any composition in the
    session runs, executes the plugin module again, and its ``SweepError`` is then another class
    than the one imported here.)"""
    import copy
    from types import SimpleNamespace

    from hydra.conf import HydraConf
    from omegaconf import OmegaConf

    chosen = OptunaSweeper(
        direction="minimize", study_name="s", storage=None, n_trials=n_trials, n_jobs=n_jobs, sampler="random",
        seed=0, n_startup_trials=2, params={},
    )  # fmt: skip
    chosen.config = OmegaConf.create(
        {"hydra": OmegaConf.structured(HydraConf), "optimized_metric": "val/mse_best", **config}
    )
    chosen.config.hydra.sweep.dir, chosen.config.hydra.sweep.subdir = str(sweep), subdir

    def loader(master_config, sweep_overrides):  # Hydra's config loader sets the job's override_dirname
        if load_sweep_config is not None:
            load_sweep_config(master_config=master_config, sweep_overrides=sweep_overrides)
        composed = copy.deepcopy(master_config)
        composed.hydra.job.override_dirname = job_name(sweep_overrides)
        return composed

    chosen.hydra_context = SimpleNamespace(config_loader=SimpleNamespace(load_sweep_config=loader))
    return chosen


def job_name(overrides: list[str]) -> str:
    return ",".join(sorted(overrides))


def job_dir(sweep: Path, subdir: str, job: int, overrides: list[str]) -> Path:
    """The directory the launcher gives a job, as ``sweeper_in``'s config names it."""
    return sweep / (str(job) if subdir == NUMBERED else f"{job_name(overrides)}_{job}")


def test_trials_asked_together_are_spread_out() -> None:
    """TPE's constant liar (running trials count as bad) for n_jobs > 1, whatever Optuna's default."""
    for n_jobs in (1, 4):
        chosen = OptunaSweeper(
            direction="minimize", study_name="s", storage=None, n_trials=8, n_jobs=n_jobs, sampler="tpe",
            seed=0, n_startup_trials=2, params={},
        )  # fmt: skip
        assert chosen.make_sampler(0)._constant_liar is (n_jobs > 1)


def test_a_launcher_failure_fails_only_the_trials_it_lost(tmp_path: Path) -> None:
    """submitit raises for a whole batch when one SLURM job of it died (FailedJobError), and the
    search ended there. A job of the batch that finished anyway (its summary.json) is told its
    objective, one that did not is failed with the launcher's error, and the search goes on."""
    import json

    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    sweep = tmp_path / "sweep"
    chosen = sweeper_in(sweep, n_trials=6, n_jobs=2)

    class Launcher:  # jobs 2 and 3: job 2 finishes, the launcher raises (job 3's node died)
        def launch(self, batch: list, initial_job_idx: int) -> list:
            returns = []
            for job in range(initial_job_idx, initial_job_idx + len(batch)):
                if job != 3:
                    (sweep / str(job)).mkdir(parents=True)
                    summary = {"best": {"val/mse_best": job / 10}, "metrics": {"test/mse": 1.0}}
                    (sweep / str(job) / "summary.json").write_text(json.dumps(summary))
                returns.append(JobReturn(status=JobStatus.COMPLETED, _return_value=job / 10))
            if initial_job_idx == 2:
                raise RuntimeError("FailedJobError: job 3 has state NODE_FAIL")
            return returns

    chosen.launcher = Launcher()
    chosen.sweep(["model.d_model=choice(16,32,64)"])
    results = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    assert results["n_trials"] == 6 and results["n_failed"] == 1 and results["best_job"] == 0
    (failed,) = results["failed"]
    assert failed["job"] == 3 and failed["error"] == "RuntimeError: FailedJobError: job 3 has state NODE_FAIL"
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{sweep / 'optuna.db'}")
    told = {t.user_attrs["job"]: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert told == {0: 0.0, 1: 0.1, 2: 0.2, 4: 0.4, 5: 0.5}  # job 2's read back from its summary


@pytest.mark.parametrize("subdir", [NUMBERED, NAMED])
def test_a_launcher_failure_waits_for_the_jobs_of_its_batch_still_training(
    tmp_path: Path, monkeypatch, subdir: str
) -> None:
    """submitit raises at the first failed job of a batch while the others train on (on other
    nodes): they were told FAIL with that error and their finished runs never read. The sweeper
    waits while their run directories' markers are live, then reads their summaries."""
    import json
    import threading

    from hydra_plugins.seqlab_optuna_sweeper import optuna_sweeper

    monkeypatch.setattr(optuna_sweeper, "JOB_POLL_S", 0.05)
    sweep = tmp_path / "sweep"
    chosen = sweeper_in(sweep, n_trials=2, n_jobs=2, subdir=subdir)
    finished = threading.Event()

    class Launcher:  # job 0 trains on another node for a while; job 1's node died
        def launch(self, batch: list, initial_job_idx: int) -> list:
            job = job_dir(sweep, subdir, 0, batch[0])
            job.mkdir(parents=True)
            (job / "config.yaml").write_text("seed: 1\n")
            (job / ".running").write_text("gpu-node-b 4242 777\n")

            def train_on() -> None:
                time.sleep(0.5)
                (job / "summary.json").write_text(json.dumps({"best": {"val/mse_best": 0.25}}))
                (job / ".running").unlink()
                finished.set()

            threading.Thread(target=train_on, daemon=True).start()
            raise RuntimeError("FailedJobError: job 1 has state NODE_FAIL")

    chosen.launcher = Launcher()
    chosen.sweep(["model.d_model=choice(16,32,64)"])
    assert finished.is_set()
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{sweep / 'optuna.db'}")
    states = {t.user_attrs["job"]: (t.state.name, t.value) for t in study.trials}
    assert states == {0: ("COMPLETE", 0.25), 1: ("FAIL", None)}


def composing_sweeper() -> OptunaSweeper:
    """A sweeper whose config loader composes as Hydra would with these configs: no option
    ``model=lsmt``, ``model.nhead`` with ``model=transformer`` only, ``task.embed_dropout`` with
    ``data=sst2`` only (a classification task)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    def load_sweep_config(master_config, sweep_overrides):
        def sets(key: str) -> bool:
            return any(o.startswith(f"{key}=") for o in sweep_overrides)

        if "model=lsmt" in sweep_overrides:
            raise ValueError("Could not find 'model/lsmt'")
        if sets("model.nhead") and "model=transformer" not in sweep_overrides:
            raise ValueError("Key 'nhead' is not in struct")
        if sets("task.embed_dropout") and "data=sst2" not in sweep_overrides:
            raise ValueError("Could not override 'task.embed_dropout'")
        if sets("model.bidirectional") and "+study_backbone=rnn64" not in sweep_overrides:
            raise ValueError("Could not override 'model.bidirectional'")

    def get_group_options(name: str) -> list[str]:
        return {"model": ["lstm", "transformer"], "data": ["sst2"], "study_backbone": ["rnn64"]}.get(name, [])

    chosen = sweeper()
    chosen.config = OmegaConf.create({})
    chosen.hydra_context = SimpleNamespace(
        config_loader=SimpleNamespace(
            load_sweep_config=load_sweep_config, get_group_options=get_group_options
        )
    )
    return chosen


def test_only_config_group_options_are_checked_before_the_first_trial() -> None:
    """A misspelt option (``model=lsmt``) is refused before any trial; a config value that composes
    only with some options of a sampled group (``model.nhead`` with ``model=lstm`` under
    ``experiment=ett_lstm``) is left to the trials, which fail only in those combinations."""
    chosen = composing_sweeper()
    fixed = ["experiment=ett_lstm"]
    chosen.check_choices(fixed, space(["model=choice(lstm,transformer)", "model.nhead=choice(2,4)"]))
    with pytest.raises(
        ValueError, match=r"hydra.sweeper.params: model=lsmt cannot be composed: .*model/lsmt"
    ):
        chosen.check_choices(fixed, space(["model=choice(lstm,lsmt)", "model.nhead=choice(2,4)"]))


def test_a_sampled_value_that_composes_with_no_option_is_refused_before_the_first_trial() -> None:
    """``hparams_search=classification_optuna`` without classification data: every trial failed on
    ``task.embed_dropout`` (the forecasting task has none) after the study was stored."""
    from omegaconf import OmegaConf

    chosen = composing_sweeper()
    values = ["task.embed_dropout=interval(0.1,0.5)", "model.d_model=choice(128,256)"]
    with pytest.raises(ValueError, match=r"task.embed_dropout cannot be composed with any sampled option: .*"
                       r"Could not override.*is the data= or experiment= this search is for given"):  # fmt: skip
        chosen.check_values([], space(values))
    chosen.check_values(["data=sst2"], space(values))
    # a value composing with one option of a sampled group is left to the trials
    chosen.check_values(["data=sst2"], space(["model=choice(lstm,transformer)", "model.nhead=choice(2,4)"]))
    with pytest.raises(ValueError, match=r"model\.nhead cannot be composed"):
        chosen.check_values(["data=sst2"], space(["model=choice(lstm,gru)", "model.nhead=choice(2,4)"]))
    # a top-level value is no group: a range or interval of it composes as a value (it raised an
    # AttributeError: no choices), a choice of it is not combined as options
    chosen.check_values(["data=sst2"], space(["seed=range(1,4)", "task.embed_dropout=interval(0.1,0.5)"]))
    chosen.config = OmegaConf.create({"hydra": {"runtime": {"choices": {"model": "lstm", "data": "sst2"}}}})
    composed = []
    real = chosen.composes
    chosen.composes = lambda overrides: composed.append(overrides) or real(overrides)
    chosen.check_values(
        ["data=sst2"],
        space(["seed=choice(1,2)", "model=choice(lstm,transformer)", "model.nhead=choice(2,4)"]),
    )
    # seed is a value (composed once), not options to combine; model.nhead tried until transformer
    assert [o[-1] for o in composed] == ["seed=1", "model.nhead=2", "model.nhead=2"]
    assert [o[-2] for o in composed[1:]] == ["model=lstm", "model=transformer"]
    # an appended group (+study_backbone, not among the sweep config's choices) is a group
    appended = ["+study_backbone=choice(rnn64,transformer64)", "model.bidirectional=choice(true,false)"]
    chosen.check_values([], space(appended))
    # over 64 combinations of options nothing is refused: the trials will tell
    many = ",".join(f"m{i}" for i in range(65))
    chosen.check_values([], space([f"model=choice({many})", "task.embed_dropout=interval(0.1,0.5)"]))
    with pytest.raises(ValueError, match=r"task\.embed_dropout cannot be composed"):
        chosen.check_values(
            [], space(["model=choice(lstm,transformer)", "task.embed_dropout=interval(0.1,0.5)"])
        )


def test_another_optimized_metric_needs_its_direction(make_cfg) -> None:
    """The searches' direction is ``${task.monitor_mode}``: right for ``val/acc_best``, the wrong
    way for ``optimized_metric=val/loss`` (maximised). ``hydra/sweeper=optuna`` alone minimised
    every task's objective, accuracy and BLEU too: it follows the monitor mode by default, and a
    direction against it for the monitored metric's best is refused."""
    from omegaconf import OmegaConf

    def configured(metric: str, direction: str) -> OptunaSweeper:
        follows = "task.monitor_mode" in direction
        chosen = sweeper(direction="maximize" if follows else direction)
        chosen.config = OmegaConf.create({
            "task": {"monitor": "val/acc", "monitor_mode": "max"}, "optimized_metric": metric,
            "hydra": {"sweeper": {"direction": direction}},
        })  # fmt: skip
        return chosen

    configured("val/acc_best", "${task.monitor_mode}").check_direction()
    configured("val/loss", "minimize").check_direction()
    configured("val/acc_best", "maximize").check_direction()
    with pytest.raises(ValueError, match=r"optimized_metric='val/loss' is not the monitored val/acc_best.*"
                       r"give hydra.sweeper.direction=minimize\|maximize"):  # fmt: skip
        configured("val/loss", "${task.monitor_mode}").check_direction()
    with pytest.raises(ValueError, match=r"hydra.sweeper.direction=minimize for optimized_metric='val/acc_best'.*"
                       r"would look for the worst trials"):  # fmt: skip
        configured("val/acc_best", "minimize").check_direction()
    for data, mode in (("data=sentiment_synthetic", "max"), ("data=timeseries", "min")):
        composed = make_cfg("hydra/sweeper=optuna", data, fast=False)
        assert composed.hydra.sweeper.direction == mode, data
    assert make_cfg("hydra/sweeper=optuna", name="eval").hydra.sweeper.direction == "minimize"  # no task
    # a metric of one's own: no known direction (task.monitor_mode null), named (was OmegaConf's
    # "Incompatible value 'None'" traceback)
    unknown = make_cfg(
        "hparams_search=optuna", "data=sentiment_synthetic", "task.monitor=val/foo", fast=False
    )
    assert unknown.hydra.sweeper.direction is None
    with pytest.raises(ValueError, match=r"follows task.monitor_mode, which task.monitor leaves unknown"):
        sweeper(direction=None)


@pytest.mark.parametrize("subdir", [NUMBERED, NAMED])
def test_a_search_stopped_before_telling_finished_trials_reads_them_back(tmp_path: Path, subdir: str) -> None:
    """Trials are told when their batch returns: a search killed later in the batch (or as a job's
    process ended, after its summary.json) failed its finished trials on resume, and ran them
    again. Their jobs are recorded when asked, and read back. A second sweeper on the same sweep
    directory, while the first holds it, is refused (it took the first's running trials for
    interrupted)."""
    import json

    from hydra.core.utils import JobReturn, JobStatus

    from seqlab.utils.files import directory_lock

    sweep = tmp_path / "sweep"

    class Launcher:  # writes each job's summary; killed after the first batch's jobs finished
        def __init__(self, killed: bool) -> None:
            self.killed, self.jobs = killed, []

        def launch(self, batch: list, initial_job_idx: int) -> list:
            jobs = list(range(initial_job_idx, initial_job_idx + len(batch)))
            self.jobs += jobs
            for job, overrides in zip(jobs, batch):
                job_dir(sweep, subdir, job, overrides).mkdir(parents=True)
                summary = {"best": {"val/mse_best": 1 + job / 10}}
                (job_dir(sweep, subdir, job, overrides) / "summary.json").write_text(json.dumps(summary))
            if self.killed:
                raise KeyboardInterrupt  # the search's process stops before it tells them
            return [JobReturn(status=JobStatus.COMPLETED, _return_value=1 + job / 10) for job in jobs]

    first = sweeper_in(sweep, n_trials=4, n_jobs=2, subdir=subdir)
    first.launcher = Launcher(killed=True)
    with pytest.raises(KeyboardInterrupt):
        first.sweep(["model.d_model=choice(16,32,64)"])
    again = sweeper_in(sweep, n_trials=4, n_jobs=2, subdir=subdir)
    again.launcher = Launcher(killed=False)
    with (
        directory_lock(sweep, "a first sweeper"),
        pytest.raises(ValueError, match="another sweeper is running"),
    ):
        again.sweep(["model.d_model=choice(16,32,64)"])
    again.sweep(["model.d_model=choice(16,32,64)"])
    assert again.launcher.jobs == [2, 3], "jobs 0 and 1 finished: not run again"
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{sweep / 'optuna.db'}")
    told = {t.user_attrs["job"]: t.value for t in study.trials}
    assert told == {0: 1.0, 1: 1.1, 2: 1.2, 3: 1.3}
    assert [t.user_attrs.get("recovered", False) for t in study.trials] == [True, True, False, False]


def test_sweepers_sharing_a_storage_draw_their_own_parameters(tmp_path: Path) -> None:
    """Sweepers started together with one seed on one storage proposed the same parameters."""
    shared = OptunaSweeper(
        direction="minimize", study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}", n_trials=3, n_jobs=1,
        sampler="random", seed=7, n_startup_trials=2, params={},
    )  # fmt: skip
    own = OptunaSweeper(
        direction="minimize", study_name="s", storage=None, n_trials=3, n_jobs=1,
        sampler="random", seed=7, n_startup_trials=2, params={},
    )  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    assert shared.sampler_seed(0, a) != shared.sampler_seed(0, b)
    assert shared.sampler_seed(0, a) == shared.sampler_seed(0, a) != shared.sampler_seed(5, a)
    assert own.sampler_seed(0, a) == own.sampler_seed(0, b) == 7 and own.sampler_seed(5, a) == 12


def test_no_secret_in_the_study_or_a_refused_searchs_files(tmp_path: Path) -> None:
    """The study (possibly a shared database) stored the fixed overrides and each trial's as given,
    credentials included; a search refused before its first job left them in multirun.yaml (the
    jobs' start scrubs it, and none started)."""
    from types import SimpleNamespace

    secret = "literal-secret-from-the-command-line-42"
    sweep = tmp_path / "sweep"

    def load_sweep_config(master_config, sweep_overrides) -> None:
        if "model=lsmt" in sweep_overrides:
            raise ValueError("Could not find 'model/lsmt'")

    chosen = sweeper_in(
        sweep,
        n_trials=1,
        n_jobs=1,
        load_sweep_config=load_sweep_config,
        subdir=NAMED,
        extras={"api_key": secret},
    )  # job directories named by the overrides: the secret among them
    chosen.launcher = SimpleNamespace(launch=lambda batch, initial_job_idx: [])
    with pytest.raises(ValueError, match="model=lsmt cannot be composed"):
        chosen.sweep([f"+extras.api_key={secret}", "model=lstm,lsmt"])
    assert secret not in (sweep / "multirun.yaml").read_text()

    class Launcher:
        def launch(self, batch: list, initial_job_idx: int) -> list:
            from hydra.core.utils import JobReturn, JobStatus

            return [JobReturn(status=JobStatus.COMPLETED, _return_value=1.0) for _ in batch]

    chosen.launcher = Launcher()
    chosen.sweep([f"+extras.api_key={secret}", "model=lstm,gru"])
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{sweep / 'optuna.db'}")
    stored = repr(study.user_attrs) + repr([t.user_attrs for t in study.trials])
    assert "api_key" in stored and secret not in stored


@pytest.mark.parametrize("subdir", [NUMBERED, "${hydra.job.override_dirname}_${hydra:job.num}"])
def test_a_trials_job_directory_is_the_one_hydras_launcher_gives_it(tmp_path: Path, subdir: str) -> None:
    """The directory recorded when a trial is asked (read back when its search stopped or its
    launcher failed) is where Hydra runs the job, whatever ``hydra.sweep.subdir`` names it: with
    seqlab's configs and Hydra's own config loader and ``run_job``, as the basic launcher calls it."""
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job, setup_globals
    from hydra.types import HydraContext, RunMode
    from omegaconf import open_dict

    setup_globals()  # the ${hydra:...} resolver, as a Hydra app registers it
    configs = Path(__file__).resolve().parents[1] / "configs"
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(configs)))
    master = loader.load_configuration(
        "train",
        overrides=[f"hydra.sweep.dir={tmp_path}", f"hydra.sweep.subdir={subdir}", "hydra.job.chdir=false"],
        run_mode=RunMode.MULTIRUN,
    )
    chosen = sweeper()
    chosen.config, chosen.hydra_context = (
        master,
        HydraContext(config_loader=loader, callbacks=Callbacks(master)),
    )
    overrides = ["model=gru", "seed=3"]
    recorded = chosen.job_subdir(overrides, 5)
    job = loader.load_sweep_config(master, overrides)
    with open_dict(job):
        job.hydra.job.id = job.hydra.job.num = 5
    ran = run_job(
        hydra_context=chosen.hydra_context,
        task_function=lambda _: HydraConfig.get().runtime.output_dir,
        config=job,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
        configure_logging=False,
    )
    assert Path(ran.return_value) == tmp_path / recorded
    assert recorded == ("5" if subdir == NUMBERED else "model=gru,seed=3_5")
    # a subdir that cannot be resolved is the search's error, not each trial's "do not compose"
    chosen.config = loader.load_configuration(
        "train",
        overrides=[f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${oc.env:SEQLAB_TEST_UNSET_VARIABLE}"],
        run_mode=RunMode.MULTIRUN,
    )
    with pytest.raises(
        ValueError, match=r"hydra.sweep.subdir=.*SEQLAB_TEST_UNSET_VARIABLE.* cannot be resolved for job 6"
    ):
        chosen.job_subdir(overrides, 6)
