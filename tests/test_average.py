"""Checkpoint averaging: a run keeps its last epochs, scripts/average_checkpoints.py averages them
into a checkpoint eval.py reads; checkpoints of other runs, the same weights twice or foreign
files are named."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from seqlab.average import average_checkpoints
from seqlab.callbacks import RecentCheckpoints
from seqlab.errors import ConfigError
from seqlab.eval import evaluate
from seqlab.train import train
from tests.conftest import run_script

EMA = ["+callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging", "+callbacks.ema.decay=0.9"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_the_last_epochs_average_into_a_checkpoint_eval_reads(make_cfg, tmp_path: Path) -> None:
    """``callbacks.recent_checkpoints.save_top_k=2`` keeps the last two epochs (epoch_001, epoch_002
    of 3); their average is the mean of their parameters (under EMA, of the averaged weights, not
    of the raw ones Lightning keeps beside them), holds no training state, and tests."""
    _, objects = train(make_cfg("callbacks.recent_checkpoints.save_top_k=2", *EMA))
    run = tmp_path / "run"
    kept = sorted(p.name for p in (run / "checkpoints").glob("epoch_*.ckpt"))
    assert kept == ["epoch_001.ckpt", "epoch_002.ckpt"]
    # the best checkpoint is still the one by val/mse, not the latest epoch's
    assert Path(objects["summary"]["best_checkpoint"]).name == "best.ckpt"

    result = run_script("scripts/average_checkpoints.py", str(run), "--output", str(tmp_path / "avg.ckpt"))
    assert result.returncode == 0, result.stderr
    assert "averaged 2 checkpoints (epochs 1, 2)" in result.stderr
    a, b = (weights(run / "checkpoints" / name) for name in kept)
    averaged = torch.load(tmp_path / "avg.ckpt", map_location="cpu", weights_only=True)
    assert set(averaged["state_dict"]) == set(a)
    for key, value in averaged["state_dict"].items():
        torch.testing.assert_close(value, (a[key] + b[key]) / 2, msg=key)
    raw = torch.load(run / "checkpoints" / kept[0], map_location="cpu", weights_only=True)
    assert "current_model_state" in raw  # (EMA's raw weights: in each epoch's checkpoint)
    assert not {"optimizer_states", "lr_schedulers", "loops", "current_model_state"} & set(averaged)
    assert averaged["seqlab"]["averaged_from"] == [str(run / "checkpoints" / name) for name in kept]
    evaluated, _ = evaluate(make_cfg(f"ckpt_path={tmp_path / 'avg.ckpt'}", name="eval", output="eval"))
    assert evaluated["test/mse"] < objects["summary"]["baseline"]["seasonal"]["mse"]
    # weights alone: train.py tests them (train=false), and refuses to train on from them
    tested, _ = train(make_cfg("train=false", f"ckpt_path={tmp_path / 'avg.ckpt'}", output="tested"))
    assert tested["test/mse"] == pytest.approx(evaluated["test/mse"], rel=1e-6)
    with pytest.raises(
        ConfigError, match=r"holds a model's weights alone \(an average of checkpoints\).*init_from="
    ):
        train(make_cfg(f"ckpt_path={tmp_path / 'avg.ckpt'}", output="resumed"))
    # an average averaged again with its inputs would weigh them unevenly
    with pytest.raises(ConfigError, match=r"avg.ckpt is itself an average of 2 checkpoints"):
        average_checkpoints([tmp_path / "avg.ckpt", run / "checkpoints" / kept[0]], tmp_path / "again.ckpt")


def test_what_cannot_be_averaged_is_named(make_cfg, tmp_path: Path) -> None:
    """Every epoch is kept whatever the validation schedule (validated every 2nd here: epoch 0
    was never saved when the checkpoint followed the validation)."""
    train(
        make_cfg(
            "callbacks.recent_checkpoints.save_top_k=2",
            "trainer.max_epochs=2",
            "trainer.check_val_every_n_epoch=2",
        )
    )
    ckpts = tmp_path / "run" / "checkpoints"
    first, second = ckpts / "epoch_000.ckpt", ckpts / "epoch_001.ckpt"
    assert first.is_file() and second.is_file()
    out = tmp_path / "avg.ckpt"
    with pytest.raises(ConfigError, match=r"1 checkpoint .*epoch_001.ckpt\): nothing to average"):
        average_checkpoints([ckpts], out, last=1)
    with pytest.raises(ConfigError, match=r"--last 5, but 2 checkpoints were found"):
        average_checkpoints([ckpts], out, last=5)
    with pytest.raises(ConfigError, match=r"--output .* is a directory"):
        average_checkpoints([ckpts], tmp_path)
    last = (ckpts / "last.ckpt").read_bytes()
    with pytest.raises(ConfigError, match=r"--output .*last.ckpt is a checkpoint of a run"):
        average_checkpoints([first, second], ckpts / "last.ckpt")
    assert (ckpts / "last.ckpt").read_bytes() == last
    with pytest.raises(ConfigError, match=r"--output .*best.ckpt is a checkpoint of a run"):
        average_checkpoints([first, second], ckpts / "best.ckpt")
    with pytest.raises(ConfigError, match=r"epoch_000.ckpt is given twice"):
        average_checkpoints([first, first], out)
    # best.ckpt of the last epoch (its validation's) is epoch_001.ckpt's weights
    with pytest.raises(
        ConfigError, match=r"were saved at the same point \(epoch 1, step \d+\): the same weights"
    ):
        average_checkpoints([first, second, ckpts / "best.ckpt"], out)
    (tmp_path / "empty").mkdir()
    before = second.read_bytes()
    with pytest.raises(ConfigError, match=r"--output .*epoch_001.ckpt is one of the checkpoints averaged"):
        average_checkpoints([first, second], second)
    assert second.read_bytes() == before and not out.exists()
    average_checkpoints([first, second], out)
    average_checkpoints([first, second], out)  # an earlier average is replaced
    with pytest.raises(
        ConfigError, match=r"no epoch_NNN.ckpt to average; .*callbacks.recent_checkpoints.save_top_k=N"
    ):
        average_checkpoints([(tmp_path / "empty").resolve()], out)
    (tmp_path / "foreign.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"checkpoint='.*foreign.ckpt' is not a readable checkpoint"):
        average_checkpoints([first, tmp_path / "foreign.ckpt"], out)
    # the same configuration trained apart (another seed): unrelated weights, refused by run
    train(make_cfg("seed=7", "trainer.max_epochs=1", "test=false", output="seed7"))
    other_run = tmp_path / "seed7" / "checkpoints" / "last.ckpt"
    with pytest.raises(
        ConfigError, match=r"last.ckpt is a checkpoint of the run .*seed7, .*only checkpoints of one run"
    ):
        average_checkpoints([first, other_run], out)
    # checkpoints saved before runs recorded their directory: compared by their settings
    train(make_cfg("model=lstm", "trainer.max_epochs=1", "test=false", output="lstm"))
    for path in (first, tmp_path / "lstm" / "checkpoints" / "last.ckpt"):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        del checkpoint["seqlab"]["run_dir"]
        torch.save(checkpoint, tmp_path / f"old_{path.parents[1].name}.ckpt")
    with pytest.raises(ConfigError, match=r"differ in their model settings \(hyper_parameters.backbone"):
        average_checkpoints([tmp_path / "old_run.ckpt", tmp_path / "old_lstm.ckpt"], out)
    result = run_script("scripts/average_checkpoints.py", str(first), "--output", str(out))
    assert result.returncode == 1 and "ConfigError: 1 checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_run_resumed_keeping_fewer_epochs_removes_the_older_ones(tmp_path: Path) -> None:
    """Resumed with a smaller ``save_top_k``, the older checkpoints go at once (Lightning removes
    one only while it holds exactly k: with more it kept every later epoch too)."""
    files = [tmp_path / f"epoch_{epoch:03d}.ckpt" for epoch in range(5)]
    for path in files:
        path.write_bytes(b"x")
    saved = RecentCheckpoints(str(tmp_path), save_top_k=5)
    saved.best_k_models = {str(path): torch.tensor(float(epoch)) for epoch, path in enumerate(files)}
    resumed = RecentCheckpoints(str(tmp_path), save_top_k=2)
    resumed.load_state_dict({**saved.state_dict(), "best_model_path": str(files[-1])})
    trainer = SimpleNamespace(strategy=SimpleNamespace(remove_checkpoint=lambda path: Path(path).unlink()))
    resumed.on_train_start(trainer, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_003.ckpt", "epoch_004.ckpt"]
    assert set(resumed.best_k_models) == {str(files[3]), str(files[4])}
    assert resumed.kth_best_model_path == str(files[3]) and float(resumed.kth_value) == 3.0
    assert resumed.best_model_path == str(files[4])


def test_settings_of_a_callback_that_is_not_there_are_said(caplog) -> None:
    """``callbacks=none +callbacks.recent_checkpoints.save_top_k=3``: settings without a
    ``_target_`` build no callback; they were dropped without a word."""
    from omegaconf import OmegaConf

    from seqlab.train import build_callbacks

    built = build_callbacks(
        OmegaConf.create({"recent_checkpoints": {"save_top_k": 3}, "model_summary": None})
    )
    assert not any(isinstance(c, RecentCheckpoints) for c in built)
    assert "callbacks.recent_checkpoints has settings (save_top_k) but no _target_" in caplog.text
