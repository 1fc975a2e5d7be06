"""The derived tables and plots of docs/results/README.md, from the runs of run-grid.sh.

    python docs/results/make_results.py          # after run-grid.sh; reads runs/, writes docs/results/

Writes ``derived.md`` (the λ scan with fedit as λ = 0, the aggregation-error ratios, the random
rotation, the rank study at two client lrs), ``lambda.png``, ``agg-error.png``, ``rank-lr.png`` and ``runs.csv`` (every
run's per-round series, so any table here can be recomputed without the run directories). Everything
is read through :func:`fedlora.experiments.run_results.run_stats`, the numbers ``fedlora report`` prints.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from fedlora.experiments.grid import find_runs
from fedlora.experiments.run_results import run_stats

HERE = Path(__file__).resolve().parent
RUNS = HERE.parents[1] / "runs"
MAIN = RUNS / "cpu-fedrot-vs-fedit"
# the rank study's grids per client lr: (lr, folder of sfed and fedsa, folder of fedsa with rsLoRA scaling)
RANK_GRIDS = [(5e-3, "cpu-sfed-rank", "cpu-sfed-rank-rslora"),
              (5e-4, "cpu-sfed-rank-lr5e-4", "cpu-sfed-rank-rslora-lr5e-4")]
RANKS = (4, 64, 256)


def load(root: Path) -> list[dict]:
    out = []
    for f in find_runs(root) if root.is_dir() else []:
        st = run_stats(f["run_dir"])
        st.update(setting=f["setting"], strategy=f["strategy"], seed=f["seed"], grid=root.name, run_dir=f["run_dir"])
        out.append(st)
    return out


def label_prior_baseline(run_dir: Path) -> dict[str, float]:
    """What predicting a constant label scores: on the global validation subset, the training set's
    majority label; on each client's held-out slice (as the personalised evaluation reads it), that
    client's own majority label, weighted by slice size. A model that learned only the label mix
    scores this."""
    from fedlora.config import load_config
    from fedlora.runtime.federation import prepare

    cfg = load_config(Path(run_dir) / "config.toml")
    fed = prepare(cfg, lambda s: None)
    labels = fed.train.labels
    top = np.bincount(labels).argmax()
    glob = float(np.mean(fed.validation.labels[fed.eval_indices] == top))
    hits = n = 0
    for train_idx, held in zip(fed.client_train, fed.client_heldout):
        held = held[: cfg.eval.client_examples] if cfg.eval.client_examples > 0 else held
        mine = np.bincount(labels[train_idx]).argmax()
        hits += int(np.sum(labels[held] == mine))
        n += len(held)
    return {"global": glob, "personal": hits / n}


def pick(runs, setting, strategy):
    return sorted((r for r in runs if r["setting"] == setting and r["strategy"] == strategy), key=lambda r: r["seed"])


def ms(vals, spec=".4f"):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    return f"{format(float(np.mean(vals)), spec)} ± {format(float(np.std(vals)), spec.lstrip('+'))}"


def main() -> int:
    main_runs = load(MAIN)
    rank_runs = [r for _, plain, rs in RANK_GRIDS for r in load(RUNS / plain) + load(RUNS / rs)]
    lines = ["# Derived tables (docs/results/make_results.py)", ""]

    # ---- comparison 2a: the accuracy ordering, and each strategy's paired difference to fedit ----
    strategies = ["fedit", "fedrot", "ffa", "rolora", "flexlora", "fedsa", "subspace"]
    fedit_by_seed = {r["seed"]: r for r in pick(main_runs, "default", "fedit")}
    rows = []
    for st in strategies:
        runs = pick(main_runs, "default", st)
        if not runs:
            continue
        diff = [r["best"] - fedit_by_seed[r["seed"]]["best"] for r in runs if r["seed"] in fedit_by_seed]
        dl5 = [r["last5"] - fedit_by_seed[r["seed"]]["last5"] for r in runs if r["seed"] in fedit_by_seed]
        rows.append((float(np.mean([r["best"] for r in runs])), st, runs, diff, dl5))
    lines += ["## Comparison 2a: accuracy ordering (N = 10, Dirichlet 0.5)", "",
              "Sorted by best global accuracy. Paired differences to fedit are per seed (the same seed gives "
              "the same partition, initial adapter and evaluation subset), then mean ± std.", "",
              "| strategy | seeds | best acc | Δ best vs fedit | mean last 5 | Δ last 5 vs fedit | best personalised (w) |",
              "|---|---|---|---|---|---|---|"]
    for _, st, runs, diff, dl5 in sorted(rows, key=lambda x: -x[0]):
        lines.append(f"| {st} | {len(runs)} | {ms([r['best'] for r in runs])} | {ms(diff, '+.4f')} | "
                     f"{ms([r['last5'] for r in runs])} | {ms(dl5, '+.4f')} | {ms([r['personal_best'] for r in runs])} |")

    # ---- comparison 4: basis overlap from round 2 on ----
    lines += ["", "## Comparison 4: basis overlap (client B vs global B)", "",
              "| strategy | seeds | round 1 | mean over rounds ≥ 2 | final round |", "|---|---|---|---|---|"]
    for st in strategies:
        runs = [r for r in pick(main_runs, "default", st) if r["series"]["basis_overlap"]]
        if runs:
            ov = [dict(r["series"]["basis_overlap"]) for r in runs]
            lines.append(f"| {st} | {len(runs)} | {ms([o[1] for o in ov])} | "
                         f"{ms([np.mean([v for t, v in o.items() if t >= 2]) for o in ov])} | "
                         f"{ms([o[max(o)] for o in ov])} |")
    lines.append("")

    # ---- λ scan: fedit is λ = 0 (bit-identical, tested), the main grid's fedrot is λ = 0.4 ----
    scan = [(0.0, pick(main_runs, "default", "fedit")), (0.2, pick(main_runs, "lam-0.2", "fedrot")),
            (0.4, pick(main_runs, "default", "fedrot")), (0.6, pick(main_runs, "lam-0.6", "fedrot")),
            (1.0, pick(main_runs, "lam-1.0", "fedrot"))]
    random_gauge = pick(main_runs, "gauge-random", "fedrot")
    lines += ["## Comparison 2b and 5: FedRot's λ, and a random rotation", "",
              "Δ: paired with fedit (λ = 0) on the same seed, then mean ± std.", "",
              "| fedrot | seeds | best acc (max over rounds) | Δ best | final acc | mean last 5 | Δ last 5 | "
              "mean rel. agg. error |",
              "|---|---|---|---|---|---|---|---|"]
    for lam, runs in scan + [("random R", random_gauge)]:
        name = f"λ = {lam}" + (" (fedit)" if lam == 0.0 else " (default)" if lam == 0.4 else "") \
            if lam != "random R" else "Haar-random R"
        d_best = [r["best"] - fedit_by_seed[r["seed"]]["best"] for r in runs if r["seed"] in fedit_by_seed]
        d_last = [r["last5"] - fedit_by_seed[r["seed"]]["last5"] for r in runs if r["seed"] in fedit_by_seed]
        lines.append(f"| {name} | {len(runs)} | {ms([r['best'] for r in runs])} | {ms(d_best, '+.4f')} | "
                     f"{ms([r['final'] for r in runs])} | {ms([r['last5'] for r in runs])} | {ms(d_last, '+.4f')} | "
                     f"{ms([r['agg_error_rel'] for r in runs], '.3e')} |")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = [lam for lam, runs in scan if runs]
    for ax, key, title in ((axes[0], "best", "best global accuracy"), (axes[1], "agg_error_rel", "mean rel. aggregation error")):
        ys = [[r[key] for r in runs] for _, runs in scan if runs]
        ax.errorbar(xs, [np.mean(y) for y in ys], yerr=[np.std(y) for y in ys], marker="o", capsize=3, label="fedrot (λ = 0: fedit)")
        if random_gauge:
            v = [r[key] for r in random_gauge]
            ax.axhline(np.mean(v), color="tab:red", ls="--", label="Haar-random rotation")
        ax.set(xlabel="λ", title=f"{title} (mean ± std, 3 seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(HERE / "lambda.png", dpi=120)
    plt.close(fig)

    # ---- comparison 1: aggregation error, fedit / fedrot, per seed and per round ----
    lines += ["", "## Comparison 1: aggregation error, fedit against fedrot", "",
              "Ratio of fedit's relative aggregation error to fedrot's, per seed: the mean over rounds of "
              "each, and the median of the per-round ratios over rounds ≥ 2 (round 1 has no alignment).", "",
              "| fedrot | seed | fedit mean | fedrot mean | ratio of means | median per-round ratio (rounds ≥ 2) |",
              "|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for lam, setting in ((0.4, "default"), (1.0, "lam-1.0")):
        for a, b in zip(pick(main_runs, "default", "fedit"), pick(main_runs, setting, "fedrot")):
            ea, eb = dict(a["series"]["agg_error_rel"]), dict(b["series"]["agg_error_rel"])
            common = [t for t in sorted(ea) if t in eb and t >= 2]
            per_round = [ea[t] / eb[t] for t in common]
            lines.append(f"| λ = {lam} | {a['seed']} | {a['agg_error_rel']:.3e} | {b['agg_error_rel']:.3e} | "
                         f"{a['agg_error_rel'] / b['agg_error_rel']:.2f}× | {np.median(per_round):.2f}× |")
    for label, setting, strategy in (("fedit", "default", "fedit"), ("fedrot λ=0.4", "default", "fedrot"),
                                     ("fedrot λ=1.0", "lam-1.0", "fedrot"), ("random R", "gauge-random", "fedrot")):
        runs = pick(main_runs, setting, strategy)
        if not runs:
            continue
        common = sorted(set.intersection(*(set(dict(r["series"]["agg_error_rel"])) for r in runs)))
        vals = np.array([[dict(r["series"]["agg_error_rel"])[t] for t in common] for r in runs])
        ax.plot(common, vals.mean(0), marker="o", markersize=3, label=f"{label} (n={len(runs)})")
        ax.fill_between(common, vals.min(0), vals.max(0), alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="‖Σ p_k ΔW_k − ΔW_global‖ / ‖Σ p_k ΔW_k‖", yscale="log",
           title="relative aggregation error (mean; band: min–max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "agg-error.png", dpi=120)
    plt.close(fig)

    # ---- comparison 3: the rank study, per client lr and r: did a run learn at all? ----
    if rank_runs:
        lines += ["", "## Comparison 3: accuracy by rank and client lr", "",
                  "Per rank: best personalised accuracy (weighted; max over rounds), and in brackets the mean "
                  "of its last 5 rounds; Δprior is best minus the seed's personalised label prior (each client "
                  "predicting its majority label); mean ± std over the seeds run (n). γ·lr·√r is the size of one "
                  "AdamW step on ΔW = γ·B·A: Adam moves each of B's r columns by about lr whatever γ is, so the "
                  "step grows as γ·lr, and as √r over r independent columns. The server never sees B in "
                  "these methods, so there is no aggregation error or global ΔW to report.", "",
                  "| strategy | lr | γ·lr·√r at r = 4 / 64 / 256 | r = 4 | r = 64 | r = 256 |", "|---|---|---|---|---|---|"]
        priors: dict[int, float] = {}  # the partition, hence the label prior, depends on the seed only

        def prior_of(run) -> float:
            if run["seed"] not in priors:
                priors[run["seed"]] = label_prior_baseline(run["run_dir"])["personal"]
            return priors[run["seed"]]

        fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
        for (lr, plain, rs), style in zip(RANK_GRIDS, ("-", "--")):
            for label, grid, strategy, gamma, color in (
                    ("sfed", plain, "sfed", lambda r: 8 * (10 / r) ** 0.5, "C0"),
                    ("fedsa", plain, "fedsa", lambda r: 8 / r, "C1"),
                    ("fedsa[rslora]", rs, "fedsa", lambda r: 8 / r ** 0.5, "C2")):
                by_r = {r: [x for x in rank_runs if x["grid"] == grid and x["strategy"] == strategy
                            and x["setting"] == f"r-{r}"] for r in RANKS}
                if not any(by_r.values()):
                    continue
                cells = []
                for r, runs in by_r.items():
                    last5 = [np.mean([v for _, v in x["series"]["personal_accuracy"][-5:]]) for x in runs]
                    above = [x["personal_best"] - prior_of(x) for x in runs]
                    cells.append(f"{ms([x['personal_best'] for x in runs])} [{ms(last5)}] "
                                 f"Δprior {ms(above, '+.3f')} (n={len(runs)})")
                lines.append(f"| {label} | {lr:g} | {' / '.join(f'{gamma(r) * lr * r ** 0.5:.2g}' for r in RANKS)} | "
                             + " | ".join(cells) + " |")
                done = [r for r in RANKS if by_r[r]]
                gain = [np.mean([x["personal_best"] - prior_of(x) for x in by_r[r]]) for r in done]
                ax.plot(done, gain, style, marker="o", color=color, label=f"{label}, lr {lr:g}")
                bx.scatter([gamma(r) * lr * r ** 0.5 for r in done], gain, color=color, marker="o" if style == "-" else "s",
                           facecolors="none" if style == "--" else color, label=f"{label}, lr {lr:g}")
        seeds = sorted({x["seed"] for x in rank_runs})
        ax.axhline(0, color="gray", lw=0.8, ls=":", label="each client predicts its majority label")
        ax.set_xscale("log", base=2)
        ax.set_xticks(RANKS, [str(r) for r in RANKS])
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel("best personalised accuracy − label prior")
        ax.set_title(f"Rank study, MiniLM + sarcasm, N = 10\nmean over the seeds run at each point "
                     f"({', '.join(map(str, seeds))}; n in derived.md)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        bx.axhline(0, color="gray", lw=0.8, ls=":")
        bx.set_xscale("log")
        bx.set_xlabel("γ·lr·√r: the size of one AdamW step on ΔW = γ·B·A")
        bx.set_ylabel("best personalised accuracy − label prior")
        bx.set_title("The same points against the step size γ·lr·√r (r = 4, 64, 256)", fontsize=10)
        bx.grid(alpha=0.3)
        bx.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(HERE / "rank-lr.png", dpi=120)
        plt.close(fig)

    # ---- what a constant (majority-label) prediction scores, per seed ----
    lines += ["", "## Label-prior baselines", "",
              "Accuracy of predicting the majority label: the training set's on the global validation subset, "
              "each client's own on its held-out slice (weighted), per seed (the partition depends on the seed).", "",
              "| seed | global (validation subset) | personalised (clients' held-out slices) |", "|---|---|---|"]
    for r in pick(main_runs, "default", "fedit"):
        b = label_prior_baseline(r["run_dir"])
        lines.append(f"| {r['seed']} | {b['global']:.4f} | {b['personal']:.4f} |")

    # ---- every run's per-round series ----
    keys = ["accuracy", "personal_accuracy", "agg_error_rel", "basis_overlap", "rotation_size"]
    with open(HERE / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["grid", "setting", "strategy", "seed", "round", *keys])
        for r in main_runs + rank_runs:
            series = {k: dict(r["series"].get(k, [])) for k in keys}
            for t in sorted(set().union(*series.values())):
                w.writerow([r["grid"], r["setting"], r["strategy"], r["seed"], t,
                            *(f"{series[k][t]:.6g}" if t in series[k] else "" for k in keys)])
    (HERE / "derived.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
