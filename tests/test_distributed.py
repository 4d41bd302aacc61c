"""DDP on 2 CPU processes (gloo) and multirun sweeps, run as a user runs them: in subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, ROOT, run_script

pytestmark = pytest.mark.slow

# no dropout, so two processes and one process compute exactly the same function
SAME_FUNCTION = [*FAST, "model.dropout=0.0", "trainer.max_epochs=2", "callbacks.early_stopping=null"]


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]


def test_ddp_writes_one_run_dir_and_matches_one_process(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    ddp = run_script("train.py", "trainer=ddp", *SAME_FUNCTION, f"paths.log_dir={logs}", timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    runs = list((logs / "train" / "runs").iterdir())
    assert len(runs) == 1, f"one run directory, got {runs}"
    run_dir = runs[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trainer"]["world_size"] == 2 and summary["trainer"]["strategy"] == "DDPStrategy"
    # every rank logs into the run directory; the console shows each line once
    assert (run_dir / "train.log").stat().st_size > 0
    assert (run_dir / "train_ddp_process_1.log").is_file()
    assert not list(ROOT.glob("*.log")), "no log file lands in the launch directory"
    assert ddp.stdout.count("Seed set to 42") == 1
    assert ddp.stdout.count("run directory:") == 1

    single_logs = tmp_path / "single"
    one = run_script("train.py", "trainer=cpu", *SAME_FUNCTION, f"paths.log_dir={single_logs}", timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    (single_run,) = list((single_logs / "train" / "runs").iterdir())
    # same global batch (32 = 2 x 16) and seed: the same windows at every step, the same weights
    single_weights, ddp_weights = last_weights(single_run), last_weights(run_dir)
    assert single_weights.keys() == ddp_weights.keys()
    for name in single_weights:
        torch.testing.assert_close(ddp_weights[name], single_weights[name], atol=2e-4, rtol=1e-3, msg=name)
    single_summary = json.loads((single_run / "summary.json").read_text())
    assert single_summary["global_step"] == summary["global_step"]


def test_ddp_spawn_runs(tmp_path: Path) -> None:
    run_dir = tmp_path / "spawn"
    result = run_script(
        "train.py", "trainer=ddp_spawn", *FAST, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["trainer"]["world_size"] == 2


def test_multirun_writes_a_table_of_every_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_script(
        "train.py", "-m", "model=rnn,transformer", *FAST, "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}",
        timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    table = (sweep / "sweep_summary.md").read_text()
    assert "| rnn |" in table and "| transformer |" in table
    rows = (sweep / "sweep_summary.csv").read_text().splitlines()
    assert len(rows) == 3 and "mse" in rows[0]
    for job in ("0", "1"):
        assert (sweep / job / "summary.json").is_file()


def test_text_ddp_matches_one_process(tmp_path: Path) -> None:
    """Bucketed text batches: both processes build the cache at once and share each global batch."""
    same = [
        "data=sentiment_synthetic",
        "data.num_train=800",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model=gru",
        "model.d_model=32",
        "model.dropout=0.0",
        "task.embed_dropout=0.0",
        "task.head_dropout=0.0",
        # plain SGD: Adam's division by sqrt(v) blows float noise in near-zero gradients up to 1e-4
        "task.optimizer._target_=torch.optim.SGD",
        "task.optimizer.lr=0.5",
        "trainer.max_epochs=2",
        "callbacks.early_stopping=null",
        "extras.print_config=false",
        "callbacks.rich_progress_bar=null",
    ]
    ddp = run_script("train.py", "trainer=ddp", *same, f"hydra.run.dir={tmp_path / 'ddp'}", timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = run_script("train.py", "trainer=cpu", *same, f"hydra.run.dir={tmp_path / 'one'}", timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert len(list((tmp_path / "cache").iterdir())) == 1, "one processed-data directory, no leftovers"
    single_weights, ddp_weights = last_weights(tmp_path / "one"), last_weights(tmp_path / "ddp")
    for name in single_weights:  # the same examples at every step of both epochs
        torch.testing.assert_close(ddp_weights[name], single_weights[name], atol=1e-6, rtol=1e-5, msg=name)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["trainer"]["world_size"] == 2
    assert summary["metrics"]["test/acc"] > 0.3


def test_translation_ddp_gathers_every_hypothesis_once(tmp_path: Path) -> None:
    """Each process translates its share of the test set; BLEU is scored on all of it, once each."""
    same = [
        "data=translation_synthetic",
        "data.num_train=600",
        "data.num_test=101",  # odd: the evaluation sampler pads one process's share with a repeat
        f"data.cache_dir={tmp_path / 'cache'}",
        "model=gru",
        "model.d_model=32",
        "model.dropout=0.0",
        "task.embed_dropout=0.0",
        "task.label_smoothing=0.0",
        "task.beam_size=2",
        "task.optimizer._target_=torch.optim.SGD",
        "task.optimizer.lr=0.5",
        "~task.optimizer.betas",
        "trainer.max_epochs=2",
        "callbacks.early_stopping=null",
        "extras.print_config=false",
        "callbacks.rich_progress_bar=null",
    ]
    ddp = run_script("train.py", "trainer=ddp", *same, f"hydra.run.dir={tmp_path / 'ddp'}", timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = run_script("train.py", "trainer=cpu", *same, f"hydra.run.dir={tmp_path / 'one'}", timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    single_weights, ddp_weights = last_weights(tmp_path / "one"), last_weights(tmp_path / "ddp")
    for name in single_weights:
        torch.testing.assert_close(ddp_weights[name], single_weights[name], atol=1e-6, rtol=1e-5, msg=name)
    hypotheses = {
        run: (tmp_path / run / "translations" / "test.hyp").read_text().splitlines() for run in ("one", "ddp")
    }
    assert len(hypotheses["ddp"]) == 101 and hypotheses["ddp"] == hypotheses["one"]
    bleu = {
        run: json.loads((tmp_path / run / "summary.json").read_text())["metrics"]["test/bleu"]
        for run in hypotheses
    }
    assert bleu["ddp"] == pytest.approx(bleu["one"], abs=1e-6)
