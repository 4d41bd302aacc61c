"""Bad input as a user types it: one clear line naming the key or file and what was expected,
a non-zero exit, no traceback, and nothing written into an existing good run."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import pytest
import torch

from seqlab.errors import ConfigError
from seqlab.utils.distributed import check_device_count
from tests.conftest import FAST, run_script


@pytest.mark.parametrize("value", [1, 4, -1, "auto", [0, 1], "2", "0,1", "-1", "0,", "12"])
def test_valid_device_counts_pass(value) -> None:
    check_device_count(value, "trainer.devices")


@pytest.mark.parametrize("value", ["abc", 0, -2, 1.5, True, [], ["a"], None, "0", "-5", ",", "02", "1,,2"])
def test_invalid_device_counts_name_the_key_and_value(value) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.devices=.*expected a positive integer"):
        check_device_count(value, "trainer.devices")


def _assert_clear_failure(done, *expected: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-2000:]
    for text in expected:
        assert text in output, output[-2000:]
    assert "Traceback" not in output


@pytest.mark.slow
def test_wrong_type_unknown_key_and_unknown_option_are_refused_before_training(tmp_path: Path) -> None:
    done = run_script("train.py", *FAST, "trainer.devices=abc", f"hydra.run.dir={tmp_path / 'a'}")
    _assert_clear_failure(done, "trainer.devices='abc': expected a positive integer")
    assert not (tmp_path / "a" / "config.yaml").exists()  # refused before the run wrote anything

    done = run_script("train.py", *FAST, "trainer.max_epochs=abc", f"hydra.run.dir={tmp_path / 'a'}")
    _assert_clear_failure(
        done, "trainer.max_epochs='abc': expected an integer or null (Trainer's max_epochs)"
    )
    assert not (tmp_path / "a" / "config.yaml").exists()

    done = run_script("train.py", *FAST, "trainer.devicez=2", f"hydra.run.dir={tmp_path / 'b'}")
    _assert_clear_failure(done, "Could not override 'trainer.devicez'", "Key 'devicez' is not in struct")

    done = run_script("train.py", *FAST, "model=lstmm", f"hydra.run.dir={tmp_path / 'c'}")
    _assert_clear_failure(done, "Could not find 'model/lstmm'", "lstm")

    # a value refused while the data are built: after the run's record, before any training (the
    # directory Hydra made for it goes, record and log with it: the fixed command starts afresh)
    done = run_script(
        "train.py", *FAST, "+data.split_ratios=[0.5,0.6,0.1]", f"hydra.run.dir={tmp_path / 'd'}"
    )
    _assert_clear_failure(done, "data.split_ratios=[0.5, 0.6, 0.1]: expected three positive shares")
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_a_corrupt_or_truncated_checkpoint_is_named(make_cfg, tmp_path: Path) -> None:
    from seqlab.train import train

    train(make_cfg("trainer.max_epochs=1", "test=false"))
    good = tmp_path / "run" / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (truncated, garbage):
        done = run_script("eval.py", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / ('eval_' + path.stem)}")
        _assert_clear_failure(
            done, f"ckpt_path='{path}' is not a readable checkpoint", "truncated or corrupt"
        )
    assert good.stat().st_size > 0 and good.read_bytes()[:2] == b"PK"  # the good checkpoint is untouched


def test_a_checkpoint_refused_by_the_safe_loader_names_what_it_refused(tmp_path: Path) -> None:
    """torch's own reason was dropped (only its type was kept): a checkpoint holding a NumPy
    scalar read as "truncated or corrupt", with nothing naming the object to allow."""
    import numpy as np
    import torch

    from seqlab.utils.checkpoint_io import load_run_info

    path = tmp_path / "numpy.ckpt"
    torch.save({"seqlab": {"task_target": "x", "data": {}}, "loss": np.float64(0.5)}, path)
    with pytest.raises(
        ConfigError, match=r"\(UnpicklingError: Unsupported global: GLOBAL numpy\S*scalar was not"
    ):
        load_run_info(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(
        ConfigError, match=r"\(RuntimeError: PytorchStreamReader failed reading zip archive[^.]*\): the"
    ):
        load_run_info(path)


def test_eval_without_a_checkpoint_or_with_a_model_of_its_own_is_refused(make_cfg, tmp_path: Path) -> None:
    """No ``ckpt_path``: OmegaConf's ``MissingMandatoryValue`` came as a traceback. ``+model=lstm``
    (Hydra's own hint for ``model=lstm``): the checkpoint's model was evaluated, and the given one
    recorded in the run's config.yaml."""
    from seqlab.eval import evaluate

    with pytest.raises(
        ConfigError, match=r"ckpt_path: expected the checkpoint to use: python eval.py ckpt_path="
    ):
        evaluate(make_cfg(name="eval", output="none"))
    with pytest.raises(ConfigError, match=r"\+model=: the checkpoint fixes the model and the task"):
        evaluate(make_cfg(f"ckpt_path={tmp_path / 'x.ckpt'}", "+model=lstm", name="eval", output="model"))
    assert not (tmp_path / "model" / "config.yaml").exists()
    with pytest.raises(ConfigError, match=r"\+task=: the checkpoint fixes the model and the task"):
        evaluate(
            make_cfg(f"ckpt_path={tmp_path / 'x.ckpt'}", "+task=forecasting", name="eval", output="task")
        )
    # a key eval.py does not have, added with the + Hydra's error asks for: it was ignored
    with pytest.raises(
        ConfigError, match=r"\+data_dri=/d: not a key of eval.py, which takes .*ckpt_path, data_dir"
    ):
        evaluate(make_cfg(f"ckpt_path={tmp_path / 'x.ckpt'}", "+data_dri=/d", name="eval", output="typo"))
    for added in ("+trainer.profiler=simple", "++data.batch_size=8"):  # what eval.py adds: on to the file
        with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "x.ckpt"))):
            evaluate(make_cfg(f"ckpt_path={tmp_path / 'x.ckpt'}", added, name="eval", output="ok"))


def test_more_devices_than_this_machine_has_are_refused(make_cfg, tmp_path: Path) -> None:
    from seqlab.train import train

    too_many = (os.cpu_count() or 1) + 1
    with pytest.raises(ConfigError, match=rf"trainer\.devices={too_many} but this machine has \d+ CPU cores"):
        train(make_cfg("trainer=ddp", f"trainer.devices={too_many}", "trainer.accelerator=cpu"))
    assert not (tmp_path / "run").exists(), "refused before anything was written or spawned"


def test_an_interrupted_run_whose_model_code_changed_is_told_so(
    make_cfg, tmp_path: Path, monkeypatch
) -> None:
    """resume=auto found the run's own checkpoint, with the configuration it saved, and the error
    blamed ckpt_path (never given) and the model settings (unchanged): the code had changed."""
    from seqlab.tasks.forecasting import ForecastingTask
    from seqlab.train import train

    train(make_cfg("trainer.max_epochs=1", "test=false"))
    (tmp_path / "run" / "summary.json").unlink()  # as if killed before it finished
    built = ForecastingTask.__init__  # the code now builds one token fewer: another head shape

    @functools.wraps(built)  # (its signature: the settings check reads it)
    def changed(self, *args, **kwargs):
        built(self, *args, **{**kwargs, "padding_patch": None})

    monkeypatch.setattr(ForecastingTask, "__init__", changed)
    with pytest.raises(ConfigError, match=r"the interrupted run's '.*last.ckpt' \(resume=auto, its own configuration\) "
                       r"holds weights of another shape than the model this code builds: .*The model's code "
                       r"changed since it was saved: .* or start afresh with resume=never"):  # fmt: skip
        train(make_cfg("trainer.max_epochs=1", "test=false"))


def test_a_checkpoint_of_another_task_or_backbone_is_refused_by_name(make_cfg, tmp_path: Path) -> None:
    from seqlab.train import train

    train(make_cfg("trainer.max_epochs=1", "test=false", "model=gru", output="gru"))
    checkpoint = tmp_path / "gru" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"holds a ForecastingTask with a RNNBackbone \(cell=gru\) backbone, but "
                       r"this run trains a ForecastingTask with a TransformerBackbone backbone"):  # fmt: skip
        train(make_cfg("model=transformer", f"ckpt_path={checkpoint}", output="other"))
    # rnn, lstm and gru share a class: an lstm run on a gru checkpoint was a weight-shape error whose
    # init_exclude remedy would have dropped the whole encoder
    with pytest.raises(ConfigError, match=r"RNNBackbone \(cell=gru\) backbone, but this run trains a "
                       r"ForecastingTask with a RNNBackbone \(cell=lstm\) backbone"):  # fmt: skip
        train(make_cfg("model=lstm", f"ckpt_path={checkpoint}", output="lstm"))
    with pytest.raises(
        ConfigError, match=r"holds a ForecastingTask .* but this run trains a ClassificationTask"
    ):
        train(
            make_cfg(
                "data=sentiment_synthetic", "model=gru", f"ckpt_path={checkpoint}", fast=False, output="o2"
            )
        )
    with pytest.raises(ConfigError, match="is not a readable checkpoint"):
        (tmp_path / "junk.ckpt").write_bytes(b"junk")
        train(make_cfg(f"ckpt_path={tmp_path / 'junk.ckpt'}", output="other3"))
    assert not (tmp_path / "other" / "config.yaml").exists()
    # the same backbone of another width or depth: Lightning's strict loading raised a 70-line
    # traceback after the run had started; refused by name, the run directory left without a run
    for override, shown in (("model.d_model=16", r"\[96(, \d+)?\] in the checkpoint, \[48(, \d+)?\] here"),
                            ("model.num_layers=3", r"not in the checkpoint \(first backbone\.")):  # fmt: skip
        with pytest.raises(
            ConfigError, match=rf"holds weights of another shape than this run's model: .*{shown}"
        ):
            train(make_cfg("model=gru", override, f"ckpt_path={checkpoint}", output="shape"))
        assert not (tmp_path / "shape" / "config.yaml").exists()
    # one process's checkpoint resumes under FSDP and FSDP2 (their loaders pair its optimizer
    # state with the groups: test_strategies), as theirs do elsewhere
    from seqlab.utils.resume import check_checkpoint_fits

    for strategy in ("fsdp", "fsdp2"):
        check_checkpoint_fits(str(checkpoint), make_cfg("model=gru", f"trainer={strategy}", output=strategy))
    # a DeepSpeed directory (written by CUDA runs only; its layout here): DeepSpeed keeps
    # Lightning's entries in the latest tag's model-states file, where they are checked and read
    saved = torch.load(checkpoint, weights_only=True)
    deepspeed_dir = tmp_path / "deepspeed.ckpt"
    (deepspeed_dir / "checkpoint").mkdir(parents=True)
    (deepspeed_dir / "latest").write_text("checkpoint")
    entries = {key: saved[key] for key in ("seqlab", "hyper_parameters", "global_step")}
    torch.save(
        {"module": saved["state_dict"], **entries},
        deepspeed_dir / "checkpoint" / "mp_rank_00_model_states.pt",
    )
    # an MoE expert's file, which sorts first, holds no Lightning entries
    torch.save({"module": {}}, deepspeed_dir / "checkpoint" / "layer_0_expert_0_mp_rank_00_model_states.pt")
    info = check_checkpoint_fits(str(deepspeed_dir), make_cfg("model=gru", "trainer=deepspeed", output="o6"))
    assert info is not None and info["data"] == saved["seqlab"]["data"]
    with pytest.raises(
        ConfigError, match=r"holds a ForecastingTask with a RNNBackbone \(cell=gru\) backbone"
    ):
        check_checkpoint_fits(
            str(deepspeed_dir), make_cfg("model=transformer", "trainer=deepspeed", output="o7")
        )
    # one that does not load with weights_only: not checked, and resumed by its strategy as before
    torch.save(
        {"module": {}, "ds_config": object()}, deepspeed_dir / "checkpoint" / "mp_rank_00_model_states.pt"
    )
    assert (
        check_checkpoint_fits(str(deepspeed_dir), make_cfg("model=gru", "trainer=deepspeed", output="o8"))
        is None
    )


def test_windows_longer_than_the_model_was_built_for_are_refused_by_name(make_cfg, tmp_path: Path) -> None:
    """A forecasting model's head is sized by the look-back window: evaluating a checkpoint on
    longer windows (the model's maximum, for this task) names both lengths."""
    from seqlab.errors import DataError
    from seqlab.eval import evaluate
    from seqlab.train import train

    train(make_cfg("trainer.max_epochs=1", "test=false"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    longer = make_cfg(f"ckpt_path={checkpoint}", "+data.lookback=96", name="eval", output="eval")
    with pytest.raises(ConfigError, match=r"data.lookback=96 \(the model was built for 48\): the checkpoint"):
        evaluate(longer)
    task = evaluate(make_cfg(f"ckpt_path={checkpoint}", name="eval", output="eval2"))[1]["task"]
    with pytest.raises(DataError, match=r"input windows of 96 steps x \d+ channels, but this model was built for "
                       r"data.lookback=48 steps"):  # fmt: skip
        task(torch.zeros(2, 96, task.hparams.num_channels))


def test_patches_with_gaps_between_them_are_refused(make_cfg) -> None:
    """At training (a checkpoint trained so before the check still evaluates)."""
    from seqlab.train import build_datamodule, build_task, train

    cfg = make_cfg("task.patch_len=4", "task.patch_stride=8")
    with pytest.raises(
        ConfigError, match=r"task.patch_len=4 < task.patch_stride=8: the 4 steps between patches"
    ):
        train(cfg)
    build_task(cfg.task, cfg.model, build_datamodule(cfg.data))  # builds (and loads) as before


def test_patches_that_leave_the_latest_steps_out_are_refused(make_cfg) -> None:
    """Without PatchTST's end padding, patches that do not tile the look-back drop its last steps
    (the most recent, the ones that matter most) silently."""
    from seqlab.train import build_datamodule, build_task, train

    # look-back 48, patches of 16 every 8: 48 - 16 = 32 is tiled (5 patches); 12 every 8 is not
    for padding, patch, tokens in (("null", 16, 5), ("end", 12, 6)):
        cfg = make_cfg(f"task.padding_patch={padding}", f"task.patch_len={patch}", "task.patch_stride=8")
        task = build_task(cfg.task, cfg.model, build_datamodule(cfg.data))
        task.check_trainable()
        assert task.num_tokens == tokens
    with pytest.raises(ConfigError, match=r"task.padding_patch=null: patches of 12 steps every 8 leave the last 4 of "
                       r"data.lookback=48 steps out; use task.padding_patch=end"):  # fmt: skip
        train(make_cfg("task.patch_len=12", "task.patch_stride=8", "task.padding_patch=null"))
    with pytest.raises(ConfigError, match=r"task.padding_patch='start': expected one of \['end', None\]"):
        train(make_cfg("task.padding_patch=start"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.num_layers=0", r"model.num_layers=0: expected at least 1 layer"),
        ("model.dropout=1.5", r"model.dropout=1.5: expected a probability in \[0, 1\]"),
        ("model.d_model=0", r"model.d_model=0: expected a width >= 1"),
        ("model=mingru model.expansion=0", r"model.expansion=0: expected a width factor > 0"),
        (
            "model=transformer model.num_decoder_layers=0",
            r"model.num_decoder_layers=0: expected at least 1 layer",
        ),
        ("model.num_layers=two", r"model.num_layers='two': expected an integer"),
        ("task.head_dropout=-0.1", r"task.head_dropout=-0.1: expected a probability in \[0, 1\]"),
        (
            "task.revin=false task.revin_affine=true",
            r"task.revin_affine=true with task.revin=false: the affine",
        ),
    ],
)
def test_backbone_and_task_sizes_out_of_range_are_named(make_cfg, override: str, message: str) -> None:
    """No layers built an embedding-to-head linear model without a word (a search range's 0, a
    typo); PyTorch's own messages for a dropout of 1.5 or 0 layers of nn.GRU named no key."""
    from seqlab.train import train

    with pytest.raises(ConfigError, match=message):
        train(make_cfg(*override.split()))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task.optimizer.lr=[0.001,0.01]", r"task.optimizer.lr=\[0.001, 0.01\]: expected a finite number >= 0"),
        ("task.optimizer.lr=abc", r"task.optimizer.lr='abc': expected a finite number >= 0"),
        ("task.optimizer.lr=-1e-3", r"task.optimizer.lr=-0.001: expected a finite number >= 0"),
        ("task.optimizer.weight_decay=[0.1]", r"task.optimizer.weight_decay=\[0.1\]: expected a number"),
        ("+task.optimizer.betas=[0.9]", r"task.optimizer.betas=\[0.9\]: expected a list of 2"),
        ("+task.optimizer.betas=[0.9,1.5]", r"task.optimizer.betas\[1\]=1.5: expected a number in \[0, 1\)"),
        ("+task.optimizer.momentum=0.9", r"task.optimizer.momentum: not a setting of AdamW"),
        ("data.batch_size=0", r"data.batch_size=0: expected a positive integer"),
        ("data=sentiment_synthetic data.batch_size=-4", r"data.batch_size=-4: expected a positive integer"),
        ("data=translation_synthetic data.batch_size=0", r"data.batch_size=0: expected a positive integer"),
        ("data=translation_synthetic task.max_len_b=-20", r"task.max_len_b=-20: expected a number >= 0"),
        ("data=translation_synthetic task.max_len_a=-1", r"task.max_len_a=-1: expected a number >= 0"),
        ("data=translation_synthetic task.min_len=-1", r"task.min_len=-1: expected a token count >= 0"),
        ("data=translation_synthetic task.sample_translations=-1", r"task.sample_translations=-1: expected a row"),
        ("data=sentiment_synthetic task.misclassified_samples=-1", r"task.misclassified_samples=-1: expected a row"),
        ("data=sentiment_synthetic data.tokenizer.min_frequency=-1", r"min_frequency=-1: expected a count >= 0"),
    ],
)  # fmt: skip
def test_optimizer_data_and_decoding_settings_out_of_range_are_named_before_the_run(
    make_cfg, tmp_path: Path, override: str, message: str
) -> None:
    """torch's own checks failed at the first step (``'<=' not supported between 'float' and
    'list'``) or inside the fused kernel; a batch size of 0 divided by zero in the sampler; negative
    decoding limits made every hypothesis empty (BLEU 0, exit 0); the tokenizer trainer's
    ``can't convert negative int to unsigned`` named no key."""
    from seqlab.train import train

    with pytest.raises(ConfigError, match=message):
        text = "data=" in override  # (FAST is forecasting's)
        train(
            make_cfg(
                *override.split(), f"data.cache_dir={tmp_path / 'cache'}" if text else "seed=1", fast=not text
            )
        )
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_fractional_holdout_of_one_or_more_is_refused() -> None:
    """``data.val_size=1.5`` held out one example (``int(1.5)``), as did ``1.0`` meant as 100%."""
    from seqlab.data.classification import TextClassificationDataModule

    with pytest.raises(
        ConfigError, match=r"data.val_size=1.5: expected a share .* \(0 < x < 1\) or a number"
    ):
        TextClassificationDataModule(data_dir="/nowhere", val_size=1.5)
    with pytest.raises(ConfigError, match=r"data.test_size=2.5"):
        TextClassificationDataModule(data_dir="/nowhere", test_size=2.5)
    TextClassificationDataModule(data_dir="/nowhere", val_size=2.0)  # a whole number: a count


def test_a_value_the_config_leaves_to_be_given_is_named_before_anything_is_written(
    make_cfg, tmp_path: Path
) -> None:
    """``data=csv`` without its file: OmegaConf's MissingMandatoryValue came as a traceback from
    inside the data module's construction, after the run directory's files were written."""
    from seqlab.train import train

    with pytest.raises(ConfigError, match=r"^data.data_dir, data.file: expected a value on the command line \(the "
                       r"config leaves it to be given: data.data_dir=... data.file=...\)"):  # fmt: skip
        train(make_cfg("data=csv", "trainer.accelerator=cpu", fast=False))
    assert not (tmp_path / "run").exists()


def test_a_target_that_cannot_be_imported_is_named(make_cfg) -> None:
    """Hydra's three chained tracebacks (AttributeError, ModuleNotFoundError, ImportError) named
    no key; one line names it and what Python said."""
    from seqlab.train import train

    with pytest.raises(ConfigError, match=r"model._target_='mybb.nosuch.CNN' cannot be imported \(ModuleNotFoundError: "
                       r"\"No module named 'mybb'\"\): expected a class on the Python path"):  # fmt: skip
        train(make_cfg("model._target_=mybb.nosuch.CNN"))
    with pytest.raises(
        ConfigError, match=r"data._target_='seqlab.data.forecasting.NoSuch' cannot be imported"
    ):
        train(make_cfg("data._target_=seqlab.data.forecasting.NoSuch"))


def test_truncated_bptt_that_truncates_nothing_is_refused(make_cfg) -> None:
    """model.tbptt_steps counts the encoder's steps, patch tokens in forecasting: 48 meant as
    time steps truncated nothing of a 48-step look-back in 7 tokens, silently."""
    from seqlab.train import build_datamodule, build_task, train

    cfg = make_cfg("model=lstm", "model.tbptt_steps=48")  # look-back 48, patches of 8 (stride 8)
    with pytest.raises(
        ConfigError,
        match=r"model.tbptt_steps=48 counts the encoder's steps, which are patch tokens here: .* is 7 tokens",
    ):
        train(cfg)
    for steps in (3, 6):  # what does truncate trains
        build_task(
            cfg.task, {**cfg.model, "tbptt_steps": steps}, build_datamodule(cfg.data)
        ).check_trainable()


def test_a_task_or_model_key_the_data_or_backbone_cannot_take_is_refused_before_the_data(
    make_cfg, tmp_path: Path, monkeypatch
) -> None:
    """``task=classification`` on series, an experiment's ``model.nhead`` under ``model=gru``: a raw
    TypeError after the data was read (an SST-2 download and tokenizer training first); refused
    by name, before any data is read."""
    from seqlab.data import forecasting
    from seqlab.train import train

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the config was refused")

    monkeypatch.setattr(forecasting.SyntheticSeriesDataModule, "prepare_data", no_data)
    with pytest.raises(ConfigError, match=r"task=classification \(ClassificationTask\) cannot train on "
                       r"data=timeseries, whose examples are for a ForecastingTask.*drop task="):  # fmt: skip
        train(make_cfg("task=classification", fast=False, output="task"))
    with pytest.raises(
        ConfigError, match=r"model\.nhead: not a setting of RNNBackbone \(its settings: .*cell"
    ):
        train(make_cfg("model=gru", "+model.nhead=4", output="model"))
    # a value of the wrong type, in every group
    for override, expected in {
        "seed=abc": "seed='abc': expected an integer, or null for an unseeded run",
        "model.d_model=abc": "model.d_model='abc': expected an integer (TransformerBackbone's d_model)",
        "data.lookback=1.5": "data.lookback=1.5: expected an integer (SyntheticSeriesDataModule's lookback)",
        "task.head=7": "task.head=7: expected a string (ForecastingTask's head)",
        "trainer.precision=17": "trainer.precision=17: expected one of 64, 32, 16, ",
        "callbacks.early_stopping.patience=x": "callbacks.early_stopping.patience='x': expected an integer",
    }.items():
        with pytest.raises(ConfigError, match="^" + re.escape(expected)):
            train(make_cfg(override, fast=False, output="model"))
    assert not (tmp_path / "task").exists() and not (tmp_path / "model").exists()


def test_a_data_setting_the_datamodule_does_not_take_is_named() -> None:
    """``eval.py data_dir=...`` or ``+data.x=`` on data that has no such setting."""
    from seqlab.train import build_datamodule

    with pytest.raises(
        ConfigError,
        match=r"data.data_dir, data.tokenizer: not a setting of SyntheticSeriesDataModule \(its settings: .*num_steps",
    ):
        build_datamodule(
            {
                "_target_": "seqlab.data.forecasting.SyntheticSeriesDataModule",
                "data_dir": "/x",
                "tokenizer": {},
            }
        )


@pytest.mark.parametrize(
    ("target", "setting"),
    [
        ("seqlab.data.classification.SyntheticSentimentDataModule", {"data_dir": "/x"}),
        ("seqlab.data.translation.SyntheticTranslationDataModule", {"source_lang": "de"}),
    ],
)
def test_a_file_setting_given_to_generated_text_data_is_named(target: str, setting: dict) -> None:
    """The synthetic text datamodules take the file datamodules' settings through ``**kwargs``
    (so the setting check passes them) and used to drop ``data_dir`` and the like silently."""
    from seqlab.train import build_datamodule

    key, value = next(iter(setting.items()))
    with pytest.raises(
        ConfigError, match=rf"data.{key}='{value}': Synthetic\w+ generates its data in memory"
    ):
        build_datamodule({"_target_": target, **setting}, prepare=False)
    build_datamodule({"_target_": target, "data_dir": None}, prepare=False)  # what a checkpoint hands back


def test_an_error_raised_while_the_config_is_instantiated_is_seqlabs_own(make_cfg, tmp_path: Path) -> None:
    """Hydra wraps what a datamodule's or backbone's ``__init__`` raises in its own exception
    (printed with a traceback); the entry points print a ``ConfigError`` as one line."""
    from seqlab.train import train

    with pytest.raises(
        ConfigError, match=r"data.split_ratios=\[0.5, 0.6, 0.1\]: expected three positive shares"
    ):
        train(make_cfg("+data.split_ratios=[0.5,0.6,0.1]"))
    with pytest.raises(ConfigError, match=r"model.nhead"):
        train(make_cfg("model.nhead=3", output="b"))  # d_model 32 is not a multiple of 3
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_an_evaluation_sweep_goes_on_past_a_bad_checkpoint(tmp_path: Path) -> None:
    """``eval.py -m ckpt_path=a,b``: a job that fails records its error and the next one runs
    (the first failure's SystemExit ended the whole sweep)."""
    trained = run_script("train.py", *FAST, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    good = tmp_path / "run" / "checkpoints" / "best.ckpt"
    sweep = tmp_path / "sweep"
    done = run_script(
        "eval.py",
        "-m",
        f"ckpt_path={tmp_path / 'a.ckpt'},{tmp_path / 'b.ckpt'},{good}",
        f"hydra.sweep.dir={sweep}",
    )
    assert done.returncode != 0  # the sweep says some job failed
    for job, name in ((0, "a.ckpt"), (1, "b.ckpt")):
        assert name in (sweep / str(job) / "error.txt").read_text()
    # and the job after them evaluated its checkpoint
    summary = json.loads((sweep / "2" / "summary.json").read_text())
    assert summary["ckpt_path"] == str(good) and summary["metrics"]["test/mse"] > 0
    assert not (sweep / "2" / "error.txt").exists()
    # the sweep's table tells its jobs apart: each row its checkpoint and the trained model
    import csv

    with (sweep / "sweep_summary.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["status"] for row in rows] == ["failed", "failed", "ok"]
    assert rows[2]["overrides"] == f"ckpt_path={good}" and rows[2]["model"] == "transformer"
    assert "a.ckpt" in rows[0]["overrides"]


def test_eval_merges_data_settings_key_by_key_and_keeps_the_checkpoints_tokenizer() -> None:
    """``+data.tokenizer.max_length=512`` replaced the checkpoint's whole tokenizer block (the rest
    fell back to the defaults in the run's record) and changed nothing: the checkpoint's
    tokenizer encodes. A differing tokenizer setting is refused by name."""
    from seqlab.utils.checkpoint_io import data_settings

    saved = {
        "_target_": "x.Data",
        "batch_size": 32,
        "tokenizer": {"kind": "bpe", "max_length": 128, "wrap": "cls"},
    }
    with_tokenizer = {"data": saved, "data_artifacts": {"tokenizer": "{...}"}}
    merged = data_settings(with_tokenizer, {"batch_size": 8, "tokenizer": {"max_length": 128}})
    assert merged == {**saved, "batch_size": 8}
    with pytest.raises(
        ConfigError, match=r"data.tokenizer.max_length=512 \(trained with 128\): the checkpoint's tokenizer"
    ):
        data_settings(with_tokenizer, {"tokenizer": {"max_length": 512}})
    # data without saved artifacts (series): merged key by key all the same
    assert data_settings({"data": saved}, {"tokenizer": {"max_length": 64}})["tokenizer"] == {
        "kind": "bpe", "max_length": 64, "wrap": "cls"
    }  # fmt: skip
    # +data=sst2 (another data module): refused as such, not as a list of the checkpoint's keys
    # that the other module does not take
    with pytest.raises(
        ConfigError, match=r"\+data=: Sst2 is not the data the checkpoint was trained on \(Data\)"
    ):
        data_settings({"data": saved}, {"_target_": "y.Sst2", "batch_size": 8})
    assert data_settings({"data": saved}, {"_target_": "x.Data"})["batch_size"] == 32  # (the same one)


def test_another_file_at_eval_is_not_fetched_from_the_training_files_url() -> None:
    """A checkpoint saves its data settings resolved: ETT's ``url: .../ETT-small/${.file}`` as the
    ETTh1 address. ``eval.py +data.file=ETTm1.csv`` with the file missing fetched ETTh1 under the
    name ETTm1.csv (scored on the wrong series, and kept there for every later run)."""
    from seqlab.utils.checkpoint_io import data_settings

    saved = {"file": "ETTh1.csv", "url": "https://example.org/ETT-small/ETTh1.csv", "data_dir": "/d"}
    assert (
        data_settings({"data": saved}, {"file": "ETTm1.csv"})["url"]
        == "https://example.org/ETT-small/ETTm1.csv"
    )
    elsewhere = {**saved, "url": "https://example.org/archive.zip"}  # not named after the file: none
    assert data_settings({"data": elsewhere}, {"file": "ETTm1.csv"})["url"] is None
    given = {"file": "ETTm1.csv", "url": "https://mirror.org/m1.csv"}  # given with it: as given
    assert data_settings({"data": saved}, given)["url"] == "https://mirror.org/m1.csv"
    assert data_settings({"data": saved}, {"data_dir": "/e"})["url"] == saved["url"]  # same file: kept
    query = {**saved, "url": "https://example.org/ETT-small/ETTh1.csv?raw=true"}
    assert (
        data_settings({"data": query}, {"file": "ETTm1.csv"})["url"]
        == "https://example.org/ETT-small/ETTm1.csv?raw=true"
    )
    for other in ("/data/ETTm1.csv", "sub/ETTm1.csv", None):  # not a name in data_dir: nothing fetched
        assert data_settings({"data": saved}, {"file": other})["url"] is None, other
    # data=ett's own address: its four files only (a user's sales.csv is not looked for there)
    from seqlab.utils.resolvers import ETT_URL

    ett = {**saved, "url": ETT_URL + "ETTh1.csv"}
    assert data_settings({"data": ett}, {"file": "ETTm2.csv"})["url"] == ETT_URL + "ETTm2.csv"
    assert data_settings({"data": ett}, {"file": "sales.csv"})["url"] is None


def test_data_ett_downloads_only_the_ett_files(make_cfg) -> None:
    """A user's own CSV under data=ett, missing, was said to be tried at ETDataset's address."""
    from seqlab.utils.resolvers import ETT_URL

    assert make_cfg("data=ett", fast=False).data.url == ETT_URL + "ETTh1.csv"
    assert make_cfg("data=ett", "data.file=sales.csv", fast=False).data.url is None
