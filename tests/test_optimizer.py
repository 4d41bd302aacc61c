"""``task.optimizer``: torch's fused kernel by default (``fused: auto``) where it has one, the same
update rule as torch's per-tensor loop, and a clear error for a value it cannot mean."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from seqlab.errors import ConfigError
from seqlab.tasks.base import fused_by_default
from seqlab.train import build_datamodule, build_task, train
from seqlab.utils.precision import fusable

TASK_DATA = {"forecasting": "data=timeseries", "classification": "data=sentiment_synthetic",
             "translation": "data=translation_synthetic"}  # fmt: skip


def build(make_cfg, *overrides: str):
    text = any(o.startswith("data=") and o != "data=timeseries" for o in overrides)  # FAST is the series'
    cfg = make_cfg("model=lstm", "model.d_model=16", "model.num_layers=1", *overrides, fast=not text)
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    return build_task(cfg.task, cfg.model, datamodule), datamodule


@pytest.mark.parametrize("task", TASK_DATA)
def test_every_task_builds_the_fused_adamw_on_cpu(make_cfg, task: str) -> None:
    model, _ = build(make_cfg, TASK_DATA[task])
    optimizer, _ = model.build_optimizer(100)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
    forced_off, _ = build(make_cfg, TASK_DATA[task], "task.optimizer.fused=false")
    assert not forced_off.build_optimizer(100)[0].defaults["fused"]


def test_the_fused_step_trains_as_the_per_tensor_loop(make_cfg) -> None:
    """Same hyperparameters reach the kernel (learning rate, betas, the no-decay group): twenty
    steps on the same batches give the same weights, to float32 rounding."""
    weights = []
    for fused in ("auto", "false"):
        torch.manual_seed(0)
        model, datamodule = build(
            make_cfg, f"task.optimizer.fused={fused}", "task.optimizer.weight_decay=0.1"
        )
        optimizer, scheduler = model.build_optimizer(20)
        assert optimizer.defaults["fused"] is (fused == "auto")
        batches = iter(datamodule.train_dataloader())
        for _ in range(20):
            optimizer.zero_grad()
            model.step_loss(next(batches)).backward()
            optimizer.step()
            scheduler.step()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.manual_seed(0)
    initial = torch.cat(
        [p.detach().flatten() for p in build(make_cfg, "task.optimizer.weight_decay=0.1")[0].parameters()]
    )
    assert not torch.allclose(weights[0], initial)  # the steps did move the weights
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def test_auto_keeps_torch_default_where_there_is_no_fused_kernel(make_cfg) -> None:
    # RMSprop has no `fused` argument: auto must not pass one
    model, _ = build(make_cfg, "task.optimizer._target_=torch.optim.RMSprop")
    assert type(model.build_optimizer(10)[0]) is torch.optim.RMSprop

    cpu = [torch.nn.Parameter(torch.randn(2))]
    assert fused_by_default(torch.optim.AdamW, [{"params": cpu}], {})
    assert fused_by_default(torch.optim.SGD, [{"params": cpu}], {})
    assert not fused_by_default(torch.optim.Adamax, [{"params": cpu}], {})
    mixed = [{"params": cpu}, {"params": [torch.nn.Parameter(torch.randn(2, device="meta"))]}]
    assert not fused_by_default(torch.optim.AdamW, mixed, {})  # one device type only
    assert not fused_by_default(torch.optim.AdamW, [{"params": [torch.zeros(2, dtype=torch.int64)]}], {})
    # torch takes neither foreach nor differentiable together with fused
    assert not fused_by_default(torch.optim.AdamW, [{"params": cpu}], {"foreach": True})
    assert not fused_by_default(torch.optim.AdamW, [{"params": cpu}], {"differentiable": True})
    model, _ = build(make_cfg, "+task.optimizer.foreach=true")
    assert model.build_optimizer(10)[0].defaults["foreach"] is True

    class MyAdamW(torch.optim.AdamW):  # a subclass may not take `fused`
        pass

    assert not fused_by_default(MyAdamW, [{"params": cpu}], {})


def test_a_fused_value_that_means_nothing_is_refused(make_cfg) -> None:
    model, _ = build(make_cfg, "task.optimizer.fused=sometimes")
    with pytest.raises(
        ConfigError, match=r"task.optimizer.fused must be auto, true or false, got 'sometimes'"
    ):
        model.build_optimizer(10)


def test_no_fused_optimizer_where_the_precision_plugin_cannot_clip_it(make_cfg) -> None:
    """A fused optimizer unscales inside its step: with a gradient scaler (16-mixed) clipping would
    see scaled gradients, and Lightning's MixedPrecision refuses even without one; seqlab's
    bf16-mixed plugin clips it; DeepSpeed's and FSDP's mixed precision keep torch's default."""
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision, MixedPrecision, Precision

    from seqlab.utils.precision import BF16MixedPrecision, FSDPPrecision

    lightning_bf16, seqlab_bf16 = MixedPrecision("bf16-mixed", "cpu"), BF16MixedPrecision("cpu")
    assert fusable(Precision(), 1.0) and fusable(lightning_bf16, None) and fusable(lightning_bf16, 0.0)
    assert not fusable(lightning_bf16, 1.0) and fusable(seqlab_bf16, 1.0)
    with warnings.catch_warnings():  # a CPU-only machine warns that it disables the scaler
        warnings.simplefilter("ignore", UserWarning)
        fp16 = MixedPrecision("16-mixed", "cuda", scaler=torch.amp.GradScaler("cuda"))
    assert not fusable(fp16, 0.5) and fusable(fp16, None)
    assert not fusable(FSDPPrecision("bf16-mixed", torch.nn.Linear(1, 1)), 1.0)
    assert fusable(FSDPPrecision("32-true", torch.nn.Linear(1, 1)), 1.0)
    assert not fusable(DeepSpeedPrecision("bf16-mixed"), 1.0) and fusable(DeepSpeedPrecision("32-true"), 1.0)
    model, _ = build(make_cfg)
    assert model.build_optimizer(10, fusable_here=False)[0].defaults["fused"] is None  # torch's default
    forced, _ = build(make_cfg, "task.optimizer.fused=true")
    with pytest.raises(ConfigError, match=r"task.optimizer.fused=true.*trainer.gradient_clip_val"):
        forced.build_optimizer(10, fusable_here=False)


def test_bf16_mixed_clips_a_fused_optimizer_as_any_other(make_cfg) -> None:
    """bf16-mixed with clipping at every step (norm 0.01): seqlab's Trainer fuses AdamW, and trains
    the weights torch's per-tensor loop trains (clipping on: without it they move elsewhere)."""
    from seqlab.train import train
    from seqlab.utils.precision import BF16MixedPrecision

    weights = {}
    for name, extra in (("fused", []), ("loop", ["task.optimizer.fused=false"]),
                        ("unclipped", ["trainer.gradient_clip_val=null"])):  # fmt: skip
        cfg = make_cfg("model.d_model=16", "model.dropout=0.0", "trainer.precision=bf16-mixed",
                       "trainer.gradient_clip_val=0.01", "trainer.max_epochs=1", "trainer.limit_train_batches=5",
                       "trainer.limit_val_batches=1", "test=false", *extra, output=name)  # fmt: skip
        _, objects = train(cfg)
        trainer = objects["trainer"]
        assert isinstance(trainer.precision_plugin, BF16MixedPrecision) and trainer.precision == "bf16-mixed"
        assert bool(trainer.optimizers[0].defaults["fused"]) is (name != "loop")
        assert objects["summary"]["global_step"] == 5
        weights[name] = torch.cat([p.detach().flatten() for p in objects["task"].parameters()])
    torch.testing.assert_close(weights["fused"], weights["loop"], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(weights["fused"], weights["unclipped"], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("saved_fused", [None, True])
def test_restoring_an_optimizer_keeps_the_kernel_it_was_built_with(make_cfg, saved_fused) -> None:
    """A checkpoint from before ``fused: auto`` (fused None) or with it: the built kernel stays."""
    model, datamodule = build(make_cfg)
    saved = torch.optim.AdamW(model.parameter_groups(0.0), lr=1e-3, fused=saved_fused)
    model.step_loss(next(iter(datamodule.train_dataloader()))).backward()
    saved.step()
    for fused, expected in (("auto", True), ("false", False)):
        optimizer = build(make_cfg, f"task.optimizer.fused={fused}")[0].build_optimizer(10)[0]
        optimizer.load_state_dict(saved.state_dict())
        assert all(bool(group["fused"]) is expected for group in optimizer.param_groups)


def test_a_restored_fused_optimizer_gets_its_step_counters_where_the_kernel_wants_them(make_cfg) -> None:
    """torch leaves an unfused state's ``step`` counters as they were saved (on the CPU, for CUDA
    parameters: a fused CUDA step then fails); restored into a fused optimizer they become float32
    on the parameters' device. A counter saved as float64 stands in for the CPU-side one here."""
    model, datamodule = build(make_cfg)
    saved = torch.optim.AdamW(model.parameter_groups(0.0), lr=1e-3, fused=False)
    model.step_loss(next(iter(datamodule.train_dataloader()))).backward()
    saved.step()
    state = saved.state_dict()
    for param_state in state["state"].values():
        param_state["step"] = param_state["step"].double()
    restored, _ = build(make_cfg)
    optimizer = restored.build_optimizer(10)[0]
    optimizer.load_state_dict(state)
    steps = [optimizer.state[p]["step"] for group in optimizer.param_groups for p in group["params"]]
    assert steps and all(s.dtype == torch.float32 and s.device == torch.device("cpu") for s in steps)
    assert all(float(s) == 1.0 for s in steps)
    restored.step_loss(next(iter(datamodule.train_dataloader()))).backward()
    optimizer.step()  # the fused kernel takes them
    assert all(
        float(optimizer.state[p]["step"]) == 2.0 for group in optimizer.param_groups for p in group["params"]
    )


def test_a_precision_that_casts_the_model_keeps_what_is_measured_in_float32(make_cfg) -> None:
    """``bf16-true`` casts the model and, in Lightning, every floating tensor of the batch and every
    torchmetrics state. The forecaster's targets and the baselines' inputs stay the data's and
    metric states stay float32, so the baselines (which do not depend on the model) equal those of
    a float32 run exactly, while the model itself computes in bf16."""
    from torchmetrics import Metric

    runs, truths = {}, {}
    for precision in ("32-true", "bf16-true"):
        cfg = make_cfg("trainer.max_epochs=1", f"trainer.precision={precision}", output=precision)
        _, objects = train(cfg)
        runs[precision] = objects["summary"]
        task = objects["task"]
        expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
        assert task.embed.weight.dtype == expected
        # the original scale: the data scaler's statistics, not their bf16 rounding
        assert task.scaler_std.dtype == torch.float32
        assert torch.equal(task.scaler_std, torch.tensor(task.hparams.scaler_std))
        table = Path(cfg.paths.output_dir) / "tables" / "test_first_predictions.csv"
        truths[precision] = [row.split(",")[1] for row in table.read_text().splitlines()[1:]]
        for metric in (m for m in task.modules() if isinstance(m, Metric)):
            for name, default in metric._defaults.items():
                if isinstance(default, torch.Tensor) and default.is_floating_point():
                    assert getattr(metric, name).dtype == default.dtype == torch.float32, (metric, name)
    assert truths["bf16-true"] == truths["32-true"]
    assert runs["bf16-true"]["baseline"] == runs["32-true"]["baseline"]
    assert runs["bf16-true"]["metrics"] != runs["32-true"]["metrics"]  # the model did run in bf16
    assert runs["bf16-true"]["trainer"]["precision"] == "bf16-true"


def test_translation_keeps_its_metric_states_in_float32_under_a_cast_model(make_cfg) -> None:
    """The translation task's own ``setup`` (its sacreBLEU check) skipped the base class's, which
    keeps the metric states float32: bf16-true summed ``val/loss`` over a split in bf16."""
    from torchmetrics import Metric

    cfg = make_cfg("data=translation_synthetic", "data.num_train=256", "model=gru", "model.d_model=16",
                   "trainer.max_epochs=1", "trainer.precision=bf16-true", "extras.print_config=false",
                   "callbacks.rich_progress_bar=null", fast=False)  # fmt: skip
    _, objects = train(cfg)
    task = objects["task"]
    assert task.tgt_embed.weight.dtype == torch.bfloat16
    states = [getattr(m, name) for m in task.modules() if isinstance(m, Metric) for name in m._defaults]
    floating = [s for s in states if isinstance(s, torch.Tensor) and s.is_floating_point()]
    assert floating and all(s.dtype == torch.float32 for s in floating)


def test_the_epoch_loss_of_a_bf16_model_is_summed_in_float32(make_cfg) -> None:
    """A bf16 model's loss is bf16 (classification under bf16-true or DeepSpeed bf16); its
    epoch's sum stopped growing at 128, so a 1,000-step epoch of 0.45 logged ~0.13."""
    model, _ = build(make_cfg, "data=sentiment_synthetic")
    logged = {}
    model.step_loss = lambda batch: torch.tensor(0.45, dtype=torch.bfloat16)
    model._logging_step = lambda: False
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    for step in range(1000):
        model.training_step(None, step)
    model.on_train_epoch_end()
    assert logged["train/loss_epoch"] == pytest.approx(0.449, abs=1e-3)  # bf16's 0.45 is 0.4492


def learning_rates(scheduler, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def test_warmup_steps_when_set_win_over_the_configs_ratio(make_cfg) -> None:
    """Every task config sets warmup_ratio 0.05, and the ratio won whenever it gave a step:
    ``+task.scheduler.warmup_steps=40`` over 100 steps warmed up for 5 steps, silently."""
    model, _ = build(make_cfg, "task.scheduler.warmup_steps=40", "task.optimizer.lr=1.0")
    rates = learning_rates(model.build_optimizer(100)[1], 100)
    assert rates[:3] == pytest.approx([1 / 40, 2 / 40, 3 / 40]) and rates[39] == pytest.approx(1.0)
    model, _ = build(make_cfg, "task.optimizer.lr=1.0")  # the ratio: 5 of 100 steps
    assert learning_rates(model.build_optimizer(100)[1], 5) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    model, _ = build(make_cfg, "task.scheduler.warmup_ratio=null", "task.optimizer.lr=1.0")  # no warm-up
    assert learning_rates(model.build_optimizer(100)[1], 1) == pytest.approx([1.0])


def test_the_inverse_square_root_schedule_is_fairseqs(make_cfg) -> None:
    """fairseq's inverse_sqrt: a linear warm-up to the peak, then peak * sqrt(warmup / step)."""
    model, _ = build(
        make_cfg, "task.scheduler.name=inverse_sqrt", "task.scheduler.warmup_steps=4", "task.optimizer.lr=1.0",
        "task.scheduler.min_lr_ratio=0.0",
    )  # fmt: skip
    rates = learning_rates(model.build_optimizer(100)[1], 100)
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[15] == pytest.approx(0.5) and rates[99] == pytest.approx(0.2)  # sqrt(4 / 16), sqrt(4 / 100)
    with pytest.raises(
        ConfigError, match=r"task.scheduler.name='rsqrt': expected one of \[.*'inverse_sqrt'\]"
    ):
        build(make_cfg, "task.scheduler.name=rsqrt")[0].build_optimizer(100)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task.scheduler.warmup_steps=-1", r"task.scheduler.warmup_steps=-1: expected a whole number"),
        ("task.scheduler.warmup_steps=0.5", r"task.scheduler.warmup_steps=0.5: expected a whole number"),
        ("task.scheduler.warmup_ratio=1.5", r"task.scheduler.warmup_ratio=1.5: expected a share"),
        ("task.scheduler.min_lr_ratio=-0.1", r"task.scheduler.min_lr_ratio=-0.1: expected the final share"),
    ],
)
def test_bad_schedule_settings_name_the_key(make_cfg, override: str, message: str) -> None:
    model, _ = build(make_cfg, override)
    with pytest.raises(ConfigError, match=message):
        model.build_optimizer(100)


def test_an_open_ended_run_with_a_schedule_says_what_to_set(make_cfg, tmp_path: Path) -> None:
    """``trainer.max_epochs=-1`` without ``max_steps``: the schedule's step count is infinite
    (OverflowError: cannot convert float infinity to integer, naming nothing)."""
    import lightning as L

    model, datamodule = build(make_cfg)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"task.scheduler needs the run's number of optimizer steps, and it is inf"
    ):
        trainer.fit(model, datamodule=datamodule)
    # no step at all (max_steps=0: Lightning's way to skip training) is no error
    skipping = L.Trainer(
        default_root_dir=tmp_path, max_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    skipping.fit(model, datamodule=datamodule)
    assert skipping.global_step == 0


def test_a_checkpoint_without_a_schedule_leaves_this_runs_schedule_its_first_rate() -> None:
    """Loaded into a run with a warm-up schedule, an optimizer state saved without one (the other
    run's ``task.scheduler=null``, so no scheduler state to load) put back that run's rate: the
    first step ran at 5x this run's peak, with no warm-up."""
    from seqlab.tasks.base import ConfiguredLambdaLR, keep_settings_on_load

    weights = [torch.nn.Parameter(torch.ones(3))]
    other = torch.optim.AdamW(weights, lr=5e-3, weight_decay=0.1)
    weights[0].grad = torch.ones(3)
    other.step()
    mine = torch.optim.AdamW(weights, lr=1e-3, weight_decay=0.0)
    keep_settings_on_load(mine)
    schedule = ConfiguredLambdaLR(mine, lambda step: min(1.0, (step + 1) / 10))
    before = dict(mine.param_groups[0], params=None)
    mine.load_state_dict(other.state_dict())
    group = mine.param_groups[0]
    assert (group["lr"], group["initial_lr"], group["weight_decay"]) == (1e-4, 1e-3, 0.0) == (
        before["lr"], before["initial_lr"], before["weight_decay"]
    )  # fmt: skip
    assert int(mine.state[weights[0]]["step"]) == 1  # the moments are the checkpoint's
    saved = schedule.state_dict()
    schedule.load_state_dict({**saved, "last_epoch": 4, "base_lrs": [5e-3]})  # another run's position
    assert schedule.base_lrs == [1e-3] and group["lr"] == pytest.approx(1e-3 * 0.5)
