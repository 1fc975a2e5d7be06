"""Where a federated run's examples come from: catalog datasets, local files, or Hub names.

``load_source`` always returns a ``datasets.DatasetDict`` with a ``"train"`` and a ``"validation"``
split whose columns carry the standard names the tasks read (``text``, ``text_pair``, ``label``,
``question``, ``choices``, ...), whatever the source called them.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import difflib
import gzip
import io
import json
import lzma
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import datasets

from fedlora.errors import ConfigError

# File extension -> the `datasets` packaged builder that reads it. Compression suffixes are peeled
# off first because `datasets` decompresses .gz/.bz2/.xz/.zst transparently.
BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
# Format names accepted as ``source`` alongside ``data_files``.
FORMATS = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}
# Splits that stand in for a missing "validation" split, in order of preference.
VALIDATION_FALLBACKS = ("validation_matched", "test")
# How long the reachability probe waits before treating the Hub as offline. `datasets` itself
# retries a dead connection for ~20 s per file, which is what "never hang" rules out.
HUB_PROBE_TIMEOUT_S = 3.0


def load_source(
    source: str | os.PathLike | Sequence[str],
    *,
    data_files: str | list[str] | Mapping[str, str | list[str]] | None = None,
    columns: Mapping[str, str] | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict:
    """Load a dataset by name or path and return it with ``"train"`` and ``"validation"`` splits.

    ``source`` is resolved in this order:

    1. a catalog dataset of :mod:`fedlora.assets` (``sarcasm``, ``bbc-news``, ...), read offline;
    2. local files: a path (or list of paths, or a glob) ending in ``.csv``, ``.tsv``, ``.json``,
       ``.jsonl``, ``.ndjson`` or ``.parquet`` (optionally compressed), a directory of such files,
       or any ``source`` together with ``data_files`` (then ``source`` may name the format:
       ``"csv"``, ``"json"``, ``"jsonl"``, ``"parquet"``). ``data_files`` may also be a dict of
       split name to files, as in ``datasets.load_dataset``;
    3. a Hugging Face Hub dataset: ``"path"``, ``"path:config"``, ``"path/config"`` (tried as path
       plus config first, then as a repo id ``owner/name``) or ``"owner/name/config"``. When the
       Hub cannot be reached within a few seconds only the local cache is consulted; a dataset
       that is not there raises :class:`ConfigError` naming it and the closest catalog entries.

    ``columns`` maps standard names to the source's columns, e.g. ``{"text": "sentence"}`` or
    ``{"text": "premise", "text_pair": "hypothesis"}``; mapped columns are renamed, the others
    are kept. A ``label`` column of strings becomes a ``ClassLabel`` with the sorted distinct
    values of all splits as names (so every split shares one encoding); a ``label`` column of
    non-negative integers becomes a ``ClassLabel`` with ``max + 1`` classes.

    The validation split is the source's ``"validation"``; failing that its
    ``"validation_matched"`` (MNLI), then its ``"test"`` if that split has labels (GLUE's test
    labels are all ``-1``); failing that a seeded ``validation_fraction`` of ``"train"``
    (stratified by label where possible). Other splits are kept as they are.

    Rows must hold what they claim: a null or blank ``label``, ``text`` or ``text_pair`` raises,
    naming the row (1-based, in file order) and, for local files, the file; so does a ``label``
    column with a single class in ``"train"``.

    ``cache_dir`` is passed to ``datasets.load_dataset`` (default: the ``datasets`` cache).
    Raises :class:`ConfigError` for an unknown source, a missing, empty or unreadable file (naming
    the line where it can), an unknown column, a bad row or a bad fraction.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ConfigError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    kwargs = {"cache_dir": os.fspath(cache_dir)} if cache_dir is not None else {}
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    label = _describe(source)

    catalog = None if data_files is not None else _catalog_dataset(source)
    files = None  # split -> local files, for naming the file of a bad row
    if catalog is not None:
        loaded = catalog
    else:
        local = _local_files(source, data_files)  # None only for a str that names no file
        loaded = _load_hub(source, kwargs) if local is None else _load_files(*local, label, kwargs)
        files = None if local is None else local[1]

    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if not isinstance(loaded, datasets.DatasetDict):
        raise ConfigError(f"source {label}: expected a Dataset or DatasetDict, got {type(loaded).__name__}")
    if "train" not in loaded:
        raise ConfigError(f"source {label} has no 'train' split; it has {', '.join(loaded) or 'no splits'}")

    if columns:
        loaded = _map_columns(loaded, columns, label)
    where = _row_origin(label, files)
    _check_rows(loaded, columns or {}, where)  # before the labels are encoded: a blank label is no class
    loaded = _encode_labels(loaded)
    _check_classes(loaded, columns or {}, where)
    return _ensure_validation(loaded, validation_fraction, seed, label)


def _describe(source) -> str:
    return repr(source) if isinstance(source, str) else repr(list(source))


# --- catalog -----------------------------------------------------------------------------------


def _catalog_dataset(source):
    """The catalog's copy of ``source``, or None when the name is not a catalog dataset."""
    if not isinstance(source, str):
        return None
    try:
        # Imported here: the catalog pulls in package readers the file and Hub paths never need.
        from fedlora import assets
    except ImportError:
        return None
    if not assets.is_catalog_dataset(source):
        return None
    return assets.load_dataset(source)


def _catalog_suggestions(name: str) -> str:
    """A ' Closest catalog datasets: ...' hint, or '' when the catalog has none to offer."""
    try:
        from fedlora import assets
    except ImportError:
        return ""
    try:
        close = list(assets.suggest(name))
    except Exception:  # the hint must never mask the real error
        return ""
    return f" Closest catalog datasets: {', '.join(close)}." if close else ""


# --- local files -------------------------------------------------------------------------------


def _extension(path: str) -> str:
    """The data extension of ``path``, ignoring a compression suffix: "a.csv.gz" -> ".csv"."""
    name = path.lower()
    for suffix in _COMPRESSION:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return os.path.splitext(name)[1]


def _builder_for(path: str) -> str | None:
    return BUILDERS.get(_extension(path))


def _local_files(source, data_files) -> tuple[str, dict[str, list[str]], dict] | None:
    """``(builder, {split: files}, builder options)`` when the source is local files, else None.
    Files given as a list all go to the ``"train"`` split, as in ``datasets.load_dataset``."""
    if data_files is not None:
        if isinstance(data_files, Mapping):
            files = {str(split): _as_list(v) for split, v in data_files.items()}
            flat = [f for v in files.values() for f in v]
        else:
            flat = files = _as_list(data_files)
        fmt = source.lower() if isinstance(source, str) else None
        builder = FORMATS.get(fmt) or _common_builder(flat, _describe(data_files))
    elif isinstance(source, str) and os.path.isdir(source):
        flat = files = sorted(str(p) for p in Path(source).iterdir() if p.is_file() and _builder_for(p.name))
        if not flat:
            raise ConfigError(f"directory {source!r} holds no {', '.join(sorted(BUILDERS))} files")
        builder = _common_builder(flat, repr(source))
    else:
        flat = files = _as_list(source)
        # A string that is neither an existing file nor named like one is left to the Hub.
        if isinstance(source, str) and not _builder_for(source) and not os.path.isfile(source):
            return None
        builder = _common_builder(flat, _describe(source))
    for f in flat:
        if _is_one_file(f) and not os.path.exists(f):
            raise ConfigError(f"data file {f!r} does not exist")
    tsv = builder == "csv" and all(_extension(f) == ".tsv" for f in flat)
    by_split = files if isinstance(files, dict) else {"train": files}
    return builder, by_split, {"sep": "\t"} if tsv else {}


def _is_one_file(path: str) -> bool:
    """Whether ``path`` names one local file (no glob pattern, no URL)."""
    return not any(c in path for c in "*?[") and "://" not in path


def _as_list(files) -> list[str]:
    if isinstance(files, (str, os.PathLike)):
        return [os.path.expanduser(os.fspath(files))]
    return [os.path.expanduser(os.fspath(f)) for f in files]


def _common_builder(files: list[str], label: str) -> str:
    if not files:
        raise ConfigError("no data files given")
    bad = [f for f in files if _builder_for(f) is None]
    if bad:
        raise ConfigError(f"data files {bad} have no known extension ({', '.join(sorted(BUILDERS))})")
    builders = {_builder_for(f) for f in files}
    if len(builders) != 1:
        raise ConfigError(f"data files {label} mix formats ({', '.join(sorted(builders))}); use one format")
    return builders.pop()


def _load_files(builder: str, files: dict[str, list[str]], options: dict, label: str,
                kwargs: dict) -> datasets.DatasetDict:
    """Read local files with ``datasets``; a file that is empty, or (when ``datasets`` fails) holds a
    line that is not UTF-8 or not JSON, raises ConfigError naming the file and the line."""
    paths = [f for split in files.values() for f in split if _is_one_file(f)]
    for path in paths:  # cheap: reads only the start of each file
        _raise_file_problem(path, builder, options, scan=False)
    try:
        return datasets.load_dataset(builder, data_files=files, **options, **kwargs)
    except (OSError, ValueError, StopIteration, datasets.exceptions.DatasetGenerationError) as e:
        for path in paths:  # find the file and line datasets failed on, which its message omits
            _raise_file_problem(path, builder, options, scan=True)
        raise ConfigError(f"could not read {builder} files {label}: {_root_cause(e)}") from e


def _root_cause(e: BaseException) -> str:
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


def _raise_file_problem(path: str, builder: str, options: dict, scan: bool) -> None:
    problem = _file_problem(path, builder, options, scan)
    if problem:
        raise ConfigError(f"data file {path!r} {problem}")


def _file_problem(path: str, builder: str, options: dict, scan: bool) -> str | None:
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


def _row_origin(label: str, files: dict[str, list[str]] | None):
    """A function naming where a split's rows come from: the data file, the files, or the source."""

    def where(split: str) -> str:
        paths = (files or {}).get(split)
        if paths and len(paths) == 1 and _is_one_file(paths[0]):
            return f"data file {paths[0]!r}"
        if paths:
            return f"data files {paths} (split {split!r}, rows counted across them in order)"
        return f"source {label} split {split!r}"

    return where


#: the standard columns whose every row must hold a value, and what each one is
_REQUIRED_COLUMNS = {"label": "the label", "text": "the text", "text_pair": "the second text"}


def _check_rows(dd: datasets.DatasetDict, columns: Mapping[str, str], where) -> None:
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


def _check_classes(dd: datasets.DatasetDict, columns: Mapping[str, str], where) -> None:
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


# --- Hub ---------------------------------------------------------------------------------------


def _hub_candidates(source: str) -> list[tuple[str, str | None]]:
    """The (path, config) readings of a Hub source name, most likely first."""
    if ":" in source and "://" not in source:
        path, config = source.rsplit(":", 1)
        return [(path, config or None)]
    parts = source.split("/")
    if len(parts) == 2:
        # "glue/sst2" is a path plus config by convention; "owner/name" is a repo id. Try both.
        return [(parts[0], parts[1]), (source, None)]
    if len(parts) == 3:
        return [("/".join(parts[:2]), parts[2])]
    return [(source, None)]


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hub endpoint accepts a TCP connection within ``timeout`` seconds.

    False at once in offline mode (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``).
    """
    if datasets.config.HF_HUB_OFFLINE:
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """Run ``datasets`` in offline mode (cache only) without touching the environment for good.

    Both libraries read the flag from module constants at call time, so flipping them is enough
    and avoids ``datasets``' network retries.
    """
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_hub(source: str, kwargs: dict) -> datasets.DatasetDict:
    online = hub_reachable()
    context = contextlib.nullcontext() if online else _offline_mode()
    errors = []
    with context:
        for path, config in _hub_candidates(source):
            try:
                return datasets.load_dataset(path, config, **kwargs)
            except (OSError, ValueError) as e:  # ConnectionError and DatasetNotFoundError are OSErrors
                errors.append(f"{path}" + (f" (config {config})" if config else "") + f": {e}")
    where = "the Hub" if online else "the local cache (the Hub is unreachable or offline mode is on)"
    hint = _catalog_suggestions(source)
    raise ConfigError(
        f"dataset {source!r} is not a catalog dataset, a local file, or a dataset found in {where}."
        f"{hint} Tried: {'; '.join(errors)}"
    )


# --- columns, labels, splits -------------------------------------------------------------------


def _map_columns(dd: datasets.DatasetDict, columns: Mapping[str, str], label: str) -> datasets.DatasetDict:
    """Rename source columns to standard names; unknown source columns raise ConfigError."""
    sources = list(columns.values())
    repeated = sorted({c for c in sources if sources.count(c) > 1})
    if repeated:
        raise ConfigError(f"columns: source column(s) {repeated} mapped to more than one name")
    out = {}
    for split, ds in dd.items():
        available = ds.column_names
        for standard, column in columns.items():
            if column not in available:
                close = difflib.get_close_matches(column, available, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"columns.{standard}: column {column!r} is not in source {label} split {split!r}{hint}; "
                    f"available columns: {', '.join(available)}"
                )
        renames = {src: std for std, src in columns.items() if src != std}
        # A standard name that already exists as some other, unmapped column is shadowed by the
        # mapping: drop it so the rename cannot collide.
        shadowed = [std for std in renames.values() if std in available and std not in renames]
        ds = ds.remove_columns(shadowed) if shadowed else ds
        out[split] = ds.rename_columns(renames) if renames else ds
    return datasets.DatasetDict(out)


def _encode_labels(dd: datasets.DatasetDict) -> datasets.DatasetDict:
    """Make a string or non-negative integer ``label`` column a ClassLabel shared by all splits."""
    if not all("label" in ds.column_names for ds in dd.values()):
        return dd
    features = [ds.features["label"] for ds in dd.values()]
    if all(isinstance(f, datasets.ClassLabel) for f in features):
        return dd
    dtypes = {getattr(f, "dtype", None) for f in features}
    values = set()
    for ds in dd.values():
        values.update(v for v in ds.unique("label") if v is not None)
    if dtypes <= {"string", "large_string"}:
        feature = datasets.ClassLabel(names=sorted(values))
    elif dtypes and all(str(d).startswith(("int", "uint")) for d in dtypes) and values and min(values) >= 0:
        feature = datasets.ClassLabel(num_classes=int(max(values)) + 1)
    else:
        return dd  # floats (regression), booleans, lists: leave to the task
    return datasets.DatasetDict({split: ds.cast_column("label", feature) for split, ds in dd.items()})


def _has_labels(ds: datasets.Dataset) -> bool:
    if "label" not in ds.column_names or len(ds) == 0:
        return len(ds) > 0
    return any(v != -1 for v in ds.unique("label"))


def _ensure_validation(dd: datasets.DatasetDict, fraction: float, seed: int, label: str) -> datasets.DatasetDict:
    """Add a "validation" split (see ``load_source``) if the source has none."""
    if "validation" in dd:
        return dd
    out = dict(dd)
    for name in VALIDATION_FALLBACKS:
        if name in dd and _has_labels(dd[name]):
            out["validation"] = dd[name]
            return datasets.DatasetDict(out)
    train = dd["train"]
    if len(train) < 2:
        raise ConfigError(f"source {label}: 'train' has {len(train)} example(s); cannot carve a validation split")
    stratify = "label" if isinstance(train.features.get("label"), datasets.ClassLabel) else None
    try:
        split = train.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)
    except ValueError:
        # Stratification needs >= 2 examples per class (and a test size >= the class count).
        split = train.train_test_split(test_size=fraction, seed=seed)
    out["train"], out["validation"] = split["train"], split["test"]
    return datasets.DatasetDict(out)
