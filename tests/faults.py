"""Fault injection for the reliability tests: a callback that makes one rank fail mid-training."""

from __future__ import annotations

import os
import signal

import lightning as L


class FailOnRank(L.Callback):
    """At optimizer step ``step``, global rank ``rank`` raises (``how=raise``) or is killed
    with SIGKILL (``how=kill``), as a crash or an out-of-memory kill would."""

    def __init__(self, rank: int, step: int, how: str = "raise") -> None:
        self.rank, self.step, self.how = rank, step, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank or trainer.global_step < self.step:
            return
        if self.how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure on rank {self.rank} at step {trainer.global_step}")
