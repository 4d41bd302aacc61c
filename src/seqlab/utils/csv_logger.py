"""A CSV logger that appends to the run's ``metrics.csv`` instead of losing it.

Lightning's writer deletes an existing ``metrics.csv`` when it is created and, when a second
writer (a ``ddp_spawn`` test stage, a resumed run) adds new columns, rewrites the file with its
own columns only and fails ("dict contains fields not in fieldnames"). This one keeps every row
and widens the header to the union of all columns.
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep the directory's files: it is the run directory, shared with the checkpoints."""

    def _existing_header(self) -> list[str]:
        if not self._fs.isfile(self.metrics_file_path):
            return []
        with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
            return next(csv.reader(handle), [])

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
    """Lightning's ``CSVLogger`` with the appending writer above."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
