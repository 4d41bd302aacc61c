"""seqlab's hook dispatch (``seqlab.utils.hooks``) calls exactly what Lightning's calls (callback,
module and strategy hooks, with the same ``_current_fx_name``); its progress bar updates by time
and still ends every epoch complete."""

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


#: LightningModule methods the loops call through the module and strategy hook dispatch
MODULE_HOOKS = (
    "training_step", "validation_step", "test_step", "backward", "optimizer_step", "optimizer_zero_grad",
    "configure_gradient_clipping", "lr_scheduler_step", "transfer_batch_to_device", "on_before_batch_transfer",
    "on_after_batch_transfer", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "on_before_zero_grad", "on_train_batch_start", "on_train_batch_end", "on_validation_epoch_end",
    "on_train_epoch_end", "on_fit_start", "configure_optimizers", "on_test_end",
)  # fmt: skip


def recording_model(log: list) -> BoringModel:
    """A BoringModel logging each hook call with the ``_current_fx_name`` it runs under."""

    def make(name: str):
        def hook(self, *args, **kwargs):
            log.append(("module", name, self._current_fx_name))
            return getattr(BoringModel, name)(self, *args, **kwargs)

        return hook

    return type("Recording", (BoringModel,), {name: make(name) for name in MODULE_HOOKS})()


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
    model = recording_model(log)
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
    epoch_ends = [who for who, name, _ in expected if name == "on_train_epoch_end" and who != "module"]
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
    module_calls = {(name, fx) for who, name, fx in expected if who == "module"}
    assert {(name, name) for name in MODULE_HOOKS} <= module_calls, "every module hook, under its own name"


def test_only_callbacks_implementing_a_hook_are_called(installed) -> None:
    assert hooks.implements(OneHook([]), "on_train_batch_end")
    assert not hooks.implements(OneHook([]), "on_train_batch_start")
    instance = Callback()
    assert not hooks.implements(instance, "on_fit_start")
    instance.on_fit_start = lambda trainer, pl_module: None
    assert hooks.implements(instance, "on_fit_start")


def test_module_hooks_with_empty_bodies_are_not_called(installed) -> None:
    """A LightningModule's hook is skipped only where calling it could do nothing: Lightning's
    empty defaults (and empty overrides); overrides with a body, hooks set on the instance and
    Lightning's non-empty defaults are called."""

    class Model(BoringModel):
        def on_after_backward(self) -> None:
            self.seen = True

        def on_before_zero_grad(self, optimizer) -> None:
            """Documented, nothing else."""

    model = Model()
    assert hooks.implements(model, "on_after_backward") and not hooks.implements(model, "on_before_zero_grad")
    assert not hooks.implements(model, "on_train_batch_start") and not hooks.implements(
        model, "on_before_backward"
    )
    for default_with_a_body in (
        "transfer_batch_to_device",
        "on_before_batch_transfer",
        "optimizer_step",
        "backward",
    ):
        assert hooks.implements(model, default_with_a_body)
    model.on_before_backward = lambda loss: None
    assert hooks.implements(model, "on_before_backward")
    assert hooks.is_empty(lambda: None) and not hooks.is_empty(lambda: 0) and not hooks.is_empty(len)


def test_the_remembered_signature_check_answers_as_lightnings(installed) -> None:
    import functools
    import gc
    import weakref

    from lightning.pytorch.loops import training_epoch_loop

    class Model(BoringModel):
        def with_index(self, batch, batch_idx): ...

        def without_index(self, batch): ...

        def star(self, *args): ...

        @functools.wraps(without_index)
        def decorated(self, *args, **kwargs): ...

    model = Model()
    assert training_epoch_loop.is_param_in_hook_signature is hooks.is_param_in_hook_signature
    for name in ("with_index", "without_index", "star", "decorated", "training_step"):
        for kwargs in ({}, {"min_args": 2}, {"explicit": True}):
            for _ in range(2):  # computed, then remembered
                ours = hooks.is_param_in_hook_signature(getattr(model, name), "batch_idx", **kwargs)
                assert ours == hooks._lightning_signature_check(getattr(model, name), "batch_idx", **kwargs)
    assert hooks.is_param_in_hook_signature(lambda batch, batch_idx: None, "batch_idx")
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None, "the cache keeps no module alive"


def test_data_hooks_run_where_lightnings_selector_runs_them(tmp_path: Path, installed) -> None:
    """The batch transfer's data hooks run on the datamodule or the module as Lightning picks
    them; seqlab asks which once per fit and hook, not for every batch."""
    import torch
    from lightning.pytorch.demos.boring_classes import BoringDataModule
    from lightning.pytorch.trainer.connectors import data_connector

    def fit(log: list) -> None:
        class Data(BoringDataModule):
            def transfer_batch_to_device(self, batch, device, dataloader_idx):
                log.append(("datamodule", "transfer_batch_to_device"))
                return super().transfer_batch_to_device(batch, device, dataloader_idx)

        class Model(BoringModel):
            def on_after_batch_transfer(self, batch, dataloader_idx):
                log.append(("module", "on_after_batch_transfer"))
                return batch * 1

        torch.manual_seed(0)
        trainer = L.Trainer(
            default_root_dir=tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=2,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(Model(), datamodule=Data())

    asked: list[str] = []
    original = data_connector.is_overridden
    data_hooks = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")

    def counting(name, *args, **kwargs):
        if name in data_hooks:
            asked.append(name)
        return original(name, *args, **kwargs)

    data_connector.is_overridden = counting
    try:
        hooks.uninstall()
        expected: list = []
        fit(expected)
        asked_by_lightning = len(asked)
        asked.clear()
        hooks.install()
        ours: list = []
        fit(ours)
    finally:
        data_connector.is_overridden = original
    assert ours == expected
    assert expected.count(("datamodule", "transfer_batch_to_device")) == 2 * 4 + 2 * 2 + 2  # + sanity check
    assert expected.count(("module", "on_after_batch_transfer")) == 2 * 4 + 2 * 2 + 2
    # Lightning: up to two checks per hook and batch; seqlab: up to two per hook
    assert asked_by_lightning >= 3 * 14 and len(asked) <= 2 * 3, "once per hook and fit, not per batch"


def test_the_closure_result_skips_only_the_division_by_one(installed) -> None:
    import torch

    weight = torch.tensor(3.0, requires_grad=True)
    loss = weight * 2
    result = hooks.ClosureResultUndivided.from_training_step_output(loss, 1)
    assert result.closure_loss is loss
    assert result.loss == loss and not result.loss.requires_grad
    assert result.loss.data_ptr() != loss.data_ptr(), "the reported loss is still a copy"
    accumulated = hooks.ClosureResultUndivided.from_training_step_output(loss, 4)
    assert accumulated.closure_loss == loss / 4 and accumulated.loss == 1.5
    mapping = hooks.ClosureResultUndivided.from_training_step_output({"loss": loss, "extra": 7}, 1)
    assert mapping.closure_loss == loss and mapping.extra == {"extra": 7}


@pytest.mark.parametrize("accumulate", [1, 3])
def test_training_gives_the_same_weights_as_with_lightnings_loop(tmp_path: Path, accumulate: int) -> None:
    import torch

    class Model(BoringModel):
        def training_step(self, batch, batch_idx):
            return self.step(batch)  # a tensor, as seqlab's tasks return

    def fit() -> dict:
        torch.manual_seed(0)
        model = Model()
        trainer = L.Trainer(
            default_root_dir=tmp_path, max_epochs=2, limit_train_batches=6, limit_val_batches=1,
            accumulate_grad_batches=accumulate, gradient_clip_val=100.0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(model)
        return {name: value.clone() for name, value in model.state_dict().items()}

    hooks.uninstall()
    try:
        expected = fit()
    finally:
        hooks.install()
    try:
        ours = fit()
    finally:
        hooks.uninstall()
    assert ours.keys() == expected.keys()
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name


def test_a_configured_profiler_still_times_every_callback(tmp_path: Path, installed) -> None:
    profiler = SimpleProfiler()
    run(tmp_path, profiler=profiler)
    timed = set(profiler.recorded_durations)
    assert any(key.startswith("[Callback]") and key.endswith("OneHook.on_train_batch_start") for key in timed)
    assert "[LightningModule]Recording.on_after_backward" in timed
    assert "[Strategy]SingleDeviceStrategy.training_step" in timed


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


def test_the_training_loss_is_shown_without_a_conversion_per_step(
    tmp_path: Path, make_cfg, installed
) -> None:
    """seqlab's tasks log ``train/loss`` at logging steps without ``prog_bar``, so Lightning does
    not convert a progress-bar value to a number (``.item()``: a device synchronisation on a GPU)
    after every training step; the bar still shows the loss, from the callback metrics."""
    from lightning.pytorch.trainer.connectors.logger_connector import result

    from seqlab.callbacks import RichProgressBar
    from seqlab.train import build_datamodule, build_task

    conversions: list[int] = []
    original = result.convert_tensors_to_scalars

    def counting(value):
        conversions.append((trainer.global_step, trainer.state.stage))
        return original(value)

    class Steps(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.steps = getattr(self, "steps", 0) + 1

    cfg = make_cfg("trainer.accelerator=cpu", "model=lstm", "model.d_model=16", "model.num_layers=1")
    datamodule = build_datamodule(cfg.data)
    task = build_task(cfg.task, cfg.model, datamodule)
    bar, steps = RichProgressBar(), Steps()
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=2, limit_train_batches=12, limit_val_batches=1, log_every_n_steps=5,
        callbacks=[bar, steps], enable_checkpointing=False, enable_model_summary=False, logger=False,
    )  # fmt: skip
    original_log = task.log
    logged = []
    task.log = lambda name, *args, **kwargs: logged.append(name) or original_log(name, *args, **kwargs)
    result.convert_tensors_to_scalars = counting
    try:
        trainer.fit(task, datamodule=datamodule)
    finally:
        result.convert_tensors_to_scalars = original
    assert steps.steps == 24 and logged.count("train/loss") == 4  # steps 5, 10, 15, 20
    assert [step for step, stage in conversions if stage == "train"] == [], (
        "no conversion after training steps"
    )
    assert isinstance(bar.get_metrics(trainer, task)["train/loss"], float)


def fit_counting_assignments(tmp_path: Path, make_cfg, monkeypatch) -> tuple[list[str], int, float, float]:
    """Fit a seqlab task for 8 steps without logging steps, counting every ``nn.Module``
    attribute assignment made from the start of step 2 to the end of step 5: (the names
    assigned, the steps in that window, the mean training loss, ``train/loss_epoch``)."""
    import torch

    from seqlab.train import build_datamodule, build_task

    assigned: list[str] = []
    window = {"open": False, "steps": 0}
    losses: list[float] = []
    original = torch.nn.Module.__setattr__

    def counting(self, name, value):
        if window["open"]:
            assigned.append(name)
        original(self, name, value)

    class Window(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            window["open"] = window["open"] or batch_idx == 2

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            window["steps"] += window["open"]
            window["open"] = window["open"] and batch_idx < 5
            losses.append(float(outputs["loss"]))

    cfg = make_cfg("trainer.accelerator=cpu", "model=lstm", "model.d_model=16", "model.num_layers=1")
    datamodule = build_datamodule(cfg.data)
    task = build_task(cfg.task, cfg.model, datamodule)
    assert type(task).__setattr__ is hooks._module_setattr  # a task assigns through the default
    # the default Module.__setattr__, counted (and still recognised as the default)
    monkeypatch.setattr(torch.nn.Module, "__setattr__", counting)
    monkeypatch.setattr(hooks, "_module_setattr", counting)
    monkeypatch.setattr(hooks, "_plain_fx_name", {})
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=1, limit_train_batches=8, limit_val_batches=0,
        log_every_n_steps=1000, callbacks=[Window()], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, logger=False,
    )  # fmt: skip
    trainer.fit(task, datamodule=datamodule)
    assert trainer.global_step == 8 and not window["open"]
    return (
        assigned,
        window["steps"],
        sum(losses) / len(losses),
        float(trainer.callback_metrics["train/loss_epoch"]),
    )


def test_training_steps_assign_no_module_attribute(tmp_path: Path, make_cfg, installed, monkeypatch) -> None:
    """Assigning an attribute of an ``nn.Module`` costs ~2-3 us (``hooks.set_fx_name``): a
    training step that does not log makes no such assignment, neither the dispatch (the hook
    name, set and restored ~34 times a step) nor the task (its epoch loss sum, still right)."""
    assigned, steps, mean_loss, epoch_loss = fit_counting_assignments(
        tmp_path / "fast", make_cfg, monkeypatch
    )
    assert steps == 4 and assigned == [], "steps 2-5 assigned module attributes"
    assert epoch_loss == pytest.approx(mean_loss, rel=1e-5)
    # the counter sees the hook name when it is assigned the usual way
    monkeypatch.setattr(hooks, "set_fx_name", lambda module, name: setattr(module, "_current_fx_name", name))
    assigned, steps, _, _ = fit_counting_assignments(tmp_path / "usual", make_cfg, monkeypatch)
    assert steps == 4 and assigned.count("_current_fx_name") >= 30 * steps


def test_the_hook_name_goes_through_an_overriding_setattr_or_property() -> None:
    """A module whose class overrides ``__setattr__``, or defines ``_current_fx_name`` as a
    property, sees every hook name assigned through it."""
    seen: list = []

    class Watching(BoringModel):
        def __setattr__(self, name, value):
            if name == "_current_fx_name":
                seen.append(value)
            super().__setattr__(name, value)

    class Property(BoringModel):
        @property
        def _current_fx_name(self):
            return self.__dict__.get("_current_fx_name")

        @_current_fx_name.setter
        def _current_fx_name(self, value):
            seen.append(value)
            self.__dict__["_current_fx_name"] = value

    plain, watching, with_property = BoringModel(), Watching(), Property()
    seen.clear()
    for model in (plain, watching, with_property):
        hooks.set_fx_name(model, "training_step")
        assert model._current_fx_name == "training_step"
        hooks.set_fx_name(model, None)
        assert model._current_fx_name is None
    assert seen == ["training_step", None] * 2
