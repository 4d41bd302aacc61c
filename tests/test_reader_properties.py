"""Property-based tests of the data readers: whatever bytes a file holds, a reader returns data
or raises seqlab's own DataError naming the file, never another exception."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqlab.data.readers import read_series_csv
from seqlab.data.text_readers import read_table
from seqlab.data.translation import read_parallel
from seqlab.errors import DataError

# the same examples every run (a failure reproduces; CI is not a lottery) and no example database
# written into the checkout
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    database=None,
)

# random bytes, and text built from the characters that matter to these formats, so that many
# examples get past the first line into the rows
CSV_LIKE = st.text(alphabet="date,ab01.-e\n\t\"'x:nNaIf ", max_size=200)
ROWS = st.lists(
    st.tuples(
        st.sampled_from(["2016-07-01 00:00:00", "2016-07-01 01:00:00", "yesterday", ""]),
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4)),
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4)),
    ),
    max_size=6,
)
CONTENT = st.one_of(st.binary(max_size=200), CSV_LIKE.map(str.encode))


def _write(data: bytes, suffix: str) -> Path:
    with tempfile.NamedTemporaryFile(delete=False, suffix=suffix) as handle:
        handle.write(data)
    return Path(handle.name)


def _named_error(error: DataError, path: Path) -> None:
    assert str(path) in str(error), f"the error does not name the file: {error}"


@PROPERTY
@given(CONTENT)
def test_series_csv_reader_returns_finite_series_or_names_the_file(data: bytes) -> None:
    path = _write(data, ".csv")
    try:
        series = read_series_csv(path)
    except DataError as error:
        _named_error(error, path)
    else:
        assert series.values.size > 0 and bool(np.isfinite(series.values).all())
    finally:
        path.unlink()


@PROPERTY
@given(ROWS)
def test_series_csv_rows_with_any_values(rows) -> None:
    lines = ["date,a,b", *(f"{date},{a},{b}" for date, a, b in rows)]
    path = _write("\n".join(lines).encode(), ".csv")
    try:
        series = read_series_csv(path)
    except DataError as error:
        _named_error(error, path)
    else:  # only all-valid rows are accepted
        assert len(rows) > 0
        for date, a, b in rows:
            assert date not in ("", "yesterday")
            for value in (a, b):
                assert not isinstance(value, float) or math.isfinite(value)
        assert bool(np.isfinite(series.values).all())
    finally:
        path.unlink()


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_table_reader_on_arbitrary_content(suffix: str) -> None:
    @PROPERTY
    @given(st.one_of(CONTENT, st.text(alphabet='sentence\tlabel,{}":01 \n', max_size=200).map(str.encode)))
    def check(data: bytes) -> None:
        path = _write(data, suffix)
        try:
            texts = read_table(path, "sentence", "label")
        except DataError as error:
            _named_error(error, path)
        else:
            assert len(texts.texts) == len(texts.labels)
        finally:
            path.unlink()

    check()


@PROPERTY
@given(CONTENT, CONTENT)
def test_parallel_reader_on_arbitrary_content(source_data: bytes, target_data: bytes) -> None:
    source, target = _write(source_data, ".en"), _write(target_data, ".de")
    try:
        pairs, empty = read_parallel(source, target)
    except DataError as error:
        assert str(source) in str(error) or str(target) in str(error), str(error)
    else:
        assert len(pairs.sources) == len(pairs.targets) and empty >= 0
        assert all(s.strip() and t.strip() for s, t in zip(pairs.sources, pairs.targets))
    finally:
        source.unlink()
        target.unlink()


# valid files, written as their writers would: every example must read back as it was written
# (a reader that refused everything with a DataError naming the file passed the tests above)
WORDS = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\x85"),
    min_size=1,
    max_size=30,
).filter(lambda text: text.strip())
LABELS = st.sampled_from(["0", "1", "pos", "neg", "3.5"])


@PROPERTY
@given(
    st.integers(1, 3).flatmap(
        lambda channels: st.lists(
            st.lists(st.floats(-1e30, 1e30, allow_nan=False, allow_subnormal=False), min_size=channels,
                     max_size=channels),
            min_size=1, max_size=20,
        )
    )
)  # fmt: skip
def test_a_valid_series_csv_reads_back_as_written(rows: list[list[float]]) -> None:
    from datetime import datetime, timedelta

    columns = ["OT", "load", "temp"][: len(rows[0])]
    start = datetime(2016, 7, 1)
    stamps = [start + timedelta(hours=i) for i in range(len(rows))]
    lines = [",".join(["date", *columns])]
    lines += [",".join([f"{stamp:%Y-%m-%d %H:%M:%S}", *map(repr, row)]) for stamp, row in zip(stamps, rows)]
    path = _write(("\n".join(lines) + "\n").encode(), ".csv")
    try:
        series = read_series_csv(path)
    finally:
        path.unlink()
    assert series.columns == columns and series.timestamps == stamps
    np.testing.assert_array_equal(series.values, np.asarray(rows, dtype=np.float32))


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_a_valid_table_reads_back_as_written(suffix: str) -> None:
    import csv
    import io
    import json

    from seqlab.data.text_readers import clean_text

    # a TSV (GLUE's: no quoting) cannot hold a tab or a line break inside a text
    texts = (
        WORDS.filter(lambda t: "\t" not in t and "\n" not in t and "\r" not in t)
        if suffix == ".tsv"
        else WORDS
    )

    @PROPERTY
    @given(st.lists(st.tuples(texts, LABELS), min_size=1, max_size=12))
    def check(examples: list[tuple[str, str]]) -> None:
        if suffix == ".jsonl":
            content = "".join(
                json.dumps({"label": lb, "sentence": t}, ensure_ascii=False) + "\n" for t, lb in examples
            )
        elif suffix == ".csv":
            buffer = io.StringIO()
            csv.writer(buffer).writerows([("sentence", "label"), *examples])
            content = buffer.getvalue()
        else:
            content = "".join(f"{t}\t{lb}\n" for t, lb in [("sentence", "label"), *examples])
        path = _write(content.encode(), suffix)
        try:
            table = read_table(path, "sentence", "label")
        finally:
            path.unlink()
        assert table.texts == [clean_text(t) for t, _ in examples]
        assert table.labels == [lb for _, lb in examples]

    check()


@PROPERTY
@given(st.lists(st.tuples(WORDS, WORDS), min_size=1, max_size=12), st.sampled_from(["\n", "\r\n"]))
def test_valid_parallel_files_read_back_as_written(pairs: list[tuple[str, str]], newline: str) -> None:
    pairs = [
        (s.replace("\n", " ").replace("\r", " "), t.replace("\n", " ").replace("\r", " ")) for s, t in pairs
    ]
    source = _write("".join(s + newline for s, _ in pairs).encode(), ".en")
    target = _write("".join(t + newline for _, t in pairs).encode(), ".de")
    try:
        read, empty = read_parallel(source, target)
    finally:
        source.unlink()
        target.unlink()
    assert empty == 0
    assert read.sources == [s.strip() for s, _ in pairs] and read.targets == [t.strip() for _, t in pairs]
