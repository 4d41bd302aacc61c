"""Checkpoints written atomically: a crash while saving never leaves a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file in the same directory, fsync, then rename over the target."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def consolidate_checkpoint(path: Path, output: Path) -> Path:
    """One ``torch.load``-able file for any checkpoint: a file is returned as is; a sharded
    checkpoint directory (FSDP/FSDP2 ``torch.distributed.checkpoint`` shards, or DeepSpeed ZeRO
    partitions) is gathered into ``output`` (weights and metadata, no optimizer state)."""
    from seqlab.errors import ConfigError

    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"ckpt_path={str(path)!r}: no such file or checkpoint directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    if (path / "latest").is_file() or (path / "checkpoint").is_dir():  # DeepSpeed
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        convert_zero_checkpoint_to_fp32_state_dict(str(path), str(output))
        return output
    from lightning.fabric.utilities.load import _METADATA_FILENAME, _load_distributed_checkpoint

    if not (path / _METADATA_FILENAME).is_file():
        raise ConfigError(
            f"ckpt_path={str(path)!r} is a directory but not a sharded checkpoint (no {_METADATA_FILENAME} "
            "of an FSDP/FSDP2 checkpoint, no 'latest' of a DeepSpeed one)"
        )
    checkpoint = _load_distributed_checkpoint(path)
    checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith("optimizer_")}
    AtomicCheckpointIO().save_checkpoint(checkpoint, output)
    return output
