"""Checkpoint averaging (fairseq's ``average_checkpoints.py``; Vaswani et al. 2017 averaged the
last 5-20 checkpoints): the parameters of several checkpoints of one model, averaged element by
element into one checkpoint that ``eval.py``, ``translate.py``, ``predict.py`` and ``init_from``
read like any other.

``python scripts/average_checkpoints.py <run dir> --last 5 --output avg.ckpt``: the run keeps its
last epochs' checkpoints with ``callbacks.recent_checkpoints.save_top_k=5`` (``epoch_NNN.ckpt``).
Files and sharded checkpoint directories can be given one by one as well.

The averaged checkpoint holds the model alone (no optimizer, scheduler or loop state: it does
not resume a run). Unlike ``callbacks.ema`` (an average kept at every step during training) it
costs nothing while training and can be tried on any run that kept its checkpoints.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from seqlab.errors import ConfigError
from seqlab.utils.checkpoint_io import consolidate_checkpoint, load_run_info, sharded_by
from seqlab.utils.files import atomic_file

log = logging.getLogger(__name__)

#: the file name the ``recent_checkpoints`` callback gives each epoch's checkpoint
EPOCH_NAME = re.compile(r"^epoch_(\d+)\.ckpt$")
#: training state that belongs to one checkpoint's run, not to an average of several
TRAINING_STATE = (
    "optimizer_states",
    "lr_schedulers",
    "loops",
    "callbacks",
    "seqlab_monitor_best",
    "seqlab_train_loss",
)


def recent_checkpoints(directory: Path) -> list[Path]:
    """The ``epoch_NNN.ckpt`` of a run directory (or of its ``checkpoints`` directory), by epoch."""
    folder = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    found = sorted(
        (int(match[1]), path) for path in folder.iterdir() if (match := EPOCH_NAME.match(path.name))
    )
    if not found:
        raise ConfigError(
            f"{folder}: no epoch_NNN.ckpt to average; keep the last N epochs' checkpoints while training "
            "with callbacks.recent_checkpoints.save_top_k=N, or give checkpoint files"
        )
    return [path for _, path in found]


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Checkpoint files and sharded checkpoint directories as given; any other directory stands for
    its epoch checkpoints (``recent_checkpoints``)."""
    paths: list[Path] = []
    for given in inputs:
        path = given.expanduser().resolve()
        if path.is_file() or (path.is_dir() and sharded_by(path)):
            paths.append(path)
        elif path.is_dir():
            paths.extend(recent_checkpoints(path))
        else:
            raise ConfigError(f"{given}: no such checkpoint file or directory")
    if len(set(paths)) != len(paths):
        repeated = next(p for p in paths if paths.count(p) > 1)
        raise ConfigError(f"{repeated} is given twice: each checkpoint would weigh twice in the average")
    return paths


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The first key (dotted) at which two nested settings differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{where}.{key}" if where else str(key)
            if key not in a or key not in b:
                return sub
            if (found := first_difference(a[key], b[key], sub)) is not None:
                return found
        return None
    return None if a == b else (where or "(the whole value)")


def check_same_model(base: dict[str, Any], other: dict[str, Any], base_path: Path, path: Path) -> None:
    """Averaged element by element, the checkpoints must be one model: the same task settings (the
    backbone, its width, the data's sizes and scaler), the same tokenizers and classes, the same
    parameters and shapes."""
    for section, what in (("hyper_parameters", "model settings"), ("seqlab", "data and tokenizers")):
        theirs, ours = other.get(section) or {}, base.get(section) or {}
        if section == "seqlab":  # what the runs reported at their ends is theirs alone
            theirs, ours = ({k: v for k, v in d.items() if k != "summary_at_ends"} for d in (theirs, ours))
        if (key := first_difference(ours, theirs)) is not None:
            raise ConfigError(
                f"{path} and {base_path} differ in their {what} ({section}.{key}): only checkpoints "
                "of one run average into a model (runs trained apart, even of one configuration, "
                "learned unrelated weights); give checkpoints of one run"
            )
    ours, theirs = base["state_dict"], other["state_dict"]
    if set(ours) != set(theirs):
        key = sorted(set(ours) ^ set(theirs))[0]
        raise ConfigError(f"{path} and {base_path}: parameter {key!r} is in one checkpoint only")
    for key, value in ours.items():
        if value.shape != theirs[key].shape:
            raise ConfigError(
                f"{path} and {base_path}: parameter {key!r} has shape {tuple(theirs[key].shape)} in one "
                f"and {tuple(value.shape)} in the other"
            )


def average_checkpoints(inputs: list[Path], output: Path, last: int | None = None) -> dict[str, Any]:
    """Average the checkpoints ``inputs`` (expanded by ``expand_inputs``; ``last``: the latest
    ``last`` of them by epoch and step) into ``output``, written atomically. Floating-point
    tensors are averaged in float64 and stored in their own dtype; integer buffers (counters)
    are the latest checkpoint's. Returns the checkpoint written."""
    paths = expand_inputs(inputs)
    output = output.expanduser().resolve()
    if output in paths:
        raise ConfigError(f"--output {output} is one of the checkpoints averaged: write to another file")
    with tempfile.TemporaryDirectory(prefix="seqlab-average-") as scratch:
        checkpoints = []
        for i, path in enumerate(paths):
            load_run_info(path, key="checkpoint")  # a foreign or corrupt file is named here
            file = consolidate_checkpoint(path, Path(scratch) / f"{i}.ckpt")
            checkpoint = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            checkpoints.append(((checkpoint.get("epoch", -1), checkpoint.get("global_step", -1)), path, file))
        checkpoints.sort(key=lambda item: item[0])
        if last is not None:
            if last < 1:
                raise ConfigError(f"--last {last}: expected a positive number of checkpoints")
            checkpoints = checkpoints[-last:]
        if len(checkpoints) < 2:
            raise ConfigError(
                f"{len(checkpoints)} checkpoint ({', '.join(str(p) for _, p, _ in checkpoints)}): nothing "
                "to average; give two or more"
            )
        (_, base_path, base_file) = checkpoints[-1]
        base = torch.load(base_file, map_location="cpu", weights_only=True)
        sums = {
            key: value.to(torch.float64)
            for key, value in base["state_dict"].items()
            if value.is_floating_point()
        }
        for _, path, file in checkpoints[:-1]:
            other = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            check_same_model(base, other, base_path, path)
            for key, total in sums.items():
                total += other["state_dict"][key].to(torch.float64)
        count = len(checkpoints)
        state = base["state_dict"]
        for key, total in sums.items():
            state[key] = (total / count).to(state[key].dtype)
    for key in TRAINING_STATE:
        base.pop(key, None)
    base["seqlab"]["averaged_from"] = [str(path) for _, path, _ in checkpoints]
    with atomic_file(output) as tmp:
        torch.save(base, tmp)
    log.info(
        "averaged %d checkpoints (epochs %s) into %s",
        count,
        ", ".join(str(epoch) for (epoch, _), _, _ in checkpoints),
        output,
    )
    return base
