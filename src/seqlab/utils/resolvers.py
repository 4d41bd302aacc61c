"""OmegaConf resolvers used by the configs; registered when ``seqlab`` is imported."""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import re
import socket
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def project_root() -> str:
    """The checkout holding ``configs/`` (this file lives in ``<root>/src/seqlab/utils``)."""
    env = os.environ.get("SEQLAB_ROOT")
    if env:
        return str(Path(env).resolve())
    root = Path(__file__).resolve().parents[3]
    return str(root if (root / "configs").is_dir() else Path.cwd())


def env_or(name: str, default: str = "") -> str:
    """``$name``, or ``default`` when it is unset or empty (``oc.env`` takes an empty value as
    given: ``SEQLAB_DATA_DIR=`` put the data under ``/``)."""
    return os.environ.get(name) or default


def device_count(accelerator: str | int = "auto", cpu_processes: int = 2) -> int:
    """Devices for a multi-process strategy on ``accelerator`` (``trainer.accelerator``): every
    visible GPU, or ``cpu_processes`` CPU processes with ``cpu`` or on a machine without a GPU;
    under torchrun, the processes it started on this node (``LOCAL_WORLD_SIZE``: Lightning refuses
    any other count, after the run directory is written). The older one-argument form
    ``${device_count:N}`` (N CPU processes) still works."""
    import torch

    if isinstance(accelerator, int):
        accelerator, cpu_processes = "auto", accelerator
    started = os.environ.get("LOCAL_WORLD_SIZE", "")
    if started.isdigit() and int(started) > 0:  # torchrun's (torch.distributed.run) children
        return int(started)
    if str(accelerator).lower() != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return int(cpu_processes)


def gpus_per_node(accelerator: str, devices: int | str) -> int | None:
    """GPUs a SLURM job asks for per node (configs/hydra/launcher/slurm.yaml): ``trainer.devices``,
    or none for a CPU trainer (its devices are processes, not GPUs)."""
    return None if str(accelerator).lower() == "cpu" else devices  # type: ignore[return-value]


def parallel_jobs(accelerator: str = "auto", devices: int | str | list = 1) -> int:
    """``n_jobs`` of the parallel launcher (configs/hydra/launcher/parallel.yaml): jobs of
    ``devices`` GPUs each on every GPU here, or of ``devices`` processes each on every core."""
    from seqlab.utils.parallel import parallel_jobs

    return parallel_jobs(accelerator, devices)


def launch_id() -> str | None:
    """The id every process of an external multi-process launch shares, or None: torchrun's
    rendezvous id, or the SLURM job and step when ``srun`` started several tasks (the step's own
    task count: an ``salloc -n 4`` shell or an ``sbatch -n 4`` script that runs python without
    srun is one process, whose allocation has 4 tasks; every run there had one directory).

    torchrun's static rendezvous (``--master_port``, no ``--rdzv_id``) has no id ("none"): its
    ranks each took a directory of their own. On one node they share their launcher's process
    (``torchrun-<host>-<its pid>``); across nodes, the master's address and port (and the SLURM
    job: launches with one master and port would otherwise share a directory)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    if run_id == "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if int(os.environ.get("GROUP_WORLD_SIZE", "1")) == 1:
            return f"torchrun-{socket.gethostname()}-{os.getppid()}"
        master = f"torchrun-{os.environ.get('MASTER_ADDR', 'master')}-{os.environ.get('MASTER_PORT', '0')}"
        return f"{master}-slurm{os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ else master
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_STEP_ID', '0')}"
    return None


def run_stamp(pattern: str, runs_dir: str | None = None, resume: str | None = None) -> str:
    """Run directory name: the launch id when torchrun/srun started every rank (each process
    composes its own config, and all must pick one directory); with ``resume=auto``, the name of
    the newest interrupted run in ``runs_dir`` started with the same overrides
    (``seqlab.utils.resume``); else the time (``strftime`` pattern), with the job id under SLURM,
    and ``-2``, ``-3`` ... when ``runs_dir`` already holds that name (started in the same second):
    the name is taken by creating its directory, so of processes starting together each gets its
    own (``seqlab.utils.resume.mark_running`` still settles two that chose one by other means:
    the same explicit ``hydra.run.dir``, or both resuming one interrupted run). A command that
    only prints the config (``--cfg all --resolve``) takes no directory."""
    stamp = launch_id()
    if stamp:
        return stamp
    if runs_dir and resume == "auto":
        from hydra.core.hydra_config import HydraConfig

        from seqlab.utils.resume import find_interrupted_run

        if HydraConfig.initialized():
            previous = find_interrupted_run(Path(runs_dir), list(HydraConfig.get().overrides.task))
            if previous is not None:
                return previous.name
    stamp = datetime.now().strftime(pattern)
    # SLURM array tasks (and jobs) starting in the same second would share the directory
    stamp = f"{stamp}-slurm{os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ else stamp
    # a run (or sweep) started earlier in the same second: the next free name, taken by creating
    # it (two processes that both found a name free took the same one)
    if runs_dir and not only_printing_config():
        base, number = stamp, 1
        while True:
            try:
                (Path(runs_dir) / stamp).mkdir(parents=True)
                return stamp
            except FileExistsError:
                number += 1
                stamp = f"{base}-{number}"
    return stamp


def only_printing_config() -> bool:
    """Whether Hydra was asked to print the config (``--cfg``, ``--info`` in any of the spellings
    its parser takes) rather than to run: it resolves ``hydra.run.dir`` and ``hydra.sweep.dir``
    to print them. False for a command line that is not Hydra's."""
    try:
        from hydra._internal.utils import get_args_parser  # (private: a Hydra without it runs on)

        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args, _ = get_args_parser().parse_known_args(sys.argv[1:])  # (argparse's messages)
    except (ImportError, SystemExit):
        return False
    return bool(getattr(args, "cfg", None) or getattr(args, "info", None))


def rank_log_suffix() -> str:
    """``_rank<N>`` for the log file of rank N > 0 started by torchrun or srun (Lightning's own
    launcher names its ranks' jobs ``train_ddp_process_<N>`` instead)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ and (launch_id() or key == "RANK"):
            rank = int(os.environ[key])
            return f"_rank{rank}" if rank else ""
    return ""


def sweep_id(task_name: str = "train") -> str | None:
    """Inside a Hydra multirun, ``<task_name>-<sweep directory name>``: the W&B group every job of
    the sweep shares (a W&B sweep agent's runs are grouped by W&B itself). Else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return sweep_group(task_name, hydra.sweep.dir)


#: the longest W&B run name (W&B refuses longer ones)
WANDB_NAME_LIMIT = 128


#: job directories chosen in this process: ``(sweep dir, job number, overrides)`` -> name (the
#: subdir is resolved more than once per job, and a directory it claimed holds no record yet)
_SWEEP_SUBDIRS: dict[tuple[str, int, tuple[str, ...]], str] = {}


def sweep_subdir(num: Any, sweep_dir: Any, overrides: Any, mode: Any = "MULTIRUN") -> str:
    """A sweep job's directory (``hydra.sweep.subdir``): its number, as Hydra's, unless the sweep
    directory holds another job there, started with other overrides: a sweep run again with
    another grid (``seed=1,2`` -> ``seed=0,1,2``) numbers its jobs anew by position, and its job 0
    was refused as the finished run of the old job 0, the seed it was to train never trained and
    another trained twice. A job takes the directory of an earlier job with its overrides (kept
    when finished, resumed when interrupted; looked for first, whatever order side-by-side jobs
    start in), else its number, else the next number free in the sweep. A directory is taken by
    creating it, with the job's overrides recorded in it, and one found without its record yet
    is waited for (the ranks of one SLURM job resolve this at once). Outside a multirun (``mode``:
    ``hydra.mode``; a config resolved whole in a single run) it is the number, nothing created."""
    from seqlab.utils.resume import SWEEP_JOB_IGNORES, same_overrides

    wanted = tuple(str(o) for o in overrides)
    key = (str(sweep_dir), int(num), wanted)
    if key in _SWEEP_SUBDIRS:
        return _SWEEP_SUBDIRS[key]
    root = Path(str(sweep_dir))
    if "MULTIRUN" not in str(mode) or only_printing_config():
        return str(num)

    def ours(path: Path) -> bool:
        return same_overrides(path, list(wanted), hydras=True, ignores=SWEEP_JOB_IGNORES)

    def numbered() -> list[Path]:
        return sorted(
            (p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
        )

    own = root / str(num)
    earlier = next((p for p in numbered() if ours(p)), None) if root.is_dir() else None
    if earlier is not None:
        name = earlier.name
    elif taken(own, wanted, ours):
        name = str(num)
    else:
        start = max((int(p.name) for p in numbered()), default=int(num)) + 1
        name = str(next(n for n in itertools.count(start) if taken(root / str(n), wanted, ours)))
    if name != str(num):
        log.info(
            "sweep job %s (%s) runs in %s: %s holds another job", num, " ".join(wanted), root / name, own
        )
    _SWEEP_SUBDIRS[key] = name
    return name


def taken(path: Path, overrides: tuple[str, ...], ours: Callable[[Path], bool], wait_s: float = 10.0) -> bool:
    """Whether the job directory ``path`` is this job's: created here, the job's ``overrides``
    recorded in it at once as Hydra does when the job starts (``.hydra/overrides.yaml``,
    redacted), so another process resolving the job's directory (its other ranks; a search's
    sweeper, then the launcher's worker) finds it the job's; or found holding them (``ours``),
    waiting up to ``wait_s`` for the record of a directory another process has just created."""
    import time

    from seqlab.utils.files import write_text_atomic
    from seqlab.utils.secrets import redact

    try:
        path.mkdir(parents=True)
    except FileExistsError:
        deadline = time.monotonic() + wait_s
        while not (path / ".hydra" / "overrides.yaml").exists() and not (path / "overrides.yaml").exists():
            if time.monotonic() > deadline or not path.is_dir():
                return False
            time.sleep(0.1)
        return ours(path)
    record = OmegaConf.to_yaml(OmegaConf.create(redact(list(overrides))))
    write_text_atomic(path / ".hydra" / "overrides.yaml", record)
    return True


def sweep_job_name() -> str | None:
    """Inside a Hydra multirun, the job's overrides (``model=gru,seed=1``; its number when it has
    none; credentials redacted): the W&B run's name, so the runs of a sweep's group are told apart
    by their settings. The overrides every job shares (given as they are on the sweep's command
    line, ``sweep_command_line``: ``experiment=...``, ``data.data_dir=...``) are left out (best
    effort: a fixed value Hydra's basic sweeper re-renders, ``1e-3`` as ``0.001``, stays in),
    and floats are shown to 4 significant digits: an Optuna trial's name was its fixed overrides,
    cut before the sampled ones. Two trials may then share a name (a W&B name need not be
    unique: the run id is). Longer than W&B takes, cut with a hash of the whole kept at the end.
    Else None (W&B draws a name)."""
    import sys

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from seqlab.utils.secrets import redact_text

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    # a swept override is there as its sweep (model=gru,lstm), not as the job's; compared redacted
    # (multirun.yaml is, by the time a job reads it)
    given = {redact_text(o) for o in sweep_command_line(hydra.sweep.dir) or sys.argv[1:]}
    varying = sorted(short_floats(o) for o in map(redact_text, hydra.overrides.task) if o not in given)
    name = redact_text(",".join(varying) or hydra.job.override_dirname) or f"job {hydra.job.num}"
    if len(name) > WANDB_NAME_LIMIT:
        import hashlib

        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[: WANDB_NAME_LIMIT - 10]}..{digest}"
    return name


def sweep_command_line(sweep_dir: str) -> list[str] | None:
    """The overrides the sweep was started with (its ``multirun.yaml``, which Hydra's sweepers
    write before the first job): a job that runs in another process than the sweep's (a SLURM
    job, whose command line is submitit's) cannot read them from its own. None if unreadable."""
    try:
        task = OmegaConf.load(Path(sweep_dir) / "multirun.yaml").hydra.overrides.task
    except Exception:
        return None
    return [str(override) for override in task]


def short_floats(override: str) -> str:
    """``key=<float>`` with the float to 4 significant digits (other overrides unchanged)."""
    key, sep, value = override.partition("=")
    if sep and re.fullmatch(r"-?\d*\.\d+(e-?\d+)?|-?\d+e-?\d+", value):
        return f"{key}={float(value):.4g}"
    return override


def sweep_group(task_name: str, sweep_dir: str | Path) -> str:
    """The W&B group of a sweep's runs and of its comparison report. A sweep directory's name is
    its start time, its own only among its task's sweeps (``logs/<task_name>/multiruns``): with
    the job's name (always ``train``) two tasks' sweeps started in one second shared a group."""
    return f"{task_name}-{Path(sweep_dir).name}"


#: the files of the ETT benchmark and where they are published
ETT_FILES = ("ETTh1.csv", "ETTh2.csv", "ETTm1.csv", "ETTm2.csv")
ETT_URL = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/"


def ett_url(file: str) -> str | None:
    """Where an ETT file is downloaded from; None for any other file (``data=ett`` with a user's own
    ``data.file=sales.csv``, which a missing file's error said was looked for at ETDataset)."""
    return ETT_URL + file if file in ETT_FILES else None


#: which way each task's validation metrics improve (``val/<name>``): the checkpoint, early
#: stopping and a search follow ``task.monitor_mode``, which follows these
METRIC_MODES = {
    "loss": "min",
    "mse": "min",
    "mae": "min",
    "ppl": "min",
    "acc": "max",
    "f1": "max",
    "bleu": "max",
    "chrf": "max",
}


def metric_mode(monitor: str) -> str | None:
    """``min`` or ``max`` for a known metric (``val/loss``: ``min``), None for another: the
    ``${monitor_mode:${task.monitor}}`` default of ``task.monitor_mode`` (None is refused, asking
    for the mode: ``seqlab.tasks.base.check_monitor``)."""
    return METRIC_MODES.get(str(monitor).rsplit("/", 1)[-1])


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("project_root", project_root, replace=True)
    OmegaConf.register_new_resolver("env_or", env_or, replace=True)
    OmegaConf.register_new_resolver("device_count", device_count, replace=True)
    OmegaConf.register_new_resolver("gpus_per_node", gpus_per_node, replace=True)
    OmegaConf.register_new_resolver("parallel_jobs", parallel_jobs, replace=True)
    OmegaConf.register_new_resolver("run_stamp", run_stamp, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("rank_log_suffix", rank_log_suffix, replace=True)
    OmegaConf.register_new_resolver("sweep_id", sweep_id, replace=True)
    OmegaConf.register_new_resolver("sweep_job_name", sweep_job_name, replace=True)
    OmegaConf.register_new_resolver("sweep_subdir", sweep_subdir, replace=True)
    OmegaConf.register_new_resolver("ett_url", ett_url, replace=True)
    OmegaConf.register_new_resolver("monitor_mode", metric_mode, replace=True)
