"""The comparison report: seeds aggregated per backbone, noise marked, plots written."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from pathlib import Path

import pytest

from seqlab.compare import aggregate, beyond_noise, compare, read_jobs, welch_p_value
from seqlab.errors import ConfigError
from seqlab.utils.run import write_summary
from tests.conftest import FAST, run_script, why_failed


def fake_sweep(root: Path, results: dict[str, list[float]], task: str = "classification") -> Path:
    """Job directories with the summary.json train.py writes (test/acc per seed)."""
    job = 0
    for model, values in results.items():
        for seed, value in enumerate(values):
            job_dir = root / str(job)
            job_dir.mkdir(parents=True)
            summary = {
                "task": task, "model": model, "seed": seed, "metrics": {"test/acc": value, "test/f1": value - 0.01},
                "wall_s": 10.0 + job, "fit_s": 8.0 + job, "train_samples_per_s": 100.0, "peak_memory_mb": 50.0, "num_params": 1000,
            }  # fmt: skip
            write_summary(job_dir, summary)
            job += 1
    return root


def test_seeds_are_aggregated_and_noise_is_marked(tmp_path: Path) -> None:
    results = {
        "lstm": [0.84, 0.85, 0.86],  # clearly best
        "gru": [0.845, 0.835, 0.855],  # overlaps lstm: within noise
        "rnn": [0.70, 0.71, 0.72],  # far below
        "transformer": [0.80],  # one seed: noise unknown
    }
    rows, metric = aggregate(read_jobs(fake_sweep(tmp_path, results)), "classification")
    assert metric == "acc"
    by_name = {row["backbone"]: row for row in rows}
    assert [row["backbone"] for row in rows] == ["lstm", "gru", "transformer", "rnn"]  # by mean acc
    assert by_name["lstm"]["seeds"] == 3
    assert by_name["lstm"]["acc"] == pytest.approx(0.85)
    assert by_name["lstm"]["acc_std"] == pytest.approx(statistics.stdev([0.84, 0.85, 0.86]))
    assert by_name["gru"]["f1"] == pytest.approx(0.835)
    assert by_name["lstm"]["wall_s"] == pytest.approx(11.0)  # jobs 0..2: 10, 11, 12 s
    assert by_name["lstm"]["fit_s"] == pytest.approx(9.0)  # of which training: 8, 9, 10 s
    assert "acc_std" not in by_name["transformer"]
    verdicts = {name: row["vs best acc"] for name, row in by_name.items()}
    assert verdicts == {
        "lstm": "best",
        "gru": "within seed noise (p=0.57)",
        "rnn": "worse (beyond seed noise, p=6.8e-05)",
        "transformer": "one seed: noise unknown",
    }
    assert welch_p_value([1.0, 1.0], [1.0, 1.0]) == 1.0 and welch_p_value([1.0], [2.0, 2.1]) is None


def test_the_seed_noise_verdict_is_a_t_test_corrected_for_the_comparisons() -> None:
    """Twice the standard error was the cut: with 3 seeds a side (2-4 degrees of freedom) a
    12% test, and each backbone was compared with the best the same data chose. The README's
    LSTM vs GRU on SST-2 (81.31/82.91/82.91 vs 84.29/82.91/84.29) was called beyond seed noise;
    Welch's test gives p = 0.11."""
    import random

    lstm, gru = [81.31, 82.91, 82.91], [84.29, 82.91, 84.29]
    assert welch_p_value(lstm, gru) == pytest.approx(0.110, abs=0.002)
    # against Student's t tables: t = 2.776 at 4 degrees of freedom is the two-sided 5% point
    assert welch_p_value([0.0, 1.0, 2.0], [2.776 * math.sqrt(2 / 3) + x for x in (0.0, 1.0, 2.0)]) == (
        pytest.approx(0.05, abs=1e-3)
    )
    # Holm: the smallest p-value against alpha / 3, the next against alpha / 2, ... stopping at the first kept
    assert beyond_noise({"a": 0.01, "b": 0.02, "c": 0.04, "d": None}) == {
        "a": True,
        "b": True,
        "c": True,
        "d": None,
    }
    assert beyond_noise({"a": 0.01, "b": 0.03, "c": 0.04}) == {"a": True, "b": False, "c": False}
    assert beyond_noise({"a": 0.02, "b": 0.001}) == {"a": True, "b": True}
    assert beyond_noise({"a": 0.03, "b": 0.04}) == {"a": False, "b": False}  # 0.03 > alpha / 2
    # seeds all alike on both sides (a small test set's accuracy): no spread, no verdict (was p = 0)
    assert welch_p_value([0.5, 0.5], [0.6, 0.6]) is None and welch_p_value([0.5, 0.5], [0.5, 0.5]) == 1.0
    alike = aggregate(
        [
            {"model": m, "metrics": {"acc": v}, "summary": {}}
            for m, v in [("a", 0.6), ("a", 0.6), ("b", 0.5), ("b", 0.5)]
        ],
        "classification",
    )[0]
    assert [r["vs best acc"] for r in alike] == ["best", "every seed alike on both sides: noise unknown"]
    # four backbones of one mean, three seeds each: some gap to the best was called real in
    # about a third of such sweeps; now at most alpha of them
    rng = random.Random(0)
    sweeps, false_alarms = 2000, 0
    for _ in range(sweeps):
        samples = {name: [rng.gauss(0, 1) for _ in range(3)] for name in "abcd"}
        best = max(samples, key=lambda n: statistics.fmean(samples[n]))
        p = {n: welch_p_value(v, samples[best]) for n, v in samples.items() if n != best}
        false_alarms += any(beyond_noise(p).values())
    assert false_alarms / sweeps < 0.05


def test_a_diverged_or_incomplete_job_leaves_the_others_ranked(tmp_path: Path) -> None:
    """A NaN metric is left out (it made every mean and ranking NaN, and the std raised); a
    backbone whose seeds lack the main metric says on how many its row rests."""
    sweep = fake_sweep(tmp_path, {"lstm": [0.85, float("nan")], "gru": [0.80, 0.81]})
    rows, _ = aggregate(read_jobs(sweep), "classification")
    by_name = {row["backbone"]: row for row in rows}
    assert [row["backbone"] for row in rows] == ["lstm", "gru"]
    assert by_name["lstm"]["acc"] == pytest.approx(0.85) and "acc_std" not in by_name["lstm"]
    assert by_name["lstm"]["seeds"] == "1 of 2 (acc missing in the others)"
    assert by_name["gru"]["seeds"] == 2 and by_name["gru"]["acc"] == pytest.approx(0.805)


def test_a_sweep_without_task_names_is_ranked_by_its_main_metric(tmp_path: Path) -> None:
    """``eval.py -m`` summaries named no task: the report was titled "None", ranked by the first
    metric (``mae``) with higher taken as better, and called the worse model best."""
    sweep = fake_sweep(tmp_path, {"rnn": [0.99], "transformer": [0.92]}, task="forecasting")
    for job in range(2):
        path = sweep / str(job) / "summary.json"
        summary = json.loads(path.read_text())
        del summary["task"]
        summary["metrics"] = {
            "test/mae": summary["metrics"]["test/acc"],
            "test/mse": summary["metrics"]["test/acc"] ** 2,
        }
        path.write_text(json.dumps(summary))
    jobs = read_jobs(sweep)
    rows, metric = aggregate(jobs, jobs[0]["summary"]["task"])
    assert metric == "mse" and [r["backbone"] for r in rows] == ["transformer", "rnn"]
    assert (compare(sweep)).read_text().startswith("# forecasting: transformer, rnn")


def test_a_search_whose_trials_ran_no_test_is_ranked_by_the_validation_best(tmp_path: Path) -> None:
    """An Optuna search's trials run no test: every row was "0 of 1 (mse missing ...)", "no mse"."""
    sweep = fake_sweep(tmp_path, {"lstm": [0.5, 0.52], "gru": [0.3, 0.31]}, task="forecasting")
    for job in range(4):
        path = sweep / str(job) / "summary.json"
        summary = json.loads(path.read_text())
        summary.update(metrics={}, best={"val/mse_best": summary["metrics"]["test/acc"]})
        path.write_text(json.dumps(summary))
    rows, metric = aggregate(read_jobs(sweep), "forecasting")
    assert metric == "val/mse_best" and [(r["backbone"], r["seeds"]) for r in rows] == [
        ("gru", 2),
        ("lstm", 2),
    ]
    assert rows[1]["vs best val/mse_best"].startswith("worse (beyond seed noise")
    assert (
        "ranked by val/mse_best (the best validation; these jobs ran no test)" in compare(sweep).read_text()
    )


def test_a_searchs_report_labels_its_trials_shortly_and_legends_them_below(
    tmp_path: Path, monkeypatch
) -> None:
    """An Optuna search's trials were labelled with full-precision floats
    (``model.dropout=0.13015249665719064``), and their many long labels made a legend over both
    curve plots, cut off at the figure's edge; the sweep table repeated the search's fixed
    overrides on every row."""
    from seqlab import compare as compare_module
    from seqlab.utils.hydra_callbacks import write_sweep_table

    dropouts = ["0.13015249665719064", "0.2870414378941934", "0.13015249665719066", "0.4"]
    sweep = fake_sweep(tmp_path, {"gru": [0.8] * 4}, task="forecasting")
    for job, dropout in enumerate(dropouts):
        path = sweep / str(job) / "summary.json"
        summary = json.loads(path.read_text())
        summary["overrides"] = [
            "data=timeseries",
            "trainer.max_epochs=2",
            f"model.dropout={dropout}",
            f"model.d_model={16 * (job + 1)}",
        ]
        summary.update(metrics={}, best={"val/mse_best": 0.1 * (job + 1)})
        path.write_text(json.dumps(summary))
        (sweep / str(job) / "metrics.csv").write_text("step,train/loss,val/loss\n1,1.0,\n1,,0.9\n")
    jobs = read_jobs(sweep)
    # two values that 4 digits would merge keep theirs (they are two contenders)
    assert [job["model"] for job in jobs] == [
        f"gru (model.d_model={16 * (i + 1)} model.dropout={dropout})" for i, dropout in enumerate(dropouts)
    ]
    for job in (0, 1, 3):  # job 2 gone: 4 digits tell the others apart
        path = sweep / str(job) / "summary.json"
        summary = json.loads(path.read_text())
        summary["overrides"][3] = "model.d_model=32"
        path.write_text(json.dumps(summary))
    (sweep / "2" / "summary.json").unlink()
    assert [job["model"] for job in read_jobs(sweep)] == [
        "gru (model.dropout=0.1302)",
        "gru (model.dropout=0.287)",
        "gru (model.dropout=0.4)",
    ]
    legends = []
    monkeypatch.setattr(
        compare_module,
        "save",
        lambda fig, path: legends.append((fig.legends, [ax.get_legend() for ax in fig.axes])) or path,
    )
    many = [dict(job, model=f"{job['model']} {i}") for i, job in enumerate(read_jobs(sweep) * 3)]  # 9 labels
    compare_module.plot_curves(many, tmp_path / "curves.png")
    compare_module.plot_curves(read_jobs(sweep), tmp_path / "few.png")
    (figure_legends, own), (few_figure, few_own) = legends
    assert len(figure_legends) == 1 and own == [None, None]  # one, below both plots
    assert few_figure == [] and all(legend is not None for legend in few_own)
    rows, _, _ = write_sweep_table(sweep)
    assert (
        rows[0]["overrides"]
        == "data=timeseries trainer.max_epochs=2 model.dropout=0.13015249665719064 model.d_model=32"
    )
    table = (sweep / "sweep_summary.md").read_text()
    assert table.startswith("Every job: `data=timeseries trainer.max_epochs=2 model.d_model=32`\n")
    assert "| model.dropout=0.13015249665719064 |" in table
    # with the sweep's command line known, a value every trial drew alike stays in the rows
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task: [data=timeseries, trainer.max_epochs=2, 'tags=[a, b]']\n"
    )
    write_sweep_table(sweep)
    table = (sweep / "sweep_summary.md").read_text()
    assert table.startswith("Every job: `data=timeseries trainer.max_epochs=2`\n")
    assert "| model.dropout=0.13015249665719064 model.d_model=32 |" in table
    for job in (0, 1, 3):  # overrides holding spaces are compared whole (split, they were torn apart)
        path = sweep / str(job) / "summary.json"
        path.write_text(
            json.dumps({**json.loads(path.read_text()), "overrides": ["tags=[a, b]", f"+note=run {job}"]})
        )
    write_sweep_table(sweep)
    table = (sweep / "sweep_summary.md").read_text()
    assert table.startswith("Every job: `tags=[a, b]`\n") and "| +note=run 3 |" in table
    # the command line's value as Hydra re-renders it in each job's record (false -> False, 1e-3)
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task: [extras.print_config=false, task.optimizer.lr=1e-3, 'model=gru,lstm']\n"
    )
    for job in (0, 1, 3):
        path = sweep / str(job) / "summary.json"
        given = ["extras.print_config=False", "task.optimizer.lr=0.001", f"model={'gru' if job else 'lstm'}"]
        path.write_text(json.dumps({**json.loads(path.read_text()), "overrides": given}))
    write_sweep_table(sweep)
    table = (sweep / "sweep_summary.md").read_text()
    assert table.startswith("Every job: `extras.print_config=False task.optimizer.lr=0.001`\n"), table[:200]
    assert "| model=gru |" in table and "print_config=False |" not in table


def test_summary_json_is_strict_json(tmp_path: Path) -> None:
    """A diverged run's NaN and infinite figures are written ``null``: ``jq``, JavaScript and Go
    refuse Python's ``NaN``. Tensors and NumPy numbers are written as plain numbers."""
    import numpy as np
    import torch

    summary = {"metrics": {"test/mse": float("nan"), "test/mae": torch.tensor(0.5)},
               "wall_s": np.float32(2.0), "peak": [float("inf"), np.int64(3)], "ok": np.bool_(True), "model": None}  # fmt: skip
    text = (write_summary(tmp_path, summary)).read_text()

    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    assert '"ok": true' in text and "3.0" not in text  # a NumPy bool and integer keep their type
    assert json.loads(text, parse_constant=refuse) == {
        "metrics": {"test/mse": None, "test/mae": 0.5}, "wall_s": 2.0, "peak": [None, 3], "ok": True, "model": None,
    }  # fmt: skip


def test_the_report_is_also_one_self_contained_html_page(tmp_path: Path) -> None:
    sweep = fake_sweep(tmp_path, {"lstm": [0.84, 0.86], "gru": [0.80, 0.81]})
    compare(sweep)
    page = (sweep / "report.html").read_text()
    assert page.count("<tr>") == 3 and "<td>lstm</td>" in page and "<td>gru</td>" in page  # header + 2
    images = (sweep / "report.md").read_text().count("![")
    assert images == 2 and page.count('src="data:image/png;base64,') == images
    assert 'src="report_' not in page  # nothing left pointing at a file next to it
    # a failed job's error is text: "<absent>" was passed through as a tag the browser hides
    (sweep / "4").mkdir()
    (sweep / "4" / "error.txt").write_text("ConfigError: differs: model.nhead: '<absent>' -> 4\n")
    earlier = sweep / "3" / "error.txt"  # failed once, then resumed and finished: not a failed job
    earlier.write_text("RuntimeError: an earlier attempt\n")
    finished = (sweep / "3" / "summary.json").stat().st_mtime_ns
    os.utime(earlier, ns=(finished - 10**9, finished - 10**9))
    (sweep / "2" / "error.txt").write_text("ConfigError: a later refusal\n")  # after its summary: listed
    compare(sweep)
    page = (sweep / "report.html").read_text()
    assert "model.nhead: '&lt;absent&gt;' -&gt; 4" in page and "<absent>" not in page
    assert "an earlier attempt" not in page and "a later refusal" in page
    assert "Jobs without a result, not in the table (1)" in page  # job 4, which has no result
    assert "Jobs that failed after writing a result, which the table has (1)" in page  # job 2


def test_the_report_says_what_its_memory_column_measures(tmp_path: Path) -> None:
    """peak_memory_mb is a GPU's allocated peak for jobs trained on one, else the process's
    resident peak (interpreter and libraries included): the report says which it shows, and that
    a sweep mixing both cannot be compared on it."""
    sweep = fake_sweep(tmp_path, {"lstm": [0.84, 0.86], "gru": [0.80, 0.81]})
    compare(sweep)
    text = (sweep / "report.md").read_text()
    assert "`peak_memory_mb` the process's peak resident memory" in text and "GPU" not in text
    for job in ("0", "1"):  # lstm's seeds trained on a GPU
        summary = json.loads((sweep / job / "summary.json").read_text())
        write_summary(sweep / job, {**summary, "peak_gpu_memory_mb": 50.0, "peak_gpu_reserved_mb": 64.0})
    compare(sweep)
    assert "for jobs trained on a GPU" in (sweep / "report.md").read_text()
    assert "not comparable between them" in (sweep / "report.md").read_text()


def test_the_report_says_where_its_costs_were_measured_and_when_they_measured_the_load(
    tmp_path: Path,
) -> None:
    """On a busy 2-core machine two seeds of one configuration ran at 357 and 2,464 samples/s and
    the cost columns reversed which backbone was faster, without a word; and nothing said on which
    CPU, with how many threads, the figures were taken. Two seeds a side "within seed noise" read
    as "equal" where such a test can only show large gaps."""
    sweep = fake_sweep(tmp_path, {"lstm": [0.84, 0.86], "gru": [0.80, 0.81]})
    machine = {"cpu": "Intel Xeon", "threads": 2, "cpu_cores": 2, "host": "box"}
    compare(sweep)
    text = (sweep / "report.md").read_text()
    assert "Hardware not recorded (summaries from before 2026-11-26)." in text
    for job in ("0", "1", "2", "3"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        write_summary(sweep / job, {**summary, "hardware": machine})
    compare(sweep)
    text = (sweep / "report.md").read_text()
    assert "Measured on Intel Xeon, 2 thread(s) of 2 cores (box)." in text
    assert "not a measurement of the backbones" not in text  # fit_s 8-11 s: the same work alike
    assert "within seed noise (p=0.092; 2 seeds: not told apart, not shown equal)" in text
    busy = json.loads((sweep / "1" / "summary.json").read_text())
    write_summary(
        sweep / "1", {**busy, "train_samples_per_s": 357.0, "hardware": {**machine, "host": "other"}}
    )
    compare(sweep)
    text = (sweep / "report.md").read_text()
    assert "**The timings are not a measurement of the backbones**: lstm's seeds, the same work, differ by 3.6x in " \
        "`train_samples_per_s` (100 to 357)" in text  # fmt: skip
    assert "Measured on different hardware, so the costs compare machines as much as backbones" in text


def test_lower_is_better_for_forecasting_and_bad_sweeps_are_refused(tmp_path: Path) -> None:
    sweep = tmp_path / "forecast"
    for i, (model, mse) in enumerate((("rnn", 0.3), ("gru", 0.2))):
        (sweep / str(i)).mkdir(parents=True)
        summary = {"task": "forecasting", "model": model, "metrics": {"test/mse": mse}}
        (sweep / str(i) / "summary.json").write_text(json.dumps(summary))
    (sweep / "9").mkdir()  # a job without the main metric ranks last, never best
    (sweep / "9" / "summary.json").write_text(
        json.dumps({"task": "forecasting", "model": "lstm", "metrics": {}})
    )
    rows, metric = aggregate(read_jobs(sweep), "forecasting")
    assert metric == "mse" and [row["backbone"] for row in rows] == ["gru", "rnn", "lstm"]
    with pytest.raises(ConfigError, match=r"no job of the sweep wrote a summary\.json"):
        read_jobs(tmp_path / "forecast" / "0" / "missing")
    with pytest.raises(ConfigError, match=r"forecast/0 is one run \(its own summary.json\), not a sweep"):
        read_jobs(sweep / "0")  # a run's directory: it was "no job of the sweep wrote a summary.json"
    (sweep / "2").mkdir()
    (sweep / "2" / "summary.json").write_text(
        json.dumps({"task": "translation", "model": "lstm", "metrics": {}})
    )
    with pytest.raises(ConfigError, match="different tasks"):
        read_jobs(sweep)


@pytest.mark.slow
def test_compare_builds_the_report_of_a_real_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_script(
        "train.py", "-m", "model=rnn,transformer", "seed=1,2", *FAST, "trainer.max_epochs=2",
        f"hydra.sweep.dir={sweep}", timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, why_failed(result)
    report = run_script("scripts/compare.py", str(sweep), timeout=120)
    assert report.returncode == 0, why_failed(report)
    text = (sweep / "report.md").read_text()
    assert "<table>" in (sweep / "report.html").read_text()
    for name in ("report_curves.png", "report_metric_vs_time.png", "report_predictions.png"):
        assert (sweep / name).stat().st_size > 10_000, name
        assert f"({name})" in text
    with (sweep / "report.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["backbone"] for row in rows) == ["rnn", "transformer"]
    for row in rows:
        assert row["seeds"] == "2" and float(row["mse_std"]) >= 0 and float(row["num_params"]) > 0
        jobs = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
        mses = [j["metrics"]["test/mse"] for j in jobs if j["model"] == row["backbone"]]
        assert float(row["mse"]) == pytest.approx(statistics.fmean(mses))
    assert sum(row["vs best mse"] == "best" for row in rows) == 1
    # every job saved the first test windows for the predictions plot
    assert len((sweep / "0" / "tables" / "test_first_predictions.csv").read_text().splitlines()) == 51
    missing = run_script("scripts/compare.py", str(tmp_path / "nowhere"), timeout=60)
    assert missing.returncode == 1 and "nowhere: no such sweep or run directory" in missing.stderr


def test_several_sweeps_and_runs_are_compared_as_one_sweep(tmp_path: Path) -> None:
    """A backbone swept later on its own, or trained in single runs, joins the others' report:
    jobs are named by their sweep, a seed run in two of them counts once, and the report goes to
    ``--out``, a directory of its own."""
    first = fake_sweep(tmp_path / "first", {"lstm": [0.85, 0.86], "gru": [0.80, 0.81]})
    later = fake_sweep(tmp_path / "later", {"transformer": [0.90, 0.91], "lstm": [0.5]})
    run = tmp_path / "run"
    run.mkdir()
    write_summary(run, {"task": "classification", "model": "rnn", "seed": 0, "metrics": {"test/acc": 0.7}})
    out = tmp_path / "both"
    with pytest.raises(ConfigError, match=r"3 directories compared together: .*--out <dir>"):
        compare([first, later, run])
    report = compare([first, later, run], out=out)
    assert report == out / "report.md" and not (first / "report.md").exists()
    text = report.read_text()
    assert f"Runs and sweeps `{first}`, `{later}`, `{run}`, 7 jobs." in text
    assert "lstm seed=0: first/0 (kept), later/2." in text  # the later lstm's 0.5 is not averaged in
    with (out / "report.csv").open(newline="") as handle:
        rows = {row["backbone"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["transformer", "lstm", "gru", "rnn"]
    assert float(rows["lstm"]["acc"]) == pytest.approx(0.855) and rows["rnn"]["seeds"] == "1"

    with pytest.raises(ConfigError, match=r"a directory is given twice"):
        compare([first, tmp_path / "later" / ".." / "first"], out=out)
    with pytest.raises(ConfigError, match=r"--out .*first/report: inside a compared directory"):
        compare([first, later], out=first / "report")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty: neither a run with a summary.json nor a sweep"):
        compare([first, tmp_path / "empty"], out=out)
    other = fake_sweep(tmp_path / "other", {"gru": [30.0]}, task="translation")
    with pytest.raises(
        ConfigError, match=rf"different tasks .*{first}/0: classification, {other}/0: translation"
    ):
        compare([first, other], out=out)

    with pytest.raises(ConfigError, match=r"--out .*later: a run's or a sweep's directory, whose own report"):
        compare([first, run], out=later)
    # two sweeps of one name (one time, two task names): named by as much of their path as tells them apart
    twin = fake_sweep(tmp_path / "other_task" / "first", {"lstm": [0.7]})
    text = compare([first, twin], out=tmp_path / "twins").read_text()
    assert f"lstm seed=0: {tmp_path.name}/first/0 (kept), other_task/first/0." in text
    (run / "summary.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"run/summary.json cannot be read"):
        compare([first, run], out=tmp_path / "broken")
    assert not (tmp_path / "broken").exists()  # (nothing made for a report that is not written)

    cli = run_script(
        "scripts/compare.py", str(first), str(later), "--out", str(tmp_path / "cli"), timeout=120
    )
    assert cli.returncode == 0, why_failed(cli)
    assert cli.stdout.strip().endswith("cli/report.md") and (tmp_path / "cli" / "report.html").is_file()


def test_curves_keep_the_later_row_of_a_step_logged_twice(tmp_path: Path) -> None:
    """A run killed after its last checkpoint and resumed logs those steps again: the curve is
    the resumed run's, one point per step, in step order (not a zigzag back in time)."""
    from seqlab.compare import read_curves

    rows = [("0", "10", "1.0", ""), ("0", "20", "0.9", ""), ("0", "30", "0.8", ""), ("0", "40", "", "0.85")]
    rows += [("0", "30", "0.7", ""), ("0", "40", "", "0.75"), ("1", "50", "0.6", "")]  # resumed at 20
    with (tmp_path / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", "train/loss", "val/loss"])
        writer.writerows(rows)
    curves = read_curves(tmp_path)
    assert curves["train/loss"] == ([10, 20, 30, 50], [1.0, 0.9, 0.7, 0.6])
    assert curves["val/loss"] == ([40], [0.75])


def test_jobs_that_differ_in_more_than_the_seed_are_not_averaged(tmp_path: Path) -> None:
    """A sweep over ``data.horizon=24,96`` x seeds: two settings of one backbone, not six seeds
    (each alone in its setting: "best" of nothing)."""
    fake_sweep(tmp_path, {"lstm": [0.8, 0.81, 0.82, 0.6, 0.61, 0.62]})
    for job in range(6):
        path = tmp_path / str(job) / "summary.json"
        summary = json.loads(path.read_text())
        horizon = 24 if job < 3 else 96
        summary["overrides"] = ["experiment=x", f"data.horizon={horizon}", f"seed={job % 3}"]
        path.write_text(json.dumps(summary))
    rows, _ = aggregate(read_jobs(tmp_path), "classification")
    assert [(row["backbone"], row["seeds"], row["vs best acc"]) for row in rows] == [
        ("lstm (data.horizon=24)", 3, "alone in its setting"),
        ("lstm (data.horizon=96)", 3, "alone in its setting"),
    ]
    # an override that follows the backbone (the seeds' study's +study_backbone) says nothing more
    study = tmp_path / "study"
    fake_sweep(study, {"rnn": [0.9, 0.91], "transformer": [0.8, 0.81]})
    for job in range(4):
        path = study / str(job) / "summary.json"
        summary = json.loads(path.read_text())
        summary["overrides"] = [f"+study_backbone={summary['model']}64", f"seed={job % 2}", "~task.scheduler"]
        path.write_text(json.dumps(summary))
    assert [row["backbone"] for row in aggregate(read_jobs(study), "classification")[0]] == [
        "rnn",
        "transformer",
    ]


def test_backbones_are_ranked_within_their_setting(tmp_path: Path) -> None:
    """rnn and lstm x ``data.horizon=24,96``: every backbone was compared with one global best
    (an MSE at horizon 96 with one at 24), so the two backbones of a horizon were never
    compared. An override a resumed job may add (``tags=``) split a backbone's seeds. A
    backbone whose seeds have no result, or a best with one seed, was "one seed"."""
    mse = {("rnn", 24): [0.30, 0.31, 0.32], ("lstm", 24): [0.20, 0.21, 0.22],
           ("rnn", 96): [0.60, 0.61, 0.62], ("lstm", 96): [0.50, 0.505, 0.51]}  # fmt: skip
    sweep = fake_sweep(tmp_path, {f"{m}@{h}": v for (m, h), v in mse.items()}, task="forecasting")
    for job in range(12):
        path = sweep / str(job) / "summary.json"
        summary = json.loads(path.read_text())
        model, horizon = summary["model"].split("@")
        summary.update(model=model, metrics={"test/mse": summary["metrics"]["test/acc"]})
        summary["overrides"] = [f"model={model}", f"data.horizon={horizon}", f"seed={job % 3}"]
        summary["overrides"] += ["tags=[rerun]", "logger=csv"] if job == 4 else []  # resumed
        path.write_text(json.dumps(summary))
    rows, _ = aggregate(read_jobs(sweep), "forecasting")
    assert [(r["backbone"], r["seeds"], r["vs best mse"].split(" (")[0]) for r in rows] == [
        ("lstm (data.horizon=24)", 3, "best"),
        ("rnn (data.horizon=24)", 3, "worse"),
        ("lstm (data.horizon=96)", 3, "best"),
        ("rnn (data.horizon=96)", 3, "worse"),
    ]
    # how the data is fed, or the optimizer's kernel, makes contenders of one ranking (not merged,
    # not settings); a backbone alone in its setting is not "best" of anything
    feeding = fake_sweep(tmp_path / "feeding", {"lstm": [0.80, 0.81, 0.90, 0.91]})
    for job in range(4):
        path = feeding / str(job) / "summary.json"
        summary = json.loads(path.read_text())
        summary["overrides"] = [
            f"data.batch_size={32 * (1 + job // 2)}",
            f"task.optimizer.fused={job % 2 == 0}",
        ]
        path.write_text(json.dumps(summary))
    rows, _ = aggregate(read_jobs(feeding), "classification")
    assert [(r["backbone"], r["vs best acc"]) for r in rows] == [
        ("lstm (data.batch_size=64 task.optimizer.fused=False)", "best"),
        ("lstm (data.batch_size=64 task.optimizer.fused=True)", "one seed: noise unknown"),
        ("lstm (data.batch_size=32 task.optimizer.fused=False)", "one seed: noise unknown"),
        ("lstm (data.batch_size=32 task.optimizer.fused=True)", "one seed: noise unknown"),
    ]
    lone = {r["backbone"]: r["vs best mse"] for r in aggregate(read_jobs(sweep), "forecasting")[0]}
    assert lone["lstm (data.horizon=24)"] == "best"  # (two backbones a horizon)
    others = fake_sweep(tmp_path / "others", {"lstm": [0.9], "gru": [0.8, 0.81], "rnn": [math.nan] * 2})
    verdicts = {r["backbone"]: r["vs best acc"] for r in aggregate(read_jobs(others), "classification")[0]}
    assert verdicts == {"lstm": "best", "gru": "the best has one seed: noise unknown", "rnn": "no acc"}
    compare(sweep)
    assert "are ranked and compared within their setting only" in (sweep / "report.md").read_text()


def test_jobs_tested_on_part_of_the_test_set_are_a_setting_of_their_own(tmp_path: Path) -> None:
    """A job tested on 2 of the test set's batches (``debug=limit``, ``trainer.limit_test_batches``;
    summary.json's ``test_limited``) was ranked against whole-test jobs, without a word."""
    sweep = fake_sweep(tmp_path, {"gru": [0.80, 0.81], "rnn": [0.70, 0.71], "lstm": [0.95, 0.96]})
    for job in (4, 5):  # lstm's: a partial test
        path = sweep / str(job) / "summary.json"
        summary = json.loads(path.read_text())
        path.write_text(json.dumps({**summary, "test_limited": 2}))
    rows, _ = aggregate(read_jobs(sweep), "classification")
    assert [(r["backbone"], r["vs best acc"].split(" (")[0]) for r in rows] == [
        ("gru", "best"),
        ("rnn", "worse"),
        ("lstm", "alone in its setting"),  # its 0.95 on 2 batches beat no one
    ]
    report = compare(sweep).read_text()
    assert "Tested on part of the test set" in report and "lstm: 2 batches" in report
    assert "are ranked and compared within their setting only" in report
    # a backbone tested both ways is not averaged over the two
    mixed = fake_sweep(tmp_path / "mixed", {"gru": [0.80, 0.81, 0.99]})
    path = mixed / "2" / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "test_limited": 0.25}))
    names = sorted(r["backbone"] for r in aggregate(read_jobs(mixed), "classification")[0])
    assert names == ["gru (test=25%)", "gru (test=whole)"]


def captured_figures(monkeypatch) -> dict[str, object]:
    """compare's figures by file name, kept open instead of written."""
    import seqlab.compare

    figures: dict[str, object] = {}
    monkeypatch.setattr(seqlab.compare, "save", lambda fig, path: figures.setdefault(path.name, fig) and path)
    return figures


def test_the_forecast_plot_draws_each_settings_own_truth(tmp_path: Path, monkeypatch) -> None:
    """Settings that forecast different series (data.target=OT,HUFL) get a panel each, their
    truth drawn with them (the first job's truth was drawn under every forecast)."""
    from seqlab.compare import PREDICTIONS_TABLE, plot_predictions

    sweep = tmp_path / "sweep"
    truths = {"OT": [1.0, 2.0, 3.0], "HUFL": [7.0, 8.0, 9.0]}
    for job, (model, target) in enumerate([("lstm", "OT"), ("gru", "OT"), ("lstm", "HUFL")]):
        job_dir = sweep / str(job)
        (job_dir / PREDICTIONS_TABLE).parent.mkdir(parents=True)
        rows = "".join(f"{i},{t},{t + 0.5}\n" for i, t in enumerate(truths[target]))
        (job_dir / PREDICTIONS_TABLE).write_text("window,truth,prediction\n" + rows)
        write_summary(job_dir, {"task": "forecasting", "model": model, "seed": 1, "metrics": {"test/mse": 1.0},
                                "overrides": [f"model={model}", f"data.target={target}"]})  # fmt: skip
    figures = captured_figures(monkeypatch)
    plot_predictions(read_jobs(sweep), tmp_path / "report_predictions.png")
    axes = figures["report_predictions.png"].axes
    assert len(axes) == 2
    drawn = [{line.get_label(): list(line.get_ydata()) for line in ax.get_lines()} for ax in axes]
    assert drawn == [
        {
            "truth": truths["OT"],
            "lstm (data.target=OT)": [1.5, 2.5, 3.5],
            "gru (data.target=OT)": [1.5, 2.5, 3.5],
        },
        {"truth": truths["HUFL"], "lstm (data.target=HUFL)": [7.5, 8.5, 9.5]},
    ]


def test_the_metric_vs_time_plot_uses_training_time_or_says_it_does_not(tmp_path: Path, monkeypatch) -> None:
    """Training time (fit_s) on the x axis; a sweep with a job from before fit_s falls back to
    every job's wall_s, labelled so."""
    from seqlab.compare import plot_metric_vs_time

    figures = captured_figures(monkeypatch)
    sweep = fake_sweep(tmp_path / "a", {"lstm": [0.8, 0.9], "gru": [0.7]})
    plot_metric_vs_time(read_jobs(sweep), "acc", tmp_path / "fit.png")
    summary = json.loads((sweep / "2" / "summary.json").read_text())
    del summary["fit_s"]
    write_summary(sweep / "2", summary)
    plot_metric_vs_time(read_jobs(sweep), "acc", tmp_path / "wall.png")
    for name, label, times in (
        ("fit.png", "training wall time", [8, 9, 10]),
        ("wall.png", "job wall time", [10, 11, 12]),
    ):
        (ax,) = figures[name].axes
        assert ax.get_xlabel().startswith(label)
        points = sorted(tuple(p) for collection in ax.collections for p in collection.get_offsets().tolist())
        assert points == sorted(zip(times, [0.8, 0.9, 0.7])), name


@pytest.mark.slow
def test_a_compare_sweep_with_a_failed_job_still_writes_its_report(tmp_path: Path) -> None:
    """Hydra ends a sweep with a failed job's error and never calls on_multirun_end: the report
    (of the jobs that finished, the failed one listed) was not written, nor could a second run
    of the sweep write it (its finished jobs refuse to run again)."""
    sweep = tmp_path / "sweep"
    result = run_script(
        "train.py",
        "experiment=compare_forecasting",
        "model=rnn,transformer",
        "seed=1",
        *FAST,
        "model.d_model=30",
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={sweep}",
        timeout=400,
    )  # fmt: skip  (the Transformer's 4 heads do not divide a width of 30: that job fails)
    assert result.returncode != 0  # the sweep still says a job failed
    text = (sweep / "report.md").read_text()
    assert text.startswith("# forecasting: rnn") and "transformer" not in text.splitlines()[0]
    assert "Jobs without a result, not in the table (1):" in text
    assert "- job 1 (failed, `model=transformer seed=1 experiment=compare_forecasting" in text
    assert "ConfigError: model.d_model=30 must be a multiple of model.nhead=4" in text
    assert (sweep / "report.html").is_file()


def test_the_sweep_table_lists_every_job_whatever_its_end_or_directory_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only numbered job directories were listed (a sweep with ``hydra.sweep.subdir=
    ${hydra.job.override_dirname}`` got no table), and a job killed without an error (out of
    memory, a time limit) had no row at all. A job still training is left out until it ends."""
    import os
    import socket

    from seqlab.utils.hydra_callbacks import write_sweep_table

    sweep = tmp_path / "sweep"
    for name in ("model=gru", "model=lstm", "model=rnn", "model=transformer"):
        (sweep / name / ".hydra").mkdir(parents=True)
        (sweep / name / ".hydra" / "overrides.yaml").write_text(f"- {name}\n")
    write_summary(
        sweep / "model=gru",
        {
            "model": "gru",
            "overrides": ["model=gru"],
            "metrics": {"test/mse": 0.4},
            "best": {"val/mse_best": 0.3},
        },
    )
    (sweep / "model=lstm" / "error.txt").write_text("ConfigError: model.d_model=30\n")
    (sweep / "model=rnn" / "config.yaml").write_text("seed: 1\n")  # started, then killed
    (sweep / "model=transformer" / "config.yaml").write_text("seed: 1\n")
    (sweep / "model=transformer" / ".running").write_text(f"{socket.gethostname()} {os.getppid()}\n")
    # another task of this SLURM job, on another node, trains on: not killed (a requeued job's
    # own marker is taken over by mark_running, but the table is not where that is decided)
    (sweep / "model=transformer-2" / ".hydra").mkdir(parents=True)
    (sweep / "model=transformer-2" / "config.yaml").write_text("seed: 1\n")
    (sweep / "model=transformer-2" / ".running").write_text("gpu-node-b 4242 31337\n")
    monkeypatch.setenv("SLURM_JOB_ID", "31337")  # a runner's own is put back after the test
    rows, _, _ = write_sweep_table(sweep)
    # no column that no job has a value for (an eval sweep's times, a sweep of failures' metrics)
    assert "wall_s" not in (sweep / "sweep_summary.csv").read_text().splitlines()[0]
    assert [(row["job"], row["status"]) for row in rows] == [
        ("model=gru", "ok"), ("model=lstm", "failed"), ("model=rnn", "killed")
    ]  # fmt: skip
    # the validation best too: an Optuna search's objective (its trials run no test)
    assert rows[0]["mse"] == 0.4 and rows[0]["val/mse_best"] == 0.3 and "model.d_model=30" in rows[1]["error"]
    assert rows[2]["overrides"] == "model=rnn" and "resumes it" in rows[2]["error"]
    with open(sweep / "sweep_summary.csv", newline="") as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["ok", "failed", "killed"]
    assert not [p.name for p in sweep.iterdir() if p.name.endswith(".tmp")]


def test_failed_and_killed_jobs_are_reported_with_credentials_redacted(tmp_path: Path) -> None:
    """A failed job's error (which may quote a download URL with its password) went into
    error.txt, the sweep table and the report unredacted; a finished job whose later attempt
    failed was ``ok`` in the sweep table; a job killed without an error was missing from the
    report (it only lowered its backbone's seed count)."""
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from seqlab.errors import DataError
    from seqlab.utils.hydra_callbacks import FAILED_AFTER_SUMMARY, FAILED_AGAIN, SweepSummary, sweep_rows

    sweep = fake_sweep(tmp_path, {"lstm": [0.84, 0.86], "gru": [0.80, 0.81]})

    def fail(job: str, url: str) -> None:
        job_dir = sweep / job
        job_dir.mkdir(exist_ok=True)
        config = {
            "mode": RunMode.MULTIRUN,
            "runtime": {"output_dir": str(job_dir)},
            "sweep": {"dir": str(sweep)},
        }
        error = DataError(f"x.csv: downloading it from {url} failed")
        SweepSummary().on_job_end(
            OmegaConf.create({"hydra": config}), JobReturn(status=JobStatus.FAILED, _return_value=error)
        )

    fail("4", "https://bob:hunter2@mirror.example/x.csv")
    fail("1", "https://bob:swordfish@mirror.example/x.csv")  # after its summary: a later attempt
    summary = (sweep / "1" / "summary.json").stat().st_mtime_ns
    os.utime(sweep / "1" / "error.txt", ns=(summary + 10**9, summary + 10**9))
    (sweep / "1" / ".hydra").mkdir()  # written as the failed attempt started, after the summary
    (sweep / "1" / ".hydra" / "overrides.yaml").write_text("[]\n")
    os.utime(sweep / "1" / ".hydra" / "overrides.yaml", ns=(summary + 10**8, summary + 10**8))
    (sweep / "5").mkdir()
    (sweep / "5" / "config.yaml").write_text("seed: 1\n")  # started, then killed without an error
    # job 2 failed after writing its summary in the same attempt (its .hydra files, written as
    # an attempt starts, are older than the summary): not "again"
    (sweep / "2" / ".hydra").mkdir()
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text("- model=gru\n")
    summary = (sweep / "2" / "summary.json").stat().st_mtime_ns
    os.utime(sweep / "2" / ".hydra" / "overrides.yaml", ns=(summary - 10**9, summary - 10**9))
    (sweep / "2" / "error.txt").write_text("ConfigError: optimized_metric='val/nope' was never logged\n")
    os.utime(sweep / "2" / "error.txt", ns=(summary + 10**9, summary + 10**9))
    statuses = {row["job"]: row["status"] for row in sweep_rows(sweep)}
    assert statuses == {
        "0": "ok",
        "1": FAILED_AGAIN,
        "2": FAILED_AFTER_SUMMARY,
        "3": "ok",
        "4": "failed",
        "5": "killed",
    }
    compare(sweep)
    written = [
        (sweep / name).read_text() for name in ("4/error.txt", "sweep_summary.md", "report.md", "report.html")
    ]
    assert not [text for text in written if "hunter2" in text or "swordfish" in text]
    assert all("bob:***@mirror.example" in text for text in written)
    report = (sweep / "report.md").read_text()
    assert "Jobs without a result, not in the table (2):" in report
    assert "- job 4 (failed, " in report and "- job 5 (killed, " in report
    assert "Jobs that failed after writing a result, which the table has (2):" in report
    assert (
        f"- job 1 ({FAILED_AGAIN}, ``): DataError: x.csv: downloading it from https://bob:***@mirror"
        in report
    )
    assert f"- job 2 ({FAILED_AFTER_SUMMARY}, `model=gru`): ConfigError: optimized_metric=" in report


def test_a_seed_run_twice_counts_once(tmp_path: Path) -> None:
    """A job of the same backbone and seed again (a sweep run again with ``tags=`` added, or an
    old grid's job kept beside the new one) was averaged as another seed: gru's 3 seeds from
    {0, 1, 1} and a noise estimate narrowed by the copy."""
    sweep = fake_sweep(tmp_path, {"lstm": [0.84, 0.85, 0.86], "gru": [0.80, 0.70]})
    again = tmp_path / "5"
    again.mkdir()
    summary = json.loads((tmp_path / "4" / "summary.json").read_text())  # gru, seed 1
    write_summary(again, {**summary, "overrides": ["model=gru", "seed=1", "tags=[again]"]})
    rows, _ = aggregate(read_jobs(sweep), "classification")
    by_name = {row["backbone"]: row for row in rows}
    assert by_name["gru"]["seeds"] == 2
    assert by_name["gru"]["acc"] == pytest.approx(0.75)
    report = compare(sweep).read_text()
    assert (
        "Seeds run more than once, counted once (the first job's result): gru seed=1: 4 (kept), 5." in report
    )
