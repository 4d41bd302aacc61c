"""predict.py: a trained classifier labels new texts as its test labelled them, and a trained
forecaster forecasts after a series' end as its test forecast the same window."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from seqlab.errors import ConfigError, DataError
from seqlab.predict import classify_texts, forecast_series, load_model
from seqlab.train import train
from tests.conftest import FAST, run_script
from tests.test_classification import TEXT_FAST
from tests.test_forecasting_data import write_csv


def test_the_labels_of_new_texts_are_those_the_test_gave(make_cfg, tmp_path: Path) -> None:
    """Texts cleaned, encoded, padded and batched as training's: predicting the test split's texts
    from the checkpoint alone gives the test's accuracy exactly; the command line keeps the input's
    lines (an empty one stays empty) and refuses what it cannot take by name."""
    cfg = make_cfg(
        *TEXT_FAST, f"data.cache_dir={tmp_path / 'cache'}", "model=gru", "trainer.max_epochs=2", fast=False
    )
    metrics, objects = train(cfg)
    datamodule, ckpt = objects["datamodule"], objects["summary"]["best_checkpoint"]
    task, info = load_model(ckpt)
    texts, labels = datamodule.texts("test"), datamodule.datasets["test"].labels.tolist()
    names = datamodule.class_names()
    # the batch size changes the padding of every batch but no prediction (the masks)
    for batch_size in (7, 64):
        lines = classify_texts(task, info, texts, batch_size)
        predicted = [line.split("\t")[0] for line in lines]
        accuracy = np.mean([p == names[y] for p, y in zip(predicted, labels)])
        assert accuracy == pytest.approx(metrics["test/acc"], abs=1e-6)
        assert all(0.0 <= float(line.split("\t")[1]) <= 1.0 for line in lines)

    assert classify_texts(task, info, ["", "  "]) == ["", ""]  # no text at all: no batch to run
    source = tmp_path / "in.txt"
    source.write_text(f"{texts[0]}\n\n  {texts[1]}  \n", encoding="utf-8")
    result = run_script("predict.py", f"ckpt_path={ckpt}", f"input={source}")
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert len(out) == 3 and out[1] == "" and out[0] == lines[0] and out[2] == lines[1]
    refused = run_script("predict.py", f"ckpt_path={ckpt}", f"input={source}", f"output={source}")
    assert (
        refused.returncode == 1
        and "is the input file: it would be replaced by the predictions" in refused.stderr
    )
    assert source.read_text(encoding="utf-8").startswith(texts[0])


def test_a_forecast_after_a_files_end_is_the_tests_forecast_of_that_window(make_cfg, tmp_path: Path) -> None:
    """The file read with the training settings, scaled with the checkpoint's scaler, its last
    look-back rows in: cut at the test split's last window, the file's forecast is the test
    loop's forecast of that window, mapped back to the data's scale, with the timestamps after
    its end; columns of another layout, or too few rows, are named."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows, horizon = 600, 12
    write_csv(data_dir / "series.csv", rows, columns=("a", "b", "OT"))
    fast = [o for o in FAST if not o.startswith(("data.num_steps", "data.horizon", "trainer.max_epochs"))]
    cfg = make_cfg(
        "data=csv", f"data.data_dir={data_dir}", "data.file=series.csv", "data.target=OT",
        f"data.horizon={horizon}", "trainer.max_epochs=1", *fast, fast=False,
    )  # fmt: skip
    _, objects = train(cfg)
    datamodule, ckpt = objects["datamodule"], objects["summary"]["best_checkpoint"]
    task, info = load_model(ckpt)
    x, _ = datamodule.datasets["test"][len(datamodule.datasets["test"]) - 1]
    with torch.no_grad():
        expected = task(x[None])[0].numpy() * datamodule.std + datamodule.mean

    lines = (data_dir / "series.csv").read_text().splitlines()
    cut = tmp_path / "cut.csv"
    cut.write_text("\n".join(lines[: 1 + rows - horizon]) + "\n")  # the header, then all but the horizon
    table = list(csv.reader(forecast_series(task, info, str(cut)).splitlines()))
    assert table[0] == ["date", "a", "b", "OT"]
    assert [row[0] for row in table[1:]] == [line.split(",")[0] for line in lines[-horizon:]]
    forecast = np.array([[float(v) for v in row[1:]] for row in table[1:]])
    np.testing.assert_allclose(forecast, expected, rtol=1e-5, atol=1e-5)
    # unset input: after the end of the training file itself
    after = list(csv.reader(forecast_series(task, info).splitlines()))
    assert len(after) == 1 + horizon and after[1][0] == "2016-07-26 00:00:00"  # 600 hours after the start

    # the same channels in another order (a long file's ids in another order): put in the model's
    swapped = tmp_path / "swapped.csv"
    rows_cut = [line.split(",") for line in cut.read_text().splitlines()]
    swapped.write_text("\n".join(",".join([r[0], r[3], r[1], r[2]]) for r in rows_cut) + "\n")
    assert forecast_series(task, info, str(swapped)) == forecast_series(task, info, str(cut))
    write_csv(tmp_path / "other.csv", 300, columns=("a", "OT", "c"))
    with pytest.raises(
        DataError, match=r"other.csv: columns \['a', 'OT', 'c'\], but the model was trained on"
    ):
        forecast_series(task, info, str(tmp_path / "other.csv"))
    # the file read is never the one written (unset input reads the training file)
    before = (data_dir / "series.csv").read_bytes()
    with pytest.raises(ConfigError, match=r"is the file the forecast reads"):
        forecast_series(task, info, output=str(data_dir / "series.csv"))
    assert (data_dir / "series.csv").read_bytes() == before
    with pytest.raises(ConfigError, match=r"\+data.lookback: the model fixes it"):
        forecast_series(task, info, data={"lookback": 12})
    write_csv(tmp_path / "short.csv", 20)
    with pytest.raises(DataError, match=r"short.csv: 20 rows, fewer than the model's look-back of 48"):
        forecast_series(task, info, str(tmp_path / "short.csv"))
    with pytest.raises(ConfigError, match=r"input='-': a forecasting model reads a CSV file"):
        forecast_series(task, info, "-")
    result = run_script("predict.py", f"ckpt_path={ckpt}", f"output={tmp_path / 'forecast.csv'}")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "forecast.csv").read_text().splitlines()[1:] == [",".join(row) for row in after[1:]]


def test_forecast_timestamps_follow_the_calendar_of_the_series() -> None:
    """A monthly series' forecast steps by calendar months (month ends stay month ends), a series
    of weekdays by weekdays; else by the median step (a fixed 30.4 days put a monthly forecast on
    the 2nd, then the 3rd of the months, and a business-day one on weekends)."""
    from datetime import datetime, timedelta

    from seqlab.data.readers import Series
    from seqlab.predict import future_stamps

    def future(stamps: list[datetime], horizon: int = 3) -> list[datetime]:
        return future_stamps(Series(np.zeros((len(stamps), 1)), ["y"], stamps), horizon, "test")

    assert future([datetime(2022, m, 1) for m in range(1, 13)]) == [datetime(2023, m, 1) for m in (1, 2, 3)]
    ends = [datetime(2022, 1, 31), datetime(2022, 2, 28), datetime(2022, 3, 31), datetime(2022, 4, 30)]
    assert future(ends) == [datetime(2022, 5, 31), datetime(2022, 6, 30), datetime(2022, 7, 31)]
    weekdays = [d for d in (datetime(2021, 7, 1) + timedelta(days=i) for i in range(14)) if d.weekday() < 5]
    assert future(weekdays) == [datetime(2021, 7, 15), datetime(2021, 7, 16), datetime(2021, 7, 19)]
    hours = [datetime(2021, 7, 1) + timedelta(hours=i) for i in range(10)]
    assert future(hours, 2) == [datetime(2021, 7, 1, 10), datetime(2021, 7, 1, 11)]
    with pytest.raises(DataError, match=r"test: one timestamp"):
        future(hours[:1])
