"""Predict with a trained checkpoint: ``python predict.py ckpt_path=... [input=...] [output=...]``.

Everything comes from the checkpoint alone (a file, or the directory of a sharded FSDP, FSDP2 or
DeepSpeed checkpoint): the model, its data settings, its tokenizer and classes, its scaler.

- **classification**: one text per input line (``input=`` a file; null or ``-``: stdin); one line
  per text out, in input order: the predicted class and its probability, tab-separated
  (``positive<TAB>0.9731``). Empty lines stay empty. Texts are cleaned and encoded as training's
  were.
- **forecasting**: the next ``horizon`` steps after the end of a series, as neuralforecast's
  ``predict()``: by default the series the model was trained on (its file, read with its
  settings: columns, long format, missing values), or ``input=`` another CSV of the same layout
  whose last ``lookback`` rows are read. Out: a CSV of the timestamps (the series' median spacing
  after its last one; without dates, the step numbers) and one column per channel forecast (the
  target alone under ``data.features=MS``), on the data's own scale.

Translation: translate.py.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import sys
import tempfile
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from seqlab.data.readers import Series
from seqlab.data.text_base import FlatSequences
from seqlab.data.text_readers import clean_text
from seqlab.data.tokenization import encode, tokenizer_from_json
from seqlab.errors import ConfigError, DataError, SeqlabError
from seqlab.train import build_datamodule, to_plain
from seqlab.translate import check_output, checked_device, input_path, read_input_lines, stdout_to_stderr
from seqlab.utils.checkpoint_io import consolidate_checkpoint, data_settings, given_checkpoint, load_run_info
from seqlab.utils.files import write_text_atomic

log = logging.getLogger(__name__)

CLASSIFICATION = "seqlab.tasks.classification.ClassificationTask"
FORECASTING = "seqlab.tasks.forecasting.ForecastingTask"


def model_kind(ckpt_path: str | Path) -> str:
    """``classification`` or ``forecasting``: what a checkpoint's model predicts (read from its
    run information alone, before any input); a translation model is sent to translate.py."""
    info = load_run_info(Path(ckpt_path))
    task_cls = get_class(info["task_target"])
    if hasattr(task_cls, "generate"):
        raise ConfigError(
            f"ckpt_path={str(ckpt_path)!r} is a translation model: translate with "
            f"python translate.py ckpt_path={ckpt_path} input=..."
        )
    for kind, target in (("classification", CLASSIFICATION), ("forecasting", FORECASTING)):
        if issubclass(task_cls, get_class(target)):
            return kind
    raise ConfigError(
        f"ckpt_path={str(ckpt_path)!r} is a {task_cls.__name__} checkpoint: predict.py takes "
        "classification and forecasting models"
    )


def load_model(ckpt_path: str | Path, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """(task in eval mode, the checkpoint's run information), from a file or a sharded directory
    (gathered into a temporary file, removed once loaded)."""
    given = Path(ckpt_path).expanduser().resolve()
    with tempfile.TemporaryDirectory(prefix="seqlab-predict-") as scratch:
        path = consolidate_checkpoint(given, Path(scratch) / "consolidated.ckpt")
        info = load_run_info(path)
        task = get_class(info["task_target"]).load_from_checkpoint(
            path, map_location=device, weights_only=True
        )
    return task.eval(), info


@torch.no_grad()
def classify_texts(task, info: dict[str, Any], texts: list[str], batch_size: int = 64) -> list[str]:
    """``label<TAB>probability`` of every text in order ("" for an empty line), batched by length,
    padded and masked as training's batches are."""
    artifacts = info.get("data_artifacts") or {}
    tokenizer = tokenizer_from_json(artifacts["tokenizer"])
    names = list(artifacts.get("class_names") or artifacts["classes"])
    outputs = [""] * len(texts)
    todo = [i for i, text in enumerate(texts) if clean_text(text)]
    if not todo:  # no text at all (an empty file, blank lines): as many empty lines
        return outputs
    ids = encode(tokenizer, [clean_text(texts[i]) for i in todo])
    empty = [todo[k] + 1 for k, seq in enumerate(ids) if not seq]
    if empty:  # only without [CLS] (data.tokenizer.wrap=none)
        raise DataError(
            f"input line {empty[0]}: the text encodes to no tokens ({len(empty)} such lines); this "
            "model (data.tokenizer.wrap=none) cannot read no tokens"
        )
    by_length = torch.tensor(sorted(range(len(todo)), key=lambda k: len(ids[k])), dtype=torch.long)
    batches = list(by_length.split(batch_size))
    device = next(task.parameters()).device
    for rows, (input_ids, pad_mask) in zip(batches, FlatSequences.from_lists(ids).padded_batches(batches)):
        probs = task(input_ids.to(device), pad_mask.to(device)).float().softmax(-1)
        best, label = probs.max(-1)
        for k, p, c in zip(rows.tolist(), best.tolist(), label.tolist()):
            outputs[todo[k]] = f"{names[c]}\t{p:.4f}"
    return outputs


#: ``+data.<key>=`` a forecaster's predictions may change: where its file is and how it is read
#: (the window, the channels and the scaling are the model's)
FORECAST_DATA_KEYS = ("data_dir", "file", "url", "download", "date_format", "fill_missing")


def add_months(stamp: datetime, months: int) -> datetime:
    """``stamp`` ``months`` calendar months on (the day kept, or the month's last where it has
    fewer days; a month's last day stays its last)."""
    import calendar

    year, month = divmod(stamp.month - 1 + months, 12)
    year, month = stamp.year + year, month + 1
    last = calendar.monthrange(year, month)[1]
    day = last if stamp.day == calendar.monthrange(stamp.year, stamp.month)[1] else min(stamp.day, last)
    return stamp.replace(year=year, month=month, day=day)


def future_stamps(series: Series, horizon: int, where: str) -> list[datetime]:
    """The ``horizon`` timestamps after ``stamps``: by calendar months for a monthly series, by
    weekdays for a daily one without weekend days (business days), else by the median step."""
    stamps, steps = series.timestamps or [], series.steps()
    if not len(steps):
        raise DataError(f"{where}: one timestamp; the spacing of the forecast's steps is not known")
    days = steps / 86400
    if np.all((days >= 28) & (days <= 31)):
        return [add_months(stamps[-1], k + 1) for k in range(horizon)]
    usual = float(np.median(steps))
    if usual == 86400 and len(stamps) >= 7 and all(stamp.weekday() < 5 for stamp in stamps):
        out, stamp = [], stamps[-1]
        while len(out) < horizon:
            stamp += timedelta(days=1)
            if stamp.weekday() < 5:
                out.append(stamp)
        return out
    if np.any((steps > 1.5 * usual) | (steps < 0.75 * usual)):
        log.warning("%s: its timestamps are not evenly spaced; the forecast's follow the median step", where)
    return [stamps[-1] + timedelta(seconds=usual) * (k + 1) for k in range(horizon)]


@torch.no_grad()
def forecast_series(
    task,
    info: dict[str, Any],
    source: str | None = None,
    data: dict[str, Any] | None = None,
    output: str | None = None,
) -> str:
    """The CSV of the ``horizon`` steps after the series' end: the training series (its file,
    or the synthetic series regenerated), or ``source``, a CSV of the same layout. ``data``:
    ``+data.<key>=`` overrides (``FORECAST_DATA_KEYS``); ``output``: the file to be written,
    refused where it is the file read."""
    hp = task.hparams
    fixed = sorted(set(data or {}) - set(FORECAST_DATA_KEYS))
    if fixed:
        raise ConfigError(
            f"{', '.join(f'+data.{key}' for key in fixed)}: the model fixes it (its window, channels and "
            f"scaling); predict.py takes {', '.join(f'+data.{key}' for key in FORECAST_DATA_KEYS)}"
        )
    settings = data_settings(info, data or {})
    if source == "-":
        raise ConfigError(
            "input='-': a forecasting model reads a CSV file; give its path, or leave input unset to "
            "forecast after the end of the series it was trained on"
        )
    if source is not None:
        if "file" not in settings:
            raise ConfigError(
                f"input={source!r}: this model was trained on {str(settings.get('_target_')).rsplit('.', 1)[-1]}, "
                "which reads no file; leave input unset to forecast after the end of its series"
            )
        path = input_path(source).resolve()
        settings.update(data_dir=str(path.parent), file=path.name)
    datamodule = build_datamodule(settings, prepare=False)
    read, written = getattr(datamodule, "path", None), Path(output).expanduser() if output else None
    if read is not None and written is not None and written.exists() and written.samefile(read):
        raise ConfigError(
            f"output={output!r} is the file the forecast reads ({read}): it would be replaced by the "
            "forecast; write to another file"
        )
    datamodule.follow_model(hp)  # the same channels in another order (a long file's ids): the model's
    series = datamodule.model_series()
    where = getattr(datamodule, "source", "the series")
    names = list(hp.channel_names)
    if list(series.columns) != names:
        raise DataError(f"{where}: columns {series.columns}, but the model was trained on {names}")
    if len(series.values) < hp.lookback:
        raise DataError(
            f"{where}: {len(series.values)} rows, fewer than the model's look-back of {hp.lookback} "
            "(data.lookback): it forecasts from the last look-back rows"
        )
    stats = task.scaler_statistics()
    mean, std = stats["scaler_mean"].numpy(), stats["scaler_std"].numpy()
    window = (series.values[-hp.lookback :] - mean) / std
    device = next(task.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32))[None].to(device)
    # [H, C] on the data's scale: every channel, or the target alone (data.features=MS)
    channels = task.forecast_channels
    out = task(x)[0].float().cpu().numpy() * std[channels] + mean[channels]
    columns = series.columns[channels]
    buffer = io.StringIO()
    date_column = settings.get("date_column") or "date"
    if series.timestamps:
        future = future_stamps(series, hp.horizon, where)
        date_format = settings.get("date_format")
        if date_format:  # written as the file writes its dates, so it reads back
            stamps = [stamp.strftime(date_format) for stamp in future]
        elif all(stamp.time() == time(0) for stamp in series.timestamps):  # dates alone
            stamps = [stamp.date().isoformat() for stamp in future]
        else:
            stamps = [str(stamp) for stamp in future]
        header = [date_column, *columns]
    else:
        stamps = [str(len(series.values) + k) for k in range(hp.horizon)]
        header = ["step", *columns]
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for stamp, row in zip(stamps, out):
        writer.writerow([stamp, *(f"{float(v):.7g}" for v in row)])
    return buffer.getvalue()


def run(cfg: DictConfig) -> None:
    try:
        ckpt_path = given_checkpoint(cfg, "predict.py")
        batch_size = cfg.get("batch_size")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r}: expected a positive integer")
        source = cfg.get("input")
        check_output(cfg.get("output"), source, "it would be replaced by the predictions")
        kind = model_kind(ckpt_path)  # refused (a translation model) before stdin is read
        data = to_plain(cfg.get("data") or {})
        if kind == "classification" and data:
            raise ConfigError(
                f"{', '.join(f'+data.{key}' for key in sorted(data))}: a classifier's predictions take "
                "nothing from the data settings (its tokenizer and classes are the checkpoint's)"
            )
        texts = read_input_lines(source) if kind == "classification" else None
        device = checked_device(cfg.get("device"))
        with stdout_to_stderr() if not cfg.get("output") else contextlib.nullcontext():
            task, info = load_model(ckpt_path, device)
            if texts is not None:
                text = "".join(f"{line}\n" for line in classify_texts(task, info, texts, batch_size))
            else:
                text = forecast_series(task, info, source, data, cfg.get("output"))
        if cfg.get("output"):
            write_text_atomic(Path(cfg.output).expanduser(), text)
            log.info("predictions written to %s", cfg.output)
        else:
            sys.stdout.write(text)
    except SeqlabError as err:
        log.error("%s: %s", type(err).__name__, err)
        raise SystemExit(1) from None
