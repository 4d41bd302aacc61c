"""Fault injection for the reliability tests: callbacks that make one rank fail mid-training, hold
memory through the first training step or signal a validation; and probes that record what a run
did (the step it started from, its initial weights)."""

from __future__ import annotations

import atexit
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from seqlab.backbones.base import Backbone


class FailOnRank(L.Callback):
    """At optimizer step ``step``, global rank ``rank`` raises (``how=raise``), is killed with
    SIGKILL (``how=kill``, as a crash or an out-of-memory kill would) or gets SIGTERM / SIGUSR1
    (``how=term`` / ``usr1``, a pre-emption or SLURM's requeue signal: Lightning stops at the end of
    the step; ``how=int``: SIGINT, Ctrl-C; ``term_parent``: SIGTERM to the parent, the main process of ``ddp_spawn``) or reports a NaN training loss and sets a weight to NaN
    (``how=diverge``, to the callbacks after it: a batch that diverged on that rank alone) or
    sets a weight to NaN (``how=poison``: every later loss is NaN) or reports a NaN loss and makes
    the epoch's running loss NaN with the weights intact (``how=skipped``, as a step 16-mixed's
    scaler skipped); ``mid_window``: on a batch
    inside a gradient-accumulation window. With
    ``once=<file>`` it fires only if that file does not exist (and creates it), so the same
    command run again is the restart after the fault."""

    def __init__(
        self, rank: int, step: int, how: str = "raise", once: str | None = None, mid_window: bool = False
    ) -> None:
        self.rank, self.step, self.how, self.once, self.mid_window = rank, step, how, once, mid_window

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank or trainer.global_step < self.step:
            return
        # mid_window: on a batch that ends no gradient-accumulation window
        if self.mid_window and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            return
        if self.once is not None:
            if Path(self.once).exists():
                return
            Path(self.once).write_text(f"fired at step {trainer.global_step}\n")
        if self.how in ("diverge", "skipped"):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            loss.detach().fill_(float("nan"))  # the step is done: what the callbacks after this read
        if self.how == "diverge":  # the NaN gradients were applied: this rank's weights are NaN
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))
            return
        if self.how == "skipped":  # a NaN loss whose step was skipped (16-mixed's scaler): weights intact
            pl_module._train_loss["sum"] = pl_module._train_loss["sum"] + float("nan")
            return
        if self.how == "poison":  # the weights become NaN: every later loss is NaN
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))
            return
        if self.how == "term_parent":  # the main process of a spawn launch (kill, docker stop)
            Path(self.once or os.devnull).write_text(f"{os.getpid()}\n")  # this worker, to look for later
            os.kill(os.getppid(), signal.SIGTERM)
            return
        signals = {
            "kill": [signal.SIGKILL],
            "term": [signal.SIGTERM],
            "usr1": [signal.SIGUSR1],
            "int": [signal.SIGINT],
        }
        if self.how in signals:
            for sig in signals[self.how]:  # a Python handler runs before the next line does
                os.kill(os.getpid(), sig)
            return
        raise RuntimeError(f"injected failure on rank {self.rank} at step {trainer.global_step}")


class WarnOnEveryRank(L.Callback):
    """Every rank warns (``warnings.warn``) at the start of training, naming itself."""

    def on_train_start(self, trainer, pl_module) -> None:
        import warnings

        warnings.warn(f"a warning of rank {trainer.global_rank}", UserWarning, stacklevel=1)


class HoldMemory(L.Callback):
    """Touches ``mb`` MiB of host memory at the start of training and frees it after the first
    step: a peak that is this job's own."""

    def __init__(self, mb: int) -> None:
        self.mb, self.block = mb, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.block = bytearray(self.mb * 2**20)
        self.block[::4096] = b"x" * len(range(0, len(self.block), 4096))  # every page resident

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.block = None


class MeetTheOthers(L.Callback):
    """A barrier between the jobs of a sweep: at the start of training, rank 0 of each job writes
    ``<folder>/<its pid>`` and waits until ``jobs`` such files are there, or fails after
    ``timeout`` seconds. Jobs that run one after the other never all meet: the first one fails."""

    def __init__(self, folder: str, jobs: int, timeout: float = 120.0) -> None:
        self.folder, self.jobs, self.timeout = Path(folder), jobs, timeout

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / str(os.getpid())).touch()
        deadline = time.monotonic() + self.timeout
        while len(list(self.folder.iterdir())) < self.jobs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the other jobs never started beside this one ({self.folder})")
            time.sleep(0.1)


class RecordFirstStep(L.Callback):
    """Appends to ``path``, once per process (global rank 0), the optimizer step its first
    training batch starts from: 0 for a run trained from scratch, the checkpoint's step for a
    resumed one (a resume that trained from scratch again ends alike on a CPU: only this tells)."""

    def __init__(self, path: str) -> None:
        self.path, self.done = Path(path), False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.done and trainer.global_rank == 0:
            with self.path.open("a") as handle:
                handle.write(f"{trainer.global_step}\n")
        self.done = True


class RecordInitialWeights(L.Callback):
    """Keeps a copy of the module's weights as fit starts (``state``): what a checkpoint of an
    untrained model would hold."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def initial_weights(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """The weights ``RecordInitialWeights`` kept in ``trainer``'s run."""
    (probe,) = [c for c in trainer.callbacks if isinstance(c, RecordInitialWeights)]
    assert probe.state, "fit never started"
    return probe.state


class RecordBatches(L.Callback):
    """A fingerprint of every training batch, per epoch (``epochs``): what was trained on. A run
    resumed mid-epoch starts with the rest of that epoch (no epoch-start hook runs for it)."""

    def __init__(self) -> None:
        self.epochs: list[list[str]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import hashlib

        from torch.utils._pytree import tree_leaves

        digest = hashlib.sha1()
        for leaf in tree_leaves(batch):
            if isinstance(leaf, torch.Tensor):
                digest.update(leaf.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        if not self.epochs:
            self.epochs.append([])
        self.epochs[-1].append(digest.hexdigest())


def first_steps(path: Path) -> list[int]:
    """What ``RecordFirstStep`` wrote: the first step of each process that trained."""
    return [int(line) for line in path.read_text().split()] if path.exists() else []


class RecordValidationRows(L.Callback):
    """Writes, per validation batch, ``<rank> <batch_idx> <rows>`` to ``<directory>/val_rows.txt``:
    how many of the batch's sentences are among the first ``task.val_bleu_samples`` (a rank with
    none while another has some decodes one sentence in step with it)."""

    def __init__(self, directory: str) -> None:
        self.path = Path(directory) / "val_rows.txt"

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            return
        rows = int((batch["index"] < pl_module.hparams.val_bleu_samples).sum())
        with self.path.open("a") as handle:
            handle.write(f"{trainer.global_rank} {batch_idx} {rows}\n")


class SignalInValidation(L.Callback):
    """A signal (``signum``: SIGTERM, or SIGKILL as a crash) after the first batch of the first
    validation of epoch ``epoch`` (not the sanity check), once (``once``: a file, as
    ``FailOnRank``'s)."""

    def __init__(self, epoch: int, once: str, signum: str = "SIGTERM") -> None:
        self.epoch, self.once, self.signum = epoch, once, signal.Signals[signum]

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if trainer.sanity_checking or trainer.current_epoch != self.epoch or Path(self.once).exists():
            return
        Path(self.once).write_text(f"fired at step {trainer.global_step}\n")
        os.kill(os.getpid(), self.signum)


class SigtermFlagAtStep(L.Callback):
    """Lightning's SIGTERM handling without a signal in the test process: the flag its handler
    sets (``trainer.received_sigterm``, its signal connector's), after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer._signal_connector.received_sigterm = True


class SlowToFinish(Logger):
    """A logger whose ``finalize`` on rank 0, when the run failed or was stopped, waits for rank 1
    to have exited (it writes its pid to ``<path>.rank1`` as it exits; then its process is gone
    or a zombie) and then takes ``seconds`` more (as a W&B upload may): longer than the 5 s in
    which Lightning's watch over the ranks kills rank 0 once it sees rank 1's exit. Then it
    writes ``path``: rank 0 finished by itself."""

    def __init__(self, path: str, seconds: float = 6.5) -> None:
        super().__init__()
        self.path, self.seconds = path, seconds
        if rank_zero_only.rank == 1:
            atexit.register(Path(f"{path}.rank1").write_text, str(os.getpid()))

    @property
    def name(self) -> str:
        return "slow"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def finalize(self, status: str) -> None:
        if rank_zero_only.rank == 0 and status != "success":
            deadline, marker = time.monotonic() + 60, Path(f"{self.path}.rank1")
            while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
                time.sleep(0.1)
            stat = Path(f"/proc/{marker.read_text()}/stat")  # rank 1: gone, or a zombie not yet reaped
            while stat.exists() and ") Z " not in stat.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(self.seconds)
            Path(self.path).write_text(status)


class FailAtEnd(L.Callback):
    """Global rank ``rank`` raises as its test ends, after the last collective: the other ranks
    finish the run."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "test" and trainer.global_rank == self.rank:
            raise RuntimeError(f"injected failure at the end on rank {self.rank}")


class RunningMeanBackbone(Backbone):
    """A user's encoder-only backbone, as the README's "Your own backbone" describes it: each step
    the linear map of the mean of the steps up to it (causal, so padding on the right changes
    nothing before it). ``leak=True`` breaks the contract: every step also reads the mean of the
    whole sequence, padding included, while the class still says it is causal."""

    causal = True

    def __init__(self, d_model: int = 16, leak: bool = False, with_decoder: bool = False) -> None:
        super().__init__()
        self.d_model = d_model
        self.leak = leak
        self.proj = torch.nn.Linear(d_model, d_model)

    def encode(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        context = x.cumsum(dim=1) / steps
        if self.leak:
            context = context + x.mean(dim=1, keepdim=True)
        return self.proj(context)


class WorseLastValidation(L.Callback):
    """The last epoch's ``metric`` as the checkpoint callbacks see it (they run after every other
    callback) made halfway between the best and the worst before it (lower is better): worse than
    the best, yet within a top 2 of three epochs. ``seen``: the values they saw."""

    def __init__(self, metric: str = "val/mse") -> None:
        self.metric = metric
        self.seen: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.metric])
        if trainer.current_epoch == trainer.max_epochs - 1 and self.seen:
            value = (min(self.seen) + max(self.seen)) / 2
            trainer.callback_metrics[self.metric] = torch.tensor(value)
        self.seen.append(value)
