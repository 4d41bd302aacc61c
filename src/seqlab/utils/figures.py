"""Figures and tables: saved in the run directory and sent to every logger that can show them."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def log_figure(trainer: Any, fig: Any, key: str) -> Path | None:
    """Save ``fig`` as ``<run dir>/plots/<key>.png`` and log it to W&B / TensorBoard loggers."""
    import matplotlib.pyplot as plt

    path = Path(trainer.default_root_dir) / "plots" / f"{key.replace('/', '_')}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    for logger in trainer.loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
        elif name == "TensorBoardLogger":
            logger.experiment.add_figure(key, fig, global_step=trainer.global_step)
    plt.close(fig)
    return path


def log_table(trainer: Any, key: str, columns: list[str], rows: list[list[Any]]) -> Path:
    """Save rows as ``<run dir>/tables/<key>.csv``; log a W&B table / TensorBoard markdown text."""
    path = Path(trainer.default_root_dir) / "tables" / f"{key.replace('/', '_')}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    for logger in trainer.loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            logger.log_table(key=key, columns=columns, data=rows, step=trainer.global_step)
        elif name == "TensorBoardLogger":
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
            logger.experiment.add_text(key, "\n".join(lines), global_step=trainer.global_step)
    return path
