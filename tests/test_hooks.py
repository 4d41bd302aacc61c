"""seqlab's callback dispatch (``seqlab.utils.hooks``) calls exactly what Lightning's calls; its progress bar
updates by time and still ends every epoch complete."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.profilers import SimpleProfiler

from seqlab.utils import hooks

#: every hook the loops call through the dispatch (state_dict & co. go another way)
HOOKS = sorted(
    name
    for name, value in vars(Callback).items()
    if callable(value) and not name.startswith("_") and name not in ("state_dict", "load_state_dict")
)


def recorder(log: list) -> Callback:
    """A callback implementing every hook, logging (callback, hook, batch_idx if any)."""

    def make(name: str):
        def hook(self, trainer, pl_module, *args, **kwargs):
            assert pl_module is trainer.lightning_module
            log.append(
                (
                    "all",
                    name,
                    kwargs.get("batch_idx", args[-1] if args and isinstance(args[-1], int) else None),
                )
            )

        return hook

    return type("Recorder", (Callback,), {name: make(name) for name in HOOKS})()


class OneHook(Callback):
    def __init__(self, log: list) -> None:
        self.calls = log

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.calls.append(("one", "on_train_batch_end", batch_idx))


class Monitor(Checkpoint):
    """A monitoring callback: Lightning calls it after the others at epoch ends."""

    def __init__(self, log: list) -> None:
        self.calls = log

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.calls.append(("monitor", "on_train_epoch_end", None))


def run(tmp_path: Path, profiler=None) -> list:
    log: list = []
    instance_hook = Callback()  # a hook set on the instance, not the class
    instance_hook.on_validation_end = lambda trainer, pl_module: log.append(
        ("instance", "on_validation_end", None)
    )
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2,
        callbacks=[Monitor(log), recorder(log), OneHook(log), instance_hook], logger=False,
        enable_progress_bar=False, enable_model_summary=False, profiler=profiler,
    )  # fmt: skip
    model = BoringModel()
    trainer.fit(model)
    trainer.test(model)
    return log


@pytest.fixture
def installed():
    hooks.install()
    yield
    hooks.uninstall()


def test_the_dispatch_calls_what_lightning_calls(tmp_path: Path, installed) -> None:
    hooks.uninstall()
    expected = run(tmp_path / "lightning")
    hooks.install()
    assert run(tmp_path / "seqlab") == expected
    epoch_ends = [who for who, name, _ in expected if name == "on_train_epoch_end"]
    assert epoch_ends == ["all", "monitor"] * 2
    assert ("one", "on_train_batch_end", 2) in expected and (
        "instance",
        "on_validation_end",
        None,
    ) in expected
    assert {name for _, name, _ in expected} >= {
        "on_train_batch_start",
        "on_before_optimizer_step",
        "on_test_end",
    }


def test_only_callbacks_implementing_a_hook_are_called(installed) -> None:
    assert hooks.implements(OneHook([]), "on_train_batch_end")
    assert not hooks.implements(OneHook([]), "on_train_batch_start")
    instance = Callback()
    assert not hooks.implements(instance, "on_fit_start")
    instance.on_fit_start = lambda trainer, pl_module: None
    assert hooks.implements(instance, "on_fit_start")


def test_a_configured_profiler_still_times_every_callback(tmp_path: Path, installed) -> None:
    profiler = SimpleProfiler()
    run(tmp_path, profiler=profiler)
    timed = set(profiler.recorded_durations)
    assert any(key.startswith("[Callback]") and key.endswith("OneHook.on_train_batch_start") for key in timed)


@pytest.mark.parametrize("interval,expected_updates", [(0.0, 5), (3600.0, 2)])
def test_the_progress_bar_updates_by_time_and_ends_each_epoch_complete(
    tmp_path: Path, interval: float, expected_updates: int
) -> None:
    from seqlab.callbacks import RichProgressBar

    updates: list[int] = []

    class Counting(RichProgressBar):
        def _update(self, progress_bar_id, current, visible=True, hard=False) -> None:
            if progress_bar_id is not None and progress_bar_id == self.train_progress_bar_id:
                updates.append(current)
            super()._update(progress_bar_id, current, visible, hard)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            task = self.progress.tasks[self.train_progress_bar_id]
            assert task.completed == task.total == 5, "the bar ends the epoch at its last batch"
            super().on_train_epoch_end(trainer, pl_module)

    bar = Counting(update_interval_s=interval)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=2, limit_train_batches=5, limit_val_batches=1, logger=False,
        callbacks=[bar], enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert len(updates) == 2 * expected_updates and updates[-1] == 5
