"""A sweep's jobs side by side on one machine (hydra/launcher=parallel): the GPUs each job locks,
its threads and its terminal. The end-to-end sweep is in test_distributed.py."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import torch

from seqlab.utils import parallel
from seqlab.utils.parallel import child_overrides, job_resources, parallel_jobs


@pytest.fixture
def four_gpus(monkeypatch, tmp_path: Path) -> Path:
    """A machine with 4 GPUs, in a sweep of jobs side by side; returns where they are locked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(parallel, "parallel_sweep", lambda: 2)
    monkeypatch.setattr(parallel, "gpu_lock_dir", lambda: tmp_path / ".gpus")
    monkeypatch.setattr(parallel, "POLL_S", 0.05)
    return tmp_path / ".gpus"


def test_jobs_side_by_side_lock_gpus_of_their_own(make_cfg, four_gpus: Path) -> None:
    job_a = make_cfg("trainer.accelerator=gpu", "trainer.devices=2", output="a")
    job_b = make_cfg("trainer=ddp", "trainer.accelerator=auto", "trainer.devices=1", output="b")
    job_c = make_cfg("trainer.accelerator=gpu", "trainer.devices=2", output="c")
    got_c: list[list[int]] = []

    def run_c() -> None:
        with job_resources(job_c):
            got_c.append(list(job_c.trainer.devices))

    with job_resources(job_a):
        assert list(job_a.trainer.devices) == [0, 1]
        with job_resources(job_b):
            assert list(job_b.trainer.devices) == [2]
            # its other ranks are started on its GPUs, whatever the command line said
            assert child_overrides(["model=gru", "trainer.devices=1"]) == ["model=gru", "trainer.devices=[2]"]
            waiting = threading.Thread(target=run_c)
            waiting.start()
            waiting.join(0.5)
            assert waiting.is_alive() and not got_c, "job c waits while only GPU 3 is free"
        # job b ended: GPUs 2 and 3 are free, and job c takes them
        waiting.join(5)
        assert got_c == [[2, 3]]
    assert child_overrides(["model=gru"]) == ["model=gru"], "outside a job: the overrides as they are"
    with job_resources(job_a):  # every lock was freed
        assert list(job_a.trainer.devices) == [0, 1]


def test_a_waiting_job_holds_no_gpu_meanwhile(make_cfg, four_gpus: Path) -> None:
    """All or none: a job waiting for 3 GPUs while 2 are free does not keep them from a job of 2."""
    big = make_cfg("trainer.accelerator=gpu", "trainer.devices=3", output="big")
    small = make_cfg("trainer.accelerator=gpu", "trainer.devices=2", output="small")
    first = make_cfg("trainer.accelerator=gpu", "trainer.devices=2", output="first")
    with job_resources(first):
        waiting = threading.Thread(target=lambda: job_resources(big).__enter__(), daemon=True)
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive()
        with job_resources(small):
            assert list(small.trainer.devices) == [2, 3]


def test_a_job_given_gpu_ids_takes_them_and_cpu_jobs_share_the_threads(make_cfg, four_gpus: Path) -> None:
    # (fast=False: with the default callbacks, the progress bar among them)
    pinned = make_cfg("trainer.accelerator=gpu", "trainer.devices=[3]", output="pinned", fast=False)
    assert pinned.callbacks.rich_progress_bar is not None
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    with job_resources(pinned):
        assert list(pinned.trainer.devices) == [3]
        assert not four_gpus.exists() or not any(four_gpus.iterdir()), "nothing locked"
        # one terminal for every job of the sweep: no progress bars
        assert pinned.callbacks.rich_progress_bar is None and pinned.trainer.enable_progress_bar is False
    cpu = make_cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", output="cpu")
    torch.set_num_threads(2)
    try:
        with job_resources(cpu):
            assert cpu.trainer.devices == 2
            # the worker's share of the cores, divided among the job's two processes
            assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert torch.get_num_threads() == 2 and os.environ.get("OMP_NUM_THREADS") == omp
    finally:
        torch.set_num_threads(threads)


def test_outside_a_parallel_sweep_a_job_is_left_as_it_is(make_cfg, monkeypatch) -> None:
    cfg = make_cfg("trainer.devices=1")
    with job_resources(cfg):  # a single run
        assert cfg.trainer.devices == 1 and cfg.callbacks.get("rich_progress_bar") is None  # (FAST's)
        assert "enable_progress_bar" not in cfg.trainer
    monkeypatch.setattr(parallel, "parallel_sweep", lambda: 1)  # a parallel launcher with n_jobs=1
    cfg = make_cfg("trainer.devices=1", fast=False)
    with job_resources(cfg):
        assert cfg.callbacks.rich_progress_bar is not None and "enable_progress_bar" not in cfg.trainer


def test_parallel_jobs_fill_the_machine(monkeypatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parallel_jobs("cpu", 2) == 4 and parallel_jobs("auto", 1) == 8 and parallel_jobs("cpu", 16) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert parallel_jobs("auto", 1) == 4 and parallel_jobs("gpu", 2) == 2 and parallel_jobs("auto", -1) == 1
    assert parallel_jobs("gpu", [0, 1, 2]) == 1 and parallel_jobs("cpu", 1) == 8


def test_the_ranks_of_a_parallel_sweeps_job_run_the_sweeps_program(make_cfg, monkeypatch) -> None:
    """A job the parallel launcher runs in a worker process (whose __main__ is joblib's) starts its
    other ranks with the program the sweep's own process was started with."""
    from seqlab.utils.distributed import ENTRY_ENV, job_command
    from seqlab.utils.hydra_callbacks import SweepEntry

    make_cfg("model=gru")
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # python /x/my_train.py, not -m
    monkeypatch.setattr("sys.argv", ["/x/my_train.py", "-m", "model=gru,lstm"])
    monkeypatch.delenv(ENTRY_ENV, raising=False)
    SweepEntry().on_multirun_start(None)  # in the sweep's process
    monkeypatch.setattr("sys.argv", ["/elsewhere/worker.py"])  # (a worker started otherwise)
    command, _ = job_command(1)
    assert command[1] == "/x/my_train.py" and "model=gru" in command
    SweepEntry().on_multirun_end(None)
    assert ENTRY_ENV not in os.environ


def test_the_parallel_launcher_runs_as_many_jobs_as_the_machine_holds(make_cfg, monkeypatch) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    cfg = make_cfg("hydra/launcher=parallel", "trainer=ddp")  # 2 CPU processes a job (FAST: on CPU)
    assert cfg.hydra.launcher.n_jobs == 4
    assert parallel.parallel_sweep() is None, "a single run"
    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    assert parallel.parallel_sweep() == 4, "a job of the sweep knows it runs beside others"
    with read_write(cfg.hydra):
        cfg.hydra.launcher.n_jobs = -2  # joblib's: every core but one
    HydraConfig.instance().set_config(cfg)
    assert parallel.parallel_sweep() == 7
