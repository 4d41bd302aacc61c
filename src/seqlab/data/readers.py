"""Readers of raw data files into arrays, with errors that name the file, line, column and value."""

from __future__ import annotations

import contextlib
import csv
import gzip
import itertools
import logging
import math
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from seqlab.data.text_readers import separator_hint
from seqlab.errors import ConfigError, DataError
from seqlab.utils.files import atomic_file, directory_lock

DATE_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d", "%Y/%m/%d %H:%M", "%Y/%m/%d")

log = logging.getLogger(__name__)


@dataclass
class Series:
    """A multivariate time series: ``values[time, channel]`` with channel names and timestamps."""

    values: np.ndarray
    columns: list[str]
    timestamps: list[datetime] | None = None

    def steps(self) -> np.ndarray:
        """Seconds between consecutive timestamps, by calendar arithmetic: dates without a zone are
        not read as local time (where clocks change, an hour would be a step of 0 or 2 hours)."""
        stamps = self.timestamps or []
        return np.array([(b - a).total_seconds() for a, b in itertools.pairwise(stamps)], dtype=np.float64)

    @property
    def rows_per_day(self) -> float | None:
        """Sampling rate inferred from the median spacing of the timestamps."""
        if not self.timestamps or len(self.timestamps) < 2:
            return None
        step = float(np.median(self.steps()))
        return 86400.0 / step if step > 0 else None

    def irregular(self) -> list[int]:
        """Rows ``i`` after which the series skips time (the step to row ``i + 1`` is more than 1.5
        times the usual, median, step: rows are missing there; a monthly series' 28-31 days are
        one step), repeats it (a step of 0) or leaves its grid (a step under 0.75 times the usual:
        a row off the hour in hourly data, a finer-grained stretch)."""
        if not self.timestamps or len(self.timestamps) < 3:
            return []
        steps = self.steps()
        usual = np.median(steps)
        return [int(i) for i in np.flatnonzero((steps > 1.5 * usual) | (steps < 0.75 * usual) | (steps == 0))]


FLOAT32_MAX = float(np.finfo(np.float32).max)


def parse_date(text: str, path: Path, line: int, date_format: str | None) -> datetime:
    if date_format:
        try:
            return datetime.strptime(text, date_format)
        except ValueError:
            raise DataError(
                f"{path}, line {line}: date {text!r} does not match data.date_format={date_format!r}"
            ) from None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        pass
    for fmt in DATE_FORMATS:
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            continue
    raise DataError(
        f"{path}, line {line}: cannot parse date {text!r}; expected ISO 8601 such as "
        "'2016-07-01 00:00:00', or set data.date_format (a strptime pattern)"
    )


#: cells read as a missing value under ``data.fill_missing`` (pandas' ``read_csv`` reads these
#: among others; an empty cell is the usual one)
MISSING_CELLS = frozenset({"", "nan", "NaN", "NAN", "NA", "N/A", "n/a", "null", "NULL", "None"})
FILLS = ("ffill", "linear", "zero")
FILL_HINT = "fill or drop missing values first, or set data.fill_missing (one of ffill, linear, zero)"


def parse_value(
    cell: str, path: Path, line: int, name: str, text_hint: str = "", missing: bool = False
) -> float:
    """A value cell as a float: empty cells, text (``text_hint`` appended), NaN, infinities and
    values beyond float32 are errors naming the line and column; with ``missing``, an empty or
    NaN cell (``MISSING_CELLS``) is NaN, to be filled."""
    cell = cell.strip()
    if missing and cell in MISSING_CELLS:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        what = (
            f"is {'empty (a missing value)' if not cell else 'a missing value'}; {FILL_HINT}"
            if cell in MISSING_CELLS
            else f"is not a number{text_hint}"
        )
        raise DataError(f"{path}, line {line}, column {name!r}: {cell!r} {what}") from None
    if not math.isfinite(value):
        raise DataError(
            f"{path}, line {line}, column {name!r}: value {cell!r} is not finite "
            f"(NaN or infinite); {FILL_HINT}"
        )
    if abs(value) > FLOAT32_MAX:  # stored as float32: it would become infinite
        raise DataError(
            f"{path}, line {line}, column {name!r}: value {cell!r} is beyond float32's "
            f"range (|x| <= {FLOAT32_MAX:.4g}); rescale the column"
        )
    return value


def read_series_csv(
    path: str | Path,
    date_column: str | None = "date",
    columns: list[str] | None = None,
    date_format: str | None = None,
    id_column: str | None = None,
    missing: bool = False,
) -> Series:
    """Read a CSV with a date column and numeric columns (ETT, weather, electricity, ...).

    ``columns`` selects and orders the value columns; by default every column but the date (and
    the id). Empty cells, text, NaN and infinite values are errors naming the line and column.
    With ``id_column`` the file is in long format (neuralforecast's ``unique_id,ds,y``: one row per
    series and time, in any order): each series becomes a channel (``<id>``, or ``<id>/<column>``
    with several value columns), in the order the ids first appear; every series needs a row at
    every time of the file. With ``missing``, empty and NaN cells, and a long-format series' absent
    times, are NaN, for ``fill_missing`` to fill.
    """
    path = Path(path)
    if id_column is not None and id_column == date_column:
        raise ConfigError(f"data.id_column and data.date_column are both {id_column!r}: name two columns")
    if id_column is not None and date_column is None:
        raise ConfigError(
            f"data.id_column={id_column!r} (long format) needs data.date_column: the series' rows are "
            "lined up by their times"
        )
    try:
        handle = path.open(newline="", encoding="utf-8-sig")  # a spreadsheet's byte-order mark too
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    with handle:
        try:
            reader = csv.reader(handle)
            header = next((row for row in reader if any(cell.strip() for cell in row)), None)  # (blank lines)
            if not header:
                raise DataError(f"{path} is empty: expected a header line with column names")
            header = [name.strip() for name in header]
            for key, name in (("date_column", date_column), ("id_column", id_column)):
                if name is not None and name not in header:
                    raise DataError(
                        f"{path}: no {key.split('_')[0]} column {name!r} (data.{key}); columns are {header}"
                        + separator_hint(header, ",")
                    )
            if columns is None and "" in header:
                raise DataError(
                    f"{path}: column {header.index('') + 1} has no name (a DataFrame's index written by "
                    "to_csv?); name it, drop it (to_csv(index=False)), or choose the value columns with "
                    "data.columns"
                )
            keys = [c for c in (date_column, id_column) if c is not None]
            wanted = columns if columns is not None else [c for c in header if c not in keys]
            not_found = [c for c in wanted if c not in header]
            if not_found:
                raise DataError(
                    f"{path}: column(s) {not_found} not found; columns are {header}"
                    + separator_hint(header, ",")
                )
            ambiguous = sorted({c for c in [*wanted, *keys] if header.count(c) > 1})
            if ambiguous:
                raise DataError(
                    f"{path}: the header names column(s) {ambiguous} more than once; which one is "
                    "meant is ambiguous: rename them"
                )
            repeated = sorted({c for c in wanted if wanted.count(c) > 1})
            if repeated:
                raise DataError(f"{path}: data.columns names {repeated} more than once")
            if not wanted:
                raise DataError(f"{path}: no value columns besides the columns {keys}")
            value_idx = [header.index(c) for c in wanted]
            date_idx = header.index(date_column) if date_column is not None else None
            id_idx = header.index(id_column) if id_column is not None else None
            long_hint = (
                "; several series in long format? name their id column (data.id_column=<column>)"
                if id_column is None
                else ""
            )
            text_hint = f" (a column of names{long_hint}, or choose the value columns with data.columns)"
            rows: list[list[float]] = []
            stamps: list[datetime] = []
            ids: list[str] = []
            lines: list[int] = []
            for line_no, row in enumerate(reader, start=2):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}, line {line_no}: {len(row)} fields, expected {len(header)} "
                        "(truncated or malformed line)"
                    )
                rows.append(
                    [
                        parse_value(row[idx], path, line_no, name, text_hint, missing)
                        for name, idx in zip(wanted, value_idx)
                    ]
                )
                if id_idx is not None:
                    series_id = row[id_idx].strip()
                    if not series_id:
                        raise DataError(f"{path}, line {line_no}: the id column {id_column!r} is empty")
                    ids.append(series_id)
                    lines.append(line_no)
                if date_idx is not None:
                    stamp = parse_date(row[date_idx].strip(), path, line_no, date_format)
                    try:  # splits take the earliest rows for training: the file must be in time order
                        earlier = bool(stamps) and stamp < stamps[-1]
                    except TypeError:  # one with a UTC offset, one without
                        raise DataError(
                            f"{path}, line {line_no}: date {stamp} and the previous row's {stamps[-1]}: "
                            "expected every date with a UTC offset or none without"
                        ) from None
                    if earlier and id_idx is None:
                        raise DataError(
                            f"{path}, line {line_no}: date {stamp} comes before the previous row's "
                            f"{stamps[-1]}; expected rows in time order, oldest first (several series "
                            "in long format, one after another? name their id column: data.id_column)"
                        )
                    stamps.append(stamp)
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        except csv.Error as err:
            raise DataError(f"{path}: malformed CSV ({err})") from None
    if not rows:
        raise DataError(f"{path} has a header but no data rows")
    if id_column is not None:
        return long_to_wide(path, id_column, wanted, ids, stamps, rows, lines, missing)
    return Series(np.asarray(rows, dtype=np.float32), list(wanted), stamps or None)


def long_to_wide(
    path: Path,
    id_column: str,
    wanted: list[str],
    ids: list[str],
    stamps: list[datetime],
    rows: list[list[float]],
    lines: list[int],
    missing: bool = False,
) -> Series:
    """Long-format rows (one per series and time) as one multivariate series: a channel per
    series (and value column), on the times of the file. A series without a row at one of those
    times (unless ``missing``: NaN there), or with two rows at one, is an error naming the series,
    the time and the line."""
    times = sorted(set(stamps))
    at = {stamp: i for i, stamp in enumerate(times)}
    order = list(dict.fromkeys(ids))
    slot = {series_id: i for i, series_id in enumerate(order)}
    width = len(wanted)
    values = np.full((len(times), len(order) * width), np.nan if missing else 0.0, dtype=np.float32)
    seen = np.zeros((len(times), len(order)), dtype=np.int64)  # the line that filled it (0: none)
    for series_id, stamp, row, line in zip(ids, stamps, rows, lines):
        t, s = at[stamp], slot[series_id]
        if seen[t, s]:
            raise DataError(
                f"{path}, line {line}: series {series_id!r} ({id_column}) has a second row at {stamp} "
                f"(the first on line {seen[t, s]}); keep one row per series and time"
            )
        seen[t, s] = line
        values[t, s * width : (s + 1) * width] = row
    for s, series_id in enumerate(order):
        absent = np.flatnonzero(seen[:, s] == 0)
        if len(absent) and not missing:
            raise DataError(
                f"{path}: series {series_id!r} ({id_column}) has no row at {len(absent)} of the file's "
                f"{len(times)} times, first {times[absent[0]]}; every series is a channel of one "
                "multivariate series, on one time axis: give each series a row at every time, keep "
                "the series that cover the same span, or fill the absent times with "
                "data.fill_missing (one of ffill, linear, zero)"
            )
    names = order if width == 1 else [f"{series_id}/{column}" for series_id in order for column in wanted]
    log.info("%s: %d series (%s) of %d times, in long format", path, len(order), id_column, len(times))
    return Series(values, names, times)


def check_fill(how: str | None) -> None:
    """``data.fill_missing`` is null or one of ``FILLS``."""
    if how is not None and how not in FILLS:
        raise ConfigError(
            f"data.fill_missing={how!r}: expected null (refuse missing values) or one of {list(FILLS)}"
        )


def fill_missing(series: Series, how: str, source: str) -> Series:
    """``series`` with its NaN values filled, channel by channel: ``ffill`` carries the last value
    forward (the past only, except before a channel's first value: those rows take that value, a
    later one, with a warning naming the channel), ``linear`` interpolates between the neighbours
    in time (the ends held), ``zero`` writes 0. The counts are logged; a channel with no value at
    all is an error."""
    check_fill(how)
    values = series.values.astype(np.float64)
    gaps = np.isnan(values)
    if not gaps.any():
        return series
    empty = [name for name, column in zip(series.columns, gaps.T) if column.all()]
    if empty:
        raise DataError(f"{source}: channel(s) {empty} have no value at all; nothing to fill them from")
    steps = np.arange(len(values))
    leading: dict[str, int] = {}  # ffill: the rows before a channel's first value
    for c in np.flatnonzero(gaps.any(axis=0)):
        column, known = values[:, c], ~gaps[:, c]
        if how == "zero":
            column[~known] = 0.0
        elif how == "linear":
            column[~known] = np.interp(steps[~known], steps[known], column[known])
        else:
            last = np.maximum.accumulate(np.where(known, steps, -1))
            first = int(np.argmax(known))
            column[:] = column[np.where(last >= 0, last, first)]
            if first:
                leading[series.columns[c]] = first
    counts = {name: int(n) for name, n in zip(series.columns, gaps.sum(axis=0)) if n}
    log.warning(
        "%s: filled %d missing value(s) (data.fill_missing=%s): %s",
        source, int(gaps.sum()), how, counts,
    )  # fmt: skip
    if leading:
        log.warning(
            "%s: channel(s) %s start later than the file (rows before their first value): those rows "
            "hold their first value, a later time's (if it lies past the training rows, a later "
            "split's value is in training); trim the file to the times every channel covers",
            source, leading,
        )  # fmt: skip
    return Series(values.astype(np.float32), series.columns, series.timestamps)


def download(url: str, destination: Path, timeout: float = 30.0) -> None:
    """Fetch ``url`` into ``destination`` atomically: a failed download leaves nothing behind.

    A ``.gz`` URL saved under a name without ``.gz`` is decompressed on the way. A URL whose
    password was redacted (a checkpoint's ``data.url``) is refused: it would only fail to log in.
    """
    from seqlab.utils.secrets import REDACTED

    if f":{REDACTED}@" in url:
        raise ConfigError(
            f"data.url={url!r}: its password was redacted where it was saved (a checkpoint's data "
            f"settings); give data.url with the password again to download {destination.name}"
        )
    gunzip = urllib.parse.urlparse(url).path.endswith(".gz") and destination.suffix != ".gz"
    with (
        atomic_file(destination) as tmp,
        open(tmp, "wb") as out,
        urllib.request.urlopen(url, timeout=timeout) as response,
    ):
        shutil.copyfileobj(gzip.GzipFile(fileobj=response) if gunzip else response, out)


def download_lock(directory: Path) -> contextlib.AbstractContextManager[None]:
    """One process of this host at a time fetches into ``directory`` (torchrun and srun start
    every process at once): the others wait, then find the files there instead of replacing them,
    which would change the files' fingerprint (the cache key) under a process that already read
    it. Nor does it order the hosts of a multi-node job on a shared file system (prepare the data
    once before such a job)."""
    return directory_lock(directory, "fetching")


#: where a run is told to read its data from: train.py's key, and eval.py's, which rebuilds the
#: data from a checkpoint (its ``data.`` keys come with a ``+``)
DATA_DIR_KEYS = "data.data_dir (eval.py: data_dir)"


def ensure_file(path: Path, url: str | None, allow_download: bool, named_by: str | None = None) -> Path:
    """Return ``path``; download it first when it is missing and a URL is known. ``named_by``: the
    setting that names the file, which the error offers too (``data.val_prefix=dev``)."""
    if path.is_file():
        return path
    hint = f"put the file there, or point {DATA_DIR_KEYS} at the directory that holds {path.name}"
    if named_by:
        hint += f", or {named_by}"
    if url and allow_download:
        try:
            with download_lock(path.parent):
                if not path.is_file():  # another process fetched it meanwhile
                    download(url, path)
            return path
        except (OSError, urllib.error.URLError) as err:
            raise DataError(
                f"data file not found: {path}, and downloading it from {url} failed ({err}); {hint}"
            ) from None
    source = f" (it can be downloaded from {url})" if url else ""
    raise DataError(f"data file not found: {path}{source}; {hint}")


def ensure_extracted(
    data_dir: Path, needed: list[Path], url: str | None, allow_download: bool, strip_components: int = 0
) -> None:
    """Make sure every path in ``needed`` exists, downloading and unpacking ``url`` (zip / tar) if not.

    Members are extracted into ``data_dir`` without their first ``strip_components`` path parts
    (GLUE's ``SST-2/train.tsv`` becomes ``train.tsv``); the archive is removed afterwards. An
    extraction that did not finish (``.extracting-<archive>`` is left) is done again: the
    directories in ``needed`` exist long before every file in them does.
    """
    name = Path(urllib.parse.urlparse(url).path).name if url else ""
    unfinished = data_dir / f".extracting-{name}"

    def missing() -> list[Path]:
        return [path for path in needed if not path.exists()] or (
            [unfinished] if name and unfinished.exists() else []
        )

    if not missing():
        return
    hint = f"point {DATA_DIR_KEYS} at a directory that holds {[p.name for p in needed]}"
    if not (url and allow_download):
        if missing() == [unfinished]:
            raise DataError(
                f"{data_dir}: an earlier extraction of {url} did not finish ({unfinished.name} is left "
                "there); set data.download=true to extract it again, or unpack it there yourself and "
                f"remove {unfinished.name}"
            )
        source = f" (downloadable from {url})" if url else ""
        raise DataError(f"data not found: {missing()[0]}{source}; {hint}")
    with download_lock(data_dir):
        if not missing():  # another process fetched it meanwhile
            return
        archive = data_dir / f".download-{name}"
        try:
            download(url, archive)
        except (OSError, urllib.error.URLError) as err:
            raise DataError(
                f"data not found: {missing()[0]}, and downloading {url} failed ({err}); {hint}"
            ) from None
        unfinished.touch()
        try:
            extract(archive, data_dir, strip_components)
        finally:
            archive.unlink(missing_ok=True)
        unfinished.unlink()
    still_missing = [path for path in needed if not path.exists()]
    if still_missing:
        raise DataError(f"{url} did not contain {still_missing[0].relative_to(data_dir)}")


def extract(archive: Path, destination: Path, strip_components: int = 0) -> None:
    """Unpack a zip or tar archive; each member lands atomically (written aside, then renamed)."""

    def target(name: str) -> Path | None:
        parts = Path(name).parts[strip_components:]
        if not parts or any(part in ("..", "") for part in parts) or Path(name).is_absolute():
            return None
        return destination.joinpath(*parts)

    def write(stream, path: Path) -> None:
        with atomic_file(path) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(stream, out)

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                path = target(info.filename)
                if path is not None and not info.is_dir():
                    with zf.open(info) as stream:
                        write(stream, path)
        return
    try:
        with tarfile.open(archive) as tf:
            for member in tf:
                path = target(member.name)
                if path is not None and member.isfile():
                    write(tf.extractfile(member), path)
    except tarfile.TarError as err:
        raise DataError(f"{archive} is neither a zip nor a tar archive ({err})") from None
