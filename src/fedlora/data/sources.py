"""Where a federated run's examples come from: catalog datasets, local files, or Hub names.

``load_source`` always returns a ``datasets.DatasetDict`` with a ``"train"`` and a ``"validation"``
split whose columns carry the standard names the tasks read (``text``, ``text_pair``, ``label``,
``question``, ``choices``, ...), whatever the source called them.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import datasets

from fedlora.data.checks import check_classes, check_rows, is_one_file, raise_file_problem, root_cause, row_origin
from fedlora.errors import ConfigError
from fedlora.hub import HubUnavailableError, catalog_hint, hub_reachable, why_unavailable

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
__all__ = ["hub_reachable", "load_source", "read_source"]


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
    loaded, files, label = _read(source, data_files, cache_dir)
    if "train" not in loaded:
        raise ConfigError(f"source {label} has no 'train' split; it has {', '.join(loaded) or 'no splits'}")

    if columns:
        loaded = _map_columns(loaded, columns, label)
    where = row_origin(label, files)
    check_rows(loaded, columns or {}, where)  # before the labels are encoded: a blank label is no class
    loaded = _encode_labels(loaded)
    check_classes(loaded, columns or {}, where)
    return _ensure_validation(loaded, validation_fraction, seed, label)


def read_source(
    source: str | os.PathLike | Sequence[str] | Mapping[str, str | list[str]],
    *,
    data_files: str | list[str] | Mapping[str, str | list[str]] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict:
    """The source's splits as they are stored: the first half of :func:`load_source`, with no column
    mapping, label encoding, row checks or validation split. Files given without split names (a
    path, a folder, a list) come back as one ``"train"`` split; ``source`` may also be a mapping of
    split name to files. A missing, empty or unreadable file, an unknown name, or a hub that is
    switched off or unreachable (:class:`~fedlora.hub.HubUnavailableError`) raise ConfigError."""
    return _read(source, data_files, cache_dir)[0]


def _normalise(source, data_files):
    """(source, data_files) with paths as strings and a split mapping given as ``source`` moved to
    ``data_files``."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, Mapping):
        if data_files is not None:
            raise ConfigError("source: a mapping of split name to files, and data_files as well; give one")
        data_files = {str(k): _as_list(v) for k, v in source.items()}
        source = str(data_files)
    return source, data_files


def _read(source, data_files, cache_dir) -> tuple[datasets.DatasetDict, dict[str, list[str]] | None, str]:
    """(the DatasetDict as stored, {split: local files} or None, the source as error messages name it)."""
    source, data_files = _normalise(source, data_files)
    kwargs = {"cache_dir": os.fspath(cache_dir)} if cache_dir is not None else {}
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
    return loaded, files, label


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
        if is_one_file(f) and not os.path.exists(f):
            raise ConfigError(f"data file {f!r} does not exist")
    tsv = builder == "csv" and all(_extension(f) == ".tsv" for f in flat)
    by_split = files if isinstance(files, dict) else {"train": files}
    return builder, by_split, {"sep": "\t"} if tsv else {}




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
        raise ConfigError(f"data files {label} mix formats ({', '.join(sorted(builders))}); use one of "
                          "csv/tsv, json/jsonl/ndjson or parquet")
    return builders.pop()


def _load_files(builder: str, files: dict[str, list[str]], options: dict, label: str,
                kwargs: dict) -> datasets.DatasetDict:
    """Read local files with ``datasets``; a file that is empty, or (when ``datasets`` fails) holds a
    line that is not UTF-8 or not JSON, raises ConfigError naming the file and the line."""
    paths = [f for split in files.values() for f in split if is_one_file(f)]
    for path in paths:  # cheap: reads only the start of each file
        raise_file_problem(path, builder, options, scan=False)
    try:
        return datasets.load_dataset(builder, data_files=files, **options, **kwargs)
    except (OSError, ValueError, StopIteration, datasets.exceptions.DatasetGenerationError) as e:
        for path in paths:  # find the file and line datasets failed on, which its message omits
            raise_file_problem(path, builder, options, scan=True)
        raise ConfigError(f"could not read {builder} files {label}: {root_cause(e)}") from e


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
    online = hub_reachable(datasets=True)
    context = contextlib.nullcontext() if online else _offline_mode()
    errors = []
    with context:
        for path, config in _hub_candidates(source):
            try:
                return datasets.load_dataset(path, config, **kwargs)
            except (OSError, ValueError) as e:  # ConnectionError and DatasetNotFoundError are OSErrors
                errors.append(f"{path}" + (f" (config {config})" if config else "") + f": {e}")
    tried = f" Tried: {'; '.join(errors)}"
    if online:
        raise ConfigError(f"dataset {source!r} is not a catalog dataset, a local file, or a dataset found on the "
                          f"Hugging Face hub.{catalog_hint(source, 'dataset')}{tried}")
    raise HubUnavailableError(
        f"dataset {source!r} is not a catalog dataset, a local file, or a dataset found in the local cache; the "
        f"Hugging Face hub {why_unavailable(datasets=True)}.{catalog_hint(source, 'dataset')}{tried}")


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
