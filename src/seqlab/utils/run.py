"""The run directory's owner: what every run writes besides checkpoints and metrics.

Hydra creates the directory; these helpers fill it, on global rank 0 only:
``config.yaml`` (resolved), ``overrides.yaml``, ``git.txt`` and ``git.diff``, ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from seqlab.utils.files import write_json_atomic, write_text_atomic
from seqlab.utils.logging import process_rank
from seqlab.utils.secrets import redact, redact_text

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
PRINTED_GROUPS = ("data", "model", "task", "trainer", "callbacks", "logger", "paths", "extras")


def is_rank_zero() -> bool:
    return process_rank() == 0


#: untracked files copied into ``git.diff``: code and configs (what trains), sources and configs
#: first, each up to ``UNTRACKED_LIMIT`` bytes and ``UNTRACKED_BUDGET`` in all; the rest counted
UNTRACKED_SUFFIXES = (".py", ".yaml", ".yml")
UNTRACKED_LIMIT = 200_000
UNTRACKED_BUDGET = 1_000_000


def untracked_diff(root: Path, names: list[str]) -> str:
    """The untracked files ``names`` as new-file diffs, within the limits above; a line counts
    what was left out. A file that cannot be read (a dangling link) is left out, never an error."""
    ranked = sorted(names, key=lambda name: (not name.startswith(("src/", "configs/")), name))
    diff, spent, left = "", 0, 0
    for name in ranked:
        path = root / name
        try:
            size = path.lstat().st_size
        except OSError:
            size = None
        if size is None or not path.is_file() or path.suffix not in UNTRACKED_SUFFIXES:
            left += 1
            continue
        if size > UNTRACKED_LIMIT or spent + size > UNTRACKED_BUDGET:
            diff += f"# untracked {name}: {size} bytes, not copied (over the size limits)\n"
            continue
        spent += size
        # exit status 1: the files differ (always, against /dev/null)
        diff += subprocess.run(
            ["git", "diff", "--no-index", "--", "/dev/null", name],
            cwd=root, capture_output=True, text=True, timeout=20, check=False,
        ).stdout  # fmt: skip
    if left:
        diff += (
            f"# {left} other untracked file(s) not copied (only {', '.join(UNTRACKED_SUFFIXES)} files are)\n"
        )
    return diff


def git_info(root: Path) -> tuple[dict[str, Any], str]:
    """Commit, branch and dirty flag of the checkout, and its uncommitted diff: the tracked files'
    changes, and the untracked files (not ignored) as new files, e.g. a backbone of one's own
    under ``src/`` and its config (``git diff HEAD`` leaves them out, and with them what the run
    trained)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=True
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}, ""
    try:  # a slow or broken repository never stops a run
        branch = git("rev-parse", "--abbrev-ref", "HEAD").strip()
        status = git("status", "--porcelain")
        diff = git("diff", "HEAD")
        diff += untracked_diff(
            root, list(filter(None, git("ls-files", "--others", "--exclude-standard", "-z").split("\0")))
        )
    except (OSError, subprocess.SubprocessError) as err:
        return {"commit": commit, "error": f"{type(err).__name__}: {err}"}, ""
    return {"commit": commit, "branch": branch, "dirty": bool(status.strip()), "status": status}, diff


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """What a run's timings were measured on: the CPU model, this process's threads (intra-op, as
    ``OMP_NUM_THREADS`` or torch set them) and the machine's cores, the GPUs, the host."""
    import os

    import torch

    found: dict[str, Any] = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "cpu_cores": os.cpu_count(), "host": platform.node(),
    }  # fmt: skip
    if torch.cuda.is_available():
        found["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return found


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torch", "lightning", "hydra-core", "omegaconf", "torchmetrics", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def keep_earlier_git_record(run_dir: Path, record: str, diff: str) -> None:
    """A run resumed on other code than its earlier attempt's (another commit, other local
    changes: a requeued job after a ``git pull``) keeps that attempt's ``git.txt`` and
    ``git.diff`` as ``git.<n>.txt`` and ``git.<n>.diff`` (n = 1, 2, ... in order), and says so:
    overwritten, the record named only the last code, not the one most of the run may have
    trained with."""
    earlier, earlier_diff = run_dir / "git.txt", run_dir / "git.diff"
    checkpoints = run_dir / "checkpoints"
    if not earlier.is_file() or not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return  # nothing trained on the earlier code (refused while set up): nothing to keep
    before = earlier_diff.read_text(encoding="utf-8") if earlier_diff.is_file() else ""
    if earlier.read_text(encoding="utf-8") == record and before == diff:
        return
    n = 1
    while (run_dir / f"git.{n}.txt").exists():
        n += 1
    os.replace(earlier, run_dir / f"git.{n}.txt")
    if earlier_diff.is_file():
        os.replace(earlier_diff, run_dir / f"git.{n}.diff")
    log.warning(
        "this run resumes on other code than its earlier attempt (git.txt, git.diff): that attempt's "
        "record is kept as git.%d.txt%s",
        n,
        f" and git.{n}.diff" if before else "",
    )


def write_run_metadata(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Resolved config, command-line overrides and git state, credentials redacted
    (``seqlab.utils.secrets``); returns the git facts."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = redact(OmegaConf.to_container(cfg, resolve=True))
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    overrides = redact(hydra_overrides())
    write_text_atomic(run_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))
    write_text_atomic(run_dir / "cmd.txt", redact_text(" ".join([sys.executable, *sys.argv])) + "\n")
    info, diff = git_info(Path(cfg.paths.root_dir))
    record = "".join(f"{k}: {v}\n" for k, v in info.items() if k != "status")
    diff = redact_text(diff) if diff else ""
    keep_earlier_git_record(run_dir, record, diff)
    write_text_atomic(run_dir / "git.txt", record)
    if diff:
        write_text_atomic(run_dir / "git.diff", diff)
    else:  # a resumed run's tree is clean now: an earlier attempt's diff would contradict git.txt
        (run_dir / "git.diff").unlink(missing_ok=True)
    return {key: info.get(key) for key in ("commit", "dirty")}


def compose_config(config_name: str, overrides: Sequence[str], output_dir: Path) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with ``overrides`` as ``python train.py`` would,
    writing into ``output_dir`` (for tests and benchmarks that run the training path in-process)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from seqlab.utils.resolvers import project_root

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(project_root()) / "configs"), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        # not left to resolve: their run_stamp would take (create) a timestamped directory under
        # paths.log_dir, and with resume=auto look there for an interrupted run, for a run that
        # writes into output_dir (the resolved config is saved with the run)
        cfg.hydra.run.dir = str(output_dir)
        cfg.hydra.sweep.dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def task_name(target: str) -> str:
    """A task's name as ``task=`` chooses it (``forecasting``), from its class path
    (``seqlab.tasks.forecasting.ForecastingTask``): what summaries record and compare.py ranks by."""
    return target.rsplit(".", 1)[-1].removesuffix("Task").lower()


def hydra_choice(group: str) -> str | None:
    """The option chosen for a config group (``model=gru`` -> ``gru``), when Hydra composed the run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> Path:
    path = run_dir / SUMMARY_FILE
    write_json_atomic(path, summary)
    return path


#: ``read_summaries``' pattern for a run directory's own summary
SELF = "."


def read_summaries(sweep_dir: Path, jobs: str = "*") -> list[tuple[Path, dict[str, Any]]]:
    """Every job's summary below a multirun directory, in job order (``jobs=SELF``: the run
    directory's own)."""
    found = []
    for path in sorted(
        Path(sweep_dir).glob(f"{jobs}/{SUMMARY_FILE}"), key=lambda p: (len(p.parent.name), p.parent.name)
    ):
        try:
            found.append((path.parent, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as err:
            log.warning("skipping unreadable %s: %s", path, err)
    return found


# ----------------------------------------------------------------------------- console output
def print_config_tree(cfg: DictConfig, order: Sequence[str] = PRINTED_GROUPS) -> None:
    """The composed config as a rich tree, main groups first (rank 0 only)."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order and k != "hydra"]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        value = cfg[key]
        if isinstance(value, DictConfig):  # printed is logged too (SLURM's and submitit's output files)
            text = OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(value, resolve=True))))
        else:
            text = redact_text(str(value))
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    rich.print(tree)


def print_results(metrics: Mapping[str, float], baseline: Mapping[str, Mapping[str, float]]) -> None:
    """Final test metrics beside each naive baseline's, as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="test metrics", title_justify="left")
    table.add_column("metric")
    table.add_column("model", justify="right")
    for name in baseline:
        table.add_column(name, justify="right")
    for key, value in metrics.items():
        short = key.removeprefix("test/")
        cells = [f"{baseline[b][short]:.4f}" if short in baseline[b] else "" for b in baseline]
        table.add_row(short, f"{value:.4f}", *cells)
    Console().print(table)


def table_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys of ``rows`` in order, but those no row has a value for (an ``eval.py -m`` sweep's
    time and throughput: it trains nothing)."""
    return [
        key
        for key in dict.fromkeys(k for row in rows for k in row)
        if any(row.get(key) not in (None, "") for row in rows)
    ]


def print_table(rows: Sequence[Mapping[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    columns = table_columns(rows)
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(format_cell(row.get(c)) for c in columns))
    Console(width=max(120, 14 * len(columns))).print(table)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (cells formatted as on the console; ``|`` escaped)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
