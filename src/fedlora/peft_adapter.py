"""A PEFT LoRA adapter folder as a starting point: ``lora.init_adapter = PATH``.

A federation can start from an adapter a user already has (a run's ``adapter/``, the output of
``fedlora export --adapter``, or any ``save_pretrained`` LoRA folder) instead of PEFT's fresh
initialisation. This module reads such a folder and checks what fedlora can start from:

- :func:`read_adapter_config`: ``adapter_config.json``, refusing what the engine cannot reproduce
  (DoRA, per-module rank or alpha patterns, trained biases, a regex ``target_modules``, another PEFT
  method) with an error naming the file and the key;
- :func:`apply_to_config`: the folder's rank, alpha and target modules fill in ``lora.r``,
  ``lora.alpha`` and ``lora.target_modules`` when the config leaves them out; a config that sets a
  different value is an error naming both values;
- :func:`start_adapter`: the folder's tensors over the model's fresh adapter, every LoRA factor
  required, a head the folder lacks left at its fresh initialisation (and said so);
- :func:`adapter_scaling`: the LoRA scaling the folder's factors were trained at (``lora_alpha/r``,
  or ``lora_alpha/√r`` with rsLoRA). The strategy's ``init_state`` keeps ΔW = s·B·A exactly when its
  own scaling differs (it rescales B).

An adapter whose run merged changes into the base weights (FedEx-LoRA, FLoRA: a
``base_delta.safetensors`` beside it) is not the whole model: it is refused, with the way round
(``fedlora export RUN --merged OUT`` and ``model.name = OUT``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.errors import ConfigError

if TYPE_CHECKING:
    from fedlora.config import RunConfig
    from fedlora.factors import Adapter

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
KEY = "lora.init_adapter"

#: adapter_config.json keys whose non-default value fedlora cannot reproduce, and why
UNSUPPORTED = {
    "use_dora": (False, "DoRA adapters are not LoRA factors the strategies can aggregate"),
    "rank_pattern": ({}, "per-module ranks are not supported (one rank per adapter)"),
    "alpha_pattern": ({}, "per-module alphas are not supported (one scaling per adapter)"),
    "bias": ("none", "trained biases are not part of a federated LoRA adapter"),
    "layers_to_transform": (None, "adapters on a subset of layers are not supported"),
}


def _folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{KEY} = {str(path)!r}: no such folder")
    return folder


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The folder's adapter_config.json, checked: a LoRA adapter fedlora can start from."""
    folder = _folder(path)
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise ConfigError(f"{KEY} = {str(path)!r}: no {CONFIG_FILE} there, so it is not a PEFT adapter folder")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{file}: peft_type = {cfg['peft_type']!r}; fedlora starts only from LoRA adapters")
    for key, (default, why) in UNSUPPORTED.items():
        value = cfg.get(key, default)
        if value not in (default, None) and value != {} and value is not False:
            raise ConfigError(f"{file}: {key} = {value!r}: {why}")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"{file}: target_modules = {targets!r}; fedlora needs a list of module names "
                          "(a regular expression cannot be checked against lora.target_modules)")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{file}: {key} = {value!r}: must be a positive number")
    if float(cfg["r"]) != int(cfg["r"]):
        raise ConfigError(f"{file}: r = {cfg['r']!r}: must be an integer")
    if (folder.parent / "base_delta.safetensors").is_file() and folder.name == "adapter":
        raise ConfigError(
            f"{KEY} = {str(path)!r}: its run merged changes into the base weights ({folder.parent / 'base_delta.safetensors'}), "
            f"so the adapter alone is not the trained model. Export the whole model with "
            f"`fedlora export {folder.parent} --merged OUT` and start from it with model.name = OUT")
    return cfg


def adapter_scaling(cfg: dict[str, Any]) -> float:
    """The LoRA scaling the adapter was trained at, as PEFT computes it."""
    r = int(cfg["r"])
    alpha = float(cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def apply_to_config(cfg: RunConfig, given: set[str]) -> RunConfig:
    """Fill ``lora.r``, ``lora.alpha`` and ``lora.target_modules`` from ``lora.init_adapter``.

    ``given`` holds the ``lora`` keys the config file or ``--set`` gave; a given value that differs
    from the adapter's raises ConfigError naming both. A config that gives all three (a run's own
    config.toml) loads even when the folder is gone, so that the run can be resumed or exported;
    starting a new run from it still needs the folder (:func:`start_adapter`)."""
    if {"r", "alpha", "target_modules"} <= given and not Path(cfg.lora.init_adapter).expanduser().exists():
        return cfg
    adapter = read_adapter_config(cfg.lora.init_adapter)
    where = f"{Path(cfg.lora.init_adapter) / CONFIG_FILE}"
    wanted = {"r": int(adapter["r"]), "alpha": float(adapter["lora_alpha"]),
              "target_modules": sorted(adapter["target_modules"])}
    names = {"r": "r", "alpha": "lora_alpha", "target_modules": "target_modules"}
    for key, value in wanted.items():
        mine = getattr(cfg.lora, key)
        same = sorted(mine) == value if key == "target_modules" else float(mine) == float(value)
        if key in given and not same:
            raise ConfigError(f"lora.{key} = {mine!r}, but {where} has {names[key]} = {value!r}; the federation "
                              f"starts from that adapter, so set lora.{key} = {value!r} or leave it out")
        setattr(cfg.lora, key, value)
    return cfg


def check_task_type(path: str | Path, adapter_config: dict[str, Any], task_type: str) -> None:
    """The adapter's PEFT task type (from its ``adapter_config``) must be the task's (a SEQ_CLS head
    is not a causal LM's)."""
    theirs = adapter_config.get("task_type")
    if theirs and theirs != task_type:
        raise ConfigError(f"{KEY} = {str(path)!r}: its task_type is {theirs!r}, but data.task needs {task_type!r}")


def load_tensors(path: str | Path) -> dict[str, Any]:
    """The adapter's tensors by PEFT key (safetensors, or a legacy ``adapter_model.bin``)."""
    import torch

    folder = _folder(path)
    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(file)
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise ConfigError(f"{file}: cannot read it ({type(e).__name__}: {e})") from e
    raise ConfigError(f"{KEY} = {str(path)!r}: no {' or '.join(WEIGHT_FILES)} there")


def start_adapter(path: str | Path, fresh: Adapter, log=print) -> Adapter:
    """The adapter in ``path`` laid over ``fresh`` (the model's own fresh adapter, which fixes the
    keys and shapes): every LoRA factor must be there with the model's shape; extras the folder
    lacks (a classification head it did not save) stay fresh, and ``log`` says which."""
    from fedlora.factors import Adapter

    incoming = load_tensors(path)
    own = fresh.to_state_dict()
    unexpected = sorted(set(incoming) - set(own))
    if unexpected:
        raise ConfigError(f"{KEY} = {str(path)!r}: holds {len(unexpected)} tensors the model has no place for, "
                          f"e.g. {unexpected[:3]}; was it trained on another base model or target modules?")
    missing = sorted(set(own) - set(incoming))
    factors = [k for k in missing if ".lora_" in k]
    if factors:
        raise ConfigError(f"{KEY} = {str(path)!r}: lacks {len(factors)} LoRA factors the model has, "
                          f"e.g. {factors[:3]}")
    if missing:
        log(f"{KEY}: the adapter has no {', '.join(missing)}; starting them from the fresh initialisation")
    merged = dict(own)
    for key, t in incoming.items():
        if tuple(t.shape) != tuple(own[key].shape):
            raise ConfigError(f"{KEY} = {str(path)!r}: {key!r} has shape {tuple(t.shape)}, the model needs "
                              f"{tuple(own[key].shape)} (another base model or number of labels?)")
        merged[key] = t.to(own[key].dtype)
    return Adapter.from_state_dict(merged)
