"""`fedlora demo` drives every strategy's hooks end to end, as an engine would."""

import re

from fedlora.cli import main


def test_demo_runs_every_strategy_and_exact_ones_are_exact(capsys):
    assert main(["demo", "--rounds", "2", "--clients", "3", "--dim", "12", "--layers", "2", "--rank", "2"]) == 0
    out = capsys.readouterr().out
    from fedlora.strategies import strategy_names

    rows = {m.group(1): m.group(2) for m in re.finditer(r"│ (\w+)\s*│ (\S+)", out)}
    assert set(rows) == set(strategy_names())
    rows = {k: float(v) for k, v in rows.items() if v != "diverged"}
    for exact in ("ffa", "rolora", "flora", "fedex"):
        assert rows[exact] < 1e-5, (exact, rows[exact])
    assert rows["fedit"] > 1e-4  # factor averaging of heterogeneous clients is not exact
