"""The aligned factor in each round's diagnostics, and the per-factor section of ``fedlora report``,
checked against a recomputation from the runs' metrics.jsonl files on a tiny BERT grid."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sim_tiny import tiny_fixture, tiny_overrides
from test_diagnostics import rand_adapter

from fedlora.cli import main
from fedlora.diagnostics import round_diagnostics
from fedlora.errors import AggregationInputError
from fedlora.strategies import ClientContext, ClientUpdate, get_strategy

tiny = tiny_fixture("alignment_report", n=120)
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml"
ROUNDS = 4  # t = 0..3: A-aligned rounds 1 and 3, B-aligned round 2, so a class mean spans two rounds
SEEDS = (11, 12)
NUM = r"(-?[\d.]+(?:e[-+]\d+)?)"


def fedrot_updates(rounds: list[int]):
    """Client k's FedRot (λ = 1) upload after training in round ``rounds[k]``, and the reference state."""
    g = torch.Generator().manual_seed(3)
    strategy = get_strategy("fedrot", lam=1.0)
    state = strategy.init_state(rand_adapter([(12, 10)], [3], g))
    updates = []
    for k, t in enumerate(rounds):
        ad, info = strategy.before_upload(rand_adapter([(12, 10)], [3], g), state.adapter, ClientContext(client_id=k, round=t))
        updates.append(ClientUpdate(client_id=k, adapter=ad, info=info))
    return strategy, state, updates


def test_diagnostics_record_the_aligned_factor_and_refuse_clients_that_disagree():
    for t, factor in ((1, "A"), (2, "B"), (3, "A")):  # alternate: A in odd rounds, B in even rounds ≥ 2
        strategy, state, updates = fedrot_updates([t] * 3)
        diag = round_diagnostics(updates, [1, 1, 1], strategy.aggregate(updates, state))
        assert diag.aligned == factor and diag.to_dict()["aligned"] == factor
    strategy, state, updates = fedrot_updates([0, 0])  # round 0 aligns nothing
    assert "aligned" not in round_diagnostics(updates, [1, 1], strategy.aggregate(updates, state)).to_dict()
    strategy, state, updates = fedrot_updates([1, 1, 2])
    with pytest.raises(AggregationInputError, match=r"A by client\(s\) 0, 1; B by client\(s\) 2"):
        round_diagnostics(updates, [1, 1, 1], strategy.aggregate(updates, state))
    strategy, state, updates = fedrot_updates([1, 0])  # one aligned A, the other nothing
    with pytest.raises(AggregationInputError, match=r"A by client\(s\) 0; nothing by client\(s\) 1"):
        round_diagnostics(updates, [1, 1], strategy.aggregate(updates, state))


def compare(tiny, out: Path, strategies: str, *extra: str) -> None:
    root, model, data = tiny
    sets = [a for kv in tiny_overrides(root, model, data, train__rounds=ROUNDS, train__lr=0.05, data__eval_examples=24,
                                       eval__personalised="false") for a in ("--set", kv)]
    assert main(["compare", str(QUICKSTART), "--strategies", strategies, "--seeds", ",".join(map(str, SEEDS)),
                 "--output-dir", str(out), "--quiet", "--no-report", *sets, *extra]) == 0


@pytest.fixture(scope="module")
def report(tiny):
    """fedit and fedrot (λ = 1, alternate) in one grid, fedrot align=B in another; the merged report."""
    root = tiny[0]
    compare(tiny, root / "main", "fedit")
    compare(tiny, root / "main", "fedrot", "--grid", "strategy.options.lam=1.0")
    compare(tiny, root / "ablation", "fedrot", "--grid", "strategy.options.align=B", "--set", "strategy.options.lam=1.0")
    out = root / "report"
    assert main(["report", str(root / "main"), str(root / "ablation"), "--output", str(out)]) == 0
    return root, out


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def section_rows(text: str, header: str, first: int) -> dict[tuple[str, str], list[tuple[float | None, float | None]]]:
    """(variant, rounds) → the (mean, std) cells from column ``first`` on ("—": (None, None)) of the
    section's table whose header row starts with ``header``."""
    lines = text.split("## Aggregation error by aligned factor", 1)[1].splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(header))
    out = {}
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[(cells[0], cells[1])] = [(None, None) if c == "—" else tuple(map(float, re.fullmatch(f"{NUM} ± {NUM}", c).groups()))
                                     for c in cells[first:]]
    return out


def class_name(variant: str, c: str) -> str:
    if variant == "fedit":  # aligns nothing: its rounds are named by parity
        return {"0": "round 0", "A": "odd t (FedRot's A rounds)", "B": "even t ≥ 2 (FedRot's B rounds)"}[c]
    return {"0": "round 0 (none aligned)", "A": "A-aligned", "B": "B-aligned"}[c]


def test_metrics_rows_say_which_factor_was_aligned(report):
    root, _ = report
    for seed in SEEDS:
        alternate = [r["diagnostics"].get("aligned") for r in rows_of(root / f"main/lam-1.0/fedrot/seed-{seed}")]
        assert alternate == [None] + ["A" if t % 2 else "B" for t in range(1, ROUNDS)]
        assert [r["diagnostics"].get("aligned") for r in rows_of(root / f"ablation/align-B/fedrot/seed-{seed}")] == \
            [None] + ["B"] * (ROUNDS - 1)
        assert all("aligned" not in r["diagnostics"] for r in rows_of(root / f"main/default/fedit/seed-{seed}"))


def test_per_factor_table_matches_a_recomputation_from_metrics(report):
    root, out = report
    text = (out / "summary.md").read_text()
    errors = section_rows(text, "| variant | rounds | rounds per seed", 4)
    ratios = section_rows(text, "| variant | rounds | seeds paired", 3)
    runs = {"fedit": "main/default/fedit", "fedrot[lam=1.0]": "main/lam-1.0/fedrot",
            "fedrot[align=B,lam=1.0]": "ablation/align-B/fedrot"}
    # the class of round t, written out by hand: fedit by parity, fedrot by its schedule
    def alternate(t):
        return "0" if t == 0 else "AB"[1 - t % 2]

    classes = {"fedit": alternate, "fedrot[lam=1.0]": alternate, "fedrot[align=B,lam=1.0]": lambda t: "0" if t == 0 else "B"}
    fedit = {s: rows_of(root / f"{runs['fedit']}/seed-{s}") for s in SEEDS}
    checked = 0
    for variant, folder in runs.items():
        for c in "0AB":
            per_seed = []
            for s in SEEDS:
                rows = [r for r in rows_of(root / f"{folder}/seed-{s}") if classes[variant](r["round"]) == c]
                per_seed.append(rows)
            if not per_seed[0]:
                assert (variant, class_name(variant, c)) not in errors
                continue
            rel = [np.mean([r["diagnostics"]["agg_error_rel"] for r in rows]) for rows in per_seed]
            ab = [np.mean([r["diagnostics"]["agg_error"] for r in rows]) for rows in per_seed]
            got = errors[(variant, class_name(variant, c))]
            for (m, s), vals in zip(got, (rel, ab)):
                assert m == pytest.approx(np.mean(vals), rel=2e-3) and s == pytest.approx(np.std(vals), rel=2e-3, abs=1e-12)
            rot = [np.mean([r["diagnostics"].get("rotation_size_mean", np.nan) for r in rows]) for rows in per_seed]
            if variant == "fedit" or c == "0":
                assert got[2] == (None, None)
            else:
                assert got[2][0] == pytest.approx(np.mean(rot), abs=6e-4) and np.mean(rot) > 0
            checked += 1
            if variant == "fedit":
                continue
            stats = {k: {"mean": [], "of_means": []} for k in ("agg_error_rel", "agg_error")}
            for s, rows in zip(SEEDS, per_seed):
                ref = {r["round"]: r["diagnostics"] for r in fedit[s]}
                for k in stats:
                    a = [ref[r["round"]][k] for r in rows]
                    b = [r["diagnostics"][k] for r in rows]
                    stats[k]["mean"].append(np.mean(np.divide(a, b)))
                    stats[k]["of_means"].append(np.mean(a) / np.mean(b))
            want = [stats[k][w] for k in ("agg_error_rel", "agg_error") for w in ("mean", "of_means")]
            for (m, s), vals in zip(ratios[(variant, class_name(variant, c))], want):
                assert m == pytest.approx(np.mean(vals), abs=6e-4) and s == pytest.approx(np.std(vals), abs=6e-4)
            if c == "0":  # round 0 aligns nothing: the same seed gives fedit's round exactly
                assert ratios[(variant, class_name(variant, c))][0] == (1.0, 0.0)
    assert checked == 8  # fedit 0/A/B, fedrot 0/A/B, fedrot[align=B] 0/B
    assert {v for v, _ in errors} == set(runs) and "fedit" not in {v for v, _ in ratios}
    png = out / "plots" / "aligned-factor.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plots/aligned-factor.png" in text


def test_no_section_without_fedrot(report, tmp_path):
    root, _ = report
    assert main(["report", str(root / "main" / "default"), "--output", str(tmp_path)]) == 0
    assert "aligned factor" not in (tmp_path / "summary.md").read_text()
