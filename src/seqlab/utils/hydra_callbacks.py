"""Hydra callbacks (configured under ``hydra.callbacks`` in configs/hydra/default.yaml)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from seqlab.utils.run import print_table, read_summaries, write_text_atomic

log = logging.getLogger(__name__)


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job: its overrides, final test metrics, time, throughput and size."""
    rows = []
    for job_dir, summary in read_summaries(sweep_dir):
        row: dict[str, Any] = {
            "job": job_dir.name,
            "overrides": " ".join(summary.get("overrides", [])),
            "model": summary.get("model"),
        }
        row.update({k.removeprefix("test/"): v for k, v in summary.get("metrics", {}).items()})
        for key in ("wall_s", "train_samples_per_s", "peak_memory_mb", "num_params"):
            row[key] = summary.get(key)
        rows.append(row)
    return rows


def write_sweep_table(sweep_dir: Path) -> list[dict[str, Any]]:
    """``sweep_summary.csv`` and ``sweep_summary.md`` in the sweep directory."""
    rows = sweep_rows(sweep_dir)
    if not rows:
        return rows
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (sweep_dir / "sweep_summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    write_text_atomic(sweep_dir / "sweep_summary.md", "\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    """After a multirun, tabulate every job's ``summary.json`` in the sweep directory."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_sweep_table(sweep_dir)
        if rows:
            print_table(rows, title=f"sweep {sweep_dir}")
            log.info("sweep summary: %s", sweep_dir / "sweep_summary.md")
        else:
            log.warning("no job of the sweep in %s wrote a summary.json", sweep_dir)
