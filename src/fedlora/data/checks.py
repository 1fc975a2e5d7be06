"""What a dataset's local files and rows must hold, checked before a run trains on them.

A local file that is empty, holds only a CSV header, is not UTF-8, has a broken JSON line or a CSV
row with more fields than its header is named with its line (``datasets`` itself reports only a
generic generation error). After loading, a null or blank label or text is named by its row, and a
label column with a single class is refused: either would otherwise fail mid-run or train on
nonsense.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os
from collections.abc import Mapping

import datasets

from fedlora.errors import ConfigError


def is_one_file(path: str) -> bool:
    """Whether ``path`` names one local file (no glob pattern, no URL)."""
    return not any(c in path for c in "*?[") and "://" not in path


def root_cause(e: BaseException) -> str:
    """The innermost exception's message: ``datasets`` wraps the parser's error in a generic one."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# --- what is wrong with a local file, or a row ---------------------------------------------------

# how much of a file the cheap check reads: enough for a CSV header and a row
_HEAD_BYTES = 1 << 16


def _open_bytes(path: str):
    """``path`` opened for reading its (decompressed) bytes; None for a compression we cannot read."""
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(os.path.splitext(path.lower())[1], open)
    return None if path.lower().endswith(".zst") else opener(path, "rb")


def raise_file_problem(path: str, builder: str, options: dict, scan: bool) -> None:
    problem = file_problem(path, builder, options, scan)
    if problem:
        raise ConfigError(f"data file {path!r} {problem}")


def file_problem(path: str, builder: str, options: dict, scan: bool) -> str | None:
    """What makes local data file ``path`` unusable ("is empty", "line 3: not UTF-8 text …"), or None.

    Without ``scan`` only the start of the file is read (an empty file, a CSV header without rows),
    cheap enough for every file; with ``scan`` the whole file is read for the first line that is not
    UTF-8 or not JSON, to name the line after ``datasets`` failed on the file.
    """
    if builder == "parquet":
        return _parquet_problem(path)
    stream = _open_bytes(path)
    if stream is None:
        return None
    try:
        with stream:
            data = stream.read() if scan else stream.read(_HEAD_BYTES)
            whole = scan or not stream.read(1)
    except (OSError, EOFError, lzma.LZMAError) as e:
        return f"cannot be read: {e}"
    if whole and not data.strip():
        return "is empty"
    if builder == "csv":
        problem = _csv_problem(data.decode("utf-8", "replace"), options.get("sep", ","), whole)
        if problem:
            return problem
    if not scan:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return f"line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8"
    return _json_problem(text) if builder == "json" else None


def _csv_problem(text: str, sep: str, whole: bool) -> str | None:
    """A header with no rows (when ``text`` is the whole file), or the first row with more fields
    than the header: pandas would read extra leading fields as an index, shifting every column."""
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    header, rows = None, 0
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = row
                continue
            rows += 1
            if len(row) > len(header):
                return (f"line {reader.line_num}: {len(row)} fields but the header has {len(header)} "
                        f"(an unquoted {sep!r} inside a value?)")
    except csv.Error:  # what Python's reader refuses pandas may read; datasets will say
        return None
    return "has a header but no rows" if whole and header is not None and rows == 0 else None


def _json_problem(text: str) -> str | None:
    """The first line of a JSON-lines text that is not a JSON object; a text that is one JSON
    document (an array of records) is checked as a whole."""
    try:
        json.loads(text)
        return None  # one well-formed document: datasets failed for a reason of its own
    except json.JSONDecodeError as whole:
        first = True
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if first:  # not even the first line is a record: one JSON document spread over lines
                    return f"line {whole.lineno}: not valid JSON ({whole.msg}, column {whole.colno})"
                return f"line {number}: not valid JSON ({e.msg}, column {e.colno})"
            if not isinstance(record, dict):
                return f"line {number}: expected a JSON object per line, got {line.strip()[:40]}"
            first = False
        return f"line {whole.lineno}: not valid JSON ({whole.msg}, column {whole.colno})"


def _parquet_problem(path: str) -> str | None:
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        return "is empty" if os.path.getsize(path) == 0 else f"is not a readable parquet file ({e})"
    return "has no rows" if rows == 0 else None


def row_origin(label: str, files: dict[str, list[str]] | None):
    """A function naming where a split's rows come from: the data file, the files, or the source."""

    def where(split: str) -> str:
        paths = (files or {}).get(split)
        if paths and len(paths) == 1 and is_one_file(paths[0]):
            return f"data file {paths[0]!r}"
        if paths:
            return f"data files {paths} (split {split!r}, rows counted across them in order)"
        return f"source {label} split {split!r}"

    return where


#: the standard columns whose every row must hold a value, and what each one is
_REQUIRED_COLUMNS = {"label": "the label", "text": "the text", "text_pair": "the second text"}


def check_rows(dd: datasets.DatasetDict, columns: Mapping[str, str], where) -> None:
    """Refuse a row whose label or text is null or blank: the tokenizer would fail on it mid-run,
    and a blank label would become a class of its own."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for split, ds in dd.items():
        table = ds.with_format("arrow")[:]
        for column, role in _REQUIRED_COLUMNS.items():
            if column not in ds.column_names:
                continue
            values = table[column]
            missing = pc.is_null(values)
            if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
                missing = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True)
            row = pc.index(missing, True).as_py()
            if row >= 0:
                raise ConfigError(f"{where(split)} row {row + 1}: column {columns.get(column, column)!r} ({role}) "
                                  "is empty; fill it in or remove the row")


def check_classes(dd: datasets.DatasetDict, columns: Mapping[str, str], where) -> None:
    """Refuse a ``label`` column with a single class in ``"train"``: nothing to learn, and a head
    with one output is a regression head."""
    train = dd["train"]
    if "label" not in train.column_names or len(train) == 0:
        return
    present = [v for v in train.unique("label") if v != -1]  # -1: no label (GLUE's test split)
    if len(present) == 1:
        feature = train.features["label"]
        value = feature.int2str(present[0]) if isinstance(feature, datasets.ClassLabel) else present[0]
        raise ConfigError(f"{where('train')}: column {columns.get('label', 'label')!r} (the label) holds a single "
                          f"class, {value!r}; a classifier needs at least two")
