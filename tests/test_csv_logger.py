"""seqlab's CSV logger: appends across writers, and writes on its own schedule instead of at every
logging step, without losing rows when the run ends, fails or checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from seqlab.utils import csv_logger
from seqlab.utils.csv_logger import CSVLogger


def rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_metrics_survive_a_second_writer(tmp_path: Path) -> None:
    """A resumed run or a spawned test stage appends to metrics.csv with new columns, losing nothing."""
    first = CSVLogger(save_dir=str(tmp_path), name="", version="")
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.flush()
    second = CSVLogger(save_dir=str(tmp_path), name="", version="")
    second.log_metrics({"test/mse": 0.5}, step=1)
    second.flush()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,test/mse,train/loss"
    assert lines[1:] == ["0,,1.0", "1,0.5,"]


def test_a_failure_while_widening_the_header_keeps_the_rows(tmp_path: Path, monkeypatch) -> None:
    """A new column rewrites metrics.csv under a wider header. Lightning's writer truncated the
    file first: a full disk (or a kill) there left the header alone, every earlier row lost."""
    logger = CSVLogger(save_dir=str(tmp_path), name="", version="", flush_interval_s=0)
    for step in range(100):
        logger.log_metrics({"train/loss": float(step)}, step=step)
        logger.save()
    path = tmp_path / "metrics.csv"
    before = path.read_bytes()
    writerows = csv.DictWriter.writerows

    def disk_full(self, rows):
        if len(rows) == 100:  # the rewrite of the rows written so far
            raise OSError(28, "No space left on device")
        return writerows(self, rows)

    monkeypatch.setattr(csv.DictWriter, "writerows", disk_full)
    logger.log_metrics({"val/loss": 0.5}, step=100)
    with pytest.raises(OSError, match="No space left"):
        logger.save()
    assert path.read_bytes() == before and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(csv.DictWriter, "writerows", writerows)
    logger.save()  # the disk has room again: the row is still buffered
    assert [r["step"] for r in rows(path)] == [str(step) for step in range(101)]
    assert rows(path)[-1]["val/loss"] == "0.5" and rows(path)[0]["val/loss"] == ""


def test_save_writes_only_when_the_interval_has_passed(tmp_path: Path, monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(csv_logger.time, "monotonic", lambda: clock[0])
    logger = CSVLogger(save_dir=str(tmp_path), name="", version="", flush_interval_s=5.0)
    path = tmp_path / "metrics.csv"
    for step in range(3):  # as the Trainer does: log, then save
        logger.log_metrics({"train/loss": float(step)}, step=step)
        logger.save()
        clock[0] += 1.0
    assert rows(path) == [], "written before the interval passed"
    clock[0] += 2.0  # 5 s since the logger started
    logger.log_metrics({"train/loss": 3.0}, step=3)
    logger.save()
    assert [r["train/loss"] for r in rows(path)] == ["0.0", "1.0", "2.0", "3.0"]
    logger.log_metrics({"train/loss": 4.0}, step=4)
    logger.save()
    assert len(rows(path)) == 4, "the interval restarts at each write"
    logger.finalize("success")
    assert [r["step"] for r in rows(path)] == ["0", "1", "2", "3", "4"]


def test_interval_zero_writes_at_every_save(tmp_path: Path) -> None:
    logger = CSVLogger(save_dir=str(tmp_path), name="", version="", flush_interval_s=0)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.save()
    assert len(rows(tmp_path / "metrics.csv")) == 1


def test_negative_interval_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="flush_interval_s must be >= 0 seconds, got -1"):
        CSVLogger(save_dir=str(tmp_path), flush_interval_s=-1)


class LoggingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        self.log("train/loss", output["loss"])
        return output


class FailAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("boom")


def fit(tmp_path: Path, callbacks: list, max_steps: int, logger: CSVLogger) -> L.Trainer:
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=max_steps, limit_val_batches=0, log_every_n_steps=1,
        logger=logger, callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(LoggingModel())
    return trainer


def test_a_failed_run_keeps_every_row_logged_before_the_failure(tmp_path: Path) -> None:
    logger = CSVLogger(save_dir=str(tmp_path), name="", version="", flush_interval_s=3600)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, [FailAt(7)], max_steps=20, logger=logger)
    logged = rows(tmp_path / "metrics.csv")
    # it fails in the batch-end hooks of the 7th step, before that step's row is logged
    assert [int(r["step"]) for r in logged] == list(range(6))
    assert all(float(r["train/loss"]) > 0 for r in logged)


def test_rows_are_on_disk_whenever_a_checkpoint_is(tmp_path: Path) -> None:
    """A run killed without a chance to finalize resumes from its last checkpoint with the metrics
    up to it in metrics.csv."""
    seen: list[tuple[int, int]] = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step and trainer.global_step % 4 == 0:  # the step after a checkpoint
                seen.append((trainer.global_step, len(rows(tmp_path / "metrics.csv"))))

    logger = CSVLogger(save_dir=str(tmp_path), name="", version="", flush_interval_s=3600)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(tmp_path, [checkpoint, Watch()], max_steps=12, logger=logger)
    # checkpoints run in the batch-end hooks, before that step's row is logged; that row is
    # written right after it, so a run resumed from the checkpoint misses no row
    assert seen == [(4, 4), (8, 8)]
    assert len(rows(tmp_path / "metrics.csv")) == 12
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 3
