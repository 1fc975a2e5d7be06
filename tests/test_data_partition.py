"""Partitioners: exact cover, seeding, the skew each method promises, and clear errors."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.data import METHODS, distinct_values, holdout, partition
from fedlora.errors import ConfigError


def labels(n=600, num_values=4, seed=0):
    return np.random.default_rng(seed).integers(0, num_values, n)


def assert_disjoint_cover(parts, n):
    seen = np.zeros(n, dtype=np.int64)
    for p in parts:
        assert p.dtype == np.int64
        np.add.at(seen, p, 1)
    assert (seen == 1).all(), f"indices covered {set(seen.tolist())} times instead of exactly once"
    assert sum(len(p) for p in parts) == n


def tv_to_global(parts, values):
    """Mean total-variation distance between client and global value distributions, by hand."""
    values = list(values)
    total = Counter(values)
    out = []
    for p in parts:
        local = Counter(values[i] for i in p)
        out.append(0.5 * sum(abs(local[v] / len(p) - total[v] / len(values)) for v in total))
    return float(np.mean(out))


def clients_for(method, k=10):
    return 0 if method == "natural" else k


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_a_disjoint_cover_with_no_empty_client(method):
    y = labels()
    parts = partition(y, clients_for(method), method, seed=3)
    assert_disjoint_cover(parts, len(y))
    assert min(len(p) for p in parts) >= 1
    assert all((np.diff(p) > 0).all() for p in parts)  # sorted, hence no repeats within a client


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_partition_other_seed_different(method):
    y = labels()
    a = partition(y, clients_for(method), method, seed=7)
    b = partition(y, clients_for(method), method, seed=7)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    if method != "natural":  # natural has nothing random in it
        c = partition(y, clients_for(method), method, seed=8)
        assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_dirichlet_skew_moves_with_alpha():
    y = labels(2000, num_values=5)
    tv = {
        alpha: np.mean([tv_to_global(partition(y, 10, "dirichlet", alpha=alpha, seed=s), y) for s in range(4)])
        for alpha in (0.1, 1.0, 100.0)
    }
    assert tv[0.1] > tv[1.0] > tv[100.0]
    assert tv[0.1] > 5 * tv[100.0]
    assert tv[100.0] < 0.1  # near IID
    assert tv[0.1] > 0.5  # most clients dominated by one or two values


def test_dirichlet_over_any_column_of_strings():
    authors = np.random.default_rng(1).choice(["ann", "bob", "cy"], 300)
    parts = partition(list(authors), 5, "dirichlet", alpha=0.1, seed=0)
    assert_disjoint_cover(parts, 300)
    assert tv_to_global(parts, authors) > 0.3


def test_dirichlet_min_size_is_honoured():
    y = labels(1000)
    for seed in range(3):
        parts = partition(y, 10, "dirichlet", alpha=0.3, min_size=25, seed=seed)
        assert min(len(p) for p in parts) >= 25


def test_dirichlet_impossible_min_size_raises_a_clear_error():
    y = labels(200)
    with pytest.raises(ConfigError, match=r"(?s)min_size=3.*larger alpha.*fewer clients"):
        partition(y, 50, "dirichlet", alpha=0.01, min_size=3, max_retries=5, seed=0)
    with pytest.raises(ConfigError, match="200 examples cannot give 50 clients"):
        partition(y, 50, "iid", min_size=5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_exactly_k_values_per_client_and_covers_all(k):
    y = labels(1000, num_values=6)
    parts = partition(y, 8, "pathological", labels_per_client=k, seed=k)
    assert_disjoint_cover(parts, len(y))
    held = [set(y[p].tolist()) for p in parts]
    assert all(len(h) == k for h in held)
    assert set().union(*held) == set(range(6))
    # Values are dealt evenly: each goes to floor(Nk/C) or ceil(Nk/C) clients.
    holders = Counter(v for h in held for v in h)
    assert set(holders.values()) <= {8 * k // 6, -(-8 * k // 6)}


def test_pathological_rejects_impossible_settings():
    y = labels(100, num_values=6)
    with pytest.raises(ConfigError, match="cannot cover all 6 values"):
        partition(y, 2, "pathological", labels_per_client=2)
    with pytest.raises(ConfigError, match="only 6 values"):
        partition(y, 10, "pathological", labels_per_client=7)
    rare = np.array([0] * 50 + [1] * 50 + [2])  # value 2 has one example
    with pytest.raises(ConfigError, match="value 2 has 1 example"):
        partition(rare, 6, "pathological", labels_per_client=2, seed=0)


def test_natural_gives_one_value_per_client():
    accounts = np.random.default_rng(2).choice(["bbc", "cnn", "fox", "npr"], 400)
    parts = partition(accounts, 0, "natural")
    assert_disjoint_cover(parts, 400)
    uniques, _ = distinct_values(accounts)
    assert [set(accounts[p]) for p in parts] == [{u} for u in uniques]
    assert len(partition(accounts, None, "natural")) == len(partition(accounts, 4, "natural")) == 4
    with pytest.raises(ConfigError, match="has 4 values but num_clients=3"):
        partition(accounts, 3, "natural")


@pytest.mark.parametrize("sigma", [1.0, 0.0])  # log-normal sizes; sigma 0: Dir(alpha) over clients
def test_quantity_skew_has_unequal_sizes_and_iid_labels(sigma):
    y = labels(3000)
    parts = partition(y, 10, "quantity_skew", sizes_sigma=sigma, alpha=1.0, min_size=5, seed=4)
    assert_disjoint_cover(parts, len(y))
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 5
    assert sizes.std() / sizes.mean() > 0.3
    assert sizes.max() > 2 * sizes.min()
    # Labels stay IID: far less skewed than a Dirichlet(0.1) label split of the same data.
    assert tv_to_global(parts, y) < 0.5 * tv_to_global(partition(y, 10, "dirichlet", alpha=0.1, seed=4), y)


def test_bad_method_and_counts_raise_config_errors():
    y = labels(50)
    with pytest.raises(ConfigError, match="did you mean dirichlet"):
        partition(y, 5, "dirichelt")
    with pytest.raises(ConfigError, match="num_clients"):
        partition(y, 0, "iid")
    with pytest.raises(ConfigError, match="alpha"):
        partition(y, 5, "dirichlet", alpha=0.0)
    with pytest.raises(ConfigError, match="empty dataset"):
        partition([], 5, "iid")


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    num_clients=st.integers(1, 12),
    num_values=st.integers(1, 6),
    method=st.sampled_from(METHODS),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_disjoint_cover_or_clear_error(n, num_clients, num_values, method, seed):
    y = np.random.default_rng(seed).integers(0, num_values, n)
    clients = 0 if method == "natural" else num_clients
    try:
        parts = partition(y, clients, method, alpha=0.5, labels_per_client=min(2, num_values), seed=seed)
    except ConfigError:
        # Only methods with real feasibility limits may refuse, and never when the data is ample.
        assert method in ("dirichlet", "pathological") or n < num_clients
        assert not (method == "pathological" and n >= 50 * num_clients and num_clients * 2 >= num_values >= 2)
        return
    assert_disjoint_cover(parts, n)
    assert min(len(p) for p in parts) >= 1
    if method == "natural":
        assert len(parts) == len(set(y.tolist()))


def test_holdout_keeps_a_seeded_slice_of_each_client():
    idx = np.arange(100, 140)
    train, held = holdout(idx, 0.2, seed=5)
    assert len(held) == 8 and len(train) == 32
    assert np.array_equal(np.sort(np.concatenate([train, held])), idx)
    again = holdout(idx, 0.2, seed=5)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(holdout(idx, 0.2, seed=6)[1], held)
    # Tiny clients: at least one held out when there are 2, never all; none from a single example.
    assert [len(h) for _, h in (holdout(np.arange(k), 0.1, 0) for k in (1, 2, 3))] == [0, 1, 1]
    assert len(holdout(np.arange(5), 0.99, 0)[0]) == 1
    assert len(holdout(np.arange(5), 0.0, 0)[1]) == 0
    with pytest.raises(ConfigError, match="holdout fraction"):
        holdout(idx, 1.0, 0)


def test_distinct_values_orders_mixed_types():
    uniques, codes = distinct_values(["b", 1, "a", 1])
    assert uniques == [1, "a", "b"]
    assert codes.tolist() == [2, 0, 1, 0]
