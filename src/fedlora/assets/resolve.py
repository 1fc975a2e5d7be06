"""Model names outside the catalog: hub ids and local folders, with a fast, helpful failure when no
hub is reachable. (Dataset names of every kind go through :func:`fedlora.data.load_source`.)"""

from __future__ import annotations

import os
from pathlib import Path

from fedlora.assets.catalog import MODEL, is_catalog_model
from fedlora.errors import FedLoRAError
from fedlora.hub import HubUnavailableError, catalog_hint, hub_offline, is_network_error

__all__ = ["HubUnavailableError", "resolve_model"]


def _unavailable(name: str, why: str) -> HubUnavailableError:
    return HubUnavailableError(f"model {name!r} needs the Hugging Face hub, which {why}.{catalog_hint(name, MODEL)}")


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
        raise _unavailable(name, "is switched off (HF_HUB_OFFLINE=1) and the model is not in the local hub cache")
    try:
        exists = huggingface_hub.file_exists(name, "config.json")
    except Exception as e:
        if is_network_error(e):
            raise _unavailable(name, f"cannot be reached ({e.__class__.__name__}: {e})") from e
        raise FedLoRAError(f"model {name!r}: the hub refused it ({e.__class__.__name__}: {e})") from e
    if not exists:
        raise FedLoRAError(f"model {name!r} is not a local folder and has no config.json on the hub."
                           f"{catalog_hint(name, MODEL)}")
    return name
