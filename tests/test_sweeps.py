"""Optuna search through seqlab's Hydra sweeper, failing jobs inside sweeps, and resuming a study."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

from tests.conftest import run_script, why_failed

pytestmark = pytest.mark.slow

TINY = [
    "data.num_steps=1200",
    "data.lookback=48",
    "data.horizon=12",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "extras.print_config=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
]


def search(sweep: Path, *overrides: str) -> dict:
    result = run_script(
        "train.py",
        "hparams_search=forecasting_optuna",
        *TINY,
        *overrides,
        f"hydra.sweep.dir={sweep}",
        timeout=400,
    )
    assert result.returncode == 0, why_failed(result)
    results = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    return {**results, "output": result.stdout + result.stderr}


def job_objective(job_dir: Path) -> float:
    return json.loads((job_dir / "summary.json").read_text())["best"]["val/mse_best"]


def test_optuna_search_finds_the_objective_and_keeps_its_study(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    results = search(sweep, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_startup_trials=2")
    objectives = {int(p.name): job_objective(p) for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()}
    assert sorted(objectives) == [0, 1, 2]
    # the study's best is the smallest val/mse_best any job reached (direction: minimize)
    assert results["best_value"] == pytest.approx(min(objectives.values()))
    assert results["best_job"] == min(objectives, key=objectives.get)
    assert set(results["best_params"]) == {
        "task.optimizer.lr", "model.d_model", "model.num_layers", "model.dropout", "task.patch_len"
    }  # fmt: skip
    # the best job really ran with the best parameters
    best_overrides = OmegaConf.load(sweep / str(results["best_job"]) / ".hydra" / "overrides.yaml")
    assert f"model.d_model={results['best_params']['model.d_model']}" in best_overrides
    study = optuna.load_study(study_name="forecasting", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    # each trial's job directory, recorded when asked, is the one its job ran in
    assert [t.user_attrs["job_dir"] for t in study.trials] == ["0", "1", "2"]
    # the table has the objective (the trials run no test): the best job's row holds the best value
    with (sweep / "sweep_summary.csv").open(newline="") as handle:
        rows = {row["job"]: row for row in csv.DictReader(handle)}
    assert float(rows[str(results["best_job"])]["val/mse_best"]) == pytest.approx(results["best_value"])
    # what the search says after its last trial is the sweep's, not that trial's: its log closes
    # with the trial (the best trial's line and the table's path were appended to it)
    assert "best trial" in results["output"] and "sweep summary:" in results["output"]
    last_log = (sweep / "2" / "train.log").read_text()
    assert "[seqlab.train][INFO] - data <" in last_log  # the job's own lines are there
    assert "best trial" not in last_log and "sweep summary:" not in last_log


def test_trials_asked_together_run_side_by_side(tmp_path: Path) -> None:
    """hydra.sweeper.n_jobs=2 under hydra/launcher=parallel: the two trials run at once, each in
    a joblib worker and a job directory of its own, and each is told its own job's objective."""
    sweep = tmp_path / "sweep"
    met = tmp_path / "met"  # each trial waits there for the other (tests.faults.MeetTheOthers)
    results = search(
        sweep, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2", "+callbacks.meet._target_=tests.faults.MeetTheOthers",
        f"+callbacks.meet.folder={met}", "+callbacks.meet.jobs=2",
    )  # fmt: skip
    assert results["n_trials"] == 2 and results["n_failed"] == 0
    study = optuna.load_study(study_name="forecasting", storage=f"sqlite:///{sweep / 'optuna.db'}")
    told = {t.user_attrs["job_dir"]: t.value for t in study.trials}
    assert told == {job: pytest.approx(job_objective(sweep / job)) for job in ("0", "1")}
    assert len(list(met.iterdir())) == 2, "the trials met, in two worker processes"


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path: Path) -> None:
    """nhead=5 cannot split any d_model of the space: those trials fail, the others finish."""
    sweep = tmp_path / "sweep"
    results = search(
        sweep, "model.nhead=choice(4,5)", "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler=random",
        "hydra.sweeper.seed=0", "callbacks.model_checkpoint.filename='best-{epoch}'",
    )  # fmt: skip
    # the eval.py command it gives names the best trial's own best checkpoint (not best.ckpt)
    hint = re.search(r"python eval\.py ckpt_path=(\S+)\)", results["output"])
    assert hint and Path(hint.group(1)).is_file() and Path(hint.group(1)).name.startswith("best-")
    assert Path(hint.group(1)).parent.parent == sweep / str(results["best_job"])
    failed = results["failed"]
    assert 1 <= results["n_failed"] == len(failed) < 4 and results["n_trials"] == 4
    assert all(
        f["params"]["model.nhead"] == 5 and "must be a multiple of model.nhead=5" in f["error"]
        for f in failed
    )
    assert results["best_params"]["model.nhead"] == 4
    for entry in failed:  # the failed job left its error, and the sweep table lists it
        assert "must be a multiple of model.nhead=5" in (sweep / str(entry["job"]) / "error.txt").read_text()
    table = (sweep / "sweep_summary.csv").read_text().splitlines()
    assert len(table) == 5 and sum(",failed," in row for row in table) == len(failed)
    study = optuna.load_study(study_name="forecasting", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert sum(t.state.name == "FAIL" for t in study.trials) == len(failed)


def test_an_interrupted_search_resumes_from_its_study(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    first = search(sweep, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_startup_trials=2")
    assert first["n_trials"] == 2
    # a trial that was running when the search died (asked, never told), and one that another
    # sweeper sharing the storage is running (it recorded a minute ago that it is alive)
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    optuna.load_study(study_name="forecasting", storage=storage).ask()
    elsewhere = optuna.load_study(study_name="forecasting", storage=storage).ask()
    elsewhere.set_user_attr("worker", "other-host 4242")
    elsewhere.set_user_attr("alive_at", time.time() - 60)
    resumed = search(sweep, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_startup_trials=2")
    assert resumed["n_trials"] == 3 and resumed["n_failed"] == 0
    study = optuna.load_study(study_name="forecasting", storage=storage)
    states = [t.state.name for t in study.trials]
    # two kept, one new (not three), the other sweeper's still running and counted
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "RUNNING", "COMPLETE"], states
    assert study.trials[2].user_attrs.get("interrupted") is True
    # the new trial got a new job directory; the first two are untouched
    jobs = sorted(int(p.name) for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == [0, 1, 4]
    # the best of all the study's finished trials, the first search's included
    completed = [trial.value for trial in study.trials if trial.state.name == "COMPLETE"]
    assert resumed["best_value"] == pytest.approx(min(completed)) and first["best_value"] in completed


def test_overrides_hydra_cannot_compose(tmp_path: Path) -> None:
    """A choice that never composes (a misspelt option), or a value every job would refuse (floats
    for an integer), is refused before any trial; a sampled
    combination that does not (gru has no nhead) fails its trial, and the search goes on (it
    used to end the whole search)."""
    refused = run_script(
        "train.py", "hparams_search=forecasting_optuna", *TINY, "model=choice(transformer,lsmt)",
        f"hydra.sweep.dir={tmp_path / 'refused'}",
    )  # fmt: skip
    assert refused.returncode == 1
    assert "hydra.sweeper.params: model=lsmt cannot be composed" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr  # the refusal alone (a CompactHydraException)
    # refused before its first job, a sweep leaves no directory (it held Hydra's multirun.yaml)
    assert not (tmp_path / "refused").exists()
    misspelt = run_script(
        "train.py", "hparams_search=forecasting_optuna", *TINY, "model.d_modle=choice(16,32)",
        f"hydra.sweep.dir={tmp_path / 'misspelt'}",
    )  # fmt: skip
    assert misspelt.returncode == 1
    assert "(did you mean model.d_model? or is the data= or experiment=" in misspelt.stderr, why_failed(
        misspelt
    )
    assert not (tmp_path / "misspelt").exists()
    grid = run_script("train.py", "-m", "model.d_modle=16,32", f"hydra.sweep.dir={tmp_path / 'grid'}")
    assert grid.returncode == 1 and "Could not override 'model.d_modle'" in grid.stderr, why_failed(grid)
    assert not (tmp_path / "grid").exists() and "the sweep ended early" not in grid.stderr
    # a value of the wrong type for what it configures: every trial's job would refuse it
    floats = run_script(
        "train.py", "hparams_search=forecasting_optuna", *TINY, "model.num_layers=interval(1,3)",
        f"hydra.sweep.dir={tmp_path / 'floats'}",
    )  # fmt: skip
    assert floats.returncode == 1
    assert (
        "hydra.sweeper.params: model.num_layers: trials would be refused: model.num_layers=1.0: expected "
        "an integer"
        in floats.stderr
        and "sampled by int(interval(1, 3))" in floats.stderr
    ), why_failed(floats)
    assert not (tmp_path / "floats").exists()
    sweep = tmp_path / "sweep"
    results = search(
        sweep, "model=choice(transformer,gru)", "model.nhead=choice(2,4)", "hydra.sweeper.n_trials=4",
        "hydra.sweeper.sampler=random", "hydra.sweeper.seed=0",
    )  # fmt: skip
    failed = results["failed"]
    assert 1 <= results["n_failed"] == len(failed) < 4 and results["n_trials"] == 4
    for entry in failed:
        assert entry["params"]["model"] == "gru" and entry["job"] is None
        assert entry["error"].startswith("the overrides do not compose: ") and "nhead" in entry["error"]
    assert results["best_params"]["model"] == "transformer"
    jobs = [p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()]
    assert len(jobs) == 4 - len(failed)
