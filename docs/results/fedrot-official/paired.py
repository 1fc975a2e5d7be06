"""The issue-14 grid, paired by seed: each variant's best, final and last-5 accuracy beside fedit's on
the same seed, and fedit's aggregation error over the variant's in rounds 1-10, while the two runs
are still on nearly the same trajectory (later, the runs have diverged and a per-round ratio
compares two different models), split by the factor aligned in each round.

    python docs/results/fedrot-official/paired.py runs/cpu-fedrot-official > docs/results/fedrot-official/paired.md

Reads each run's metrics.jsonl through fedlora (the one reader); only completed runs count.
"""

from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path

from fedlora.runtime.rundir import RunDir

VARIANTS = [("fedit", "default/fedit"), ("fedrot λ=1 (alternate)", "lam-1.0/fedrot"),
            ("fedrot λ=0.5 (alternate)", "lam-0.5/fedrot"), ("fedrot align=A", "align-A/fedrot"),
            ("fedrot align=B", "align-B/fedrot"), ("fedrot align=joint", "align-joint/fedrot")]
EARLY = range(1, 11)  # rounds t = 1 … 10 (t counts from 0; round 0 aligns nothing)


def completed(path: Path) -> list[dict] | None:
    summary = path / "summary.json"
    if not summary.is_file() or json.loads(summary.read_text())["status"] != "completed":
        return None
    return RunDir(path).read_metrics()


def acc(rows: list[dict]) -> list[float]:
    return [r["eval"]["global"]["accuracy"] for r in rows if r.get("eval")]


def main(root: Path) -> None:
    seeds = sorted({p.name for p in root.glob("*/*/seed-*")})
    runs = {(name, s): completed(root / sub / s) for name, sub in VARIANTS for s in seeds}
    done = [s for s in seeds if runs[("fedit", s)] is not None]
    print(f"Seeds with a completed fedit run: {', '.join(x.removeprefix('seed-') for x in done) or 'none'}.\n")
    print("| variant | seed | best acc | final acc | mean last 5 | best − fedit's | last 5 − fedit's |")
    print("|---|---|---|---|---|---|---|")
    for name, _ in VARIANTS:
        for s in done:
            rows, base = runs[(name, s)], runs[("fedit", s)]
            if rows is None:
                print(f"| {name} | {s[5:]} | not run yet | | | | |")
                continue
            a, b = acc(rows), acc(base)
            print(f"| {name} | {s[5:]} | {max(a):.3f} | {a[-1]:.3f} | {st.mean(a[-5:]):.3f} | "
                  f"{max(a) - max(b):+.3f} | {st.mean(a[-5:]) - st.mean(b[-5:]):+.3f} |")
    print("\nfedit's relative aggregation error over the variant's, rounds 1–10, same seed and round "
          "(mean of the per-round ratios; > 1: the variant's error is smaller), and the variant's mean "
          "‖R − I‖_F in those rounds:\n")
    print("| variant | seed | A-aligned rounds (odd t) | B-aligned rounds (even t) | all rounds 1–10 | ‖R − I‖_F |")
    print("|---|---|---|---|---|---|")
    for name, _ in VARIANTS[1:]:
        for s in done:
            rows, base = runs[(name, s)], runs[("fedit", s)]
            if rows is None:
                continue
            ratio = {t: base[t]["diagnostics"]["agg_error_rel"] / rows[t]["diagnostics"]["agg_error_rel"] for t in EARLY}
            odd = st.mean(v for t, v in ratio.items() if t % 2)
            even = st.mean(v for t, v in ratio.items() if not t % 2)
            rot = [rows[t]["diagnostics"]["rotation_size_mean"] for t in EARLY]
            print(f"| {name} | {s[5:]} | {odd:.3f} | {even:.3f} | {st.mean(ratio.values()):.3f} | {st.mean(rot):.2e} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cpu-fedrot-official"))
