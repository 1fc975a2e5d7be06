"""Conversions between fedlora's tensors-and-dicts and Flower's records.

Adapters travel as an :class:`~flwr.app.ArrayRecord` keyed by PEFT names (the names
:class:`~fedlora.factors.Adapter` uses), so a record is also a valid PEFT state dict. A base-weight
change (``GlobalState.base_delta``: layer → LoRAPair) travels as ``"<layer>::A"`` / ``"<layer>::B"``
arrays. Small structured values (a strategy's ``info``) travel as JSON in a ConfigRecord string,
because ConfigRecord holds only scalars, strings, bytes and lists of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from torch import Tensor

from fedlora.errors import AggregationInputError
from fedlora.factors import Adapter, LoRAPair

PAIR_SEP = "::"


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """An ArrayRecord holding detached CPU copies of ``tensors`` (key order kept)."""
    return ArrayRecord({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})


def record_to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """The tensors of an ArrayRecord, in its key order."""
    return dict(record.to_torch_state_dict())


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of the arrays' data (elements × item size), without serialisation headers: the
    quantity ``Strategy.upload_bytes`` / ``download_bytes`` count."""
    total = 0
    for arr in record.values():
        total += int(math.prod(arr.shape)) * np.dtype(arr.dtype).itemsize
    return total


def adapter_to_record(adapter: Adapter, parts=("A", "B", "extras")) -> ArrayRecord:
    """The given parts of an adapter as an ArrayRecord in PEFT key names."""
    return tensors_to_record(adapter.tensors(parts))


def record_to_adapter(record: ArrayRecord) -> Adapter:
    """An Adapter from an ArrayRecord in PEFT key names."""
    return Adapter.from_state_dict(record_to_tensors(record))


def base_delta_to_record(delta: Mapping[str, LoRAPair]) -> ArrayRecord:
    """One aggregation's base-weight change (layer → scaled factors) as an ArrayRecord."""
    flat: dict[str, Tensor] = {}
    for layer, pair in delta.items():
        flat[f"{layer}{PAIR_SEP}A"] = pair.A
        flat[f"{layer}{PAIR_SEP}B"] = pair.B
    return tensors_to_record(flat)


def record_to_base_delta(record: ArrayRecord) -> dict[str, LoRAPair]:
    """The inverse of :func:`base_delta_to_record`; a layer missing one factor raises."""
    flat = record_to_tensors(record)
    layers: dict[str, dict[str, Tensor]] = {}
    for key, t in flat.items():
        layer, sep, factor = key.rpartition(PAIR_SEP)
        if not sep or factor not in ("A", "B"):
            raise AggregationInputError(f"base delta record: key {key!r} is not '<layer>::A' or '<layer>::B'")
        layers.setdefault(layer, {})[factor] = t
    out = {}
    for layer, f in layers.items():
        if set(f) != {"A", "B"}:
            raise AggregationInputError(f"base delta record: layer {layer!r} lacks factor {({'A', 'B'} - set(f)).pop()}")
        out[layer] = LoRAPair(f["A"], f["B"])
    return out


def to_json(value: Mapping[str, Any], what: str) -> str:
    """JSON text of a strategy's small structured values; tensors become lists."""
    def default(o):
        if isinstance(o, Tensor):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        raise TypeError(f"{what}: value of type {type(o).__name__} cannot travel in a Flower message")
    return json.dumps(dict(value), default=default)


def from_json(text: str) -> dict[str, Any]:
    """The inverse of :func:`to_json`."""
    return json.loads(text) if text else {}


# ---- message layout (server ⇄ client) -----------------------------------------------------------
KEY_CONFIG = "fedlora.config"  # ConfigRecord: config text, round, scaling, state info, base deltas sent
KEY_GLOBAL = "fedlora.global"  # ArrayRecord: the global adapter's broadcast parts
KEY_BASE_DELTA = "fedlora.base-delta."  # + index: ArrayRecord of one aggregation's base change
KEY_PAYLOAD = "fedlora.payload"  # ArrayRecord: strategy.payload of the trained adapter
KEY_METRICS = "fedlora.metrics"  # MetricRecord: num-examples, scaling, loss, steps, failed
KEY_INFO = "fedlora.info"  # ConfigRecord: the strategy's before_upload info (JSON) or the error
KEY_NODE = "fedlora.node"  # ConfigRecord: a node's partition-id / num-partitions (query reply)
