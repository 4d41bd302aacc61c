"""Rank-aware logging: every rank logs to its own file in the run directory, only rank 0 to the console."""

from __future__ import annotations

import logging
import os
from pathlib import Path


def process_rank() -> int:
    """Global rank from the launcher's environment (torchrun, SLURM, Lightning's launcher)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):  # the order Lightning's rank_zero_only uses
        value = os.environ.get(key)
        if value is not None:
            return int(value)
    return 0


class RankZeroFilter(logging.Filter):
    """Attached to the console handler (configs/hydra/job_logging): one console line per message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return process_rank() == 0


class BelowWarning(logging.Filter):
    """The stdout console handler's: information there, warnings and errors on stderr (what
    ``2>errors.log`` keeps, and what a terminal still shows under ``> out.log``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


class NoAdvertisement(logging.Filter):
    """Lightning 2.6's "Tip: ... try installing litlogger / litmodels" lines, printed by every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def route_lightning_logs_to_root() -> None:
    """``import lightning`` gives its logger a console handler of its own; with Hydra's handlers on
    the root logger that prints every Lightning line twice (and on every rank). Drop it, so
    Lightning's records reach the console once (rank 0) and every rank's log file; without its
    advertisements (``NoAdvertisement``)."""
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, NoAdvertisement) for f in tips.filters):
        tips.addFilter(NoAdvertisement())
    if process_rank():  # a rank > 0's warnings to its log file, not the console again
        logging.captureWarnings(True)
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def job_logging_config() -> dict | None:
    """The logging configuration Hydra gave this process (``hydra/job_logging``), resolved; None
    outside Hydra. A spawned worker (``trainer=ddp_spawn``) inherits none of it."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    try:
        return OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True)
    except Exception:  # (a configuration Hydra itself could apply, but not resolvable from here)
        return None


def configure_worker_logging(config: dict | None, rank: int) -> None:
    """A spawned worker's logging, as ``trainer=ddp``'s ranks have it: ``job_logging_config``
    with rank 0 writing to the main process's log file and the console, and rank N > 0 to
    ``<job>_ddp_process_<N>.log`` only (the name Lightning's script launcher gives its ranks'
    jobs). Spawned workers logged through Lightning's own handler instead: every rank to stderr,
    unformatted, and nothing to any log file. Warnings are logged too (``py.warnings``), so a
    rank > 0 repeats none on the console."""
    import copy
    import logging.config

    if not config:
        return
    config = copy.deepcopy(config)
    handlers = config.get("handlers") or {}
    for name, handler in list(handlers.items()):
        filename = handler.get("filename")
        if filename and rank:
            path = Path(filename)
            handler["filename"] = str(path.with_name(f"{path.stem}_ddp_process_{rank}{path.suffix}"))
        elif not filename and rank:  # a console handler: rank 0's alone
            del handlers[name]
    root = config.get("root") or {}
    root["handlers"] = [name for name in root.get("handlers", []) if name in handlers]
    config["disable_existing_loggers"] = False
    logging.config.dictConfig(config)
    route_lightning_logs_to_root()
    if rank:
        logging.captureWarnings(True)
