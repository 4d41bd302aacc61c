"""What a checkpoint needs beyond Lightning's own state for a resumed run to equal an
uninterrupted one, and the checkpoint a pre-empted run leaves behind.

- ``ExactResume``: the random generators' state (dropout masks, word dropout) goes into every
  checkpoint and is put back where the uninterrupted run stood (a data iterator draws a seed
  from the global generator when an epoch starts, so the place matters); and the training
  loader's state (``seqlab.data.samplers.ResumableLoader``: its position, and an unseeded run's
  order seed) is handed back to it, from end-of-epoch checkpoints too, which Lightning skips
  when ``configure_optimizers`` asked for ``trainer.estimated_stepping_batches`` (seqlab's tasks
  always do: that sets the data up before the checkpoint is restored, and the later set-up
  returns early: Lightning #20550, open in 2.6). A run that early stopping ended stays ended
  when resumed.
- ``LastCheckpoint``: ``last.ckpt`` at every epoch's end (Lightning 2.6 writes it only with a new
  best).
- ``StepCheckpoint``: ``last.ckpt`` every N optimizer steps within an epoch; one due on a batch
  after which the epoch ends or a validation runs (resumed from there, Lightning 2.6 skips them)
  is taken at the next optimizer step.
- ``SaveOnSigterm``: on SIGTERM (a pre-emption, ``kill``, a scheduler's time limit) or SLURM's
  requeue signal, every process stops at the next step boundary where a checkpoint is whole and
  ``last.ckpt`` is saved there, so the same command resumes (``resume=auto``) without losing
  the steps since the last periodic checkpoint; SLURM's job is then requeued.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from seqlab.utils.resume import resumes_own_run, same_command

log = logging.getLogger(__name__)


class ExactResume(L.Callback):
    """Save the CPU (and CUDA) generator states with every checkpoint and put them back where the
    uninterrupted run was when it saved: before the next training step for a mid-epoch checkpoint,
    at the start of the next epoch (before its data iterator draws a seed) for an end-of-epoch one.
    Give the training loaders their saved state before the first epoch (``give_back_loader_states``;
    at the end of a resumed fit that had nothing left to train too, for its order seed)."""

    def __init__(self) -> None:
        self.in_epoch = False
        self.pending: dict[str, Any] | None = None
        #: the early-stopping callbacks' own states, before a checkpoint is restored into them
        self.fresh_early_stopping: list[dict[str, Any]] = []
        self.trainer: L.Trainer | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.trainer = trainer
        if stage == "fit":  # runs before Lightning restores the checkpoint's callback states
            self.fresh_early_stopping = [cb.state_dict() for cb in trainer.early_stopping_callbacks]

    def state_dict(self) -> dict[str, Any]:
        """This process's generators, and under several processes every process's (``per_rank``:
        they part when the processes draw different amounts, e.g. dropout on batches each padded
        to its own length). Every process saves a checkpoint together (Lightning's rule), so the
        gather is a collective all of them reach."""
        state: dict[str, Any] = {"cpu": torch.get_rng_state(), "mid_epoch": self.in_epoch}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            mine = torch.cat([state["cpu"], state.get("cuda", torch.empty(0, dtype=torch.uint8))])
            everyone = trainer.strategy.all_gather(mine.to(trainer.strategy.root_device)).cpu()
            size = state["cpu"].numel()
            state["per_rank"] = [{"cpu": row[:size].clone(), "cuda": row[size:].clone()} for row in everyone]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending = dict(state_dict)

    def restore(self) -> None:
        """This process's own generators (rank 0's from a checkpoint of another world size). A run
        started from another run's checkpoint keeps the state its own seed gave it: runs of
        ``seed=1,2,3`` from one checkpoint drew one dropout stream, that run's."""
        state = self.pending
        if self.trainer is not None and not resumes_own_run(self.trainer):
            self.pending = None
            return
        rank = self.trainer.global_rank if self.trainer is not None else 0
        per_rank = state.get("per_rank") or []
        if 0 < rank < len(per_rank):
            state = {**state, "cpu": per_rank[rank]["cpu"], "cuda": per_rank[rank]["cuda"]}
        torch.set_rng_state(state["cpu"])
        if state.get("cuda") is not None and state["cuda"].numel() and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        self.pending = None

    def on_train_start(self, trainer, pl_module) -> None:
        give_back_loader_states(trainer)
        # a checkpoint saved when early stopping ended the run holds EarlyStopping's decision (its
        # stopping_reason) but not the stop itself: without this, the resumed run trains one more
        # epoch. A run started from another run's checkpoint starts its early stopping afresh (its
        # own patience, no wait count or stop of the other run, which Lightning restores too).
        if not resumes_own_run(trainer):
            for callback, state in zip(trainer.early_stopping_callbacks, self.fresh_early_stopping):
                callback.load_state_dict(state)
        stopped = [cb for cb in trainer.early_stopping_callbacks if early_stopped(cb)]
        if stopped and not trainer.should_stop:
            trainer.should_stop = True  # fit ends before its next epoch (once min_epochs are done)
            log.info(
                "resumed a run that early stopping ended at epoch %d (%s): nothing left to train",
                stopped[0].stopped_epoch,
                stopped[0].monitor,
            )

    def on_fit_end(self, trainer, pl_module) -> None:
        give_back_loader_states(trainer)  # a resumed run whose training had ended: its order seed

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.pending is not None and not self.pending.get("mid_epoch"):
            self.restore()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.pending is not None:
            self.restore()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # runs before the checkpoint callbacks' (Lightning orders those last); after the epoch's
        # last batch, what a checkpoint holds is the state the next epoch starts from
        self.in_epoch = batch_idx + 1 < trainer.num_training_batches


def give_back_loader_states(trainer: L.Trainer) -> None:
    """Hand a restored checkpoint's training-loader states to the loaders. Lightning does it only
    when resuming mid-epoch or with ``max_steps`` (``fit_loop.restarting``), and not at all where
    the data was set up before the restore (Lightning #20550, above); seqlab's loaders also carry
    an unseeded run's order seed (``ResumableLoader``), which a checkpoint taken at an epoch's end
    (``last.ckpt``) must give back too. The position such a checkpoint holds is its finished
    epoch's: the next epoch skips nothing. States saved by other loaders than this run's (another
    number of them) are dropped with a warning: the epoch starts from its first batch."""
    loop = trainer.fit_loop
    states, combined = loop._combined_loader_states_to_load, loop._combined_loader
    if not states or combined is None:
        return
    stateful = sum(isinstance(loader, _Stateful) for loader in combined.flattened)
    if not resumes_own_run(trainer):  # another run's order seed: this run's own (seed=null: drawn)
        states = [{**state, "own_seed": True} if isinstance(state, dict) else state for state in states]
    if len(states) == stateful:
        combined._load_state_dicts(states)
    else:
        log.warning(
            "the checkpoint holds the state of %d training loaders and this run has %d: their "
            "positions (and an unseeded run's order seed) are not restored", len(states), stateful,
        )  # fmt: skip
    loop._combined_loader_states_to_load = []


def early_stopped(callback: L.Callback) -> bool:
    """Whether an ``EarlyStopping`` callback (or the one restored from a checkpoint) stopped its run."""
    reason = getattr(callback, "stopping_reason", None)  # absent in older Lightning
    return reason is not None and reason.name != "NOT_STOPPED"


class SavesLastOnce(ModelCheckpoint):
    """Lightning 2.6's ``ModelCheckpoint.on_train_end`` writes ``last.ckpt`` (``save_last``) for
    a callback that has not written one yet, whatever the run: under ``fast_dev_run`` too
    (``debug=fdr``, "no checkpoints", left one), and at the end of every run shorter than
    ``StepCheckpoint``'s interval, the state ``LastCheckpoint`` had just written there again."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or last_written(trainer, self):
            return
        super().on_train_end(trainer, pl_module)


def last_written(trainer: L.Trainer, callback: ModelCheckpoint) -> bool:
    """Whether a checkpoint callback of ``callback``'s directory wrote its ``last.ckpt`` at this step."""
    return any(
        isinstance(other, ModelCheckpoint) and other.save_last and other.dirpath == callback.dirpath
        and other._last_global_step_saved == trainer.global_step and other._last_checkpoint_saved
        for other in trainer.checkpoint_callbacks
    )  # fmt: skip


class LastCheckpoint(SavesLastOnce):
    """``last.ckpt`` at the end of every training epoch, whether or not the monitored metric
    improved: Lightning 2.6 writes ``save_last`` only alongside a top-k checkpoint, so a killed
    run resumed from its last improving epoch, and a run that early stopping ended never had its
    stopped state saved. Saved in ``on_train_epoch_end``, after the epoch's validation and after
    early stopping's decision of that epoch (Lightning runs checkpoint callbacks last), so the
    state holds both; also in epochs without a validation (``check_val_every_n_epoch`` > 1); and
    always at a gradient-accumulation boundary (Lightning steps on an epoch's last batch).
    Overwritten in place (no ``last-v1.ckpt``, which ``resume=auto`` would not find)."""

    def __init__(self, dirpath: str, **kwargs: Any) -> None:
        super().__init__(
            dirpath=dirpath, save_top_k=0, save_last=True, enable_version_counter=False, **kwargs
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # at the epoch's end instead (above); mid-epoch, the step checkpoint's


class RecentCheckpoints(ModelCheckpoint):
    """The checkpoints of the last ``save_top_k`` epochs, ``epoch_NNN.ckpt`` (to average with
    ``scripts/average_checkpoints.py``): a ``ModelCheckpoint`` monitoring ``epoch`` (the latest
    kept), saved at each training epoch's end whatever the validation schedule (after a validation,
    Lightning's default elsewhere, it saved only the validated epochs of
    ``check_val_every_n_epoch`` > 1, and a mid-epoch validation's weights under the epoch's name).
    A run resumed with a smaller ``save_top_k`` removes the older ones at once: Lightning removes
    one only while it holds exactly k, so with more it removed none again. Listed before
    ``epoch_checkpoint`` (``last.ckpt``, saved after it at the epoch's end), whose checkpoint then
    records this epoch's among the kept: resumed from it, none is forgotten on disk."""

    def __init__(
        self, dirpath: str, save_top_k: int = 0, filename: str = "epoch_{epoch:03d}", **kwargs: Any
    ) -> None:
        super().__init__(
            dirpath=dirpath, filename=filename, monitor="epoch", mode="max", save_top_k=save_top_k,
            save_last=False, auto_insert_metric_name=False, enable_version_counter=False,
            save_on_train_epoch_end=True, **kwargs,
        )  # fmt: skip

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        keep = self.save_top_k
        if keep < 0 or len(self.best_k_models) <= keep:
            return
        latest = sorted(self.best_k_models, key=lambda path: float(self.best_k_models[path]), reverse=True)
        for path in latest[keep:]:
            del self.best_k_models[path]
            self._remove_checkpoint(trainer, path)
        kept = latest[:keep]
        self.best_model_path = kept[0] if kept else ""
        self.best_model_score = self.best_k_models[kept[0]] if kept else None
        self.kth_best_model_path = kept[-1] if kept else ""
        self.kth_value = self.best_k_models[kept[-1]] if kept else self.kth_value


class StepCheckpoint(SavesLastOnce):
    """``ModelCheckpoint(every_n_train_steps=N)`` (or ``train_time_interval``) that takes no
    checkpoint on a batch after which the epoch ends or a validation runs, nor inside a
    gradient-accumulation window. Lightning 2.6 saves in ``on_train_batch_end``, before the
    epoch's end and the validation, and a run resumed from there skips both: its scheduler's
    epoch step, the validation (the best checkpoint, early stopping's count) and the epoch-end
    hooks never happen, and it ends elsewhere than the uninterrupted run. A save due there is
    taken at the next optimizer step that has neither (the epoch's end has ``LastCheckpoint``'s
    as well); a run killed during such a validation resumes from the step checkpoint before it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # the gradients accumulated so far would be in no checkpoint
        if before_epoch_end_or_validation(trainer, batch_idx):
            every = self._every_n_train_steps
            self.pending = self.pending or (every >= 1 and trainer.global_step % every == 0)
            return
        if self.pending and not self._should_skip_saving_checkpoint(trainer):
            self.pending = False
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def before_epoch_end_or_validation(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the training batch that just ended is its epoch's last or is followed by a validation
    (``val_check_interval``); Lightning's own decision, which it takes right after this hook."""
    loop = trainer.fit_loop.epoch_loop
    if batch_idx + 1 >= trainer.num_training_batches or loop.batch_progress.is_last_batch:
        return True
    fetcher = trainer.fit_loop._data_fetcher
    return fetcher is not None and loop._should_check_val_fx(fetcher)


class SaveOnSigterm(L.Callback):
    """Stop training where a checkpoint is whole when SIGTERM (a pre-emption, ``kill``, a
    scheduler's time limit) or SLURM's requeue signal arrives, and write
    ``<checkpoint dir>/last.ckpt`` there; for SLURM's signal (Lightning's auto-requeue,
    ``--signal=USR1@90``), rank 0 then requeues the job (``scontrol requeue``).

    The signal handler only raises a flag. Every process decides at the same places, together
    (the flag is all-reduced there under DDP): after an optimizer step that neither ends the epoch
    nor is followed by a validation, and at the end of an epoch (after its validation and
    ``last.ckpt``). So a signal within a gradient-accumulation window stops after the window's
    step, and one during a validation after that validation. Lightning 2.6's own handling stopped
    rank 0 alone, at the end of the step, while the others went on into the next step's
    collective (a hang; Lightning #20806); its handler broadcast inside the signal handler; and
    its SLURM handler saved ``hpc_ckpt_<n>.ckpt`` inside the signal handler, wherever the
    process was (within an optimizer step; under DDP, in a barrier while the others were in a
    collective of their own).

    Outside fit (``trainer.test``) the signal stops at Lightning's next batch, and nothing is
    saved: the model holds the best checkpoint's weights, not where training stopped, and
    ``last.ckpt`` from the end of fit is where a resume picks up (fit is then over at once) and
    the test runs again."""

    def __init__(self) -> None:
        self.signalled = False
        self.requeue = False
        self.stopping = False  # this callback told Lightning to stop

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        # Lightning registers these handlers after this hook (SLURM's only under SLURM with
        # auto-requeue); the instance attributes take the place of its methods
        self.signalled = self.requeue = self.stopping = False
        connector = trainer._signal_connector
        connector._sigterm_notifier_fn = lambda signum, frame: self.on_signal(trainer, signum, requeue=False)
        connector._slurm_sigusr_handler_fn = lambda signum, frame: self.on_signal(
            trainer, signum, requeue=True
        )

    def on_signal(self, trainer: L.Trainer, signum: int, requeue: bool) -> None:
        """The signal handler: a flag, no collective and no checkpoint here. A SIGTERM is passed
        on to the processes this one launched (Lightning's script or spawn launcher: the other
        ranks), as Lightning's handler does: a SIGTERM to the main process alone (``docker
        stop``, ``kill``) stopped it alone during a test, the other ranks going on into the
        test's collectives without it."""
        if not requeue and not self.signalled:
            launcher = getattr(trainer.strategy, "launcher", None)
            if launcher is not None:
                launcher.kill(signum)
        self.signalled = True
        self.requeue = self.requeue or requeue
        if trainer.state.fn != TrainerFn.FITTING:
            trainer._signal_connector.received_sigterm = True  # Lightning stops at its next batch
        else:
            log.warning("signal %s: stopping at the next step boundary (checkpoint there)", signum)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate() or before_epoch_end_or_validation(
            trainer, batch_idx
        ):
            return  # the same decision on every process: no collective in the skipped places
        self.stop_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self.stop_if_signalled(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.stopping and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            # Lightning chose to validate after this hook's decision (a time-based
            # val_check_interval, a stop requested later in the batch): stopping inside the
            # validation would leave no checkpoint; stop after it instead
            trainer._signal_connector.received_sigterm = self.stopping = False

    def on_test_start(self, trainer: L.Trainer, pl_module) -> None:
        # a signal after fit's last decision (its last epoch's end, loading the best checkpoint):
        # the test stops at its first batch (and SLURM's job is requeued); Lightning's own flag
        # was reset when it registered its handlers for the test
        self.stop_if_signalled(trainer)

    def stop_if_signalled(self, trainer: L.Trainer) -> None:
        signalled, requeue = self.signalled, self.requeue
        if trainer.world_size > 1:  # one decision: a process that got no signal stops too
            flags = torch.tensor([float(signalled), float(requeue)], device=trainer.strategy.root_device)
            signalled, requeue = (bool(v) for v in trainer.strategy.reduce(flags, reduce_op="max").tolist())
        if signalled:
            # Lightning raises SIGTERMException right after this hook, on every process
            self.requeue, self.stopping = requeue, True
            trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        from seqlab.utils.distributed import WorkersStopped

        if not isinstance(exception, SIGTERMException) or isinstance(exception, WorkersStopped):
            return  # (ddp_spawn's main process: its workers saved; its own weights never trained)
        try:
            self.save(trainer)
        finally:
            if self.requeue and trainer.is_global_zero:
                requeue_slurm_job()

    def save(self, trainer: L.Trainer) -> None:
        if trainer.checkpoint_callback is None:
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if trainer.fit_loop.epoch_loop._should_accumulate():
            # between two optimizer steps: the gradients accumulated so far are not in a checkpoint,
            # so the resumed window would step on part of its batches
            log.warning(
                "SIGTERM while accumulating gradients (trainer.accumulate_grad_batches=%d) at step %d: "
                "no checkpoint taken there; %s resumes from the newest one before it",
                trainer.accumulate_grad_batches, trainer.global_step, same_command(),
            )  # fmt: skip
            return
        if trainer.validating:
            # a checkpoint taken between validation batches counts the epoch as trained and its
            # validation as never due: the resumed run would skip it (early stopping then fails
            # on a metric never logged, the best checkpoint misses the epoch); the newest
            # checkpoint before it is where the same command resumes, consistently
            log.warning(
                "SIGTERM during validation at step %d: no checkpoint taken there; %s resumes from the "
                "newest one before it",
                trainer.global_step, same_command(),
            )  # fmt: skip
            return
        directory = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        path = Path(directory) / "last.ckpt"
        trainer.save_checkpoint(path)
        log.warning(
            "SIGTERM: stopped at step %d, saved %s; %s resumes it", trainer.global_step, path, same_command()
        )


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this SLURM job (an array task as ``<array job>_<task>``), as Lightning's
    auto-requeue does; SLURM then ends this job and starts it again, and the same command resumes."""
    import os
    import subprocess

    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("SLURM's requeue signal outside a SLURM job (no SLURM_JOB_ID): nothing requeued")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except OSError as error:
        log.warning("could not requeue SLURM job %s: %s", job, error)
        return
    if result.returncode == 0:
        log.warning("requeued SLURM job %s: the requeued job resumes this run", job)
    else:
        log.warning("scontrol requeue %s failed (exit %d): %s", job, result.returncode, result.stderr.strip())
