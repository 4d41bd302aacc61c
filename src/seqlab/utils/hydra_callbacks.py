"""Hydra callbacks (configured under ``hydra.callbacks`` in configs/hydra/default.yaml)."""

from __future__ import annotations

import atexit
import csv
import functools
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from seqlab.utils.files import atomic_file, write_text_atomic
from seqlab.utils.resolvers import sweep_group
from seqlab.utils.run import SUMMARY_FILE, markdown_table, print_table, read_summaries, table_columns
from seqlab.utils.secrets import redact_text, scrub_hydra_files, scrub_yaml

log = logging.getLogger(__name__)


ERROR_FILE = "error.txt"


def attempt_overrides(job_dir: Path) -> list[str]:
    """The overrides of a job's last attempt, as Hydra recorded them (redacted)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    return [redact_text(str(o)) for o in (OmegaConf.load(path) or [])] if path.is_file() else []


def job_overrides(job_dir: Path) -> str:
    return " ".join(attempt_overrides(job_dir))


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """``sweep_table``'s rows (its overrides joined)."""
    return sweep_table(sweep_dir)[0]


#: the status of a job whose summary.json is an earlier attempt's: the sweep run again failed
#: on it after it had finished (a changed config refused, ``logger=wandb`` added), and the table
#: keeps the earlier result
FAILED_AGAIN = "failed again (earlier result kept)"
#: the status of a job that failed after writing its summary.json, in the same attempt (another
#: rank failed after rank 0 finished, a search's objective missing, its loggers failing to close)
FAILED_AFTER_SUMMARY = "failed after its summary"


def error_line(job_dir: Path) -> str:
    """The first line of a job's ``error.txt``, credentials redacted (error messages quote values:
    a download URL with its password; files from before this was redacted on writing too)."""
    text = (job_dir / ERROR_FILE).read_text(errors="replace").strip()
    return redact_text(next(iter(text.splitlines()), "(no message)"))


def failure_after_summary(job_dir: Path) -> str | None:
    """For a job with a ``summary.json`` and a newer ``error.txt`` (an older one is an attempt
    that failed before the job was resumed and finished): ``FAILED_AGAIN`` when the summary is
    older than the attempt that failed (its ``.hydra`` files, written as each attempt starts),
    else (or without them) ``FAILED_AFTER_SUMMARY``; None when no failure came after the summary."""
    error, summary = job_dir / ERROR_FILE, job_dir / SUMMARY_FILE
    if not (error.is_file() and summary.is_file()):
        return None
    written = summary.stat().st_mtime_ns
    if error.stat().st_mtime_ns <= written:
        return None
    started = job_dir / ".hydra" / "overrides.yaml"  # (none with hydra.output_subdir=null: not told)
    if not started.is_file() or started.stat().st_mtime_ns <= written:
        return FAILED_AFTER_SUMMARY
    return FAILED_AGAIN


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep, in job order: Hydra's numbered ones, or whatever
    ``hydra.sweep.subdir`` names them (``${hydra.job.override_dirname}``), each with its ``.hydra``."""
    if not sweep_dir.is_dir():
        return []
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p.name.isdigit() or (p / ".hydra").is_dir())]
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def sweep_table(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """One row per job: its status, overrides, final test metrics, validation bests, time,
    throughput and size;
    a failed job (no summary.json) gets its error instead, and one that started training and
    ended with neither (killed: out of memory, a time limit) is listed as such; a job that
    failed after its summary was written keeps that result, with the error and
    ``failure_after_summary``'s status. And each row's overrides one by one (``'tags=[a, b]'``
    holds a space)."""
    from seqlab.utils.resume import running_process

    rows, overrides = [], []
    summaries = dict(read_summaries(sweep_dir))
    for job_dir in sweep_jobs(sweep_dir):
        summary = summaries.get(job_dir)
        if summary is None:
            if (job_dir / ERROR_FILE).is_file():
                overrides.append(attempt_overrides(job_dir))
                rows.append({"job": job_dir.name, "status": "failed", "overrides": " ".join(overrides[-1]),
                             "error": error_line(job_dir)})  # fmt: skip
            elif (job_dir / "config.yaml").is_file() and running_process(
                job_dir, this_job_gone=False
            ) is None:
                overrides.append(attempt_overrides(job_dir))
                rows.append({"job": job_dir.name, "status": "killed", "overrides": " ".join(overrides[-1]),
                             "error": "ended without a summary or an error (killed: out of memory, "
                                      "a time limit?); the sweep run again with this hydra.sweep.dir resumes it"})  # fmt: skip
            continue  # still running, or not a job
        # a summary without them (written before they were recorded): the job's own files
        given = summary.get("overrides")
        overrides.append([str(o) for o in given] if isinstance(given, list) else attempt_overrides(job_dir))
        row: dict[str, Any] = {"job": job_dir.name, "status": "ok", "overrides": " ".join(overrides[-1]),
                               "model": summary.get("model")}  # fmt: skip
        failure = failure_after_summary(job_dir)
        if failure is not None:
            row.update(status=failure, error=error_line(job_dir))
        row.update({k.removeprefix("test/"): v for k, v in summary.get("metrics", {}).items()})
        row.update(summary.get("best") or {})  # val/<monitor>_best: a search's objective (trials run no test)
        for key in ("wall_s", "train_samples_per_s", "peak_memory_mb", "num_params"):
            row[key] = summary.get(key)
        rows.append(row)
    return rows, overrides


def without_shared_overrides(
    sweep_dir: Path, rows: list[dict[str, Any]], given: list[list[str]]
) -> tuple[list[dict[str, Any]], str]:
    """The rows with the overrides every job was given taken out of theirs, and those (a
    search's fixed overrides, repeated on every row, made each wrap over many console lines).
    Whole overrides are compared (``'tags=[a, b]'`` holds a space), and only those on the
    sweep's command line (``multirun.yaml``) count as given to every job: a value each trial of
    a search happened to draw alike stays in its rows."""
    from seqlab.utils.resolvers import sweep_command_line

    if len(rows) < 2:
        return rows, ""
    command = sweep_command_line(str(sweep_dir))
    # compared as Hydra reads them: a job's record holds the value re-rendered (the command
    # line's extras.print_config=false is the job's extras.print_config=False)
    on_command = None if command is None else {canonical_override(o) for o in command}
    jobs = [{canonical_override(o) for o in overrides} for overrides in given]
    shared = [
        o
        for o in given[0]
        if all(canonical_override(o) in others for others in jobs[1:])
        and (on_command is None or canonical_override(o) in on_command)
    ]
    if not shared:
        return rows, ""
    alike = {canonical_override(o) for o in shared}
    own = [" ".join(o for o in overrides if canonical_override(o) not in alike) for overrides in given]
    return [{**row, "overrides": overrides} for row, overrides in zip(rows, own)], " ".join(shared)


@functools.lru_cache(maxsize=4096)
def canonical_override(override: str) -> str:
    """An override as Hydra parses it (``key=false`` and ``key=False`` alike, ``1e-3`` and
    ``0.001``); as written where Hydra's parser does not take it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_override(override)
        return f"{parsed.get_key_element()}={json.dumps(parsed.value(), sort_keys=True, default=str)}"
    except Exception:
        return override


def write_sweep_table(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """``sweep_summary.csv`` (every job's whole overrides) and ``sweep_summary.md`` (those every
    job shares once, above the table) in the sweep directory. Returns the rows, the rows as the
    table shows them and the shared overrides."""
    rows, overrides = sweep_table(sweep_dir)
    if not rows:
        return rows, rows, ""
    columns = table_columns(rows)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    # whole files only: under submitit every job's processes rewrite these at once
    write_text_atomic(sweep_dir / "sweep_summary.csv", table.getvalue())
    shown, shared = without_shared_overrides(sweep_dir, rows, overrides)
    header = f"Every job: `{shared}`\n\n" if shared else ""
    write_text_atomic(sweep_dir / "sweep_summary.md", header + markdown_table(shown, columns) + "\n")
    return rows, shown, shared


def job_error(job_return: JobReturn) -> BaseException | None:
    """The exception a failed job raised (``JobReturn.return_value`` re-raises it, after writing
    the job's overrides to stderr itself)."""
    error = job_return._return_value
    return error if job_return.status == JobStatus.FAILED and isinstance(error, BaseException) else None


class ScrubSecrets(Callback):
    """Hydra writes the config, its own and the overrides into ``<job>/.hydra`` (and a sweep's into
    ``multirun.yaml``) before the job starts, credentials included: they are redacted as the job
    starts, so a run refused before it trains (a missing GPU, a bad checkpoint) leaves none. A
    failed job's overrides are redacted as it ends: Hydra writes them to stderr with its error
    (its log lines are redacted by configs/hydra's log filters)."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra = config.hydra
        try:  # outside Hydra's error handling: a failure here would end the whole sweep
            if hydra.output_subdir is not None:
                scrub_hydra_files(Path(hydra.runtime.output_dir), hydra.output_subdir)
            if hydra.mode == RunMode.MULTIRUN:
                scrub_yaml(Path(hydra.sweep.dir) / "multirun.yaml")
        except Exception as error:
            log.warning("credentials not redacted in Hydra's config copies: %s", error)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.overrides is not None:
            job_return.overrides = [redact_text(str(o)) for o in job_return.overrides]


#: a run directory's record as a command found it: (directory, config.yaml's modification time,
#: Hydra's .hydra/*.yaml contents, the logs' sizes)
RunRecord = tuple[Path, int, dict[Path, bytes], dict[Path, int]]


def run_record(run_dir: Path) -> RunRecord | None:
    """``run_dir``'s record, where a run took it (its ``config.yaml``); else None."""
    record = run_dir / "config.yaml"
    if not record.is_file():
        return None
    hydra_files = {p: p.read_bytes() for p in sorted((run_dir / ".hydra").glob("*.yaml"))}
    logs = {p: p.stat().st_size for p in sorted(run_dir.glob("*.log"))}
    return run_dir, record.stat().st_mtime_ns, hydra_files, logs


def put_back(saved: RunRecord) -> None:
    """A run directory's Hydra record and logs as they were, unless this command's run took the
    directory (its ``config.yaml`` rewritten: a resumed run, which keeps its attempt's record)."""
    run_dir, written, hydra_files, logs = saved
    record = run_dir / "config.yaml"
    if not record.is_file() or record.stat().st_mtime_ns != written:
        return
    for path in (run_dir / ".hydra").glob("*.yaml"):
        if path not in hydra_files:
            path.unlink(missing_ok=True)
    for path, content in hydra_files.items():
        if not path.is_file() or path.read_bytes() != content:
            with atomic_file(path) as tmp:
                tmp.write_bytes(content)
    from seqlab.utils.resume import running_process

    if running_process(run_dir) is not None:
        return  # refused as in use: the live run writes on into its log
    for path in run_dir.glob("*.log"):
        if path not in logs:
            path.unlink(missing_ok=True)
        elif path.stat().st_size > logs[path]:
            with path.open("r+b") as handle:
                handle.truncate(logs[path])


class LeaveRefusedRunsAlone(Callback):
    """Hydra writes ``.hydra/*.yaml`` into the run directory, and opens its log file there, before
    the job runs: a command refused a directory that holds a run (``hydra.run.dir`` of a finished
    run, of one with another configuration) rewrote that run's record of its config and appended
    its refusal to the run's log. What they held is read as the command starts and put back as it
    exits if its run never took the directory (the run's own ``config.yaml`` untouched: a run
    that took it, and failed later, keeps its attempt's record). A directory named by the run stamp (the default,
    whose ``resume=auto`` lookup needs the job's Hydra config) is one this command chose for
    itself: left to it, as are DDP's other ranks. The same for the jobs of a sweep run again
    in its directory (``hydra.sweep.dir=``): a finished job kept as it is, or one refused, keeps
    its record (its ``.hydra/hydra.yaml`` held the new attempt's job number and overrides), put
    back as the sweep's process exits."""

    def __init__(self) -> None:
        self.saved: list[RunRecord] = []

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.saved = []
        given = OmegaConf.to_container(config.hydra.run, resolve=False).get("dir")
        self.remember(lambda: [Path(str(config.hydra.run.dir))], given)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.saved = []
        given = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("dir")
        self.remember(lambda: sweep_jobs(Path(str(config.hydra.sweep.dir))), given)

    def remember(self, run_dirs: Any, given: Any) -> None:
        from seqlab.utils.run import is_rank_zero

        if not is_rank_zero() or "run_stamp" in str(given):
            return
        try:
            self.saved = [record for run_dir in run_dirs() if (record := run_record(run_dir)) is not None]
            if self.saved:
                atexit.register(self.put_back)
        except Exception as error:  # never in the way of the run
            log.debug("run directories not recorded before the run: %s", error)

    def put_back(self) -> None:
        """At exit (a refused run ends in ``SystemExit``, which Hydra lets through: no
        ``on_run_end``; a sweep whose job failed ends in its error)."""
        for saved in self.saved:
            try:
                put_back(saved)
            except OSError as error:
                log.warning("%s: its record was not put back (%s)", saved[0], error)


#: what the SLURM launcher asks of SLURM for every job, read from the sweep's own config
SLURM_RESOURCE_KEYS = ("trainer", "trainer.devices", "trainer.num_nodes", "trainer.accelerator")


def check_slurm_resources(config: DictConfig) -> None:
    """Refuse a sweep over the trainer's devices under the SLURM launcher: submitit asks one set
    of resources for all the sweep's jobs, resolved from the sweep's config, where no job's own
    value is (``trainer.devices=1,4`` asked 1 GPU per node for both, and ``trainer=ddp`` jobs
    trained on fewer devices than they were given)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from seqlab.errors import ConfigError

    launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    if "submitit" not in launcher.lower() or "slurm" not in launcher.lower():
        return
    # the command line's sweeps and the basic sweeper's own params (an experiment's sweep)
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    lines = [*config.hydra.overrides.task, *(f"{key}={value}" for key, value in params.items())]
    swept = [
        o.input_line
        for o in OverridesParser.create().parse_overrides(lines)
        if o.is_sweep_override() and o.get_key_element().lstrip("+~") in SLURM_RESOURCE_KEYS
    ]
    if swept:
        raise ConfigError(
            f"{' '.join(swept)}: hydra/launcher=slurm asks SLURM for one set of resources for every "
            "job of a sweep (nodes, tasks and GPUs per node from the sweep's own trainer settings), "
            "so jobs cannot differ in them; run one sweep per trainer setting"
        )


class CloseJobLog(Callback):
    """A sweep job's log file (``<job>/train.log``, Hydra's job logging) closed when the job ends:
    Hydra leaves it attached until the next job replaces it, so what the sweep said after its
    last job (the table's path, the comparison report, the best Optuna trial, how to go on after
    a failure) went into that job's log as if the job had said it. Console only from then on.
    Listed first under ``hydra.callbacks``: Hydra calls ``on_job_end`` in reverse order, so the
    other callbacks' words about the job still reach its log."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            close_file_logs(Path(config.hydra.runtime.output_dir))


def close_file_logs(directory: Path) -> None:
    """Remove and close the root logger's file handlers that write inside ``directory``."""
    root = logging.getLogger()
    inside = directory.resolve()
    for handler in list(root.handlers):
        if (
            isinstance(handler, logging.FileHandler)
            and inside in Path(handler.baseFilename).resolve().parents
        ):
            root.removeHandler(handler)
            handler.close()


class SweepSummary(Callback):
    """Tabulate every job of a multirun in the sweep directory: updated after each job (so a
    sweep that stops early still has its table; a failed job leaves ``error.txt`` and a
    ``failed`` row) and printed at the end. A sweep the SLURM launcher cannot submit as asked is
    refused before its first job (``check_slurm_resources``)."""

    #: when this process's sweep started (``ran_here``)
    started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_slurm_resources(config)
        atexit.unregister(self.stopped)  # (an earlier multirun of this process)
        self.started = time.time()
        atexit.register(self.stopped, config)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        error = job_error(job_return)
        if error is not None:
            write_text_atomic(job_dir / ERROR_FILE, redact_text(f"{type(error).__name__}: {error}\n"))
        else:  # an earlier attempt's error (the sweep run again resumed the job, which finished)
            (job_dir / ERROR_FILE).unlink(missing_ok=True)
        write_sweep_table(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self.stopped)
        self.show(Path(config.hydra.sweep.dir))

    def show(self, sweep_dir: Path) -> None:
        rows, shown, shared = write_sweep_table(sweep_dir)
        if rows:
            print_table(shown, title=f"sweep {sweep_dir}" + (f" (every job: {shared})" if shared else ""))
            log.info("sweep summary: %s", sweep_dir / "sweep_summary.md")
        else:
            log.warning("no job of the sweep in %s wrote a summary.json", sweep_dir)

    def ran_here(self, job_dir: Path) -> bool:
        """Whether a job of this sweep started in ``job_dir`` (Hydra's record of it written since)."""
        record = job_dir / ".hydra" / "overrides.yaml"
        return record.is_file() and record.stat().st_mtime >= self.started - 1

    def stopped(self, config: DictConfig) -> None:
        """A sweep that ended before its last job (one failed: Hydra ends the sweep with its error
        and never calls ``on_multirun_end``; Ctrl-C): its table as it stands (it was written, but
        never shown nor named), and the command that goes on with it. A sweep refused before its
        first job (a misspelt key, a search space that cannot compose) leaves no directory behind:
        Hydra's ``multirun.yaml`` alone is taken back."""
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sweep_jobs(sweep_dir)
        if not jobs and sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
            (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
            sweep_dir.rmdir()
        started = [job for job in jobs if self.ran_here(job)]
        if not started:  # refused before its first job (another sweeper holds the search...)
            return
        self.show(sweep_dir)
        log.warning(
            "the sweep ended early (a job failed, or it was stopped): the same command with "
            "hydra.sweep.dir=%s runs its unfinished jobs again (those with a checkpoint resume) and "
            "keeps its finished ones",
            sweep_dir,
        )


class ParallelSweep(Callback):
    """Under the joblib launcher (``hydra/launcher=parallel``), tell the jobs what only the sweep's
    own process knows (``seqlab.utils.parallel.SWEEP_ENV``): its pid, so that a job in a worker
    process knows it runs beside others, and its entry point, with which a DDP job starts its
    other ranks (a worker's ``__main__`` is joblib's). The workers inherit it as they start."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from seqlab.utils.parallel import SWEEP_ENV, entry_command, joblib_launcher

        if joblib_launcher(OmegaConf.select(config, "hydra.launcher", default=None)):
            os.environ[SWEEP_ENV] = json.dumps({"pid": os.getpid(), "entry": entry_command()})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from seqlab.utils.parallel import SWEEP_ENV

        os.environ.pop(SWEEP_ENV, None)


class CompareReport(Callback):
    """After a multirun, write the comparison report (seqlab.compare) into the sweep directory
    (the ``experiment=compare_*`` configs enable it). Also when a job failed: Hydra then ends the
    sweep with the job's error and never calls ``on_multirun_end``, so the report is written as
    the process exits (of the jobs that finished, the failed ones listed; not sent to W&B, whose
    own exit handlers have run by then)."""

    def __init__(self) -> None:
        self.reported = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.reported = False
        atexit.register(self.report, config, False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self.report)  # the sweep ended: its report is written now
        self.report(config)

    def report(self, config: DictConfig, to_wandb: bool = True) -> None:
        from seqlab.compare import compare
        from seqlab.errors import SeqlabError

        if self.reported:
            return
        self.reported = True
        sweep_dir = Path(config.hydra.sweep.dir)
        wandb_cfg = (config.get("logger") or {}).get("wandb")
        wandb_init = None
        if wandb_cfg and to_wandb:  # the same table and plots, in the sweep's W&B group
            wandb_init = {
                "project": wandb_cfg.get("project"),
                "entity": wandb_cfg.get("entity"),
                "group": sweep_group(config.get("task_name", "train"), sweep_dir),
                "mode": wandb_cfg.get("mode", "auto"),
                "name": f"compare-{sweep_dir.name}",
            }
        try:
            report = compare(sweep_dir, wandb_init)
        except SeqlabError as err:
            log.warning("no comparison report: %s", err)
            return
        log.info("comparison report: %s", report)
