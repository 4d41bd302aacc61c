"""Lightning's rich progress bar, without its per-step cost on small models."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar as LightningRichProgressBar


class RichProgressBar(LightningRichProgressBar):
    """``lightning.pytorch.callbacks.RichProgressBar`` whose training bar and metrics are updated
    at most every ``update_interval_s`` seconds (and always at an epoch's last batch), not after
    every batch. The screen is redrawn ``refresh_rate`` times a second either way, so the display
    is the same; Lightning's per-batch update (the bar's task, then every progress-bar metric
    read back and reformatted) costs ~0.1-0.2 ms per step, a few percent of a small model's step
    (``scripts/benchmark.py overhead``).

    It also shows the callback metrics named in ``show`` (``train/loss``), read when the bar
    updates: logged without ``prog_bar=True``, they are not converted to numbers after every step
    (Lightning does that for the last logged progress-bar values, a device synchronisation per
    step on a GPU).

    Args:
        update_interval_s: seconds between two updates of the training bar (0: every batch).
        show: callback metrics shown with the progress-bar metrics.
        *args, **kwargs: as for Lightning's ``RichProgressBar`` (``refresh_rate``, ``leave``, ``theme``, ...).
    """

    def __init__(
        self,
        *args: Any,
        update_interval_s: float = 0.25,
        show: Sequence[str] = ("train/loss",),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.update_interval_s = update_interval_s
        self.show = tuple(show)
        self._last_update = -math.inf

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float | dict[str, float]]:  # fmt: skip
        items = super().get_metrics(trainer, pl_module)
        for name in self.show:
            value = trainer.callback_metrics.get(name)
            if value is not None and name not in items:
                items[name] = float(value)
        return items

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._last_update = -math.inf

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:  # fmt: skip
        now = time.monotonic()
        last = batch_idx + 1 >= self.total_train_batches
        if now - self._last_update < self.update_interval_s and not last:
            return
        self._last_update = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


__all__ = ["RichProgressBar"]
