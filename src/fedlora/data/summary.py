"""How skewed a partition is: per-client counts, skew statistics, a text table and a PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from fedlora.data.partition import distinct_values
from fedlora.errors import ConfigError

# Columns of value counts the text table shows before folding the rest into "other".
TABLE_MAX_VALUES = 10


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return max(0.0, float(-(p * np.log2(p)).sum()))  # max: 1·log 1 gives -0.0


def partition_summary(parts: Sequence[np.ndarray], values: Sequence, names: Sequence[str] | None = None) -> dict:
    """Describe a partition of ``values`` (per-example labels or column values) among clients.

    Returns a JSON-serialisable dict:

    - ``clients``: client names (``names`` or ``client_0``, ``client_1``, ...);
    - ``values``: the distinct values, as strings, in :func:`distinct_values` order;
    - ``sizes``: examples per client; ``counts``: per client, examples of each value;
    - ``global_distribution``: each value's share of all partitioned examples;
    - ``tv_distance``: per client, the total-variation distance ½·Σ_v |p_k(v) − p(v)| between
      its value distribution and the global one (0 = IID, near 1 = disjoint), and
      ``mean_tv_distance`` (unweighted mean over clients);
    - ``entropy_bits``: per client, the entropy of its value distribution, ``mean_entropy_bits``
      and ``global_entropy_bits`` for comparison (lower = more skewed);
    - ``values_per_client``: distinct values each client holds, and its mean;
    - ``size_cv``: coefficient of variation of the sizes (0 = equal sizes); ``min_size``,
      ``max_size``, ``num_clients``, ``num_examples``.
    """
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    if not parts:
        raise ConfigError("partition summary: no clients")
    if names is None:
        names = [f"client_{k}" for k in range(len(parts))]
    elif len(names) != len(parts):
        raise ConfigError(f"partition summary: {len(names)} names for {len(parts)} clients")
    uniques, codes = distinct_values(values)
    counts = np.zeros((len(parts), len(uniques)), dtype=np.int64)
    for k, p in enumerate(parts):
        if len(p) and (p.min() < 0 or p.max() >= len(codes)):
            raise ConfigError(f"partition summary: client {names[k]} has indices outside 0..{len(codes) - 1}")
        counts[k] = np.bincount(codes[p], minlength=len(uniques))
    sizes = counts.sum(axis=1)
    total = counts.sum(axis=0)
    global_p = total / max(int(total.sum()), 1)
    local_p = counts / np.maximum(sizes, 1)[:, None]
    tv = 0.5 * np.abs(local_p - global_p).sum(axis=1)
    entropy = [_entropy_bits(row) for row in local_p]
    return {
        "num_clients": len(parts),
        "num_examples": int(sizes.sum()),
        "clients": [str(n) for n in names],
        "values": [str(v) for v in uniques],
        "sizes": sizes.tolist(),
        "counts": counts.tolist(),
        "global_distribution": global_p.tolist(),
        "tv_distance": tv.tolist(),
        "mean_tv_distance": float(tv.mean()),
        "entropy_bits": entropy,
        "mean_entropy_bits": float(np.mean(entropy)),
        "global_entropy_bits": _entropy_bits(global_p),
        "values_per_client": (counts > 0).sum(axis=1).tolist(),
        "mean_values_per_client": float((counts > 0).sum(axis=1).mean()),
        "size_cv": float(sizes.std() / sizes.mean()) if sizes.mean() > 0 else 0.0,
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
    }


def format_partition_summary(summary: dict) -> str:
    """A plain-text table of a :func:`partition_summary`: one row per client, then the statistics.

    At most ``TABLE_MAX_VALUES`` value columns are shown (the most frequent overall); the rest
    are summed into an "other" column.
    """
    values = summary["values"]
    counts = np.asarray(summary["counts"], dtype=np.int64).reshape(len(summary["clients"]), len(values))
    shown = list(range(len(values)))
    if len(values) > TABLE_MAX_VALUES:
        shown = sorted(np.argsort(-counts.sum(axis=0), kind="stable")[: TABLE_MAX_VALUES - 1].tolist())
    header = ["client", "size", *[values[v] for v in shown]]
    if len(shown) < len(values):
        header.append("other")
    header += ["TV", "H(bits)"]
    rows = []
    for k, client in enumerate(summary["clients"]):
        row = [client, str(summary["sizes"][k]), *[str(counts[k, v]) for v in shown]]
        if len(shown) < len(values):
            row.append(str(int(counts[k].sum() - counts[k, shown].sum())))
        row += [f"{summary['tv_distance'][k]:.3f}", f"{summary['entropy_bits'][k]:.2f}"]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    out.append(
        f"{summary['num_clients']} clients, {summary['num_examples']} examples, {len(values)} values; "
        f"sizes {summary['min_size']}..{summary['max_size']} (CV {summary['size_cv']:.2f}); "
        f"mean TV to global {summary['mean_tv_distance']:.3f}; "
        f"mean entropy {summary['mean_entropy_bits']:.2f} bits (global {summary['global_entropy_bits']:.2f}); "
        f"{summary['mean_values_per_client']:.1f} values per client"
    )
    return "\n".join(out)


def plot_partition(summary: dict, path: str | os.PathLike, title: str | None = None) -> str:
    """Write a PNG of stacked bars, one per client, one colour per value; return its path.

    Uses matplotlib's Agg canvas directly (no pyplot, so no global backend or figure state) and
    writes atomically (:func:`fedlora.files.atomic_figure`).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    clients, values = summary["clients"], summary["values"]
    counts = np.asarray(summary["counts"], dtype=np.int64).reshape(len(clients), len(values))

    fig = Figure(figsize=(min(max(6.0, 0.3 * len(clients) + 3.0), 30.0), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = colormaps["tab20" if len(values) > 10 else "tab10"]
    x = np.arange(len(clients))
    bottom = np.zeros(len(clients))
    for v, value in enumerate(values):
        ax.bar(x, counts[:, v], bottom=bottom, color=cmap(v % cmap.N), label=value, width=0.8)
        bottom += counts[:, v]
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    ax.set_title(title or f"Value distribution per client (mean TV to global {summary['mean_tv_distance']:.3f})")
    if len(clients) <= 40:
        long_names = max(len(c) for c in clients) > 3
        ax.set_xticks(x, clients, rotation=45 if long_names else 0, ha="right" if long_names else "center")
    if len(values) <= 20:
        ax.legend(title="value", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()

    from fedlora.files import atomic_figure

    return str(atomic_figure(fig, path))
