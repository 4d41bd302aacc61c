"""Every config option composes and instantiates; the CLI lists them and rejects unknown ones."""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from seqlab.errors import ConfigError
from seqlab.train import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_task,
    build_trainer,
    check_choices,
)
from tests.conftest import CONFIGS, run_script


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def data_overrides(data: str, request, tmp_path: Path) -> list[str]:
    """Where each data option reads from in the tests (real files only where ../shared/data is present)."""
    if data == "ett":
        return [f"data.data_dir={request.getfixturevalue('ett_dir')}"]
    if data in ("timeseries",):
        return []
    if data == "csv":  # one's own series: hourly rows, a date column named as data.date_column
        rows = [
            f"{datetime(2024, 1, 1) + timedelta(hours=i):%Y-%m-%d %H:%M:%S},{i % 24},{(i * 7) % 11}"
            for i in range(1500)
        ]
        (tmp_path / "own.csv").write_text("date,a,b\n" + "\n".join(rows) + "\n")
        return [f"data.data_dir={tmp_path}", "data.file=own.csv"]
    cache = [f"data.cache_dir={request.getfixturevalue('text_cache')}"]
    if data == "sst2":
        return [*cache, f"data.data_dir={request.getfixturevalue('sst2_dir')}"]
    if data == "imdb":
        return [*cache, f"data.data_dir={request.getfixturevalue('tiny_imdb')}", "data.val_size=2"]
    if data == "text_classification":
        (tmp_path / "train.jsonl").write_text(
            "".join(f'{{"text": "review {i}", "label": "{"abc"[i % 3]}"}}\n' for i in range(30))
        )
        return [*cache, f"data.data_dir={tmp_path}", "data.train_file=train.jsonl"]
    if data == "multi30k":
        return [*cache, f"data.data_dir={request.getfixturevalue('multi30k_dir')}"]
    if data == "parallel_text":
        root = request.getfixturevalue("tiny_parallel")
        return [
            *cache,
            f"data.data_dir={root}",
            "data.source_lang=de",
            "data.target_lang=en",
            "data.tokenizer.vocab_size=60",
        ]
    return cache


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("data", options("data"))
def test_every_data_and_model_pair_instantiates(
    make_cfg, data: str, model: str, request, tmp_path: Path
) -> None:
    cfg = make_cfg(f"data={data}", f"model={model}", *data_overrides(data, request, tmp_path), fast=False)
    check_choices(cfg)  # every shipped setting passes the key and type checks
    datamodule = build_datamodule(cfg.data)
    task = build_task(cfg.task, cfg.model, datamodule)
    if cfg.task._target_.endswith("ForecastingTask"):
        assert task.hparams.num_channels == datamodule.num_channels
    elif cfg.task._target_.endswith("TranslationTask"):
        datamodule.setup()
        batch = datamodule.datasets["val"].__getitems__([0, 1])
        logits = task(batch["src_ids"], batch["src_mask"], batch["tgt_ids"][:, :-1])
        assert logits.shape[-1] == datamodule.load_meta()["target_vocab_size"]
    else:
        assert task.hparams.num_classes == len(datamodule.load_meta()["classes"])
        assert task.embed.num_embeddings == datamodule.load_meta()["vocab_size"]
    assert task.backbone.d_model == cfg.model.d_model


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_option_composes(make_cfg, trainer: str) -> None:
    cfg = make_cfg(f"trainer={trainer}")
    check_choices(cfg)
    check_choices(make_cfg(f"trainer={trainer}", "seed=null"))  # an unseeded run (the data's seed too)
    assert cfg.trainer.default_root_dir == cfg.paths.output_dir
    if trainer in ("ddp", "ddp_spawn"):
        assert cfg.trainer.strategy == trainer
    if trainer in ("ddp", "ddp_spawn", "fsdp2") and not torch.cuda.is_available():
        assert cfg.trainer.devices == 2  # no GPU here: two CPU processes
    # GPU-only strategies (fsdp, deepspeed*) build their strategy objects in test_strategies.py
    if trainer in ("default", "cpu", "ddp", "ddp_spawn", "fsdp2"):
        built = build_trainer(cfg, callbacks=[], loggers=[])
        assert built.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger_option_passes_the_setting_checks(make_cfg, logger: str) -> None:
    check_choices(make_cfg(f"logger={logger}"))


@pytest.mark.parametrize("logger", [o for o in options("logger") if o not in ("wandb", "many")])
def test_every_logger_option_instantiates_and_csv_is_always_kept(
    make_cfg, logger: str, tmp_path: Path
) -> None:
    cfg = make_cfg(f"logger={logger}")
    names = [type(lg).__name__ for lg in build_loggers(cfg.logger, tmp_path)]
    assert "CSVLogger" in names
    # each option builds its own logger too (not only the CSV kept alongside)
    assert {"csv": {"CSVLogger"}, "tensorboard": {"CSVLogger", "TensorBoardLogger"}}[logger] == set(names)
    assert "CSVLogger" in [type(lg).__name__ for lg in build_loggers(None, tmp_path)]


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_every_callbacks_option_instantiates(make_cfg, callbacks: str) -> None:
    cfg = make_cfg(f"callbacks={callbacks}", fast=False)
    check_choices(cfg)
    built = build_callbacks(cfg.get("callbacks"))
    assert "RunStats" in [type(c).__name__ for c in built]
    if callbacks == "none":  # not Lightning's own ModelCheckpoint either (no last.ckpt, a file per epoch)
        assert build_trainer(cfg, callbacks=built, loggers=[]).checkpoint_callback is None


@pytest.mark.parametrize("debug", [o for o in options("debug") if o != "default"])
def test_every_debug_preset_composes(make_cfg, debug: str) -> None:
    cfg = make_cfg(f"debug={debug}")
    check_choices(cfg)
    assert cfg.task_name == "debug"
    assert cfg.trainer.accelerator == "cpu"
    built = build_trainer(cfg, callbacks=[], loggers=[])
    if debug == "profiler":
        assert type(built.profiler).__name__ == "SimpleProfiler"
    if debug == "overfit":
        assert built.overfit_batches == 3
    if debug == "fdr":
        assert built.fast_dev_run


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(make_cfg, experiment: str, request, tmp_path: Path) -> None:
    prefix = experiment.split("_")[0]
    if prefix in ("compare", "seeds"):  # a multirun over backbones (and seeds), then the report
        data = {"compare_classification": "sst2", "compare_translation": "multi30k"}.get(
            experiment, "timeseries"
        )
    else:
        data = {"ett": "ett", "sst2": "sst2", "multi30k": "multi30k", "mfu": "timeseries"}[prefix]
    overrides = data_overrides(data, request, tmp_path)
    cfg = make_cfg(f"experiment={experiment}", *overrides, fast=False)
    check_choices(cfg)
    if prefix in ("compare", "seeds"):
        assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params.seed == "1,2,3"
        assert cfg.hydra.callbacks.compare_report._target_.endswith("CompareReport")
        if prefix == "compare":
            assert cfg.hydra.sweeper.params.model == "rnn,lstm,gru,transformer,mingru,minlstm"
    else:
        assert cfg.model._target_.endswith("TransformerBackbone") == ("transformer" in experiment)
    datamodule = build_datamodule(cfg.data)
    with torch.device("meta") if prefix == "mfu" else contextlib.nullcontext():  # 700 M parameters
        build_task(cfg.task, cfg.model, datamodule)


def test_the_mfu_recipe_is_compute_bound(make_cfg) -> None:
    """experiment=mfu_transformer (the MFU figure on a GPU): ~700 M parameters and >= 1e14 FLOPs
    per step (torch's FLOP counter, on the meta device), the FLOPs of 6 x parameters per token
    within 15% (the flatten head runs once per series, not per token), bf16-mixed on a GPU, no
    mask in the way of flash attention. A scaled-down copy trains on this CPU and reports its
    FLOPs and token rate."""
    from seqlab.callbacks.run_stats import flops_per_token
    from seqlab.train import train

    cfg = make_cfg("experiment=mfu_transformer", fast=False)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    datamodule = build_datamodule(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    with torch.device("meta"):
        task = build_task(cfg.task, cfg.model, datamodule)
    params = sum(p.numel() for p in task.parameters())
    per_token, tokens = flops_per_token(task, batch), task.batch_tokens(batch)
    assert 5e8 < params < 1e9 and per_token * tokens >= 1e14, (params, per_token, tokens)
    assert 0.85 < per_token / (6 * params) < 1.15
    small = make_cfg("experiment=mfu_transformer", "trainer=cpu", "trainer.precision=32-true", "model.d_model=32",
                     "model.nhead=4", "model.num_layers=1", "model.dim_feedforward=64", "data.lookback=256",
                     "data.num_steps=1200", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                     "trainer.limit_val_batches=1", "callbacks.rich_progress_bar=null", "extras.print_config=false",
                     fast=False, output="small")  # fmt: skip
    _, objects = train(small)
    summary = objects["summary"]
    assert (
        summary["global_step"] == 3 and summary["flops_per_token"] > 0 and summary["train_tokens_per_s"] > 0
    )
    # no checkpoint: on the GPU each would be 8.5 GB, written twice an epoch
    assert not list((Path(small.paths.output_dir)).rglob("*.ckpt")) and summary["best_checkpoint"] is None


def test_debug_fdr_trains_one_step_and_tests(make_cfg) -> None:
    from seqlab.train import train

    metrics, objects = train(make_cfg("debug=fdr"))
    assert objects["trainer"].global_step == 1
    assert "test/mse" in metrics


def test_debug_fdr_writes_to_no_logger(make_cfg, monkeypatch) -> None:
    """fast_dev_run's "no logs": the hyperparameters went to the configured loggers themselves
    (Lightning had put a DummyLogger in their place), which opened a real W&B run."""
    from seqlab.train import train
    from seqlab.utils.csv_logger import CSVLogger

    written = []
    monkeypatch.setattr(CSVLogger, "log_hyperparams", lambda self, params: written.append(params))
    train(make_cfg("debug=fdr"))
    assert written == []
    train(make_cfg(output="logged"))
    # the run's config, once: Lightning's own logging of the modules' arguments is off (it bypassed
    # the redaction of credentials)
    assert len(written) == 1 and "config" in written[0]


def test_debug_limit_runs_a_few_batches_of_every_stage(make_cfg) -> None:
    """Its fractions of the default data's validation split (10 batches) were 0 batches: crashed."""
    from seqlab.train import train

    metrics, objects = train(make_cfg("debug=limit", fast=False))
    assert objects["trainer"].global_step == 3 * 5 and "test/mse" in metrics


@pytest.mark.parametrize("data", ["synthetic", "sentiment_synthetic"])
def test_debug_overfit_trains_on_the_same_batches(make_cfg, tmp_path: Path, data: str) -> None:
    """Lightning's overfit_batches swaps in a per-example SequentialSampler, which seqlab's
    whole-batch loaders cannot take (debug=overfit crashed): they count as sequential to it and
    stop shuffling themselves, so every epoch trains on the same first batches."""
    import csv

    from seqlab.train import train
    from tests.faults import RecordBatches

    probe = "+callbacks.batches._target_=tests.faults.RecordBatches"
    if data == "synthetic":
        cfg = make_cfg("debug=overfit", "trainer.max_epochs=4", "trainer.overfit_batches=2", probe)
    else:
        text = ["data.num_train=400", "model.d_model=32", "extras.print_config=false"]
        cfg = make_cfg(
            "debug=overfit", f"data={data}", f"data.cache_dir={tmp_path / 'cache'}", *text,
            "trainer.max_epochs=4", "trainer.overfit_batches=2", probe, fast=False,
        )  # fmt: skip
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 8
    (batches,) = [c for c in objects["trainer"].callbacks if isinstance(c, RecordBatches)]
    assert len(batches.epochs) == 4 and len(set(batches.epochs[0])) == 2
    assert all(epoch == batches.epochs[0] for epoch in batches.epochs), "each epoch trained on other batches"
    with (Path(cfg.paths.output_dir) / "metrics.csv").open(newline="") as handle:
        losses = [float(r["train/loss_epoch"]) for r in csv.DictReader(handle) if r.get("train/loss_epoch")]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt")), "the preset saves no checkpoint"


def test_debug_profiler_times_the_model_not_anomaly_detection(make_cfg) -> None:
    """It inherited the debug presets' detect_anomaly=true, which was most of what it timed."""
    cfg = make_cfg("debug=profiler", fast=False)
    assert cfg.trainer.detect_anomaly is False and cfg.trainer.profiler.filename == "profile"
    assert make_cfg("debug=limit", fast=False, output="limit").trainer.detect_anomaly is True


def test_eval_keeps_its_own_settings_over_the_groups(make_cfg) -> None:
    """eval.yaml's keys came first, so extras/default.yaml's print_config=true won over its false."""
    cfg = make_cfg("ckpt_path=x", name="eval")
    assert cfg.extras.print_config is False and cfg.task_name == "eval" and cfg.callbacks is None
    assert make_cfg("ckpt_path=x", "extras.print_config=true", name="eval").extras.print_config is True


def test_the_data_root_comes_from_seqlab_data_dir_unless_it_is_empty(
    make_cfg, monkeypatch, tmp_path: Path
) -> None:
    """``SEQLAB_DATA_DIR=`` (set, empty) put every data set and cache under ``/``."""
    monkeypatch.setenv("SEQLAB_DATA_DIR", str(tmp_path / "shared"))
    assert make_cfg().paths.data_dir == str(tmp_path / "shared")
    monkeypatch.setenv("SEQLAB_DATA_DIR", "")
    cfg = make_cfg("data=sst2", fast=False)
    assert cfg.paths.data_dir == f"{cfg.paths.root_dir}/data"
    assert cfg.data.data_dir == f"{cfg.paths.root_dir}/data/sst2"


@pytest.mark.slow
def test_help_lists_groups_and_unknown_options_list_the_choices() -> None:
    helped = run_script("train.py", "--help")
    assert helped.returncode == 0
    for group in ("data:", "model:", "trainer:", "logger:", "debug:", "experiment:"):
        assert group in helped.stdout
    assert "gru, lstm, mingru, minlstm, rnn, transformer" in helped.stdout
    unknown = run_script("train.py", "model=mamba")
    assert unknown.returncode != 0
    assert "Could not find 'model/mamba'" in unknown.stderr
    assert "transformer" in unknown.stderr  # Hydra lists the available options
    typo = run_script("train.py", "trainer.max_epoch=3")
    assert typo.returncode != 0 and "max_epoch" in typo.stderr
    # eval.py's, translate.py's and predict.py's help: their own usage and keys, not train.py's groups they refuse
    for script, usage, key in (("eval.py", "Usage: python eval.py ckpt_path=", "data_dir: null"),
                               ("translate.py", "Usage: python translate.py ckpt_path=", "beam_size: null"),
                               ("predict.py", "Usage: python predict.py ckpt_path=", "batch_size: 64")):  # fmt: skip
        helped = run_script(script, "--help")
        assert helped.returncode == 0 and usage in helped.stdout and key in helped.stdout, helped.stdout[:500]
        assert "python train.py model=" not in helped.stdout and "experiment:" not in helped.stdout


@pytest.mark.slow
def test_data_errors_end_the_run_with_one_clear_line(tmp_path: Path) -> None:
    result = run_script(
        "train.py", "data=ett", f"data.data_dir={tmp_path / 'nope'}", "data.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert result.returncode == 1
    # on stderr, as warnings are (kept by 2>errors.log, shown on a terminal under > out.log)
    assert f"DataError: data file not found: {tmp_path / 'nope' / 'ETTh1.csv'}" in result.stderr
    assert "DataError" not in result.stdout and "[INFO]" in result.stdout and "[INFO]" not in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run").exists(), "a refused run left its directory (Hydra's record and log alone)"


def test_a_refused_command_leaves_no_run_directory(tmp_path: Path) -> None:
    """Every refused command left a logs/<task>/runs/<time> of Hydra's record and log; one that
    holds a run, or files of its own, is left as it is."""
    logs = tmp_path / "logs"
    refused = run_script("train.py", "trainer=gpu", f"paths.log_dir={logs}")
    assert refused.returncode == 1 and "no CUDA GPU is visible here" in refused.stderr
    assert not any((logs / "train" / "runs").glob("*"))
    refused = run_script("eval.py", f"ckpt_path={tmp_path / 'absent.ckpt'}", f"paths.log_dir={logs}")
    assert refused.returncode == 1 and "no such file or checkpoint directory" in refused.stderr
    assert not any((logs / "eval" / "runs").glob("*"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep\n")
    refused = run_script("train.py", "trainer=gpu", f"hydra.run.dir={mine}")
    assert refused.returncode == 1 and (mine / "notes.txt").read_text() == "keep\n"


@pytest.mark.parametrize("search", options("hparams_search"))
def test_every_hparams_search_composes_for_its_task(make_cfg, search: str) -> None:
    task = search.removesuffix("_optuna")
    data = {"forecasting": "timeseries", "classification": "sentiment_synthetic"}.get(
        task, "translation_synthetic"
    )
    cfg = make_cfg(f"hparams_search={search}", f"data={data}", fast=False)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.direction == cfg.task.monitor_mode
    assert cfg.optimized_metric == f"{cfg.task.monitor}_best"
    assert cfg.hydra.sweeper.params, "a search space"


@pytest.mark.parametrize("data", ["timeseries", "sentiment_synthetic", "translation_synthetic"])
def test_the_general_search_fits_every_task_and_backbone(make_cfg, data: str) -> None:
    """``hparams_search=optuna`` (DESIGN.md's ``python train.py -m hparams_search=optuna
    data=ett``) searches what every task and backbone has, in the direction of the data's task."""
    for model in ("rnn", "lstm", "gru", "transformer", "mingru", "minlstm"):
        cfg = make_cfg("hparams_search=optuna", f"data={data}", f"model={model}", fast=False)
        assert cfg.hydra.sweeper.direction == ("min" if data == "timeseries" else "max")
        for key in cfg.hydra.sweeper.params:
            assert OmegaConf.select(cfg, key) is not None, f"{key} is not a setting of {model} on {data}"


def test_model_size_and_a_width_of_ones_own_are_not_given_together(make_cfg) -> None:
    """model.size solves d_model: a d_model given beside it was dropped without a word, while the
    run's config.yaml, overrides and W&B config showed it (a sweep of model.d_model=64,128 under
    model.size=tiny trained one model twice). Refused; the width built is in summary.json."""
    with pytest.raises(
        ConfigError, match=r"model.size=tiny solves the width itself, and model.d_model=256 would be ignored"
    ):
        check_choices(make_cfg("model=gru", "model.size=tiny", "model.d_model=256", fast=False))
    check_choices(
        make_cfg("model=gru", "model.size=tiny", fast=False)
    )  # the config's own d_model is replaced quietly
    check_choices(make_cfg("model=gru", "model.size=null", "model.d_model=256", fast=False))


@pytest.mark.parametrize("data", ["timeseries", "sentiment_synthetic", "translation_synthetic"])
def test_model_size_gives_every_backbone_the_same_budget(make_cfg, data: str, tmp_path: Path) -> None:
    cache = [] if data == "timeseries" else [f"data.cache_dir={tmp_path}"]
    counts = {}
    for model in ("rnn", "lstm", "gru", "transformer", "mingru", "minlstm"):
        cfg = make_cfg(f"data={data}", f"model={model}", "model.size=small", *cache, fast=False)
        task = build_task(cfg.task, cfg.model, build_datamodule(cfg.data))
        counts[model] = sum(p.numel() for p in task.backbone.parameters())
    assert all(abs(n - 500_000) < 0.1 * 500_000 for n in counts.values()), counts
    # the width really follows the size: a tiny transformer is narrower than the config's own
    cfg = make_cfg(f"data={data}", "model=transformer", "model.size=tiny", *cache, fast=False)
    tiny = build_task(cfg.task, cfg.model, build_datamodule(cfg.data)).backbone
    assert sum(p.numel() for p in tiny.parameters()) < 60_000


def test_a_sized_model_reloads_with_the_width_it_was_trained_with(make_cfg, monkeypatch) -> None:
    """The solved width is what the checkpoint's hyperparameters hold: budgets changed since (or
    another parameter count) still rebuild the trained shapes, without solving again."""
    from seqlab.tasks import base

    cfg = make_cfg("model=transformer", "model.size=tiny")
    task = build_task(cfg.task, cfg.model, build_datamodule(cfg.data))
    checkpoint = {"hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    saved = checkpoint["hyper_parameters"]
    assert "size" not in saved["backbone"] and saved["backbone"]["d_model"] == task.backbone.d_model
    assert saved["backbone"]["d_model"] != cfg.model.d_model  # solved, not the config's
    monkeypatch.setitem(base.SIZES, "tiny", 400_000)
    reloaded = type(task)(**saved)
    reloaded.load_state_dict(task.state_dict())  # the same shapes
    assert reloaded.backbone.d_model == task.backbone.d_model


def test_unknown_model_size_is_refused(make_cfg) -> None:
    from seqlab.errors import ConfigError

    cfg = make_cfg("model=lstm", "model.size=huge")
    with pytest.raises(ConfigError, match=r"model.size='huge': expected one of \['tiny', 'small', 'base'\]"):
        build_task(cfg.task, cfg.model, build_datamodule(cfg.data))


@pytest.mark.parametrize("backbone", options("study_backbone"))
def test_seeds_study_backbones_are_the_studys(make_cfg, backbone: str) -> None:
    cfg = make_cfg("experiment=seeds_study", f"+study_backbone={backbone}", fast=False)
    task = build_task(cfg.task, cfg.model, build_datamodule(cfg.data))
    assert task.backbone.d_model == 64 and cfg.task.optimizer.lr == 1e-3 and cfg.task.patch_len == 1
    if backbone == "rnn64":
        assert task.backbone.encoder.num_layers == 1 and task.backbone.encoder.hidden_size == 64
    else:
        assert len(task.backbone.encoder_layers) == 2 and task.backbone.encoder_layers[0].attn.nhead == 4


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp2", "deepspeed"])
def test_multi_process_strategies_count_the_devices_of_their_accelerator(
    make_cfg, monkeypatch, strategy: str
) -> None:
    """On a machine with a GPU, ``trainer.accelerator=cpu`` still means two CPU processes (gloo),
    not one process per GPU; without a GPU every accelerator falls back to the CPU processes."""

    def devices(*overrides: str) -> int:
        return make_cfg(f"trainer={strategy}", *overrides, fast=False).trainer.devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices() == devices("trainer.accelerator=gpu") == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert devices() == devices("trainer.accelerator=gpu") == 4
    assert devices("trainer.accelerator=cpu") == 2
    from seqlab.utils.resolvers import device_count

    assert device_count(3) == 4, "the one-argument form: N CPU processes, or every GPU"
    # under torchrun --nproc_per_node=2: the processes it started, whatever the GPUs here
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert devices() == devices("trainer.accelerator=cpu") == 2 and device_count("gpu", 8) == 2
