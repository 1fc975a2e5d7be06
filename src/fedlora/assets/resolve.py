"""Names outside the catalog: hub ids, local folders and local data files, with a fast, helpful
failure when no hub is reachable."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from fedlora.assets.catalog import DATASET, MODEL, is_catalog_dataset, is_catalog_model, suggest
from fedlora.errors import FedLoRAError

# local data files datasets.load_dataset reads, by suffix → its builder name
_DATA_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class HubUnavailableError(FedLoRAError):
    """A name that needs the Hugging Face hub was given while the hub cannot be reached."""


def hub_offline() -> bool:
    """True if hub access is switched off: ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` in the
    environment now, or huggingface_hub's own flag (read when it was imported, or set by code)."""
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _datasets_offline() -> bool:
    return hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _unavailable(name: str, kind: str, why: str) -> HubUnavailableError:
    close = suggest(name, kind)
    hint = (
        f" The closest built-in {kind}: {', '.join(repr(c) for c in close)} "
        f"(works offline; see `fedlora assets list`)."
        if close else " See `fedlora assets list` for the built-in models and datasets, which work offline."
    )
    return HubUnavailableError(f"{kind} {name!r} needs the Hugging Face hub, which {why}.{hint}")


def _is_network_error(exc: BaseException) -> bool:
    """Whether an exception from huggingface_hub/httpx/requests/datasets means 'hub unreachable'."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {
        "ConnectError", "ConnectTimeout", "NetworkError", "TimeoutException", "ConnectionError",
        "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ReadTimeout", "ProxyError",
    })


def resolve_model(name_or_path: str | os.PathLike) -> str | Path:
    """What to pass to ``from_pretrained`` for a model name.

    - A catalog name ("minilm", "smollm2-135m") → its local folder (fetched on first use).
    - An existing local folder → itself, as a Path.
    - Anything else is a hub id and is returned as a string, after checking that it can load:
      it is in the local hub cache, or the hub answers. Otherwise (``HF_HUB_OFFLINE=1`` or a
      connection error) this raises HubUnavailableError at once, naming the closest catalog
      model (``roberta-large`` → ``minilm``), instead of letting transformers retry for half a
      minute.
    """
    name = os.fspath(name_or_path)
    if is_catalog_model(name):
        from fedlora.assets.models import model_path

        return model_path(name)
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if Path(name).expanduser().exists():
        raise FedLoRAError(f"model path {name!r} is a file; from_pretrained needs a folder")
    import huggingface_hub

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
            return name
    except Exception:  # an id huggingface_hub rejects (bad characters): let the probe say why
        pass
    if hub_offline():
        raise _unavailable(name, MODEL, "is switched off (HF_HUB_OFFLINE=1) and the model is not in the local hub cache")
    try:
        exists = huggingface_hub.file_exists(name, "config.json")
    except Exception as e:
        if _is_network_error(e):
            raise _unavailable(name, MODEL, f"cannot be reached ({e.__class__.__name__}: {e})") from e
        raise FedLoRAError(f"model {name!r}: the hub refused it ({e.__class__.__name__}: {e})") from e
    if not exists:
        close = suggest(name, MODEL)
        more = f"; built-in models close to it: {', '.join(close)}" if close else ""
        raise FedLoRAError(f"model {name!r} is not a local folder and has no config.json on the hub{more}")
    return name


def _data_files(spec) -> tuple[str, object] | None:
    """(builder, data_files) if ``spec`` names local data files, else None."""
    if isinstance(spec, Mapping):
        files = {k: [os.fspath(p) for p in (v if isinstance(v, (list, tuple)) else [v])] for k, v in spec.items()}
        flat = [p for v in files.values() for p in v]
    elif isinstance(spec, (list, tuple)):
        files = flat = [os.fspath(p) for p in spec]
    else:
        p = Path(os.fspath(spec)).expanduser()
        if p.is_dir():
            flat = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in _DATA_BUILDERS)
            if not flat:
                raise FedLoRAError(f"data folder {str(p)!r} holds no .csv/.tsv/.json/.jsonl/.parquet files")
            files = flat
        elif p.suffix.lower() in _DATA_BUILDERS:
            files = flat = [str(p)]
        else:
            return None
    if not flat:
        raise FedLoRAError("no data files given")
    for f in flat:
        if not Path(f).expanduser().is_file():
            raise FedLoRAError(f"data file {f!r} does not exist")
    kinds = {_DATA_BUILDERS.get(Path(f).suffix.lower()) for f in flat}
    if None in kinds or len(kinds) != 1:
        raise FedLoRAError(
            f"data files must all be one of csv/tsv, json/jsonl or parquet, got: {', '.join(flat)}"
        )
    return kinds.pop(), files


def resolve_dataset(spec, config: str | None = None, **kwargs):
    """Load any dataset fedlora accepts, as a ``datasets.DatasetDict``.

    ``spec`` is one of:

    - a catalog name ("sarcasm", ...) → ``fedlora.assets.load_dataset(spec)`` (train/validation/test);
    - local data files: a path to a .csv/.tsv/.json/.jsonl/.parquet file, a folder of them, a list
      of paths, or a ``{"train": ..., "test": ...}`` mapping → ``datasets.load_dataset(builder,
      data_files=...)``. A single file or list gives only a ``train`` split;
    - a hub dataset id, optionally with a config after a colon ("nyu-mll/glue:sst2") or in
      ``config`` → ``datasets.load_dataset(id, config)``. With the hub switched off
      (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``) and no local copy, or unreachable, this raises
      HubUnavailableError at once, naming the closest catalog dataset (``glue`` → ``sarcasm``,
      ``hellaswag`` → ``quartz``, ``gsm8k`` → ``gsm-symbolic``).

    Extra keyword arguments go to ``datasets.load_dataset``.
    """
    if isinstance(spec, str) and is_catalog_dataset(spec):
        from fedlora.assets.corpora import load_dataset

        return load_dataset(spec)
    local = _data_files(spec) if not isinstance(spec, str) or "://" not in spec else None
    import datasets

    if local is not None:
        builder, files = local
        if builder == "csv" and any(str(f).lower().endswith(".tsv") for f in _flatten(files)):
            kwargs.setdefault("delimiter", "\t")
        dd = datasets.load_dataset(builder, data_files=files, **kwargs)
        return dd if isinstance(dd, datasets.DatasetDict) else datasets.DatasetDict({"train": dd})
    name = os.fspath(spec)
    if config is None and ":" in name:
        name, config = name.split(":", 1)
    if _datasets_offline():
        # datasets itself fails in about a second in offline mode, and succeeds from its cache
        try:
            return datasets.load_dataset(name, config, **kwargs)
        except Exception as e:
            if _is_network_error(e):
                raise _unavailable(name, DATASET, "is switched off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and "
                                   "the dataset is not in the local datasets cache") from e
            raise
    import huggingface_hub

    try:
        huggingface_hub.repo_exists(name, repo_type="dataset")
    except Exception as e:
        if _is_network_error(e):
            raise _unavailable(name, DATASET, f"cannot be reached ({e.__class__.__name__}: {e})") from e
        raise
    return datasets.load_dataset(name, config, **kwargs)


def _flatten(files) -> list[str]:
    if isinstance(files, Mapping):
        return [f for v in files.values() for f in v]
    return list(files)
