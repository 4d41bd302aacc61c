"""Forecasting: a look-back window of C channels -> the next H steps, through any backbone.

Pipeline: reversible instance normalisation (RevIN, Kim et al. 2022) -> optional channel
independence (each channel its own sequence, weights shared, as in PatchTST) -> patches of
``patch_len`` steps embedded to ``d_model`` tokens -> ``backbone.encode`` -> a direct multi-step
head (all H steps at once) -> de-normalisation.

Metrics are MSE/MAE on the dataset's z-scored scale (the published protocol) and on the original
scale, with the repeat-last and seasonal-naive baselines on the same test windows.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from seqlab.data.samplers import EvalShardSampler
from seqlab.errors import ConfigError, DataError
from seqlab.tasks.base import SeqTask, build_backbone, check_probability, mean_loss
from seqlab.utils.distributed import gather_indexed
from seqlab.utils.figures import log_figure, log_table

log = logging.getLogger(__name__)

HEADS = ("flatten", "mean", "last")
PADDING_PATCHES = ("end", None)


class RevIN(nn.Module):
    """Per-window, per-channel normalisation that the head's output is mapped back through."""

    def __init__(self, num_channels: int, affine: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def normalize(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        mean = x.mean(dim=1, keepdim=True).detach()
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps).detach()
        x = (x - mean) / std
        if self.weight is not None:
            x = x * self.weight + self.bias
        return x, (mean, std)

    def denormalize(self, x: Tensor, stats: tuple[Tensor, Tensor], channels: slice = slice(None)) -> Tensor:
        """``x``: the normalised ``channels`` of the windows ``stats`` were taken from."""
        if self.weight is not None:
            x = (x - self.bias[channels]) / (self.weight[channels] + self.eps * self.eps)
        mean, std = stats
        return x * std[..., channels] + mean[..., channels]


#: test windows whose first-step forecast is saved (tables/test_first_predictions.csv) for compare.py
FIRST_WINDOWS = 50


def metric_set(prefix: str) -> MetricCollection:
    return MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError()}, prefix=prefix)


def spread(total: int, count: int) -> list[int]:
    """``count`` indices of ``range(total)`` spread evenly, first and last included."""
    if total <= 0 or count <= 0:
        return []
    if count == 1 or total == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


class ForecastingTask(SeqTask):
    """Direct multi-step forecaster around any backbone's ``encode``.

    Args:
        backbone: the backbone's plain config (``_target_`` and arguments), from ``model=``.
        num_channels, lookback, horizon, baseline_season, channel_names, scaler_mean, scaler_std,
            target_channel, target_only: from the datamodule (``task_kwargs()``), never set by hand
            (``target_channel``: the channel the report plots and tabulates, ``data.target``;
            ``target_only``: ``data.features=MS``, every channel in and that channel alone out).
        patch_len, patch_stride: steps per input token and the step between tokens
            (1 and 1 give one token per time step).
        padding_patch: ``end`` (PatchTST's): the series is extended by one stride of its last
            value, so the last steps get a full patch (one token more: 1/1 repeats the last step);
            null: the patches of the look-back alone.
        channel_independence: model each channel as its own univariate sequence.
        revin, revin_affine: reversible instance normalisation, with learnable affine terms.
        head: ``flatten`` (all tokens -> H steps), ``mean`` or ``last`` (one pooled token -> H steps).
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        num_channels: int,
        lookback: int,
        horizon: int,
        baseline_season: int | None = None,
        channel_names: list[str] | None = None,
        scaler_mean: list[float] | None = None,
        scaler_std: list[float] | None = None,
        patch_len: int = 16,
        patch_stride: int = 8,
        padding_patch: str | None = "end",
        channel_independence: bool = True,
        revin: bool = True,
        revin_affine: bool = False,
        head: str = "flatten",
        head_dropout: float = 0.0,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        monitor: str = "val/mse",
        monitor_mode: str | None = "min",
        plot_samples: int = 4,
        target_channel: int = -1,
        target_only: bool = False,
    ) -> None:
        super().__init__(monitor=monitor, monitor_mode=monitor_mode)
        self.save_hyperparameters(logger=False)
        check_probability("task.head_dropout", head_dropout)
        if padding_patch not in PADDING_PATCHES:
            raise ConfigError(
                f"task.padding_patch={padding_patch!r}: expected one of {list(PADDING_PATCHES)}"
            )
        if head not in HEADS:
            raise ConfigError(f"task.head={head!r}: expected one of {list(HEADS)}")
        if patch_len < 1 or patch_stride < 1 or patch_len > lookback:
            raise ConfigError(
                f"task.patch_len={patch_len} and task.patch_stride={patch_stride} must be >= 1 "
                f"and patch_len <= data.lookback={lookback}"
            )
        if target_only and channel_independence:
            raise ConfigError(
                "data.features=MS with task.channel_independence=true: each channel would be read as a "
                "sequence of its own, so the other channels would never reach the target's forecast "
                "(that is data.features=S); add task.channel_independence=false"
            )
        self.backbone = build_backbone(backbone)
        width = self.backbone.d_model
        channels_in = 1 if channel_independence else num_channels
        #: the channels forecast, of the C read: all, or the target's alone (data.features=MS)
        self.forecast_channels = slice(None)
        if target_only:
            target = target_channel % num_channels
            self.forecast_channels = slice(target, target + 1)
        self.channels_out = 1 if target_only else channels_in
        # PatchTST pads the end by one stride so that the last steps get a full patch
        self.padding = patch_stride if padding_patch == "end" else 0
        self.num_tokens = (lookback + self.padding - patch_len) // patch_stride + 1
        self.revin = RevIN(num_channels, revin_affine) if revin else None
        self.embed = nn.Linear(patch_len * channels_in, width)
        head_in = width * self.num_tokens if head == "flatten" else width
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(head_in, horizon * self.channels_out))
        for name, value in self.scaler_statistics().items():
            self.register_buffer(name, value, persistent=False)
        # epoch-level values go through torchmetrics, which reduce across processes themselves
        self.val_loss = mean_loss()
        self.val_metrics = metric_set("val/")
        self.test_metrics = metric_set("test/")
        self.test_orig_metrics = metric_set("test/orig_")
        self.baseline_metrics = nn.ModuleDict({"last": metric_set("test/baseline_last_")})
        self.use_baseline_season(baseline_season)
        #: (window, (inputs, targets, forecast)) of the windows the report plots, on the host
        self._plot_rows: list[tuple[int, tuple[Tensor, Tensor, Tensor]]] = []
        self._plot_windows: set[int] = set()
        self._seen = 0  # test windows this process has evaluated this epoch
        #: what the test adds to summary.json: the windows the predictions figure shows
        self.test_report: dict[str, Any] = {}
        # (window, (truth, forecast)) of the first forecast step of the target, first test windows
        self._first_windows: list[tuple[int, tuple[float, float]]] = []

    # ------------------------------------------------------------------ model
    def check_trainable(self) -> None:
        # at training only (train.py, before it writes anything): a checkpoint trained so before
        # this check still evaluates
        hp = self.hparams
        if hp.revin_affine and not hp.revin:  # it was ignored
            raise ConfigError(
                "task.revin_affine=true with task.revin=false: the affine terms are RevIN's; set "
                "task.revin=true, or task.revin_affine=false"
            )
        if hp.patch_len < hp.patch_stride:
            raise ConfigError(
                f"task.patch_len={hp.patch_len} < task.patch_stride={hp.patch_stride}: the "
                f"{hp.patch_stride - hp.patch_len} steps between patches would never reach the model; "
                "use patch_len >= patch_stride"
            )
        uncovered = (hp.lookback - hp.patch_len) % hp.patch_stride if not self.padding else 0
        if uncovered:  # the latest steps, the ones that matter most
            raise ConfigError(
                f"task.padding_patch=null: patches of {hp.patch_len} steps every {hp.patch_stride} leave "
                f"the last {uncovered} of data.lookback={hp.lookback} steps out; use task.padding_patch=end "
                "or a look-back that the patches tile"
            )
        keep = getattr(self.backbone, "tbptt_steps", None)
        if keep is not None and keep >= self.num_tokens:  # it would truncate nothing, silently
            raise ConfigError(
                f"model.tbptt_steps={keep} counts the encoder's steps, which are patch tokens here: "
                f"the look-back of {hp.lookback} in patches of {hp.patch_len} (stride "
                f"{hp.patch_stride}) is {self.num_tokens} tokens, so nothing would be truncated; use "
                f"model.tbptt_steps < {self.num_tokens}, or task.patch_len=1 task.patch_stride=1 to "
                "step through time"
            )

    def forward(self, x: Tensor) -> Tensor:
        """x [B, L, C] on the dataset scale -> forecast [B, H, C] (``target_only``: [B, H, 1])."""
        batch, length, channels = x.shape
        hp = self.hparams
        if length != hp.lookback or channels != hp.num_channels:
            raise DataError(
                f"input windows of {length} steps x {channels} channels, but this model was built for "
                f"data.lookback={hp.lookback} steps x {hp.num_channels} channels (its head's size depends "
                "on both): evaluate with the data settings it was trained with"
            )
        stats = None
        if self.revin is not None:
            x, stats = self.revin.normalize(x)
        if hp.channel_independence:  # [B, L, C] -> [B*C, L, 1]
            x = x.permute(0, 2, 1).reshape(batch * channels, -1, 1)
        series = x.transpose(1, 2)  # [B', C', L]
        if self.padding:
            series = F.pad(series, (0, self.padding), mode="replicate")  # [B', C', L + S]
        patches = series.unfold(-1, hp.patch_len, hp.patch_stride)  # [B', C', N, P]
        # the model's precision (bf16-true, DeepSpeed): cast here, after RevIN's statistics (convert_batch)
        tokens = self.embed(patches.permute(0, 2, 1, 3).flatten(2).to(self.embed.weight.dtype))  # [B', N, D]
        states = self.backbone.encode(tokens)
        # "last" of a bidirectional encoder: each direction's summary (Backbone.pool; a right-to-left
        # direction at the last token has read only that patch)
        pooled = states.flatten(1) if hp.head == "flatten" else self.backbone.pool(states, None, hp.head)
        out = self.head(pooled).view(-1, hp.horizon, self.channels_out)
        if hp.channel_independence:  # [B*C, H, 1] -> [B, H, C]
            out = out.view(batch, channels, hp.horizon).transpose(1, 2)
        if stats is not None:
            out = self.revin.denormalize(out, stats, self.forecast_channels)
        return out.contiguous()

    def scaler_statistics(self) -> dict[str, Tensor]:
        """The data scaler's per-channel mean and std (float32; identity without a scaler)."""
        hp = self.hparams
        mean = hp.scaler_mean if hp.scaler_mean is not None else [0.0] * hp.num_channels
        std = hp.scaler_std if hp.scaler_std is not None else [1.0] * hp.num_channels
        # float32 whatever the default dtype (bf16-true makes it bf16 inside the steps)
        return {
            name: torch.tensor(v, dtype=torch.float32)
            for name, v in (("scaler_mean", mean), ("scaler_std", std))
        }

    def use_baseline_season(self, season: int | None) -> None:
        """The seasonal-naive baseline's period in steps (None or one longer than the look-back,
        which must hold a full season: no seasonal baseline)."""
        lookback, horizon = self.hparams.lookback, self.hparams.horizon
        season = season if season and 1 <= season <= lookback else None
        self.baseline_season = season
        if season:  # seasonal naive: step h repeats step L - s + (h mod s)
            index = lookback - season + torch.arange(horizon) % season
            self.register_buffer("seasonal_index", index, persistent=False)
            self.baseline_metrics["seasonal"] = metric_set("test/baseline_seasonal_")
        elif "seasonal" in self.baseline_metrics:
            del self.baseline_metrics["seasonal"]

    def adopt_data(self, data: dict[str, Any]) -> None:
        """Evaluated on other data than it was trained on (``eval.py data.file=...``): that data's
        scaler maps the forecasts back to its original scale, its names label the report, and its
        period is the seasonal baseline's (a day of ETTm1's rows is 96, of ETTh1's 24)."""
        hp = self.hparams
        names = data.get("channel_names")
        if (
            names
            and hp.channel_names
            and list(names) != list(hp.channel_names)
            and sorted(names) == sorted(hp.channel_names)
        ):
            raise ConfigError(
                f"the data's channels {list(names)} are the model's in another order ({list(hp.channel_names)}): "
                "it reads each channel by its place; give data.columns in the model's order"
            )
        then, now = (hp.scaler_mean, hp.scaler_std), (data.get("scaler_mean"), data.get("scaler_std"))
        if None not in (*then, *now) and len(then[0]) == len(now[0]):
            names = data.get("channel_names") or hp.channel_names or list(range(len(now[0])))
            differ = [
                f"{names[i]} (mean {then[0][i]:.6g}, std {then[1][i]:.6g} then; {now[0][i]:.6g}, {now[1][i]:.6g} now)"
                for i in range(len(now[0]))
                if not (
                    math.isclose(then[0][i], now[0][i], rel_tol=1e-4, abs_tol=1e-4 * now[1][i])
                    and math.isclose(then[1][i], now[1][i], rel_tol=1e-4)
                )
            ]
            if differ:  # other data, or a scaler fitted otherwise (a constant channel's std is 1 now)
                log.warning(
                    "the data's scaler differs from the one the model was trained with in %d channel(s): "
                    "%s; the model's inputs there are scaled otherwise than in training, and "
                    "original-scale metrics use the data's scaler", len(differ), "; ".join(differ[:5]),
                )  # fmt: skip
        if data.get("target_only", False) != hp.target_only or (
            hp.target_only and data.get("target_channel", hp.target_channel) != hp.target_channel
        ):
            names = hp.channel_names or [f"channel {i}" for i in range(hp.num_channels)]
            if hp.target_only:
                trained = f"channel {names[hp.target_channel]!r} alone (data.features=MS)"
            elif hp.num_channels == 1:  # the only channel read
                trained = f"channel {names[0]!r} alone (data.features=S)"
            else:
                trained = "every channel (data.features=M)"
            raise ConfigError(
                f"this model forecasts {trained}: evaluate it with the data.features and data.target it "
                "was trained with"
            )
        for key in ("scaler_mean", "scaler_std", "channel_names", "target_channel", "baseline_season"):
            if key in data:
                hp[key] = data[key]
        for name, value in self.scaler_statistics().items():
            setattr(self, name, value.to(getattr(self, name).device))
        if "baseline_season" in data:
            self.use_baseline_season(data["baseline_season"])

    def to_original_scale(self, x: Tensor, channels: slice = slice(None)) -> Tensor:
        """``x``: the ``channels`` (``self.forecast_channels``: those forecast) of windows on the dataset's scale."""
        if self.scaler_std.dtype != torch.float32:
            # a precision that casts the model (bf16-true, DeepSpeed's engine) rounded these data
            # statistics with it: rebuilt from the data's, once
            for name, value in self.scaler_statistics().items():
                setattr(self, name, value.to(self.scaler_std.device))
        return x.float() * self.scaler_std[channels] + self.scaler_mean[channels]

    def convert_batch(self, batch: tuple[Tensor, Tensor], convert: Any) -> tuple[Tensor, Tensor]:
        """Nothing cast: ``forward`` casts the inputs to the model's dtype once RevIN has
        normalised them in float32; targets, and the baselines' inputs, stay the data's."""
        return batch

    # ------------------------------------------------------------------ steps
    def step_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        return F.mse_loss(self(inputs), targets)

    def batch_tokens(self, batch: tuple[Tensor, Tensor]) -> int:
        inputs = batch[0]
        sequences = inputs.shape[0] * (inputs.shape[2] if self.hparams.channel_independence else 1)
        return sequences * self.num_tokens

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        preds = self(inputs)
        # weighted by the batch's size: the mean over windows, however they are batched
        self.val_loss.update(F.mse_loss(preds, targets), weight=len(targets))
        self.val_metrics.update(preds, targets)

    def on_validation_epoch_end(self) -> None:
        values = {"val/loss": self.val_loss.compute(), **self.val_metrics.compute()}
        self.log_dict(values, prog_bar=True, sync_dist=True)  # already reduced: silences Lightning's hint
        self.val_loss.reset()
        self.val_metrics.reset()
        self.log_monitor_best(values)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        preds = self(inputs)
        self.test_metrics.update(preds, targets)
        out, horizon = self.forecast_channels, self.hparams.horizon
        self.test_orig_metrics.update(
            self.to_original_scale(preds, out), self.to_original_scale(targets, out)
        )
        self.baseline_metrics["last"].update(inputs[:, -1:, out].repeat(1, horizon, 1), targets)
        if self.baseline_season:
            self.baseline_metrics["seasonal"].update(inputs[:, self.seasonal_index, out], targets)
        # process r of N evaluates windows r, r + N, r + 2N, ... (EvalShardSampler), in order
        world, rank = self.trainer.world_size, self.trainer.global_rank
        windows = range(rank + self._seen * world, rank + (self._seen + len(inputs)) * world, world)
        self._seen += len(inputs)
        for row, window in enumerate(windows):
            if window in self._plot_windows:
                # copies of the rows alone (a view would keep, and pickle, its whole batch)
                rows = (inputs[row], targets[row], preds[row])
                self._plot_rows.append((window, tuple(t.detach().cpu().clone() for t in rows)))
        missing = -(-FIRST_WINDOWS // world) - len(self._first_windows)
        if missing > 0:
            channel = self.forecast_index
            truth = self.to_original_scale(targets[:missing, :1], out)[:, 0, channel].float().tolist()
            forecast = self.to_original_scale(preds[:missing, :1], out)[:, 0, channel].float().tolist()
            self._first_windows += list(zip(windows, zip(truth, forecast)))

    @property
    def forecast_index(self) -> int:
        """Where the target channel is in a forecast (the first and only under ``target_only``)."""
        return 0 if self.hparams.target_only else self.hparams.target_channel

    def on_test_epoch_start(self) -> None:
        # the windows plotted: spread evenly over those evaluated, whatever the number of processes
        self._seen, self._plot_rows = 0, []
        loader = self.trainer.test_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        batches = self.trainer.num_test_batches[0] if self.trainer.num_test_batches else float("inf")
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, EvalShardSampler):
            evaluated = sampler.evaluated(None if batches == float("inf") else int(batches))
        else:
            evaluated = range(len(loader.dataset) if hasattr(loader, "dataset") else 0)
        self._plot_windows = {evaluated[i] for i in spread(len(evaluated), self.hparams.plot_samples)}
        if self.hparams.baseline_season and not self.baseline_season and self.trainer.is_global_zero:
            log.warning(
                "no seasonal-naive baseline: its season of %d steps is longer than data.lookback=%d",
                self.hparams.baseline_season, self.hparams.lookback,
            )  # fmt: skip

    def on_test_epoch_end(self) -> None:
        for metrics in (self.test_metrics, self.test_orig_metrics, *self.baseline_metrics.values()):
            self.log_dict(metrics.compute(), sync_dist=True)
            metrics.reset()
        plotted = gather_indexed(self._plot_rows)  # every process's share, in window order
        if plotted and self.trainer.is_global_zero:
            self.plot_predictions(*(torch.stack(column) for column in zip(*(rows for _, rows in plotted))))
        self.test_report = {"plotted_windows": [window for window, _ in plotted]}
        # the first test windows of all processes: compare.py overlays the backbones' forecasts
        first = gather_indexed(self._first_windows)[:FIRST_WINDOWS]
        if first and self.trainer.is_global_zero:
            rows = [[window, truth, forecast] for window, (truth, forecast) in first]
            log_table(self.trainer, "test/first_predictions", ["window", "truth", "prediction"], rows)
        self._plot_rows, self._first_windows = [], []

    # ------------------------------------------------------------------ report
    def plot_predictions(self, inputs: Tensor, targets: Tensor, preds: Tensor) -> Path | None:
        """Look-back, truth and forecast of the target channel (``data.target``; the last one without
        a target) on the original scale."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        channel = self.hparams.target_channel
        names = self.hparams.channel_names or [f"channel {i}" for i in range(self.hparams.num_channels)]
        device = self.scaler_std.device  # the rows come gathered on the host; the scaler is the model's
        inputs = self.to_original_scale(inputs.to(device)).cpu()
        targets, preds = (
            self.to_original_scale(t.to(device), self.forecast_channels).cpu() for t in (targets, preds)
        )
        out = self.forecast_index
        lookback, horizon = inputs.shape[1], targets.shape[1]
        fig, axes = plt.subplots(len(inputs), 1, figsize=(9, 2.2 * len(inputs)), squeeze=False)
        for i, ax in enumerate(axes[:, 0]):
            ax.plot(range(lookback), inputs[i, :, channel], color="0.4", label="look-back")
            future = range(lookback, lookback + horizon)
            ax.plot(future, targets[i, :, out], color="tab:blue", label="truth")
            ax.plot(future, preds[i, :, out], color="tab:orange", label="forecast")
            ax.axvline(lookback - 0.5, color="0.8", linewidth=1)
            if i == 0:
                ax.legend(loc="upper left", fontsize=8)
                ax.set_title(f"test windows, channel {names[channel]!r}")
        fig.tight_layout()
        return log_figure(self.trainer, fig, "test/predictions")
