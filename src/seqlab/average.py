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

import itertools
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from seqlab.errors import ConfigError
from seqlab.utils.checkpoint_io import (
    consolidate_checkpoint,
    is_deepspeed_checkpoint,
    load_run_info,
    metadata_file,
    sharded_by,
)
from seqlab.utils.files import atomic_file

log = logging.getLogger(__name__)

#: the file name the ``recent_checkpoints`` callback gives each epoch's checkpoint
EPOCH_NAME = re.compile(r"^epoch_(\d+)\.ckpt$")
#: training state that belongs to one checkpoint's run, not to an average of several (Lightning's
#: weight averaging keeps the raw weights beside its average, which is ``state_dict``)
TRAINING_STATE = (
    "optimizer_states", "lr_schedulers", "loops", "callbacks", "seqlab_monitor_best", "seqlab_train_loss",
    "current_model_state", "averaging_state",
)  # fmt: skip
#: what the ``seqlab`` section records of a run's course, not of its model
RUN_RECORDS = ("summary_at_ends", "averaged_from", "run_dir")


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
        if path.is_file() or (path.is_dir() and (is_deepspeed_checkpoint(path) or sharded_by(path))):
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
    """Averaged element by element, the checkpoints must be of one model: for checkpoints saved
    before runs recorded their directory (``check_one_run``), the same task settings (the
    backbone, its width, the data's sizes and scaler), tokenizers and classes; for all, the same
    parameters and shapes."""
    ours, theirs = base["seqlab"].get("run_dir"), other["seqlab"].get("run_dir")
    if ours is None or theirs is None:
        for section, what in (("hyper_parameters", "model settings"), ("seqlab", "data and tokenizers")):
            mine, yours = (
                {k: v for k, v in (c.get(section) or {}).items() if k not in RUN_RECORDS}
                for c in (base, other)
            )
            if (key := first_difference(mine, yours)) is not None:
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


def check_output(output: Path) -> None:
    """``--output`` is a file to write, and never a run's checkpoint (``last.ckpt``, which
    ``resume=auto`` trains on from, ``best.ckpt``, which summary.json names, saved with or without
    the optimizer's state): replaced by an average, its run would lose it. An earlier average,
    or any other file, may be replaced."""
    if output.is_dir():
        raise ConfigError(f"--output {output} is a directory: name the checkpoint file to write")
    if output.is_file():
        try:
            existing = torch.load(output, map_location="cpu", mmap=True, weights_only=True)
        except Exception:  # not a checkpoint: any file may be replaced
            return
        averaged = isinstance(existing, dict) and (existing.get("seqlab") or {}).get("averaged_from")
        if isinstance(existing, dict) and "state_dict" in existing and not averaged:
            raise ConfigError(
                f"--output {output} is a checkpoint of a run (not an earlier average): replaced by the "
                "average, its run would lose it (last.ckpt resumes it, best.ckpt is its result); write "
                "to another file"
            )


def saved_position(path: Path) -> tuple[int, int]:
    """(epoch, global step) a checkpoint was saved at, read from its metadata alone (a sharded
    directory is not gathered for it)."""
    meta = torch.load(metadata_file(path, "checkpoint"), map_location="cpu", mmap=True, weights_only=True)
    return int(meta.get("epoch", -1)), int(meta.get("global_step", -1))


def check_one_run(paths: list[Path]) -> bool:
    """The checkpoints are of one run (``seqlab.run_dir``, kept by a resumed run): runs trained
    apart, even of one configuration and data, learned unrelated weights, whose average is no
    model. Checkpoints from before runs recorded it are compared by their settings instead
    (``check_same_model``). A foreign or corrupt file is named. Returns whether every one
    recorded its run."""
    runs: dict[str, Path] = {}
    recorded = True
    for path in paths:
        info = load_run_info(path, key="checkpoint")
        if info.get("averaged_from"):
            raise ConfigError(
                f"{path} is itself an average of {len(info['averaged_from'])} checkpoints: averaged "
                "again, its inputs would weigh unevenly; average the epoch checkpoints themselves"
            )
        run = info.get("run_dir")
        recorded = recorded and run is not None
        if run is not None:
            runs.setdefault(run, path)
    if len(runs) > 1:
        (one, first), (other, second) = list(runs.items())[:2]
        raise ConfigError(
            f"{second} is a checkpoint of the run {other}, {first} of {one}: only checkpoints of one "
            "run average into a model (runs trained apart, even of one configuration, learned "
            "unrelated weights); give checkpoints of one run"
        )
    return recorded


def average_checkpoints(inputs: list[Path], output: Path, last: int | None = None) -> dict[str, Any]:
    """Average the checkpoints ``inputs`` (expanded by ``expand_inputs``; ``last``: the latest
    ``last`` of them by epoch and step) into ``output``, written atomically. Floating-point
    tensors are averaged in float64 and stored in their own dtype; integer buffers (counters)
    are the latest checkpoint's. Sharded checkpoints are gathered one at a time, beside
    ``output``. Returns the checkpoint written."""
    if last is not None and last < 1:
        raise ConfigError(f"--last {last}: expected a positive number of checkpoints")
    paths = expand_inputs(inputs)
    output = output.expanduser().resolve()
    if output in paths:
        raise ConfigError(f"--output {output} is one of the checkpoints averaged: write to another file")
    check_output(output)
    one_run = check_one_run(paths)
    checkpoints = sorted((saved_position(path), path) for path in paths)
    for (position, first), (again, second) in itertools.pairwise(checkpoints):
        # best.ckpt beside the same epoch's epoch_NNN.ckpt: one set of weights
        if one_run and position == again:
            raise ConfigError(
                f"{first} and {second} were saved at the same point (epoch {position[0]}, step "
                f"{position[1]}): the same weights, which would weigh twice in the average; give one"
            )
    if last is not None:
        if last > len(checkpoints):
            raise ConfigError(
                f"--last {last}, but {len(checkpoints)} checkpoints were found: give --last "
                f"{len(checkpoints)} or fewer (a run keeps callbacks.recent_checkpoints.save_top_k epochs)"
            )
        checkpoints = checkpoints[-last:]
    if len(checkpoints) < 2:
        raise ConfigError(
            f"{len(checkpoints)} checkpoint ({', '.join(str(p) for _, p in checkpoints)}): nothing "
            "to average; give two or more"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".seqlab-average-", dir=output.parent) as scratch:
        gathered = Path(scratch) / "gathered.ckpt"

        def read(path: Path) -> dict[str, Any]:
            file = consolidate_checkpoint(path, gathered)
            return torch.load(file, map_location="cpu", weights_only=True)

        (_, base_path), others = checkpoints[-1], checkpoints[:-1]
        base = read(base_path)
        sums = {
            key: value.to(torch.float64, copy=True)
            for key, value in base["state_dict"].items()
            if value.is_floating_point()
        }
        for _, path in others:
            other = read(path)
            check_same_model(base, other, base_path, path)
            for key, total in sums.items():
                total += other["state_dict"][key].to(torch.float64)
            del other
    count = len(checkpoints)
    state = base["state_dict"]
    for key, total in sums.items():
        state[key] = (total / count).to(state[key].dtype)
    for key in TRAINING_STATE:
        base.pop(key, None)
    base["seqlab"]["averaged_from"] = [str(path) for _, path in checkpoints]
    with atomic_file(output) as tmp:
        torch.save(base, tmp)
    log.info(
        "averaged %d checkpoints (epochs %s) into %s",
        count,
        ", ".join(str(epoch) for (epoch, _), _ in checkpoints),
        output,
    )
    return base
