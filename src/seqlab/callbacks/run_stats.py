"""Training throughput, FLOPs, model FLOPs utilisation, start-up time and peak memory, measured
for the loggers, ``summary.json`` and the comparison report."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from torch.distributed.tensor import DTensor

from seqlab.utils.resume import resumes_own_run

log = logging.getLogger(__name__)

#: dense (no sparsity) peak FLOP/s per GPU by compute dtype, from NVIDIA's datasheets (half their
#: 2:4-sparse figures); Lightning's table lists the H200 at its sparse figure and does not
#: recognise the name "NVIDIA H200". Matched in this order against the lower-cased device name,
#: so the NVL and PCIe boards (lower clocks and power) come before the SXM names they contain.
_SXM = {torch.bfloat16: 989.5e12, torch.float16: 989.5e12, "tfloat32": 494.5e12, torch.float32: 67e12}
_NVL = {torch.bfloat16: 835.5e12, torch.float16: 835.5e12, "tfloat32": 417.5e12, torch.float32: 60e12}
_PCIE = {torch.bfloat16: 756.5e12, torch.float16: 756.5e12, "tfloat32": 378e12, torch.float32: 51e12}
DENSE_PEAK_FLOPS = {
    "h200 nvl": _NVL,
    "h200": _SXM,
    "h100 nvl": _NVL,
    "h100 pcie": _PCIE,
    "h100": _SXM,
    "a100": {torch.bfloat16: 312e12, torch.float16: 312e12, "tfloat32": 156e12, torch.float32: 19.5e12},
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one ``device`` computing in ``dtype``; None where unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for chip, table in DENSE_PEAK_FLOPS.items():
        if chip in name:
            key = dtype
            if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
                key = "tfloat32"
            return table.get(key)
    return get_available_flops(device, dtype)


def compute_dtype(trainer: L.Trainer) -> torch.dtype:
    """The dtype the precision plugin computes in (Lightning's private helper; float32 if it moves).
    Under FSDP, the parameters' dtype: Lightning's helper reads the gradient reduction's, which
    seqlab's FSDP plugin keeps in float32 under bf16-mixed (MFU came out against the float32 peak,
    about 15x too high on an H100)."""
    plugin = trainer.precision_plugin
    mixed = getattr(plugin, "mixed_precision_config", None)
    if mixed is not None and getattr(mixed, "param_dtype", None) is not None:
        return mixed.param_dtype
    try:
        from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

        return _plugin_to_compute_dtype(plugin)
    except (ImportError, RuntimeError):
        return torch.float32


def settled(device: torch.device) -> None:
    """Wait until ``device`` has done the work queued on it, so that a clock read next counts it:
    a CUDA host runs ahead of its device (up to the next read-back), so without this the last
    training steps of an epoch would be timed as validation. Only at epoch and validation
    boundaries: a wait per step would cost what it measures."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_start_time() -> float | None:
    """Wall-clock time (``time.time()`` scale) at which this process started.

    Linux: the start in clock ticks since boot (``/proc/self/stat``) against the boot clock now,
    both exact to a tick. Adding the ticks to the boot time (``btime`` in ``/proc/stat``, as psutil
    does) dates the start up to a second early, ``btime`` being cut to whole seconds: start-up
    times read up to 1 s too long (0.43 s on the host measured). Elsewhere psutil's figure."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - since_start
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux (no CLOCK_BOOTTIME)
        pass
    try:
        import psutil  # installed with W&B

        return psutil.Process(os.getpid()).create_time()
    except ImportError:
        return None


#: when the current job of this process began, for a multirun's second and later jobs (its first
#: job, like a single run, is timed from the process start: imports and config included)
_job_start: dict[str, Any] = {"jobs": 0, "time": None, "counter": None}


def start_job() -> None:
    """Mark the start of a job (``train``): a multirun runs its jobs one after another in one
    process. A later job's host peak memory starts afresh, its data preparation included."""
    if _job_start["jobs"]:
        _job_start["time"] = time.time()
        reset_peak_host_memory()
    _job_start["jobs"] += 1
    _job_start["counter"] = time.perf_counter()


def job_start_time() -> float | None:
    """Wall-clock start of this process's current job: the process start for its first job."""
    return _job_start["time"] or process_start_time()


def flops_per_token(task: L.LightningModule, batch: Any) -> float | None:
    """Training FLOPs (forward + backward) per token of ``batch``, counted by torch's FLOP counter
    on a copy of the task built on the meta device (no memory, no compute, the weights untouched),
    over the batch's positions, padding included (``batch_positions``): times the tokens/s of
    real tokens, what is computed on padding is not counted as model FLOPs.
    None for modules without ``step_loss``/``batch_tokens`` or models that read values from the
    data (padded RNN/LSTM/GRU batches are packed by their lengths on the CPU, impossible for
    meta tensors)."""
    if not (hasattr(task, "step_loss") and hasattr(task, "batch_tokens")):
        return None
    positions = getattr(task, "batch_positions", task.batch_tokens)
    tokens = int(positions(batch))
    try:
        cls = task.task_class() if hasattr(task, "task_class") else type(task)
        hparams = dict(task.hparams)
        if isinstance(hparams.get("backbone"), dict):  # nothing compiled on meta tensors
            hparams["backbone"] = {k: v for k, v in hparams["backbone"].items() if k != "compile"}
        with torch.device("meta"):
            copy = cls(**hparams)
        meta_batch = move_data_to_device(batch, torch.device("meta"))
        # no anomaly detection on meta tensors (debug presets turn it on; it printed a traceback)
        with torch.autograd.set_detect_anomaly(False):
            flops = measure_flops(copy, lambda: copy.step_loss(meta_batch), lambda loss: loss)
    except Exception as err:  # counting is a report, never a reason to stop training
        log.debug("FLOPs not counted: %s", err)
        return None
    return flops / tokens if tokens and flops else None


def peak_host_memory_mb() -> float:
    """Peak resident memory of this process since the last ``reset_peak_host_memory`` (Linux:
    ``VmHWM``), or since it started (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:", 1)[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reset_peak_host_memory() -> None:
    """Start the peak resident memory afresh, at the current one (Linux; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def local_part(param: torch.Tensor) -> torch.Tensor:
    """What this process holds of a parameter: its shard under FSDP2 (DTensor) or its partition
    under ZeRO-3 (the parameter itself an empty placeholder there), else the whole tensor."""
    if isinstance(param, DTensor):
        return param.to_local()
    partition = getattr(param, "ds_tensor", None)  # DeepSpeed ZeRO stage 3
    return partition if isinstance(partition, torch.Tensor) else param


def local_numel(param: torch.Tensor) -> int:
    """Elements this process holds (``local_part``)."""
    return local_part(param).numel()


class RunStats(L.Callback):
    """Training throughput (samples/s and tokens/s of all processes; validation, checkpoint saves
    and the steps up to the first optimizer step excluded: compilation and warm-up), FLOPs
    per token and model FLOPs utilisation (MFU: achieved model FLOP/s over the devices' dense
    peak), seconds from the job's start to the first optimizer step (the process start for a single
    run: imports included), the job's peak memory (GPU: from the start of training), and the
    parameters each process holds (sharding strategies hold a share).

    Throughput and MFU are logged every training epoch as ``perf/*``. FLOPs per token are counted
    once, on the first batch; for attention they grow with the length, so MFU is exact for
    fixed-length batches and an estimate for batches of varying length.

    Args:
        peak_flops: dense peak FLOP/s of one device, for MFU where it is not known (CPUs, GPUs
            missing from ``DENSE_PEAK_FLOPS`` and Lightning's table); null: look it up.
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops
        self.parameters_per_rank: list[int] = []
        self.samples = 0
        self.tokens: torch.Tensor | int = 0
        self.train_seconds = 0.0
        self.flops_per_token: float | None = None
        self.time_to_first_step_s: float | None = None
        self._first_step_done = False
        self._epoch_start: float | None = None
        self._epoch_samples = 0
        self._epoch_tokens: torch.Tensor | int = 0
        #: this epoch's seconds outside training: validation, and checkpoint saves
        self._outside_seconds = 0.0
        self._val_start: float | None = None
        self._save_start: float | None = None
        #: when this callback's last training-batch or validation-end hook ended: a save that
        #: follows (the checkpoint callbacks run after it) began there
        self._hook_end: float | None = None
        self.worker_memory: dict[str, float] | None = None
        #: the type of the device this run trains on (``setup``): GPU memory is reported for
        #: ``cuda`` only (a CPU job after a GPU job in one multirun process got the GPU job's peak)
        self.device_type: str | None = None
        #: seconds of ``trainer.fit`` this run spent before the process that resumed it (saved in
        #: its checkpoints); 0 for a fresh run and for one started from another run's checkpoint
        self.earlier_fit_s = 0.0
        #: the same for the whole job (``wall_s``): the earlier attempts' time up to the checkpoint
        self.earlier_wall_s = 0.0
        self._fit_start: float | None = None
        #: read here, in the process that builds the run: a spawned worker (ddp_spawn) started later
        self.job_started = job_start_time()
        #: ``start_job``'s ``perf_counter`` (``wall_s``'s start; one clock for the host's processes)
        self.job_counter = _job_start["counter"]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.peak_flops is None:
            self.peak_flops = peak_flops(trainer.strategy.root_device, compute_dtype(trainer))
        self.device_type = trainer.strategy.root_device.type
        if stage == "fit" and self.device_type == "cuda":
            # a multirun trains its jobs in one process: each job's own peak, not the sweep's so far
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        since = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        fit_s = self.earlier_fit_s + since
        wall = time.perf_counter() - self.job_counter if self.job_counter is not None else since
        # the throughput of the epochs done so far: a run resumed after its training ended (stopped
        # while testing) trains no epoch, and reported none
        counted = {key: getattr(self, key) for key in self.COUNTED}
        return {
            "fit_s": fit_s,
            "wall_s": max(self.earlier_wall_s + wall, fit_s),
            **counted,
            "tokens": int(self.tokens),
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # a resumed (or requeued) run's training time is its attempts' up to the checkpoint plus
        # this one's; a run started from another run's checkpoint starts its own count
        if trainer.state.fn != TrainerFn.FITTING:  # the best checkpoint, loaded to be tested
            return
        saved = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        own = resumes_own_run(trainer)
        self.earlier_fit_s = float(saved.get("fit_s", 0.0)) if own else 0.0
        # (a checkpoint from before wall_s was saved: at least its training time)
        self.earlier_wall_s = float(saved.get("wall_s", self.earlier_fit_s)) if own else 0.0
        for key in self.COUNTED if own else ():  # (absent from checkpoints before they were saved)
            if key in saved:
                setattr(self, key, saved[key])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        local = sum(local_numel(p) for p in pl_module.parameters())
        counts = trainer.strategy.all_gather(torch.tensor([local], device=pl_module.device))
        self.parameters_per_rank = [int(c) for c in counts.reshape(-1).tolist()]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        settled(pl_module.device)
        self._epoch_start = time.perf_counter()
        self._outside_seconds = 0.0
        self._epoch_samples, self._epoch_tokens = 0, 0

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:  # fmt: skip
        # a save is not training: ModelCheckpoint's after a validation and a step checkpoint's
        # come after this callback's hooks (Lightning runs checkpoint callbacks last), and
        # Lightning calls this hook after gathering the weights and optimizer state (most of a
        # sharded strategy's save): the save runs from the end of this callback's last hook to
        # the next training batch (or the validation, or the epoch's end). On a GPU that start
        # was not synchronised: the step's own queued work, if any, counts as the save's.
        if self._epoch_start is not None and self._val_start is None and self._save_start is None:
            self._save_start = self._hook_end if self._hook_end is not None else time.perf_counter()

    def saved(self) -> None:
        """The save that ``on_save_checkpoint`` began is over: its time is outside training."""
        if self._save_start is not None:
            self._outside_seconds += time.perf_counter() - self._save_start
            self._save_start = None

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self.saved()
        self._hook_end = None
        if self._epoch_start is None:  # resumed mid-epoch: Lightning skips on_train_epoch_start
            self.on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        # this process's share, summed over the processes at the epoch's end: their padded text
        # batches hold different numbers of tokens, so rank 0's count times the world would not do
        self._epoch_samples += extract_batch_size(batch)
        if hasattr(pl_module, "batch_tokens"):  # a device tensor: summed without a host sync
            self._epoch_tokens = self._epoch_tokens + pl_module.batch_tokens(batch)
        if not self._first_step_done and trainer.global_step >= 1:
            self._first_step_done = True
            settled(pl_module.device)
            started = self.job_started
            if self.time_to_first_step_s is None:  # a resumed run's: its first attempt's
                self.time_to_first_step_s = round(time.time() - started, 3) if started else None
            self.flops_per_token = flops_per_token(pl_module, batch)
            # throughput leaves out the steps up to here (compilation, autotuning, this count on
            # the meta device, which queues no device work): the epoch's window starts again
            if self._epoch_start is not None:
                self._epoch_start = time.perf_counter()
                self._epoch_samples, self._epoch_tokens = 0, 0
                self._outside_seconds = 0.0  # a validation before it (val_check_interval) is outside too
        self._hook_end = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        settled(pl_module.device)
        self.saved()
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_start is not None and self._epoch_start is not None:
            settled(pl_module.device)
            self._outside_seconds += time.perf_counter() - self._val_start
        self._val_start = None
        self._hook_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_start is None:
            return
        settled(pl_module.device)
        self.saved()
        seconds = time.perf_counter() - self._epoch_start - self._outside_seconds
        self._epoch_start = None
        samples, tokens = self.all_processes(trainer, pl_module.device)
        self.train_seconds += seconds
        self.samples += samples
        self.tokens += tokens
        if seconds > 0 and samples:
            metrics = {"perf/samples_per_s": samples / seconds}
            if tokens:
                metrics.update(self.token_rates(tokens / seconds, trainer.world_size))
            # every process holds the sums of all (all_processes): sync_dist only silences
            # Lightning's hint to reduce them (with rank_zero_only it reduces nothing)
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, rank_zero_only=True, sync_dist=True)

    def all_processes(self, trainer: L.Trainer, device: torch.device) -> tuple[int, int]:
        """The epoch's samples and tokens, summed over the processes (one collective an epoch)."""
        counts = torch.cat(
            [
                torch.tensor([self._epoch_samples], device=device),
                torch.as_tensor(self._epoch_tokens, device=device).reshape(1),
            ]
        ).long()
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        samples, tokens = counts.tolist()
        return int(samples), int(tokens)

    def token_rates(self, tokens_per_s: float, world_size: int) -> dict[str, float]:
        """tokens/s, achieved model FLOP/s and MFU (when the FLOPs and the peak are known)."""
        rates = {"perf/tokens_per_s": tokens_per_s}
        if self.flops_per_token:
            achieved = self.flops_per_token * tokens_per_s
            rates["perf/tflops_per_s"] = achieved / 1e12
            if self.peak_flops:
                rates["perf/mfu"] = achieved / (self.peak_flops * world_size)
        return rates

    @property
    def samples_per_second(self) -> float | None:
        return self.samples / self.train_seconds if self.train_seconds > 0 and self.samples else None

    def summary(self, world_size: int) -> dict[str, Any]:
        """Throughput figures of the whole fit for ``summary.json``."""
        tokens_per_s = self.tokens / self.train_seconds if self.train_seconds > 0 and self.tokens else None
        rates = self.token_rates(tokens_per_s, world_size) if tokens_per_s else {}
        return {
            "train_samples_per_s": self.samples_per_second,
            "train_tokens_per_s": tokens_per_s,
            "flops_per_token": self.flops_per_token,
            "achieved_tflops_per_s": rates.get("perf/tflops_per_s"),
            "peak_flops_per_device": self.peak_flops,
            "mfu": rates.get("perf/mfu"),
            "time_to_first_step_s": self.time_to_first_step_s,
        }

    #: the figures of the epochs done, saved in checkpoints and continued by the run that resumes
    COUNTED = (
        "samples",
        "tokens",
        "train_seconds",
        "flops_per_token",
        "time_to_first_step_s",
        "parameters_per_rank",
    )

    #: what ``summary`` and ``peak_memory`` report, handed from a spawned worker to the main process
    FIGURES = ("samples", "tokens", "train_seconds", "flops_per_token", "time_to_first_step_s",
               "parameters_per_rank", "peak_flops", "worker_memory", "earlier_fit_s", "earlier_wall_s")  # fmt: skip

    def handover(self) -> dict[str, Any]:
        """This process's figures (and its peak memory) for the process that reports them:
        under ``trainer=ddp_spawn`` training runs in spawned workers, the summary in the main one."""
        return {**{key: getattr(self, key) for key in self.FIGURES}, "worker_memory": self.peak_memory_mb()}

    def take_over(self, figures: dict[str, Any]) -> None:
        """The figures of a worker that has ended (one per spawned fit, test ...); the peak memory
        is the highest of them: a test worker's would hide the training worker's."""
        previous = self.worker_memory or {}
        for key in self.FIGURES:
            setattr(self, key, figures[key])
        latest = figures["worker_memory"]
        self.worker_memory = {
            **previous,
            **{key: max(value, previous.get(key, value)) for key, value in latest.items()},
        }

    def peak_memory(self) -> dict[str, float]:
        """The job's peak memory: measured here, or by the spawned worker that trained."""
        return self.worker_memory or self.peak_memory_mb()

    def peak_memory_mb(self) -> dict[str, float]:
        stats = {"peak_host_memory_mb": round(peak_host_memory_mb(), 1)}
        on_gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
        if on_gpu and self.device_type in ("cuda", None):  # (None: set up elsewhere, not known)
            stats["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            # what the caching allocator held at its peak: allocated plus its free blocks (an
            # out-of-memory error comes when this, with the CUDA context, fills the device)
            stats["peak_gpu_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        return stats
