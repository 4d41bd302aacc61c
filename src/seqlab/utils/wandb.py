"""Weights & Biases without prompts or hangs.

``mode: auto`` logs online only when an API key is configured *and* the W&B host answers
within a few seconds; otherwise the run is written offline in the run directory and the log says
how to ``wandb sync`` it later. Without this, W&B prompts for a key on a terminal (and blocks
forever without one) and, with a key but no network, hangs for about 100 s before giving up.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from seqlab.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")
#: the WANDB_MODE the process was started with (wandb_logger sets WANDB_MODE itself)
GIVEN_MODE = "SEQLAB_GIVEN_WANDB_MODE"
#: ``<run>/wandb_run_id``: the W&B run a resumed run continues
RUN_ID_FILE = "wandb_run_id"


def wandb_url():
    return urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")


def wandb_host() -> str:
    return wandb_url().hostname or "api.wandb.ai"


def wandb_port() -> int:
    """The W&B server's port: the base URL's own (a self-hosted ``wandb server`` on
    ``http://localhost:8080``), else its scheme's."""
    url = wandb_url()
    try:
        port = url.port
    except ValueError:  # not a number: left to wandb to refuse
        port = None
    return port or (80 if url.scheme == "http" else 443)


def proxied() -> bool:
    """Whether wandb reaches its server through a proxy: wandb's own ``WANDB_HTTP(S)_PROXY``, or
    the environment's (``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` for the server's URL,
    unless ``NO_PROXY`` covers it: hosts, ports, networks), read by ``requests``, which wandb
    uses. There the direct probe says nothing, and mode=auto skips it."""
    try:
        from requests.utils import get_environ_proxies, select_proxy  # installed with wandb
    except ImportError:  # no wandb either: nothing to reach
        return False
    url = wandb_url().geturl()
    scheme = "http" if wandb_url().scheme == "http" else "https"
    if os.environ.get(f"WANDB_{scheme.upper()}_PROXY"):
        return True
    return select_proxy(url, get_environ_proxies(url)) is not None


def has_api_key() -> bool:
    """A key in WANDB_API_KEY or in the netrc file that ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(wandb_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(mode: str) -> tuple[str, str | None]:
    """The W&B mode to use and, when it falls back to offline, why."""
    if mode not in MODES:
        raise ConfigError(f"logger.wandb.mode={mode!r}: expected one of {list(MODES)}")
    # the user's WANDB_MODE, not the one an earlier job of this multirun set (wandb_logger)
    env_mode = os.environ.get(GIVEN_MODE, os.environ.get("WANDB_MODE")) or None
    if mode == "auto" and env_mode in ("online", "offline", "disabled", "dryrun"):
        mode = "offline" if env_mode == "dryrun" else env_mode
        if mode != "online":
            return mode, None
    if mode != "auto" and mode != "online":
        return mode, None
    if not has_api_key():  # online without a key would prompt on stdin
        return "offline", "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    if mode == "auto" and not proxied() and not host_reachable(wandb_host(), wandb_port()):
        return "offline", f"{wandb_host()}:{wandb_port()} is not reachable"
    return "online", None


def wandb_logger(save_dir: str, mode: str = "auto", **kwargs: Any):
    """A Lightning ``WandbLogger`` whose mode is decided here; ``kwargs`` go to it (project, group, tags...)."""
    try:
        import wandb  # noqa: F401
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:
        raise ConfigError(
            "logger=wandb needs the wandb package: `pip install wandb` (or `make install`, which adds it)"
        ) from None
    from seqlab.utils.run import is_rank_zero

    if not is_rank_zero() and os.environ.get("WANDB_MODE") in MODES[1:]:
        resolved, reason = os.environ["WANDB_MODE"], None  # what rank 0 decided (only it logs to W&B)
    else:
        resolved, reason = resolve_mode(mode)
    # online only with a key, so wandb never asks for one on stdin
    os.environ.setdefault(GIVEN_MODE, os.environ.get("WANDB_MODE", ""))
    os.environ["WANDB_MODE"] = resolved
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if reason:
        log.warning(
            "W&B logs offline: %s. Upload later with: wandb sync %s/wandb/offline-run-*", reason, save_dir
        )
    if resolved != "online" and kwargs.get("log_model"):
        # Lightning's WandbLogger refuses log_model offline; the checkpoints stay in the run directory
        log.warning("W&B logs %s: logger.wandb.log_model is ignored (checkpoints are not uploaded)", resolved)
        kwargs["log_model"] = False
    if not kwargs.get("id") and not os.environ.get("WANDB_SWEEP_ID"):  # an agent's run id is the sweep's
        # the same W&B run for the same run directory: a resumed (requeued) run continues it
        # instead of appearing twice in its group
        kwargs["id"] = run_id(Path(save_dir))
        kwargs.setdefault("resume", "allow")
    logger = WandbLogger(save_dir=save_dir, offline=resolved == "offline", mode=resolved, **kwargs)
    # Lightning passes anonymous=None to wandb.init, which warns on every run that the setting
    # "has no effect and will be removed"
    init = getattr(logger, "_wandb_init", {})
    if init.get("anonymous", "") is None:
        del init["anonymous"]
    return logger


def run_id(run_dir: Path) -> str:
    """This run directory's W&B run id: read from ``wandb_run_id``, or drawn and written there."""
    from seqlab.utils.files import write_text_atomic
    from seqlab.utils.run import is_rank_zero

    path = run_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    drawn = uuid.uuid4().hex[:12]  # W&B run ids: letters and digits
    if is_rank_zero():  # the other ranks log nothing to W&B
        write_text_atomic(path, drawn + "\n")
    return drawn


def open_run(loggers: list[Any]) -> Any:
    """This job's open W&B run where it logs to W&B (``logger=wandb``, rank 0), else None."""
    if not any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        return None
    import wandb

    return wandb.run


def summarize_runs(loggers: list[Any], summary: dict[str, Any]) -> None:
    """The figures of ``summary.json`` in this job's W&B run summary (wall and fit time, peak
    memory, throughput, MFU, parameters, the baselines...), nested keys joined by ``/``: a sweep
    group's run table then holds what ``compare.py`` reads. The metrics are there already."""
    run = open_run(loggers)
    if run is None:
        return
    from seqlab.utils.resume import flatten

    flat = flatten({k: v for k, v in summary.items() if k not in ("metrics", "best")})
    run.summary.update(
        {
            key.replace(".", "/"): value
            for key, value in flat.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
    )


def finish_runs(loggers: list[Any], error: BaseException | None = None) -> None:
    """Close the W&B run of this job (train or eval), ended by ``error`` (None: it finished):
    marked failed, or preempted where ``error`` is Lightning's SIGTERMException (SLURM's
    pre-emption or time limit: the same command resumes it, into this W&B run; W&B shows it
    preempted, not failed, and requeues it in a W&B sweep). Lightning leaves the run open, and the
    next job of a multirun (same process) would then log into it instead of starting its own."""
    run = open_run(loggers)
    if run is None:
        return
    import wandb
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from seqlab.utils.distributed import STOPPED_BY_SIGTERM

    if isinstance(error, SIGTERMException):
        run.mark_preempting()
        wandb.finish(exit_code=STOPPED_BY_SIGTERM)  # as the process exits
    else:
        wandb.finish(exit_code=0 if error is None else 1)
