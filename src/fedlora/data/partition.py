"""Partitioners: split a dataset's example indices among simulated clients, IID or not.

Every partitioner takes the per-example ``values`` it skews over (the labels, or any column such
as an author id), returns one sorted ``int64`` index array per client, disjoint and covering all
indices, and is a pure function of its arguments and ``seed``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np

from fedlora.errors import ConfigError

METHODS = ("iid", "dirichlet", "pathological", "natural", "quantity_skew")


def distinct_values(values: Sequence) -> tuple[list, np.ndarray]:
    """The distinct values of ``values`` in a fixed order, and each example's index into them.

    Sortable values come out sorted; mixed types are ordered by their ``str``. The order is what
    ``partition(..., "natural")`` uses for its clients and ``partition_summary`` for its columns.
    """
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "biufU":
        uniques, codes = np.unique(values, return_inverse=True)
        return uniques.tolist(), codes.astype(np.int64)
    # Python scalars, not numpy ones, so that values print plainly in summaries and errors.
    keys = [v.item() if isinstance(v, np.generic) else v for v in values]
    try:
        uniques = sorted(set(keys))
    except TypeError:
        uniques = sorted(set(keys), key=lambda v: (type(v).__name__, str(v)))
    position = {v: i for i, v in enumerate(uniques)}
    return uniques, np.fromiter((position[v] for v in keys), dtype=np.int64, count=len(keys))


def partition(
    values: Sequence,
    num_clients: int | None,
    method: str,
    *,
    alpha: float = 0.5,
    min_size: int = 1,
    labels_per_client: int = 2,
    sizes_sigma: float = 1.0,
    seed: int = 0,
    max_retries: int = 100,
) -> list[np.ndarray]:
    """Split ``range(len(values))`` among ``num_clients`` clients.

    Methods:

    - ``"iid"``: a uniform random permutation cut into near-equal parts.
    - ``"dirichlet"``: for each distinct value v, the share of v's examples going to each client
      is drawn from Dir(α·1_N): the latent Dirichlet allocation of Yurochkin et al. 2019 and
      Hsu et al. 2019 ("Measuring the effects of non-identical data distribution"), the scheme of
      FedLab and of Flower Datasets' ``DirichletPartitioner`` without self-balancing. Small α:
      each client sees few values; large α: close to IID. The whole draw is repeated until every client has at least
      ``min_size`` examples, at most ``max_retries`` times.
    - ``"pathological"``: each client holds exactly ``labels_per_client`` distinct values (McMahan
      et al. 2017's shards; Li et al. 2022's "#C=k"). Values are dealt to clients as consecutive
      windows of a shuffled cycle of values, so every value goes to some client and each value to
      ⌊Nk/C⌋ or ⌈Nk/C⌉ clients; a value's examples are split evenly among its clients.
    - ``"natural"``: one client per distinct value, in :func:`distinct_values` order
      (``num_clients`` must be that count, or ``None``/``0`` for "as many as there are values").
    - ``"quantity_skew"``: IID labels, unequal sizes. Client shares are log-normal,
      exp(N(0, sizes_sigma²)), normalised; with ``sizes_sigma = 0`` they are Dir(α·1_N) instead
      (Li et al. 2022's quantity skew). Every client gets ``min_size`` first, the rest by share.

    Raises :class:`ConfigError` for an unknown method, bad parameters, or when no valid partition
    exists (the message names the client or value and what to change). No client is ever empty.
    """
    if method not in METHODS:
        close = difflib.get_close_matches(method, METHODS, n=2)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown partition method {method!r}{hint} Known: {', '.join(METHODS)}")
    n = len(values)
    if n == 0:
        raise ConfigError("cannot partition an empty dataset")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ConfigError(f"partition min_size must be an integer >= 1, got {min_size!r}")
    uniques, codes = distinct_values(values)
    if method == "natural":
        num_clients = _natural_clients(num_clients, len(uniques))
    _check_count("num_clients", num_clients)
    if n < num_clients * min_size:
        raise ConfigError(
            f"{n} examples cannot give {num_clients} clients at least min_size={min_size} each; "
            f"use fewer clients or a smaller min_size"
        )
    rng = np.random.default_rng(seed)

    if method == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif method == "dirichlet":
        parts = _dirichlet(codes, len(uniques), num_clients, alpha, min_size, max_retries, rng)
    elif method == "pathological":
        parts = _pathological(codes, uniques, num_clients, labels_per_client, rng)
    elif method == "natural":
        parts = [np.flatnonzero(codes == v) for v in range(len(uniques))]
    else:
        parts = _quantity_skew(n, num_clients, sizes_sigma, alpha, min_size, rng)

    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    for client, p in enumerate(parts):
        if len(p) < min_size:
            what = f"value {uniques[client]!r}" if method == "natural" else method
            raise ConfigError(
                f"client {client} ({what}) would get {len(p)} example(s), fewer than min_size={min_size}"
            )
    return parts


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"partition {name} must be an integer >= 1, got {value!r}")


def _natural_clients(num_clients, num_values: int) -> int:
    if num_clients in (None, 0):
        return num_values
    if num_clients != num_values:
        raise ConfigError(
            f"natural partition gives one client per distinct value: the data has {num_values} values "
            f"but num_clients={num_clients}; set num_clients to {num_values} (or 0 for 'as many as values')"
        )
    return num_clients


def _dirichlet(codes, num_values, num_clients, alpha, min_size, max_retries, rng) -> list[np.ndarray]:
    if not (isinstance(alpha, (int, float, np.floating)) and alpha > 0 and np.isfinite(alpha)):
        raise ConfigError(f"dirichlet partition alpha must be a positive number, got {alpha!r}")
    _check_count("max_retries", max_retries)
    by_value = [np.flatnonzero(codes == v) for v in range(num_values)]
    smallest = 0
    for _ in range(max_retries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_value:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            if not np.all(np.isfinite(shares)):
                # Tiny α can underflow every gamma draw to 0; the limit of Dir(α→0) is one-hot.
                shares = np.eye(num_clients)[rng.integers(num_clients)]
            # Cut points at the rounded cumulative shares: client k gets ~shares[k]·len(idx).
            cuts = np.round(np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                buckets[client].append(chunk)
        parts = [np.concatenate(b) for b in buckets]
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return parts
    raise ConfigError(
        f"dirichlet partition (alpha={alpha}, {num_clients} clients, {len(codes)} examples): after "
        f"{max_retries} draws some client still had {smallest} example(s) < min_size={min_size}; "
        f"use a larger alpha, fewer clients, or a smaller min_size"
    )


def _pathological(codes, uniques, num_clients, k, rng) -> list[np.ndarray]:
    num_values = len(uniques)
    _check_count("labels_per_client", k)
    if k > num_values:
        raise ConfigError(f"pathological partition: labels_per_client={k} but the data has only {num_values} values")
    if num_clients * k < num_values:
        raise ConfigError(
            f"pathological partition: {num_clients} clients x {k} labels each cannot cover all {num_values} values; "
            f"use at least {-(-num_values // k)} clients or more labels_per_client"
        )
    cycle = rng.permutation(num_values)
    # Client c takes the k consecutive values starting at position c·k of the cycle (mod C): the
    # windows tile positions 0..Nk-1, so they are distinct within a client (k <= C) and cover all
    # values (Nk >= C). Shuffling the clients keeps client 0 from always starting the cycle.
    order = rng.permutation(num_clients)
    holders: list[list[int]] = [[] for _ in range(num_values)]
    for slot, client in enumerate(order):
        for j in range(k):
            holders[cycle[(slot * k + j) % num_values]].append(int(client))
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for value, clients in enumerate(holders):
        idx = rng.permutation(np.flatnonzero(codes == value))
        if len(idx) < len(clients):
            raise ConfigError(
                f"pathological partition: value {uniques[value]!r} has {len(idx)} example(s) but {len(clients)} "
                f"clients need some of it; use fewer clients or fewer labels_per_client"
            )
        for client, chunk in zip(clients, np.array_split(idx, len(clients))):
            parts[client].append(chunk)
    return [np.concatenate(p) for p in parts]


def _quantity_skew(n, num_clients, sigma, alpha, min_size, rng) -> list[np.ndarray]:
    if not (isinstance(sigma, (int, float, np.floating)) and sigma >= 0 and np.isfinite(sigma)):
        raise ConfigError(f"quantity_skew sizes_sigma must be a number >= 0, got {sigma!r}")
    if sigma > 0:
        shares = rng.lognormal(0.0, float(sigma), size=num_clients)
    else:
        if not (isinstance(alpha, (int, float, np.floating)) and alpha > 0):
            raise ConfigError(f"quantity_skew with sizes_sigma=0 draws Dir(alpha): alpha must be > 0, got {alpha!r}")
        shares = rng.dirichlet(np.full(num_clients, float(alpha)))
        if not np.all(np.isfinite(shares)):
            shares = np.eye(num_clients)[rng.integers(num_clients)]
    shares = shares / shares.sum()
    # min_size each first, then the rest by largest remainder so the sizes add up exactly.
    rest = n - num_clients * min_size
    exact = shares * rest
    sizes = np.floor(exact).astype(np.int64)
    short = rest - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:short]] += 1
    sizes += min_size
    return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


def holdout(indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's ``indices`` into ``(train_idx, heldout_idx)`` for personalised evaluation.

    ``round(fraction · len)`` examples are held out, at least 1 whenever ``fraction > 0`` and the
    client has 2 or more, and never all of them (training keeps at least 1). Both halves are
    sorted; which examples are held out depends only on ``indices``, ``fraction`` and ``seed``.
    """
    if not (isinstance(fraction, (int, float, np.floating)) and 0.0 <= fraction < 1.0):
        raise ConfigError(f"holdout fraction must be in [0, 1), got {fraction!r}")
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    size = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        size = min(max(size, 1), n - 1)
    else:
        size = 0
    shuffled = np.random.default_rng(seed).permutation(indices)
    return np.sort(shuffled[size:]), np.sort(shuffled[:size])
