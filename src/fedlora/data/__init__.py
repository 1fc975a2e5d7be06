"""Data for federated runs: sources (catalog, files, Hub), partitioners, partition summaries.

``fedlora.data`` imports no model code; ``datasets`` is loaded on first use of ``load_source``
and matplotlib on first use of ``plot_partition``.
"""

from fedlora.data.partition import METHODS, distinct_values, holdout, partition
from fedlora.data.summary import format_partition_summary, partition_summary, plot_partition

__all__ = [
    "METHODS",
    "distinct_values",
    "format_partition_summary",
    "holdout",
    "load_source",
    "partition",
    "partition_summary",
    "plot_partition",
]


def __getattr__(name: str):
    # load_source pulls in `datasets` (about a second to import); partitioning does not need it.
    if name == "load_source":
        from fedlora.data.sources import load_source

        return load_source
    raise AttributeError(f"module 'fedlora.data' has no attribute {name!r}")
