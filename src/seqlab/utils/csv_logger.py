"""A CSV logger that appends to the run's ``metrics.csv`` instead of losing it.

Lightning's writer deletes an existing ``metrics.csv`` when it is created and, when a second
writer (a ``ddp_spawn`` test stage, a resumed run) adds new columns, rewrites the file with its
own columns only and fails ("dict contains fields not in fieldnames"). This one keeps every row
and widens the header to the union of all columns, in a new file renamed over the old one.

It also writes less often. Lightning's Trainer calls ``save()`` after every ``log_metrics``, so its
CSV logger opens and appends to the file at every logging step (which makes its
``flush_logs_every_n_steps`` moot). Here ``save()`` writes the buffered rows when
``flush_interval_s`` seconds have passed since the last write (so at the first logging call
after that); rows are also written after every checkpoint, together with the row the step that
saved it logs next (the metrics up to a checkpoint are on disk whenever it is: a run resumed
from it never misses one), when the run ends, fails or is interrupted (Lightning's
``finalize``), and on ``flush()``. A killed process (SIGKILL, out of memory) loses the rows
logged since the last write; rows written after its last checkpoint are logged again by the
resumed run, and the later row of a step is the one that counts (``compare.read_curves``).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from seqlab.utils.files import atomic_file


class AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep the directory's files: it is the run directory, shared with the checkpoints."""

    def _existing_header(self) -> list[str]:
        if not self._fs.isfile(self.metrics_file_path):
            return []
        with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
            return next(csv.reader(handle), [])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        """The rows written so far under a widened header, into a new file renamed over the old
        one: Lightning's truncates the file and writes it again, so a failure in between (a full
        disk, a kill) left a header and no rows."""
        if not isinstance(self._fs, LocalFileSystem):  # an fsspec URL: no rename to do it with
            super()._rewrite_with_new_header(fieldnames)
            return
        path = Path(self.metrics_file_path)
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        with atomic_file(path) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)

    def save(self) -> None:
        if not self.metrics:
            return
        header = self._existing_header()
        keys = sorted(set(header) | set(self.metrics_keys) | set().union(*self.metrics))
        if header and keys != header:
            self._rewrite_with_new_header(keys)
        self.metrics_keys = keys
        with self._fs.open(self.metrics_file_path, mode="a" if header else "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            if not header:
                writer.writeheader()
            writer.writerows(self.metrics)
        self.metrics = []


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger`` with the appending writer above, writing at most every
    ``flush_interval_s`` seconds (0: at every ``save()``, as Lightning's), after every checkpoint
    and at the end of the run."""

    def __init__(self, *args: Any, flush_interval_s: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if flush_interval_s < 0:
            raise ValueError(f"CSVLogger: flush_interval_s must be >= 0 seconds, got {flush_interval_s}")
        self.flush_interval_s = flush_interval_s
        self._last_write = time.monotonic()

    @rank_zero_only
    def save(self) -> None:
        """Write the buffered rows if ``flush_interval_s`` has passed since the last write (the
        Trainer calls this after every ``log_metrics``)."""
        if time.monotonic() - self._last_write >= self.flush_interval_s:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        """Write the buffered rows now."""
        super().save()
        self._last_write = time.monotonic()

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        if self._experiment is not None:
            self.flush()
        # a step checkpoint is saved in the batch-end hooks, before that step's row is logged:
        # the next save() writes it, so a run resumed from the checkpoint has every row before it
        self._last_write = float("-inf")

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:  # None: a launcher process that logged nothing
            self.flush()

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
