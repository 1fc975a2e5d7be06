"""``fedlora compare`` grids (run, skip, resume) and ``fedlora report`` tables and plots, on a tiny BERT."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedlora.cli import build_parser, main
from fedlora.config import load_config
from fedlora.errors import ConfigError, FedLoRAError
from fedlora.experiments.grid import cell_status, expand_grid, parse_grid, parse_seeds
from fedlora.sim import run
from sim_tiny import tiny_fixture, tiny_overrides

tiny = tiny_fixture("experiments", n=120)
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def compare_argv(tiny, out: Path, *extra: str, strategies: str = "fedit,fedrot") -> list[str]:
    """The `fedlora compare` command line of the tiny grid (seeds 11, 12; two rounds)."""
    root, model, data = tiny
    # lr 0.05 so the seeds' accuracies differ (the std in the report is then not trivially 0)
    sets = [a for kv in tiny_overrides(root, model, data, train__rounds=2, data__eval_examples=24,
                                       train__local_steps=2, train__lr=0.05) for a in ("--set", kv)]
    return ["compare", str(CONFIGS[0].parent / "quickstart.toml"), "--strategies", strategies, "--seeds", "11,12",
            "--output-dir", str(out), "--quiet", "--no-report", *sets, *extra]


def compare(tiny, out: Path, *extra: str, strategies: str = "fedit,fedrot") -> int:
    args = build_parser().parse_args(compare_argv(tiny, out, *extra, strategies=strategies))
    return args.func(args)


def mtimes(out: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}


@pytest.fixture(scope="module")
def grid(tiny):
    out = tiny[0] / "grid"
    assert compare(tiny, out) == 0
    return out


def test_grid_runs_every_cell_then_skips_them(grid, tiny):
    cells = sorted(p.parent.relative_to(grid).as_posix() for p in grid.rglob("summary.json"))
    assert cells == ["default/fedit/seed-11", "default/fedit/seed-12", "default/fedrot/seed-11",
                     "default/fedrot/seed-12"]
    for c in cells:
        cfg = load_config(grid / c / "config.toml")
        assert cfg.strategy.name == c.split("/")[1] and cfg.run.seed == int(c.rsplit("-", 1)[1])
    before = mtimes(grid)
    assert compare(tiny, grid) == 0
    # settings that change no result (threads, the progress display) are the same cells too
    assert compare(tiny, grid, "--set", "model.threads=1", "--set", "run.progress=true") == 0
    assert mtimes(grid) == before  # nothing re-ran


def test_interrupted_cell_resumes(grid, tiny, tmp_path):
    out = tmp_path / "g"
    shutil.copytree(grid, out)
    cell = out / "default" / "fedrot" / "seed-12"
    # the state of a run stopped after round 1 of 2: its checkpoint and metrics of round 1, a summary
    # that is not "completed", and the stored config still asking for 2 rounds
    shutil.rmtree(cell)
    cfg_text = (grid / "default/fedrot/seed-12/config.toml").read_text()
    run(load_config(grid / "default/fedrot/seed-12/config.toml", ["train.rounds=1", f'run.dir="{cell.as_posix()}"']),
        log=lambda s: None)
    summary = json.loads((cell / "summary.json").read_text())
    (cell / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    (cell / "config.toml").write_text(cfg_text.replace(str(grid), str(out)))
    assert len((cell / "metrics.jsonl").read_text().splitlines()) == 1 and (cell / "checkpoint.pt").is_file()
    assert cell_status(cell) == "resume"
    done = mtimes(out)
    assert compare(tiny, out) == 0
    after = mtimes(out)
    assert set(after) == set(done)
    assert all(after[p] == done[p] for p in done if p.parent != cell)  # the three finished cells were skipped  # the three finished cells were skipped
    s = json.loads((cell / "summary.json").read_text())
    assert s["status"] == "completed" and s["rounds_completed"] == 2
    rows = [json.loads(x) for x in (cell / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    # resumed in place from round 2: the same accuracies as the uninterrupted run (exact resume)
    ref = [json.loads(x) for x in (grid / "default/fedrot/seed-12/metrics.jsonl").read_text().splitlines()]
    assert [r["eval"]["global"]["accuracy"] for r in rows] == [r["eval"]["global"]["accuracy"] for r in ref]


def test_report_tables_are_mean_and_population_std(grid):
    args = build_parser().parse_args(["report", str(grid)])
    assert args.func(args) == 0
    text = (grid / "summary.md").read_text()
    for strategy in ("fedit", "fedrot"):
        best, final, last5, err = [], [], [], []
        for seed in (11, 12):
            rows = [json.loads(x) for x in (grid / f"default/{strategy}/seed-{seed}/metrics.jsonl").read_text().splitlines()]
            acc = [r["eval"]["global"]["accuracy"] for r in rows]
            best.append(max(acc))
            final.append(acc[-1])
            last5.append(np.mean(acc[-5:]))
            err.append(np.mean([r["diagnostics"]["agg_error_rel"] for r in rows]))
        line = next(x for x in text.splitlines() if x.startswith(f"| {strategy} |"))
        got = re.findall(r"(-?[\d.]+(?:e[-+]\d+)?) ± (-?[\d.]+(?:e[-+]\d+)?)", line)
        for (m, s), vals in zip(got, (best, final, last5)):
            assert float(m) == pytest.approx(np.mean(vals), abs=6e-5)
            assert float(s) == pytest.approx(np.std(vals), abs=6e-5)  # population std (ddof = 0)
        m, s = got[3]  # mean relative aggregation error, printed with 3 significant digits
        assert float(m) == pytest.approx(np.mean(err), rel=6e-3) and float(s) == pytest.approx(np.std(err), rel=6e-3)
        assert np.std(err) > 0
        assert "11,12" in line
    png = grid / "plots" / "default.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_grid_expansion_and_bad_input(tmp_path):
    cells = expand_grid(tmp_path, ["fedrot"], [1, 2], parse_grid(["strategy.options.lam=0,0.2", "lora.r=4,64"]))
    assert len(cells) == 8 and len({c.run_dir for c in cells}) == 8
    assert cells[0].run_dir == tmp_path / "lam-0_r-4" / "fedrot" / "seed-1"
    assert "strategy.options.lam=0.2" in cells[-1].overrides() and "lora.r=64" in cells[-1].overrides()
    with pytest.raises(ConfigError, match="run.seed"):
        parse_grid(["run.seed=1,2"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["lora.r=4", "lora.r=8"])
    with pytest.raises(ConfigError, match="'x'"):
        parse_seeds("1,x")
    with pytest.raises(ConfigError, match="repeated"):
        expand_grid(tmp_path, ["fedit", "fedit"], [1])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_parses(path):
    """Every configs/*.toml loads; a preset's header names the command that runs it."""
    cfg = load_config(path)
    assert cfg.train.rounds > 0
    head = path.read_text().split("[", 1)[0]
    assert "fedlora " in head, f"{path.name}: the header comment should give the command"


@pytest.fixture(scope="module")
def rank_grids(tiny):
    """fedsa over lora.r = 2, 4 in one folder and FedSA-rsLoRA (the same strategy name, another
    option) over the same ranks in another: the layout of the SFed-LoRA rank study."""
    plain, rs = tiny[0] / "rank", tiny[0] / "rank-rslora"
    for out, strategies, extra in ((plain, "sfed,fedsa", []), (rs, "fedsa", ["--set", "strategy.options.rslora=true"])):
        assert compare(tiny, out, "--grid", "lora.r=2,4", *extra, strategies=strategies) == 0
    return plain, rs


def test_report_merges_folders_and_labels_strategy_options(rank_grids, tmp_path):
    plain, rs = rank_grids
    out = tmp_path / "merged"
    args = build_parser().parse_args(["report", str(plain), str(rs), "--output", str(out)])
    assert args.func(args) == 0
    text = (out / "summary.md").read_text()
    sections = text.split("\n## ")
    assert [s.split("\n", 1)[0] for s in sections[1:]] == ["Overview", "r-2", "r-4"]
    for section in sections[2:]:
        setting = section.split("\n", 1)[0]
        rows = [x for x in section.splitlines() if x.startswith("| ") and not x.startswith("| strategy")]
        # the rsLoRA runs are told apart by their option; the strategies of the plain grid keep their name
        assert [x.split(" | ")[0][2:] for x in rows] == ["fedsa", "sfed", "fedsa[rslora=true]"]
        # the personalised columns are the runs' own best and final personalised accuracies
        header = next(x for x in section.splitlines() if x.startswith("| strategy"))
        cols = [c.strip() for c in header.strip("|").split("|")]
        for label, root in (("fedsa", plain), ("fedsa[rslora=true]", rs)):
            line = next(x for x in section.splitlines() if x.startswith(f"| {label} |"))
            vals = [c.strip() for c in line.strip("|").split("|")]
            summaries = [json.loads((root / setting / "fedsa" / f"seed-{s}" / "summary.json").read_text())
                         for s in (11, 12)]
            for col, key in (("best personalised accuracy (w)", "best_personal_accuracy_weighted"),
                             ("final personalised accuracy (w)", "final_personal_accuracy_weighted")):
                m, s = (float(v) for v in vals[cols.index(col)].split(" ± "))
                got = [x[key] for x in summaries]
                assert m == pytest.approx(np.mean(got), abs=6e-5) and s == pytest.approx(np.std(got), abs=6e-5)
    # one rank study, two folders: the overview has every label under both ranks, and a sweep plot
    overview = sections[1]
    assert overview.count("| fedsa[rslora=true] |") == 1 and "| strategy | r-2 | r-4 |" in overview
    png = out / "plots" / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # the two folders were only read
    assert not (plain / "summary.md").exists() and not (rs / "summary.md").exists()


def test_report_of_several_folders_needs_an_output(rank_grids):
    args = build_parser().parse_args(["report", *map(str, rank_grids)])
    with pytest.raises(ConfigError, match="--output"):
        args.func(args)


def test_jobs_run_cells_in_parallel_processes_with_the_same_results(grid, tiny, tmp_path):
    """--jobs 2: every cell runs (in worker processes, output in logs/), then a re-run skips them all;
    the runs match the one-at-a-time grid (up to float summation order: other thread counts)."""
    out = tmp_path / "par"
    assert compare(tiny, out, "--jobs", "2") == 0
    cells = sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("summary.json"))
    assert cells == sorted(p.parent.relative_to(grid).as_posix() for p in grid.rglob("summary.json"))
    for c in cells:
        got = [json.loads(x) for x in (out / c / "metrics.jsonl").read_text().splitlines()]
        ref = [json.loads(x) for x in (grid / c / "metrics.jsonl").read_text().splitlines()]
        assert [r["train_loss"] for r in got] == pytest.approx([r["train_loss"] for r in ref], rel=1e-4)
        setting, strategy, seed = c.split("/")
        log = (out / "logs" / f"{setting}-{strategy}-{seed}.log").read_text()
        assert f"run directory: {out / c}" in re.sub(r"\s*\n\s*", " ", log) and "round 2/2" in log
    before = mtimes(out)
    assert compare(tiny, out, "--jobs", "2") == 0
    assert mtimes(out) == before
    with pytest.raises(ConfigError, match="--jobs"):
        compare(tiny, out, "--jobs", "0")


def test_jobs_a_failing_cell_does_not_stop_the_others(tiny, tmp_path):
    """A cell that fails when it starts (a rank above the tiny model's width) is reported with its
    log; the grid's other cells finish."""
    out = tmp_path / "bad"
    with pytest.raises(FedLoRAError, match=r"2 of the grid's cells failed; the first, r-4096 · fedit · seed 11: .*rank 4096 exceeds") as e:
        compare(tiny, out, "--jobs", "2", "--grid", "lora.r=4096,2", strategies="fedit")
    assert "r-4096-fedit-seed-11.log" in str(e.value)
    done = sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("summary.json")
                  if json.loads(p.read_text())["status"] == "completed")
    assert done == ["r-2/fedit/seed-11", "r-2/fedit/seed-12"]
    assert "Traceback" in (out / "logs" / "r-4096-fedit-seed-12.log").read_text()


@pytest.mark.slow
def test_jobs_ctrl_c_keeps_complete_rounds_and_the_grid_resumes(tiny, tmp_path):
    """SIGINT to a `fedlora compare --jobs 2` (as a terminal's Ctrl-C: the whole process group):
    no new cell starts, the running ones stop with a resumable checkpoint, the command fails; the
    same command then finishes the grid."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, model, data = tiny
    out = tmp_path / "int"
    sets = [a for kv in tiny_overrides(root, model, data, train__rounds=60, data__eval_examples=24,
                                       train__local_steps=2) for a in ("--set", kv)]
    cmd = [sys.executable, "-m", "fedlora.cli", "compare", str(CONFIGS[0].parent / "quickstart.toml"), "--strategies",
           "fedit", "--seeds", "11,12,13", "--output-dir", str(out), "--no-report", "--jobs", "2", *sets]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # until both running cells have completed a few rounds
        rows = [len(p.read_text().splitlines()) for p in out.rglob("metrics.jsonl")]
        if len(rows) == 2 and min(rows) >= 3:
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, output
    summaries = {p.parent.name: json.loads(p.read_text()) for p in out.rglob("summary.json")}
    assert set(summaries) == {"seed-11", "seed-12"} and not (out / "default/fedit/seed-13").exists()  # never started
    assert all(s["status"] == "interrupted" and 3 <= s["rounds_completed"] < 60 for s in summaries.values())
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 ran, 2 resumed, 0 skipped" in " ".join(proc.stdout.split())
    for seed in (11, 12, 13):
        s = json.loads((out / f"default/fedit/seed-{seed}/summary.json").read_text())
        assert s["status"] == "completed" and s["rounds_completed"] == 60


# ---- no silent wrong result: cells of other settings, unfinished and unreadable runs ------------------

CELLS = ["default/fedit/seed-11", "default/fedit/seed-12", "default/fedrot/seed-11", "default/fedrot/seed-12"]


def files_of(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def outside(files: dict[str, bytes], cell: str) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if not k.startswith(cell + "/")}


def accuracies(run_dir: Path) -> list[float]:
    return [json.loads(x)["eval"]["global"]["accuracy"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rerun_with_another_setting_refuses_and_keeps_the_cells(grid, tiny, tmp_path, capsys):
    out = tmp_path / "g"
    shutil.copytree(grid, out)
    before = files_of(out)
    assert main(compare_argv(tiny, out, "--set", "train.lr=0.01")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("fedlora: error:")
    assert "train.lr: 0.05 → 0.01" in err and all(c in err for c in CELLS)
    assert "--output-dir" in err and "--force" in err and "--grid train.lr=0.01" in err
    assert files_of(out) == before  # nothing ran, nothing was touched


def test_force_reruns_just_the_cells_of_other_settings(grid, tiny, tmp_path):
    out = tmp_path / "g"
    shutil.copytree(grid, out)
    before = files_of(out)
    cell = "default/fedit/seed-11"
    # a one-cell grid in the same folder with another lr: its cell is replaced; the other three
    # folders are no cells of this grid and stay as they are
    assert main(compare_argv(tiny, out, "--set", "train.lr=0.01", "--seeds", "11", "--force", strategies="fedit")) == 0
    assert load_config(out / cell / "config.toml").train.lr == 0.01
    assert json.loads((out / cell / "summary.json").read_text())["status"] == "completed"
    assert outside(files_of(out), cell) == outside(before, cell)
    # the grid's own command again: only that cell differs now, only it reruns, to the grid's result
    assert main(compare_argv(tiny, out, "--force")) == 0
    assert outside(files_of(out), cell) == outside(before, cell)
    assert load_config(out / cell / "config.toml").train.lr == 0.05
    assert accuracies(out / cell) == accuracies(grid / cell)
    assert sorted(p.name for p in (out / "default" / "fedit").iterdir()) == ["seed-11", "seed-12"]  # no leftovers


def report_sections(path: Path) -> dict[str, str]:
    return {s.split("\n", 1)[0]: s for s in path.read_text().split("\n## ")[1:]}


def table_rows(section: str) -> dict[str, list[str]]:
    """label → the cells of its row, in a summary.md table."""
    rows = [x for x in section.splitlines() if x.startswith("| ") and not x.startswith(("| strategy", "| run"))]
    return {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")[1:]] for r in rows}


def test_report_tells_runs_of_other_settings_apart(grid, tiny, tmp_path):
    other = tmp_path / "lr"
    assert compare(tiny, other, "--set", "train.lr=0.01", "--seeds", "11", strategies="fedit") == 0
    out = tmp_path / "both"
    assert main(["report", str(grid), str(other), "--output", str(out)]) == 0
    rows = table_rows(report_sections(out / "summary.md")["default"])
    assert set(rows) == {"fedit[train.lr=0.05]", "fedrot[train.lr=0.05]", "fedit[train.lr=0.01]"}
    assert rows["fedit[train.lr=0.05]"][0] == "11,12" and rows["fedit[train.lr=0.01]"][0] == "11"
    best = json.loads((other / CELLS[0] / "summary.json").read_text())["best_accuracy"]
    assert rows["fedit[train.lr=0.01]"][1] == f"{best:.4f} ± {0:.4f}"


def _loss(model, batch):
    import torch

    return torch.nn.functional.cross_entropy(model(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                                            batch["labels"])


def test_report_lists_unfinished_runs_apart_and_does_not_average_them(grid, tmp_path, capsys):
    from rich.console import Console

    from fedlora.experiments.report import compare_runs, print_comparison

    out = tmp_path / "g"
    shutil.copytree(grid, out)
    steps = 3 * 2  # a round: 3 clients × 2 local steps

    def rerun(cell: str, loss_fn, *sets: str) -> None:
        shutil.rmtree(out / cell)
        cfg = load_config(grid / cell / "config.toml", [f'run.dir="{(out / cell).as_posix()}"', *sets])
        with pytest.raises((KeyboardInterrupt, FedLoRAError)):
            run(cfg, loss_fn=loss_fn, log=lambda s: None)

    def interrupt(model, batch, client, calls=[0]):  # noqa: B006 — Ctrl-C in round 2
        calls[0] += 1
        if calls[0] > steps:
            raise KeyboardInterrupt
        return _loss(model, batch)

    def nan(model, batch, client, calls=[0]):  # noqa: B006 — a NaN loss in round 2
        calls[0] += 1
        return _loss(model, batch) * (float("nan") if calls[0] > steps else 1.0)

    rerun("default/fedrot/seed-12", interrupt)
    rerun("default/fedit/seed-12", nan, "train.fail_fast=true")
    killed = out / "default/fedit/seed-13"  # killed before it wrote a summary: only its config and round 1
    shutil.copytree(out / "default/fedit/seed-11", killed)
    (killed / "summary.json").unlink()
    assert main(["report", str(out)]) == 0
    sections = report_sections(out / "summary.md")
    rows = table_rows(sections["default"])
    # the averaged rows agree on every setting, so their labels are the plain names; the runs listed
    # apart are labelled by every key in which the folder's runs differ (the failed run's fail_fast)
    assert set(rows) == {"fedit", "fedrot"}
    for strategy in ("fedit", "fedrot"):  # each mean is seed 11 alone
        best = json.loads((out / f"default/{strategy}/seed-11/summary.json").read_text())["best_accuracy"]
        assert rows[strategy][:2] == ["11", f"{best:.4f} ± {0:.4f}"]
    apart = table_rows(sections["Runs not included"])
    assert set(apart) == {str(out / c) for c in ("default/fedrot/seed-12", "default/fedit/seed-12", "default/fedit/seed-13")}
    assert apart[str(out / "default/fedrot/seed-12")] == ["fedrot[train.fail_fast=false]",
                                                         "interrupted (after 1 of 2 rounds)"]
    label, why = apart[str(out / "default/fedit/seed-12")]
    assert label == "fedit[train.fail_fast=true]" and why.startswith("failed: client 0: loss is nan")
    assert "no summary.json" in apart[str(killed)][1]
    # the quickstart's table shows the status beside the numbers
    rows = compare_runs([out / "default/fedrot/seed-11", out / "default/fedrot/seed-12"])
    assert [r["status"] for r in rows] == ["completed", "interrupted"]
    capsys.readouterr()
    print_comparison(rows, Console(width=200))
    table = capsys.readouterr().out
    assert "interrupted" in table and "1/2" in table


def test_report_names_unreadable_metrics(grid, tmp_path):
    from fedlora.experiments.report import plot_runs

    out = tmp_path / "g"
    shutil.copytree(grid, out)
    bad, missing, torn = (out / c / "metrics.jsonl" for c in CELLS[1:])
    lines = bad.read_text().splitlines(keepends=True)
    bad.write_text(lines[0][: len(lines[0]) // 2] + "\n" + lines[1])  # line 1 cut short, line 2 whole
    missing.unlink()
    torn.write_text(torn.read_text()[:-40])  # the last row torn off mid-line
    assert main(["report", str(out)]) == 0
    sections = report_sections(out / "summary.md")
    apart = table_rows(sections["Runs not included"])
    assert apart[str(bad.parent)][1].startswith(f"{bad}:1: not a metrics row")
    assert "metrics.jsonl is missing" in apart[str(missing.parent)][1]
    assert "metrics.jsonl holds 1 of the 2 rounds" in apart[str(torn.parent)][1]
    rows = table_rows(sections["default"])
    assert set(rows) == {"fedit"} and rows["fedit"][0] == "11"  # fedrot has no readable run left
    with pytest.raises(ConfigError, match="metrics.jsonl:1: not a metrics row"):
        plot_runs([bad.parent], tmp_path / "p.png")


def test_report_of_a_private_grid_has_epsilon_and_sigma_columns(tiny, tmp_path):
    pytest.importorskip("dp_accounting")
    out = tmp_path / "dp"
    assert compare(tiny, out, "--set", "privacy.mode=client", "--grid", "privacy.noise_multiplier=0.8,1.6",
                   "--seeds", "11", strategies="fedit") == 0
    assert main(["report", str(out)]) == 0
    sections = report_sections(out / "summary.md")
    for setting, sigma in (("noise-multiplier-0.8", 0.8), ("noise-multiplier-1.6", 1.6)):
        header = next(x for x in sections[setting].splitlines() if x.startswith("| strategy"))
        cols = [c.strip() for c in header.strip("|").split("|")]
        row = table_rows(sections[setting])["fedit"]
        eps = json.loads(next((out / setting).rglob("summary.json")).read_text())["privacy"]["epsilon"]
        assert row[cols.index("ε (DP)") - 1] == f"{eps:.3f} ± {0:.3f}"
        assert row[cols.index("noise σ (DP)") - 1] == f"{sigma:.3f} ± {0:.3f}"
