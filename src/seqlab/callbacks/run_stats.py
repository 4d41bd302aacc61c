"""Training throughput and peak memory, measured for ``summary.json`` and the comparison report."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from torch.distributed.tensor import DTensor


def peak_host_memory_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def local_numel(param: torch.Tensor) -> int:
    """Elements this process holds: its shard under FSDP2 (DTensor) or ZeRO-3, else the whole tensor."""
    if isinstance(param, DTensor):
        return param.to_local().numel()
    partition = getattr(param, "ds_tensor", None)  # DeepSpeed ZeRO stage 3
    return partition.numel() if partition is not None else param.numel()


class RunStats(L.Callback):
    """Training samples per second (all processes, validation excluded), peak memory, and the
    parameters each process holds (sharding strategies hold a share)."""

    def __init__(self) -> None:
        self.parameters_per_rank: list[int] = []
        self.samples = 0
        self.train_seconds = 0.0
        self._epoch_start: float | None = None
        self._val_seconds = 0.0
        self._val_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        local = sum(local_numel(p) for p in pl_module.parameters())
        counts = trainer.strategy.all_gather(torch.tensor([local], device=pl_module.device))
        self.parameters_per_rank = [int(c) for c in counts.reshape(-1).tolist()]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._val_seconds = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.samples += extract_batch_size(batch) * trainer.world_size

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_start is not None and self._epoch_start is not None:
            self._val_seconds += time.perf_counter() - self._val_start
        self._val_start = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_start is not None:
            self.train_seconds += time.perf_counter() - self._epoch_start - self._val_seconds
        self._epoch_start = None

    @property
    def samples_per_second(self) -> float | None:
        return self.samples / self.train_seconds if self.train_seconds > 0 else None

    @staticmethod
    def peak_memory_mb() -> dict[str, float]:
        stats = {"peak_host_memory_mb": round(peak_host_memory_mb(), 1)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            stats["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return stats
