"""Sweep jobs side by side on one machine: ``hydra/launcher=parallel`` (Hydra's joblib launcher).

Joblib runs ``n_jobs`` jobs at once in worker processes that it reuses from job to job, and
limits each worker to its share of the cores (``OMP_NUM_THREADS`` = cores / ``n_jobs``, unless
the sweep's environment sets it). What a job needs besides, for the length of the job
(``job_resources``), without changing its config (which a resumed job is compared with):

- GPUs of its own. Each job would otherwise take GPU 0 (``trainer.devices=1``) or every GPU
  (``trainer=ddp``), all at once. A job locks as many GPUs as its ``trainer.devices`` asks
  (``fcntl`` locks on ``<sweep dir>/.gpus/<id>.lock``: freed when the job ends, or when its
  process dies) and its Trainer gets their ids (``trainer_kwargs``; its other ranks inherit them
  through ``GPUS_ENV``); one that finds too few free waits for them. A job given ids
  (``trainer.devices=[2,3]``) takes those, unlocked. The locks are the sweep's: two sweeps side by
  side on one machine do not see each other's. The memory the worker's CUDA allocator keeps
  cached goes back before the locks do.
- Its share of the worker's threads per process: a multi-process job (``trainer=ddp`` on CPU)
  divides it among its processes, as Lightning does with the cores when it sets the threads
  itself (which it leaves alone once ``OMP_NUM_THREADS`` is set).
- One terminal for all: the jobs' progress bars and config trees would draw over each other, so
  they are off; each job still logs its start, its run directory and its test metrics.

A job runs side by side with others when it runs in a worker process of the joblib launcher
(``side_by_side``: the sweep's process tells its pid, and its entry point, which a DDP job's other
ranks are started with, through ``SWEEP_ENV``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig, ListConfig

log = logging.getLogger(__name__)

#: what only the sweep's own process knows, for the jobs its launcher runs in worker processes
#: (JSON: its pid and its entry point; set by ``seqlab.utils.hydra_callbacks.ParallelSweep``)
SWEEP_ENV = "SEQLAB_PARALLEL_SWEEP"
#: the GPU ids the running job locked ("2,3"), for its Trainer in every one of its processes
GPUS_ENV = "SEQLAB_JOB_GPUS"
#: seconds between two looks for free GPUs
POLL_S = 1.0


def cores() -> int:
    """The cores this process may use (its CPU affinity and cgroup quota: joblib's count)."""
    import joblib

    return joblib.cpu_count()


def parallel_jobs(accelerator: str = "auto", devices: Any = 1) -> int:
    """Jobs at once (the launcher's ``n_jobs``): as many as the GPUs hold jobs of ``devices``
    GPUs each, or on CPU as many as the cores hold jobs of ``devices`` processes each."""
    import torch

    from seqlab.utils.distributed import gpu_trainer, process_count

    units = torch.cuda.device_count() if gpu_trainer(accelerator) else cores()
    return max(1, units // process_count({"accelerator": accelerator, "devices": devices}))


def joblib_launcher(launcher: Any) -> bool:
    """Whether ``launcher`` (``hydra.launcher``) is Hydra's joblib launcher."""
    return launcher is not None and str(launcher.get("_target_", "")).endswith("JoblibLauncher")


def sweep_process() -> dict[str, Any]:
    """The sweep's process, as it told its jobs (``SWEEP_ENV``): ``{"pid": ..., "entry": [...]}``,
    or ``{}`` outside a parallel sweep."""
    return json.loads(os.environ.get(SWEEP_ENV) or "{}")


def side_by_side() -> bool:
    """Whether this process runs a job of a sweep beside others: a job of the joblib launcher in
    one of its worker processes (with ``n_jobs=1`` joblib runs the jobs in the sweep's process)."""
    from hydra.core.hydra_config import HydraConfig

    from seqlab.utils.distributed import in_multirun

    pid = sweep_process().get("pid")
    return (
        pid is not None
        and pid != os.getpid()
        and in_multirun()
        and joblib_launcher(HydraConfig.get().launcher)
    )


def entry_command() -> list[str]:
    """The command that started the sweep (in a joblib worker, whose ``__main__`` is joblib's,
    as the sweep's process told it), or this program (``python train.py``, ``python -m pkg.mod``)."""
    from hydra.utils import to_absolute_path

    import __main__

    told = sweep_process().get("entry")
    if told:
        return told
    if __main__.__spec__ is None:
        return [sys.executable, to_absolute_path(sys.argv[0])]
    return [sys.executable, "-m", __main__.__spec__.name]


def gpu_lock_dir() -> Path:
    """Where the jobs of this sweep lock their GPUs."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().sweep.dir) / ".gpus"


@contextlib.contextmanager
def threads_restored() -> Iterator[None]:
    """torch's threads and ``OMP_NUM_THREADS`` put back as they were when the block ends: a job
    changes them in this process (its share of the cores in a parallel sweep; Lightning's launcher
    divides them among a DDP job's processes), and the next job of a multirun in this process
    would train with what is left."""
    import torch

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


@contextlib.contextmanager
def job_resources(cfg: DictConfig) -> Iterator[None]:
    """The GPUs and threads of one job of a parallel sweep, for the length of the job (nothing
    changes outside such a sweep); the threads, whatever changed them, as they were after any job
    (``threads_restored``)."""
    with threads_restored():
        if not side_by_side():
            yield
            return
        with _parallel_job_resources(cfg):
            yield


@contextlib.contextmanager
def _parallel_job_resources(cfg: DictConfig) -> Iterator[None]:
    import torch

    from seqlab.utils.distributed import gpu_trainer, process_count

    trainer = cfg.trainer
    locks: list[IO[str]] = []
    threads = torch.get_num_threads()
    try:
        devices, accelerator = trainer.get("devices", "auto"), trainer.get("accelerator", "auto")
        # ids given (a list, Lightning's "0,1"): the job takes those
        chosen = isinstance(devices, ListConfig) or (isinstance(devices, str) and "," in devices)
        total = torch.cuda.device_count()
        wanted = process_count({"accelerator": accelerator, "devices": devices})
        if gpu_trainer(accelerator) and not chosen and wanted <= total:  # (more: refused later)
            ids, locks = lock_gpus(gpu_lock_dir(), wanted, total)
            os.environ[GPUS_ENV] = ",".join(map(str, ids))
            log.info("GPU(s) %s of this machine's %d for this job", ids, total)
        # the worker's share of the cores, shared by the job's processes
        share = max(1, threads // process_count(trainer))
        torch.set_num_threads(share)
        os.environ["OMP_NUM_THREADS"] = str(share)
        yield
    finally:
        os.environ.pop(GPUS_ENV, None)
        if torch.cuda.is_initialized():  # the worker lives on: what its allocator keeps goes back
            import gc

            gc.collect()
            torch.cuda.empty_cache()  # (the next job on these GPUs may be another worker's)
        for lock in locks:
            lock.close()  # closing the file frees its lock


def trainer_kwargs() -> dict[str, Any]:
    """What a job of a parallel sweep changes in its Trainer: the GPUs it locked (in each of its
    processes), no progress bar (the jobs share one terminal)."""
    kwargs: dict[str, Any] = {}
    if os.environ.get(GPUS_ENV):
        kwargs["devices"] = [int(gpu) for gpu in os.environ[GPUS_ENV].split(",")]
    if side_by_side():
        kwargs["enable_progress_bar"] = False
    return kwargs


def without_progress_bars(callbacks: list[Any]) -> list[Any]:
    """``callbacks``, less the progress bars in a job of a parallel sweep."""
    from lightning.pytorch.callbacks import ProgressBar

    return [c for c in callbacks if not isinstance(c, ProgressBar)] if side_by_side() else callbacks


def lock_gpus(lock_dir: Path, count: int, total: int) -> tuple[list[int], list[IO[str]]]:
    """Lock ``count`` of GPUs ``0 .. total-1`` (all or none at a time, so two waiting jobs never
    hold a part each), waiting while fewer are free; returns their ids and the open lock files."""
    import fcntl

    from seqlab.errors import SeqlabError

    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        held: list[tuple[int, IO[str]]] = []
        for gpu in range(total):
            handle = open(lock_dir / f"{gpu}.lock", "a")  # noqa: SIM115 (held open: the lock)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            except OSError as error:  # a file system without flock (Lustre mounted without it)
                handle.close()
                for _, other in held:
                    other.close()
                raise SeqlabError(
                    f"cannot lock GPUs in {lock_dir} ({error}): hydra/launcher=parallel needs a sweep "
                    "directory on a file system with flock; give hydra.sweep.dir=<local directory>"
                ) from None
            held.append((gpu, handle))
            if len(held) == count:
                return [gpu for gpu, _ in held], [handle for _, handle in held]
        for _, handle in held:
            handle.close()
        if not waited:
            log.info("waiting for %d free GPU(s) of %d: the sweep's other jobs hold them", count, total)
            waited = True
        time.sleep(POLL_S)
