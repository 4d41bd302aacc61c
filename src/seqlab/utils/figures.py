"""Figures: saved in the run directory and sent to every image-capable logger."""

from __future__ import annotations

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
