"""Rank-aware logging: every rank logs to its own file in the run directory, only rank 0 to the console."""

from __future__ import annotations

import logging
import os


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
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
