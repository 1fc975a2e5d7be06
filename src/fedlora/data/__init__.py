"""Data for federated runs: sources (catalog, files, Hub), partitioners, partition summaries.

``fedlora.data`` imports no model code; ``datasets`` is loaded on first use of ``load_source`` or
``read_source``
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
    "read_source",
]


def __getattr__(name: str):
    # the loaders pull in `datasets` (about a second to import); partitioning does not need it.
    if name in ("load_source", "read_source"):
        from fedlora.data import sources

        return getattr(sources, name)
    raise AttributeError(f"module 'fedlora.data' has no attribute {name!r}")
