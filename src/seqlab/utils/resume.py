"""``resume=auto``: the same command continues an interrupted run, in its own directory.

- Picking the directory (the ``run_stamp`` resolver, before Hydra creates one): with the
  default timestamped run directories, the newest run of ``logs/<task_name>/runs`` that was
  started with the same command-line overrides, never finished (no ``summary.json``) and left a
  checkpoint is reused instead of a new timestamp. torchrun and multi-task srun launches name
  the directory after the launch id, so a requeued SLURM job finds its directory the same way.
- Guarding it (``resume_checkpoint``, first thing in ``train()``, before anything is written):
  a directory that already holds a run is resumed only if the run is unfinished, its process is
  gone (``.running`` names the host and pid while it trains) and its saved configuration
  equals this one (apart from ``RESUME_IGNORES``); a live run, a finished run or a different
  configuration is refused with the differing keys, so two configurations are never mixed and
  a good run is never written over. ``resume=never`` refuses any directory that holds a run.
- A sweep run again with its ``hydra.sweep.dir`` (``finished_job``): a job that finished with
  the same configuration is kept as it is, its summary its result, instead of being refused.

The checkpoint resumed is the newest of ``checkpoints/last.ckpt`` (end of epoch, every
``callbacks.step_checkpoint`` interval, on SIGTERM) and Lightning's SLURM ``hpc_ckpt_<n>.ckpt``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from seqlab.errors import ConfigError
from seqlab.utils.files import directory_lock

log = logging.getLogger(__name__)

RESUME_MODES = ("auto", "never")
#: ``<run>/.running``: host and pid of the process training there (and its SLURM job id)
RUNNING = ".running"
#: the process training in a run directory refreshes its marker this often; a marker of another
#: host (whose process cannot be looked up) is taken for a live run's while younger than
#: ``MARKER_STALE_S``, unless it names this SLURM job (requeued: its process is gone)
MARKER_HEARTBEAT_S = 30.0
MARKER_STALE_S = 150.0
#: keys that may differ between the interrupted run and its resumption (how it is shown or
#: logged, where it resumes from), with their sub-keys
RESUME_IGNORES = (
    "hydra",
    "resume",
    "ckpt_path",
    # where the command was started: the same command run from another directory resumes
    "paths.work_dir",
    "extras",
    "logger",
    "tags",
    "callbacks.rich_progress_bar",
    "callbacks.model_summary",
    # which recent epochs' checkpoints are kept besides (none before this key existed)
    "callbacks.recent_checkpoints",
    # the optimizer's kernel, not its update rule (a run from before `fused: auto` resumes)
    "task.optimizer.fused",
    # the hardware: data.batch_size is the global batch, so a run requeued on a node with
    # another number of GPUs trains on the same batches (its checkpoints load at any world size)
    "trainer.devices",
    "trainer.num_nodes",
)

#: what may differ for a finished sweep job to be kept as its result: narrower than a resumed
#: run's, since the result is the finished run's (its ckpt_path, the loggers it logged to)
KEPT_IGNORES = (
    *(
        key
        for key in RESUME_IGNORES
        if key not in ("ckpt_path", "logger", "trainer.devices", "trainer.num_nodes")
    ),
    "logger.wandb.tags",  # (the top-level tags: ignored)
)


def same_command() -> str:
    """What resumes this run: the same command; a sweep's job, the same command with its sweep's
    directory (run again without it, a new sweep directory starts every job afresh)."""
    from seqlab.utils.distributed import in_multirun

    if in_multirun():
        from hydra.core.hydra_config import HydraConfig

        return f"the same command with hydra.sweep.dir={HydraConfig.get().sweep.dir}"
    return "the same command"


def check_mode(value: Any) -> str:
    if value not in RESUME_MODES:
        raise ConfigError(f"resume={value!r}: expected one of {', '.join(RESUME_MODES)}")
    return value


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a resumed run starts from: the newest of ``checkpoints/last.ckpt`` (a file,
    or a sharded directory; where a crash came between the two renames that replace a sharded
    one, the previous one, set aside as ``.last.ckpt.old``) and Lightning's ``hpc_ckpt_<n>.ckpt``
    (SLURM requeue, from before seqlab took its signal)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.exists() and last.with_name(".last.ckpt.old").is_dir():
        last = last.with_name(".last.ckpt.old")
    candidates = [last, *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [path for path in candidates if path.exists()]
    return max(existing, key=lambda path: path.stat().st_mtime) if existing else None


def is_interrupted(run_dir: Path) -> bool:
    """A run that wrote its configuration and a checkpoint but not its summary, and whose
    process is not running any more."""
    return (
        (run_dir / "config.yaml").is_file()
        and not (run_dir / "summary.json").exists()
        and newest_checkpoint(run_dir) is not None
        and running_process(run_dir) is None
    )


#: a marker that does not name a process yet is a claim being written for this long
CLAIM_SECONDS = 10.0


def mark_running(run_dir: Path) -> None:
    """``<run>/.running``: this host and process, while the run trains (rank 0 writes it and
    refreshes it every ``MARKER_HEARTBEAT_S``). Claimed under a lock on the directory: of two
    processes that chose one directory at once, one trains there and the other is refused (a
    marker whose process is gone is replaced: of this host, a pid that no longer runs; of another
    host, a marker not refreshed for ``MARKER_STALE_S``, or one of this SLURM job, requeued).
    Without the lock (a file system that refuses ``flock``) two processes that find a stale marker
    at the same moment may both replace it; from an empty directory, one claims it."""
    with directory_lock(run_dir, "claiming it"):
        marker = run_dir / RUNNING
        try:  # read once: what decides is what this process found
            found, written = marker.read_text(), marker.stat().st_mtime
        except FileNotFoundError:
            found = None
        except OSError as error:
            raise ConfigError(
                f"{marker}: cannot read it ({error.strerror}); is another user training there?"
            ) from None
        if found is not None:
            try:
                live = marker_owner(found, written)
            except ValueError:  # not "<host> <pid>": being written by a process that has just
                # claimed it (where there is no lock), or left half-written by a crash long ago
                if time.time() - written < CLAIM_SECONDS:
                    raise in_use(run_dir, None) from None
                live = None
            if live is not None:
                raise in_use(run_dir, live)
            marker.unlink(missing_ok=True)  # its process is gone, or it is this process's own
        try:  # exclusive too: where the file system refuses the lock, one of two still wins
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise in_use(run_dir, running_process(run_dir)) from None
        with os.fdopen(fd, "w") as handle:
            job = os.environ.get("SLURM_JOB_ID")
            handle.write(f"{this_process()}{f' {job}' if job else ''}\n")
    MarkerHeartbeat.start_for(marker)


class MarkerHeartbeat(threading.Thread):
    """Refreshes a ``.running`` marker's modification time every ``MARKER_HEARTBEAT_S`` while its
    run trains, so that a process of another host can tell a live run from a dead one."""

    beating: ClassVar[dict[Path, MarkerHeartbeat]] = {}

    def __init__(self, marker: Path) -> None:
        super().__init__(name="seqlab-running-marker", daemon=True)
        self.marker, self.done = marker, threading.Event()

    @classmethod
    def start_for(cls, marker: Path) -> None:
        cls.stop_for(marker)
        heartbeat = cls.beating[marker] = cls(marker)
        heartbeat.start()

    @classmethod
    def stop_for(cls, marker: Path) -> None:
        heartbeat = cls.beating.pop(marker, None)
        if heartbeat is not None:
            heartbeat.done.set()

    def run(self) -> None:
        while not self.done.wait(MARKER_HEARTBEAT_S):
            try:
                if not is_own_marker(self.marker.read_text()):
                    return  # taken over (this process was stopped past MARKER_STALE_S): not ours
                os.utime(self.marker)
            except FileNotFoundError:  # removed (the run ended, or someone deleted it by hand)
                return
            except OSError as error:  # a file system hiccup: the next beat may get through
                log.warning("%s not refreshed: %s", self.marker, error)


def this_process() -> str:
    """This process as a ``.running`` marker (and an Optuna trial's sweeper) names it: ``<host> <pid>``."""
    return f"{socket.gethostname()} {os.getpid()}"


def is_own_marker(text: str) -> bool:
    """Whether a ``.running`` marker's text names this process (host and pid: containers on
    several nodes give their processes the same pids)."""
    return text.split()[:2] == this_process().split()


def in_use(run_dir: Path, owner: str | None) -> ConfigError:
    who = f"{owner} is" if owner is not None else "another process is"
    return ConfigError(
        f"{run_dir} is in use: {who} training there ({run_dir / RUNNING}); wait for it or stop it, or "
        f"train into another directory (if no such run is going on, delete {RUNNING})"
    )


def mark_stopped(run_dir: Path) -> None:
    marker = run_dir / RUNNING
    MarkerHeartbeat.stop_for(marker)
    if marker.is_file() and is_own_marker(marker.read_text()):
        marker.unlink()


def forget_failed_setup(run_dir: Path) -> None:
    """A run that failed while it was set up (a missing data file, a bad value), with nothing
    trained in its directory (no checkpoint, no metrics, no summary), takes back its
    ``config.yaml`` (Hydra's ``.hydra/config.yaml`` keeps the record): the fixed command run into
    the same directory starts there afresh. It was refused as an interrupted run with another
    configuration, and with ``resume=never`` as a directory holding a run."""
    trained = ("metrics.csv", "summary.json")
    if newest_checkpoint(run_dir) is None and not any((run_dir / name).exists() for name in trained):
        (run_dir / "config.yaml").unlink(missing_ok=True)


#: what a command refused while it was set up leaves in a run directory: Hydra's record and log,
#: the run's record of its command (``write_run_metadata`` without its config.yaml); eval.py's too
SETUP_FILES = frozenset(
    # (consolidated.ckpt: eval.py's gathering of a sharded checkpoint, before its checks)
    {
        ".hydra",
        "train.log",
        "eval.log",
        "cmd.txt",
        "git.txt",
        "git.diff",
        "overrides.yaml",
        "consolidated.ckpt",
    }
)


def drop_refused_run_dir(run_dir: Path) -> None:
    """A single run refused while it was set up (``trainer=gpu`` on a CPU machine, a bad value, a
    missing file) leaves no directory behind: one under ``logs/<task>/runs`` per refused command
    piled up, each with Hydra's record and log alone (the refusal is on the terminal). Only a
    directory that holds nothing else: not one with a run in it (``config.yaml``, a checkpoint)
    or files of its own (``hydra.run.dir`` given)."""
    import shutil

    try:
        entries = {path.name for path in run_dir.iterdir()}
    except OSError:
        return
    if ".hydra" in entries and entries <= SETUP_FILES:
        shutil.rmtree(run_dir, ignore_errors=True)


def running_process(run_dir: Path, this_job_gone: bool = True) -> str | None:
    """Who is training in ``run_dir`` (``process <pid> on this host``, ``process <pid> on
    <host>``), while they are: see ``marker_owner``; else None."""
    marker = run_dir / RUNNING
    try:
        return marker_owner(marker.read_text(), marker.stat().st_mtime, this_job_gone)
    except (OSError, ValueError):
        return None


def marker_owner(text: str, written: float, this_job_gone: bool = True) -> str | None:
    """Who holds a ``.running`` marker (its ``text``, refreshed at ``written``), while they hold it:
    a live process of this host other than this one; a process of another host whose marker was
    refreshed within ``MARKER_STALE_S``, unless it names this SLURM job and ``this_job_gone`` (a
    requeued job's earlier process is gone; another task of this job, running on, is not: for a
    sweep table written by each task). None for a marker whose process is gone; ValueError for
    text that is not a marker's ``<host> <pid> [<job>]``."""
    host, pid, *job = text.split()
    if host == socket.gethostname():
        live = marker_process(text)
        return f"process {live} on this host" if live is not None else None
    int(pid)  # a marker's
    this_job = job[:1] == [os.environ.get("SLURM_JOB_ID")]
    if (this_job and this_job_gone) or (not this_job and time.time() - written > MARKER_STALE_S):
        return None
    return f"process {pid} on {host} (its marker refreshed {time.time() - written:.0f} s ago)"


def marker_process(text: str) -> int | None:
    """The live process of this host (not this one) that a ``.running`` marker's ``text`` names,
    else None; ValueError when the text is not a marker's ``<host> <pid> [<job>]``."""
    host, pid, *_ = text.split()
    pid_number = int(pid)
    if host != socket.gethostname() or pid_number == os.getpid():
        return None
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return pid_number


def override_key(override: str) -> str:
    """The config key an override sets (``+a.b=1``, ``~a.b`` -> ``a.b``)."""
    return override.partition("=")[0].lstrip("+~")


def under(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``key`` is one of ``prefixes`` or inside one (``logger.wandb.mode`` is under ``logger``)."""
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


#: what may differ between the overrides of a sweep's job and those its directory was started
#: with: what only presents a run (a sweep run again with ``logger=wandb``); not the hardware,
#: which the jobs of one sweep may differ in (``trainer.devices=1,2``)
SWEEP_JOB_IGNORES = ("extras", "logger", "tags", "callbacks.rich_progress_bar", "callbacks.model_summary")


def comparable(overrides: list[str], ignores: tuple[str, ...] | None = None) -> list[str]:
    """The overrides that make two commands the same run: all but those a resumed run may change
    (``RESUME_IGNORES``: the same command with ``logger=wandb`` or other ``tags`` continues its
    run), except ``ckpt_path``: a run started from ``ckpt_path=A`` is continued only by a command
    with the same ``ckpt_path``, never taken over by one without it or with another. ``ignores``:
    other keys to leave out instead."""
    ignored = tuple(key for key in RESUME_IGNORES if key != "ckpt_path") if ignores is None else ignores
    return sorted(o for o in overrides if not under(override_key(o), ignored))


def stamp_order(name: str) -> list[str | int]:
    """Sort key putting run stamps in the order they were made: numbers compare as numbers, so
    the same second's ``-10`` comes after its ``-9`` and a longer SLURM job id after a shorter."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def recorded_overrides(run_dir: Path, hydras: bool = False) -> list[str] | None:
    """The overrides a run directory was started with: the record train.py writes once the run
    is accepted (``overrides.yaml``), or with ``hydras`` Hydra's of the directory's last attempt
    (``.hydra/overrides.yaml``, written before anything is checked) where it has none; None
    without a readable one."""
    for saved in (run_dir / "overrides.yaml", *([run_dir / ".hydra" / "overrides.yaml"] if hydras else [])):
        if not saved.is_file():
            continue
        try:
            previous = OmegaConf.to_container(OmegaConf.load(saved))
        except Exception:  # an unreadable record is not a run's
            return None
        return [str(o) for o in previous] if isinstance(previous, list) else None
    return None


def same_overrides(
    run_dir: Path, overrides: list[str], hydras: bool = False, ignores: tuple[str, ...] | None = None
) -> bool:
    """Whether ``run_dir`` was started with ``overrides`` (``recorded_overrides``), up to those a
    resumed run may change (``comparable``; ``ignores``: other keys); compared redacted, as the
    records are."""
    from seqlab.utils.secrets import redact

    previous = recorded_overrides(run_dir, hydras)
    if previous is None:
        return False
    return comparable(redact(previous), ignores) == comparable(redact(list(overrides)), ignores)


def find_interrupted_run(runs_dir: Path, overrides: list[str]) -> Path | None:
    """The newest interrupted run in ``runs_dir`` started with the same overrides."""
    if not runs_dir.is_dir():
        return None
    for run_dir in sorted(runs_dir.iterdir(), key=lambda path: stamp_order(path.name), reverse=True):
        if is_interrupted(run_dir) and same_overrides(run_dir, overrides):
            return run_dir
    return None


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        items: dict[str, Any] = {}
        for key, value in node.items():
            items.update(flatten(value, f"{prefix}{key}."))
        return items or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def own_checkpoint(ckpt_path: Any, run_dir: Any) -> bool:
    """Whether ``ckpt_path`` lies in the run directory ``run_dir``, where resume=auto finds it: a
    run resuming itself. A checkpoint of another run only starts this one (its weights, optimizer
    and loops), not its decisions (the best so far, early stopping) nor its data files."""
    return ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to(Path(run_dir).resolve())


def resumes_own_run(trainer: Any) -> bool:
    """Whether ``trainer`` (fitting) resumes its own run (``own_checkpoint``)."""
    given = getattr(trainer, "ckpt_path", None) if trainer is not None else None
    return own_checkpoint(given, trainer.default_root_dir) if given is not None else False


#: values that name the same thing: Lightning's FSDP and DeepSpeed strategies, which runs before
#: 2026-11-25 were configured with, and seqlab's subclasses that save their directories atomically
RESUME_SAME = {
    "trainer.strategy._target_": {
        "lightning.pytorch.strategies.FSDPStrategy": "seqlab.utils.distributed.FSDPStrategy",
        "lightning.pytorch.strategies.DeepSpeedStrategy": "seqlab.utils.distributed.DeepSpeedStrategy",
    }
}


#: keys added to the configs after runs were saved with them absent, with the value that trains as
#: those runs did: an interrupted run resumes, a finished sweep job is kept, as before the key came
RESUME_ADDED = {
    "task.padding_patch": "end",
    "init_from": None,
    "init_exclude": [],
    # (runs before it decoded with 0; it changes decoding only, so they resume with the new default)
    "task.min_len": 1,
    "data.id_column": None,
    "data.fill_missing": None,
    "data.max_tokens": None,
}


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], ignores: tuple[str, ...] = RESUME_IGNORES
) -> list[str]:
    """``key: <saved> -> <current>`` for every key that differs, ``ignores`` left out."""
    old, new = flatten(saved), flatten(current)
    for key, value in RESUME_ADDED.items():
        if key in new and key not in old:
            old[key] = value
    for key, same in RESUME_SAME.items():
        for values in (old, new):
            if key in values:
                values[key] = same.get(values[key], values[key])
    keys = sorted(
        k
        for k in old.keys() | new.keys()
        if not under(k, ignores) and old.get(k, "<absent>") != new.get(k, "<absent>")
    )
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys]


def saved_differences(
    cfg: DictConfig, saved_config: Path, ignores: tuple[str, ...] = RESUME_IGNORES
) -> tuple[Any, list[str]]:
    """A run directory's saved configuration and how ``cfg`` differs from it (``config_differences``)."""
    from seqlab.utils.secrets import redact

    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_config))
    except Exception as error:
        raise ConfigError(
            f"{saved_config}: cannot read the saved configuration of this run directory: {error}"
        ) from None
    return saved, config_differences(saved, redact(OmegaConf.to_container(cfg, resolve=True)), ignores)


def finished_job(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The summary of a sweep job that already finished in ``run_dir`` with this configuration,
    or None. A sweep run again with its ``hydra.sweep.dir`` (``resume=auto``) resumes its killed
    jobs and keeps its finished ones as they are: they were refused ("holds a finished run"),
    each a failed job, and the sweep exited non-zero."""
    import json

    from seqlab.utils.distributed import in_multirun

    summary_file = run_dir / "summary.json"
    if not (in_multirun() and check_mode(cfg.get("resume", "auto")) == "auto" and summary_file.is_file()):
        return None
    if (
        not (run_dir / "config.yaml").is_file()
        or saved_differences(cfg, run_dir / "config.yaml", KEPT_IGNORES)[1]
    ):
        return None  # another configuration: resume_checkpoint refuses it, naming the differences
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """What this run does with ``run_dir`` (see the module docstring): the checkpoint to resume
    from, or None for a fresh start; ConfigError when the directory holds a run it must not touch.
    An explicit ``ckpt_path`` is where a run starts: an interrupted run that started from it
    continues from its own newest checkpoint, as any other."""
    from seqlab.utils.checkpoint_io import restore_set_aside
    from seqlab.utils.run import is_rank_zero

    mode = check_mode(cfg.get("resume", "auto"))
    saved_config = run_dir / "config.yaml"
    if not saved_config.is_file():
        return cfg.get("ckpt_path")
    if not is_rank_zero():  # rank 0 has checked this directory (and written into it): follow it
        checkpoint = newest_checkpoint(run_dir) if mode == "auto" else None
        return str(checkpoint) if checkpoint is not None else cfg.get("ckpt_path")
    live = running_process(run_dir)
    if live is not None:
        raise in_use(run_dir, live)
    if (run_dir / "summary.json").exists():
        raise ConfigError(
            f"{run_dir} holds a finished run (summary.json); it is left as it is. Train into a new "
            "directory (leave hydra.run.dir unset for a timestamped one, or give another); to go on "
            f"from its weights (its task and backbone), add ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'} "
            "to that command"
        )
    if mode == "never":
        raise ConfigError(
            f"{run_dir} already holds a run (config.yaml) and resume=never: choose another hydra.run.dir, "
            "or resume=auto to continue it (with its configuration)"
        )
    saved, differences = saved_differences(cfg, saved_config)
    if not isinstance(saved, dict) or not {"model", "data", "trainer"} <= saved.keys():
        raise ConfigError(
            f"{saved_config} is not a seqlab run's configuration (it has no model, data and trainer "
            "keys): this directory holds something else, left as it is; choose another hydra.run.dir"
        )
    if differences:
        shown = "; ".join(differences[:12]) + (
            f"; and {len(differences) - 12} more" if len(differences) > 12 else ""
        )
        raise ConfigError(
            f"{run_dir} holds an interrupted run with another configuration ({saved_config}): {shown}. "
            "resume=auto never mixes two configurations: run with the same settings to resume it, "
            "or start a fresh run in another directory: another hydra.run.dir (or, where none is given, "
            "resume=never: a new timestamped one)"
        )
    for path in restore_set_aside(run_dir / "checkpoints"):
        log.warning("%s: put back from where a crash during its replacement had left it", path)
    # a save killed while writing (SIGKILL, the OOM killer) leaves its whole-model temporary file:
    # one per pre-emption, piling up; no process of the run is alive (running_process above)
    for partial in sorted(p for p in (run_dir / "checkpoints").glob(".*.tmp") if p.is_file()):
        log.warning("%s: removed, a checkpoint save killed before it was complete", partial)
        partial.unlink(missing_ok=True)
    checkpoint = newest_checkpoint(run_dir)
    started_from = saved.get("ckpt_path") if isinstance(saved, dict) else None
    if checkpoint is not None and cfg.get("ckpt_path") and cfg.ckpt_path != started_from:
        raise ConfigError(
            f"{run_dir} holds an interrupted run started from ckpt_path={started_from!r}, and this one "
            f"asks for ckpt_path={cfg.ckpt_path!r}: run the same command to resume it (from its own "
            f"{checkpoint.name}), or train from {cfg.ckpt_path!r} into another directory"
        )
    if checkpoint is not None:  # its own progress, also for a run that started from ckpt_path
        log.info("resuming the interrupted run in %s from %s (resume=auto)", run_dir, checkpoint)
        before = (saved.get("trainer") or {}) if isinstance(saved, dict) else {}
        for key in ("devices", "num_nodes"):
            if key in before and before[key] != cfg.trainer.get(key):
                from seqlab.utils.checkpoint_io import is_deepspeed_checkpoint

                if checkpoint.is_dir() and is_deepspeed_checkpoint(checkpoint):
                    raise ConfigError(
                        f"{run_dir} holds an interrupted DeepSpeed run saved with trainer.{key}="
                        f"{before[key]}: DeepSpeed reads its optimizer partitions at that world size only; "
                        f"resume it with trainer.{key}={before[key]} (or convert the checkpoint with "
                        "DeepSpeed's universal-checkpoint tool and train from it with ckpt_path=)"
                    )
                log.info(
                    "trainer.%s: %s -> %s (the global batch stays data.batch_size)",
                    key,
                    before[key],
                    cfg.trainer.get(key),
                )
        return str(checkpoint)
    return cfg.get("ckpt_path")


def check_same_data_dir(saved: dict[str, Any], data: Any, ckpt_path: str) -> None:
    """A run resuming its own directory reads the files it read: the saved configuration holds
    ``data.data_dir`` as given (``../shared/data/sst2``), and the same command started from
    another directory (which resumes it) would resolve it elsewhere. ``saved``: the checkpoint's
    run information, whose data settings hold the absolute path; ``data``: this run's ``cfg.data``."""
    before, given = (saved.get("data") or {}).get("data_dir"), data.get("data_dir")
    now = str(Path(given).expanduser().resolve()) if given else None  # as the datamodules resolve it
    if before and now and Path(before) != Path(now):
        raise ConfigError(
            f"data.data_dir resolves to {now!r}, and the interrupted run it resumes ({ckpt_path}) read "
            f"{before!r}: a relative data.data_dir is taken from the directory the command starts in; "
            "start it where the run was started, give the path it read, or add resume=never for a fresh run"
        )


def reads_full_weights(strategy: Any, path: Path) -> bool:
    """Lightning's DeepSpeed strategy reads a checkpoint *file* (weights only) under ZeRO-3 with
    ``load_full_weights``; anything else it refuses, after the launch, on every process."""
    if not isinstance(strategy, dict | DictConfig):
        return False
    return path.is_file() and bool(strategy.get("load_full_weights")) and strategy.get("stage") == 3


def check_checkpoint_fits(ckpt_path: str, cfg: DictConfig) -> dict[str, Any] | None:
    """A checkpoint given to (or found for) a training run must hold this run's task and
    backbone: anything else is refused by name before any weight is loaded. Returns the
    checkpoint's run information (``load_run_info``: its tokenizers, which the resumed run encodes
    with); None for a DeepSpeed directory whose model-states file does not load safely (its
    strategy reads it, unchecked here)."""
    from seqlab.utils.checkpoint_io import (
        check_same_model,
        deepspeed_only,
        is_deepspeed_checkpoint,
        load_run_info,
        sharded_by,
    )
    from seqlab.utils.distributed import strategy_kind

    path = Path(ckpt_path)
    kind = strategy_kind(cfg.trainer.get("strategy", "auto"))
    deepspeed = path.is_dir() and is_deepspeed_checkpoint(path)
    # refused here, before the run starts: under trainer=fsdp* Lightning's own reader failed on
    # every process after the launch (another strategy reads FSDP and FSDP2 shards whole)
    if deepspeed and kind != "deepspeed":
        raise deepspeed_only(path)
    saved_by = sharded_by(path) if path.is_dir() and not deepspeed else None
    if kind == "deepspeed" and not deepspeed and not reads_full_weights(cfg.trainer.get("strategy"), path):
        what = "a directory" if path.is_dir() else "a file"
        what = what if saved_by is None else f"the shards of trainer={saved_by}"
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} holds {what}, not a DeepSpeed ZeRO checkpoint directory, which "
            "trainer=deepspeed* resumes from only: train on from it under trainer=ddp or trainer=fsdp2, "
            "or take a file's weights alone (no optimizer state) under trainer=deepspeed_stage_3 "
            "+trainer.strategy.load_full_weights=true"
        )
    if saved_by is not None and kind in ("fsdp", "fsdp2") and kind != saved_by:
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} holds the shards of trainer={saved_by}, which trainer={kind} cannot "
            f"read: train on from it under trainer={saved_by}, or under trainer=ddp (which reads it whole)"
        )
    try:
        info = load_run_info(path)
    except ConfigError as error:
        if not deepspeed:
            raise
        log.warning(
            "%s; resuming without checking it, and the data's tokenizer is rebuilt from the data", error
        )
        return None
    check_same_model(
        info, cfg, f"ckpt_path={ckpt_path!r}", "resume with the configuration the checkpoint was trained with"
    )
    if path.is_file() and cfg.get("train", True):  # (train=false tests it: weights alone do)
        import torch

        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if not {"optimizer_states", "loops"} <= set(saved):
            what = "an average of checkpoints" if info.get("averaged_from") else "weights saved without it"
            raise ConfigError(
                f"ckpt_path={ckpt_path!r} holds a model's weights alone ({what}): no optimizer, "
                f"schedule or loop state to train on from; start a run from its weights with "
                f"init_from={ckpt_path}, or test it with eval.py ckpt_path={ckpt_path}"
            )
    return info
