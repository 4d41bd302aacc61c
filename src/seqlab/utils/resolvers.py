"""OmegaConf resolvers used by the configs; registered when ``seqlab`` is imported."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf


def project_root() -> str:
    """The checkout holding ``configs/`` (this file lives in ``<root>/src/seqlab/utils``)."""
    env = os.environ.get("SEQLAB_ROOT")
    if env:
        return str(Path(env).resolve())
    root = Path(__file__).resolve().parents[3]
    return str(root if (root / "configs").is_dir() else Path.cwd())


def device_count(cpu_processes: int = 2) -> int:
    """Devices for a multi-process strategy: every visible GPU, else ``cpu_processes`` CPU processes."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else int(cpu_processes)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("project_root", project_root, replace=True)
    OmegaConf.register_new_resolver("device_count", device_count, replace=True)
