"""Resuming: a killed, terminated or requeued run continues to the result of an uninterrupted
one; a run directory holding a finished run or another configuration is refused untouched; a
kill while a checkpoint is being written leaves the previous one intact."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from seqlab.errors import ConfigError
from seqlab.train import train
from seqlab.utils.resume import config_differences, find_interrupted_run, mark_running, newest_checkpoint
from tests.conftest import FAST, ROOT, run_script, why_failed
from tests.faults import first_steps

# two epochs of 50 steps, step checkpoints by step count (the tests set how many)
TWO_EPOCHS_BY_STEPS = [*FAST, "trainer.max_epochs=2", "callbacks.step_checkpoint.train_time_interval=null"]
# checkpoints every 7 steps (mid-epoch), dropout on: resuming must restore the data position and
# the random state, not only weights and optimizer
EVERY_7_STEPS = [*TWO_EPOCHS_BY_STEPS, "callbacks.step_checkpoint.every_n_train_steps=7"]


def fault(how: str, step: int, marker: Path) -> list[str]:
    """FailOnRank on rank 0 at ``step``, once: the same command run again is the restart."""
    return [
        "+callbacks.fault._target_=tests.faults.FailOnRank", "+callbacks.fault.rank=0",
        f"+callbacks.fault.step={step}", f"+callbacks.fault.how={how}", f"+callbacks.fault.once={marker}",
    ]  # fmt: skip


def record_first_step(path: Path) -> list[str]:
    return [
        "+callbacks.first_step._target_=tests.faults.RecordFirstStep",
        f"+callbacks.first_step.path={path}",
    ]


def final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    weights = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    return weights, json.loads((run_dir / "summary.json").read_text())["metrics"]


def assert_same_run(resumed: Path, reference: Path) -> None:
    weights, metrics = final_state(resumed)
    expected_weights, expected_metrics = final_state(reference)
    assert weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.equal(weights[name], tensor), f"{name} differs after the resume"
    assert metrics == expected_metrics


@pytest.mark.slow
def test_interrupted_runs_resume_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """SIGKILL mid-epoch, SIGTERM (pre-emption) and SLURM's SIGUSR1 + requeue: running the same
    command again continues in the same directory and ends bitwise equal to an uninterrupted run
    (CPU, same seed): weights, test metrics. SLURM's signal is taken after the step, as SIGTERM
    is (Lightning's handler saved its checkpoint wherever the signal found the process)."""
    reference = tmp_path / "reference"
    result = run_script("train.py", *EVERY_7_STEPS, f"hydra.run.dir={reference}")
    assert result.returncode == 0, why_failed(result)

    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm["PATH"] = f"{fake_bin}:{os.environ['PATH']}"

    # (fault, step, expected exit code of the interrupted process, environment)
    cases = [("kill", 75, -9, None), ("term", 64, 143, None), ("usr1", 31, 143, slurm)]
    for how, step, exit_code, env in cases:
        logs = tmp_path / how
        command = [
            "train.py",
            *EVERY_7_STEPS,
            *fault(how, step, tmp_path / f"{how}.fired"),
            f"paths.log_dir={logs}",
            *record_first_step(tmp_path / f"{how}.first_steps"),
        ]
        first = run_script(*command, env=env)
        assert first.returncode == exit_code, (how, first.returncode, why_failed(first))
        (run_dir,) = (logs / "train" / "runs").iterdir()
        assert not (run_dir / "summary.json").exists()
        checkpoint = newest_checkpoint(run_dir)
        saved_at = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
        if how == "kill":  # the last periodic checkpoint, mid-epoch (50 steps an epoch)
            assert checkpoint.name == "last.ckpt" and saved_at == 70
        elif how == "term":  # saved where SIGTERM stopped it
            assert checkpoint.name == "last.ckpt" and saved_at == step
            assert "stopped by SIGTERM" in first.stdout + first.stderr
        else:  # SLURM's requeue signal: stopped as by SIGTERM, then `scontrol requeue <job>`
            assert checkpoint.name == "last.ckpt" and saved_at == step
            assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
            assert "requeued SLURM job 4242" in first.stdout + first.stderr
            assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))  # Lightning's, saved inside the handler

        again = run_script(*command, env=env)
        assert again.returncode == 0, (how, why_failed(again))
        assert [p.name for p in (logs / "train" / "runs").iterdir()] == [run_dir.name], "same directory"
        assert f"resuming the interrupted run in {run_dir}" in again.stdout + again.stderr
        assert "exists and is not empty" not in again.stderr  # (Lightning's warning: its own directory)
        assert first_steps(tmp_path / f"{how}.first_steps") == [0, saved_at], "trained on from the checkpoint"
        assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_a_sweep_run_again_resumes_its_failed_job_and_keeps_its_finished_ones(tmp_path: Path) -> None:
    """The sweep table tells a user to run a sweep again with its ``hydra.sweep.dir`` to resume a
    job: its finished jobs refused to run ("holds a finished run"), each a failed job with an
    ``error.txt``, and the sweep exited non-zero. They are kept untouched and report their
    results; the resumed job's error from its first attempt goes."""
    sweep = tmp_path / "sweep"
    command = [
        "train.py", "-m", "model=rnn,gru", *FAST, "trainer.max_epochs=1",
        "callbacks.step_checkpoint.train_time_interval=null", "callbacks.step_checkpoint.every_n_train_steps=7",
        *fault("raise", 20, tmp_path / "fired"), f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    first = run_script(*command)
    assert first.returncode != 0  # job 0 failed at step 20, job 1 finished
    said = first.stdout + first.stderr  # the table, and how to go on (Hydra skips on_multirun_end)
    assert f"sweep summary: {sweep / 'sweep_summary.md'}" in said
    assert f"the same command with hydra.sweep.dir={sweep} runs its unfinished jobs again" in said
    assert "injected failure" in (sweep / "0" / "error.txt").read_text()
    finished = {name: (sweep / "1" / name).read_bytes() for name in ("summary.json", "metrics.csv")}
    again = run_script(*command)
    assert again.returncode == 0, why_failed(again)
    output = again.stdout + again.stderr
    assert f"resuming the interrupted run in {sweep / '0'}" in output
    assert f"{sweep / '1'} finished earlier with this configuration (summary.json): kept" in output
    assert {name: (sweep / "1" / name).read_bytes() for name in finished} == finished
    assert (sweep / "0" / "summary.json").is_file() and not (sweep / "0" / "error.txt").exists()
    with open(sweep / "sweep_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["job"], row["status"]) for row in rows] == [("0", "ok"), ("1", "ok")]
    assert all(float(row["mse"]) > 0 for row in rows)  # the kept job's results are in the table


@pytest.mark.slow
def test_a_sweep_run_again_with_another_grid_keeps_each_job_in_its_own_directory(tmp_path: Path) -> None:
    """Hydra numbers a sweep's jobs by their place in the grid: run again with a seed added in
    front, every job fell on another's directory, refused there as its finished run (and its
    ``.hydra`` rewritten), the new seed never trained. Each job now takes the directory of its
    overrides, and a new one the next free number."""
    sweep = tmp_path / "sweep"
    common = [*FAST, "trainer.max_epochs=1", "model=rnn", "test=false", f"hydra.sweep.dir={sweep}"]
    first = run_script("train.py", "-m", "seed=1,2", *common)
    assert first.returncode == 0, why_failed(first)
    finished = {job: (sweep / job / "summary.json").read_bytes() for job in ("0", "1")}
    records = {
        p: p.read_bytes()
        for job in finished
        for p in [*(sweep / job / ".hydra").iterdir(), sweep / job / "train.log"]
    }
    again = run_script("train.py", "-m", "seed=0,1,2", *common)
    assert again.returncode == 0, why_failed(again)
    assert {job: (sweep / job / "summary.json").read_bytes() for job in finished} == finished
    # kept untouched: Hydra's record (.hydra/hydra.yaml held the new attempt's job number and
    # overrides) and log ("finished earlier ... kept" appended) are put back
    assert {p: p.read_bytes() for p in records} == records
    seeds = {job: OmegaConf.load(sweep / job / "config.yaml").seed for job in ("0", "1", "2")}
    assert seeds == {"0": 1, "1": 2, "2": 0}
    for job, seed in seeds.items():  # Hydra's record of each directory's job is its own
        assert f"seed={seed}" in OmegaConf.load(sweep / job / ".hydra" / "overrides.yaml")
    with open(sweep / "sweep_summary.csv", newline="") as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["ok", "ok", "ok"]


@pytest.mark.slow
def test_a_command_refused_a_runs_directory_leaves_its_hydra_record_and_log_as_they_were(
    tmp_path: Path,
) -> None:
    """Hydra writes ``.hydra/*.yaml`` and opens the log before the job: a command refused
    ``hydra.run.dir`` of a finished run rewrote the run's record of its config (``seed: 9``
    beside the run's summary of seed 42) and appended its refusal to the run's train.log."""
    run_dir = tmp_path / "run"
    command = ["train.py", *FAST, "trainer.max_epochs=1", "test=false", f"hydra.run.dir={run_dir}"]
    assert run_script(*command).returncode == 0
    kept = {p: p.read_bytes() for p in [*(run_dir / ".hydra").iterdir(), run_dir / "train.log"]}
    refused = run_script(*command, "seed=9")
    assert refused.returncode == 1 and "holds a finished run" in refused.stdout + refused.stderr
    assert {p: p.read_bytes() for p in kept} == kept
    assert sorted((run_dir / ".hydra").iterdir()) == sorted(p for p in kept if p.parent.name == ".hydra")


def test_a_sweep_job_takes_the_directory_of_its_overrides_or_a_free_one(tmp_path: Path) -> None:
    from seqlab.utils import resolvers
    from seqlab.utils.resolvers import sweep_subdir

    def subdir(num: int, overrides: list[str], root: Path = tmp_path, mode: str = "RunMode.MULTIRUN") -> str:
        return sweep_subdir(num, root, overrides, mode)

    for job, seed in (("0", 1), ("1", 2), ("3", 9)):
        (tmp_path / job).mkdir()
        (tmp_path / job / "overrides.yaml").write_text(f"- seed={seed}\n- logger=csv\n")
    (tmp_path / "2" / ".hydra").mkdir(parents=True)  # a job that failed before it was accepted
    (tmp_path / "2" / ".hydra" / "overrides.yaml").write_text("- seed=5\n")
    resolvers._SWEEP_SUBDIRS.clear()
    assert subdir(0, ["seed=1", "logger=wandb"]) == "0"  # its own (a logger changes no run)
    assert subdir(1, ["seed=1"]) == "0"  # the directory of its overrides
    assert subdir(7, ["seed=2"]) == "1"  # looked for first: side-by-side jobs start in any order
    assert subdir(0, ["seed=5"]) == "2"
    assert subdir(2, ["seed=7"]) == "4"  # the next number free, taken
    assert subdir(4, ["seed=8"]) == "5"  # its own was taken just before
    assert subdir(2, ["seed=7"]) == "4"  # resolved again in the process: the same
    resolvers._SWEEP_SUBDIRS.clear()  # in another process (a sweeper, then the launcher's worker)
    assert subdir(2, ["seed=7"]) == "4"
    # jobs that differ in the hardware alone are jobs of their own (a resumed run may change it)
    assert subdir(6, ["seed=1", "trainer.devices=2"]) == "6"
    assert subdir(6, ["seed=1"], root=tmp_path / "new") == "6"
    # a single run's config resolved whole: no directory
    assert subdir(0, ["seed=3"], root=tmp_path / "single", mode="RUN") == "0"
    assert not (tmp_path / "single").exists()


def test_the_ranks_of_one_job_that_resolve_its_directory_at_once_agree(tmp_path: Path) -> None:
    """srun starts a SLURM job's tasks together, each resolving the subdir: a rank that finds the
    directory just created by another, its record not yet written, waits for the record rather
    than moving on to the next number (the ranks of one job in two directories)."""
    import threading

    from seqlab.utils import resolvers
    from seqlab.utils.resolvers import sweep_subdir

    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "overrides.yaml").write_text("- seed=1\n")
    for job, record in (("1", "- seed=2\n"), ("2", "- seed=8\n")):  # another rank's mkdir, then its record
        (tmp_path / job).mkdir()
        writer = threading.Timer(0.5, lambda job=job, record=record: (
            (tmp_path / job / ".hydra").mkdir(), (tmp_path / job / ".hydra" / "overrides.yaml").write_text(record)
        ))  # fmt: skip
        writer.start()
        resolvers._SWEEP_SUBDIRS.clear()
        assert sweep_subdir(1, tmp_path, ["seed=2"], "RunMode.MULTIRUN") == "1"
        writer.join()
    resolvers._SWEEP_SUBDIRS.clear()  # "2" holds another job's record: the next free number
    assert sweep_subdir(2, tmp_path, ["seed=3"], "RunMode.MULTIRUN") == "3"


@pytest.mark.slow
def test_a_sigterm_in_a_sweep_names_the_command_that_resumes_it(tmp_path: Path) -> None:
    """Run again as it was, a sweep starts every job afresh in a new directory: the message names
    its ``hydra.sweep.dir``, and that command resumes the stopped job."""
    sweep = tmp_path / "sweep"
    command = [
        "train.py",
        "-m",
        "model=rnn",
        *FAST,
        "trainer.max_epochs=1",
        *fault("term", 5, tmp_path / "fired"),
    ]
    first = run_script(*command, f"hydra.sweep.dir={sweep}")
    assert first.returncode == 143, why_failed(first)
    said = first.stdout + first.stderr
    assert (
        f"saved {sweep / '0' / 'checkpoints' / 'last.ckpt'}; the same command with hydra.sweep.dir={sweep} resumes"
        in said
    )
    again = run_script(*command, f"hydra.sweep.dir={sweep}")
    assert again.returncode == 0, why_failed(again)
    assert f"resuming the interrupted run in {sweep / '0'}" in again.stdout + again.stderr


def test_a_sigterm_to_a_run_that_saves_no_checkpoint_says_it_starts_over(tmp_path: Path) -> None:
    """``callbacks=none``: nothing is saved, and "the same command resumes this run" was untrue."""
    run_dir = tmp_path / "run"
    fast = [o for o in FAST if not o.startswith("callbacks.")]
    command = ["train.py", *fast, "callbacks=none", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"]
    first = run_script(*command, *fault("term", 5, tmp_path / "fired"))
    assert first.returncode == 143, why_failed(first)
    said = first.stdout + first.stderr
    assert "stopped by SIGTERM, with no checkpoint saved (no checkpoint callback" in said
    assert "resumes this run" not in said and not (run_dir / "checkpoints").exists()


def test_a_finished_sweep_job_is_kept_only_for_the_same_run(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """A sweep run again keeps a job that finished with this configuration; not one that differs,
    nor one whose ckpt_path or loggers differ (a resumed run may change those; a finished result
    kept for another checkpoint, or for loggers it never logged to, would not be this run's)."""
    from seqlab.utils.resume import finished_job

    train(make_cfg("trainer.max_epochs=1"))
    run_dir = tmp_path / "run"
    assert finished_job(make_cfg("trainer.max_epochs=1"), run_dir) is None, (
        "a single run is refused, not kept"
    )
    monkeypatch.setattr("seqlab.utils.distributed.in_multirun", lambda: True)
    assert finished_job(make_cfg("trainer.max_epochs=1"), run_dir)["global_step"] > 0
    shown_otherwise = make_cfg("trainer.max_epochs=1", "extras.print_config=true", "tags=[again]")
    assert finished_job(shown_otherwise, run_dir) is not None
    from seqlab.utils.resume import KEPT_IGNORES, config_differences

    tagged = {
        "tags": ["dev"],
        "logger": {"wandb": {"tags": ["dev"], "project": "seqlab"}},
    }  # wandb.yaml: ${tags}
    retagged = {"tags": ["again"], "logger": {"wandb": {"tags": ["again"], "project": "seqlab"}}}
    assert config_differences(tagged, retagged, KEPT_IGNORES) == []
    for other in ("trainer.max_epochs=2", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                  "logger=tensorboard", "resume=never"):  # fmt: skip
        assert finished_job(make_cfg("trainer.max_epochs=1", other), run_dir) is None, other


def interrupted_and_resumed(
    tmp_path: Path, overrides: list[str], faults: list[str], exit_code: int, saved_step: int, said: str = ""
) -> None:
    """A reference run, then a run with ``faults`` that ends with ``exit_code`` (saying ``said``)
    and leaves its newest checkpoint at ``saved_step``, run again by the same command: it ends
    bitwise equal to the reference."""
    reference = tmp_path / "reference"
    assert run_script("train.py", *overrides, f"hydra.run.dir={reference}").returncode == 0
    run_dir = tmp_path / "run"
    steps = tmp_path / "first_steps"
    command = ["train.py", *overrides, f"hydra.run.dir={run_dir}", *faults, *record_first_step(steps)]
    first = run_script(*command)
    assert first.returncode == exit_code, why_failed(first)
    assert said in first.stdout + first.stderr
    assert (
        torch.load(newest_checkpoint(run_dir), map_location="cpu", weights_only=True)["global_step"]
        == saved_step
    )
    again = run_script(*command)
    assert again.returncode == 0, why_failed(again)
    assert first_steps(steps) == [0, saved_step], "trained on from the checkpoint, not afresh"
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_a_run_killed_after_an_epoch_resumes_from_its_end(tmp_path: Path) -> None:
    """Killed early in epoch 1, with no step checkpoint since: the newest checkpoint is epoch 0's
    end (early stopping on, as by default), and the run resumed from it ends as the uninterrupted
    one (before last.ckpt was written every epoch, a non-improving epoch 0 left none)."""
    two_epochs = [*FAST, "trainer.max_epochs=2"]
    interrupted_and_resumed(tmp_path, two_epochs, fault("kill", 55, tmp_path / "fired"), -9, saved_step=50)


@pytest.mark.slow
def test_ctrl_c_stops_at_once_and_the_same_command_resumes_from_the_newest_checkpoint(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) is Lightning's: the run stops where it is, with no checkpoint there (exit
    1), and the same command resumes from the newest one, as the README says."""
    faults = fault("int", 10, tmp_path / "fired")
    said = "Detected KeyboardInterrupt"
    interrupted_and_resumed(tmp_path, EVERY_7_STEPS, faults, 1, saved_step=7, said=said)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signal", "said", "recorded"),
    [
        ("int", "Detected KeyboardInterrupt", "KeyboardInterrupt: stopped by Ctrl-C"),
        ("term", "SIGTERM: stopped at step", "SIGTERMException: stopped by SIGTERM at a step boundary"),
    ],
)
def test_a_sweep_job_stopped_by_ctrl_c_or_sigterm_is_named_so(
    tmp_path: Path, signal: str, said: str, recorded: str
) -> None:
    """Lightning ends a Ctrl-C'd job with SystemExit(1), a SIGTERM'd one with SIGTERMException (a
    SystemExit too), either ending the sweep before Hydra records the job: the sweep table called
    it killed ("out of memory, a time limit?"), and then a SIGTERM a Ctrl-C."""
    sweep = tmp_path / "sweep"
    command = [
        "train.py",
        "-m",
        "model=rnn",
        *FAST,
        *fault(signal, 5, tmp_path / "fired"),
        f"hydra.sweep.dir={sweep}",
    ]
    stopped = run_script(*command)
    assert stopped.returncode != 0 and said in stopped.stdout + stopped.stderr
    assert (sweep / "0" / "error.txt").read_text().startswith(recorded)
    with open(sweep / "sweep_summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "failed" and recorded.split(": ", 1)[1] in row["error"]


@pytest.mark.slow
def test_sigterm_during_validation_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """A checkpoint taken between validation batches counted the epoch as trained and its
    validation as never due: every resume then failed (early stopping's metric never logged).
    The validation finishes, training stops at the epoch's end and saves there."""
    faults = [
        "+callbacks.fault._target_=tests.faults.SignalInValidation", "+callbacks.fault.epoch=0",
        f"+callbacks.fault.once={tmp_path / 'fired'}",
    ]  # fmt: skip
    said = "SIGTERM: stopped at step 50"
    interrupted_and_resumed(tmp_path, EVERY_7_STEPS, faults, 143, saved_step=50, said=said)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("settings", "validated_at", "saved_step"),
    [(["callbacks.step_checkpoint.every_n_train_steps=10"], 50, 40),
     (["callbacks.step_checkpoint.every_n_train_steps=5", "+trainer.val_check_interval=25"], 25, 20)],
    ids=["epoch-end", "mid-epoch-validation"],
)  # fmt: skip
def test_no_step_checkpoint_where_an_epoch_ends_or_a_validation_follows(
    tmp_path: Path, settings: list[str], validated_at: int, saved_step: int
) -> None:
    """A step checkpoint on an epoch's last batch (50 a epoch) or on a batch a validation follows
    was taken before them, and the run resumed from it skipped both (the scheduler's epoch step,
    the validation): it ended elsewhere. None is taken there; a run killed in that validation
    resumes from the step checkpoint before it."""
    overrides = [*TWO_EPOCHS_BY_STEPS, *settings]
    faults = [
        "+callbacks.fault._target_=tests.faults.SignalInValidation", "+callbacks.fault.epoch=0",
        f"+callbacks.fault.once={tmp_path / 'fired'}", "+callbacks.fault.signum=SIGKILL",
    ]  # fmt: skip
    interrupted_and_resumed(tmp_path, overrides, faults, -9, saved_step=saved_step)
    assert (tmp_path / "fired").read_text() == f"fired at step {validated_at}\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("settings", "killed_at", "saved_step"),
    [(["callbacks.step_checkpoint.every_n_train_steps=25", "+trainer.val_check_interval=25"], 30, 26),
     (["callbacks.step_checkpoint.every_n_train_steps=13", "trainer.accumulate_grad_batches=4"], 15, 14)],
    ids=["due-before-a-validation", "due-at-an-epoch-end-accumulating"],
)  # fmt: skip
def test_a_step_checkpoint_due_where_none_is_taken_is_taken_at_the_next_step(
    tmp_path: Path, settings: list[str], killed_at: int, saved_step: int
) -> None:
    """Every step checkpoint due before a validation (every 25 steps, a validation every 25
    batches) was dropped: Lightning saves only on the step itself. One due on an epoch's last
    batch while accumulating gradients (13 steps an epoch) was taken on the next epoch's first
    batch, inside a window: resumed from there, that window stepped on part of its gradients.
    Each is taken at the next optimizer step with neither; a run killed after it resumes from it."""
    overrides = [*TWO_EPOCHS_BY_STEPS, *settings]
    interrupted_and_resumed(tmp_path, overrides, fault("kill", killed_at, tmp_path / "fired"), -9, saved_step)


@pytest.mark.slow
def test_sigterm_while_accumulating_gradients_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """A checkpoint taken between two optimizer steps of gradient accumulation lacks the gradients
    accumulated so far: the resumed window stepped on part of its batches. Training stops after
    the window's optimizer step instead, and saves there."""
    accumulating = [*EVERY_7_STEPS, "trainer.accumulate_grad_batches=4"]
    # fires on the first micro-batch after optimizer step 10, inside the next window
    faults = [*fault("term", 10, tmp_path / "fired"), "+callbacks.fault.mid_window=true"]
    said = "SIGTERM: stopped at step 11"
    interrupted_and_resumed(tmp_path, accumulating, faults, 143, saved_step=11, said=said)


@pytest.mark.parametrize(("failed_at", "saved_step"), [(23, 20), (53, 51)])
def test_step_checkpoints_by_time_and_one_due_at_an_epoch_end_taken_after_it(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failed_at: int, saved_step: int
) -> None:
    """``train_time_interval`` (10 minutes; a clock at 60 s per optimizer step): a step
    checkpoint every 10 steps, and the one due at step 50, the epoch's last batch, at step 51
    (taken before the epoch's end it would be resumed past the epoch's validation)."""
    from lightning.pytorch.callbacks import model_checkpoint

    from seqlab.callbacks import StepCheckpoint

    now = [0.0]
    monkeypatch.setattr(model_checkpoint, "time", SimpleNamespace(monotonic=lambda: now[0]))
    original = StepCheckpoint.on_train_batch_end

    def ticking(self, trainer, *args) -> None:
        now[0] = 60.0 * trainer.global_step
        original(self, trainer, *args)

    monkeypatch.setattr(StepCheckpoint, "on_train_batch_end", ticking)
    by_time = [
        *TWO_EPOCHS_BY_STEPS, "callbacks.step_checkpoint.every_n_train_steps=null",
        "callbacks.step_checkpoint.train_time_interval={_target_: datetime.timedelta, minutes: 10}",
    ]  # fmt: skip
    with pytest.raises(RuntimeError, match=f"injected failure on rank 0 at step {failed_at}"):
        train(make_cfg(*by_time, *fault("raise", failed_at, tmp_path / "fired")))
    checkpoint = newest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.name == "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == saved_step


def test_a_directory_holding_another_programs_config_yaml_is_refused_untouched(
    make_cfg, tmp_path: Path
) -> None:
    """hydra.run.dir pointed at a directory whose config.yaml is not a seqlab run's: refused as
    such (not as an interrupted run differing in every key), and nothing there is changed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("lr: 0.1\nlayers: 3\n", encoding="utf-8")
    (run_dir / "results.txt").write_text("keep me\n", encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"config.yaml is not a seqlab run's configuration .*another hydra.run.dir"
    ):
        train(make_cfg())
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "results.txt"]
    assert (run_dir / "config.yaml").read_text(encoding="utf-8") == "lr: 0.1\nlayers: 3\n"


def test_a_run_directory_is_resumed_only_by_its_own_configuration(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crashed run's directory refuses another configuration (naming the keys, and how to start
    afresh) and a finished run refuses any; nothing in the directory changes. The same
    configuration resumes it, from whatever directory the command is started in."""
    crash = [*EVERY_7_STEPS, "trainer.max_epochs=1", *fault("raise", 10, tmp_path / "fired")]
    with pytest.raises(RuntimeError, match="injected failure"):
        train(make_cfg(*crash))
    run_dir = tmp_path / "run"
    assert newest_checkpoint(run_dir) is not None and not (run_dir / "summary.json").exists()

    def snapshot() -> dict[str, str]:
        return {
            str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*"))
            if p.is_file()
        }

    before = snapshot()
    with pytest.raises(
        ConfigError, match=r"another configuration .*model\.d_model: 32 -> 48; seed: 42 -> 7\..*resume=never"
    ):
        train(make_cfg(*crash, "model.d_model=48", "seed=7"))
    with pytest.raises(ConfigError, match=r"already holds a run .* resume=never"):
        train(make_cfg(*crash, "resume=never"))
    with pytest.raises(ConfigError, match=r"resume='sometimes': expected one of auto, never"):
        train(make_cfg(*crash, "resume=sometimes"))
    assert snapshot() == before, "a refused run wrote into the directory"

    # the training time saved with the checkpoint counts in the resumed run's fit_s (a long first
    # attempt, so the resumed part alone could not reach it)
    checkpoint = newest_checkpoint(run_dir)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved = state["callbacks"]["RunStats"]
    assert 0 < saved["fit_s"] < saved["wall_s"] < 600  # the job's time so far, its set-up included
    saved["fit_s"], saved["wall_s"] = 1000.0, 1500.0
    torch.save(state, checkpoint)
    started = time.perf_counter()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # paths.work_dir differs: it was refused
    metrics, objects = train(make_cfg(*crash))  # the same configuration: resumed and finished
    assert objects["summary"]["global_step"] == 50 and "test/mse" in metrics
    assert 1000 < objects["summary"]["fit_s"] < 1000 + time.perf_counter() - started
    # wall_s as well: it was this attempt's alone, below fit_s (compare.py's job costs then disagreed)
    assert 1500 < objects["summary"]["wall_s"] < 1500 + time.perf_counter() - started
    finished = snapshot()
    # (its advice: another directory, with this one's last.ckpt; it suggested the same directory)
    with pytest.raises(
        ConfigError,
        match=r"holds a finished run .*leave hydra.run.dir unset .* add ckpt_path=.*last.ckpt to that",
    ):
        train(make_cfg(*crash))
    assert snapshot() == finished


def test_a_relative_data_dir_resolved_elsewhere_is_refused_on_resume(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same command resumes from any directory, but a relative data.data_dir
    (../shared/data/sst2) is taken from the directory the command starts in: a resumed run would
    read other files, with the checkpoint's tokenizer, and nothing would fail."""
    for where in ("a", "b"):
        rows = [f"{'good fine' if i % 2 else 'bad awful'} text {i}\t{i % 2}" for i in range(120)]
        (tmp_path / where / "data").mkdir(parents=True)
        (tmp_path / where / "data" / "train.tsv").write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    crash = [
        "data=text_classification", "data.data_dir=data", "data.tokenizer.kind=word",
        f"data.cache_dir={tmp_path / 'cache'}", "model=gru", "model.d_model=16", "trainer.max_epochs=2",
        "extras.print_config=false", "callbacks.rich_progress_bar=null",
        "data.batch_size=8", "callbacks.step_checkpoint.every_n_train_steps=2", *fault("raise", 5, tmp_path / "fired"),
    ]  # fmt: skip
    monkeypatch.chdir(tmp_path / "a")
    with pytest.raises(RuntimeError, match="injected failure"):
        train(make_cfg(*crash, fast=False))
    monkeypatch.chdir(tmp_path / "b")
    run_dir = tmp_path / "run"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(
        ConfigError,
        match=r"data.data_dir resolves to '.*/b/data', and the interrupted run .* read '.*/a/data'",
    ):
        train(make_cfg(*crash, fast=False))
    # refused before anything is written (config.yaml, cmd.txt, git.txt were rewritten first)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    monkeypatch.chdir(tmp_path / "a")
    metrics, _ = train(make_cfg(*crash, fast=False))  # where it started: resumed and finished
    assert "test/acc" in metrics


def test_the_same_overrides_find_the_newest_interrupted_run(tmp_path: Path) -> None:
    def run(name: str, overrides: list[str], checkpoint: bool = True, finished: bool = False) -> Path:
        run_dir = tmp_path / name
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "config.yaml").write_text("seed: 1\n")
        (run_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (run_dir / "config.yaml").write_text("seed: 1\n")
        if checkpoint:
            (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
        if finished:
            (run_dir / "summary.json").write_text("{}")
        return run_dir

    run("2026-01-01_00-00-00", ["model=lstm"])
    newest = run("2026-01-02_00-00-00", ["model=lstm", "resume=auto"])
    run("2026-01-03_00-00-00", ["model=lstm"], finished=True)
    run("2026-01-04_00-00-00", ["model=lstm"], checkpoint=False)
    run("2026-01-05_00-00-00", ["model=gru"])
    assert find_interrupted_run(tmp_path, ["model=lstm"]) == newest
    assert find_interrupted_run(tmp_path, ["model=lstm", "seed=2"]) is None
    # what a resumed run may change (RESUME_IGNORES) does not make it another run: the same
    # command with W&B, other tags or no config print continues it (it started afresh)
    for extra in ("logger=wandb", "tags=[a,b]", "extras.print_config=false", "+logger.wandb.mode=offline"):
        assert find_interrupted_run(tmp_path, ["model=lstm", extra]) == newest, extra
    assert find_interrupted_run(tmp_path / "missing", ["model=lstm"]) is None
    # the same second's runs: -10 was started after -9 (a name sort puts it first)
    run("2026-01-06_00-00-00-9", ["model=rnn"])
    tenth = run("2026-01-06_00-00-00-10", ["model=rnn"])
    assert find_interrupted_run(tmp_path, ["model=rnn"]) == tenth
    differences = config_differences(
        {"model": {"d_model": 32}, "extras": {"print_config": True}, "tags": ["a"], "seed": 1},
        {"model": {"d_model": 64}, "extras": {"print_config": False}, "tags": ["b"], "seed": 1, "new": 2},
    )
    assert differences == ["model.d_model: 32 -> 64", "new: '<absent>' -> 2"]
    # a run saved before task.optimizer.fused existed resumes; the update rule still must match
    before = {"task": {"optimizer": {"lr": 1e-3}}}
    assert config_differences(before, {"task": {"optimizer": {"lr": 1e-3, "fused": "auto"}}}) == []
    assert config_differences(before, {"task": {"optimizer": {"lr": 2e-3, "fused": "auto"}}}) == [
        "task.optimizer.lr: 0.001 -> 0.002"
    ]
    # a run saved before callbacks.recent_checkpoints existed resumes, keeping them or not
    recent = {"callbacks": {"recent_checkpoints": {"save_top_k": 5}, "early_stopping": {"patience": 5}}}
    assert config_differences({"callbacks": {"early_stopping": {"patience": 5}}}, recent) == []
    # a trainer=fsdp / deepspeed run configured with Lightning's class resumes under seqlab's
    for name in ("FSDPStrategy", "DeepSpeedStrategy"):
        lightning = {"trainer": {"strategy": {"_target_": f"lightning.pytorch.strategies.{name}"}}}
        ours = {"trainer": {"strategy": {"_target_": f"seqlab.utils.distributed.{name}"}}}
        assert config_differences(lightning, ours) == []
    ddp = {"trainer": {"strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy"}}}
    assert len(config_differences(ddp, ours)) == 1


def test_a_kill_while_saving_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    """SIGKILL in the middle of writing last.ckpt: the previous last.ckpt loads unchanged."""
    target = tmp_path / "last.ckpt"
    script = f"""
import os, signal, torch
from seqlab.utils.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({{"step": 1, "w": torch.ones(1000)}}, {str(target)!r})
real_save = torch.save
def dying_save(obj, handle, *args, **kwargs):
    handle.write(b"half a checkpoint")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
io.save_checkpoint({{"step": 2, "w": torch.zeros(1000)}}, {str(target)!r})
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == -9, result.stderr
    saved = torch.load(target, weights_only=True)
    assert saved["step"] == 1 and torch.equal(saved["w"], torch.ones(1000))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.") and leftovers[0].endswith(".tmp")


def test_a_sharded_checkpoint_replaces_the_previous_one_only_when_whole(tmp_path: Path) -> None:
    """FSDP2's sharded checkpoint directory was written in place: a process killed while saving
    left the old step's shards mixed with the new one's under last.ckpt. It is written beside it
    and moved over it once every process has written (here one process; the FSDP2 runs of
    test_distributed.py save and resume sharded checkpoints this way)."""
    from seqlab.utils.checkpoint_io import save_directory_atomically

    one_process = SimpleNamespace(
        broadcast=lambda value: value, barrier=lambda name=None: None, is_global_zero=True
    )
    target = tmp_path / "last.ckpt"

    def writes(files: dict[str, str], fail: bool = False):
        def save(path: Path) -> None:
            path.mkdir()
            for name, text in files.items():
                (path / name).write_text(text)
                if fail:
                    raise OSError("No space left on device")

        return save

    def contents() -> dict[str, str]:
        return {p.name: p.read_text() for p in target.iterdir()}

    target.write_text("a file checkpoint")  # a directory replaces a file, too
    save_directory_atomically(one_process, target, writes({"__0_0.distcp": "step 1", "meta.pt": "step 1"}))
    assert contents() == {"__0_0.distcp": "step 1", "meta.pt": "step 1"}
    with pytest.raises(OSError, match="No space"):
        save_directory_atomically(
            one_process, target, writes({"__0_0.distcp": "step 2", "meta.pt": "2"}, fail=True)
        )
    assert contents() == {"__0_0.distcp": "step 1", "meta.pt": "step 1"}
    save_directory_atomically(one_process, target, writes({"__0_0.distcp": "step 3", "meta.pt": "step 3"}))
    assert contents() == {"__0_0.distcp": "step 3", "meta.pt": "step 3"}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the killed save's part cleared
    # a crash between the two renames: no last.ckpt, the previous one set aside; resume finds it
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ".last.ckpt.old").mkdir(parents=True)
    assert newest_checkpoint(run_dir) == run_dir / "checkpoints" / ".last.ckpt.old"
    (run_dir / "checkpoints" / "last.ckpt").mkdir()
    assert newest_checkpoint(run_dir) == run_dir / "checkpoints" / "last.ckpt"
    # the next save after such a crash: killed as it moves its checkpoint in, the set-aside one
    # is still there to resume from (it was removed first, and the run started from scratch)
    shutil.rmtree(target)
    aside = target.with_name(".last.ckpt.old")
    aside.mkdir()
    (aside / "meta.pt").write_text("step 3")
    replace = os.replace

    def killed_moving_in(source, destination) -> None:
        if Path(source).name == ".last.ckpt.partial":
            raise KeyboardInterrupt("killed")
        replace(source, destination)

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(os, "replace", killed_moving_in)
        with pytest.raises(KeyboardInterrupt):
            save_directory_atomically(one_process, target, writes({"meta.pt": "step 4"}))
    assert (aside / "meta.pt").read_text() == "step 3"
    save_directory_atomically(one_process, target, writes({"meta.pt": "step 5"}))
    assert contents() == {"meta.pt": "step 5"} and not aside.exists()


@pytest.mark.parametrize("kind", ["fsdp", "deepspeed"])
def test_fsdp_and_deepspeed_checkpoint_directories_replace_the_previous_one_only_when_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """trainer=fsdp (state_dict_type: sharded) and trainer=deepspeed* save directories through
    Lightning, which writes into last.ckpt in place. Here Lightning's own save runs (one process;
    DeepSpeed's engine, CUDA-only, is a stand-in that writes its layout) and fails half-way through
    the second save: the first checkpoint is left whole, and the third replaces it."""
    from lightning.pytorch.strategies import fsdp as lightning_fsdp

    from seqlab.utils.checkpoint_io import read_sharded_checkpoint
    from seqlab.utils.distributed import DeepSpeedStrategy, FSDPStrategy

    target = tmp_path / "last.ckpt"
    failing = {"now": False}

    def fail_half_way(directory: Path) -> None:
        if failing["now"]:
            (directory / "__0_0.distcp").write_bytes(b"half a shard")
            raise OSError("No space left on device")

    if kind == "fsdp":
        strategy = FSDPStrategy(state_dict_type="sharded")
        dcp_save = lightning_fsdp._distributed_checkpoint_save

        def shard_save(state: dict, path: Path) -> None:
            fail_half_way(Path(path))
            dcp_save(state, path)

        monkeypatch.setattr(lightning_fsdp, "_distributed_checkpoint_save", shard_save)

        def step_saved() -> int:
            checkpoint = read_sharded_checkpoint(target)
            assert torch.equal(
                checkpoint["state_dict"]["w"], torch.full((4,), float(checkpoint["global_step"]))
            )
            return checkpoint["global_step"]
    else:
        pytest.importorskip("deepspeed")  # the optional extra, which the strategy's constructor needs

        class Engine:  # deepspeed.DeepSpeedEngine.save_checkpoint's layout: <dir>/latest, <dir>/<tag>/
            def save_checkpoint(self, save_dir: str, client_state: dict, tag: str, **options: Any) -> None:
                (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
                fail_half_way(Path(save_dir) / tag)
                torch.save(client_state, Path(save_dir) / tag / "mp_rank_00_model_states.pt")
                (Path(save_dir) / "latest").write_text(tag)

        strategy = DeepSpeedStrategy(stage=2)
        strategy.model = Engine()

        def step_saved() -> int:
            assert (target / "latest").read_text() == "checkpoint"
            assert sorted(p.name for p in (target / "checkpoint").iterdir()) == ["mp_rank_00_model_states.pt"]
            return torch.load(target / "checkpoint" / "mp_rank_00_model_states.pt")["global_step"]

    def save(step: int) -> None:
        checkpoint = {
            "state_dict": {"w": torch.full((4,), float(step))},
            "optimizer_states": [],
            "global_step": step,
        }
        strategy.save_checkpoint(checkpoint, target)

    save(1)
    assert step_saved() == 1
    failing["now"] = True
    with pytest.raises(OSError, match="No space"):
        save(2)
    assert step_saved() == 1
    failing["now"] = False
    save(3)
    assert step_saved() == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_run_still_training_is_neither_resumed_nor_joined(make_cfg, tmp_path: Path) -> None:
    """The same command started while the first is still training gets its own directory, and an
    explicit hydra.run.dir of a live run is refused; once that process is gone, it is resumable."""
    run_dir = tmp_path / "runs" / "2026-01-01_00-00-00"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 1\n")
    (run_dir / "overrides.yaml").write_text("- model=lstm\n")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".running").write_text(f"{socket.gethostname()} {live.pid}\n")
        assert find_interrupted_run(tmp_path / "runs", ["model=lstm"]) is None
        cfg = make_cfg(output="runs/2026-01-01_00-00-00")
        with pytest.raises(
            ConfigError, match=rf"is in use: process {live.pid} on this host is training there"
        ):
            train(cfg)
    finally:
        live.kill()
        live.wait()
    assert find_interrupted_run(tmp_path / "runs", ["model=lstm"]) == run_dir  # its process is gone


def test_a_run_training_on_another_host_is_neither_resumed_nor_joined(tmp_path: Path, monkeypatch) -> None:
    """On a cluster's shared file system, a marker of another host named a process that cannot be
    looked up, and counted as gone: a second job with the same command joined the live run (two
    processes writing one last.ckpt). The training process refreshes its marker; another host's
    marker is live while fresh, gone when stale or when it names this SLURM job (requeued)."""
    from seqlab.utils import resume
    from seqlab.utils.resume import mark_running, mark_stopped

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    runs = tmp_path / "runs"
    run_dir = runs / "2026-01-01_00-00-00"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 1\n")
    (run_dir / "overrides.yaml").write_text("- model=lstm\n")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    marker = run_dir / ".running"
    marker.write_text("gpu-node-a 4242 777\n")  # refreshed just now: that run is training
    assert find_interrupted_run(runs, ["model=lstm"]) is None
    with pytest.raises(
        ConfigError, match=r"is in use: process 4242 on gpu-node-a \(its marker refreshed \d+ s ago"
    ):
        mark_running(run_dir)
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # this job, requeued onto another node: its own
    assert find_interrupted_run(runs, ["model=lstm"]) == run_dir
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    assert find_interrupted_run(runs, ["model=lstm"]) is None
    stale = time.time() - resume.MARKER_STALE_S - 1
    os.utime(marker, (stale, stale))  # not refreshed: its process is gone
    assert find_interrupted_run(runs, ["model=lstm"]) == run_dir
    # this process's marker is refreshed while it trains, and left alone once it stops
    monkeypatch.setattr(resume, "MARKER_HEARTBEAT_S", 0.05)
    mark_running(run_dir)
    assert marker.read_text().split() == [socket.gethostname(), str(os.getpid()), "778"]
    os.utime(marker, (stale, stale))
    deadline = time.monotonic() + 30
    while marker.stat().st_mtime == stale:
        assert time.monotonic() < deadline, "the marker was not refreshed"
        time.sleep(0.05)
    mark_stopped(run_dir)
    assert not marker.exists() and not resume.MarkerHeartbeat.beating
    # a marker taken over meanwhile (this process stopped past MARKER_STALE_S) is not refreshed by
    # this process's heartbeat, and one of another node's process with this pid (containers) is
    # not removed as this process stops
    mark_running(run_dir)
    marker.write_text("gpu-node-b 777\n")
    os.utime(marker, (stale, stale))
    heartbeat = resume.MarkerHeartbeat.beating[marker]
    heartbeat.join(timeout=30)  # it stops at its next beat, finding the marker not its own
    assert not heartbeat.is_alive() and marker.stat().st_mtime == stale
    marker.write_text(f"gpu-node-b {os.getpid()} 999\n")
    mark_stopped(run_dir)
    assert marker.read_text() == f"gpu-node-b {os.getpid()} 999\n"


def test_other_ranks_follow_rank_zero(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """Rank 1 starts after rank 0 wrote config.yaml into the directory: it takes the checkpoint
    rank 0 resumes, and an explicit ckpt_path where there is none (a fresh start from it)."""
    from seqlab.utils.resume import resume_checkpoint

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 1\n")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (
        resume_checkpoint(make_cfg("resume=never", "ckpt_path=/elsewhere/e0.ckpt"), run_dir)
        == "/elsewhere/e0.ckpt"
    )
    assert resume_checkpoint(make_cfg(), run_dir) is None
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resume_checkpoint(make_cfg(), run_dir) == str(run_dir / "checkpoints" / "last.ckpt")
    assert resume_checkpoint(make_cfg("resume=never"), run_dir) is None


def test_the_best_monitored_value_survives_a_resume(make_cfg) -> None:
    """``{monitor}_best`` (the sweep objective) is a torchmetrics state, which checkpoints do not
    hold: a resumed run carries the best of the epochs before the resume in its checkpoint, so
    a worse epoch after it does not become the run's best."""
    from seqlab.train import build_datamodule, build_task

    cfg = make_cfg()
    datamodule = build_datamodule(cfg.data)
    assert cfg.task.monitor_mode == "min"
    interrupted = build_task(cfg.task, cfg.model, datamodule)
    interrupted.on_train_start()
    interrupted.monitor_best.update(torch.tensor(0.5))
    checkpoint: dict = {}
    interrupted.on_save_checkpoint(checkpoint)
    other_metric = {"seqlab_monitor_best": {**checkpoint["seqlab_monitor_best"], "monitor": "val/mae"}}
    cases = [
        (checkpoint, True, 0.5),  # this run, resumed
        (checkpoint, False, 0.7),  # started from another run's checkpoint: its own best only
        (other_metric, True, 0.7),  # saved for another monitored metric
        ({}, True, 0.7),
    ]
    run_dir = Path(cfg.paths.output_dir)
    for restored, own, expected in cases:
        task = build_task(cfg.task, cfg.model, datamodule)
        given = run_dir / "checkpoints" / "last.ckpt" if own else run_dir.parent / "elsewhere" / "best.ckpt"
        task._trainer = SimpleNamespace(ckpt_path=str(given), default_root_dir=str(run_dir))  # fit's
        task.on_load_checkpoint(restored)
        task.on_train_start()
        task.monitor_best.update(torch.tensor(0.7))
        assert float(task.monitor_best.compute()) == pytest.approx(expected)


def test_a_run_resumed_after_its_training_ended_still_reports_its_best(make_cfg, tmp_path: Path) -> None:
    """Stopped while testing, a run resumes from last.ckpt at the end of training: fit has
    nothing left to do and logs nothing, yet the objective (val/*_best) is the run's, and so is
    the throughput of its epochs (summary.json had none: compare.py's table a blank)."""
    from seqlab.train import run

    settings = [
        "trainer.max_epochs=2",
        "callbacks.early_stopping=null",
        "seed=null",  # and its summary names the order seed it trained with, not a new draw
        *record_first_step(tmp_path / "steps"),
    ]
    first, _ = train(make_cfg(*settings))
    run_dir = Path(make_cfg(*settings).paths.output_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").unlink()  # as if stopped during the test
    assert run(make_cfg(*settings)) == pytest.approx(first["val/mse_best"])
    assert first_steps(tmp_path / "steps") == [0], "the resumed run trained no step"
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["order_seed"] == summary["order_seed"]
    figures = ("train_samples_per_s", "time_to_first_step_s", "parameters_per_rank", "global_step")
    assert summary["train_samples_per_s"] > 0
    assert {key: resumed.get(key) for key in figures} == {key: summary.get(key) for key in figures}


@pytest.mark.parametrize(
    ("stop", "restored_after_setup"),
    [("mid_epoch", False), ("epoch_end", True)],
    ids=["mid_epoch", "epoch_end_restored_after_setup"],
)
def test_an_unseeded_run_resumes_in_its_own_epoch_orders(
    make_cfg, tmp_path: Path, monkeypatch, stop: str, restored_after_setup: bool
) -> None:
    """``seed=null``: a run resumes in the epoch orders of the seed it drew, not a new draw's:
    stopped mid-epoch, the interrupted epoch's batches after those it trained; failed early in
    its second epoch, from the first epoch's end (``last.ckpt``, where Lightning gives loaders no
    state back), the second epoch in the interrupted run's order. In both, the loader states come
    back after ``configure_optimizers`` has built the loader with a new draw; the second also
    restores the model and callbacks after the strategy's set-up, as FSDP and DeepSpeed do."""
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from seqlab.train import build_datamodule
    from tests.faults import RecordBatches

    if restored_after_setup:
        monkeypatch.setattr(
            SingleDeviceStrategy, "restore_checkpoint_after_setup", property(lambda self: True)
        )
    settings = [
        "seed=null", "trainer.max_epochs=2", "callbacks.early_stopping=null",
        "+callbacks.batches._target_=tests.faults.RecordBatches",
    ]  # fmt: skip
    if stop == "mid_epoch":
        settings += [
            "+callbacks.sigterm._target_=tests.faults.SigtermFlagAtStep",
            "+callbacks.sigterm.step=5",
        ]
        expected_error: type[BaseException] = SIGTERMException
        expected_message = ""
    else:  # after the first step of the second epoch, once
        data = build_datamodule(make_cfg(*settings).data)
        data.setup("fit")
        settings += [
            "+callbacks.fault._target_=tests.faults.FailOnRank", "+callbacks.fault.rank=0",
            f"+callbacks.fault.step={len(data.train_dataloader()) + 1}", f"+callbacks.fault.once={tmp_path / 'once'}",
        ]  # fmt: skip
        expected_error, expected_message = RuntimeError, "injected failure on rank 0"

    stopped_batches: list[list[str]] = []
    loaders = []  # the training loader of each run, as it trained
    original = RecordBatches.on_train_batch_start

    def keep(self, trainer, pl_module, batch, batch_idx) -> None:
        original(self, trainer, pl_module, batch, batch_idx)
        stopped_batches[:] = self.epochs
        loaders.append(trainer.train_dataloader)

    monkeypatch.setattr(RecordBatches, "on_train_batch_start", keep)
    with pytest.raises(expected_error, match=expected_message):
        train(make_cfg(*settings))
    interrupted, first_seed = [list(epoch) for epoch in stopped_batches], loaders[0].sampler.seed
    assert len(interrupted[-1]) == (5 if stop == "mid_epoch" else 1)
    _, objects = train(make_cfg(*settings))  # the same command resumes
    loader = loaders[-1]
    assert loader.sampler.seed == first_seed
    (recorder,) = [c for c in objects["trainer"].callbacks if isinstance(c, RecordBatches)]
    resumed = recorder.epochs[0]  # of the epoch it resumed in
    probe = RecordBatches()  # that whole epoch in the orders the resumed run trained in
    loader.sampler.set_epoch(len(interrupted) - 1)
    for batch in loader:
        original(probe, None, None, batch, 0)
    if stop == "mid_epoch":
        assert interrupted[0] + resumed == probe.epochs[0], "the resumed epoch went on in other orders"
    else:  # retrained from the epoch's start: the same first batch as the interrupted run
        assert resumed == probe.epochs[0] and resumed[:1] == interrupted[1], "the next epoch in other orders"
    summary = json.loads((Path(make_cfg(*settings).paths.output_dir) / "summary.json").read_text())
    assert summary["seed"] is None and summary["order_seed"] == first_seed


def test_a_run_that_early_stopping_ended_stays_ended_when_resumed(make_cfg, tmp_path: Path) -> None:
    """Stopped while testing after early stopping ended fit, the resumed run trains no further
    epoch (Lightning checkpoints EarlyStopping's decision, not the stop) and reports the same."""
    from seqlab.train import run

    # no epoch after the first improves by 1e9: patience 1 stops fit after epoch 1, of 5
    stops = [
        "trainer.max_epochs=5",
        "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.min_delta=1e9",
        *record_first_step(tmp_path / "steps"),
    ]
    cfg = make_cfg(*stops)
    first, _ = train(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    ended = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert ended["global_step"] == 100  # where it stopped, after its second epoch (not the first's best)
    (Path(cfg.paths.output_dir) / "summary.json").unlink()  # as if stopped during the test
    assert run(make_cfg(*stops)) == pytest.approx(first["val/mse_best"])
    assert first_steps(tmp_path / "steps") == [0], "the resumed run trained no step"
    resumed = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == ended["global_step"]  # (Lightning saves last.ckpt again as epoch 2)
    for name, tensor in ended["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), f"{name} trained further"
    summary = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert summary["metrics"]["test/mse"] == pytest.approx(first["test/mse"])
    # another run started from that checkpoint is not bound by the first run's decision
    onward = make_cfg(*stops, f"ckpt_path={checkpoints / 'last.ckpt'}", output="onward")
    resumed["callbacks"]["RunStats"].update(
        fit_s=1000.0, wall_s=1500.0
    )  # nor does it count the first run's time
    torch.save(resumed, checkpoints / "last.ckpt")
    started = time.perf_counter()
    _, objects = train(onward)
    assert 0 < objects["summary"]["fit_s"] < objects["summary"]["wall_s"] < time.perf_counter() - started
    continued = torch.load(Path(onward.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    # its own early stopping, afresh: an improving first epoch (on no best yet), then its patience
    # of 1 (the first run's restored wait count would have stopped it after one epoch)
    assert continued["global_step"] == 2 * ended["global_step"]  # two more epochs


def test_an_explicit_checkpoint_never_takes_over_another_run(make_cfg, tmp_path: Path) -> None:
    """``ckpt_path=`` is where a run starts: the directory search of resume=auto matches it only
    to a run started from the same checkpoint (a run without one, or from another, is left
    alone), and such a run, interrupted, continues from its own newest checkpoint."""
    from seqlab.utils.resume import resume_checkpoint

    runs = tmp_path / "runs"
    for name, overrides in (("plain", ["model=lstm"]), ("from_a", ["model=lstm", "ckpt_path=/a.ckpt"])):
        run_dir = runs / name
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
        (run_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (run_dir / "config.yaml").write_text("seed: 1\n")
    assert find_interrupted_run(runs, ["model=lstm", "ckpt_path=/other.ckpt"]) is None
    assert find_interrupted_run(runs, ["model=lstm", "ckpt_path=/a.ckpt"]) == runs / "from_a"
    assert find_interrupted_run(runs, ["model=lstm", "resume=auto"]) == runs / "plain"

    cfg = make_cfg("model=lstm", "ckpt_path=/a.ckpt")
    run_dir = runs / "from_a"
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    assert resume_checkpoint(cfg, run_dir) == str(run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(
        ConfigError, match=r"started from ckpt_path='/a.ckpt', and this one asks for ckpt_path='/b.ckpt'"
    ):
        resume_checkpoint(make_cfg("model=lstm", "ckpt_path=/b.ckpt"), run_dir)
    (run_dir / "checkpoints" / "last.ckpt").unlink()  # interrupted before its first checkpoint
    assert resume_checkpoint(cfg, run_dir) == "/a.ckpt"
    # a crash between the two renames that replace a sharded best.ckpt (or last.ckpt): the set-aside
    # best is put back where the run's ModelCheckpoint looks for it; the last is read where it lies
    for name in ("best", "last"):
        (run_dir / "checkpoints" / f".{name}.ckpt.old").mkdir()
        (run_dir / "checkpoints" / f".{name}.ckpt.old" / "meta.pt").write_bytes(b"x")
    # and a save killed while writing (SIGKILL) left its whole-model temporary file: removed
    (run_dir / "checkpoints" / ".last.ckpt.k3x9_q.tmp").write_bytes(b"half a checkpoint")
    assert resume_checkpoint(cfg, run_dir) == str(run_dir / "checkpoints" / ".last.ckpt.old")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [".last.ckpt.old", "best.ckpt"]
    assert (run_dir / "checkpoints" / "best.ckpt" / "meta.pt").is_file()


@pytest.mark.parametrize(
    ("fn", "sanity", "validating", "accumulating", "saves"),
    [
        ("fit", False, False, False, True),
        ("fit", True, False, False, False),
        ("test", False, False, False, False),
        ("fit", False, True, False, False),
        ("fit", False, False, True, False),
    ],
)
def test_sigterm_saves_only_where_training_stopped(
    tmp_path: Path, fn: str, sanity: bool, validating: bool, accumulating: bool, saves: bool
) -> None:
    """During trainer.test the model holds the best checkpoint's weights: a SIGTERM there must not
    write them over last.ckpt (the end of fit, where a resume picks up); nor during the sanity
    check, a validation or a gradient-accumulation window (the slow tests resume from those)."""
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from seqlab.callbacks import SaveOnSigterm

    saved = []
    trainer = SimpleNamespace(
        state=SimpleNamespace(fn=TrainerFn(fn)),
        sanity_checking=sanity,
        validating=validating,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_should_accumulate=lambda: accumulating)),
        accumulate_grad_batches=4,
        checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)),
        default_root_dir=str(tmp_path),
        global_step=3,
        save_checkpoint=saved.append,
    )
    SaveOnSigterm().on_exception(trainer, None, SIGTERMException())
    assert saved == ([tmp_path / "last.ckpt"] if saves else [])


def test_a_signal_stops_training_only_where_a_checkpoint_is_whole() -> None:
    """The signal handler only flags. A stop decided before Lightning chose to validate after all
    is put off until after that validation (inside it, no checkpoint could be taken); a signal
    after fit's last decision stops the test (and SLURM's is requeued by its flag)."""
    from lightning.pytorch.trainer.states import TrainerFn

    from seqlab.callbacks import SaveOnSigterm

    connector = SimpleNamespace(received_sigterm=False)
    killed: list[int] = []  # the signals passed on to the processes this one launched
    trainer = SimpleNamespace(
        _signal_connector=connector, state=SimpleNamespace(fn=TrainerFn.FITTING), sanity_checking=False,
        world_size=1, strategy=SimpleNamespace(launcher=SimpleNamespace(kill=killed.append)),
    )  # fmt: skip
    callback = SaveOnSigterm()
    callback.on_fit_start(trainer, None)
    callback.on_train_epoch_end(trainer, None)
    assert not connector.received_sigterm  # no signal, no stop
    connector._sigterm_notifier_fn(15, None)  # SIGTERM while fitting: a flag only
    assert callback.signalled and not connector.received_sigterm
    # passed on once to the other ranks this process launched (as Lightning's handler does)
    connector._sigterm_notifier_fn(15, None)
    assert killed == [15]
    callback.stop_if_signalled(trainer)  # a step boundary
    assert connector.received_sigterm
    callback.on_validation_start(trainer, None)  # ... but Lightning validates first
    assert not connector.received_sigterm and callback.signalled
    callback.on_train_epoch_end(trainer, None)  # after the validation
    assert connector.received_sigterm and not callback.requeue
    # SLURM's signal after fit's last decision: the test stops, and the job is requeued
    callback.on_fit_start(trainer, None)
    connector.received_sigterm = False
    connector._slurm_sigusr_handler_fn(10, None)
    trainer.state.fn = TrainerFn.TESTING  # Lightning resets its own flag as the test starts
    connector.received_sigterm = False
    callback.on_test_start(trainer, None)
    assert connector.received_sigterm and callback.requeue
    assert killed == [15], "SLURM signals every task itself: its signal is not passed on"


def test_slurm_jobs_starting_in_one_second_get_their_own_directories(monkeypatch) -> None:
    """The run directory is named after the time to the second: SLURM array tasks starting
    together (different nodes, the same logs/) would pick one directory; the job id parts them."""
    import datetime

    from seqlab.utils.resolvers import run_stamp

    for key in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    assert run_stamp("%Y") == str(datetime.date.today().year)
    names = set()
    for job in ("1001", "1002"):
        monkeypatch.setenv("SLURM_JOB_ID", job)
        names.add(run_stamp("%Y-%m-%d_%H-%M"))
    assert len(names) == 2 and all(name.endswith(("-slurm1001", "-slurm1002")) for name in names)


def test_only_a_multi_task_launch_shares_one_directory(monkeypatch) -> None:
    """torchrun's ranks and an srun step's tasks share the launch's directory; a python started
    in an ``salloc -n 4`` shell or an ``sbatch -n 4`` script (no srun: one process) is a run of
    its own. Every such run of an allocation had one directory (``slurm-<job>-0``)."""
    from seqlab.utils.resolvers import launch_id

    for key in (
        "TORCHELASTIC_RUN_ID",
        "SLURM_NTASKS",
        "SLURM_JOB_ID",
        "SLURM_STEP_ID",
        "SLURM_STEP_NUM_TASKS",
    ):
        monkeypatch.delenv(key, raising=False)
    assert launch_id() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert launch_id() == "torchrun-abc"
    # a static rendezvous has no id: one node's ranks share their launcher, several nodes the master
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    assert launch_id() == f"torchrun-{socket.gethostname()}-{os.getppid()}"
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "head")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert launch_id() == "torchrun-head-29500"
    monkeypatch.setenv("SLURM_JOB_ID", "55")  # each SLURM job's launch its own
    assert launch_id() == "torchrun-head-29500-slurm55"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: a run of its own
    assert launch_id() is None
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "4")  # the allocation's tasks: salloc -n 4, sbatch -n 4
    assert launch_id() is None
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # srun -n 4 python train.py
    assert launch_id() == "slurm-77-3"
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # srun -n 1
    assert launch_id() is None


@pytest.mark.parametrize(
    "flags",
    [
        ["--cfg", "all", "--resolve"],
        ["-c", "job"],
        ["-cjob"],
        ["--cf", "hydra"],
        ["--info=config"],
        ["-i", "all"],
    ],
)
def test_printing_the_config_takes_no_run_directory(tmp_path: Path, monkeypatch, flags: list[str]) -> None:
    """``python train.py --cfg all --resolve`` resolves hydra.run.dir and hydra.sweep.dir to print
    them: it left an empty timestamped directory under runs/ and multiruns/ each time."""
    from seqlab.utils.resolvers import run_stamp

    for key in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    runs = tmp_path / "runs"
    monkeypatch.setattr(sys, "argv", ["train.py", *flags, "model=gru"])
    assert run_stamp("stamp", str(runs)) == "stamp" and not runs.exists()
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "model=gru,lstm"])  # a run takes it
    assert run_stamp("stamp", str(runs)) == "stamp" and (runs / "stamp").is_dir()
    monkeypatch.setattr(sys, "argv", ["pytest", "-c", "pyproject.toml"])  # not Hydra's: a run
    assert run_stamp("stamp", str(runs)) == "stamp-2"


def test_runs_started_in_one_second_get_their_own_directories(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """``python train.py model=a & python train.py model=b &`` named both runs after the same
    second: they trained into one directory. The later name takes the next free suffix, taken by
    creating it (two processes that both looked before either created its directory took one
    name), and of two processes that still pick one directory, the first to claim it trains there."""
    from seqlab.utils.resolvers import run_stamp
    from seqlab.utils.resume import mark_running, mark_stopped

    for key in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    runs = tmp_path / "runs"
    assert run_stamp("stamp", str(runs)) == "stamp" and (runs / "stamp").is_dir()
    assert run_stamp("stamp", str(runs)) == "stamp-2"
    with monkeypatch.context() as race:  # both processes looked before either created its directory
        race.setattr(Path, "exists", lambda self: False)
        assert run_stamp("stamp", str(runs)) == "stamp-3"
    assert sorted(p.name for p in runs.iterdir()) == ["stamp", "stamp-2", "stamp-3"]

    run_dir = runs / "stamp"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # the other process claimed the directory a moment before this one
        (run_dir / ".running").write_text(f"{socket.gethostname()} {other.pid}\n")
        with pytest.raises(
            ConfigError, match=rf"is in use: process {other.pid} on this host is training there"
        ):
            mark_running(run_dir)
        assert (run_dir / ".running").read_text().split()[-1] == str(other.pid)  # its claim stands
    finally:
        other.kill()
        other.wait()
    mark_running(run_dir)  # a marker whose process is gone is replaced
    assert (run_dir / ".running").read_text().split() == [socket.gethostname(), str(os.getpid())]
    mark_stopped(run_dir)
    assert not (run_dir / ".running").exists()
    # a marker that names no process yet is a claim being written: refused while fresh, replaced
    # when old (a crash between creating and writing it)
    (run_dir / ".running").write_text("")
    with pytest.raises(ConfigError, match=r"is in use: another process is training there"):
        mark_running(run_dir)
    os.utime(run_dir / ".running", (time.time() - 60, time.time() - 60))
    mark_running(run_dir)
    assert (run_dir / ".running").read_text().split() == [socket.gethostname(), str(os.getpid())]
    mark_stopped(run_dir)


def _claim(run_dir: str, without_lock: bool, barrier, results, release) -> None:
    """A process that chose ``run_dir``: claim it at the barrier, report, stay alive until released."""
    if without_lock:  # a file system that refuses flock (Lustre without it, some FUSE mounts)
        import fcntl

        def refuse(*args):
            raise OSError(errno.ENOLCK, "No locks available")

        fcntl.flock = refuse
    barrier.wait()
    try:
        mark_running(Path(run_dir))
        results.put((os.getpid(), "claimed"))
    except ConfigError as error:
        results.put((os.getpid(), str(error)))
    release.wait(60)


@pytest.mark.parametrize("without_lock", [False, True], ids=["flock", "no_flock"])
def test_of_processes_that_chose_one_directory_one_trains_there(tmp_path: Path, without_lock: bool) -> None:
    """Four processes claim one directory at the same moment, five times over: exactly one claims
    it, the others are refused by name; with or without a lock on the directory."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(5):
        run_dir = tmp_path / str(round_)
        run_dir.mkdir()
        barrier, results, release = context.Barrier(4), context.Queue(), context.Event()
        workers = [context.Process(target=_claim, args=(str(run_dir), without_lock, barrier, results, release))
                   for _ in range(4)]  # fmt: skip
        for worker in workers:
            worker.start()
        try:
            outcomes = dict(results.get(timeout=60) for _ in workers)
        finally:
            release.set()
            for worker in workers:
                worker.join(30)
        claimed = [pid for pid, outcome in outcomes.items() if outcome == "claimed"]
        assert len(claimed) == 1, outcomes
        for pid, outcome in outcomes.items():
            if pid not in claimed:
                assert f"{run_dir} is in use" in outcome, outcome


def test_a_run_refused_while_it_is_set_up_leaves_no_marker(make_cfg, tmp_path: Path) -> None:
    """In a sweep the process lives on: a marker left by a job refused at set-up named a live
    process, and that job's directory read as in use to the sweep run again. Its config.yaml
    goes too (Hydra's .hydra/ keeps the record): the fixed command run into the same directory
    was refused as an interrupted run with another configuration, and with resume=never as a
    directory holding a run, each message pointing at the other."""
    cfg = make_cfg("+data.split_ratios=[0.5,0.6,0.1]")
    with pytest.raises(ConfigError, match=r"data\.split_ratios"):
        train(cfg)
    run_dir = tmp_path / "run"
    assert (run_dir / "git.txt").is_file(), "the set-up had written the run's metadata"
    assert not (run_dir / "config.yaml").exists() and not (run_dir / ".running").exists()
    metrics, _ = train(make_cfg("+data.split_ratios=[0.5,0.3,0.2]", "trainer.max_epochs=1"))
    assert metrics["test/mse"] > 0 and (run_dir / "summary.json").is_file()
    assert "split_ratios" in (run_dir / "config.yaml").read_text()
    # a run that trained keeps its record whatever fails after
    with pytest.raises(ConfigError, match="holds a finished run"):
        train(make_cfg("+data.split_ratios=[0.5,0.6,0.1]"))
    # an interrupted run whose resume fails while it is set up (its data file gone) stays
    # resumable: its checkpoint, or rows it logged before one, keep config.yaml
    from seqlab.utils.resume import forget_failed_setup

    for trained in ("checkpoints/last.ckpt", "metrics.csv", None):
        directory = tmp_path / f"interrupted-{trained}"
        (directory / "checkpoints").mkdir(parents=True)
        (directory / "config.yaml").write_text("seed: 1\n")
        if trained:
            (directory / trained).write_text("x")
        forget_failed_setup(directory)
        assert (directory / "config.yaml").exists() == bool(trained), trained


def test_last_checkpoint_is_the_newest_state_whether_or_not_the_epoch_improved(
    make_cfg, tmp_path: Path
) -> None:
    """Lightning 2.6 writes ``save_last`` only with a new best: an epoch that did not improve left
    last.ckpt at the last improving epoch (a killed run lost the epochs since). The step
    checkpoint wrote last-v1.ckpt beside a last.ckpt it had not written (resume=auto reads
    last.ckpt only)."""
    cfg = make_cfg("task.optimizer.lr=0", "trainer.max_epochs=3", "callbacks.early_stopping=null")
    train(cfg)  # a learning rate of 0: no epoch after the first improves
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 150
    assert torch.load(checkpoints / "best.ckpt", map_location="cpu", weights_only=True)["global_step"] == 50
    # 50 steps an epoch, a step checkpoint every 60: stopped at 75, the newest is step 60's
    stopped = [
        "callbacks.step_checkpoint.every_n_train_steps=60", "trainer.max_epochs=3", "callbacks.early_stopping=null",
        "+callbacks.fault._target_=tests.faults.FailOnRank", "+callbacks.fault.rank=0", "+callbacks.fault.step=75",
    ]  # fmt: skip
    cfg = make_cfg(*stopped, output="stopped")
    with pytest.raises(RuntimeError, match="injected failure"):
        train(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("last*")) == ["last.ckpt"]
    assert (
        torch.load(newest_checkpoint(checkpoints.parent), map_location="cpu", weights_only=True)[
            "global_step"
        ]
        == 60
    )


def test_last_checkpoint_is_written_once_a_step_and_never_under_fast_dev_run(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning 2.6's ``on_train_end`` wrote last.ckpt again at the end of every run shorter than
    the step checkpoint's interval (the state the epoch's end had just written), and under
    ``debug=fdr`` (fast_dev_run: "no checkpoints") too."""
    from seqlab.utils.checkpoint_io import AtomicCheckpointIO

    saved: list[tuple[str, int]] = []
    original = AtomicCheckpointIO.save_checkpoint

    def counting(self, checkpoint, path, *args, **kwargs):
        saved.append((Path(path).name, checkpoint["global_step"]))
        return original(self, checkpoint, path, *args, **kwargs)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", counting)
    train(make_cfg("trainer.max_epochs=2", "callbacks.early_stopping=null"))
    assert [step for name, step in saved if name == "last.ckpt"] == [50, 100]
    saved.clear()
    cfg = make_cfg("debug=fdr", output="fdr")
    train(cfg)
    assert saved == [] and not (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").exists()


def test_a_run_resumed_in_its_last_epoch_reports_its_throughput(make_cfg) -> None:
    """Lightning skips ``on_train_epoch_start`` for an epoch it resumes mid-way: RunStats never
    opened that epoch's window, and a run resumed in its last epoch reported no samples/s,
    tokens/s or MFU at all."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    settings = ["trainer.max_epochs=1", "+callbacks.sigterm._target_=tests.faults.SigtermFlagAtStep",
                "+callbacks.sigterm.step=5"]  # fmt: skip
    with pytest.raises(SIGTERMException):
        train(make_cfg(*settings))
    _, objects = train(make_cfg(*settings))  # resumed at step 5 of its only epoch
    summary = objects["summary"]
    assert (
        summary["global_step"] > 5
        and summary["train_samples_per_s"] > 0
        and summary["train_tokens_per_s"] > 0
    )


def test_a_run_resumed_mid_epoch_logs_the_whole_epochs_training_loss(make_cfg, tmp_path: Path) -> None:
    """The epoch's running training loss was not in the checkpoint: a run resumed at step 5 of a
    20-step epoch logged a ``train/loss_epoch`` over steps 5-19 only (the curves compare.py draws
    from it when few steps are logged); now the uninterrupted run's, as are the weights. Also
    from a step checkpoint due at an epoch's last batch, taken at the next epoch's first one
    (its batch is counted completed only after the save)."""
    import csv

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def epoch_loss(run_dir: Path) -> list[float]:
        with (run_dir / "metrics.csv").open(newline="") as handle:
            return [
                float(row["train/loss_epoch"])
                for row in csv.DictReader(handle)
                if row.get("train/loss_epoch")
            ]

    settings = [
        "trainer.limit_train_batches=20",
        "trainer.limit_val_batches=2",
        "callbacks.step_checkpoint.train_time_interval=null",
    ]
    stop = ["+callbacks.sigterm._target_=tests.faults.SigtermFlagAtStep", "+callbacks.sigterm.step=5"]
    train(make_cfg("trainer.max_epochs=1", *settings, output="reference"))
    with pytest.raises(SIGTERMException):
        train(make_cfg("trainer.max_epochs=1", *settings, *stop))
    train(make_cfg("trainer.max_epochs=1", *settings, *stop))  # resumed at step 5 of its only epoch
    reference = epoch_loss(tmp_path / "reference")
    assert len(reference) == 1 and epoch_loss(tmp_path / "run") == pytest.approx(reference, rel=1e-6)

    two = ["trainer.max_epochs=2", *settings, "callbacks.step_checkpoint.every_n_train_steps=20"]
    fail = ["+callbacks.fault._target_=tests.faults.FailOnRank", "+callbacks.fault.rank=0", "+callbacks.fault.step=25",
            f"+callbacks.fault.once={tmp_path / 'fired'}"]  # fmt: skip
    train(make_cfg(*two, output="reference2"))
    with pytest.raises(RuntimeError, match="injected failure"):
        train(make_cfg(*two, *fail, output="failed"))
    saved = torch.load(
        tmp_path / "failed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert saved["global_step"] == 21  # the first batch of the second epoch
    train(make_cfg(*two, *fail, output="failed"))
    reference = epoch_loss(tmp_path / "reference2")
    assert len(reference) == 2 and epoch_loss(tmp_path / "failed") == pytest.approx(reference, rel=1e-6)


def test_a_run_continued_from_another_runs_checkpoint_takes_its_own_settings_seed_and_order(
    make_cfg, tmp_path: Path
) -> None:
    """``ckpt_path=`` of another run with ``task.optimizer.lr=2e-4 weight_decay=0``: Lightning put
    back that run's learning rate, weight decay and schedule peak while config.yaml recorded these;
    its random state and (seed=null) order seed too, so runs of seed=1,2,3 (or unseeded ones)
    started from one checkpoint shared its dropout stream (or all of it). The moments, the schedule
    position and the epoch count stay the checkpoint's."""
    from seqlab.callbacks.resume import ExactResume
    from seqlab.train import train

    first = make_cfg("trainer.max_epochs=1", "seed=null", "test=false", "task.scheduler.name=constant")
    _, objects = train(first)
    checkpoint = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert [group["lr"] for group in saved["optimizer_states"][0]["param_groups"]] == [1e-3, 1e-3]
    onward = make_cfg(
        "trainer.max_epochs=2", "seed=null", "test=false", "task.scheduler.name=constant",
        "task.optimizer.lr=2e-4", "task.optimizer.weight_decay=0", f"ckpt_path={checkpoint}", output="onward",
    )  # fmt: skip
    _, continued = train(onward)
    groups = continued["trainer"].optimizers[0].param_groups
    assert [(group["lr"], group["weight_decay"]) for group in groups] == [(2e-4, 0.0), (2e-4, 0.0)]
    assert continued["trainer"].lr_scheduler_configs[0].scheduler.base_lrs == [2e-4, 2e-4]
    assert continued["trainer"].global_step == 2 * saved["global_step"]  # the epoch count goes on
    state = continued["trainer"].optimizers[0].state
    assert all(int(entry["step"]) == continued["trainer"].global_step for entry in state.values())
    # its own order seed (drawn), not the checkpoint's
    assert continued["summary"]["order_seed"] != objects["summary"]["order_seed"]  # (a 64-bit draw)

    # the generators: put back for the run's own checkpoint only
    run_dir = Path(first.paths.output_dir)
    for given, own in ((checkpoint, True), (tmp_path / "elsewhere" / "last.ckpt", False)):
        callback = ExactResume()
        callback.trainer = SimpleNamespace(ckpt_path=str(given), default_root_dir=str(run_dir), global_rank=0)
        callback.load_state_dict(saved["callbacks"]["ExactResume"])
        torch.manual_seed(12345)
        own_state = torch.get_rng_state()
        callback.restore()
        assert torch.equal(
            torch.get_rng_state(), saved["callbacks"]["ExactResume"]["cpu"] if own else own_state
        )


def test_a_key_added_to_the_configs_since_a_run_was_saved_does_not_refuse_it(
    make_cfg, tmp_path: Path
) -> None:
    """``task.padding_patch`` came after runs were saved without it: resume=auto refused them as
    another configuration ('<absent>' -> 'end'), and a sweep run again its finished jobs; absent
    counts as the value that trains as they did, and another value still differs."""
    from seqlab.utils.resume import config_differences

    saved = {"task": {"patch_len": 16, "patch_stride": 8}, "seed": 1}
    assert (
        config_differences(
            saved, {"task": {"patch_len": 16, "patch_stride": 8, "padding_patch": "end"}, "seed": 1}
        )
        == []
    )
    assert config_differences(
        saved, {"task": {"patch_len": 16, "patch_stride": 8, "padding_patch": None}, "seed": 1}
    ) == ["task.padding_patch: 'end' -> None"]


def test_a_deepspeed_run_is_resumed_on_its_own_number_of_devices_only(make_cfg, tmp_path: Path) -> None:
    """Other strategies' checkpoints load at any world size; DeepSpeed's optimizer partitions at
    theirs only ("used a DP world size of 2 but the current world size is 1", after the launch)."""
    from omegaconf import OmegaConf

    from seqlab.utils.resume import resume_checkpoint

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "last.ckpt").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt" / "latest").write_text("global_step10")
    (run_dir / "config.yaml").write_text(
        OmegaConf.to_yaml(make_cfg("trainer=ddp", "trainer.devices=2"), resolve=True)
    )
    with pytest.raises(ConfigError, match=r"holds an interrupted DeepSpeed run saved with trainer.devices=2: .* resume "
                       r"it with trainer.devices=2"):  # fmt: skip
        resume_checkpoint(make_cfg("trainer=ddp", "trainer.devices=1"), run_dir)
    assert resume_checkpoint(make_cfg("trainer=ddp", "trainer.devices=2"), run_dir) == str(
        run_dir / "checkpoints" / "last.ckpt"
    )
