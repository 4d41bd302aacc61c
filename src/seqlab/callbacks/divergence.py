"""Stop a diverged run with a clear error instead of training on NaN for the remaining epochs."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from seqlab.callbacks.run_stats import local_part
from seqlab.errors import SeqlabError

log = logging.getLogger(__name__)


class TrainingDiverged(SeqlabError, FloatingPointError):
    """The training loss became NaN or infinite (the job fails; in a sweep, its trial fails)."""


class DivergenceGuard(L.Callback):
    """Checks the training loss every ``every_n_steps`` optimizer steps (default: whenever
    Lightning logs, so the check adds no device synchronisation of its own), and the epoch's
    running loss before each validation while fitting: a loss that became NaN between two checks
    (and the weights with it) would otherwise reach the validation, whose non-finite metric early
    stopping takes as a reason to end the run normally. At both checks the weights decide: a loss
    that is not finite while the weights are (a step 16-mixed's gradient scaler skipped after an
    overflow, the weights untouched) is reported and training goes on; a diverged step leaves
    non-finite weights behind it (its NaN gradients were applied), and the run stops. The weights
    are read only when a loss is not finite. Steps that are all skipped (a float16 forward that
    overflows whatever the scale: the weights never change, the validation metric is NaN) stop
    the run after ``max_skipped`` such step checks in a row. The step check is taken where an
    optimizer step ended, never inside a gradient-accumulation window (its NaN gradients are
    not applied yet)."""

    def __init__(self, every_n_steps: int | None = None, max_skipped: int = 3) -> None:
        self.every_n_steps = every_n_steps
        self.max_skipped = max_skipped
        #: checks in a row that found a non-finite loss with finite weights
        self.skipped = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:  # fmt: skip
        every = self.every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % max(1, every) or trainer.fit_loop.epoch_loop._should_accumulate():
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.check_with_weights(trainer, pl_module, loss, f"at step {trainer.global_step}")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        running = (getattr(pl_module, "_train_loss", None) or {}).get("sum")  # SeqTask's, this epoch's
        where = f"at a step of epoch {trainer.current_epoch} before step {trainer.global_step}"
        # the epoch's running loss stays NaN after one skipped step: it does not count them
        self.check_with_weights(trainer, pl_module, running, where, counts=False)

    def check_with_weights(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Any, where: str, counts: bool = True) -> None:  # fmt: skip
        """Stop the run if ``loss`` is not finite on any process and the weights are not finite on
        any process either; a non-finite loss with finite weights is reported (and, ``counts``,
        counted towards ``max_skipped``). A step without a loss (manual optimisation) counts as
        finite; every process takes part, and every process stops together (a lone one left the
        others waiting)."""
        if not isinstance(loss, torch.Tensor) and trainer.world_size == 1:
            return
        if not self.diverged(trainer, loss):
            if counts:
                self.skipped = 0
            return
        # only the weights decide: a step skipped on an overflow left them as they were
        weights_bad = any(not bool(torch.isfinite(local_part(p)).all()) for p in pl_module.parameters())
        if trainer.world_size > 1:  # each process holds its shard (FSDP2, ZeRO-3), or the same weights
            weights_bad = trainer.strategy.reduce_boolean_decision(weights_bad, all=False)
        if weights_bad:
            self.stop(trainer, loss, where)
        if counts:
            self.skipped += 1
        if self.skipped >= self.max_skipped:
            self.stop(
                trainer, loss, f"{where}, at {self.skipped} checks in a row with finite weights: every step is "
                "skipped (under 16-mixed the forward overflows float16: use bf16-mixed or 32-true)",
            )  # fmt: skip
        log.warning(
            "the training loss was not finite %s, but the weights are finite (a skipped step): "
            "training goes on", where,
        )  # fmt: skip

    def diverged(self, trainer: L.Trainer, loss: Any) -> bool:
        """Whether ``loss`` is NaN or infinite on any process (a decision every process takes)."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else None
        diverged = value is not None and not math.isfinite(value)
        if trainer.world_size > 1:
            diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
        return diverged

    def stop(self, trainer: L.Trainer, loss: Any, where: str) -> None:
        """Raise TrainingDiverged, saying where and what this process saw."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else None
        lr = (
            f", learning rate {trainer.optimizers[0].param_groups[0]['lr']:.3g}" if trainer.optimizers else ""
        )
        if value is None or math.isfinite(value):
            here = f" (here {value:.4g})" if value is not None else ""
            what = f"not finite on another process{here}"
        else:
            what = str(value)
        raise TrainingDiverged(
            f"the training loss is {what} {where} (epoch {trainer.current_epoch}{lr}): "
            "lower task.optimizer.lr, keep trainer.gradient_clip_val, or check the data"
        )
