"""Forecasting data: look-back windows -> horizons over a multivariate series split by time.

``SeriesDataModule`` holds everything shared (splits, scaling, windows, loaders); a dataset
only says how to load its series: ``SyntheticSeriesDataModule`` generates one in memory,
``CSVSeriesDataModule`` reads any CSV with a date column (ETT, weather, electricity, ...).

Splits follow the published long-horizon protocol (Informer / Autoformer code): train, val and
test are consecutive in time; val and test windows start ``lookback`` steps before their
border so that the first forecast starts exactly at it; the z-score is fitted on train only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from seqlab.data.readers import Series, check_fill, ensure_file, fill_missing, read_series_csv
from seqlab.data.samplers import (
    EvalShardSampler,
    GlobalBatchSampler,
    OrderSeed,
    ResumableLoader,
    check_batch_size,
    per_replica_batch_size,
    replicas,
    shuffles,
)
from seqlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: M: every channel in and out; S: the target channel alone; MS: every channel in, the target out
FEATURES = ("M", "S", "MS")
DAYS_PER_MONTH = 30  # the ETT protocol's month


class WindowDataset(Dataset):
    """All (look-back, horizon) windows of one split; batches are gathered in one indexing op.
    ``target``: the channel whose horizon is the target (``features=MS``); None: every channel's."""

    def __init__(self, series: Tensor, lookback: int, horizon: int, target: int | None = None) -> None:
        self.series = series
        self.lookback = lookback
        self.horizon = horizon
        self.target = slice(None) if target is None else slice(target, target + 1)
        span = lookback + horizon
        # every window as a view [N, C, L + H] (no copy): a batch is one index_select, ~10x faster
        # than gathering rows with an index tensor (scripts/benchmark.py data)
        self.windows = (
            series.unfold(0, span, 1)
            if series.shape[0] >= span
            else series.new_empty(0, series.shape[1], span)
        )

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int | Tensor) -> tuple[Tensor, Tensor]:
        """One window (look-back [L, C], horizon [H, C], or [H, 1] of the ``target``), or a batch of
        them for an index tensor."""
        if isinstance(index, Tensor) and index.ndim == 1:
            return self.__getitems__(index)
        inputs, targets = self.__getitems__([index])
        return inputs[0], targets[0]

    def __getitems__(self, indices: list[int] | Tensor) -> tuple[Tensor, Tensor]:
        return self.batches([torch.as_tensor(indices)])[0]

    def batches(self, indices: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Several batches (one index tensor each) gathered at once (``ResumableLoader``)."""
        window = self.windows.index_select(0, torch.cat(indices)).transpose(1, 2)  # [B, L + H, C]
        sizes = [len(index) for index in indices]
        inputs = window[:, : self.lookback].contiguous().split(sizes)
        targets = window[:, self.lookback :, self.target].contiguous().split(sizes)
        return list(zip(inputs, targets))


def keep_batch(batch: Any) -> Any:
    """Collate for datasets whose ``__getitems__`` already returns a batch."""
    return batch


def standard_scaler(train: np.ndarray, columns: list[str], source: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float32) of the training rows, in float64. A channel constant over
    them gets std 1 (as scikit-learn's StandardScaler): its computed std is rounding error (3e-4 for
    a float32 column of 3.7 over ETTh1's 8640 rows), and dividing by it blew a later change of
    that channel up by thousands of z-units, dominating the z-scored metrics."""
    values = train.astype(np.float64)
    mean, var = values.mean(axis=0), values.var(axis=0)
    rows, eps = len(values), np.finfo(np.float64).eps
    constant = var <= rows * eps * var + (rows * mean * eps) ** 2  # scikit-learn's bound
    if constant.any():
        log.warning(
            "%s: channel(s) %s are constant over the training rows: scaled by 1",
            source, [c for c, flat in zip(columns, constant) if flat],
        )  # fmt: skip
    std = np.where(constant, 1.0, np.sqrt(var))
    return mean.astype(np.float32), std.astype(np.float32)


def irregular_places(series: Series, irregular: list[int]) -> str:
    """Where the timestamps leave their usual step (``irregular``: ``series.irregular()``), in words."""
    first = irregular[0]
    return (
        f"timestamps skip time, repeat it or leave the grid in {len(irregular)} place(s), first from "
        f"{series.timestamps[first]} to {series.timestamps[first + 1]}"
    )


class SeriesDataModule(OrderSeed, L.LightningDataModule):
    """Windows, splits, scaling and loaders for one multivariate series.

    Args:
        lookback: input window length L.
        horizon: forecast length H.
        batch_size: the global batch; each of N processes gets ``batch_size / N``.
        features: ``M`` (all channels in, all out), ``S`` (the ``target`` channel alone) or ``MS``
            (all channels in, the ``target`` channel out: the others are its covariates).
        target: the channel forecast in ``S`` and ``MS`` modes.
        split: ``calendar`` (``split_months`` of 30 days; rows per day from the timestamps)
            or ``ratio`` (``split_ratios`` of the rows).
        season_length: period of the seasonal-naive baseline; default one day of rows.
        scale: z-score every channel with train statistics.
    """

    #: the task whose examples this data holds (train.py refuses another ``task=``)
    TASK = "seqlab.tasks.forecasting.ForecastingTask"

    default_season_length: int | None = None

    def __init__(
        self,
        lookback: int = 96,
        horizon: int = 96,
        batch_size: int = 32,
        features: str = "M",
        target: str | int | None = None,
        split: str = "ratio",
        split_months: tuple[int, int, int] = (12, 4, 4),
        split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
        season_length: int | None = None,
        scale: bool = True,
        num_workers: int = 0,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if features not in FEATURES:
            raise ConfigError(
                f"data.features={features!r}: expected 'M' (all channels in and out), 'S' (the target "
                "alone) or 'MS' (all channels in, the target out)"
            )
        if features in ("S", "MS") and not target:
            raise ConfigError(f"data.features={features} needs data.target, the column to forecast")
        if split not in ("calendar", "ratio"):
            raise ConfigError(f"data.split={split!r}: expected 'calendar' or 'ratio'")
        if len(split_ratios) != 3 or min(split_ratios) <= 0 or abs(sum(split_ratios) - 1) > 1e-6:
            raise ConfigError(
                f"data.split_ratios={list(split_ratios)}: expected three positive shares of the rows, "
                "train, val and test, that add up to 1"
            )
        if len(split_months) != 3 or not all(isinstance(m, int) and m > 0 for m in split_months):
            raise ConfigError(
                f"data.split_months={list(split_months)}: expected three positive whole numbers of "
                "months (of 30 days), train, val and test"
            )
        if lookback < 1 or horizon < 1:
            raise ConfigError(f"data.lookback={lookback} and data.horizon={horizon} must be positive")
        check_batch_size(batch_size)
        if season_length is not None and season_length < 1:
            raise ConfigError(
                f"data.season_length={season_length}: expected a positive number of rows (the "
                "seasonal-naive baseline's period), or null for one day of rows"
            )
        self.lookback = lookback
        self.horizon = horizon
        self.batch_size = batch_size
        self.features = features
        # a column's or series' name: ids read as text (data.target=2 comes from Hydra as the integer 2)
        self.target = None if target is None else str(target)
        self.split = split
        self.split_months = tuple(split_months)
        self.split_ratios = tuple(split_ratios)
        self.season_length = season_length
        self.scale = scale
        self.num_workers = num_workers
        self.seed = seed
        self.datasets: dict[str, WindowDataset] = {}
        #: the channels in a trained model's order (``follow_model``): the same ones read in
        #: another order (a long file's ids, ``data.columns``) are put in it
        self.channel_order: list[str] | None = None
        self._series: Series | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    # --------------------------------------------------------------- to override
    def load_series(self) -> Series:
        raise NotImplementedError

    @property
    def source(self) -> str:
        """Where the data comes from, for error messages."""
        return type(self).__name__

    # --------------------------------------------------------------- shared logic
    def split_borders(self, series: Series) -> list[tuple[int, int]]:
        """Row ranges of train/val/test, val and test extended back by the look-back."""
        rows = len(series.values)
        if self.split == "calendar":
            per_day = series.rows_per_day
            if per_day is None and series.timestamps and len(series.timestamps) > 1:
                raise DataError(
                    f"{self.source}: data.split=calendar needs one row per time, but most rows repeat "
                    f"the time before them (first {series.timestamps[int(np.argmin(series.steps()))]}): "
                    "several series in long format? Name their id column (data.id_column=<column>): each "
                    "becomes a channel"
                )
            if per_day is None:
                raise DataError(f"{self.source}: data.split=calendar needs timestamps; use data.split=ratio")
            # months are counted as rows: each missing or repeated row moves the borders
            if irregular := series.irregular():
                raise DataError(
                    f"{self.source}: data.split=calendar counts {per_day:g} rows a day, but the "
                    f"{irregular_places(series, irregular)}; fill the missing rows and drop the repeated ones, or use "
                    "data.split=ratio"
                )
            sizes = [round(m * DAYS_PER_MONTH * per_day) for m in self.split_months]
            if sum(sizes) > rows:
                raise DataError(
                    f"{self.source}: data.split_months={list(self.split_months)} needs {sum(sizes)} rows "
                    f"at {per_day:g} rows/day, the file has {rows}: give months that fit, or split by "
                    "shares with data.split=ratio (data.split_ratios, 0.7/0.1/0.2 by default)"
                )
        else:
            n_train = int(rows * self.split_ratios[0])
            n_test = int(rows * self.split_ratios[2])
            sizes = [n_train, rows - n_train - n_test, n_test]
        n_train, n_val, n_test = sizes
        starts = [0, n_train - self.lookback, n_train + n_val - self.lookback]
        ends = [n_train, n_train + n_val, n_train + n_val + n_test]
        return [(max(s, 0), e) for s, e in zip(starts, ends)]

    def model_series(self) -> Series:
        """The series as the model reads it: ``load_series``, the ``target`` channel alone under
        ``features=S`` (unscaled, unsplit; ``predict.py`` forecasts after its end). Under
        ``features=MS`` every channel is read and the ``target`` forecast."""
        series = self.load_series()
        if self.target is not None and self.target not in series.columns:
            missing = (
                f"{self.source}: target column {self.target!r} (data.target) not found; columns are "
                f"{series.columns}"
            )
            if self.features != "M":
                raise DataError(missing)
            # M: the target is only the channel the report plots and tabulates
            log.warning(
                "%s; the report shows the last column, %r (set data.target)", missing, series.columns[-1]
            )
        if self.features == "S":
            index = series.columns.index(self.target)
            series = Series(series.values[:, index : index + 1], [self.target], series.timestamps)
        order = self.channel_order
        if order and list(series.columns) != order and sorted(series.columns) == sorted(order):
            log.info("%s: channels %s read in the model's order %s", self.source, series.columns, order)
            places = [series.columns.index(name) for name in order]
            series = Series(series.values[:, places], list(order), series.timestamps)
        return series

    def follow_model(self, hparams: Any) -> None:
        """Read the channels in the order of the model that will read them (eval.py: a model reads
        each channel by its place), before the data is loaded."""
        names = hparams.get("channel_names")
        self.channel_order = list(names) if names else None

    def _load(self) -> None:
        if self._series is not None:
            return
        series = self.model_series()
        borders = self.split_borders(series)
        train_start, train_end = borders[0]
        train = series.values[train_start:train_end]
        if self.scale:
            self.mean, self.std = standard_scaler(train, series.columns, self.source)
        else:
            self.mean = np.zeros(train.shape[1], dtype=np.float32)
            self.std = np.ones(train.shape[1], dtype=np.float32)
        scaled = torch.from_numpy((series.values - self.mean) / self.std).float()
        if irregular := series.irregular():
            log.warning(
                "%s: the %s; windows there are not evenly spaced in time",
                self.source,
                irregular_places(series, irregular),
            )
        target = series.columns.index(self.target) if self.features == "MS" else None
        for name, (start, end) in zip(SPLITS, borders):
            dataset = WindowDataset(scaled[start:end], self.lookback, self.horizon, target)
            if len(dataset) < 1:
                # val and test start a look-back early: only their horizon has to fit in their rows
                shorten = "data.lookback or data.horizon" if name == "train" else "data.horizon"
                raise DataError(
                    f"{self.source}: look-back {self.lookback} + horizon {self.horizon} = "
                    f"{self.lookback + self.horizon} steps do not fit in the {name} split "
                    f"({end - start} rows including the look-back); shorten {shorten}, or give the "
                    f"{name} split more rows (data.split_ratios or data.split_months)"
                )
            self.datasets[name] = dataset
        self._series = series

    @property
    def num_channels(self) -> int:
        self._load()
        return len(self._series.columns)

    def task_kwargs(self) -> dict[str, Any]:
        """Sizes the forecasting task takes from the data (never copied into configs by hand)."""
        self._load()
        season = self.season_length or self.default_season_length
        if season is None and self._series.rows_per_day and round(self._series.rows_per_day) >= 2:
            season = round(self._series.rows_per_day)  # one day (rows a day or coarser: no default)
        return {
            "num_channels": self.num_channels,
            "lookback": self.lookback,
            "horizon": self.horizon,
            "baseline_season": season,
            "channel_names": list(self._series.columns),
            "target_channel": (
                self._series.columns.index(self.target)
                if self.target in self._series.columns
                else self.num_channels - 1
            ),
            # features=MS: the model forecasts the target channel alone
            "target_only": self.features == "MS",
            "scaler_mean": [float(v) for v in self.mean],
            "scaler_std": [float(v) for v in self.std],
        }

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def per_device_batch_size(self) -> int:
        return per_replica_batch_size(self.batch_size, self.trainer)

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        world, rank = replicas(self.trainer)
        self.per_device_batch_size()  # the global batch must divide by the processes
        # A DistributedSampler even on one process: the global batch at each step is then the
        # same set of windows whatever the number of processes (Lightning keeps this sampler).
        # It hands out each step's indices as one tensor (no per-window Python loop).
        shuffle = shuffles(self.trainer)
        sampler = GlobalBatchSampler(
            len(dataset),
            batch_size=self.batch_size,
            num_replicas=world,
            rank=rank,
            shuffle=shuffle,
            seed=self.order_seed(shuffle),
            drop_last=True,
        )
        return ResumableLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            seed_owner=self,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"], sampler=self._eval_sampler("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], sampler=self._eval_sampler("test"))

    def _eval_sampler(self, split: str) -> EvalShardSampler:
        """Each window once over all processes, as many batches on each (Lightning keeps a
        DistributedSampler it is given)."""
        world, rank = replicas(self.trainer)
        size, batch = len(self.datasets[split]), self.per_device_batch_size()
        if world > 1:
            from seqlab.utils.distributed import shards_parameters

            counts = [len(EvalShardSampler(size, world, r, batch)) for r in range(world)]
            if len(set(counts)) > 1 and shards_parameters(self.trainer.strategy):
                raise ConfigError(
                    f"the {split} split's {size} windows cannot be cut into as many batches on each of "
                    f"the {world} processes ({counts}) at {batch} per process (data.batch_size="
                    f"{self.batch_size}): with sharded parameters every forward is a collective, and "
                    "the processes would wait for each other for ever; give each process at least 2 "
                    f"(data.batch_size >= {2 * world}), or more {split} windows"
                )
        return EvalShardSampler(size, num_replicas=world, rank=rank, batch_size=batch)

    def _loader(self, dataset: Dataset, sampler: EvalShardSampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,  # the sampler hands out each batch's indices as one tensor
            sampler=sampler,
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class SyntheticSeriesDataModule(SeriesDataModule):
    """A seeded synthetic multivariate series, generated in memory in milliseconds.

    Each channel is a random linear trend, daily and weekly seasonalities (hourly rows) with
    random amplitudes and phases, and Gaussian noise: structure a model can learn and that the
    naive baselines only partly capture.
    """

    default_season_length = 24

    def __init__(
        self,
        num_steps: int = 6000,
        num_channels: int = 4,
        periods: tuple[int, ...] = (24, 168),
        noise_std: float = 0.3,
        trend_scale: float = 1.0,
        generator_seed: int = 1234,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(logger=False)
        self.num_steps = num_steps
        self.generated_channels = num_channels
        self.periods = tuple(periods)
        self.noise_std = noise_std
        self.trend_scale = trend_scale
        self.generator_seed = generator_seed

    def load_series(self) -> Series:
        rng = np.random.default_rng(self.generator_seed)
        time = np.arange(self.num_steps, dtype=np.float64)[:, None]
        channels = self.generated_channels
        values = rng.normal(0, self.trend_scale, channels) * time / self.num_steps
        for period in self.periods:
            amplitude = rng.uniform(0.5, 1.5, channels)
            phase = rng.uniform(0, 2 * np.pi, channels)
            values = values + amplitude * np.sin(2 * np.pi * time / period + phase)
        values = values + rng.normal(0, self.noise_std, (self.num_steps, channels))
        return Series(values.astype(np.float32), [f"x{i}" for i in range(channels)])


class CSVSeriesDataModule(SeriesDataModule):
    """Any CSV with a date column and numeric columns; ETT with ``data=ett``.

    Offline it reads ``data_dir/file``; when the file is missing and ``url`` is set,
    ``prepare_data`` downloads it first (atomically, on one process per node). With
    ``id_column`` the file is in long format (``unique_id,ds,y``), a channel per series
    (``read_series_csv``). Missing values are refused, or filled with ``fill_missing``
    (``seqlab.data.readers.fill_missing``).
    """

    def __init__(
        self,
        data_dir: str,
        file: str,
        url: str | None = None,
        download: bool = True,
        date_column: str | None = "date",
        columns: list[str] | None = None,
        date_format: str | None = None,
        id_column: str | None = None,
        fill_missing: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_fill(fill_missing)
        self.save_hyperparameters(logger=False)
        # stored absolute, so a checkpoint rebuilds its data from any working directory
        self.hparams.data_dir = str(Path(data_dir).expanduser().resolve())
        self.path = Path(self.hparams.data_dir) / file
        self.url = url
        self.download = download
        self.date_column = date_column
        self.columns = list(columns) if columns is not None else None
        self.date_format = date_format
        self.id_column = id_column
        self.fill_missing = fill_missing

    @property
    def source(self) -> str:
        return str(self.path)

    def prepare_data(self) -> None:
        ensure_file(self.path, self.url, self.download)

    def load_series(self) -> Series:
        ensure_file(self.path, None, allow_download=False)
        series = read_series_csv(
            self.path,
            self.date_column,
            self.columns,
            self.date_format,
            self.id_column,
            missing=self.fill_missing is not None,
        )
        return fill_missing(series, self.fill_missing, self.source) if self.fill_missing else series
