"""Checkpoints written atomically (a crash while saving never leaves a half-written file) and
read under any strategy: a sharded checkpoint directory loads into one process, and optimizer
states convert between torch's positional form (single process, DDP) and the by-name form of
``torch.distributed.checkpoint`` (FSDP, FSDP2), so training resumes across strategies."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from seqlab.errors import ConfigError
from seqlab.utils.files import atomic_file, fsync_directory


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file in the same directory, fsync, then rename over the target."""

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """A checkpoint file, or a sharded FSDP/FSDP2 directory gathered into one process; optimizer
        states in torch's positional form either way."""
        path = Path(path)
        if path.is_dir():
            return read_sharded_checkpoint(path)
        location = {} if map_location is None else {"map_location": map_location}
        checkpoint = super().load_checkpoint(path, weights_only=weights_only, **location)
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [
                optimizer_state_by_position(s) for s in checkpoint["optimizer_states"]
            ]
        return checkpoint

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        with atomic_file(Path(path)) as tmp, open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)


def save_directory_atomically(strategy: Any, path: Path, save: Callable[[Path], None]) -> None:
    """A sharded checkpoint (a directory every process writes its part of) written beside
    ``path`` first (``.<name>.partial``), then moved over it by rank 0 once every process has
    written: a process killed while saving leaves the previous checkpoint whole (the partial
    directory is cleared by the next save), where saving in place left a mix of two steps'
    shards that ``resume=auto`` then tried to load. The old one is renamed aside, the new one in,
    the old one removed: two renames in which a crash leaves ``.<name>.old`` and no ``path``,
    which then stays until the next checkpoint is in its place (a resumed run reads
    ``.last.ckpt.old`` there and puts the others back: ``restore_set_aside``)."""
    path = Path(strategy.broadcast(str(path)))
    partial = path.with_name(f".{path.name}.partial")
    if strategy.is_global_zero:
        remove_path(partial)  # left by a save that was killed
    strategy.barrier("seqlab.save_directory.start")
    save(partial)
    strategy.barrier("seqlab.save_directory.written")
    if strategy.is_global_zero:
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            remove_path(old)  # an earlier save's, its removal cut short: path is the whole one
            os.replace(path, old)
        # else a crash came between the two renames: old is the only whole checkpoint, kept
        # (resume=auto reads it) until the new one is in place
        os.replace(partial, path)
        fsync_directory(path.parent)
        remove_path(old)
    strategy.barrier("seqlab.save_directory.replaced")


def restore_set_aside(checkpoint_dir: Path, keep: tuple[str, ...] = ("last.ckpt",)) -> list[Path]:
    """Put back every sharded checkpoint a crash between ``save_directory_atomically``'s two
    renames left set aside (``.<name>.old``, no ``<name>``), but those named in ``keep``: a
    resumed run's best checkpoint is restored as ``best.ckpt``, where the run's ModelCheckpoint
    looks for it (it tested the current weights instead). Only a resumed run does this: until
    then ``eval.py`` wants the set-aside path itself.
    ``last.ckpt``'s is read where it lies (``newest_checkpoint``): the other processes of a run
    started together may be reading it."""
    restored = []
    for aside in sorted(checkpoint_dir.glob(".*.old")):
        path = aside.with_name(aside.name[1 : -len(".old")])
        if path.name not in keep and not path.exists():
            os.replace(aside, path)
            restored.append(path)
    return restored


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def consolidate_checkpoint(path: Path, output: Path) -> Path:
    """One ``torch.load``-able file for any checkpoint: a file is returned as is; a sharded
    checkpoint directory (FSDP/FSDP2 ``torch.distributed.checkpoint`` shards, or DeepSpeed ZeRO
    partitions) is gathered into ``output`` (weights and metadata, no optimizer state)."""

    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"ckpt_path={str(path)!r}: no such file or checkpoint directory")
    if is_deepspeed_checkpoint(path):
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        # every process of a multi-process eval.py converts: each renames a whole file into place
        with atomic_file(output) as tmp:
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(tmp))
        return output
    checkpoint = read_sharded_checkpoint(path)
    checkpoint.pop("optimizer_states", None)
    AtomicCheckpointIO().save_checkpoint(checkpoint, output)
    return output


def is_deepspeed_checkpoint(path: Path) -> bool:
    return (path / "latest").is_file() or (path / "checkpoint").is_dir()


def deepspeed_only(path: Path) -> ConfigError:
    """The refusal of a DeepSpeed directory to train on under another strategy."""
    return ConfigError(
        f"ckpt_path={str(path)!r} is a DeepSpeed ZeRO checkpoint: training resumes from it under "
        "trainer=deepspeed* only; eval.py and translate.py read its weights anywhere"
    )


def sharded_by(path: Path) -> str | None:
    """Which FSDP saved a ``torch.distributed.checkpoint`` directory: ``fsdp`` (Lightning's FSDP1
    keeps the weights under "model") or ``fsdp2`` (under "state_dict"); None if not such a one."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception:  # no .metadata: not a torch.distributed.checkpoint directory
        return None
    if any(key.startswith("model.") for key in keys):
        return "fsdp"
    return "fsdp2" if any(key.startswith("state_dict.") for key in keys) else None


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """The shape of every tensor of a checkpoint's weights: a file's ``state_dict`` (memory-mapped,
    nothing read but the index) or an FSDP/FSDP2 directory's metadata; None where not read here
    (DeepSpeed's)."""
    if path.is_file():
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        weights = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        return {key: tuple(value.shape) for key, value in (weights or {}).items() if hasattr(value, "shape")}
    kind = sharded_by(path) if path.is_dir() else None
    if kind is None:
        return None
    from torch.distributed.checkpoint import FileSystemReader

    prefix = "model." if kind == "fsdp" else "state_dict."
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {
        key.removeprefix(prefix): tuple(entry.size)
        for key, entry in metadata.items()
        if key.startswith(prefix) and hasattr(entry, "size")
    }


def weight_mismatch(saved: dict[str, tuple[int, ...]], built: dict[str, tuple[int, ...]]) -> str:
    """How a checkpoint's weight shapes (``saved``) differ from a model's (``built``), in one line
    (the first few by name); empty where every name and shape agrees."""
    differing = [
        f"{key}: {list(saved[key])} in the checkpoint, {list(built[key])} here"
        for key in sorted(saved.keys() & built.keys())
        if saved[key] != built[key]
    ]
    missing, unexpected = sorted(built.keys() - saved.keys()), sorted(saved.keys() - built.keys())
    shown = "; ".join(differing[:3]) + (f" (and {len(differing) - 3} more)" if len(differing) > 3 else "")
    counts = ", ".join(
        f"{len(names)} {what} (first {names[0]})"
        for names, what in ((missing, "not in the checkpoint"), (unexpected, "not in this model"))
        if names
    )
    return "; ".join(part for part in (shown, counts) if part)


def check_weights_fit(ckpt_path: str | Path, module: torch.nn.Module, resumed: bool = False) -> None:
    """A checkpoint to train on from must hold the weights of the model this run built: another
    width or depth (``model.d_model``, ``model.num_layers``) came out of Lightning's strict loading
    as a 70-line traceback after the run had started. ``resumed``: the checkpoint is the run's own,
    found by resume=auto with the configuration it saved, so the model's code changed since."""
    saved = saved_shapes(Path(ckpt_path))
    if not saved:
        return
    found = weight_mismatch(saved, {key: tuple(value.shape) for key, value in module.state_dict().items()})
    if found:
        if resumed:
            raise ConfigError(
                f"the interrupted run's {str(ckpt_path)!r} (resume=auto, its own configuration) holds "
                f"weights of another shape than the model this code builds: {found}. The model's code "
                "changed since it was saved: run the code it trained with to resume it, or start "
                "afresh with resume=never (a new directory)"
            )
        raise ConfigError(
            f"ckpt_path={str(ckpt_path)!r} holds weights of another shape than this run's model: "
            f"{found}. Give the model settings it was trained with (model.d_model, model.num_layers, "
            "model.size...: its run's config.yaml)"
        )


def check_same_model(info: dict[str, Any], cfg: Any, given: str, remedy: str) -> None:
    """A checkpoint (``info``: ``load_run_info``) that ``given`` (``ckpt_path=...``) names must hold
    the task and backbone this run (``cfg``) trains: anything else is refused by name, before any
    weight is loaded."""

    def backbone(target: Any, cell: Any) -> str:  # RNNBackbone (cell=gru): rnn, lstm and gru share a class
        return str(target).rsplit(".", 1)[-1] + (f" (cell={cell})" if cell is not None else "")

    saved = (
        info["task_target"].rsplit(".", 1)[-1],
        backbone(info.get("backbone_target"), info.get("backbone_cell")),
    )
    wanted = (
        cfg.task._target_.rsplit(".", 1)[-1],
        backbone(cfg.model._target_, cfg.model.get("cell") if "backbone_cell" in info else None),
    )
    if saved != wanted:
        raise ConfigError(
            f"{given} holds a {saved[0]} with a {saved[1]} backbone, but this run trains a {wanted[0]} "
            f"with a {wanted[1]} backbone (data=/model= choose them); {remedy}"
        )


def check_init_from(cfg: Any) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``init_from`` names, resolved, and its run information (``load_run_info``):
    refused by name before anything is written where it is not a seqlab checkpoint, holds another
    task or backbone, or was trained with a tokenizer this run's ``data.tokenizer`` settings
    contradict (the run encodes with the checkpoint's: its embeddings are of those tokens)."""
    path = Path(str(cfg.init_from)).expanduser().resolve()
    info = load_run_info(path, "init_from")
    given = f"init_from={str(cfg.init_from)!r}"
    check_same_model(info, cfg, given, "fine-tuning starts from weights of the task and backbone it trains")
    check_same_tokenizer(
        info, cfg.data, f"{given} is fine-tuned with it (its embeddings are of its tokens): give the "
        "settings it was trained with, or leave init_from unset for a tokenizer of this data's own",
    )  # fmt: skip
    return path, info


def init_patterns(value: Any) -> list[str]:
    """``init_exclude`` as a list of fnmatch patterns (one pattern may be given as a string)."""
    patterns = [value] if isinstance(value, str) else list(value or [])
    wrong = [pattern for pattern in patterns if not isinstance(pattern, str) or not pattern]
    if wrong:
        raise ConfigError(
            f"init_exclude: {wrong[0]!r} is not a pattern; expected weight names' fnmatch patterns, "
            "init_exclude=[head.*] or init_exclude='[head.*,*.bias]'"
        )
    return patterns


def load_initial_weights(path: Path, module: torch.nn.Module, exclude: list[str]) -> list[str]:
    """A fine-tuning run's start (``init_from``): the weights of the checkpoint ``path`` (a file, or
    a sharded directory of any strategy) loaded into ``module``, all but those whose names match a
    pattern of ``exclude`` (``init_exclude``, fnmatch patterns: ``head.*``), which keep their fresh
    initialisation. Nothing else is taken: the optimizer, its schedule, the epoch and step counts
    and the RNG start afresh (fairseq's ``--restore-file`` with ``--reset-optimizer
    --reset-lr-scheduler --reset-meters --reset-dataloader``; NeMo's ``init_from_*``): a pattern
    also leaves out the checkpoint's weights this model has not. A weight of another shape, one
    the checkpoint lacks or holds besides, a pattern that matches no weight of either, and one
    that splits tied weights are refused by name. Returns the names left at their initialisation."""
    state = module.state_dict(keep_vars=True)  # (tied weights: one Parameter under two names)
    built = {key: tuple(value.shape) for key, value in state.items()}

    def excluded(key: str) -> bool:
        return any(fnmatchcase(key, pattern) for pattern in exclude)

    tied: dict[int, list[str]] = {}
    for key, value in state.items():
        tied.setdefault(id(value), []).append(key)
    for names in tied.values():
        if len(names) > 1 and any(map(excluded, names)) and not all(map(excluded, names)):
            left, loaded = [n for n in names if excluded(n)], [n for n in names if not excluded(n)]
            raise ConfigError(
                f"init_exclude: {', '.join(left)} is one tensor with {', '.join(loaded)} (tied weights: "
                "task.share_embeddings, task.tie_output): loading the one fills the other; exclude all "
                "of them, or none"
            )
    with tempfile.TemporaryDirectory(prefix="seqlab-init-") as tmp:
        file = consolidate_checkpoint(path, Path(tmp) / "init.ckpt")  # a sharded directory gathered
        checkpoint = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        saved = checkpoint["state_dict"]
        unused = [p for p in exclude if not any(fnmatchcase(key, p) for key in (*built, *saved))]
        if unused:
            roots = sorted({key.split(".", 1)[0] for key in built})
            raise ConfigError(
                f"init_exclude: {unused[0]!r} matches no weight of this model or of init_from's, whose "
                f"weights are named {', '.join(f'{root}.*' for root in roots)} (fnmatch patterns of the "
                "state_dict's names: 'head.*', '*.bias')"
            )
        weights = {key: value for key, value in saved.items() if not excluded(key)}
        wanted = {key: shape for key, shape in built.items() if not excluded(key)}
        found = weight_mismatch({key: tuple(value.shape) for key, value in weights.items()}, wanted)
        if found:
            apart = (weights.keys() ^ wanted.keys()) | {
                key for key in weights.keys() & wanted.keys() if tuple(weights[key].shape) != wanted[key]
            }
            other = sorted({key.rsplit(".", 1)[0] + ".*" for key in apart})
            hint = (
                "Weights of another shape, or in one model only (a new number of classes, another "
                "horizon, another head), start afresh (or are left out) where init_exclude names them "
                f"(init_exclude=[{','.join(other)}]). "
                if 0 < len(other) <= 4
                else ""
            )
            raise ConfigError(
                f"init_from={str(path)!r} holds weights that do not fit this run's model: {found}. {hint}"
                "The other model settings must be those it was trained with (its run's config.yaml)"
            )
        module.load_state_dict(weights, strict=False)
    return sorted(key for key in built if excluded(key))


def read_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """An FSDP/FSDP2 checkpoint directory (``torch.distributed.checkpoint`` shards) as the dict an
    ordinary checkpoint file holds: full weights, metadata and ``optimizer_states`` in torch's
    positional form."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME, _load_distributed_checkpoint

    if is_deepspeed_checkpoint(path):
        raise deepspeed_only(path)
    if not (path / _METADATA_FILENAME).is_file():
        raise ConfigError(
            f"ckpt_path={str(path)!r} is a directory but not a sharded checkpoint (no {_METADATA_FILENAME} "
            "of an FSDP/FSDP2 checkpoint, no 'latest' of a DeepSpeed one)"
        )
    checkpoint = _load_distributed_checkpoint(path)
    if "state_dict" not in checkpoint and isinstance(checkpoint.get("model"), dict):
        # Lightning's FSDP1 saves the weights under "model" (FSDP2 under "state_dict")
        checkpoint["state_dict"] = checkpoint.pop("model")
    count = sum(1 for key in checkpoint if re.fullmatch(r"optimizer_\d+", key))
    if count:
        checkpoint["optimizer_states"] = [
            optimizer_state_by_position(checkpoint.pop(f"optimizer_{i}")) for i in range(count)
        ]
    return checkpoint


# ----------------------------------------------------------------- optimizer state layouts
# torch's ``Optimizer.state_dict()`` numbers the parameters in param_groups order and
# ``load_state_dict`` pairs the saved groups' numbers with the current groups' parameters by
# position. ``torch.distributed.checkpoint`` (FSDP, FSDP2) keys the same state by parameter name.
# Lightning converts between the two assuming ``module.parameters()`` order, which is wrong for
# any optimizer whose groups reorder the parameters (ours: weight decay / no weight decay), so
# the conversions below pair by the groups, as torch does.
def optimizer_state_by_position(state: dict[str, Any]) -> dict[str, Any]:
    """By-name optimizer state -> torch's positional form (unchanged if already positional)."""
    groups = state.get("param_groups", [])
    names = [name for group in groups for name in group["params"]]
    if not names or not isinstance(names[0], str):
        return state
    index = {name: i for i, name in enumerate(names)}
    return {
        **state,
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in groups],
    }


def saved_keys(groups: list[dict[str, Any]], sizes: list[int]) -> list[Any]:
    """The parameter keys of a saved optimizer's ``groups``, group after group, which pair with
    this run's optimizer's parameters (groups of ``sizes``) by position, as torch pairs them."""
    if [len(group["params"]) for group in groups] != sizes:
        raise ConfigError(
            "the checkpoint's optimizer has parameter groups of sizes "
            f"{[len(group['params']) for group in groups]}, this run's optimizer {sizes}: "
            "not the same model or optimizer configuration"
        )
    return [key for group in groups for key in group["params"]]


def optimizer_state_by_name(state: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """Positional optimizer state -> keyed by parameter name, pairing the saved groups with
    ``names`` (this run's optimizer's parameter names, group by group) as torch pairs them."""

    groups = state.get("param_groups", [])
    keys = saved_keys(groups, [len(group) for group in names])
    if keys and isinstance(keys[0], str):
        return state
    name_of = dict(zip(keys, (name for group in names for name in group)))
    return {
        **state,
        "state": {name_of[key]: value for key, value in state["state"].items()},
        "param_groups": [{**group, "params": list(group_names)} for group, group_names in zip(groups, names)],
    }


def optimizer_state_in_model_order(
    state: dict[str, Any], module: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Positional optimizer state -> numbered by each parameter's position in
    ``module.parameters()``, pairing the saved groups with ``optimizer``'s as torch pairs them:
    the numbering Lightning's FSDP loader reads (it re-keys by ``module.parameters()`` order). A
    file saved by one process or DDP numbers in the groups' order, one saved by FSDP or FSDP2 in
    the module's: both load right (by-name states are returned as they are)."""
    groups = state.get("param_groups", [])
    keys = saved_keys(groups, [len(group["params"]) for group in optimizer.param_groups])
    if not keys or isinstance(keys[0], str):
        return state
    position = {id(param): i for i, param in enumerate(module.parameters())}
    current = [param for group in optimizer.param_groups for param in group["params"]]
    number = {key: position[id(param)] for key, param in zip(keys, current)}
    return {
        **state,
        "state": {number[key]: value for key, value in state["state"].items()},
        "param_groups": [{**group, "params": [number[k] for k in group["params"]]} for group in groups],
    }


def optimizer_param_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The names of ``optimizer``'s parameters in ``module``, group by group."""
    name_of = {id(param): name for name, param in module.named_parameters()}
    return [[name_of[id(param)] for param in group["params"]] for group in optimizer.param_groups]


def metadata_file(ckpt_path: Path, key: str = "ckpt_path") -> Path:
    """The file of a checkpoint that holds its metadata (the ``seqlab`` section, the hyper-parameters):
    a checkpoint file itself; a sharded FSDP/FSDP2 directory's ``meta.pt``; a DeepSpeed
    directory's model-states file of its latest tag, where DeepSpeed keeps Lightning's
    checkpoint entries (ZeRO-3: ``zero_pp_rank_0_mp_rank_00_model_states.pt``). ``key``: the
    setting that named it, in the errors."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    if not ckpt_path.is_dir():
        if not ckpt_path.is_file():
            raise ConfigError(f"{key}={str(ckpt_path)!r}: no such file")
        return ckpt_path
    if is_deepspeed_checkpoint(ckpt_path):
        latest = ckpt_path / "latest"
        tag = latest.read_text().strip() if latest.is_file() else "checkpoint"
        # by name: MoE experts' files (layer_0_expert_0_mp_rank_00_model_states.pt) sort first
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
            if (ckpt_path / tag / name).is_file():
                return ckpt_path / tag / name
        raise ConfigError(
            f"{key}={str(ckpt_path)!r}: DeepSpeed checkpoint without {tag}/mp_rank_00_model_states.pt"
        )
    if not (ckpt_path / _METADATA_FILENAME).is_file():
        raise ConfigError(
            f"{key}={str(ckpt_path)!r} is a directory but not a sharded checkpoint (no {_METADATA_FILENAME})"
        )
    return ckpt_path / _METADATA_FILENAME


def given_checkpoint(cfg: Any, command: str, takes: tuple[str, ...] = ("data",)) -> Path:
    """The ``ckpt_path`` eval.py / translate.py were given, resolved; a clear ConfigError without
    one (OmegaConf's ``MissingMandatoryValue`` came as a traceback), for ``+model=`` /
    ``+task=``, which the checkpoint fixes (eval.py ran the checkpoint's model and recorded the
    given one in its config.yaml; a ``task`` in ``takes`` is checked by the command: eval.py's test
    settings), and for any other key added with ``+`` outside ``takes`` (a
    misspelt ``+inptu=``, the form Hydra's error asks for, was ignored)."""
    from omegaconf import OmegaConf

    from seqlab.utils.run import hydra_overrides

    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise ConfigError(
            f"ckpt_path: expected the checkpoint to use: python {command} "
            "ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt"
        )
    fixed = [  # (a taken ``task``: settings of its own, not a task: +task=<option> has a _target_)
        key
        for key in ("model", "task")
        if cfg.get(key) is not None and (key not in takes or "_target_" in cfg[key])
    ]
    if fixed:
        raise ConfigError(
            f"{', '.join(f'+{key}=' for key in fixed)}: the checkpoint fixes the model and the task; "
            f"{command} takes only data settings (+data.<key>=<value>, data_dir=)"
            + (" and the task's test settings (+task.beam_size=...)" if "task" in takes else "")
        )
    # (++key= adds or overrides; +group/option= a config group's option)
    roots = {o: re.split(r"[./=]", o.lstrip("+"))[0] for o in hydra_overrides() if o.startswith("+")}
    added = {override: root for override, root in roots.items() if root not in takes}
    if added:
        keys = ", ".join(
            k for k in OmegaConf.to_container(cfg) if k not in ("hydra", *added.values(), *takes)
        )
        raise ConfigError(
            f"{next(iter(added))}: not a key of {command}, which takes {keys}, and adds with a + only "
            "under " + ", ".join(f"{root}." for root in takes)
        )
    return Path(cfg.ckpt_path).expanduser().resolve()


def load_error_gist(err: BaseException) -> str:
    """What ``torch.load`` says went wrong, in one line: for a weights-only refusal the object it
    refused (``Unsupported global: GLOBAL numpy...scalar ...``), which names what to allow; else
    the message's first sentence."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    refused = re.search(r"WeightsUnpickler error: ([^\n]+?)(?:\. |\.?$)", text, re.MULTILINE)
    return refused[1] if refused else re.split(r"\.\s|\n", text, maxsplit=1)[0]


def load_run_info(ckpt_path: Path, key: str = "ckpt_path") -> dict[str, Any]:
    """The ``seqlab`` section every seqlab checkpoint carries (task class, data config, the
    tokenizers), with the backbone's class as ``backbone_target``; from a checkpoint file, or from
    the file of a checkpoint directory that holds it (``metadata_file``); a clear ConfigError for
    a missing, corrupt or foreign file."""
    source = metadata_file(ckpt_path, key)
    try:
        checkpoint = torch.load(source, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ConfigError(
            f"{key}={str(ckpt_path)!r} is not a readable checkpoint ({type(err).__name__}: "
            f"{load_error_gist(err)}): the file "
            "is truncated or corrupt, was not written by torch.save, or holds objects that cannot be "
            "loaded safely (seqlab loads checkpoints with weights_only=True)"
        ) from None
    info = checkpoint.get("seqlab") if isinstance(checkpoint, dict) else None
    if not info or "task_target" not in info or "data" not in info:
        raise ConfigError(
            f"{key}={str(ckpt_path)!r} was not written by seqlab's train.py (no 'seqlab' section)"
        )
    backbone = (checkpoint.get("hyper_parameters") or {}).get("backbone") or {}
    return {**info, "backbone_target": backbone.get("_target_"), "backbone_cell": backbone.get("cell")}


def data_settings(info: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's data settings with ``+data.*`` merged in key by key (``+data.tokenizer.x``
    changes that one setting; it replaced the whole tokenizer block, the rest falling back to the
    defaults). A checkpoint that carries its tokenizer encodes as the model was trained: a
    tokenizer setting that differs is refused by name rather than written in the run's record
    and ignored."""
    saved = info["data"]
    target = given.get("_target_")
    if target is not None and target != saved.get("_target_"):  # +data=sst2: another data module
        raise ConfigError(
            f"+data=: {str(target).rsplit('.', 1)[-1]} is not the data the checkpoint was trained on "
            f"({str(saved.get('_target_')).rsplit('.', 1)[-1]}); the checkpoint fixes the data module, "
            "whose settings change key by key (+data.<key>=<value>, data_dir=)"
        )
    merged = OmegaConf.to_container(OmegaConf.merge(saved, given))
    url, file = saved.get("url"), saved.get("file")
    if "file" in given and "url" not in given and url and given["file"] != file:
        # the saved URL is resolved (ETT's .../ETT-small/${.file}): another file fetched from it
        # would be the training file under the new name. Its own name where the URL's path ends
        # in the file's and the new one is a plain name, else none (a missing file is then
        # named, not fetched)
        from seqlab.utils.resolvers import ett_url

        parts, new = urllib.parse.urlsplit(str(url)), given["file"]
        base, _, name = parts.path.rpartition("/")
        plain = isinstance(new, str) and new and Path(new).name == new
        if url == ett_url(str(file)):  # ETDataset's: its four files only (data=ett's resolver)
            merged["url"] = ett_url(str(new))
        else:
            merged["url"] = parts._replace(path=f"{base}/{new}").geturl() if plain and name == file else None
    if "tokenizer" in given:
        check_same_tokenizer(info, merged, "evaluation does not change tokenizer settings")
    return merged


def check_same_tokenizer(info: dict[str, Any], data: dict[str, Any], why: str) -> None:
    """Refuse ``data.tokenizer`` settings other than those of a checkpoint that carries its
    tokenizers (``info``: ``load_run_info``): they would be recorded and ignored, the checkpoint's
    tokenizer encoding as the model was trained."""
    from seqlab.utils.resume import flatten  # resume imports the strategies: not at import time

    if not info.get("data_artifacts"):
        return
    # a setting left out keeps the checkpoint's (the config's defaults may have been filled in)
    saved = info["data"].get("tokenizer") or {}
    merged = OmegaConf.to_container(OmegaConf.merge(saved, data.get("tokenizer") or {}))
    before, after = flatten(saved), flatten(merged)
    changed = [f"data.tokenizer.{k}={after.get(k)!r} (trained with {before.get(k)!r})"
               for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]  # fmt: skip
    if changed:
        raise ConfigError(
            f"{', '.join(changed)}: the checkpoint's tokenizer, saved in it, encodes as the model was "
            f"trained; {why}"
        )
