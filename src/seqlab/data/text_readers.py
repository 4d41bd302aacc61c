"""Readers of labelled texts: TSV / CSV / JSONL tables and the aclImdb directory layout.

Every reader returns ``LabelledTexts`` and remembers where each example came from, so that a
bad example is reported as ``file, line N: what is wrong and what was expected``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from seqlab.errors import DataError

log = logging.getLogger(__name__)

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


@dataclass
class LabelledTexts:
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    #: ``file, line N`` (or ``file``) of every example
    origins: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str, label: str, origin: str) -> None:
        if not text:
            raise DataError(f"{origin}: empty text")
        if label == "":
            raise DataError(f"{origin}: missing label")
        self.texts.append(text)
        self.labels.append(label)
        self.origins.append(origin)

    def subset(self, indices: list[int]) -> LabelledTexts:
        return LabelledTexts(
            [self.texts[i] for i in indices],
            [self.labels[i] for i in indices],
            [self.origins[i] for i in indices],
        )


def read_utf8(path: Path) -> str:
    """The file's text; undecodable bytes are reported with their line and the bytes themselves."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return decode_utf8(path.read_bytes(), str(path))


def decode_utf8(data: bytes, name: str) -> str:
    """``data`` as UTF-8 (a byte-order mark dropped); undecodable bytes are reported with
    ``name``, their line and the bytes themselves."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        bad = data[err.start : err.end]
        raise DataError(
            f"{name}, line {line}: bytes {bad!r} are not UTF-8 ({err.reason}); re-encode the file"
        ) from None


def clean_text(text: str) -> str:
    """HTML line breaks (IMDB) to spaces, runs of whitespace to one space."""
    return " ".join(_HTML_BREAK.sub(" ", text).split())


def table_format(path: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS.values():
            raise DataError(f"{path}: format {fmt!r} is not one of {sorted(set(FORMATS.values()))}")
        return fmt
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {suffix!r}; set data.format to tsv, csv or jsonl"
        )
    return FORMATS[suffix]


def json_type(value: object) -> str:
    """A parsed JSON value's type in JSON's words (array, object, number, boolean, string)."""
    names = {list: "array", dict: "object", bool: "boolean", int: "number", float: "number", str: "string"}
    return names.get(type(value), type(value).__name__)


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 file (``split_lines``)."""
    return split_lines(read_utf8(path))


def split_lines(text: str) -> list[str]:
    """Lines cut at line feeds only (``\\n`` or ``\\r\\n``; a final newline does not add an empty
    line). Not ``str.splitlines``, which also cuts at U+2028, U+2029 and U+0085: characters a
    sentence or a JSON string may hold (``json.dumps(..., ensure_ascii=False)`` leaves them)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


#: how a TSV file writes its fields: ``none`` (GLUE's: a quote is an ordinary character) or
#: ``minimal`` (pandas' ``to_csv(sep="\t")`` and spreadsheets': a field holding a quote, tab or
#: line break is wrapped in quotes, its quotes doubled)
TSV_QUOTING = {"none": csv.QUOTE_NONE, "minimal": csv.QUOTE_MINIMAL}
#: a field as ``quoting=minimal`` writes one holding quotes: wrapped in them, each inner one doubled
QUOTED_FIELD = re.compile(r'"(?:[^"]|"")*""(?:[^"]|"")*"')


def separator_hint(header: list[str], separator: str, readable: dict[str, str] | None = None) -> str:
    """Where a header read with ``separator`` is one field holding another separator (a
    semicolon-separated CSV, a TSV read as CSV): a hint naming it and what to do, else "".
    ``readable``: the separators the reader takes another way, and the setting that says so
    (``{"tab": "data.format=tsv"}``); any other is rewritten."""
    if len(header) != 1:
        return ""
    found = [
        name
        for name, sep in (("tab", "\t"), ("semicolon", ";"), ("comma", ","), ("|", "|"))
        if sep in header[0]
    ]
    if not found or separator in header[0]:
        return ""
    expected = {"\t": "tab", ",": "comma"}[separator]
    setting = (readable or {}).get(found[0])
    remedy = f"set {setting}" if setting else f"rewrite it {expected}-separated"
    return (
        f" (the header is one field holding a {found[0]}: the file is read as {expected}-separated; {remedy})"
    )


def label_key(label: object) -> str:
    """What tells labels (and ``data.classes``) apart: their text, a whole number written as a
    float (``1.0``, ``-2.00``) as the integer (``1``, ``-2``), so that a float column written out
    beside integers, or a checkpoint's classes from such a file, name one class once."""
    text = str(label)
    whole = re.fullmatch(r"(-?\d+)\.0+", text)
    return str(int(whole.group(1))) if whole else text


def read_table(
    path: Path, text_column: str, label_column: str, fmt: str | None = None, quoting: str = "none"
) -> LabelledTexts:
    """Texts and labels from a TSV/CSV file with a header row, or from JSON lines."""
    path = Path(path)
    fmt = table_format(path, fmt)
    content = read_utf8(path)
    out = LabelledTexts()
    if fmt == "jsonl":
        for line_no, line in enumerate(split_lines(content), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {line_no}: not a JSON object ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}, line {line_no}: expected a JSON object, got {type(record).__name__}"
                )
            for column in (text_column, label_column):
                if column not in record:
                    raise DataError(
                        f"{path}, line {line_no}: no key {column!r} (keys: {sorted(record)}); "
                        "set data.text_column / data.label_column"
                    )
            text, label = record[text_column], record[label_column]
            if not isinstance(text, str | None):
                raise DataError(
                    f"{path}, line {line_no}: {text_column!r} is a JSON {json_type(text)}, expected a "
                    "string (pre-tokenized text: join its tokens with spaces)"
                )
            if isinstance(label, list | dict):
                raise DataError(
                    f"{path}, line {line_no}: {label_column!r} is a JSON {json_type(label)}, expected "
                    "one label (a string, number or boolean)"
                )
            out.add(
                clean_text(text or ""),
                "" if label is None else str(label),
                f"{path}, line {line_no}",
            )
        return out

    unquoted = fmt == "tsv" and quoting == "none"
    if fmt == "tsv":  # GLUE-style: tab-separated, quotes are ordinary characters (quoting=none)
        reader = csv.reader(io.StringIO(content), delimiter="\t", quoting=TSV_QUOTING[quoting])
    else:
        reader = csv.reader(io.StringIO(content))
    looks_quoted: list[int] = []  # lines whose text reads as quoting=minimal writes it
    try:
        header = next((row for row in reader if any(cell.strip() for cell in row)), None)  # (blank lines)
        if header is None:
            raise DataError(
                f"{path} is empty; expected a header row with {text_column!r} and {label_column!r}"
            )
        header = [name.strip() for name in header]
        for column in (text_column, label_column):
            if column not in header:
                readable = {"tab": "data.format=tsv", "comma": "data.format=csv"}
                hint = separator_hint(header, reader.dialect.delimiter, readable)
                raise DataError(
                    f"{path}, line 1: no column {column!r} in the header {header}"
                    + (hint or "; set data.text_column / data.label_column")
                )
        repeated = sorted({c for c in (text_column, label_column) if header.count(c) > 1})
        if repeated:
            raise DataError(
                f"{path}, line 1: the header names {repeated} more than once ({header}); which column "
                "is meant is ambiguous: rename them"
            )
        text_idx, label_idx = header.index(text_column), header.index(label_column)
        next_line = reader.line_num + 1
        for row in reader:  # line_no: the row's first line (a quoted field may hold line breaks)
            line_no, next_line = next_line, reader.line_num + 1
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}, line {line_no}: {len(row)} fields, expected {len(header)} ({header})"
                    + (
                        " -- a tab inside the text? (data.quoting=minimal reads one in quotes)"
                        if unquoted
                        else ""
                    )
                )
            if unquoted and QUOTED_FIELD.fullmatch(row[text_idx]):
                looks_quoted.append(line_no)
            out.add(clean_text(row[text_idx]), row[label_idx].strip(), f"{path}, line {line_no}")
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: malformed {fmt.upper()} ({err})") from None
    if looks_quoted:
        log.warning(
            "%s: %d texts (lines %s) are wrapped in quotes with their inner quotes doubled, as pandas and "
            "spreadsheets write a TSV field; they are read as written (quotes kept, data.quoting=none, "
            "GLUE's way): set data.quoting=minimal if the file quotes its fields",
            path, len(looks_quoted), ", ".join(map(str, looks_quoted[:5])) + (", ..." if len(looks_quoted) > 5 else ""),
        )  # fmt: skip
    return out


def read_aclimdb(root: Path, split: str) -> LabelledTexts:
    """The aclImdb layout: ``root/<split>/{pos,neg}/<id>_<rating>.txt``, one review per file."""
    out = LabelledTexts()
    for label in ("neg", "pos"):
        folder = Path(root) / split / label
        if not folder.is_dir():
            raise DataError(
                f"{folder} is not a directory; expected the aclImdb layout {root}/{split}/{{pos,neg}}/*.txt"
            )
        for file in sorted(folder.glob("*.txt")):
            out.add(clean_text(read_utf8(file)), label, str(file))
    return out


__all__ = [
    "LabelledTexts",
    "clean_text",
    "decode_utf8",
    "read_aclimdb",
    "read_lines",
    "read_table",
    "read_utf8",
    "split_lines",
]
