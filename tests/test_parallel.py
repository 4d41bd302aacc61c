"""A sweep's jobs side by side on one machine (hydra/launcher=parallel): the GPUs each job locks,
its threads and its terminal. The end-to-end sweep is in test_distributed.py."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from seqlab.utils import parallel
from seqlab.utils.parallel import GPUS_ENV, job_resources, parallel_jobs, trainer_kwargs


@pytest.fixture(autouse=True)
def threads_as_they_were(monkeypatch) -> Iterator[None]:
    """A job changes the process's threads and OMP_NUM_THREADS while it runs: as they were after."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def four_gpus(monkeypatch, tmp_path: Path) -> Path:
    """A machine with 4 GPUs, in a sweep of jobs side by side; returns where they are locked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(parallel, "side_by_side", lambda: True)
    monkeypatch.setattr(parallel, "gpu_lock_dir", lambda: tmp_path / ".gpus")
    monkeypatch.setattr(parallel, "POLL_S", 0.05)
    return tmp_path / ".gpus"


def in_thread(cfg, got: list) -> threading.Thread:
    """A job in another thread (as another process, for the locks: each opens its own lock files),
    recording the GPUs its Trainer gets."""

    def job() -> None:
        with job_resources(cfg):
            got.append(trainer_kwargs()["devices"])

    thread = threading.Thread(target=job)
    thread.start()
    return thread


def test_jobs_side_by_side_lock_gpus_of_their_own(make_cfg, four_gpus: Path) -> None:
    job_a = make_cfg("trainer.accelerator=gpu", "trainer.devices=2", output="a")
    job_b = make_cfg("trainer=ddp", "trainer.accelerator=auto", "trainer.devices=1", output="b")
    job_c = make_cfg("trainer.accelerator=gpu", "trainer.devices=2", output="c")
    got_b: list[list[int]] = []
    got_c: list[list[int]] = []
    with job_resources(job_a):
        kwargs = trainer_kwargs()
        assert kwargs == {"devices": [0, 1], "enable_progress_bar": False}
        # every process of the job (its other ranks, started from here) trains on them
        assert os.environ[GPUS_ENV] == "0,1"
        assert job_a.trainer.devices == 2, "the config is left as it is (a resumed job is compared with it)"
        job_b_thread = in_thread(job_b, got_b)
        job_b_thread.join(5)
        assert got_b == [[2]]
        with job_resources(make_cfg("trainer.accelerator=gpu", "trainer.devices=1", output="d")):
            # job d took GPU 2 (job b's, freed): only GPU 3 is free, and job c waits for 2
            job_c_thread = in_thread(job_c, got_c)
            job_c_thread.join(0.5)
            assert job_c_thread.is_alive() and not got_c, "job c waits while no 2 GPUs are free"
        job_c_thread.join(5)
        assert got_c == [[2, 3]], "once job d ended"
    assert "devices" not in trainer_kwargs() and GPUS_ENV not in os.environ, "the job's GPUs given back"
    with job_resources(job_a):  # every lock was freed
        assert trainer_kwargs()["devices"] == [0, 1]


def test_a_job_gives_its_gpu_memory_back_before_its_gpus(make_cfg, four_gpus: Path, monkeypatch) -> None:
    """The worker process lives on after the job: the memory its CUDA allocator keeps cached on the
    job's GPUs is given back before their locks are, as the next job there may be another worker's."""
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("emptied"))
    real_lock = parallel.lock_gpus

    def lock_gpus(*args):
        ids, handles = real_lock(*args)
        return ids, [Closing(handle, events) for handle in handles]

    monkeypatch.setattr(parallel, "lock_gpus", lock_gpus)
    with job_resources(make_cfg("trainer.accelerator=gpu", "trainer.devices=1")):
        assert events == []
    assert events == ["emptied", "unlocked"]


class Closing:
    """A lock file that records when it is closed (its lock freed)."""

    def __init__(self, handle, events: list[str]) -> None:
        self.handle, self.events = handle, events

    def close(self) -> None:
        self.events.append("unlocked")
        self.handle.close()


def test_a_waiting_job_holds_no_gpu_meanwhile(make_cfg, four_gpus: Path) -> None:
    """All or none: a job waiting for 3 GPUs while 2 are free does not keep them from a job of 2."""
    big = make_cfg("trainer.accelerator=gpu", "trainer.devices=3", output="big")
    small = make_cfg("trainer.accelerator=gpu", "trainer.devices=2", output="small")
    got_big: list[list[int]] = []
    with job_resources(make_cfg("trainer.accelerator=gpu", "trainer.devices=2", output="first")):
        waiting = in_thread(big, got_big)
        waiting.join(0.3)
        assert waiting.is_alive()
        got_small: list[list[int]] = []
        in_thread(small, got_small).join(5)
        assert got_small == [[2, 3]]
    waiting.join(5)
    assert got_big == [[0, 1, 2]]


def test_a_job_given_gpu_ids_takes_them_and_cpu_jobs_share_the_threads(make_cfg, four_gpus: Path) -> None:
    from seqlab.callbacks import RichProgressBar
    from seqlab.train import build_callbacks

    # (fast=False: with the default callbacks, the progress bar among them)
    pinned = make_cfg("trainer.accelerator=gpu", "trainer.devices=[3]", output="pinned", fast=False)
    with job_resources(pinned):
        assert trainer_kwargs() == {"enable_progress_bar": False}, "its own ids, from its config"
        assert not four_gpus.exists() or not any(four_gpus.iterdir()), "nothing locked"
        # one terminal for every job of the sweep: no progress bars
        assert not any(isinstance(c, RichProgressBar) for c in build_callbacks(pinned.callbacks))
    cpu = make_cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", output="cpu")
    torch.set_num_threads(2)
    omp = os.environ["OMP_NUM_THREADS"]
    with job_resources(cpu):
        assert "devices" not in trainer_kwargs()
        # the worker's share of the cores, divided among the job's two processes
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == omp


def test_outside_a_parallel_sweep_a_job_is_left_as_it_is(make_cfg) -> None:
    from seqlab.callbacks import RichProgressBar
    from seqlab.train import build_callbacks

    cfg = make_cfg("trainer.devices=1", fast=False)
    with job_resources(cfg):  # a single run
        assert trainer_kwargs() == {}
        assert any(isinstance(c, RichProgressBar) for c in build_callbacks(cfg.callbacks))


def test_parallel_jobs_fill_the_machine(monkeypatch) -> None:
    monkeypatch.setattr(parallel, "cores", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parallel_jobs("cpu", 2) == 4 and parallel_jobs("auto", 1) == 8 and parallel_jobs("cpu", 16) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert parallel_jobs("auto", 1) == 4 and parallel_jobs("gpu", 2) == 2 and parallel_jobs("auto", -1) == 1
    assert parallel_jobs("gpu", [0, 1, 2]) == 1 and parallel_jobs("cpu", 1) == 8


def test_the_sweeps_process_tells_its_workers_who_it_is(make_cfg, monkeypatch) -> None:
    """A job the parallel launcher runs in a worker process knows it runs beside others, and starts
    its other ranks with the program the sweep's own process was started with (the worker's
    __main__ is joblib's). With n_jobs=1 joblib runs the jobs in the sweep's process: one by one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    from seqlab.utils.distributed import job_command
    from seqlab.utils.hydra_callbacks import ParallelSweep
    from seqlab.utils.parallel import SWEEP_ENV, side_by_side

    monkeypatch.setattr(parallel, "cores", lambda: 4)
    sweep = make_cfg("hydra/launcher=parallel", output="sweep")
    assert sweep.hydra.launcher.n_jobs == 4, "trainer=default: a process a job, a job a core"
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # python /x/my_train.py, not -m
    monkeypatch.setattr("sys.argv", ["/x/my_train.py", "-m", "model=gru,lstm"])
    monkeypatch.setenv(SWEEP_ENV, "")  # (restored after the test whatever happens)
    ParallelSweep().on_multirun_start(sweep)  # in the sweep's process

    job = make_cfg("hydra/launcher=parallel", "model=gru", "trainer=ddp")
    assert job.hydra.launcher.n_jobs == 2, "trainer=ddp here: 2 processes a job"
    with read_write(job.hydra):
        job.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(job)
    assert not side_by_side(), "in the sweep's own process (n_jobs=1)"
    sweeps_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: sweeps_pid + 1)  # in a worker process
    assert side_by_side()
    monkeypatch.setattr("sys.argv", ["/elsewhere/worker.py"])  # (a worker started otherwise)
    command, _ = job_command(1)
    assert command[1] == "/x/my_train.py" and "model=gru" in command
    ParallelSweep().on_multirun_end(sweep)
    assert SWEEP_ENV not in os.environ and not side_by_side()

    basic = make_cfg(output="basic")  # Hydra's basic launcher: nothing to tell
    ParallelSweep().on_multirun_start(basic)
    assert SWEEP_ENV not in os.environ
