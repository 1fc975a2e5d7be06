"""The issue-14 grid, paired by seed: each variant's best, final and last-5 accuracy beside fedit's on
the same seed, and fedit's aggregation error over the variant's in rounds 1-10, while the two runs
are still on nearly the same trajectory (later, the runs have diverged and a per-round ratio
compares two different models), split by the factor aligned in each round.

    python docs/results/fedrot-official/paired.py runs/cpu-fedrot-official runs/cpu-fedrot-official-guard10 \
        > docs/results/fedrot-official/paired.md

The second folder holds the 10-round runs of the guard (fedrot λ = 1, ``guard = true``), paired in
rounds 1-10 only, and a 10-round ``guard = false`` run that must repeat the 100-round λ = 1 run's
first 10 rounds exactly (the check that pairing a 10-round run with a 100-round one is fair).

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
GUARD_VARIANTS = [("fedrot λ=1 + guard (rounds 0–10 only)", "guard-true/fedrot")]
EARLY = range(1, 11)  # rounds t = 1 … 10 (t counts from 0; round 0 aligns nothing)


def completed(path: Path) -> list[dict] | None:
    summary = path / "summary.json"
    if not summary.is_file() or json.loads(summary.read_text())["status"] != "completed":
        return None
    return RunDir(path).read_metrics()


def acc(rows: list[dict]) -> list[float]:
    return [r["eval"]["global"]["accuracy"] for r in rows if r.get("eval")]


def main(root: Path, guard_root: Path | None = None) -> None:
    seeds = sorted({p.name for p in root.glob("*/*/seed-*")})
    runs = {(name, s): completed(root / sub / s) for name, sub in VARIANTS for s in seeds}
    early_only = []
    if guard_root is not None:
        early_only = GUARD_VARIANTS
        runs.update({(name, s): completed(guard_root / sub / s) for name, sub in GUARD_VARIANTS for s in seeds})
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
    per_seed: dict[str, list[tuple[float, float, float, float]]] = {}
    for name, _ in VARIANTS[1:] + early_only:
        for s in done:
            rows, base = runs[(name, s)], runs[("fedit", s)]
            if rows is None:
                continue
            ratio = {t: base[t]["diagnostics"]["agg_error_rel"] / rows[t]["diagnostics"]["agg_error_rel"] for t in EARLY}
            odd = st.mean(v for t, v in ratio.items() if t % 2)
            even = st.mean(v for t, v in ratio.items() if not t % 2)
            rot = st.mean(rows[t]["diagnostics"]["rotation_size_mean"] for t in EARLY)
            per_seed.setdefault(name, []).append((odd, even, st.mean(ratio.values()), rot))
            print(f"| {name} | {s[5:]} | {odd:.3f} | {even:.3f} | {st.mean(ratio.values()):.3f} | {rot:.2e} |")
    print("\nThe same, mean ± population std over the seeds:\n")
    print("| variant | seeds | A-aligned rounds (odd t) | B-aligned rounds (even t) | all rounds 1–10 | ‖R − I‖_F |")
    print("|---|---|---|---|---|---|")
    for name, values in per_seed.items():
        cols = list(zip(*values))
        cells = [f"{st.mean(c):.3f} ± {st.pstdev(c):.3f}" for c in cols[:3]] + [f"{st.mean(cols[3]):.2e}"]
        print(f"| {name} | {len(values)} | " + " | ".join(cells) + " |")
    if guard_root is not None:
        guarded = [(s, t, runs[(GUARD_VARIANTS[0][0], s)][t]["diagnostics"].get("guarded_fraction"))
                   for s in done if runs[(GUARD_VARIANTS[0][0], s)] is not None for t in EARLY]
        print("\nThe guard's share of (client, layer) rotations put back to the identity, rounds 1–10, by aligned "
              "factor (mean over seeds):\n")
        print("| rounds | " + " | ".join(f"t = {t}" for t in EARLY) + " |")
        print("|---|" + "---|" * len(EARLY))
        print("| share reset | " + " | ".join(f"{st.mean(g for _, u, g in guarded if u == t):.2f}" for t in EARLY) + " |")
        check = completed(guard_root / "guard-false/fedrot/seed-11")
        full = runs[("fedrot λ=1 (alternate)", "seed-11")]
        if check is not None and full is not None:
            diff = max(abs(check[t]["diagnostics"]["agg_error_rel"] - full[t]["diagnostics"]["agg_error_rel"])
                       for t in range(len(check)))
            print(f"\nPairing check: the 10-round `guard = false` run of seed 11 against the 100-round λ = 1 run, "
                  f"rounds 0–{len(check) - 1}: max |Δ relative aggregation error| = {diff:.1e}.")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cpu-fedrot-official"),
         Path(sys.argv[2]) if len(sys.argv) > 2 else None)
