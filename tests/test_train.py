"""End to end in one process: every backbone learns, the run directory is complete, eval reproduces."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from seqlab.errors import ConfigError, DataError
from seqlab.eval import evaluate
from seqlab.train import train
from tests.conftest import FAST, ROOT, run_script
from tests.faults import initial_weights

BACKBONES = ["rnn", "lstm", "gru", "transformer", "mingru", "minlstm"]


@pytest.mark.parametrize("model", BACKBONES)
def test_every_backbone_beats_the_naive_baselines(make_cfg, model: str) -> None:
    cfg = make_cfg(f"model={model}")
    metrics, objects = train(cfg)
    summary = objects["summary"]
    mse = summary["metrics"]["test/mse"]
    assert summary["model"] == model
    assert summary["d_model"] == 32  # the width built (FAST's model.d_model; model.size's solved one)
    # clearly better than both baselines, not just marginally
    assert mse < 0.5 * summary["baseline"]["last"]["mse"]
    assert mse < 0.5 * summary["baseline"]["seasonal"]["mse"]
    assert summary["best"]["val/mse_best"] <= metrics["val/mse"] + 1e-9


@pytest.mark.parametrize(
    "options",
    [
        ("task.channel_independence=false",),  # one token stream of all channels
        ("task.revin=false",),
        ("task.revin_affine=true",),
        ("task.head=mean", "model=gru", "trainer.max_epochs=8"),
        ("task.head=last", "model=lstm", "trainer.max_epochs=8"),
    ],
    ids=lambda options: ",".join(options),
)
def test_forecasting_options_learn(make_cfg, options: tuple[str, ...]) -> None:
    """The forecasting task's other settings (the defaults are channel-independent patches, RevIN
    without affine terms, a flatten head) build, train and beat the naive baselines (a pooled head
    learns slower: measured test MSE 0.27 and 0.15 after 8 epochs, 0.62 and 0.54 after 3, against
    0.63 for the seasonal baseline)."""
    metrics, objects = train(make_cfg(*options))
    summary = objects["summary"]
    assert metrics["test/mse"] < 0.7 * min(
        summary["baseline"]["last"]["mse"], summary["baseline"]["seasonal"]["mse"]
    )
    hp = objects["task"].hparams
    for option in options:
        key, value = option.split("=")
        if key.startswith("task."):
            assert str(hp[key[5:]]).lower() == value, option


def test_run_directory_holds_everything(make_cfg, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    cfg = make_cfg("trainer.max_epochs=1", f"paths.log_dir={logs}", "resume=auto")
    train(cfg)
    run = tmp_path / "run"
    # an in-process run (tests, benchmarks) writes into its output directory and nowhere else:
    # resolving hydra.run.dir's run_stamp took a timestamped directory under paths.log_dir
    assert not logs.exists()
    for name in ("config.yaml", "overrides.yaml", "git.txt", "metrics.csv", "summary.json", "hparams.yaml"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "plots" / "test_predictions.png").stat().st_size > 10_000
    assert not list(run.rglob("*.tmp")), "no temporary checkpoint files are left behind"
    summary = json.loads((run / "summary.json").read_text())
    plotted = summary["test_report"]["plotted_windows"]  # first and last test window, two between
    assert len(plotted) == 4 and plotted[0] == 0 and plotted[-1] > plotted[-2] > plotted[1] > 0
    required = {"task", "data", "model", "trainer", "metrics", "baseline", "wall_s", "train_samples_per_s",
                "train_tokens_per_s", "flops_per_token", "time_to_first_step_s", "peak_memory_mb",
                "num_params", "epochs", "global_step"}  # fmt: skip
    assert required <= set(summary)
    assert summary["train_samples_per_s"] > 0 and summary["peak_memory_mb"] > 0
    # a forecasting sample is 4 channels x 7 patch tokens (FAST: look-back 48, patches of 8, one
    # stride of end padding)
    assert summary["train_tokens_per_s"] == pytest.approx(28 * summary["train_samples_per_s"])
    assert summary["flops_per_token"] > 6 * summary["backbone_params"] * 0.9
    assert summary["time_to_first_step_s"] > 0
    assert 0 < summary["fit_s"] < summary["wall_s"]  # training alone: no data preparation, no test
    assert summary["mfu"] is None  # no peak FLOP/s is known for a CPU
    assert summary["num_params"] > 1000 and summary["global_step"] > 0
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/loss_epoch", "val/mse", "val/mse_best", "test/mse"} <= set(header)
    assert {"perf/samples_per_s", "perf/tokens_per_s", "perf/tflops_per_s"} <= set(header)


def test_checkpoint_rebuilds_the_model_alone(make_cfg, tmp_path: Path) -> None:
    """best.ckpt alone rebuilds the trained model (hyperparameters and weights): the outputs of
    the model it was tested with, not those of the weights fit started from."""
    cfg = make_cfg(
        "model=gru", "trainer.max_epochs=1", "+callbacks.initial._target_=tests.faults.RecordInitialWeights"
    )
    _, objects = train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain hyperparameters only
    assert raw["hyper_parameters"]["backbone"]["cell"] == "gru"
    assert raw["seqlab"]["data"]["_target_"].endswith("SyntheticSeriesDataModule")
    task_cls = type(objects["task"])
    restored = task_cls.load_from_checkpoint(ckpt, weights_only=True).eval()
    # trainer.test(ckpt_path=best) loaded the best weights into the trained module
    model = objects["task"].eval()
    inputs = torch.randn(3, cfg.data.lookback, 4)
    untrained = task_cls(**restored.hparams).eval()
    untrained.load_state_dict(initial_weights(objects["trainer"]))
    with torch.no_grad():
        torch.testing.assert_close(restored(inputs), model(inputs))
        assert not torch.allclose(restored(inputs), untrained(inputs), atol=1e-3), "untrained weights saved"
    assert restored.backbone.d_model == model.backbone.d_model


def test_eval_reproduces_the_training_test_metrics(make_cfg, tmp_path: Path, monkeypatch) -> None:
    cfg = make_cfg("model=lstm", "trainer.max_epochs=2")
    train_metrics, objects = train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    # train.py and eval.py both test best.ckpt: that it holds the best validation's weights (not
    # the last epoch's, not stale ones) is checked apart: validated again, they give its val/mse
    again = objects["trainer"].validate(
        objects["task"], objects["datamodule"], ckpt_path=str(ckpt), verbose=False
    )
    assert again[0]["val/mse"] == pytest.approx(objects["summary"]["best"]["val/mse_best"], rel=1e-6)
    eval_cfg = make_cfg(f"ckpt_path={ckpt}", "extras.print_config=false", name="eval", output="eval")
    import seqlab.train

    strategies, build_strategy = [], seqlab.train.build_strategy
    monkeypatch.setattr(seqlab.train, "build_strategy", lambda *a: strategies.append(a) or build_strategy(*a))
    eval_metrics, _ = evaluate(eval_cfg)
    # the checkpoint's backbone and batch (trainer=fsdp wrapped the whole model as one unit)
    (_, backbone, batch_size), *_ = strategies
    assert backbone._target_ == cfg.model._target_ and batch_size == cfg.data.batch_size
    for key in ("test/mse", "test/mae", "test/orig_mse", "test/baseline_seasonal_mse"):
        assert eval_metrics[key] == pytest.approx(train_metrics[key], rel=1e-6), key
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert evaluated["metrics"]["test/mse"] == pytest.approx(train_metrics["test/mse"], rel=1e-6)
    # named as train.py names it: compare.py ranks an `eval.py -m` sweep by the task's metric
    assert evaluated["task"] == objects["summary"]["task"] == "forecasting"
    # train.py train=false tests the given checkpoint too (not freshly initialised weights), and
    # has no objective to report
    from seqlab.train import run

    test_only = make_cfg("model=lstm", "train=false", f"ckpt_path={ckpt}", output="test_only")
    assert run(test_only) is None
    tested = json.loads((tmp_path / "test_only" / "summary.json").read_text())["metrics"]
    assert tested["test/mse"] == pytest.approx(train_metrics["test/mse"], rel=1e-6)


def test_eval_takes_a_univariate_forecaster_of_the_synthetic_series(make_cfg, tmp_path: Path) -> None:
    """``data.features=S`` forecasts one of the 4 generated channels: eval.py refused the checkpoint
    (``data.num_channels=4 (the model was built for 1) ... drop the override``) that no one overrode."""
    metrics, _ = train(make_cfg("data.features=S", "data.target=x2", "trainer.max_epochs=1"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    evaluated, objects = evaluate(make_cfg(f"ckpt_path={ckpt}", name="eval", output="eval"))
    assert objects["task"].hparams.num_channels == 1
    assert evaluated["test/mse"] == pytest.approx(metrics["test/mse"], rel=1e-6)
    with pytest.raises(ConfigError, match=r"data.lookback=96 \(the model was built for 48\)"):
        evaluate(make_cfg(f"ckpt_path={ckpt}", "+data.lookback=96", name="eval", output="eval2"))
    # a forecaster of all 4 channels on one: the message gives the data's 1 (not the generator's 4)
    train(make_cfg("trainer.max_epochs=1", "test=false", output="multi"))
    multi = tmp_path / "multi" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"data.num_channels=1 \(the model was built for 4\)"):
        evaluate(
            make_cfg(f"ckpt_path={multi}", "+data.features=S", "+data.target=x0", name="eval", output="e3")
        )


def write_leading_covariate(path: Path, rows: int, lead: int) -> np.ndarray:
    """A CSV whose target ``y`` is the covariate ``x`` ``lead`` steps later, both white noise: ``y``'s
    own past says nothing of its next ``lead`` steps, ``x``'s says all. Returns ``x``."""
    x = np.random.default_rng(0).normal(size=rows + lead)
    start = datetime(2020, 1, 1)
    lines = ["date,x,y"] + [
        f"{start + timedelta(hours=i)},{x[i + lead]:.6f},{x[i]:.6f}" for i in range(rows)
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return x[lead:]


def test_features_ms_forecasts_the_target_from_the_other_channels(make_cfg, tmp_path: Path) -> None:
    """``data.features=MS`` (Informer's): every channel in, the target alone out, scored on it. On
    a target that repeats its covariate 12 steps later it learns what the target's own past
    (``S``) cannot tell; eval.py reproduces it and refuses other features or another target;
    predict.py writes the target's column alone, which is the covariate's last 12 values."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    lead = 12
    x = write_leading_covariate(data_dir / "lead.csv", 3000, lead)
    data = ["data=csv", f"data.data_dir={data_dir}", "data.file=lead.csv", "data.target=y"]
    fast = [o for o in FAST if not o.startswith(("data.num_steps", "trainer.max_epochs"))]
    common = [*data, *fast, "model=gru", "task.channel_independence=false"]
    with pytest.raises(ConfigError, match=r"data.features=MS with task.channel_independence=true"):
        train(make_cfg(*data, *fast, "data.features=MS", fast=False, output="refused"))
    ms_metrics, objects = train(make_cfg(*common, "data.features=MS", "trainer.max_epochs=6", fast=False))
    task = objects["task"]
    assert task.hparams.target_only and task.head[-1].out_features == lead  # one channel's horizon
    inputs, targets = objects["datamodule"].datasets["test"][0]
    assert inputs.shape == (48, 2) and targets.shape == (lead, 1)
    s_metrics, _ = train(make_cfg(*common, "data.features=S", "trainer.max_epochs=6", fast=False, output="s"))
    # measured: MS 0.24, S 0.94 (white noise: its variance, 1, is the best its own past gives)
    assert ms_metrics["test/mse"] < 0.5 * s_metrics["test/mse"], (ms_metrics, s_metrics)
    assert s_metrics["test/mse"] > 0.8

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    evaluated, _ = evaluate(make_cfg(f"ckpt_path={ckpt}", name="eval", output="eval"))
    assert evaluated["test/mse"] == pytest.approx(ms_metrics["test/mse"], rel=1e-6)
    # the columns read in another order are put in the model's (each channel is read by its place:
    # fed as given, the test scored another model's input)
    swapped, _ = evaluate(make_cfg(f"ckpt_path={ckpt}", "+data.columns=[y,x]", name="eval", output="eval_yx"))
    assert swapped["test/mse"] == pytest.approx(ms_metrics["test/mse"], rel=1e-6)
    for override in ("+data.features=M", "+data.target=x"):
        with pytest.raises(ConfigError, match=r"this model forecasts channel 'y' alone \(data.features=MS\)"):
            evaluate(make_cfg(f"ckpt_path={ckpt}", override, name="eval", output="eval_refused"))
        # refused before anything is written (eval.py then leaves no run directory behind)
        assert not (tmp_path / "eval_refused" / "config.yaml").exists()
    univariate = tmp_path / "s" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"this model forecasts channel 'y' alone \(data.features=S\)"):
        evaluate(make_cfg(f"ckpt_path={univariate}", "+data.features=MS", name="eval", output="eval_s"))
    result = run_script("predict.py", f"ckpt_path={ckpt}", f"output={tmp_path / 'forecast.csv'}")
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "forecast.csv").read_text().splitlines()
    assert table[0] == "date,y" and len(table) == 1 + lead
    forecast = np.array([float(line.split(",")[1]) for line in table[1:]])
    # y's next 12 values are x's last 12: far closer than the variance (1) a guess would miss by
    assert np.mean((forecast - x[-lead:]) ** 2) < 0.5


def test_eval_on_other_data_maps_back_with_that_datas_scaler(make_cfg, tmp_path: Path) -> None:
    """A forecaster evaluated on another series: its forecasts are on that data's z-scale, so the
    original-scale metrics and reports use that data's scaler, not the training data's."""
    cfg = make_cfg("model=lstm", "trainer.max_epochs=1")
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    other = make_cfg(f"ckpt_path={ckpt}", "+data.trend_scale=5.0", name="eval", output="eval")
    _, objects = evaluate(other)
    task, data = objects["task"], objects["datamodule"].task_kwargs()
    trained = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]["scaler_mean"]
    assert data["scaler_mean"] != pytest.approx(trained)  # the other series is scaled otherwise
    torch.testing.assert_close(task.scaler_mean, torch.tensor(data["scaler_mean"]))
    torch.testing.assert_close(task.scaler_std, torch.tensor(data["scaler_std"]))


def test_plotted_windows_are_spread_over_the_test_period() -> None:
    from seqlab.tasks.forecasting import spread

    assert spread(100, 4) == [0, 33, 66, 99]
    assert spread(3, 4) == [0, 1, 2] and spread(1, 4) == [0] and spread(10, 1) == [0]
    assert spread(0, 4) == [] and spread(10, 0) == []


def test_plotted_windows_under_limit_test_batches_are_windows_evaluated(make_cfg) -> None:
    """2 processes, 577 windows, batches of 32, 9 test batches: process 0 evaluates windows
    0, 2, ..., 574; process 1 split its last batch to have as many batches, so its first 9 end
    at window 543. The last window plotted is 574, one that was evaluated (not 575)."""
    from types import SimpleNamespace

    from seqlab.data.samplers import EvalShardSampler
    from seqlab.train import build_datamodule, build_task

    cfg = make_cfg()
    task = build_task(cfg.task, cfg.model, build_datamodule(cfg.data))
    loader = SimpleNamespace(sampler=EvalShardSampler(577, 2, 0, 32), dataset=range(577))
    task._trainer = SimpleNamespace(test_dataloaders=loader, num_test_batches=[9], world_size=2)
    task.on_test_epoch_start()
    evaluated = {int(w) for r in range(2) for b in EvalShardSampler(577, 2, r, 32).batches()[:9] for w in b}
    assert len(evaluated) == 288 + 272 and max(evaluated) == 574
    assert task._plot_windows <= evaluated and max(task._plot_windows) == 574 and len(task._plot_windows) == 4


def test_eval_rejects_what_is_not_a_seqlab_checkpoint(make_cfg, tmp_path: Path) -> None:
    missing = make_cfg(f"ckpt_path={tmp_path / 'none.ckpt'}", name="eval", output="eval")
    with pytest.raises(ConfigError, match="no such file"):
        evaluate(missing)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        evaluate(make_cfg(f"ckpt_path={corrupt}", name="eval", output="eval2"))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ConfigError, match="not written by seqlab"):
        evaluate(make_cfg(f"ckpt_path={foreign}", name="eval", output="eval3"))


def test_the_validation_loss_can_be_monitored_and_a_typo_is_named(make_cfg, tmp_path: Path) -> None:
    metrics, _ = train(make_cfg("task.monitor=val/loss", "trainer.max_epochs=2"))
    assert metrics["val/loss"] == pytest.approx(metrics["val/mse"])  # the loss is the MSE
    assert metrics["val/loss_best"] <= metrics["val/loss"] + 1e-7
    with pytest.raises(
        ConfigError, match=r"task.monitor='val/accuracy' is none of the tasks' metrics \(val/acc,"
    ):
        train(make_cfg("task.monitor=val/accuracy", output="typo"))
    # a metric of another name is taken with its mode given (and named at the first validation)
    with pytest.raises(
        ConfigError, match=r"task.monitor='val/accuracy': expected one of \['val/loss', 'val/mae'"
    ):
        train(make_cfg("task.monitor=val/accuracy", "task.monitor_mode=max", output="typo2"))
    assert not (tmp_path / "typo" / "checkpoints").exists()


@pytest.mark.parametrize("data", ["sentiment_synthetic", "translation_synthetic"])
def test_the_monitor_mode_follows_the_monitored_metric(make_cfg, data: str) -> None:
    """classification and translation pick their best epoch by the highest val/acc or val/bleu;
    monitoring val/loss there kept ``max``: the worst epoch's checkpoint was tested, and early
    stopping stopped on improvement. The mode now follows the metric, and one given against it is
    refused before anything is read or written."""
    assert make_cfg(f"data={data}", fast=False).task.monitor_mode == "max"
    for metric, mode in (("val/loss", "min"), ("val/f1", "max"), ("val/chrf", "max"), ("val/ppl", "min")):
        cfg = make_cfg(f"data={data}", f"task.monitor={metric}", fast=False)
        assert cfg.task.monitor_mode == mode
        assert cfg.callbacks.model_checkpoint.mode == cfg.callbacks.early_stopping.mode == mode
    with pytest.raises(
        ConfigError, match=r"task.monitor_mode=max for task.monitor=val/loss, whose best is its lowest"
    ):
        train(make_cfg(f"data={data}", "task.monitor=val/loss", "task.monitor_mode=max", fast=False))
    with pytest.raises(
        ConfigError,
        match=r"task.monitor_mode is null: expected min or max \(val/\w+ is best at its highest: max",
    ):
        train(make_cfg(f"data={data}", "task.monitor_mode=null", fast=False))


def test_keeping_several_checkpoints_needs_a_name_for_each(make_cfg, tmp_path: Path) -> None:
    """save_top_k above 1 under the fixed filename 'best' wrote every one of the top k into
    best.ckpt, a worse epoch over the best, which the test then read: refused, naming the fix;
    with the fix, the run tests the best of them."""
    with pytest.raises(
        ConfigError,
        match=r"callbacks.model_checkpoint.save_top_k=3 with callbacks.model_checkpoint.filename='best'",
    ):
        train(make_cfg("callbacks.model_checkpoint.save_top_k=3", output="refused"))
    assert not (tmp_path / "refused" / "checkpoints").exists()
    named = [
        "callbacks.model_checkpoint.filename='best-{epoch:03d}-{step}'",
        "callbacks.model_checkpoint.save_top_k=2",
        # the last of the 3 epochs worse than the best but within the top 2: saved after the best
        "+callbacks.worse._target_=tests.faults.WorseLastValidation",
    ]
    _, objects = train(make_cfg(*named))
    seen = next(c for c in objects["trainer"].callbacks if type(c).__name__ == "WorseLastValidation").seen
    assert len(seen) == 3 and seen[1] < seen[2] < seen[0]  # best: epoch 1; epoch 2 in the top 2
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    assert [name[:8] for name in saved] == ["best-001", "best-002"]
    tested = torch.load(objects["summary"]["best_checkpoint"], map_location="cpu", weights_only=False)
    assert tested["epoch"] == 1


def test_missing_ett_file_is_a_clear_error(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("data=ett", f"data.data_dir={tmp_path / 'absent'}", "data.download=false", fast=False)
    with pytest.raises(DataError, match=r"absent/ETTh1.csv"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_global_batch_must_divide_by_the_processes(make_cfg) -> None:
    from seqlab.data.forecasting import SyntheticSeriesDataModule

    dm = SyntheticSeriesDataModule(num_steps=400, lookback=20, horizon=5, batch_size=33)

    class FakeTrainer:
        world_size = 2
        global_rank = 0

    dm.trainer = FakeTrainer()
    dm.setup()
    with pytest.raises(ConfigError, match="batch_size=33 is the global batch"):
        dm.train_dataloader()


def test_ett_trains_and_beats_repeat_last(make_cfg, ett_dir: Path) -> None:
    cfg = make_cfg(
        "data=ett", f"data.data_dir={ett_dir}", "model=gru", "model.d_model=32", "data.lookback=96",
        "data.horizon=24", "trainer.max_epochs=1", "trainer.limit_train_batches=20",
        "extras.print_config=false", "callbacks.rich_progress_bar=null", fast=False,
    )  # fmt: skip
    _, objects = train(cfg)
    summary = objects["summary"]
    assert summary["data"] == "ett"
    assert summary["metrics"]["test/mse"] < summary["baseline"]["last"]["mse"]
    # original-scale metrics are on the data's own units (ETTh1's loads are several units wide)
    assert summary["metrics"]["test/orig_mse"] > summary["metrics"]["test/mse"]


def test_a_failed_checkpoint_save_leaves_the_previous_file_intact(tmp_path: Path) -> None:
    from seqlab.utils.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "best.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "bad": Unpicklable()}, path)
    kept = torch.load(path, weights_only=True)
    torch.testing.assert_close(kept["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["best.ckpt"]


def test_a_diverged_run_stops_with_a_clear_error(make_cfg) -> None:
    """NaN loss: the run fails at once (a sweep then records a failed trial) instead of training on."""
    from seqlab.callbacks import TrainingDiverged
    from seqlab.train import train

    cfg = make_cfg("task.optimizer.lr=1e30", "trainer.log_every_n_steps=1", "callbacks.early_stopping=null")
    with pytest.raises(
        TrainingDiverged, match=r"the training loss is (nan|inf) at step \d+ .*task.optimizer.lr"
    ):
        train(cfg)


def test_throughput_leaves_out_the_steps_up_to_the_first_optimizer_step(make_cfg, monkeypatch) -> None:
    """Compilation, autotuning and the FLOP count happen there (a compiled model's first step can
    take minutes): the whole run's samples/s counted them."""
    import time

    import seqlab.callbacks.run_stats as run_stats

    pause, real = 8.0, run_stats.flops_per_token
    monkeypatch.setattr(
        run_stats, "flops_per_token", lambda task, batch: time.sleep(pause) or real(task, batch)
    )
    _, objects = train(make_cfg("trainer.max_epochs=1"))
    samples = objects["trainer"].num_training_batches * 32  # FAST: batches of 32
    # the pause is in fit's time, not in training's (whatever the load on the machine)
    train_s = samples / objects["summary"]["train_samples_per_s"]
    assert objects["summary"]["fit_s"] - train_s > pause


def test_throughput_leaves_out_checkpoint_saves(make_cfg, monkeypatch) -> None:
    """best.ckpt is written after a validation and a step checkpoint after a step, both after
    RunStats's hooks (Lightning runs checkpoint callbacks last): their writes counted as training
    time, so an epoch that improved (or a slow disk) looked slower to train."""
    import time

    from lightning.pytorch.strategies import SingleDeviceStrategy

    from seqlab.utils.checkpoint_io import AtomicCheckpointIO

    pause, write, gather = (
        4.0,
        AtomicCheckpointIO.save_checkpoint,
        SingleDeviceStrategy.lightning_module_state_dict,
    )

    def slow_write(self, checkpoint, path, storage_options=None):
        time.sleep(pause / 2)
        write(self, checkpoint, path, storage_options)

    def slow_gather(self):  # before the callbacks' on_save_checkpoint (a sharded strategy's gather)
        time.sleep(pause / 2)
        return gather(self)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", slow_write)
    monkeypatch.setattr(SingleDeviceStrategy, "lightning_module_state_dict", slow_gather)
    _, objects = train(make_cfg("trainer.max_epochs=1", "callbacks.step_checkpoint.every_n_train_steps=20"))
    samples = objects["trainer"].num_training_batches * 32  # FAST: batches of 32
    train_s = samples / objects["summary"]["train_samples_per_s"]
    # two step checkpoints (steps 20, 40) and best.ckpt inside the epoch, last.ckpt after it: at
    # least 4 pauses of fit's time are not training (whatever the load on the machine)
    assert objects["summary"]["fit_s"] - train_s > 3.5 * pause


def test_a_loss_that_turns_nan_between_two_checks_is_caught_before_validation(make_cfg) -> None:
    """The loss is checked at logging steps (no synchronisation of its own); weights that became
    NaN at step 45 of a 50-step epoch reached the validation, whose NaN early stopping took as a
    reason to end the run normally (summary written, the sweep's trial a success)."""
    from seqlab.callbacks import TrainingDiverged

    cfg = make_cfg(
        "trainer.log_every_n_steps=20", "trainer.max_epochs=3",
        "+callbacks.fault._target_=tests.faults.FailOnRank", "+callbacks.fault.rank=0",
        "+callbacks.fault.step=45", "+callbacks.fault.how=poison",
    )  # fmt: skip
    with pytest.raises(
        TrainingDiverged, match=r"the training loss is nan at a step of epoch 0 before step 50"
    ):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "summary.json").exists()


def test_the_weights_are_read_where_each_process_holds_them() -> None:
    """Under ZeRO-3 a parameter is an empty placeholder and its partition (``ds_tensor``) holds the
    values: read there, NaN weights are NaN (the placeholder always looked finite)."""
    from seqlab.callbacks.run_stats import local_numel, local_part

    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_tensor = torch.tensor([1.0, float("nan")])
    assert bool(torch.isfinite(placeholder).all()) and not bool(torch.isfinite(local_part(placeholder)).all())
    assert local_numel(placeholder) == 2
    whole = torch.nn.Parameter(torch.ones(3))
    assert local_part(whole) is whole and local_numel(whole) == 3


@pytest.mark.parametrize("step", [45, 40])
def test_a_skipped_step_with_a_nan_loss_does_not_stop_the_run(
    make_cfg, tmp_path: Path, caplog, step: int
) -> None:
    """Under 16-mixed the gradient scaler skips a step whose loss overflowed: the loss and the
    epoch's running loss are NaN, the weights are untouched. The guard looks at the weights then,
    and goes on: before the validation (step 45), and on a logging step (40), where it stopped."""
    cfg = make_cfg(
        "trainer.log_every_n_steps=20", "trainer.max_epochs=2",
        "+callbacks.fault._target_=tests.faults.FailOnRank", "+callbacks.fault.rank=0",
        f"+callbacks.fault.step={step}", "+callbacks.fault.how=skipped", f"+callbacks.fault.once={tmp_path / 'fired'}",
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="seqlab.callbacks.divergence"):
        train(cfg)
    assert (tmp_path / "fired").is_file() and (Path(cfg.paths.output_dir) / "summary.json").is_file()
    assert (
        "the training loss was not finite at a step of epoch 0 before step 50, but the weights are finite"
        in caplog.text
    )
    logging_step = "the training loss was not finite at step 40, but the weights are finite"
    assert (logging_step in caplog.text) == (step == 40)


def test_a_run_whose_every_step_is_skipped_stops(make_cfg) -> None:
    """A float16 forward that overflows whatever the scale: every step is skipped, the weights
    never change, and the validation metric is NaN (early stopping then ended the run as if it
    had finished). Three step checks in a row with a NaN loss and finite weights stop it."""
    from seqlab.callbacks import TrainingDiverged

    cfg = make_cfg(
        "trainer.log_every_n_steps=20", "trainer.max_epochs=3",
        "+callbacks.fault._target_=tests.faults.FailOnRank", "+callbacks.fault.rank=0",
        "+callbacks.fault.step=15", "+callbacks.fault.how=skipped",
    )  # fmt: skip
    # step checks at 20, 40 and 60 (the validation's check of the epoch's running loss, NaN after
    # one skipped step as after many, does not count)
    with pytest.raises(TrainingDiverged, match=r"at step 60, at 3 checks in a row with finite weights"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "summary.json").exists()


def test_one_skipped_step_before_several_validations_does_not_stop_the_run(make_cfg, tmp_path: Path) -> None:
    """The epoch's running loss stays NaN after one skipped step: validations every 10 steps each
    saw it, and three of them stopped a healthy run as if every step were skipped."""
    cfg = make_cfg(
        "trainer.log_every_n_steps=50", "trainer.max_epochs=1", "+trainer.val_check_interval=10",
        "+callbacks.fault._target_=tests.faults.FailOnRank", "+callbacks.fault.rank=0",
        "+callbacks.fault.step=5", "+callbacks.fault.how=skipped", f"+callbacks.fault.once={tmp_path / 'fired'}",
    )  # fmt: skip
    train(cfg)
    assert (tmp_path / "fired").is_file() and (Path(cfg.paths.output_dir) / "summary.json").is_file()


def test_no_step_check_inside_an_accumulation_window(make_cfg, tmp_path: Path, caplog) -> None:
    """Inside a gradient-accumulation window a NaN loss's gradients are not applied yet: the
    weights are finite there whatever comes, so the step check is taken where the window ends."""
    cfg = make_cfg(
        "trainer.log_every_n_steps=1", "trainer.max_epochs=1", "trainer.accumulate_grad_batches=2",
        "+callbacks.fault._target_=tests.faults.FailOnRank", "+callbacks.fault.rank=0",
        "+callbacks.fault.step=10", "+callbacks.fault.how=skipped", "+callbacks.fault.mid_window=true",
        f"+callbacks.fault.once={tmp_path / 'fired'}",
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="seqlab.callbacks.divergence"):
        train(cfg)
    assert (tmp_path / "fired").read_text() == "fired at step 10\n"
    assert "not finite at step" not in caplog.text  # the window's end (step 11) had a finite loss
    assert "not finite at a step of epoch 0 before step 25" in caplog.text  # the running loss


def test_same_seed_and_config_give_bitwise_identical_results(make_cfg) -> None:
    """Reproducibility on CPU: every metric (losses, validation, test) equal bit for bit across two
    runs; only the throughput figures (perf/*, wall-clock) differ. summary.json records what the
    result depends on: versions and the git commit."""
    overrides = ("model=gru", "trainer.max_epochs=2", "trainer.deterministic=true")
    first, objects = train(make_cfg(*overrides, output="first"))
    second, _ = train(make_cfg(*overrides, output="second"))

    def results(metrics: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in metrics.items() if not k.startswith("perf/")}

    assert results(first) == results(second)
    assert {"train/loss_epoch", "val/mse_best", "test/mse"} <= set(results(first))
    summary = objects["summary"]
    assert {"python", "torch", "lightning", "hydra-core", "omegaconf"} <= set(summary["versions"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (not an unpacked archive): its commit is recorded
        assert summary["git"]["commit"] == head.stdout.strip() and len(summary["git"]["commit"]) == 40


def test_an_unseeded_job_does_not_inherit_an_earlier_jobs_seed(make_cfg, monkeypatch) -> None:
    """seed_everything leaves its seed in the environment, where the strategies re-seed from it in
    setup (DDP, FSDP, DeepSpeed: reset_seed) and the processes they start inherit it: in
    ``-m seed=42,null`` the unseeded job trained as seed 42. Unseeded, it is gone."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "42")  # as the sweep's seeded job left it
    monkeypatch.setenv("PL_SEED_WORKERS", "1")
    from lightning.pytorch.strategies import SingleDeviceStrategy

    seen, setup = {}, SingleDeviceStrategy.setup_environment

    def setup_environment(self) -> None:  # where a strategy sets itself up (DDP re-seeds there)
        seen.update({k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")})
        setup(self)

    monkeypatch.setattr(SingleDeviceStrategy, "setup_environment", setup_environment)
    train(make_cfg("seed=null", "trainer.max_epochs=1", "test=false"))
    assert seen == {"PL_GLOBAL_SEED": None, "PL_SEED_WORKERS": None}


def test_a_single_run_whose_validation_never_ran_succeeds(make_cfg, tmp_path: Path, caplog) -> None:
    """``optimized_metric`` is for sweepers that optimise it: a finished single run without a
    validation (``check_val_every_n_epoch`` beyond ``max_epochs``) exited 1 over it."""
    from seqlab.train import run

    cfg = make_cfg("trainer.max_epochs=1", "trainer.check_val_every_n_epoch=2")
    assert run(cfg) is None
    assert "optimized_metric='val/mse_best' was never logged" in caplog.text
    assert "test/mse" in json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]


def test_a_run_without_validation_trains_and_tests_its_last_weights(make_cfg, tmp_path: Path, caplog) -> None:
    """``trainer.limit_val_batches=0`` skips validation (Lightning's way): early stopping, which
    follows a validation metric, raised at the first epoch's end (a traceback, no checkpoint)."""
    metrics, objects = train(make_cfg("trainer.limit_val_batches=0", "trainer.max_epochs=2"))
    assert "no validation, so no early stopping" in caplog.text
    assert objects["summary"]["global_step"] == 2 * objects["trainer"].num_training_batches
    assert "test/mse" in metrics and not any(key.startswith("val/") for key in metrics)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_eval_names_the_model_of_a_checkpoint_from_before_its_name_was_kept() -> None:
    """eval.py's summary (and an ``eval.py -m`` sweep's table) names the trained model: its
    ``model=`` choice, else (older checkpoints) the backbone's cell, not "RNNBackbone" for all three."""
    from types import SimpleNamespace

    from seqlab.eval import model_name

    lstm = SimpleNamespace(
        hparams={"backbone": {"_target_": "seqlab.backbones.rnn.RNNBackbone", "cell": "lstm"}}
    )
    assert model_name({"model_name": "lstm_big"}, lstm) == "lstm_big"
    assert model_name({}, lstm) == "lstm"
    transformer = {"backbone": {"_target_": "seqlab.backbones.transformer.TransformerBackbone"}}
    assert model_name({}, SimpleNamespace(hparams=transformer)) == "TransformerBackbone"
    assert model_name({}, SimpleNamespace(hparams={})) is None


def test_a_jobs_extras_end_with_it(make_cfg, monkeypatch) -> None:
    """``extras.matmul_precision`` and ``extras.ignore_warnings`` are process-wide: the next job
    of a multirun in the same process, asking for the defaults, kept the earlier job's."""
    import warnings

    from seqlab import train as entry

    seen = []

    def job(cfg):  # train() up to its extras, then what the job would run under
        entry.apply_extras(cfg)
        seen.append(
            (torch.get_float32_matmul_precision(), ("ignore", None, Warning, None, 0) in warnings.filters)
        )
        return {}, {}

    monkeypatch.setattr(entry, "train", job)
    before = torch.get_float32_matmul_precision(), list(warnings.filters)
    entry.run(make_cfg("extras.matmul_precision=medium", "extras.ignore_warnings=true"))
    entry.run(make_cfg())
    assert seen == [("medium", True), (before[0], False)]
    assert (torch.get_float32_matmul_precision(), list(warnings.filters)) == before


def test_a_resumed_runs_git_record_is_its_own(make_cfg, tmp_path: Path, monkeypatch, caplog) -> None:
    """git.diff was written only for a dirty tree and never removed: resumed from a clean tree, the
    run had git.txt saying ``dirty: False`` beside the first attempt's diff. And overwritten, the
    record lost the code the earlier attempt trained with: kept as git.1.txt / git.1.diff."""
    from seqlab.utils import run

    cfg = make_cfg()
    trees = iter(
        [
            ({"commit": "000", "dirty": False}, ""),  # refused while set up: nothing trained
            ({"commit": "aaa", "dirty": True}, "+hack\n"),
            ({"commit": "bbb", "dirty": False}, ""),
            ({"commit": "bbb", "dirty": False}, ""),  # resumed again on the same code
            ({"commit": "ccc", "dirty": False}, ""),
        ]
    )
    monkeypatch.setattr(run, "git_info", lambda root: next(trees))
    run_dir = tmp_path / "run"
    run.write_run_metadata(cfg, run_dir)
    run.write_run_metadata(cfg, run_dir)  # no checkpoint of commit 000's: its record is not kept
    assert (run_dir / "git.diff").read_text() == "+hack\n" and not (run_dir / "git.1.txt").exists()
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"trained on aaa")
    assert run.write_run_metadata(cfg, run_dir) == {"commit": "bbb", "dirty": False}
    assert "commit: bbb" in (run_dir / "git.txt").read_text() and not (run_dir / "git.diff").exists()
    assert "commit: aaa" in (run_dir / "git.1.txt").read_text()
    assert (run_dir / "git.1.diff").read_text() == "+hack\n"
    assert "that attempt's record is kept as git.1.txt and git.1.diff" in caplog.text
    run.write_run_metadata(cfg, run_dir)
    assert not (run_dir / "git.2.txt").exists()  # the same code: nothing to keep
    run.write_run_metadata(cfg, run_dir)
    assert (
        "commit: bbb" in (run_dir / "git.2.txt").read_text()
        and "commit: ccc" in (run_dir / "git.txt").read_text()
    )
    assert not (run_dir / "git.2.diff").exists()


def test_git_diff_holds_the_untracked_files_a_run_trained_with(tmp_path: Path) -> None:
    """A backbone of one's own under src/ and its config, not yet committed: ``git diff HEAD``
    left them out, so git.diff (or no git.diff, with only new files) did not hold what trained."""
    from seqlab.utils import run

    repo = tmp_path / "repo"
    (repo / "src" / "mine").mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("logs/\n")
    (repo / "tracked.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "first"], check=True)
    (repo / "src" / "mine" / "cnn.py").write_text("class CNN:\n    pass\n")
    (repo / "logs").mkdir()
    (repo / "configs").mkdir()
    (repo / "configs" / "mine.yaml").write_text("_target_: mine.cnn.CNN\napi_key: sk-1234\n")
    (repo / "logs" / "big.ckpt").write_bytes(b"0" * 10)  # ignored: not copied
    (repo / "huge.py").write_bytes(b"#" * (run.UNTRACKED_LIMIT + 1))
    (repo / "notes.bin").write_bytes(b"\0" * 10)  # neither code nor config: counted
    (repo / "data").symlink_to(tmp_path / "gone")  # a dangling link cost the whole record
    info, diff = run.git_info(repo)
    assert info["dirty"] is True and info["branch"]
    assert "+++ b/src/mine/cnn.py" in diff and "+class CNN:" in diff
    assert "+_target_: mine.cnn.CNN" in diff and "sk-1234" not in run.redact_text(diff)  # as written
    assert "big.ckpt" not in diff and "notes.bin" not in diff
    assert f"# untracked huge.py: {run.UNTRACKED_LIMIT + 1} bytes, not copied (over the size limits)" in diff
    assert "# 2 other untracked file(s) not copied (only .py, .yaml, .yml files are)" in diff


def test_a_summary_says_where_it_was_measured_and_when_its_test_was_partial(
    make_cfg, tmp_path: Path, caplog
) -> None:
    """Timings without the machine they were taken on could not be compared or questioned; and a
    test of 2 batches (``trainer.limit_test_batches=2``) was reported as the test set's."""
    import torch

    from seqlab.train import train

    with caplog.at_level("WARNING", logger="seqlab.train"):
        _, objects = train(make_cfg("trainer.max_epochs=1", "trainer.limit_test_batches=2"))
    summary = objects["summary"]
    assert summary["test_limited"] == 2 and "test/mse" in summary["metrics"]
    assert (
        "trainer.limit_test_batches=2: the test metrics are of 2 of the test set's 15 batches" in caplog.text
    )
    assert summary["hardware"]["threads"] == torch.get_num_threads() and summary["hardware"]["cpu"]
    assert summary["hardware"]["cpu_cores"] == os.cpu_count()
    _, whole = train(make_cfg("trainer.max_epochs=1", "trainer.limit_test_batches=1.0", output="whole"))
    assert "test_limited" not in whole["summary"]
    # an int 1 is one batch (1 == 1.0 read it as the whole set); as many batches as there are is all
    _, one = train(make_cfg("trainer.max_epochs=1", "trainer.limit_test_batches=1", output="one"))
    assert one["summary"]["test_limited"] == 1
    _, enough = train(make_cfg("trainer.max_epochs=1", "trainer.limit_test_batches=50", output="enough"))
    assert "test_limited" not in enough["summary"]
    # eval.py says so too
    ckpt = tmp_path / "whole" / "checkpoints" / "last.ckpt"
    evaluated = evaluate(
        make_cfg(f"ckpt_path={ckpt}", "trainer.limit_test_batches=0.5", name="eval", output="ev")
    )
    assert evaluated[1]["summary"]["test_limited"] == 0.5


def test_lightnings_refusal_of_a_setting_is_one_line(make_cfg, caplog) -> None:
    """``trainer.limit_test_batches=0.001`` of a 15-batch test set: Lightning's refusal came as a
    44-line traceback; it is one line and exit code 1, as seqlab's own refusals."""
    from seqlab.train import run

    with caplog.at_level("ERROR", logger="seqlab.train"), pytest.raises(SystemExit) as exit_:
        run(make_cfg("trainer.max_epochs=1", "trainer.limit_test_batches=0.001"))
    assert exit_.value.code == 1
    assert "MisconfigurationException: You requested to check 0.001 of the `test_dataloader`" in caplog.text
