"""Partition summaries against hand-computed statistics, and the PNG they plot."""

import json
import math
import os

import numpy as np
import pytest

from fedlora.data import format_partition_summary, partition, partition_summary, plot_partition
from fedlora.errors import ConfigError


def test_summary_statistics_match_a_hand_computed_case():
    values = ["a", "a", "b", "b", "a", "b"]
    parts = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    s = partition_summary(parts, values, names=["x", "y", "z"])
    assert s["clients"] == ["x", "y", "z"]
    assert s["values"] == ["a", "b"]
    assert s["sizes"] == [2, 2, 2]
    assert s["counts"] == [[2, 0], [0, 2], [1, 1]]
    assert s["global_distribution"] == [0.5, 0.5]
    # Pure clients are 1/2 away from the 50/50 global distribution, the mixed one 0.
    assert s["tv_distance"] == pytest.approx([0.5, 0.5, 0.0])
    assert s["mean_tv_distance"] == pytest.approx(1 / 3)
    assert s["entropy_bits"] == pytest.approx([0.0, 0.0, 1.0])
    assert s["mean_entropy_bits"] == pytest.approx(1 / 3)
    assert s["global_entropy_bits"] == pytest.approx(1.0)
    assert s["values_per_client"] == [1, 1, 2]
    assert s["size_cv"] == 0.0
    json.dumps(s)  # saved into the run directory as is


def test_summary_entropy_against_the_formula_on_a_random_partition():
    y = np.random.default_rng(0).integers(0, 3, 500)
    parts = partition(y, 4, "dirichlet", alpha=0.5, seed=1)
    s = partition_summary(parts, y)
    for k, p in enumerate(parts):
        freq = np.bincount(y[p], minlength=3) / len(p)
        expected = -sum(q * math.log2(q) for q in freq if q > 0)
        assert s["entropy_bits"][k] == pytest.approx(expected)
    assert sum(s["sizes"]) == s["num_examples"] == 500
    assert s["size_cv"] == pytest.approx(np.std(s["sizes"]) / np.mean(s["sizes"]))


def test_summary_rejects_mismatched_names_and_bad_indices():
    with pytest.raises(ConfigError, match="2 names for 1 clients"):
        partition_summary([np.array([0])], [0], names=["a", "b"])
    with pytest.raises(ConfigError, match="client client_0 has indices outside 0..1"):
        partition_summary([np.array([0, 5])], [0, 1])


def test_format_lists_every_client_and_folds_many_values():
    y = np.arange(300) % 15  # 15 values: more columns than the table shows
    s = partition_summary(partition(y, 5, "iid", seed=0), y)
    text = format_partition_summary(s)
    lines = text.splitlines()
    assert len(lines) == 2 + 5 + 1
    assert all(f"client_{k}" in text for k in range(5))
    assert "other" in lines[0] and "TV" in lines[0]
    assert "5 clients, 300 examples, 15 values" in lines[-1]


def test_plot_writes_a_valid_png_atomically(tmp_path):
    import matplotlib.image

    y = np.random.default_rng(0).integers(0, 4, 400)
    s = partition_summary(partition(y, 8, "dirichlet", alpha=0.3, seed=0), y)
    target = tmp_path / "plots" / "partition.png"
    assert plot_partition(s, target) == str(target)
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    image = matplotlib.image.imread(str(target))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert os.listdir(target.parent) == ["partition.png"]  # no temporary file left behind
