"""A config to and from text: nested tables as TOML gives them (:func:`from_dict`), ``--set``
overrides (:func:`apply_overrides`), a TOML file (:func:`load_config`) and back (:func:`to_toml`)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedlora.config.sections import SECTIONS, RunConfig, _check_steps_or_epochs
from fedlora.config.values import SetValue, coerce
from fedlora.errors import ConfigError


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _unknown(kind: str, name: Any, known: Iterable[str]) -> ConfigError:
    name = str(name)  # a section or key of a hand-made dict may be anything
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config {kind} {name!r}{hint}")


def from_dict(data: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A RunConfig from nested sections (as TOML gives them), on top of ``base`` (default: defaults).

    Values are type-checked here; a ``train.local_steps`` given together with ``train.local_epochs``
    is refused here too, as only the input tells whether local_steps was given (at its default).
    :meth:`RunConfig.validate` does the range checks."""
    cfg = dataclasses.replace(base) if base is not None else RunConfig()
    out = {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}
    hints = typing.get_type_hints(RunConfig)
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown("section", section, SECTIONS)
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section}: expected a table of settings, got {values!r}")
        types_ = _field_types(hints[section])
        for key, value in values.items():
            if key not in types_:
                raise _unknown("key", f"{section}.{key}", [f"{section}.{k}" for k in types_])
            out[section][key] = coerce(f"{section}.{key}", value, types_[key])
    cfg = RunConfig(**{name: hints[name](**out[name]) for name in SECTIONS})
    if "local_steps" in data.get("train", {}):  # given, even at its default value
        _check_steps_or_epochs(cfg)
    if cfg.lora.init_adapter:  # the adapter's rank, alpha and targets fill in what the input left out
        from fedlora.peft_adapter import apply_to_config

        cfg = apply_to_config(cfg, given=set(data.get("lora", {})))
    return cfg


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to nested config data (``strategy.options.lam=0.2`` too)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: the key must look like section.key")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a table")
        node[parts[-1]] = SetValue(text.strip())
    return data


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a TOML config (or start from the defaults), apply ``--set`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            line = p.read_bytes()[: e.start].count(b"\n") + 1
            raise ConfigError(f"config file {str(p)!r} line {line}: not UTF-8 text ({e.reason})") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r}: {e}") from e
    apply_overrides(data, overrides)
    return from_dict(data).validate()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # JSON's escapes are TOML's too (\\n, \\", \\uXXXX); TOML also wants DEL escaped
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"cannot write {v!r} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML text that :func:`load_config` reads back to an equal config."""
    lines = []
    for section, values in cfg.to_dict().items():
        if section == "train" and cfg.train.local_epochs > 0:
            del values["local_steps"]  # local_epochs replaces it; written, it would read back as a conflict
        lines.append(f"[{section}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
