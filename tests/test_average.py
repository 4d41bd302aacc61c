"""Checkpoint averaging: a run keeps its last epochs, scripts/average_checkpoints.py averages them
into a checkpoint eval.py reads; checkpoints of other models, runs or files are named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from seqlab.average import average_checkpoints
from seqlab.errors import ConfigError
from seqlab.eval import evaluate
from seqlab.train import train
from tests.conftest import run_script


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_the_last_epochs_average_into_a_checkpoint_eval_reads(make_cfg, tmp_path: Path) -> None:
    """``callbacks.recent_checkpoints.save_top_k=2`` keeps the last two epochs (epoch_001, epoch_002
    of 3); their average is the mean of their parameters, holds no training state, and tests;
    a copy of one checkpoint averaged with itself tests exactly as that checkpoint."""
    metrics, objects = train(make_cfg("callbacks.recent_checkpoints.save_top_k=2"))
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
    assert not {"optimizer_states", "lr_schedulers", "loops"} & set(averaged)
    assert averaged["seqlab"]["averaged_from"] == [str(run / "checkpoints" / name) for name in kept]
    evaluated, _ = evaluate(make_cfg(f"ckpt_path={tmp_path / 'avg.ckpt'}", name="eval", output="eval"))
    assert evaluated["test/mse"] < objects["summary"]["baseline"]["seasonal"]["mse"]

    # one checkpoint averaged with a copy of itself: the same model, the same test to the last digit
    best = run / "checkpoints" / "best.ckpt"
    copy = tmp_path / "copy.ckpt"
    shutil.copy(best, copy)
    average_checkpoints([best, copy], tmp_path / "same.ckpt")
    again, _ = evaluate(make_cfg(f"ckpt_path={tmp_path / 'same.ckpt'}", name="eval", output="eval_same"))
    assert again["test/mse"] == metrics["test/mse"]


def test_what_cannot_be_averaged_is_named(make_cfg, tmp_path: Path) -> None:
    train(make_cfg("callbacks.recent_checkpoints.save_top_k=2", "trainer.max_epochs=2"))
    ckpts = tmp_path / "run" / "checkpoints"
    first, second = ckpts / "epoch_000.ckpt", ckpts / "epoch_001.ckpt"
    out = tmp_path / "avg.ckpt"
    with pytest.raises(ConfigError, match=r"1 checkpoint .*epoch_001.ckpt\): nothing to average"):
        average_checkpoints([ckpts], out, last=1)
    with pytest.raises(ConfigError, match=r"epoch_000.ckpt is given twice"):
        average_checkpoints([first, first], out)
    (tmp_path / "empty").mkdir()
    before = second.read_bytes()
    with pytest.raises(ConfigError, match=r"--output .*epoch_001.ckpt is one of the checkpoints averaged"):
        average_checkpoints([first, second], second)
    assert second.read_bytes() == before and not out.exists()
    with pytest.raises(
        ConfigError, match=r"no epoch_NNN.ckpt to average; .*callbacks.recent_checkpoints.save_top_k=N"
    ):
        average_checkpoints([(tmp_path / "empty").resolve()], out)
    (tmp_path / "foreign.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"checkpoint='.*foreign.ckpt' is not a readable checkpoint"):
        average_checkpoints([first, tmp_path / "foreign.ckpt"], out)
    # another model (an LSTM, not the Transformer): its settings differ
    train(make_cfg("model=lstm", "trainer.max_epochs=1", "test=false", output="lstm"))
    with pytest.raises(ConfigError, match=r"differ in their model settings \(hyper_parameters.backbone"):
        average_checkpoints([first, tmp_path / "lstm" / "checkpoints" / "last.ckpt"], out)
    # the same configuration trained apart (another seed): unrelated weights, refused too
    train(make_cfg("seed=7", "trainer.max_epochs=1", "test=false", output="seed7"))
    with pytest.raises(ConfigError, match=r"only checkpoints of one run average into a model"):
        average_checkpoints([first, tmp_path / "seed7" / "checkpoints" / "last.ckpt"], out)
    assert not out.exists()
    result = run_script("scripts/average_checkpoints.py", str(first), "--output", str(out))
    assert result.returncode == 1 and "ConfigError: 1 checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
