"""What a config means for its results: its settings as flat ``section.key`` values, those that
change what a run computes, their fingerprint, and the difference between two configs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fedlora.config.sections import RunConfig


#: keys that change nothing a run computes: where it is written, how it shows progress, where it is
#: tracked, CPU threads
NEUTRAL_KEYS = frozenset({"run.name", "run.output_dir", "run.dir", "run.progress", "run.trackers", "run.tracking_uri",
                          "model.threads"})

#: keys a resumed run may change: they do not change the trained model's shape or data (more rounds,
#: the evaluation cadence and batch, whether a NaN client raises) beyond the neutral ones
RESUMABLE_KEYS = NEUTRAL_KEYS | {"train.rounds", "eval.every", "eval.batch_size", "train.fail_fast",
                                 "privacy.max_epsilon"}


def flat_settings(cfg: RunConfig) -> dict[str, Any]:
    """Every setting of ``cfg`` as ``{"section.key": value}``; free-form tables (strategy options,
    task options, columns) are flattened too (``strategy.options.lam``), so that a difference names
    the innermost key."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):  # an empty table adds no key: {} and an absent table are equal
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = list(value) if isinstance(value, tuple) else value

    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            walk(f"{section}.{key}", value)
    return out


def result_settings(cfg: RunConfig, ignore: Iterable[str] = NEUTRAL_KEYS) -> dict[str, Any]:
    """The settings that change a run's results: :func:`flat_settings` less ``ignore``."""
    ignore = set(ignore)
    return {k: v for k, v in flat_settings(cfg).items() if k not in ignore}


def fingerprint(cfg: RunConfig, ignore: Iterable[str] = NEUTRAL_KEYS) -> str:
    """A short, stable hash of :func:`result_settings`: equal exactly when those settings are equal
    (an int and the equal float count as equal, as the config widens ints to floats)."""
    import hashlib
    import json

    def norm(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    text = json.dumps({k: norm(v) for k, v in sorted(result_settings(cfg, ignore).items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_diff(old: RunConfig, new: RunConfig, ignore: Iterable[str] = NEUTRAL_KEYS) -> list[tuple[str, Any, Any]]:
    """``[(key, old value, new value), …]`` for every result setting that differs, in key order;
    a key present on one side only shows ``None`` on the other."""
    a, b = result_settings(old, ignore), result_settings(new, ignore)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def format_diff(diff: Iterable[tuple[str, Any, Any]]) -> str:
    """``train.lr: 0.002 → 0.001; lora.r: 4 → 8``: a settings difference for an error message."""
    return "; ".join(f"{k}: {a!r} → {b!r}" for k, a, b in diff)
