"""Forecasting data: the ETT protocol, any CSV, the synthetic twin, and errors naming what is wrong."""

from __future__ import annotations

import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from seqlab.data.forecasting import CSVSeriesDataModule, SyntheticSeriesDataModule
from seqlab.data.readers import download_lock, ensure_file, read_series_csv
from seqlab.errors import ConfigError, DataError


def write_csv(path: Path, rows: int, step: timedelta = timedelta(hours=1), columns=("a", "b", "OT")) -> Path:
    start = datetime(2016, 7, 1)
    rng = np.random.default_rng(0)
    lines = ["date," + ",".join(columns)]
    for i in range(rows):
        values = ",".join(f"{v:.4f}" for v in rng.normal(size=len(columns)) + i * 0.001)
        lines.append(f"{(start + i * step).isoformat(sep=' ')},{values}")
    path.write_text("\n".join(lines) + "\n")
    return path


def ett(data_dir: Path, file: str = "ETTh1.csv", **kwargs) -> CSVSeriesDataModule:
    return CSVSeriesDataModule(data_dir=str(data_dir), file=file, download=False, split="calendar", **kwargs)


def test_etth1_follows_the_published_protocol(ett_dir: Path) -> None:
    dm = ett(ett_dir, lookback=96, horizon=96)
    dm.setup()
    # 12/4/4 months of 30 days of hourly rows; windows = rows (+ look-back for val/test) - L - H + 1
    assert len(dm.datasets["train"]) == 8640 - 96 - 96 + 1
    assert len(dm.datasets["val"]) == 2880 - 96 + 1
    assert len(dm.datasets["test"]) == 2880 - 96 + 1
    raw = read_series_csv(ett_dir / "ETTh1.csv").values
    # z-score fitted on the 8,640 train rows only, in float64 (as TSLib's StandardScaler)
    np.testing.assert_allclose(dm.mean, raw[:8640].astype(np.float64).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(dm.std, raw[:8640].astype(np.float64).std(axis=0), rtol=1e-6)
    # the first test window starts its forecast exactly at row 8640 + 2880
    _, target = dm.datasets["test"][0]
    expected = (raw[11520 : 11520 + 96] - dm.mean) / dm.std
    np.testing.assert_allclose(target.numpy(), expected, rtol=1e-4, atol=1e-5)
    kwargs = dm.task_kwargs()
    assert kwargs["num_channels"] == 7 and kwargs["baseline_season"] == 24
    assert kwargs["channel_names"][-1] == "OT"


def test_univariate_mode_reads_the_target_column(ett_dir: Path) -> None:
    dm = ett(ett_dir, features="S", target="OT", lookback=96, horizon=24)
    assert dm.num_channels == 1
    dm.setup()
    inputs, _ = dm.datasets["train"][0]
    raw = read_series_csv(ett_dir / "ETTh1.csv", columns=["OT"]).values
    np.testing.assert_allclose(
        inputs[:, 0].numpy(), (raw[:96, 0] - dm.mean[0]) / dm.std[0], rtol=1e-4, atol=1e-5
    )


def test_features_ms_reads_every_channel_and_targets_one(ett_dir: Path) -> None:
    """``MS``: the windows' inputs are ``M``'s (every channel, the same scaling); their targets the
    target column's horizon alone. Without a target, or another mode, the key is named."""
    multi, ms = (ett(ett_dir, features=f, target="HUFL", lookback=96, horizon=24) for f in ("M", "MS"))
    multi.setup(), ms.setup()
    assert ms.num_channels == 7 and ms.task_kwargs()["target_only"] and not multi.task_kwargs()["target_only"]
    channel = ms.task_kwargs()["target_channel"]
    assert channel == 0  # HUFL, the first column: not the last one (OT) by default
    for split in ("train", "test"):
        (x_m, y_m), (x_ms, y_ms) = multi.datasets[split][5], ms.datasets[split][5]
        torch.testing.assert_close(x_ms, x_m)
        torch.testing.assert_close(y_ms, y_m[:, channel : channel + 1])
    with pytest.raises(ConfigError, match=r"data.features=MS needs data.target"):
        ett(ett_dir, features="MS")
    with pytest.raises(ConfigError, match=r"data.features='SM': expected 'M' .*'S' .*or 'MS'"):
        ett(ett_dir, features="SM", target="OT")


def test_fifteen_minute_files_get_four_times_the_rows(tmp_path: Path) -> None:
    rows = 20 * 30 * 96
    write_csv(tmp_path / "ETTm1.csv", rows, step=timedelta(minutes=15))
    dm = ett(tmp_path, file="ETTm1.csv", lookback=96, horizon=96)
    dm.setup()
    assert len(dm.datasets["train"]) == 4 * 8640 - 96 - 96 + 1
    assert len(dm.datasets["test"]) == 4 * 2880 - 96 + 1
    assert dm.task_kwargs()["baseline_season"] == 96


def test_any_csv_with_a_ratio_split(tmp_path: Path) -> None:
    write_csv(tmp_path / "weather.csv", 1000, columns=("p", "T", "rh"))
    dm = CSVSeriesDataModule(
        data_dir=str(tmp_path), file="weather.csv", split="ratio", lookback=24, horizon=12
    )
    dm.setup()
    assert dm.num_channels == 3
    assert len(dm.datasets["train"]) == 700 - 24 - 12 + 1
    assert len(dm.datasets["test"]) == 200 - 12 + 1


def to_long(wide: Path, long: Path, seed: int = 0, id_column: str = "unique_id") -> list[str]:
    """The wide CSV's channels as long-format rows (``unique_id,ds,y``), shuffled."""
    header, *rows = [line.split(",") for line in wide.read_text().splitlines()]
    out = [
        f"{id_column},ds,y",
        *(f"{name},{row[0]},{value}" for row in rows for name, value in zip(header[1:], row[1:])),
    ]
    body = out[1:]
    np.random.default_rng(seed).shuffle(body)
    long.write_text("\n".join([out[0], *body]) + "\n")
    return [line.split(",")[0] for line in body]


def test_a_long_format_file_is_read_as_a_channel_per_series(tmp_path: Path) -> None:
    """neuralforecast's ``unique_id,ds,y`` (a row per series and time, in any order) reads as the
    wide file it was made from, a channel per series in the order the ids first appear."""
    wide = read_series_csv(write_csv(tmp_path / "wide.csv", 300, columns=("MT_1", "MT_2", "OT")))
    ids = to_long(tmp_path / "wide.csv", tmp_path / "long.csv")
    long = read_series_csv(tmp_path / "long.csv", date_column="ds", id_column="unique_id")
    order = list(dict.fromkeys(ids))
    assert long.columns == order and sorted(order) == sorted(wide.columns)
    np.testing.assert_array_equal(long.values, wide.values[:, [wide.columns.index(c) for c in order]])
    assert long.timestamps == wide.timestamps and long.rows_per_day == 24
    # several value columns: a channel per series and column
    lines = (tmp_path / "long.csv").read_text().splitlines()
    (tmp_path / "two.csv").write_text(
        "\n".join([lines[0] + ",z", *(f"{line},1.5" for line in lines[1:])]) + "\n"
    )
    two = read_series_csv(tmp_path / "two.csv", date_column="ds", id_column="unique_id")
    assert two.columns[:2] == [f"{order[0]}/y", f"{order[0]}/z"] and two.values.shape == (300, 6)
    np.testing.assert_array_equal(two.values[:, 0::2], long.values)

    dm = CSVSeriesDataModule(
        data_dir=str(tmp_path), file="long.csv", date_column="ds", id_column="unique_id",
        lookback=24, horizon=12, features="S", target="MT_2",
    )  # fmt: skip
    dm.setup()
    assert dm.task_kwargs()["channel_names"] == ["MT_2"]
    _, target = dm.datasets["test"][0]  # the first test forecast starts at row 0.7 * 300 + 0.1 * 300
    column = wide.values[:, wide.columns.index("MT_2")]
    np.testing.assert_allclose(target[:, 0].numpy(), (column[240:252] - dm.mean[0]) / dm.std[0], rtol=1e-5)


def test_series_ids_that_look_like_numbers_are_targeted_by_them(tmp_path: Path) -> None:
    """Hydra reads data.target=7 as the integer 7; the ids are text: the target was not found."""
    write_csv(tmp_path / "wide.csv", 200, columns=("7", "007"))
    to_long(tmp_path / "wide.csv", tmp_path / "long.csv")
    dm = CSVSeriesDataModule(
        data_dir=str(tmp_path), file="long.csv", date_column="ds", id_column="unique_id",
        lookback=12, horizon=4, features="S", target=7,
    )  # fmt: skip
    dm.setup()
    assert dm.task_kwargs()["channel_names"] == ["7"]  # (not "007")
    # as train.py builds it from the command line (data.target=7: an integer to Hydra), the
    # settings check let it through (it refused a target that was not a string)
    from seqlab.train import build_datamodule

    built = build_datamodule(
        {
            "_target_": "seqlab.data.forecasting.CSVSeriesDataModule", "data_dir": str(tmp_path),
            "file": "long.csv", "date_column": "ds", "id_column": "unique_id", "lookback": 12,
            "horizon": 4, "features": "MS", "target": 7,
        },
        prepare=False,
    )  # fmt: skip
    built.setup()
    assert built.task_kwargs()["channel_names"][built.task_kwargs()["target_channel"]] == "7"


def test_a_long_format_file_that_does_not_line_up_is_refused_by_series_and_time(tmp_path: Path) -> None:
    write_csv(tmp_path / "wide.csv", 50, columns=("A", "B"))
    to_long(tmp_path / "wide.csv", tmp_path / "long.csv")
    header, *rows = (tmp_path / "long.csv").read_text().splitlines()
    gone = next(i for i, row in enumerate(rows) if row.startswith("B,2016-07-01 05:00:00"))
    (tmp_path / "gap.csv").write_text("\n".join([header, *rows[:gone], *rows[gone + 1 :]]) + "\n")
    with pytest.raises(DataError, match=r"gap.csv: series 'B' \(unique_id\) has no row at 1 of the file's 50 times, "
                       r"first 2016-07-01 05:00:00; .*data.fill_missing \(one of ffill, linear, zero\)"):  # fmt: skip
        read_series_csv(tmp_path / "gap.csv", date_column="ds", id_column="unique_id")
    (tmp_path / "twice.csv").write_text("\n".join([header, *rows, rows[gone]]) + "\n")
    with pytest.raises(DataError, match=rf"twice.csv, line 102: series 'B' \(unique_id\) has a second row at "
                       rf"2016-07-01 05:00:00 \(the first on line {gone + 2}\)"):  # fmt: skip
        read_series_csv(tmp_path / "twice.csv", date_column="ds", id_column="unique_id")
    (tmp_path / "blank.csv").write_text(f"{header}\n,2016-07-01 00:00:00,1.0\n")
    with pytest.raises(DataError, match=r"blank.csv, line 2: the id column 'unique_id' is empty"):
        read_series_csv(tmp_path / "blank.csv", date_column="ds", id_column="unique_id")
    with pytest.raises(
        DataError, match=r"no id column 'series' \(data.id_column\); columns are \['unique_id', 'ds', 'y'\]"
    ):
        read_series_csv(tmp_path / "long.csv", date_column="ds", id_column="series")
    with pytest.raises(
        ConfigError, match=r"data.id_column and data.date_column are both 'ds': name two columns"
    ):
        read_series_csv(tmp_path / "long.csv", date_column="ds", id_column="ds")
    with pytest.raises(
        ConfigError, match=r"data.id_column='unique_id' \(long format\) needs data.date_column"
    ):
        read_series_csv(tmp_path / "long.csv", date_column=None, id_column="unique_id")
    # read as a wide file, a long one says where to look
    with pytest.raises(DataError, match=r"'unique_id': '[AB]' is not a number \(a column of names; several series in "
                       r"long format\? name their id column \(data.id_column=<column>\)"):  # fmt: skip
        read_series_csv(tmp_path / "long.csv", date_column="ds")
    by_series = sorted(rows, key=lambda row: (row[0], row[2:]))
    (tmp_path / "sorted.csv").write_text("\n".join([header, *by_series]) + "\n")
    with pytest.raises(
        DataError, match=r"line 52: date 2016-07-01 00:00:00 comes before .*name their id column"
    ):
        read_series_csv(tmp_path / "sorted.csv", date_column="ds", columns=["y"])


def test_missing_values_are_refused_or_filled_as_asked(tmp_path: Path, caplog) -> None:
    """Real series have holes (a sensor down, a series that starts later): refused by line, or with
    data.fill_missing carried forward (the past only), interpolated or zeroed; in long format the
    absent times of a series too."""
    from seqlab.data.readers import fill_missing

    path = tmp_path / "holes.csv"
    path.write_text(
        "date,a,b\n2016-07-01 00:00:00,,1\n2016-07-01 01:00:00,2,NaN\n2016-07-01 02:00:00,NA,3\n"
        "2016-07-01 03:00:00,8,\n2016-07-01 04:00:00,10,9\n"
    )
    with pytest.raises(DataError, match=r"line 2, column 'a': '' is empty .*or set data.fill_missing"):
        read_series_csv(path)
    raw = read_series_csv(path, missing=True)
    assert np.isnan(raw.values).sum() == 4
    expected = {
        "ffill": [[2, 1], [2, 1], [2, 3], [8, 3], [10, 9]],  # a's first value before it
        "linear": [[2, 1], [2, 2], [5, 3], [8, 6], [10, 9]],
        "zero": [[0, 1], [2, 0], [0, 3], [8, 0], [10, 9]],
    }
    for how, values in expected.items():
        with caplog.at_level("WARNING", logger="seqlab.data.readers"):
            filled = fill_missing(raw, how, str(path))
        np.testing.assert_array_equal(filled.values, np.array(values, dtype=np.float32), err_msg=how)
        assert f"filled 4 missing value(s) (data.fill_missing={how}): {{'a': 2, 'b': 2}}" in caplog.text
    assert np.isnan(raw.values).sum() == 4  # (the series read is left as it was)

    write_csv(tmp_path / "wide.csv", 50, columns=("A", "B"))
    to_long(tmp_path / "wide.csv", tmp_path / "long.csv")
    header, *rows = (tmp_path / "long.csv").read_text().splitlines()
    (tmp_path / "gap.csv").write_text(
        "\n".join([header, *(r for r in rows if not r.startswith("B,2016-07-01 0"))]) + "\n"
    )
    dm = CSVSeriesDataModule(
        data_dir=str(tmp_path), file="gap.csv", date_column="ds", id_column="unique_id", fill_missing="ffill",
        lookback=8, horizon=4, batch_size=4,
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="seqlab.data.readers"):
        series = dm.load_series()
    assert "channel(s) {'B': 10} start later than the file" in caplog.text  # filled from a later time
    wide = read_series_csv(tmp_path / "wide.csv")
    b = series.columns.index("B")
    np.testing.assert_array_equal(series.values[:10, b], np.full(10, wide.values[10, 1]))  # its first value
    np.testing.assert_array_equal(series.values[10:, b], wide.values[10:, 1])
    with pytest.raises(
        ConfigError, match=r"data.fill_missing='mean': expected null \(refuse missing values\) or one of"
    ):
        CSVSeriesDataModule(data_dir=str(tmp_path), file="gap.csv", fill_missing="mean")
    path.write_text("date,a,b\n2016-07-01 00:00:00,,1\n2016-07-01 01:00:00,,2\n")
    with pytest.raises(DataError, match=r"channel\(s\) \['a'\] have no value at all"):
        fill_missing(read_series_csv(path, missing=True), "linear", str(path))


def test_batches_gather_windows_in_one_step() -> None:
    dm = SyntheticSeriesDataModule(num_steps=500, num_channels=3, lookback=20, horizon=5)
    dm.setup()
    dataset = dm.datasets["train"]
    inputs, targets = dataset.__getitems__([0, 7])
    assert inputs.shape == (2, 20, 3) and targets.shape == (2, 5, 3)
    single_in, single_target = dataset[7]
    torch.testing.assert_close(inputs[1], single_in)
    torch.testing.assert_close(targets[1], single_target)
    torch.testing.assert_close(dataset.series[7 + 20], targets[1, 0])


def test_the_training_loader_gathers_blocks_of_the_same_batches() -> None:
    """Blocks of ``gather_batches`` batches in one gather: the batches one index tensor at a
    time would give (contiguous), the last block short."""
    dm = SyntheticSeriesDataModule(num_steps=500, num_channels=3, lookback=20, horizon=5, batch_size=16)
    dm.setup()
    loader = dm.train_dataloader()
    loader.gather_batches = 6
    loader.sampler.set_epoch(1)
    epoch = list(loader)
    loader.sampler.set_epoch(1)
    expected = [dm.datasets["train"][index] for index in loader.sampler]
    assert len(epoch) == len(expected) == len(loader) and len(loader) % 6
    for (inputs, targets), (want_inputs, want_targets) in zip(epoch, expected):
        assert torch.equal(inputs, want_inputs) and torch.equal(targets, want_targets)
        assert inputs.is_contiguous() and targets.is_contiguous()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_every_epoch_draws_once_from_the_global_random_state(num_workers: int) -> None:
    """A loader's iterator draws its workers' base seed from the global random state when it is
    made; a persistent one (``num_workers > 0``) is made once and reused, drawing nothing in
    later epochs, while a run resumed from an epoch's end makes a new one: its dropout went on
    from another random state than the run that was not interrupted."""

    def loader():
        dm = SyntheticSeriesDataModule(num_steps=300, num_channels=2, lookback=20, horizon=5, batch_size=16,
                                       num_workers=num_workers)  # fmt: skip
        dm.setup()
        return dm.train_dataloader()

    torch.manual_seed(0)
    through = loader()
    for epoch in range(2):
        through.sampler.set_epoch(epoch)
        list(through)
        if epoch == 0:
            after_first = torch.get_rng_state()
    uninterrupted = torch.get_rng_state()
    torch.set_rng_state(after_first)  # resumed at the first epoch's end: a new loader, a new iterator
    resumed = loader()
    resumed.sampler.set_epoch(1)
    list(resumed)
    assert torch.equal(torch.get_rng_state(), uninterrupted)


def test_synthetic_series_is_seeded() -> None:
    first = SyntheticSeriesDataModule(num_steps=300, generator_seed=5).load_series().values
    again = SyntheticSeriesDataModule(num_steps=300, generator_seed=5).load_series().values
    other = SyntheticSeriesDataModule(num_steps=300, generator_seed=6).load_series().values
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("date,a,b\n", "no data rows"),
        ("time,a,b\n2016-07-01 00:00:00,1,2\n", "no date column 'date'"),
        ("date,a,b\n2016-07-01 00:00:00,1,x\n", r"line 2, column 'b': 'x' is not a number"),
        (
            "date,a,b\n2016-07-01 00:00:00,1,NA\n",
            r"line 2, column 'b': 'NA' is a missing value; fill or drop",
        ),
        (
            "date,a,b\n2016-07-01 00:00:00,1,2\n2016-07-01 01:00:00, ,2\n",
            r"line 3, column 'a': '' is empty \(a missing value\); fill or drop missing values first",
        ),
        ("date,a,b\n2016-07-01 00:00:00,1,2\n2016-07-01 01:00:00,nan,2\n", r"line 3, column 'a'.*not finite"),
        ("date,a,b\n2016-07-01 00:00:00,1,-inf\n", r"line 2, column 'b'.*not finite"),
        (
            "date,a,b\n2016-07-01 00:00:00,1,3.5e38\n",
            r"line 2, column 'b': value '3.5e38' is beyond float32's range",
        ),
        ("date,a,b\n2016-07-01 00:00:00,1,2\n2016-07-01 01:00:00,1\n", r"line 3: 2 fields, expected 3"),
        ("date,a,b\nyesterday,1,2\n", r"line 2: cannot parse date 'yesterday'"),
    ],
)
def test_malformed_csv_errors_name_file_line_and_column(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        read_series_csv(path)
    assert str(path) in str(err.value)


def test_undecodable_bytes_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("date,caf\xe9\n2016-07-01 00:00:00,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_series_csv(path)


def test_missing_columns_are_listed(tmp_path: Path) -> None:
    write_csv(tmp_path / "x.csv", 10)
    with pytest.raises(
        DataError, match=r"column\(s\) \['load'\] not found; columns are \['date', 'a', 'b', 'OT'\]"
    ):
        read_series_csv(tmp_path / "x.csv", columns=["load"])
    dm = ett(tmp_path, file="x.csv", features="S", target="load")
    with pytest.raises(DataError, match="target column 'load'"):
        dm.setup()


def test_unnamed_or_repeated_columns_are_refused(tmp_path: Path) -> None:
    """A DataFrame's index (``to_csv`` writes it under an empty name) was read as a channel, and a
    repeated name read the first column twice (the other was dropped)."""
    lines = write_csv(tmp_path / "x.csv", 10).read_text().splitlines()
    (tmp_path / "index.csv").write_text(
        "\n".join(f"{i - 1 if i else ''},{line}" for i, line in enumerate(lines))
    )
    with pytest.raises(DataError, match=r"index.csv: column 1 has no name .*to_csv\(index=False\)"):
        read_series_csv(tmp_path / "index.csv")
    assert read_series_csv(tmp_path / "index.csv", columns=["OT"]).columns == ["OT"]  # chosen: fine
    (tmp_path / "twice.csv").write_text("\n".join([lines[0].replace(",b,", ",a,"), *lines[1:]]))
    with pytest.raises(DataError, match=r"twice.csv: the header names column\(s\) \['a'\] more than once"):
        read_series_csv(tmp_path / "twice.csv")
    assert read_series_csv(tmp_path / "twice.csv", columns=["OT"]).values.shape == (10, 1)
    with pytest.raises(DataError, match=r"x.csv: data.columns names \['OT'\] more than once"):
        read_series_csv(tmp_path / "x.csv", columns=["OT", "a", "OT"])


def test_missing_file_says_where_and_how(tmp_path: Path) -> None:
    """Naming eval.py's key too: its ``data.data_dir=`` is refused by Hydra (``+data.`` there)."""
    dm = ett(tmp_path / "nowhere")
    with pytest.raises(
        DataError, match=r"data file not found: .*nowhere/ETTh1.csv.*data.data_dir \(eval.py: data_dir\)"
    ):
        dm.prepare_data()


def test_a_redacted_url_is_not_tried(tmp_path: Path) -> None:
    """A checkpoint's data.url keeps its password redacted: downloading with it would only fail to
    log in (an HTTP 401 that says nothing of the redaction)."""
    from seqlab.utils.secrets import REDACTED

    url = f"https://alice:{REDACTED}@mirror.example.org/ETTh1.csv"
    with pytest.raises(
        ConfigError, match=r"data.url=.*its password was redacted .* give data.url with the password"
    ):
        ensure_file(tmp_path / "ETTh1.csv", url, allow_download=True)
    assert not list(tmp_path.iterdir())


def test_failed_download_names_the_url_and_leaves_nothing(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a local port with nothing listening: refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ETTh1.csv"
    with pytest.raises(DataError, match=f"downloading it from {url} failed"):
        ensure_file(tmp_path / "ETTh1.csv", url, allow_download=True)
    assert list(tmp_path.iterdir()) == []


def test_a_file_another_process_is_fetching_is_waited_for_not_fetched_again(tmp_path: Path) -> None:
    """torchrun starts every process at once: one downloads, the others wait and take its file
    (fetching it again would replace it, changing the fingerprint another process keyed its cache by)."""
    target = tmp_path / "data" / "ETTh1.csv"
    holding, release = threading.Event(), threading.Event()

    def other_process() -> None:
        with download_lock(target.parent):
            holding.set()
            release.wait(30)
            target.write_text("date,OT\n")

    with ThreadPoolExecutor(2) as pool:
        fetching = pool.submit(other_process)
        assert holding.wait(30)
        # the URL fails if it is fetched: only the other process's file can satisfy this call
        waiting = pool.submit(ensure_file, target, (tmp_path / "gone.csv").as_uri(), True)
        time.sleep(0.3)
        assert not waiting.done()  # blocked on the other's download
        release.set()
        fetching.result(30)
        assert waiting.result(30) == target
    assert target.read_text() == "date,OT\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["ETTh1.csv"]  # no lock file left


def test_a_file_system_without_locks_still_fetches(tmp_path: Path, monkeypatch, caplog) -> None:
    import errno
    import fcntl

    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    source = tmp_path / "remote.csv"
    source.write_text("date,OT\n")
    target = tmp_path / "data" / "ETTh1.csv"
    assert ensure_file(target, source.as_uri(), True) == target
    assert target.read_text() == "date,OT\n"
    assert "cannot lock it (No locks available)" in caplog.text


def test_the_target_channel_and_the_split_ratios(tmp_path: Path, caplog) -> None:
    write_csv(tmp_path / "x.csv", 2000, columns=("OT", "a", "b"))
    dm = CSVSeriesDataModule(
        data_dir=str(tmp_path), file="x.csv", download=False, target="OT", lookback=24, horizon=12
    )
    assert dm.task_kwargs()["target_channel"] == 0  # what the report plots and tabulates
    assert CSVSeriesDataModule(data_dir=str(tmp_path), file="x.csv", download=False, lookback=24,
                               horizon=12).task_kwargs()["target_channel"] == 2  # fmt: skip
    # M mode: an unknown target is named (the report's channel falls back to the last one, which
    # used to be labelled the target silently)
    with caplog.at_level("WARNING", logger="seqlab.data.forecasting"):
        kwargs = CSVSeriesDataModule(
            data_dir=str(tmp_path), file="x.csv", download=False, target="nope"
        ).task_kwargs()
    assert kwargs["target_channel"] == 2
    assert (
        "target column 'nope' (data.target) not found; columns are ['OT', 'a', 'b']; the report shows the last column, 'b'"
        in caplog.text
    )
    # every split needs rows: a validation share of 0 is refused when the config is built
    for ratios in ([0.6, 0.1, 0.2], [0.7, 0.3], [1.2, -0.1, -0.1], [0.8, 0, 0.2]):
        with pytest.raises(ConfigError, match=r"data.split_ratios=.*three positive shares .* add up to 1"):
            CSVSeriesDataModule(data_dir=str(tmp_path), file="x.csv", split_ratios=ratios)
    for months in ([12, 4], [12, -4, 4], [12, 4.5, 4]):
        with pytest.raises(ConfigError, match=r"data.split_months=.*three positive whole numbers"):
            CSVSeriesDataModule(data_dir=str(tmp_path), file="x.csv", split="calendar", split_months=months)


def test_rows_out_of_time_order_or_skipping_time(tmp_path: Path, caplog) -> None:
    """A date before the previous row's is refused by line; a gap or a repeated time is refused by
    the calendar split (it counts months as rows) and reported by the ratio split."""
    path = write_csv(tmp_path / "g.csv", 21 * 30 * 24)
    lines = path.read_text().splitlines()
    (tmp_path / "reversed.csv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    with pytest.raises(
        DataError,
        match=r"reversed.csv, line 3: date 2018-03-22 22:00:00 comes before the previous row's "
        r"2018-03-22 23:00:00; expected rows in time order, oldest first",
    ):
        read_series_csv(tmp_path / "reversed.csv")
    (tmp_path / "gap.csv").write_text("\n".join([*lines[:101], *lines[149:]]) + "\n")  # 48 hours missing
    (tmp_path / "repeated.csv").write_text("\n".join([*lines[:11], lines[10], *lines[11:]]) + "\n")
    off_grid = lines[10].replace(" 09:00:00,", " 09:30:00,")  # a row between 09:00 and 10:00
    (tmp_path / "off_grid.csv").write_text("\n".join([*lines[:11], off_grid, *lines[11:]]) + "\n")
    for name, first, places in (("gap", "2016-07-05 03:00:00 to 2016-07-07 04:00:00", 1),
                                ("repeated", "2016-07-01 09:00:00 to 2016-07-01 09:00:00", 1),
                                ("off_grid", "2016-07-01 09:00:00 to 2016-07-01 09:30:00", 2)):  # fmt: skip
        said = f"skip time, repeat it or leave the grid in {places} place(s), first from {first}"
        with pytest.raises(DataError, match=re.escape(said) + "; fill"):
            ett(tmp_path, file=f"{name}.csv").setup()
        ratio = CSVSeriesDataModule(data_dir=str(tmp_path), file=f"{name}.csv", download=False)
        with caplog.at_level("WARNING", logger="seqlab.data.forecasting"):
            ratio.setup()
        assert said in caplog.text
    ett(tmp_path, file="g.csv").setup()  # the file without them splits by the calendar
    # long format (several rows per time): the calendar split names the repeated times
    long = [lines[0], *(f"{line},{station}" for line in lines[1:] for station in range(3))]
    (tmp_path / "long.csv").write_text("\n".join(long).replace("OT\n", "OT,station\n", 1) + "\n")
    with pytest.raises(
        DataError, match=r"most rows repeat the time before them \(first 2016-07-01 00:00:00\)"
    ):
        ett(tmp_path, file="long.csv").setup()


def test_steps_are_calendar_steps_whatever_the_local_time_zone(ett_dir: Path, monkeypatch) -> None:
    """Dates without a zone were read as local time: where the clocks change (Europe/Berlin,
    ETTh1's October nights) an hour became a 2-hour step, and the calendar split refused ETTh1."""
    import time

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        series = read_series_csv(ett_dir / "ETTh1.csv")
        assert series.irregular() == [] and series.rows_per_day == 24
        ett(ett_dir, lookback=96, horizon=96).setup()
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_csv_with_a_byte_order_mark_reads_its_header(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("date,OT\n2020-01-01 00:00:00,1.5\n".encode("utf-8-sig"))
    series = read_series_csv(path)
    assert series.columns == ["OT"] and series.values.tolist() == [[1.5]]


def test_blank_lines_before_the_header_are_skipped(tmp_path: Path) -> None:
    """A file opening with a blank line was refused as "empty: expected a header line"."""
    path = tmp_path / "blank.csv"
    path.write_text("\n \ndate,OT\n2020-01-01 00:00:00,1.5\n")
    series = read_series_csv(path)
    assert series.columns == ["OT"] and series.values.tolist() == [[1.5]]
    path.write_text("\n\n")
    with pytest.raises(DataError, match="is empty: expected a header line"):
        read_series_csv(path)


def test_windows_longer_than_a_split_give_the_numbers(tmp_path: Path) -> None:
    write_csv(tmp_path / "short.csv", 30 * 24 * 21)
    dm = ett(tmp_path, file="short.csv", lookback=2000, horizon=3000)
    with pytest.raises(
        DataError,
        match=r"look-back 2000 \+ horizon 3000 = 5000 steps do not fit in the val split .*; "
        r"shorten data.horizon, or give the val split more rows",  # its look-back is taken from train
    ):
        dm.setup()


def test_too_few_rows_for_the_calendar_split(tmp_path: Path) -> None:
    write_csv(tmp_path / "month.csv", 30 * 24)
    with pytest.raises(
        DataError, match=r"split_months=\[12, 4, 4\] needs 14400 rows .* the file has 720: .*data.split=ratio"
    ):
        ett(tmp_path, file="month.csv").setup()


@pytest.mark.parametrize("size,world", [(10, 2), (11, 2), (7, 3), (2, 4), (5, 1)])
def test_eval_shards_cover_every_example_once(size: int, world: int) -> None:
    from seqlab.data.samplers import EvalShardSampler

    shards = [list(EvalShardSampler(size, num_replicas=world, rank=rank)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(size)), "no repeats, no gaps"
    assert [len(EvalShardSampler(size, world, rank)) for rank in range(world)] == [len(s) for s in shards]


@pytest.mark.parametrize(
    "size,world,batch",
    [(577, 2, 32), (225, 2, 16), (577, 8, 8), (10, 4, 2), (64, 2, 32), (5, 1, 2), (2, 4, 3)],
)
def test_eval_batches_are_as_many_on_every_process(size: int, world: int, batch: int) -> None:
    """Under sharded parameters every forward is a collective: each process runs as many batches
    (577 windows on 2 processes, 32 each: 10 and 9 before, and trainer=fsdp2 hung), each example
    once, none over the batch size; a process without examples gets no (empty) batch."""
    from seqlab.data.samplers import EvalShardSampler

    shards = [
        EvalShardSampler(size, num_replicas=world, rank=rank, batch_size=batch) for rank in range(world)
    ]
    batches = [list(shard) for shard in shards]
    counts = [len(b) for b in batches]
    assert counts == [len(shard) for shard in shards]
    if size >= world and batch > 1:  # every process holds an example, and a batch can be split
        assert len(set(counts)) == 1, counts
    assert all(0 < len(t) <= batch for b in batches for t in b)
    assert sorted(int(i) for b in batches for t in b for i in t) == list(range(size))


def test_uneven_eval_batches_under_sharded_parameters_are_refused() -> None:
    """At one window per process a batch cannot be split: 3 windows on 2 processes are 2 and 1
    batches. Under sharded parameters that hung at the first validation; it is refused by name.
    Replicated parameters (DDP) run uneven batches as they are."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    from seqlab.utils.distributed import ModelParallelStrategy

    dm = SyntheticSeriesDataModule(num_steps=600, lookback=48, horizon=12, batch_size=2)
    dm.setup("fit")
    assert len(dm.datasets["val"]) == 49
    sharded = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, strategy=sharded)
    with pytest.raises(ConfigError, match=r"val split's 49 windows .*\(\[25, 24\]\).*data.batch_size >= 4"):
        dm.val_dataloader()
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, strategy=DDPStrategy())
    assert len(dm.val_dataloader()) == 25
    dm.batch_size = 4  # 2 per process: the last batch of 2 is split
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, strategy=sharded)
    assert len(dm.val_dataloader()) == 13


def test_runs_of_consecutive_seeds_share_no_epoch_order() -> None:
    """Seeded by seed + epoch (DistributedSampler's rule), seed 2's first epoch was seed 1's
    second: a seed study's runs 1, 2, 3 over 10 epochs drew 12 orders, not 30."""
    from seqlab.data.samplers import GlobalBatchSampler

    def orders(seed: int) -> list[tuple[int, ...]]:
        sampler = GlobalBatchSampler(500, batch_size=50, seed=seed, drop_last=True)
        out = []
        for epoch in range(10):
            sampler.set_epoch(epoch)
            out.append(tuple(int(i) for batch in sampler for i in batch))
        return out

    seen = [order for seed in (1, 2, 3) for order in orders(seed)]
    assert len(set(seen)) == 30
    assert orders(1) == orders(1)  # and each is reproducible


def test_unseeded_runs_draw_their_own_epoch_orders() -> None:
    """``seed=null``: every unseeded run had the same epoch orders (``epoch_seed(None, e)``), so
    a study of unseeded runs saw one data order. Each run now draws a seed for its orders and
    keeps it for the whole run; the training loader's state (saved in every checkpoint) holds
    it, and a resumed run's loader takes it back, for its later loaders too; a checkpoint from
    before goes on in the old orders; under several processes rank 0's draw is broadcast."""
    from types import SimpleNamespace

    from seqlab.data.samplers import GlobalBatchSampler

    def module(seed: int | None) -> SyntheticSeriesDataModule:
        dm = SyntheticSeriesDataModule(num_steps=500, lookback=20, horizon=5, batch_size=16, seed=seed)
        dm.setup()
        return dm

    def orders(sampler) -> list[list[int]]:
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            out.append([i for batch in sampler for i in batch.tolist()])
        return out

    def seeded_by(seed: int | None) -> list[list[int]]:
        return orders(
            GlobalBatchSampler(len(first.datasets["train"]), batch_size=16, seed=seed, drop_last=True)
        )

    first, second = module(None), module(None)
    first_orders = orders(first.train_dataloader().sampler)
    assert first_orders != orders(second.train_dataloader().sampler)
    assert orders(first.train_dataloader().sampler) == first_orders  # one draw for the whole run
    assert first_orders == seeded_by(first.order_seed())

    saved = first.train_dataloader().state_dict()
    resumed = module(None)
    loader = resumed.train_dataloader()  # built, with a draw, before the checkpoint comes back
    assert orders(loader.sampler) != first_orders
    loader.load_state_dict(saved)
    assert orders(loader.sampler) == first_orders == orders(resumed.train_dataloader().sampler)
    old = module(None)  # a checkpoint from before seeds were drawn: its orders go on
    loader = old.train_dataloader()
    loader.load_state_dict({k: v for k, v in saved.items() if k != "seed"})
    assert orders(loader.sampler) == seeded_by(None) == orders(old.train_dataloader().sampler)

    seeded = module(3)  # a seeded run's orders are its seed's, whatever a checkpoint says
    loader = seeded.train_dataloader()
    seeded_state = loader.state_dict()
    loader.load_state_dict(saved)
    assert orders(loader.sampler) == seeded_by(3)
    unseeded = module(None)  # an unseeded run trained on from a seeded run's checkpoint
    loader = unseeded.train_dataloader()
    loader.load_state_dict(seeded_state)
    assert orders(loader.sampler) == seeded_by(3) and unseeded.drawn_order_seed == 3

    sent = []
    broadcast = lambda value, src: sent.append((value, src)) or 12345  # noqa: E731  (rank 0's draw)
    ranked = module(None)
    ranked.trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(broadcast=broadcast))
    assert ranked.order_seed() == ranked.order_seed() == 12345 and len(sent) == 1 and sent[0][1] == 0


@pytest.mark.parametrize("size,world", [(203, 1), (203, 2), (200, 4), (64, 2)])
def test_training_batches_are_those_of_distributed_sampler(size: int, world: int) -> None:
    """The batch sampler gives each process, step by step, exactly the indices Lightning's usual
    ``DistributedSampler`` + ``BatchSampler(drop_last)`` would, as tensors, given the epoch's
    seed (``epoch_seed``; DistributedSampler seeds an epoch by seed + epoch)."""
    from torch.utils.data import BatchSampler, DistributedSampler

    from seqlab.data.samplers import GlobalBatchSampler, epoch_seed

    for rank in range(world):
        ours = GlobalBatchSampler(size, batch_size=16, num_replicas=world, rank=rank, seed=5, drop_last=True)
        usual = DistributedSampler(
            range(size), num_replicas=world, rank=rank, seed=epoch_seed(5, 3), drop_last=True
        )
        ours.set_epoch(3)
        usual.set_epoch(0)
        expected = list(BatchSampler(usual, batch_size=16 // world, drop_last=True))
        got = [batch.tolist() for batch in ours]
        assert got == expected and len(ours) == len(expected) == size // 16


def test_a_channel_constant_over_the_training_rows_is_scaled_by_one(tmp_path: Path, caplog) -> None:
    """A stuck sensor (3.7 over the 700 training rows, 3.8 after): its float32 std was rounding
    error (~1e-4), not 0, so the guard against dividing by 0 missed it and the 0.1 step became
    hundreds of z-units in val/test, dominating the z-scored metrics. It is scaled by 1 (as
    scikit-learn's StandardScaler), named in a warning; the other channels keep their std."""
    write_csv(tmp_path / "x.csv", 1000, columns=("a", "stuck", "OT"))
    lines = (tmp_path / "x.csv").read_text().splitlines()
    for i in range(1, len(lines)):
        fields = lines[i].split(",")
        fields[2] = "3.7" if i <= 700 else "3.8"
        lines[i] = ",".join(fields)
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    dm = CSVSeriesDataModule(data_dir=str(tmp_path), file="x.csv", download=False, lookback=24, horizon=12)
    with caplog.at_level("WARNING", logger="seqlab.data.forecasting"):
        dm.setup()
    assert "channel(s) ['stuck'] are constant over the training rows: scaled by 1" in caplog.text
    raw = read_series_csv(tmp_path / "x.csv").values.astype(np.float64)
    assert dm.std[1] == 1.0
    np.testing.assert_allclose(dm.std[[0, 2]], raw[:700, [0, 2]].std(axis=0), rtol=1e-6)
    _, target = dm.datasets["test"][0]  # after the step: 0.1 above the training level
    np.testing.assert_allclose(target[:, 1].numpy(), 0.1, atol=1e-5)
    assert dm.task_kwargs()["scaler_std"][1] == 1.0  # the original scale is restored with it


def test_bad_batch_size_or_season_length_names_the_key(tmp_path: Path) -> None:
    """They failed inside the sampler (ZeroDivisionError) or, for a negative season, in the test
    after the whole fit (an index past the look-back)."""
    write_csv(tmp_path / "x.csv", 400)
    make = dict(data_dir=str(tmp_path), file="x.csv", download=False, lookback=24, horizon=12)
    for size in (0, -64):
        with pytest.raises(ConfigError, match=rf"data.batch_size={size}: expected a positive integer"):
            CSVSeriesDataModule(batch_size=size, **make)
    for season in (0, -24):
        with pytest.raises(ConfigError, match=rf"data.season_length={season}: expected a positive number"):
            CSVSeriesDataModule(season_length=season, **make)


@pytest.mark.parametrize(("step", "season"), [(timedelta(hours=1), 24), (timedelta(days=1), None),
                                              (timedelta(weeks=1), None)])  # fmt: skip
def test_the_default_seasonal_baseline_is_one_day_of_rows(tmp_path: Path, step: timedelta, season) -> None:
    """Daily rows made a season of 1 (the last-value baseline twice), weekly ones a season of 0
    (the baseline dropped without a word): data of one row a day or coarser gets none unless
    data.season_length gives it (7 for daily rows, 52 for weekly)."""
    write_csv(tmp_path / "x.csv", 400, step=step)
    make = dict(data_dir=str(tmp_path), file="x.csv", download=False, lookback=60, horizon=12)
    assert CSVSeriesDataModule(**make).task_kwargs()["baseline_season"] == season
    assert CSVSeriesDataModule(season_length=7, **make).task_kwargs()["baseline_season"] == 7


def test_a_checkpoint_evaluated_on_other_data_takes_its_season(tmp_path: Path) -> None:
    """``eval.py data.file=ETTm1.csv`` of an ETTh1 model: the seasonal-naive baseline repeated 24
    rows (6 hours of 15-minute rows) instead of the evaluated data's day (96 rows)."""
    from seqlab.tasks.forecasting import ForecastingTask

    backbone = {"_target_": "seqlab.backbones.rnn.RNNBackbone", "cell": "gru", "d_model": 8, "num_layers": 1}
    task = ForecastingTask(backbone=backbone, num_channels=2, lookback=192, horizon=4, baseline_season=24)
    assert task.seasonal_index.tolist() == [168, 169, 170, 171]
    task.adopt_data({"baseline_season": 96})
    assert task.baseline_season == 96 and task.hparams.baseline_season == 96
    assert task.seasonal_index.tolist() == [96, 97, 98, 99]
    task.adopt_data({"baseline_season": None})  # daily data: no seasonal baseline
    assert task.baseline_season is None and set(task.baseline_metrics) == {"last"}
    task.adopt_data({"baseline_season": 12})
    assert task.seasonal_index.tolist() == [180, 181, 182, 183] and "seasonal" in task.baseline_metrics


def test_a_checkpoint_on_data_scaled_otherwise_is_warned_about(caplog) -> None:
    """The model's inputs are scaled by the data's scaler: one that differs from training's (other
    data, or a checkpoint from before constant channels were scaled by 1) is named per channel;
    one that is the same up to float rounding says nothing (an exact comparison said so always)."""
    from seqlab.tasks.forecasting import ForecastingTask

    backbone = {"_target_": "seqlab.backbones.rnn.RNNBackbone", "cell": "gru", "d_model": 8, "num_layers": 1}
    task = ForecastingTask(
        backbone=backbone, num_channels=2, lookback=24, horizon=4, channel_names=["a", "OT"],
        scaler_mean=[10.011989, 3.6996896], scaler_std=[2.5, 3.1e-4],
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="seqlab.tasks.forecasting"):
        task.adopt_data({"scaler_mean": [10.012016, 3.6996896], "scaler_std": [2.5000001, 3.1e-4]})
    assert not caplog.text
    with caplog.at_level("WARNING", logger="seqlab.tasks.forecasting"):
        task.adopt_data({"scaler_mean": [10.012016, 3.7], "scaler_std": [2.5, 1.0]})
    assert (
        "differs from the one the model was trained with in 1 channel(s): OT (mean 3.69969, std 0.00031"
        in caplog.text
    )
    assert task.scaler_std.tolist() == [2.5, 1.0]  # the data's, for the original scale


@pytest.mark.parametrize(("padding_patch", "tokens"), [("end", 13), (None, 12)])
def test_the_padding_patch_is_one_token_of_the_last_value_repeated_or_none(padding_patch, tokens) -> None:
    """PatchTST's end padding adds a token (with patch_len=1 the last step again); null gives the
    look-back's own tokens, one per step (a step-by-step RNN, as the seeds' study had it)."""
    from seqlab.tasks.forecasting import ForecastingTask

    backbone = {"_target_": "seqlab.backbones.rnn.RNNBackbone", "cell": "gru", "d_model": 8, "num_layers": 1}
    task = ForecastingTask(
        backbone=backbone, num_channels=2, lookback=12, horizon=3, patch_len=1, patch_stride=1,
        padding_patch=padding_patch,
    )  # fmt: skip
    seen = []
    encode = task.backbone.encode
    task.backbone.encode = lambda x, *args: seen.append(x) or encode(x, *args)
    x = torch.randn(4, 12, 2)
    assert task(x).shape == (4, 3, 2) and task.num_tokens == tokens
    embedded = task.embed(task.revin.normalize(x)[0].permute(0, 2, 1).reshape(8, 12, 1))
    torch.testing.assert_close(seen[0][:, :12], embedded)
    assert seen[0].shape[1] == tokens
    if padding_patch == "end":
        torch.testing.assert_close(seen[0][:, 12], embedded[:, 11])
