"""Strategies chosen by config: what the hardware allows, the strategy object, sweeps with DDP.

- ``check_hardware`` fails fast, before any data is prepared or process spawned, when the
  ``trainer=`` choice cannot run here, and says what does.
- ``build_strategy`` instantiates ``trainer.strategy``, filling FSDP's wrap and
  activation-checkpointing policies from the backbone's ``layer_classes``.
- ``SweepJobLauncher`` fixes DDP inside a Hydra multirun: Lightning's script launcher re-runs
  ``sys.argv``, i.e. the whole sweep, in every other rank (Lightning #18175, Hydra #2070,
  lightning-hydra-template #393). Here the other ranks re-run only the current job, with its
  overrides and into its directory, and ``finish_job`` tears the process group down so the next
  job starts a fresh one; a job that fails on any rank ends, and the sweep goes on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from typing import Any
from unittest import mock

import torch
from hydra.utils import get_class
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch import strategies
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf

from seqlab.errors import ConfigError, SeqlabError, instantiate
from seqlab.utils.logging import configure_worker_logging, job_logging_config
from seqlab.utils.precision import FSDPPrecision

log = logging.getLogger(__name__)

#: what runs on a machine without CUDA (the message of every GPU-only refusal lists them)
CPU_STRATEGIES = "trainer=cpu, trainer=ddp, trainer=ddp_spawn or trainer=fsdp2 (FSDP2 sharding over gloo)"
GPU_ONLY = {"fsdp": "FSDP (Lightning's FSDPStrategy)", "deepspeed": "DeepSpeed"}
STRATEGY_KINDS = {"FSDPStrategy": "fsdp", "DeepSpeedStrategy": "deepspeed", "ModelParallelStrategy": "fsdp2"}
#: environment variables Lightning (its launcher, DeepSpeed) sets in the launching process
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK")


def strategy_kind(strategy: Any) -> str:
    """``fsdp`` | ``deepspeed`` | ``fsdp2`` | a Lightning registry name (``ddp``, ``auto``...)."""
    if isinstance(strategy, str):
        for prefix in GPU_ONLY:
            if strategy.startswith(prefix):
                return prefix
        return strategy
    if isinstance(strategy, dict | DictConfig) and "_target_" in strategy:
        name = str(strategy["_target_"]).rsplit(".", 1)[-1]
        return STRATEGY_KINDS.get(name, name)
    return type(strategy).__name__ if strategy is not None else "auto"


def shards_parameters(strategy: Any) -> bool:
    """Whether each process holds only a shard of the parameters (FSDP, FSDP2, DeepSpeed ZeRO-3):
    then every forward is a collective, and the processes must run as many forwards as each other."""
    kinds = {STRATEGY_KINDS.get(cls.__name__) for cls in type(strategy).__mro__}
    return bool(kinds & {"fsdp", "fsdp2"}) or (
        "deepspeed" in kinds and bool(getattr(strategy, "zero_stage_3", False))
    )


def gather_indexed(pairs: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """(index, value) pairs of every process, sorted by index, each index once (a split smaller
    than the processes hands some examples to several). A collective: every process calls it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            everyone: list[Any] = [None] * world
            torch.distributed.all_gather_object(everyone, pairs)
            pairs = [pair for part in everyone for pair in part]
    return sorted(dict(pairs).items())


def check_device_count(value: Any, key: str, allow_auto: bool = True) -> None:
    """``trainer.devices``: a positive int, -1 or 'auto' (all), a list of device ids, or
    Lightning's string forms ("2", "0,1"); ``trainer.num_nodes``: a positive int. Anything else
    is refused before a run starts."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, bool):
        valid = False
    elif isinstance(value, int):
        valid = value >= 1 or (allow_auto and value == -1)
    elif isinstance(value, str):
        # "auto", "-1" (every device), a count ("2"), device ids ("0,1", "0,": device 0)
        valid = allow_auto and re.fullmatch(r"auto|-1|[1-9]\d*|\d+(,\d+)*,|\d+(,\d+)+", value) is not None
    elif isinstance(value, list):
        valid = allow_auto and bool(value) and all(isinstance(v, int) and v >= 0 for v in value)
    else:
        valid = False
    if not valid:
        expected = (
            "a positive integer, -1 or 'auto' (every device), or a list of device ids"
            if allow_auto
            else "a positive integer"
        )
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def check_hardware(cfg: DictConfig) -> None:
    """Refuse, with what to use instead, a ``trainer=`` choice this machine cannot run."""
    trainer = cfg.trainer
    strategy = trainer.get("strategy", "auto")
    kind = strategy_kind(strategy)  # a name, or the config of an instantiated strategy
    accelerator = str(trainer.get("accelerator") or "auto")
    check_device_count(trainer.get("devices"), "trainer.devices")
    check_device_count(trainer.get("num_nodes", 1), "trainer.num_nodes", allow_auto=False)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind in GPU_ONLY and not gpus:
        raise ConfigError(
            f"trainer.strategy: {GPU_ONLY[kind]} needs CUDA GPUs and none is visible here "
            f"(Lightning refuses it on CPU). On this machine use {CPU_STRATEGIES}."
        )
    if kind in GPU_ONLY and accelerator == "cpu":  # (debug=*, experiment=*_cpu set it)
        raise ConfigError(
            f"trainer.strategy: {GPU_ONLY[kind]} needs CUDA GPUs, but trainer.accelerator='cpu'; "
            f"on the CPU use {CPU_STRATEGIES}, or set trainer.accelerator=gpu"
        )
    if kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "trainer.strategy: DeepSpeed is an optional dependency and is not installed: "
            "pip install -e '.[deepspeed]' (or use trainer=fsdp / trainer=fsdp2)"
        )
    if accelerator in ("gpu", "cuda") and not gpus:
        raise ConfigError(
            f"trainer.accelerator={accelerator!r} but no CUDA GPU is visible here; "
            f"use trainer.accelerator=cpu or {CPU_STRATEGIES}"
        )
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not gpus)
    devices = trainer.get("devices")
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int):  # check_device_count has refused booleans
        available, unit = (os.cpu_count() or 1, "CPU cores") if on_cpu else (gpus, "GPU(s)")
        if devices > available:
            advice = " (one process per core at most)" if on_cpu else ""
            raise ConfigError(
                f"trainer.devices={devices} but this machine has {available} {unit}{advice}: "
                f"use trainer.devices={available} or fewer"
            )


def gpu_trainer(accelerator: Any = "auto") -> bool:
    """Whether a trainer on ``accelerator`` (``trainer.accelerator``) trains on CUDA GPUs here:
    ``gpu``/``cuda``, or ``auto`` when one is visible."""
    accelerator = str(accelerator or "auto").lower()
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def process_count(trainer_cfg: DictConfig | dict) -> int:
    """Processes a trainer config starts: ``devices`` (a count, a list of ids, or -1 / "auto": every
    GPU here, or on CPU -1 every core and "auto" one process, as Lightning counts them) times
    ``num_nodes``."""
    devices, nodes = trainer_cfg.get("devices", "auto"), trainer_cfg.get("num_nodes", 1)
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    elif isinstance(devices, str) and "," in devices:  # Lightning's "0,1": device ids
        devices = [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, list | tuple | ListConfig):
        per_node = len(devices)
    elif isinstance(devices, int) and devices > 0:
        per_node = devices
    else:
        if gpu_trainer(trainer_cfg.get("accelerator", "auto")):
            per_node = max(torch.cuda.device_count(), 1)
        else:
            per_node = (os.cpu_count() or 1) if devices == -1 else 1
    return per_node * (nodes if isinstance(nodes, int) and nodes > 0 else 1)


def build_strategy(
    trainer_cfg: DictConfig, model_cfg: DictConfig | None, batch_size: int | None = None
) -> Any:
    """``trainer.strategy`` as Lightning takes it: a registry name, or an instantiated object.

    For FSDP, ``auto_wrap_policy: null`` becomes one unit per backbone layer class and
    ``checkpoint_layers: true`` recomputes those layers' activations in the backward pass.
    For DeepSpeed, ``logging_batch_size_per_gpu: auto`` becomes each process's share of the global
    ``batch_size`` (``data.batch_size``): Lightning's ``auto`` reads the training loader's
    ``batch_sampler.batch_size``, and seqlab's loaders hand out whole batches (``batch_size=None``,
    no batch sampler), so ``auto`` would fail in DeepSpeed's setup.
    """
    strategy = trainer_cfg.get("strategy", "auto")
    if isinstance(strategy, str) and strategy_kind(strategy) in GPU_ONLY:
        # Lightning's registry entry: its FSDP plugin refuses to clip by norm at the first step,
        # its DeepSpeed `auto` batch size fails with seqlab's loaders, and neither saves whole
        kind = strategy_kind(strategy)
        raise ConfigError(
            f"trainer.strategy={strategy}: Lightning's own {GPU_ONLY[kind]} strategy does not run "
            "seqlab's tasks as configured; choose trainer=fsdp, trainer=fsdp2, trainer=deepspeed, "
            "trainer=deepspeed_stage_3 or trainer=deepspeed_offload and override its keys "
            "(trainer.strategy.<key>=...)"
        )
    if not OmegaConf.is_config(strategy):
        return strategy
    kwargs = OmegaConf.to_container(strategy, resolve=True)
    kind = strategy_kind(kwargs)
    if kind == "deepspeed" and kwargs.get("logging_batch_size_per_gpu", "auto") == "auto":
        processes = process_count(trainer_cfg)
        kwargs["logging_batch_size_per_gpu"] = max(1, (batch_size or processes) // processes)
    if kind == "fsdp2" and kwargs.get("data_parallel_size") is None:
        # every process shards (Lightning's "auto" would shard within a node only and make the
        # devices of a node tensor-parallel)
        kwargs["data_parallel_size"] = process_count(trainer_cfg) // kwargs.get("tensor_parallel_size", 1)
    if kind == "fsdp":
        backbone_cls = get_class(model_cfg._target_) if model_cfg is not None else None
        layers = set(getattr(backbone_cls, "layer_classes", ())) or None
        if kwargs.get("auto_wrap_policy") is None:
            kwargs["auto_wrap_policy"] = layers
        if kwargs.pop("checkpoint_layers", False) and kwargs.get("activation_checkpointing_policy") is None:
            kwargs["activation_checkpointing_policy"] = layers
        fsdp = instantiate(kwargs)
        fsdp.precision_plugin = FSDPPrecision(trainer_cfg.get("precision"), fsdp)  # clips by norm
        return fsdp
    return instantiate(kwargs)


class SavesShardsAtomically:
    """A strategy whose sharded checkpoint (a directory every process writes its part of) replaces
    the previous one only once every process has written
    (``seqlab.utils.checkpoint_io.save_directory_atomically``): Lightning's strategies write into
    it in place, so a process killed while saving left two steps' shards under ``last.ckpt``.
    Mixed in before the Lightning strategy; ``saves_sharded`` says whether this one shards."""

    def saves_sharded(self) -> bool:
        raise NotImplementedError

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        from pathlib import Path

        from seqlab.utils.checkpoint_io import save_directory_atomically

        base = super()
        if not self.saves_sharded():
            base.save_checkpoint(checkpoint, filepath, storage_options)  # one file, written atomically
            return
        save_directory_atomically(
            self, Path(filepath), lambda part: base.save_checkpoint(checkpoint, part, storage_options)
        )


class FSDPStrategy(SavesShardsAtomically, strategies.FSDPStrategy):
    """Lightning's FSDP strategy (``trainer=fsdp``); ``state_dict_type: sharded`` checkpoints are
    written atomically (``SavesShardsAtomically``), and a checkpoint *file* resumes whoever saved
    it: Lightning reads a positional optimizer state as numbered in ``module.parameters()`` order,
    which FSDP's and FSDP2's files are, but one process's and DDP's are numbered in the order of
    the optimizer's groups (ours reorder the parameters: weight decay or none), and their Adam
    moments went to the wrong parameters; they are numbered anew here, pairing the saved groups
    with this run's as torch does."""

    def saves_sharded(self) -> bool:
        return self._state_dict_type == "sharded"

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # Lightning reads a full checkpoint file and loads its optimizer states inside this one
        # call (its load_optimizer_state_dict does nothing): the file's states are renumbered as
        # they are read, before its re-keying by module order
        from lightning.pytorch.strategies import fsdp as lightning_fsdp

        from seqlab.utils.checkpoint_io import optimizer_state_in_model_order

        read = lightning_fsdp._lazy_load

        def read_renumbered(path: Any, *args: Any, **kwargs: Any) -> Any:
            checkpoint = read(path, *args, **kwargs)
            states = checkpoint.get("optimizer_states")
            if states and self.lightning_module.trainer.state.fn == TrainerFn.FITTING and self.optimizers:
                checkpoint["optimizer_states"] = [
                    optimizer_state_in_model_order(state, self.model, optimizer)
                    for state, optimizer in zip(states, self.optimizers)
                ]
            return checkpoint

        with mock.patch.object(lightning_fsdp, "_lazy_load", read_renumbered):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


class DeepSpeedStrategy(SavesShardsAtomically, strategies.DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy (``trainer=deepspeed*``); its checkpoints, always directories
    of ZeRO partitions, are written atomically (``SavesShardsAtomically``)."""

    def saves_sharded(self) -> bool:
        return True


class ModelParallelStrategy(SavesShardsAtomically, strategies.ModelParallelStrategy):
    """Lightning's FSDP2 strategy (``trainer=fsdp2``) that writes sharded checkpoints atomically
    (``SavesShardsAtomically``) and resumes from any checkpoint *file*, such as
    one saved by DDP or one process: Lightning re-keys a positional optimizer state by
    ``module.parameters()`` order, which pairs the wrong tensors when the optimizer's groups
    reorder the parameters (size-mismatch errors, or silently wrong moments); here the saved groups
    pair with this run's groups, as ``torch.optim.Optimizer.load_state_dict`` pairs them."""

    def saves_sharded(self) -> bool:
        return self._save_distributed_checkpoint

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from pathlib import Path

        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from seqlab.utils.checkpoint_io import optimizer_param_names, optimizer_state_by_name

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():  # a sharded directory: Lightning reads it by name already
            return super().load_checkpoint(path, weights_only=weights_only)
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        strict = self.lightning_module.strict_loading
        _load_raw_module_state(checkpoint.pop("state_dict"), self.model, self.world_size, strict=strict)
        options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=strict)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", []), strict=False):
            state = optimizer_state_by_name(state, optimizer_param_names(self.model, optimizer))
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=options)
        return checkpoint


def offloads_optimizer(strategy: Any) -> bool:
    """DeepSpeed ZeRO-Offload: the optimizer steps on the CPU and wants DeepSpeed's CPU Adam."""
    config = getattr(strategy, "config", None)
    if type(strategy).__name__ != "DeepSpeedStrategy" or not isinstance(config, dict):
        return False
    return bool(config.get("zero_optimization", {}).get("offload_optimizer"))


# ---------------------------------------------------------------------------- sweeps with DDP
def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


#: Hydra's command-line flags that choose the primary config and where configs are read
CONFIG_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")


def config_flags(argv: list[str]) -> list[str]:
    """The flags of ``CONFIG_FLAGS`` in ``argv`` (``--flag value`` or ``--flag=value``), as
    ``--flag=value``: the other ranks of a sweep job must compose the same config."""
    flags, args = [], iter(argv)
    for arg in args:
        name, equals, value = arg.partition("=")
        if name in CONFIG_FLAGS:
            flags.append(f"{name}={value if equals else next(args, '')}")
    return flags


def job_command(local_rank: int) -> tuple[list[str], str]:
    """The command that runs rank ``local_rank`` of the current sweep job (a single run)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    from seqlab.utils.parallel import entry_command

    hydra = HydraConfig.get()
    command = [
        *entry_command(),
        *config_flags(sys.argv[1:]),
        # where configs are found (composition), not how the sweep runs (mode, sweeper, launcher)
        *(o for o in hydra.overrides.hydra if o.lstrip("+~").startswith("hydra.searchpath")),
        *hydra.overrides.task,
        # a single run, even where the config makes a sweep (hydra.mode: MULTIRUN in
        # experiment=compare_*, hparams_search=*): rank 1 ran a sweep of its own
        "hydra.mode=RUN",
        f'hydra.run.dir="{hydra.runtime.output_dir}"',
        f"hydra.job.name={hydra.job.name}_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


class RankObserver(_ChildProcessObserver):
    """Lightning's watch over the other ranks, with a grace period. Lightning SIGKILLs the
    launching process within 5 s of a rank exiting non-zero (a rank stuck in an NCCL collective
    would wait for ever); that cut short a rank 0 still finishing by itself: after a SIGTERM stop
    every rank exits 143 once the checkpoint is saved, and rank 0 was killed while it closed its
    loggers (W&B) and its ``.running`` marker; in a sweep, the launching process is the sweep.
    Here the other ranks are killed at once, and the launching process gets ``grace`` seconds to
    end, or to fail, by itself: once ``finish_job`` has taken a sweep job's ranks back (emptied
    the list), the sweep goes on to its next job. Under NCCL a rank that lost a peer waits in
    its collective until the process group's timeout, longer than the grace: it is killed then."""

    grace = 60.0
    #: the ranks' exit codes (None: running) when this watch found one ended non-zero, before it
    #: killed the others: what ``finish_job`` reports as the job's likely cause
    ended_first: list[int | None] | None = None

    def _terminate_all(self) -> None:
        self.ended_first = [proc.returncode for proc in self._child_processes]
        for proc in list(self._child_processes):
            proc.send_signal(self._termination_signal)
        deadline = time.monotonic() + self.grace
        while self._child_processes and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._child_processes:
            os.kill(self._main_pid, self._termination_signal)


#: in the environment of the ranks seqlab's script launcher starts: the launching process's pid
#: (``follow_launcher``)
LAUNCHER_PID_ENV = "SEQLAB_LAUNCHER_PID"


class ScriptLauncher(subprocess_script._SubprocessScriptLauncher):
    """Lightning's script launcher (DDP, FSDP, DeepSpeed) whose watch over the other ranks lets
    the launching process finish by itself first (``RankObserver``), and whose ranks end with it
    (``follow_launcher``)."""

    observer: RankObserver | None = None

    def _call_children_scripts(self) -> None:
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # (Lightning copies the environment)
        try:
            super()._call_children_scripts()
        finally:
            os.environ.pop(LAUNCHER_PID_ENV, None)

    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        def observe(procs: list[Any]) -> None:
            self.observer = RankObserver(main_pid=os.getpid(), child_processes=procs)
            self.observer.start()

        with mock.patch.object(subprocess_script, "_launch_process_observer", observe):
            return super().launch(function, *args, trainer=trainer, **kwargs)


class SweepJobLauncher(ScriptLauncher):
    """The script launcher whose other ranks run this sweep job, not the whole sweep, and whose
    rank failures end the job, not the sweep (``RankObserver``, ``finish_job``)."""

    #: whether this process set the launch environment (``LAUNCH_ENV``) and started the ranks
    #: (none with ``trainer.devices=1``), not torchrun or srun
    launched_here: bool = False

    def _call_children_scripts(self) -> None:
        self.launched_here = True
        # Lightning builds a Hydra child's command in this one function: swap in the job's
        with mock.patch.object(subprocess_script, "_hydra_subprocess_cmd", job_command):
            super()._call_children_scripts()


#: the exit code of a process stopped by SIGTERM (128 + 15, as a shell reports it)
STOPPED_BY_SIGTERM = 143


class WorkersStopped(SIGTERMException):
    """The spawned workers stopped for a SIGTERM (and saved where they stopped): raised in the
    main process of ``ddp_spawn``, whose own weights never trained."""


class SpawnLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher (``trainer=ddp_spawn``) that also hands back what ``summary.json``
    reads: the fit loop's progress (global step, epochs), ``RunStats``' figures (throughput,
    time to the first step, the worker's peak memory) and the task's ``test_report``. Lightning
    returns the weights, the best checkpoint's path and the logged metrics only: the summary gave
    0 steps and epochs and no throughput."""

    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        """Lightning's launch, with SIGTERM passed on to the workers while they run: only they
        had a handler (``SaveOnSigterm``), so a SIGTERM to the main process (``kill``, ``docker
        stop``) ended it at once and left them training, unwatched, in a directory that read as
        free to resume. The workers save and stop at the next step boundary; then the main
        process stops as a single run does (``SIGTERMException``: exit 143, resumable)."""
        import threading

        received: list[int] = []

        def forward(signum: int, frame: Any) -> None:
            received.append(signum)
            self.kill(signum)

        # the workers' parent, whose end they watch for (under forkserver it is the server: none)
        self.main_pid = os.getpid() if self._start_method in ("spawn", "fork") else None
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, forward) if main_thread else None
        # for the workers, which inherit neither (spawned: a fresh interpreter)
        self.logging_config = job_logging_config()
        self.warning_filters = [
            (
                action,
                getattr(message, "pattern", message or ""),
                category,
                getattr(module, "pattern", module or ""),
                lineno,
            )
            for action, message, category, module, lineno in warnings.filters
        ]
        try:
            result = super().launch(function, *args, trainer=trainer, **kwargs)
        except Exception as error:
            # the workers stopped for it: each exits 143 (``_wrapping_function``)
            if received or getattr(error, "exit_code", None) == STOPPED_BY_SIGTERM:
                raise WorkersStopped() from None
            raise
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
        if received:
            raise WorkersStopped()
        return result

    def _wrapping_function(self, process_idx: int, trainer: Any, *args: Any, **kwargs: Any) -> None:
        """A worker ends with the main process: it gets SIGTERM when that dies (Linux; a SIGKILL
        to the main process left the workers training on as orphans). A worker stopped by a
        SIGTERM runs the callbacks' ``on_exception`` (``SaveOnSigterm`` saves there: Lightning
        calls them around the launch, in the main process, whose weights never trained) and
        exits 143: Lightning's ``SIGTERMException`` is a ``SystemExit`` without a code, so the
        worker exited 0 without handing back its results, and the main process waited for them
        for ever."""
        from lightning.pytorch.trainer.call import _interrupt

        die_with_parent(getattr(self, "main_pid", None))
        configure_worker_logging(getattr(self, "logging_config", None), process_idx)
        for action, message, category, module, lineno in reversed(getattr(self, "warning_filters", [])):
            warnings.filterwarnings(action, message, category, module, lineno)  # (train.py's, extras')
        try:
            super()._wrapping_function(process_idx, trainer, *args, **kwargs)
        except SIGTERMException as stop:
            if trainer is not None:
                _interrupt(trainer, stop)
                trainer._teardown()
            sys.exit(STOPPED_BY_SIGTERM)

    def get_extra_results(self, trainer: Any) -> dict[str, Any]:
        from seqlab.callbacks.run_stats import RunStats

        extra = super().get_extra_results(trainer)
        extra["seqlab_fit_loop"] = trainer.fit_loop.state_dict()
        extra["seqlab_run_stats"] = [c.handover() for c in trainer.callbacks if isinstance(c, RunStats)]
        extra["seqlab_test_report"] = getattr(trainer.lightning_module, "test_report", None)
        return extra

    def update_main_process_results(self, trainer: Any, extra: dict[str, Any]) -> None:
        from seqlab.callbacks.run_stats import RunStats

        super().update_main_process_results(trainer, extra)
        trainer.fit_loop.load_state_dict(extra["seqlab_fit_loop"])
        for stats, figures in zip(
            (c for c in trainer.callbacks if isinstance(c, RunStats)), extra["seqlab_run_stats"]
        ):
            stats.take_over(figures)
        if extra["seqlab_test_report"] is not None:
            trainer.lightning_module.test_report = extra["seqlab_test_report"]


def die_with_parent(parent_pid: int | None, signum: int = signal.SIGTERM) -> None:
    """``signum`` to this process when its parent, ``parent_pid``, dies (``PR_SET_PDEATHSIG``,
    Linux; elsewhere a no-op): a worker the main process spawned stops with it, saving where a
    checkpoint is whole (SIGTERM)."""
    if not sys.platform.startswith("linux") or parent_pid is None:
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signum)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    # the parent died before the request (reparented: nobody would send the signal). Not "the
    # parent is pid 1": in a container without an init, the main process is pid 1 itself
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)


def follow_launcher() -> None:
    """In a rank seqlab's script launcher started: end at once (SIGKILL) when the launching
    process, rank 0, dies. Killed (the kernel's out-of-memory killer), it left the others waiting
    in their next collective until its timeout (30 min under NCCL), holding their GPUs, which a
    parallel sweep's next job was then given. Not SIGTERM: stopping cleanly is itself a
    collective, with a rank that is gone; the run resumes from its last checkpoint."""
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if launcher.isdigit() and os.getpid() != int(launcher):
        die_with_parent(int(launcher), signal.SIGKILL)


def use_spawn_launcher(trainer: Any) -> None:
    """Give a spawning strategy (``ddp_spawn``) the launcher that hands back the summary's figures."""
    strategy = trainer.strategy
    launcher = getattr(strategy, "_launcher", None)
    if type(launcher) is _MultiProcessingLauncher:
        strategy._launcher = SpawnLauncher(strategy, start_method=launcher._start_method)


def use_script_launcher(trainer: Any) -> None:
    """Give a script-launched strategy (DDP, FSDP, DeepSpeed) seqlab's launcher: the sweep job's
    inside a multirun, else the one whose watch over the ranks has a grace period."""
    strategy = trainer.strategy
    launcher = getattr(strategy, "_launcher", None)
    if type(launcher) is subprocess_script._SubprocessScriptLauncher:
        cls = SweepJobLauncher if in_multirun() else ScriptLauncher
        strategy._launcher = cls(launcher.cluster_environment, launcher.num_processes, launcher.num_nodes)


def exit_reason(code: int) -> str:
    """A child process's exit status in words: ``exit code 1``, ``killed by SIGKILL (...)``."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    oom = (
        " (the signal of the kernel's out-of-memory killer, among others)" if -code == signal.SIGKILL else ""
    )
    return f"killed by {name}{oom}"


def finish_job(
    trainer: Any, run_dir: Any, failed: bool = False, timeout: float = 120.0
) -> SeqlabError | None:
    """After a run or sweep job whose other ranks seqlab's launcher started: take them back (the
    rank watch then lets this process finish whatever it still does) and wait for them. After a
    ``failed`` run they are killed instead: one may be waiting in a collective for a rank that has
    given up. A sweep job then closes the process group and forgets the launch environment, so
    that the next job launches its own processes (the sweep goes on to its next job; Hydra reports
    the failure at the end). Returns, for a run that succeeded here, the error of what ended wrong
    on the other ranks (a non-zero exit, a rank that did not end), for the caller to raise once it
    has closed its loggers (Lightning's watch SIGKILLed this process instead)."""
    launcher = getattr(trainer.strategy, "_launcher", None)
    if not isinstance(launcher, ScriptLauncher):
        return None
    # none with trainer.devices=1: Lightning still set the launch environment and DDP opened a
    # one-process group, which the next sweep job's launcher took as started from outside (it
    # started no ranks, and trained as rank 0 of N on its 1/N share)
    procs = list(launcher.procs)
    # Lightning's child-process observer watches this very list and kills this process (the whole
    # sweep) when a rank in it exits non-zero, as a killed one does: emptied, the observer ends
    launcher.procs.clear()
    problems: list[str] = []
    try:
        # how each rank stood when this process gave up or finished, before any was killed here
        # or by the watch (a rank that had already ended non-zero is the likely cause)
        polled = [proc.poll() for proc in procs]
        first = launcher.observer.ended_first if launcher.observer is not None else None
        watched = first is not None and len(first) == len(procs)  # the watch killed the others
        ended = first if watched else polled
        deadline = time.monotonic() + timeout
        for rank, (proc, code) in enumerate(zip(procs, ended, strict=True), start=1):
            if failed and code:
                log.error(
                    "rank %d of this job had ended before this process failed: %s", rank, exit_reason(code)
                )
            if failed:
                proc.kill()
            try:
                waited = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("rank %d of this job did not end within %.0f s: killed", rank, timeout)
                proc.kill()
                proc.wait()
                if not failed:
                    problems.append(f"rank {rank} did not end within {timeout:.0f} s of this one")
                continue
            if code is None and not watched:  # still running when polled: how it ended since
                code = waited
            if code and not failed:  # (one the watch killed after another failed is not a cause)
                problems.append(f"rank {rank} ended: {exit_reason(code)}")
    finally:
        if isinstance(launcher, SweepJobLauncher) and launcher.launched_here:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            for key in LAUNCH_ENV:
                os.environ.pop(key, None)
    if not problems:
        return None
    return SeqlabError(
        f"{'; '.join(problems)}, while this process (rank 0) finished: the run failed "
        f"(the other ranks' logs are in {run_dir})"
    )
