"""DDP on 2 CPU processes (gloo) and multirun sweeps, run as a user runs them: in subprocesses."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqlab.utils.checkpoint_io import AtomicCheckpointIO
from tests.conftest import FAST, ROOT, run_script, why_failed
from tests.faults import first_steps

pytestmark = pytest.mark.slow

# no dropout, so two processes and one process compute exactly the same function
SAME_FUNCTION = [*FAST, "model.dropout=0.0", "trainer.max_epochs=2", "callbacks.early_stopping=null"]


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]


def test_sharded_strategies_are_told_apart() -> None:
    """Decoding keeps the processes in step only where every forward is a collective."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from seqlab.utils.distributed import ModelParallelStrategy, shards_parameters

    assert shards_parameters(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    assert not shards_parameters(DDPStrategy()) and not shards_parameters(SingleDeviceStrategy("cpu"))
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert shards_parameters(DeepSpeedStrategy(stage=3)) and not shards_parameters(DeepSpeedStrategy(stage=2))


def test_ddp_writes_one_run_dir_and_matches_one_process(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    # 5 plotted of the 469 test windows: 0, 117, 234, 351, 468 (rank 1 evaluates the odd ones)
    plots = "task.plot_samples=5"
    launch = tmp_path / "launch"  # the directory the user starts from
    launch.mkdir()
    ddp = run_script(
        str(ROOT / "train.py"),
        "trainer=ddp",
        *SAME_FUNCTION,
        plots,
        f"paths.log_dir={logs}",
        "+callbacks.warn._target_=tests.faults.WarnOnEveryRank",
        cwd=launch,
        timeout=300,
    )
    assert ddp.returncode == 0, why_failed(ddp)
    runs = list((logs / "train" / "runs").iterdir())
    assert len(runs) == 1, f"one run directory, got {runs}"
    run_dir = runs[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trainer"]["world_size"] == 2 and summary["trainer"]["strategy"] == "DDPStrategy"
    # every rank logs into the run directory; the console shows each line once
    assert (run_dir / "train.log").stat().st_size > 0
    assert (run_dir / "train_ddp_process_1.log").is_file()
    assert not list(launch.iterdir()), "nothing lands in the launch directory"
    assert ddp.stdout.count("Seed set to 42") == 1
    assert ddp.stdout.count("run directory:") == 1
    # a warning: rank 0's on the console, rank 1's in its log file only (it was printed twice)
    assert "a warning of rank 0" in ddp.stderr and "a warning of rank 1" not in ddp.stdout + ddp.stderr
    assert "a warning of rank 1" in (run_dir / "train_ddp_process_1.log").read_text()
    # the throughput every process already summed: no hint from Lightning to reduce it
    assert "sync_dist=True" not in ddp.stdout + ddp.stderr

    single_logs = tmp_path / "single"
    one = run_script(
        "train.py", "trainer=cpu", *SAME_FUNCTION, plots, f"paths.log_dir={single_logs}", timeout=300
    )
    assert one.returncode == 0, why_failed(one)
    (single_run,) = list((single_logs / "train" / "runs").iterdir())
    # same global batch (32 = 2 x 16) and seed: the same windows at every step, the same weights
    single_weights, ddp_weights = last_weights(single_run), last_weights(run_dir)
    assert single_weights.keys() == ddp_weights.keys()
    for name in single_weights:
        torch.testing.assert_close(ddp_weights[name], single_weights[name], atol=2e-4, rtol=1e-3, msg=name)
    single_summary = json.loads((single_run / "summary.json").read_text())
    assert single_summary["global_step"] == summary["global_step"]
    # the forecasts compare.py overlays: the first 50 test windows of both processes, in order
    tables = []
    for run in (run_dir, single_run):
        with (run / "tables" / "test_first_predictions.csv").open(newline="") as handle:
            tables.append(list(csv.DictReader(handle)))
    ddp_rows, single_rows = tables
    assert [int(r["window"]) for r in ddp_rows] == [int(r["window"]) for r in single_rows] == list(range(50))
    assert [r["truth"] for r in ddp_rows] == [r["truth"] for r in single_rows]
    predictions = [torch.tensor([float(r["prediction"]) for r in rows]) for rows in tables]
    torch.testing.assert_close(*predictions, atol=1e-3, rtol=1e-3)
    # the predictions figure shows the same windows, spread over the test period, from both processes
    plotted = summary["test_report"]["plotted_windows"]
    assert plotted == single_summary["test_report"]["plotted_windows"] == [0, 117, 234, 351, 468]


def test_ddp_spawn_runs(tmp_path: Path) -> None:
    run_dir = tmp_path / "spawn"
    result = run_script(
        "train.py", "trainer=ddp_spawn", *FAST, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}",
        "+callbacks.warn._target_=tests.faults.WarnOnEveryRank",
    )  # fmt: skip
    assert result.returncode == 0, why_failed(result)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trainer"]["world_size"] == 2
    # what the spawned workers did, handed back to the main process that writes the summary (it
    # reported 0 steps, 0 epochs, no throughput and no test report)
    assert summary["epochs"] == 1 and summary["global_step"] > 0 and summary["fit_s"] > 0
    assert summary["train_samples_per_s"] > 0 and summary["time_to_first_step_s"] > 0
    assert summary["test_report"]["plotted_windows"][0] == 0
    # the workers log as trainer=ddp's ranks do: rank 1 to its own file, only rank 0 on the console
    # (spawned, they inherited no logging: both ranks wrote to stderr, unformatted, and no file)
    assert "GLOBAL_RANK: 1" in (run_dir / "train_ddp_process_1.log").read_text()
    assert "GLOBAL_RANK: 0" in (run_dir / "train.log").read_text()
    assert "GLOBAL_RANK: 1" not in result.stdout + result.stderr
    assert (
        "a warning of rank 0" in result.stderr and "a warning of rank 1" not in result.stdout + result.stderr
    )
    assert "a warning of rank 1" in (run_dir / "train_ddp_process_1.log").read_text()


def test_a_sigterm_to_the_spawning_process_stops_its_workers(tmp_path: Path) -> None:
    """Under ddp_spawn only the workers had a SIGTERM handler: ``kill <main pid>`` ended the main
    process at once (no summary, its marker left) while the workers trained on, unwatched, in a
    directory that read as free to resume. The signal reaches them: they save at the next step
    boundary and end, and the main process exits 143; the same command resumes the run."""
    run_dir, fired = tmp_path / "spawn", tmp_path / "fired"
    command = [
        "train.py", "trainer=ddp_spawn", *FAST, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}",
        "+callbacks.fault._target_=tests.faults.FailOnRank", "+callbacks.fault.rank=0", "+callbacks.fault.step=10",
        "+callbacks.fault.how=term_parent", f"+callbacks.fault.once={fired}",
    ]  # fmt: skip
    first = run_script(*command)
    assert first.returncode == 143, why_failed(first)
    assert "stopped by SIGTERM" in first.stdout + first.stderr
    worker = int(fired.read_text())
    status = Path(f"/proc/{worker}/status")
    gone = not status.exists() or "\nState:\tZ" in status.read_text()  # (a zombie has ended)
    assert gone, "the worker ended with the main process"
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 10 <= saved["global_step"] < 15 and not (run_dir / "summary.json").exists()
    assert not (run_dir / ".running").exists()
    again = run_script(*command)
    assert again.returncode == 0, why_failed(again)
    assert f"resuming the interrupted run in {run_dir}" in again.stdout + again.stderr
    assert "exists and is not empty" not in again.stderr  # (train.py's filter reaches the workers)
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] > saved["global_step"]


CHILD_OF = """
import multiprocessing, os, sys, time
from seqlab.utils.distributed import die_with_parent

def child(parent, said):
    die_with_parent(parent)
    said.put(os.getpid())
    time.sleep(60)

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    said = context.SimpleQueue()
    parent = os.getpid() if sys.argv[1] == "parent" else os.getpid() + 10**6  # a pid that is not its parent
    process = context.Process(target=child, args=(parent, said))
    process.start()
    if sys.argv[1] == "parent":
        print(said.get(), flush=True)
        os._exit(0)  # the main process dies at once (as by SIGKILL): no clean-up of its children
    process.join()
    print(process.exitcode, flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_spawned_worker_ends_with_its_parent_and_only_then(tmp_path: Path) -> None:
    """ddp_spawn's workers trained on as orphans after a SIGKILL to the main process; they now
    get SIGTERM when it dies. The check that the parent is gone compares with the parent's pid:
    "the parent is pid 1" killed every worker of a main process that is pid 1 (a container
    without an init)."""
    import signal as signals

    script = tmp_path / "child_of.py"
    script.write_text(CHILD_OF)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    wrong = subprocess.run(
        [sys.executable, str(script), "other"], capture_output=True, text=True, timeout=60, env=env
    )
    assert wrong.stdout.split() == [str(-signals.SIGTERM)], wrong.stderr  # not its parent: as if it had died
    done = subprocess.run(
        [sys.executable, str(script), "parent"], capture_output=True, text=True, timeout=60, env=env
    )
    child = int(done.stdout.split()[0])
    for _ in range(100):  # the child got SIGTERM as its parent died
        status = Path(f"/proc/{child}/status")
        if not status.exists() or "\nState:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        os.kill(child, signals.SIGKILL)
        raise AssertionError("the child outlived its parent")


LAUNCHED_BY = """
import os, subprocess, sys, time
from seqlab.utils.distributed import LAUNCHER_PID_ENV

rank = "from seqlab.utils.distributed import follow_launcher; follow_launcher(); print('ready', flush=True); __import__('time').sleep(60)"
env = {**os.environ, LAUNCHER_PID_ENV: str(os.getpid())} if sys.argv[1] == "launched" else dict(os.environ)
child = subprocess.Popen([sys.executable, "-c", rank], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
child.stdout.readline()
print(child.pid, flush=True)
os._exit(0)  # rank 0 dies at once (as by the out-of-memory killer's SIGKILL)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_ranks_the_script_launcher_started_end_with_rank_0(tmp_path: Path) -> None:
    """Rank 0 killed: the ranks it started waited in their next collective until its timeout
    (30 min under NCCL), holding their GPUs. They now end with it (SIGKILL); a process not
    started by seqlab's launcher is left alone."""
    script = tmp_path / "launched_by.py"
    script.write_text(LAUNCHED_BY)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def child_after_parent_died(how: str, wait_s: float) -> tuple[int, bool]:
        done = subprocess.run(
            [sys.executable, str(script), how], capture_output=True, text=True, timeout=60, env=env
        )
        child = int(done.stdout.split()[0])
        for _ in range(int(wait_s * 10)):
            status = Path(f"/proc/{child}/status")
            if not status.exists() or "\nState:\tZ" in status.read_text():
                return child, False
            time.sleep(0.1)
        return child, True

    child, alive = child_after_parent_died("launched", wait_s=10)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the rank outlived the process that launched it"
    child, alive = child_after_parent_died("other", wait_s=2)
    os.kill(child, signal.SIGKILL)
    assert alive, "a process seqlab's launcher did not start is left alone"


@pytest.mark.parametrize(
    ("start_method", "watched"), [("spawn", True), ("fork", True), ("forkserver", False)]
)
def test_workers_watch_their_parent_only_where_it_is_the_main_process(
    monkeypatch, start_method: str, watched: bool
) -> None:
    """Under forkserver a worker's parent is the server, not the main process: comparing with the
    main process's pid, every worker took its parent for dead and stopped itself."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    from seqlab.utils.distributed import SpawnLauncher

    monkeypatch.setattr(_MultiProcessingLauncher, "launch", lambda self, *a, **k: self.main_pid)
    launcher = SpawnLauncher.__new__(SpawnLauncher)
    launcher._start_method = start_method
    assert launcher.launch(print) == (os.getpid() if watched else None)


def test_multirun_writes_a_table_of_every_job(tmp_path: Path) -> None:
    """...and each job's own start-up time and peak memory, although the jobs share a process:
    job 0 holds 600 MiB through its first step, job 1 nothing."""
    sweep = tmp_path / "sweep"
    result = run_script(
        "train.py", "-m", "model=rnn,transformer", *FAST, "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}",
        "+callbacks.hold._target_=tests.faults.HoldMemory", "+callbacks.hold.mb=600,0", timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, why_failed(result)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    table = (sweep / "sweep_summary.md").read_text()
    assert "| rnn |" in table and "| transformer |" in table
    rows = (sweep / "sweep_summary.csv").read_text().splitlines()
    assert len(rows) == 5 and "mse" in rows[0]
    jobs = [json.loads((sweep / str(job) / "summary.json").read_text()) for job in range(4)]
    held = {(s["model"], s["overrides"][-1].rsplit("=", 1)[1]): s["peak_host_memory_mb"] for s in jobs}
    for model in ("rnn", "transformer"):  # job 1 runs after job 0's peak, job 3 after job 2's
        assert held[model, "600"] > held[model, "0"] + 400, held
    assert 0 < jobs[0]["time_to_first_step_s"] < jobs[0]["wall_s"] + 15  # imports included
    for summary in jobs[1:]:  # from the job's start, not the sweep's
        assert 0 < summary["time_to_first_step_s"] < summary["wall_s"]


def test_text_ddp_matches_one_process(tmp_path: Path) -> None:
    """Bucketed text batches: both processes build the cache at once and share each global batch;
    the metrics reduced over the processes count every evaluation example once, as one process does."""
    same = [
        "data=sentiment_synthetic",
        "data.num_train=800",
        "data.num_val=577",  # 18 x 32 + 1: the last example joins the batch before it
        "data.num_test=601",  # 18 x 32 + 25: one process has one example fewer in the last batch
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
        "trainer.accumulate_grad_batches=2",  # the global batch: both processes' two micro-batches
        "callbacks.early_stopping=null",
        "extras.print_config=false",
        "callbacks.rich_progress_bar=null",
    ]
    ddp = run_script("train.py", "trainer=ddp", *same, f"hydra.run.dir={tmp_path / 'ddp'}", timeout=300)
    assert ddp.returncode == 0, why_failed(ddp)
    one = run_script("train.py", "trainer=cpu", *same, f"hydra.run.dir={tmp_path / 'one'}", timeout=300)
    assert one.returncode == 0, why_failed(one)
    assert len(list((tmp_path / "cache").iterdir())) == 1, "one processed-data directory, no leftovers"
    single_weights, ddp_weights = last_weights(tmp_path / "one"), last_weights(tmp_path / "ddp")
    for name in single_weights:  # the same examples at every step of both epochs
        torch.testing.assert_close(ddp_weights[name], single_weights[name], atol=1e-6, rtol=1e-5, msg=name)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["trainer"]["world_size"] == 2
    assert summary["metrics"]["test/acc"] > 0.3
    single = json.loads((tmp_path / "one" / "summary.json").read_text())
    for key in ("test/acc", "test/f1"):  # counts: equal, not close
        assert summary["metrics"][key] == single["metrics"][key], key
    assert summary["best"]["val/acc_best"] == single["best"]["val/acc_best"]
    # tokens summed over the processes (their padded slices differ): as many per sample as one process
    per_sample = [s["train_tokens_per_s"] / s["train_samples_per_s"] for s in (summary, single)]
    assert per_sample[0] == pytest.approx(per_sample[1], rel=1e-9)
    tables = []  # the most confident test mistakes, of both processes
    for run in ("ddp", "one"):
        with (tmp_path / run / "tables" / "test_misclassified.csv").open(newline="") as handle:
            tables.append([(r["index"], r["label"], r["predicted"]) for r in csv.DictReader(handle)])
    assert len(tables[0]) == 50 and tables[0] == tables[1]
    # eval.py on two processes scores the one-process run's checkpoint as that run did
    best = single["best_checkpoint"]
    evaluation = run_script(
        "eval.py", f"ckpt_path={best}", "trainer=ddp", f"hydra.run.dir={tmp_path / 'eval'}"
    )
    assert evaluation.returncode == 0, why_failed(evaluation)
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())["metrics"]
    assert {k: evaluated[k] for k in ("test/acc", "test/f1")} == {
        k: single["metrics"][k] for k in ("test/acc", "test/f1")
    }


def test_translation_ddp_gathers_every_hypothesis_once(tmp_path: Path) -> None:
    """Each process translates its share of the test set; BLEU is scored on all of it, once each."""
    same = [
        "data=translation_synthetic",
        "data.num_train=600",
        "data.num_test=101",  # odd: one process translates one sentence fewer
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
    assert ddp.returncode == 0, why_failed(ddp)
    one = run_script("train.py", "trainer=cpu", *same, f"hydra.run.dir={tmp_path / 'one'}", timeout=300)
    assert one.returncode == 0, why_failed(one)
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


def test_fsdp2_shards_the_parameters_and_follows_ddp(tmp_path: Path) -> None:
    """FSDP2 (ModelParallelStrategy + fully_shard) on 2 gloo processes: each rank holds about half
    of the parameters, and training follows DDP's loss curve and weights - with the gradients
    clipped at every step (norm 0.01), so the clipping norm is that of the whole model, not of
    each rank's shard (pytorch/pytorch#170862 reported the latter for clip_grad_norm_). 225
    validation windows: 113 and 112 per rank, 8 and 7 batches of 16 before the evaluation sampler
    evened them out, and FSDP2's all-gather in the extra forward hung the run."""
    runs = {}
    for strategy in ("ddp", "fsdp2"):
        run_dir = tmp_path / strategy
        result = run_script(
            "train.py", f"trainer={strategy}", "model=transformer", *SAME_FUNCTION, "trainer.gradient_clip_val=0.01",
            "data.num_steps=2340", f"hydra.run.dir={run_dir}", timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, why_failed(result)
        runs[strategy] = run_dir
    summary = json.loads((runs["fsdp2"] / "summary.json").read_text())
    assert summary["trainer"]["strategy"] == "ModelParallelStrategy" and summary["trainer"]["world_size"] == 2
    total, shards = summary["num_params"], summary["parameters_per_rank"]
    assert len(shards) == 2 and all(0.4 * total < shard < 0.6 * total for shard in shards), (total, shards)
    assert json.loads((runs["ddp"] / "summary.json").read_text())["parameters_per_rank"] == [total, total]

    def losses(run_dir: Path) -> list[float]:
        rows = csv.DictReader((run_dir / "metrics.csv").open())
        return [float(row["train/loss"]) for row in rows if row.get("train/loss")]

    assert len(losses(runs["ddp"])) >= 4
    assert losses(runs["fsdp2"]) == pytest.approx(losses(runs["ddp"]), abs=1e-5)
    # rank 0 gathers one ordinary checkpoint: it loads anywhere
    ddp_weights, fsdp_weights = last_weights(runs["ddp"]), last_weights(runs["fsdp2"])
    assert ddp_weights.keys() == fsdp_weights.keys()
    for name in ddp_weights:
        torch.testing.assert_close(fsdp_weights[name], ddp_weights[name], atol=1e-3, rtol=1e-3, msg=name)


def test_fsdp2_translation_generates_from_sharded_weights(tmp_path: Path) -> None:
    """Beam search calls the model outside forward: under FSDP2 it must gather the shards too,
    every process as many decoder steps, also when only one of them has sentences among the
    first ``val_bleu_samples`` (the other decodes one in step and drops it)."""
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py", "trainer=fsdp2", "data=translation_synthetic", "data.num_train=300", "data.num_test=41",
        "task.val_bleu_samples=7", "trainer.accumulate_grad_batches=2",  # (the gradients: local shards)
        f"data.cache_dir={tmp_path / 'cache'}", "model=transformer", "model.d_model=32", "trainer.max_epochs=1",
        "trainer.accelerator=cpu", "extras.print_config=false", "callbacks.rich_progress_bar=null",
        "+callbacks.rows._target_=tests.faults.RecordValidationRows", f"+callbacks.rows.directory={tmp_path}",
        f"hydra.run.dir={run_dir}", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, why_failed(result)
    assert len((run_dir / "translations" / "test.hyp").read_text().splitlines()) == 41
    # the case the in-step decode is for did occur: a validation batch where one process had
    # sentences to score and the other none (without it, the collectives would not have matched)
    rows: dict[int, dict[int, int]] = {}
    for line in (tmp_path / "val_rows.txt").read_text().splitlines():
        rank, batch_idx, count = map(int, line.split())
        rows.setdefault(batch_idx, {})[rank] = count
    assert any(sorted(counts.values())[0] == 0 < sorted(counts.values())[-1] for counts in rows.values()), (
        rows
    )
    assert sum(counts[0] + counts[1] for counts in rows.values()) == 7  # the first 7, each once
    metrics = (run_dir / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert any(row.split(",")[header.index("val/bleu")] for row in metrics[1:])  # scored in validation
    # the hypotheses decoded from the shards are the model's: one process decodes them alike
    evaluated = run_script("eval.py", f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
                           "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path / 'eval'}", timeout=300)  # fmt: skip
    assert evaluated.returncode == 0, why_failed(evaluated)
    hypotheses = {
        path: (path / "translations" / "test.hyp").read_text() for path in (run_dir, tmp_path / "eval")
    }
    assert hypotheses[run_dir] == hypotheses[tmp_path / "eval"]
    summary = json.loads((run_dir / "summary.json").read_text())
    one = json.loads((tmp_path / "eval" / "summary.json").read_text())["metrics"]
    assert summary["metrics"]["test/bleu"] == pytest.approx(one["test/bleu"], abs=1e-6)
    assert max(summary["parameters_per_rank"]) < 0.6 * summary["num_params"]


@pytest.mark.parametrize("launcher", ["basic", "parallel", "from_config"])
def test_multirun_with_ddp_runs_each_job_once_in_one_sweep_dir(tmp_path: Path, launcher: str) -> None:
    """Lightning re-runs the command line in rank 1; inside a sweep that used to be the whole sweep
    (a second sweep directory, every job twice). Rank 1 must run its own job, into its directory.
    With hydra/launcher=parallel the two jobs run at once, each in a joblib worker process (whose
    own command line is joblib's), without progress bars. A sweep its config makes one
    (``hydra.mode: MULTIRUN``: ``experiment=compare_*``, ``hparams_search=*``, no ``-m``) made
    rank 1 run a sweep of its own too."""
    logs = tmp_path / "logs"
    meet = ["+callbacks.meet._target_=tests.faults.MeetTheOthers", f"+callbacks.meet.folder={tmp_path / 'met'}",
            "+callbacks.meet.jobs=2"]  # fmt: skip
    sweep_of = {
        "basic": ["-m"],
        "parallel": ["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *meet],
        "from_config": ["experiment=compare_forecasting", "seed=1"],
    }[launcher]
    result = run_script(
        "train.py", *sweep_of, "model=rnn,transformer", "trainer=ddp", *FAST, "trainer.max_epochs=1",
        f"paths.log_dir={logs}", timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, why_failed(result)
    assert not (logs / "train" / "runs").exists(), "no rank started a single run of its own"
    (sweep,) = list((logs / "train" / "multiruns").iterdir())
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job, model in (("0", "rnn"), ("1", "transformer")):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["model"] == model and summary["trainer"]["world_size"] == 2
        rank1 = (sweep / job / "train_ddp_process_1.log").read_text()
        assert rank1.count("Seed set to") == 1, "rank 1 ran this job once"
        backbone = "transformer.TransformerBackbone" if model == "transformer" else "rnn.RNNBackbone"
        assert f"backbone <seqlab.backbones.{backbone}>" in rank1, "rank 1 ran this job's config"
    assert result.stdout.count("Seed set to") == 2, "rank 0 ran two jobs, rank 1 printed nothing"
    assert len((sweep / "sweep_summary.csv").read_text().splitlines()) == 3
    if launcher == "parallel":  # the two jobs met (MeetTheOthers), in two worker processes
        assert len(list((tmp_path / "met").iterdir())) == 2
    # (FAST drops seqlab's progress bar: Lightning's own draws "Epoch 0: ..." unless told not to)
    shown = "Epoch 0" in result.stdout + result.stderr
    assert shown != (launcher == "parallel"), "no progress bars in jobs that share the terminal"


@pytest.mark.parametrize("rendezvous", ["--standalone", "--master_port"])
def test_torchrun_ranks_share_one_run_directory(tmp_path: Path, rendezvous: str) -> None:
    """Launched by torchrun (as on a multi-node cluster), every rank composes its own config: the
    run directory comes from the rendezvous id, so all ranks write into one. A static rendezvous
    (``--master_port``) has none: each rank took a directory of its own."""
    import socket

    if rendezvous == "--master_port":
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            rendezvous = f"--master_port={free.getsockname()[1]}"
    logs = tmp_path / "logs"
    result = run_script(
        "-m", "torch.distributed.run", rendezvous, "--nproc_per_node=2", "train.py", "trainer=ddp", *FAST,
        "trainer.max_epochs=1", f"paths.log_dir={logs}", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, why_failed(result)
    (run_dir,) = list((logs / "train" / "runs").iterdir())
    assert run_dir.name.startswith("torchrun-")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trainer"]["world_size"] == 2 and summary["trainer"]["strategy"] == "DDPStrategy"
    assert "Seed set to" in (run_dir / "train_rank1.log").read_text()
    assert result.stdout.count("run directory:") == 1


def test_sharded_fsdp2_checkpoint_evaluates_anywhere(tmp_path: Path) -> None:
    """Each rank writes its shard (a checkpoint directory); eval.py, one process or two, gathers it
    once and reproduces the run's test metric."""
    run_dir = tmp_path / "run"
    train = run_script(
        "train.py", "trainer=fsdp2", "trainer.strategy.save_distributed_checkpoint=true", *FAST,
        "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, why_failed(train)
    best = run_dir / "checkpoints" / "best.ckpt"
    assert best.is_dir() and len(list(best.glob("*.distcp"))) == 2, "one shard file per rank"
    evaluation = run_script("eval.py", f"ckpt_path={best}", f"hydra.run.dir={tmp_path / 'eval'}", timeout=300)
    assert evaluation.returncode == 0, why_failed(evaluation)
    trained = json.loads((run_dir / "summary.json").read_text())["metrics"]["test/mse"]
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())["metrics"]["test/mse"]
    # the same weights on 2 processes (each window once: no padding repeats) and on one
    assert evaluated == pytest.approx(trained, rel=1e-5)
    assert best.is_dir(), "the training run's checkpoint is left as it was"
    # the gathered file is the evaluation run's own, a plain checkpoint any process can load
    gathered = torch.load(tmp_path / "eval" / "consolidated.ckpt", map_location="cpu", weights_only=True)
    assert gathered["state_dict"] and not list((tmp_path / "eval").glob("*.distcp"))
    # on 2 processes: rank 1, started once rank 0 has gathered the shards, reads its file
    ddp = run_script(
        "eval.py", f"ckpt_path={best}", "trainer=ddp", f"hydra.run.dir={tmp_path / 'eval_ddp'}", timeout=300
    )
    assert ddp.returncode == 0, why_failed(ddp)
    (rank1,) = (tmp_path / "eval_ddp").glob("*_1.log")
    assert "reading the checkpoint rank 0 gathered" in rank1.read_text()
    on_two = json.loads((tmp_path / "eval_ddp" / "summary.json").read_text())["metrics"]["test/mse"]
    assert on_two == pytest.approx(trained, rel=1e-5)


def test_training_resumes_across_strategies(tmp_path: Path) -> None:
    """A DDP checkpoint resumes under FSDP2 and a sharded FSDP2 checkpoint under DDP, optimizer
    state and loops included: the resumed second epoch is the uninterrupted run's second epoch."""
    every_epoch = [
        "callbacks.model_checkpoint.filename='e{epoch}'",
        "callbacks.model_checkpoint.save_top_k=-1",
    ]
    sharded = "trainer.strategy.save_distributed_checkpoint=true"

    def train(name: str, *overrides: str) -> Path:
        result = run_script(
            "train.py", "model=transformer", *SAME_FUNCTION, *overrides, f"hydra.run.dir={tmp_path / name}",
            timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, why_failed(result)
        return tmp_path / name

    def losses(run_dir: Path) -> dict[str, float]:
        rows = csv.DictReader((run_dir / "metrics.csv").open())
        return {row["step"]: float(row["train/loss"]) for row in rows if row.get("train/loss")}

    for saved_under, resumed_under, extra in (("ddp", "fsdp2", ()), ("fsdp2", "ddp", (sharded,))):
        whole = train(f"{saved_under}-whole", f"trainer={saved_under}", *every_epoch, *extra)
        first_epoch = whole / "checkpoints" / "e0.ckpt"
        assert first_epoch.is_dir() == bool(extra), "FSDP2 with save_distributed_checkpoint writes shards"
        resumed = train(f"{resumed_under}-resumed", f"trainer={resumed_under}", f"ckpt_path={first_epoch}")
        expected, got = losses(whole), losses(resumed)
        assert got and set(got) < set(expected), "the resumed run logs only the second epoch's steps"
        # the tolerances of DDP vs FSDP2 (their gradient reductions differ in the last bits; one
        # thread per process gives identical numbers); a fresh optimizer (Adam's first steps are
        # ~lr per weight) or moments paired with the wrong tensors move these far more
        assert got == pytest.approx({step: expected[step] for step in got}, abs=1e-5), (saved_under, got)
        final = AtomicCheckpointIO().load_checkpoint(resumed / "checkpoints" / "last.ckpt")["state_dict"]
        reference = AtomicCheckpointIO().load_checkpoint(whole / "checkpoints" / "last.ckpt")["state_dict"]
        for name in reference:
            torch.testing.assert_close(final[name], reference[name], atol=1e-3, rtol=1e-3, msg=name)


@pytest.mark.parametrize(
    "data", ["data=timeseries", "data=sentiment_synthetic", "data=translation_synthetic"], ids=lambda d: d[5:]
)
def test_every_backbone_trains_sharded_under_fsdp2(tmp_path: Path, data: str) -> None:
    """Every task x every backbone under FSDP2 on 2 CPU processes: one sweep of DDP-style jobs. The
    series in bf16-mixed: the fused AdamW clipped by seqlab's bf16 plugin over sharded (DTensor)
    parameters, and the RNN family's float32 recurrence inside their FSDP2 units. One epoch is
    too little to learn from, so what is asserted is that every parameter was updated at every
    step (an optimizer built over the unsharded parameters would update none)."""
    sweep = tmp_path / "sweep"
    models = {"data=timeseries": ["mingru"], "data=sentiment_synthetic": ["minlstm"]}.get(data, [])
    models = ["rnn", "lstm", "gru", "transformer", *models]
    small = (
        ["data.num_train=400"]
        if "synthetic" in data
        else ["data.num_steps=1200", "data.lookback=48", "trainer.precision=bf16-mixed"]
    )
    result = run_script(
        "train.py", "-m", "trainer=fsdp2", f"model={','.join(models)}", data, *small, "model.d_model=32",
        "trainer.max_epochs=1", "trainer.accelerator=cpu", "extras.print_config=false",
        "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", f"hydra.sweep.dir={sweep}",
        f"data.cache_dir={tmp_path / 'cache'}" if "synthetic" in data else "data.horizon=12", timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, why_failed(result)
    for job, model in enumerate(models):
        summary = json.loads((sweep / str(job) / "summary.json").read_text())
        assert summary["model"] == model and summary["trainer"]["strategy"] == "ModelParallelStrategy"
        assert summary["trainer"]["precision"] == ("32-true" if "synthetic" in data else "bf16-mixed")
        assert summary["metrics"], f"{model}: tested"
        assert max(summary["parameters_per_rank"]) < 0.75 * summary["num_params"], f"{model}: sharded"
        last = AtomicCheckpointIO().load_checkpoint(sweep / str(job) / "checkpoints" / "last.ckpt")
        optimizer = last["optimizer_states"][0]
        params = [p for group in optimizer["param_groups"] for p in group["params"]]
        assert len(params) >= 6 and sorted(optimizer["state"]) == sorted(params), f"{model}: every parameter"
        for state in optimizer["state"].values():
            assert int(state["step"]) == last["global_step"] > 0 and state["exp_avg"].abs().sum() > 0, model


@pytest.mark.slow
@pytest.mark.parametrize(("rank", "how"), [(1, "raise"), (0, "raise"), (1, "kill")])
def test_a_failing_rank_ends_the_whole_job(tmp_path: Path, rank: int, how: str) -> None:
    """One DDP rank raises or is killed mid-epoch: every process exits, the job returns non-zero
    well within 60 s of the failure (no hang on a collective), and the failing rank's error is
    what the user sees."""
    fired = tmp_path / "fired"  # written by the failing rank as it fails: the failure's time
    done = run_script(
        "train.py", "trainer=ddp", *FAST, "trainer.max_epochs=20", f"hydra.run.dir={tmp_path / 'run'}",
        "+callbacks.fault._target_=tests.faults.FailOnRank", f"+callbacks.fault.rank={rank}",
        "+callbacks.fault.step=5", f"+callbacks.fault.how={how}", f"+callbacks.fault.once={fired}", timeout=180,
    )  # fmt: skip
    elapsed = time.time() - fired.stat().st_mtime
    assert done.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end after a rank failed"
    if how == "raise":
        assert f"injected failure on rank {rank} at step 5" in done.stdout + done.stderr
    assert not (tmp_path / "run" / "summary.json").exists()  # a failed run does not look finished


@pytest.mark.slow
def test_after_a_sigterm_stop_rank_0_finishes_by_itself(tmp_path: Path) -> None:
    """SIGTERM under DDP: every rank saves the checkpoint and exits 143, the other ranks first.
    Lightning's watch over them SIGKILLed rank 0 within 5 s of seeing a 143, while rank 0 still
    closed its loggers (a W&B upload takes that long) and its ``.running`` marker."""
    finished = tmp_path / "finished"
    done = run_script(
        "train.py", "trainer=ddp", *FAST, "trainer.max_epochs=20", f"hydra.run.dir={tmp_path / 'run'}",
        "+callbacks.fault._target_=tests.faults.FailOnRank", "+callbacks.fault.rank=0",
        "+callbacks.fault.step=5", "+callbacks.fault.how=term", "+logger.slow._target_=tests.faults.SlowToFinish",
        f"+logger.slow.path={finished}", timeout=180,
    )  # fmt: skip
    assert done.returncode == 143, why_failed(done)
    assert finished.read_text() == "failed", "rank 0 closed its loggers"
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "run" / ".running").exists()


@pytest.mark.slow
def test_a_rank_that_fails_after_rank_0_finished_fails_the_run(tmp_path: Path) -> None:
    """Rank 1 raises after the run's last collective, rank 0 finishes: the run exits non-zero and
    says which rank. Lightning's watch SIGKILLed rank 0 for it; with a grace period, rank 0 would
    otherwise have exited 0."""
    done = run_script(
        "train.py", "trainer=ddp", *FAST, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}",
        "+callbacks.fault._target_=tests.faults.FailAtEnd", "+callbacks.fault.rank=1", timeout=180,
    )  # fmt: skip
    assert done.returncode == 1, why_failed(done)
    assert "rank 1 ended: exit code 1, while this process (rank 0) finished: the run failed" in (
        done.stdout + done.stderr
    )
    assert "injected failure at the end on rank 1" in done.stdout + done.stderr


@pytest.mark.slow
def test_a_loss_that_diverges_on_one_process_stops_every_process(tmp_path: Path) -> None:
    """The divergence check is one decision for all processes: rank 1 alone raising left rank 0
    waiting in its next collective until Lightning killed it (an exit like an out-of-memory kill)."""
    done = run_script(
        "train.py", "trainer=ddp", *FAST, "trainer.max_epochs=20", "trainer.log_every_n_steps=1",
        f"hydra.run.dir={tmp_path / 'run'}", "+callbacks.fault._target_=tests.faults.FailOnRank",
        "+callbacks.fault.rank=1", "+callbacks.fault.step=5", "+callbacks.fault.how=diverge", timeout=180,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert re.search(
        r"TrainingDiverged: the training loss is not finite on another process \(here [\d.]+\) at step 5",
        output,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("rank", "how"), [(0, "raise"), (1, "kill")])
def test_a_failed_ddp_job_leaves_the_next_sweep_job_whole(tmp_path: Path, rank: int, how: str) -> None:
    """A DDP sweep job fails on one rank (job 0): rank 0 raises, or rank 1 is killed as an
    out-of-memory kill would. The sweep goes on to job 1, which launches its own second rank and
    trains on two processes, as it would alone: the failed job's other rank is not left waiting in
    a collective, its process group and launch environment are not reused, and Lightning's watch
    over the ranks does not kill the sweep. The failure is still the sweep's exit status."""
    sweep = tmp_path / "sweep"
    result = run_script(
        "train.py", "-m", "trainer=ddp", *FAST, "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}",
        "+callbacks.fault._target_=tests.faults.FailOnRank", f"+callbacks.fault.rank={rank},5",
        "+callbacks.fault.step=5", f"+callbacks.fault.how={how}", timeout=300,  # a hang fails here
    )  # fmt: skip
    assert result.returncode != 0
    log = (sweep / "0" / "train.log").read_text()
    if how == "raise":
        assert f"injected failure on rank {rank} at step 5" in result.stdout + result.stderr
        assert "had ended before" not in log, "rank 1, killed after rank 0 failed, is not the cause"
    else:  # rank 0 fails with gloo's "Connection closed by peer": the log says what happened first
        assert "rank 1 of this job had ended before this process failed: killed by SIGKILL" in log
    assert not (sweep / "0" / "summary.json").exists()
    summary = json.loads((sweep / "1" / "summary.json").read_text())
    assert summary["trainer"]["world_size"] == 2 and summary["metrics"]
    assert "Seed set to" in (sweep / "1" / "train_ddp_process_1.log").read_text(), "job 1 had its own rank 1"


def test_the_other_ranks_of_a_sweep_job_compose_the_same_config(make_cfg, monkeypatch) -> None:
    """A sweep job's rank 1 is started with the job's overrides; the primary config and config
    directories chosen on the command line must come along (it composed train.yaml instead)."""
    from seqlab.utils.distributed import job_command

    make_cfg("model=gru")
    argv = ["train.py", "-m", "--config-name", "my_train", "-cd=/x/configs", "model=gru,lstm", "seed=1"]
    monkeypatch.setattr("sys.argv", argv)
    command, _ = job_command(1)
    first = command.index("--config-name=my_train")
    assert command[first + 1] == "-cd=/x/configs"
    assert "model=gru" in command and "model=gru,lstm" not in command  # this job's, not the sweep's


@pytest.mark.slow
def test_a_ddp_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """Bucketed text under DDP, dropout and word dropout on: each process pads its own batches, so
    their random streams part. Stopped by SIGTERM mid-epoch and run again, the job ends bitwise
    equal to the uninterrupted one (a checkpoint that kept rank 0's stream alone gave rank 1 rank 0's)."""
    same = [
        "trainer=ddp", "data=sentiment_synthetic", "data.num_train=800", "data.num_val=200", "data.num_test=200",
        f"data.cache_dir={tmp_path / 'cache'}", "model=gru", "model.d_model=32", "task.word_dropout=0.1",
        "trainer.max_epochs=2", "callbacks.early_stopping=null", "extras.print_config=false",
        "callbacks.rich_progress_bar=null", "callbacks.step_checkpoint.every_n_train_steps=7",
    ]  # fmt: skip
    reference = run_script("train.py", *same, f"hydra.run.dir={tmp_path / 'reference'}", timeout=300)
    assert reference.returncode == 0, why_failed(reference)
    command = [
        "train.py", *same, f"hydra.run.dir={tmp_path / 'run'}", "+callbacks.fault._target_=tests.faults.FailOnRank",
        "+callbacks.fault.rank=0", "+callbacks.fault.step=10", "+callbacks.fault.how=term",
        f"+callbacks.fault.once={tmp_path / 'fired'}", "+callbacks.first_step._target_=tests.faults.RecordFirstStep",
        f"+callbacks.first_step.path={tmp_path / 'first_steps'}",
    ]  # fmt: skip
    first = run_script(*command, timeout=300)
    assert first.returncode == 143, why_failed(first)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 10
    again = run_script(*command, timeout=300)
    assert again.returncode == 0, why_failed(again)
    assert first_steps(tmp_path / "first_steps") == [0, 10], "trained on from the checkpoint, not afresh"
    expected, got = last_weights(tmp_path / "reference"), last_weights(tmp_path / "run")
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{name} differs after the resume"


def test_an_interrupted_ddp_run_resumes_in_place_on_another_number_of_devices(tmp_path: Path) -> None:
    """Requeued on a node with fewer devices, ``resume=auto`` refused the run ("another
    configuration: trainer.devices: 2 -> 1"); data.batch_size is the global batch, so it trains on
    from its checkpoint to the uninterrupted run's step count and loss (one process's reductions
    differ from two's in the last bits only)."""
    same = [*SAME_FUNCTION, "callbacks.step_checkpoint.every_n_train_steps=7"]
    reference = run_script(
        "train.py", "trainer=ddp", *same, f"hydra.run.dir={tmp_path / 'reference'}", timeout=300
    )
    assert reference.returncode == 0, why_failed(reference)
    stop = [
        "+callbacks.fault._target_=tests.faults.FailOnRank", "+callbacks.fault.rank=0", "+callbacks.fault.step=10",
        "+callbacks.fault.how=term", f"+callbacks.fault.once={tmp_path / 'fired'}",
        "+callbacks.first_step._target_=tests.faults.RecordFirstStep", f"+callbacks.first_step.path={tmp_path / 'steps'}",
    ]  # fmt: skip
    run_dir = f"hydra.run.dir={tmp_path / 'run'}"
    first = run_script("train.py", "trainer=ddp", "trainer.devices=2", *same, *stop, run_dir, timeout=300)
    assert first.returncode == 143, why_failed(first)
    again = run_script("train.py", "trainer=ddp", "trainer.devices=1", *same, *stop, run_dir, timeout=300)
    assert again.returncode == 0, why_failed(again)
    assert "trainer.devices: 2 -> 1 (the global batch stays data.batch_size)" in again.stdout + again.stderr
    assert first_steps(tmp_path / "steps") == [0, 10], "trained on from the checkpoint, not afresh"
    expected = json.loads((tmp_path / "reference" / "summary.json").read_text())
    got = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert got["trainer"]["world_size"] == 1 and got["global_step"] == expected["global_step"]
    assert got["metrics"]["test/mse"] == pytest.approx(expected["metrics"]["test/mse"], rel=1e-3)
