"""Experiment grids: strategy × seed × each ``--grid`` key's values, one run directory per cell.

A cell's directory is ``<output>/<setting>/<strategy>/seed-<s>``, where ``<setting>`` names the
``--grid`` values (``lora.r=4,strategy.options.lam=0.2`` → ``r-4_lam-0.2``; ``default`` without a
grid), so the same command always maps a cell to the same folder. That stable name is what makes a
grid restartable: a cell whose ``summary.json`` says ``completed`` is skipped, and a cell with a
``config.toml`` but no completed summary (killed, Ctrl-C, or never reached its last round) is
resumed from its last checkpoint with the config stored there.

A folder name does not say every setting, so a started cell is reused only when the
``config.toml`` it stored has the same result settings (:func:`fedlora.config.settings_diff`) as
the config this command gives it; otherwise the grid refuses before running anything, and
``--force`` deletes and reruns just those cells.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig, format_diff, load_config, parse_value, settings_diff
from fedlora.errors import ConfigError, FedLoRAError


#: the keys each cell sets itself, from --strategies, --seeds and --output-dir: never --grid keys
CELL_KEYS = ("strategy.name", "run.seed", "run.dir", "run.name")


@dataclass(frozen=True)
class Cell:
    """One run of a grid: its strategy, seed, the ``--grid`` values, and its run directory."""

    strategy: str
    seed: int
    setting: str
    grid: tuple[tuple[str, str], ...]
    run_dir: Path

    @property
    def name(self) -> str:
        """``<setting>/<strategy>/seed-<s>``: the cell's folder inside the grid's output folder."""
        return f"{self.setting}/{self.strategy}/seed-{self.seed}"

    def overrides(self) -> list[str]:
        """The ``--set`` overrides that make this cell's config from the base config."""
        return [f"strategy.name={json.dumps(self.strategy)}", f"run.seed={self.seed}",
                f"run.dir={json.dumps(self.run_dir.as_posix())}",
                f"run.name={json.dumps(f'{self.setting}-{self.strategy}-seed-{self.seed}')}",
                *(f"{k}={v}" for k, v in self.grid)]


def split_list(text: str, what: str) -> list[str]:
    """A comma-separated command-line list, stripped; an empty list is an error naming ``what``."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ConfigError(f"{what}: expected a comma-separated list, got {text!r}")
    return items


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["lora.r=4,64", "strategy.options.lam=0,0.2"]`` → ``[("lora.r", ["4", "64"]), …]``.

    A key may not be given twice, nor be one the grid sets itself (strategy.name, run.seed, run.dir).
    Values are kept as text: :func:`fedlora.config.load_config` parses them like ``--set`` values.
    A list value (``lora.client_ranks=[2, 4]``) cannot be a grid value because of the commas.
    """
    out: list[tuple[str, list[str]]] = []
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--grid {spec!r}: expected key=v1,v2,…")
        key, values = (s.strip() for s in spec.split("=", 1))
        if key in CELL_KEYS:
            raise ConfigError(f"--grid {spec!r}: {key} is set by --strategies/--seeds/--output-dir")
        if key in dict(out):
            raise ConfigError(f"--grid {spec!r}: {key} is given twice")
        out.append((key, split_list(values, f"--grid {key}")))
    return out


def _slug(key: str, value: str) -> str:
    # the key's last part is enough to tell settings apart and keeps paths short
    text = f"{key.split('.')[-1]}-{value}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def expand_grid(output_dir: str | Path, strategies: Sequence[str], seeds: Sequence[int],
                grid: Sequence[tuple[str, Sequence[str]]] = ()) -> list[Cell]:
    """Every cell of setting × strategy × seed, settings outermost (so a setting's strategies finish
    together and can be compared early)."""
    if len(set(strategies)) != len(strategies) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--strategies {list(strategies)} / --seeds {list(seeds)}: repeated entries")
    keys = [k for k, _ in grid]
    cells = []
    for values in itertools.product(*(v for _, v in grid)):
        pairs = tuple(zip(keys, values))
        setting = "_".join(_slug(k, v) for k, v in pairs) or "default"
        for strategy in strategies:
            for seed in seeds:
                cells.append(Cell(strategy, int(seed), setting, pairs,
                                  Path(output_dir) / setting / strategy / f"seed-{seed}"))
    names = [c.run_dir for c in cells]
    if len(set(names)) != len(names):
        raise ConfigError("--grid: two settings map to the same folder name; use values that differ "
                          "after replacing characters other than letters, digits and . + -")
    return cells


def cell_status(run_dir: Path) -> str:
    """``"done"`` (summary.json says completed), ``"resume"`` (a run directory is there) or ``"new"``."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            if json.loads(summary.read_text()).get("status") == "completed":
                return "done"
        except (OSError, json.JSONDecodeError):
            pass  # a torn summary: the checkpoint decides
    return "resume" if (run_dir / "config.toml").is_file() else "new"


@dataclass
class GridResult:
    """What :func:`run_grid` did: run directories by status (``ran``, ``resumed``, ``skipped``), and
    ``replaced``: the cells of other settings that ``force`` deleted (they are in ``ran`` too)."""

    ran: list[Path] = field(default_factory=list)
    resumed: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    replaced: list[Path] = field(default_factory=list)


def stale_cells(cells: Sequence[Cell], configs: dict[Path, RunConfig]) -> list[tuple[Cell, str, list]]:
    """The started cells (finished or resumable) whose stored ``config.toml`` differs in a result
    setting from ``configs[cell.run_dir]``, the config this command gives them; each with why, in
    words, and the difference (:func:`fedlora.config.settings_diff`; empty when the stored config
    cannot be read)."""
    out = []
    for cell in cells:
        if cell_status(cell.run_dir) == "new":
            continue
        try:
            stored = load_config(cell.run_dir / "config.toml")
        except FedLoRAError as e:
            out.append((cell, f"its config.toml cannot be read ({e})", []))
            continue
        diff = settings_diff(stored, configs[cell.run_dir])
        if diff:
            out.append((cell, format_diff(diff), diff))
    return out


def stale_message(stale: Sequence[tuple[Cell, str, list]]) -> str:
    """The refusal: which cells, which keys (cells with the same difference on one line), and the
    ways out."""
    by_why: dict[str, list[str]] = {}
    for cell, why, _ in stale:
        by_why.setdefault(why, []).append(cell.name)
    out = stale[0][0].run_dir.parents[2]
    hint = _grid_hint(stale)
    return "\n".join([
        f"{out}: {len(stale)} cell(s) of this grid hold runs whose settings are not the ones this command gives them:",
        *(f"  {', '.join(names)}: {why}" for why, names in by_why.items()),
        "Nothing was run or changed. To keep those runs, write this grid elsewhere (--output-dir)"
        + (f" or give the new setting cells of their own ({hint})" if hint else "")
        + "; to delete just these cells and rerun them with the new settings, add --force."])


def _grid_hint(stale: Sequence[tuple[Cell, str, list]]) -> str:
    """``--grid train.lr=0.01``: the new values of the keys that differ, when each is one plain value
    (not a list: a --grid value cannot hold commas) and the same in every stale cell."""
    new: dict[str, set[str]] = {}
    for cell, _, diff in stale:
        if not diff:
            return ""
        for key, _, value in diff:
            if key in dict(cell.grid) or key in CELL_KEYS or value is None or isinstance(value, list):
                return ""
            new.setdefault(key, set()).add(str(value).lower() if isinstance(value, bool) else str(value))
    if any(len(v) != 1 or "," in next(iter(v)) for v in new.values()):
        return ""
    return " ".join(f"--grid {k}={next(iter(v))}" for k, v in sorted(new.items()))


def _replace(cell: Cell, status: str, result: GridResult) -> None:
    """Delete the run directory of a cell to rerun (status ``replace``: ``--force``) just before its
    new run starts, so a grid stopped earlier keeps it. It is first renamed to a hidden sibling, so
    an interrupted delete leaves no half run where the grid or a report would read it."""
    if status != "replace":
        return
    trash = cell.run_dir.with_name(f".{cell.run_dir.name}.replaced-{os.getpid()}")
    os.rename(cell.run_dir, trash)
    shutil.rmtree(trash)
    result.replaced.append(cell.run_dir)


def cell_config(config: str | Path | None, cell: Cell, overrides: Sequence[str] = ()) -> RunConfig:
    """The cell's config: the base config, then the user's ``--set`` overrides, then the cell's values."""
    return load_config(config, [*overrides, *cell.overrides()])


def run_grid(config: str | Path | None, cells: Sequence[Cell], overrides: Sequence[str] = (), *,
             force: bool = False, progress: bool | None = None, announce: Callable[[int, int, Cell, str], None] | None = None,
             jobs: int = 1, finished: Callable[[Cell, dict[str, Any] | None, BaseException | None], None] | None = None,
             ) -> GridResult:
    """Run every cell not yet completed; resume the ones that started. Every cell's config is
    checked before the first run starts, so a typo in a grid value fails in seconds, not hours; so is
    every started cell's stored config: one of other result settings raises ConfigError naming the
    cells and keys, unless ``force``, which deletes and reruns those cells (and only those).
    ``announce(i, n, cell, status)`` is called before each cell (the progress display); status is
    :func:`cell_status`'s, or ``"replace"`` for a cell ``force`` reruns.

    With ``jobs`` > 1, that many cells run at once, each in its own process with
    ``cpu_count // jobs`` torch threads (unless the config sets ``model.threads``) and its output in
    ``<output>/logs/<setting>-<strategy>-seed-<s>.log``; ``finished(cell, summary, error)`` is called
    as each one ends. A failed cell does not stop the others; the first failure is raised at the end.
    """
    from fedlora.runtime.federation import build_strategy

    configs = {c.run_dir: cell_config(config, c, overrides) for c in cells}
    for cfg in configs.values():  # a strategy option another strategy of the grid lacks fails here
        build_strategy(cfg)
    stale = stale_cells(cells, configs)
    if stale and not force:
        raise ConfigError(stale_message(stale))
    for cell, _, _ in stale:  # --force deletes a cell's own folder, never what a link points to
        if cell.run_dir.is_symlink() or not cell.run_dir.is_dir():
            raise ConfigError(f"--force: {cell.run_dir} is a link or not a folder, so not a run directory of this "
                              "grid; move it away by hand")
    replace = {cell.run_dir for cell, _, _ in stale}
    statuses = ["replace" if c.run_dir in replace else cell_status(c.run_dir) for c in cells]
    # a started cell resumes with its stored config (None here): it has the same result settings
    configs = {c.run_dir: configs[c.run_dir] for c, s in zip(cells, statuses) if s in ("new", "replace")}
    result = GridResult()
    todo = _announce_and_skip(cells, statuses, announce, result)
    if jobs > 1:
        return _run_parallel(list(todo), configs, jobs, finished, result)
    for _, cell, status in todo:  # lazily: each cell is announced just before it runs
        _replace(cell, status, result)
        run_cell(configs.get(cell.run_dir), cell.run_dir, progress)
        (result.resumed if status == "resume" else result.ran).append(cell.run_dir)
    return result


def _announce_and_skip(cells: Sequence[Cell], statuses: Sequence[str], announce, result: GridResult):
    """Yield (grid position, cell, status) for the cells still to run, calling ``announce`` for
    every cell as it comes and recording the finished ones in ``result.skipped``."""
    for i, (cell, status) in enumerate(zip(cells, statuses)):
        if announce:
            announce(i, len(cells), cell, status)
        if status == "done":
            result.skipped.append(cell.run_dir)
        else:
            yield i, cell, status


def run_cell(cfg: RunConfig | None, run_dir: Path, progress: bool | None = None) -> dict[str, Any]:
    """Run one cell: a new one from ``cfg``; a started one (``cfg`` None) resumed with the config
    stored in its directory, so it continues exactly the run it started. Returns the summary."""
    from fedlora.sim import run

    if cfg is None:
        return run(load_config(run_dir / "config.toml"), resume=run_dir, progress=progress)
    return run(cfg, progress=progress)


def cell_log(cell: Cell) -> Path:
    """Where a cell run by ``--jobs`` writes its output: beside the grid's settings, in ``logs/``."""
    return cell.run_dir.parents[2] / "logs" / f"{cell.setting}-{cell.strategy}-seed-{cell.seed}.log"


def _run_cell(cfg: RunConfig | None, run_dir: Path, threads: int, log: Path) -> None:
    """One cell in a worker process (``jobs`` > 1), its output and any traceback in ``log``; a
    resumed cell (``cfg`` None) continues from its stored config. Exits 1 when the run fails."""
    import contextlib
    import os
    import sys
    import traceback

    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        os.environ["COLUMNS"] = "200"  # rich wraps at this width when writing to a file
        try:
            run_cell(cfg, run_dir, progress=False)
        except KeyboardInterrupt:  # the run kept its complete rounds and wrote its summary
            sys.exit(130)
        except BaseException:  # noqa: BLE001 — the traceback goes to the cell's log
            traceback.print_exc()
            sys.exit(1)


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text().splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _run_parallel(todo: Sequence[tuple[int, Cell, str]], configs: dict[Path, RunConfig], jobs: int, finished,
                  result: GridResult) -> GridResult:
    """Up to ``jobs`` cells at once, one spawned process each (spawn, not fork: torch's thread pools
    do not survive a fork). Ctrl-C: no new cell starts; the running ones are interrupted, keep their
    complete rounds (resumable), and the interrupt is re-raised once they have exited."""
    import multiprocessing
    import os
    import signal
    from collections import deque
    from multiprocessing.connection import wait

    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = multiprocessing.get_context("spawn")
    errors: list[tuple[int, Cell, str]] = []  # (grid position, cell, why)
    pending = deque(todo)
    running: dict = {}

    def reap(proc) -> None:
        i, cell, status = running.pop(proc)
        proc.join()
        if proc.exitcode == 0:
            (result.resumed if status == "resume" else result.ran).append(cell.run_dir)
            if finished:
                finished(cell, json.loads((cell.run_dir / "summary.json").read_text()), None)
        else:
            why = _last_line(cell_log(cell)) or f"exit code {proc.exitcode}"
            errors.append((i, cell, why))
            if finished:
                finished(cell, None, FedLoRAError(why))

    from fedlora.runtime.signals import raise_if_stopped, stop_signals_interrupt

    try:
        with stop_signals_interrupt():  # an interrupt that a finalizer swallowed still stops the queue
            while pending or running:
                raise_if_stopped()
                while pending and len(running) < jobs:
                    i, cell, status = pending.popleft()
                    cfg = configs.get(cell.run_dir)
                    # a config that sets model.threads keeps it; otherwise the cores are shared among the jobs
                    n = 0 if cfg is not None and cfg.model.threads > 0 else threads
                    _replace(cell, status, result)
                    proc = ctx.Process(target=_run_cell, args=(cfg, cell.run_dir, n, cell_log(cell)), daemon=False)
                    proc.start()
                    running[proc] = (i, cell, status)
                for sentinel in wait([p.sentinel for p in running]):
                    reap(next(p for p in running if p.sentinel == sentinel))
    except KeyboardInterrupt:
        # a terminal's Ctrl-C reaches the whole process group, so the cells are already stopping; a
        # second SIGINT would cut their summary short. Only a cell still running after a grace
        # period (the parent alone was signalled) gets one.
        for proc in list(running):
            proc.join(timeout=15)
        for proc in list(running):
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGINT)
            proc.join()
        raise
    if errors:
        _, cell, why = min(errors, key=lambda e: e[0])  # the first in grid order, whichever failed first
        raise FedLoRAError(f"{len(errors)} of the grid's cells failed; the first, {cell.setting} · {cell.strategy} · "
                           f"seed {cell.seed}: {why} (its output: {cell_log(cell)})")
    return result


def parse_seeds(text: str) -> list[int]:
    """``"11,12,13"`` → ``[11, 12, 13]``; a non-integer is an error naming it."""
    out = []
    for s in split_list(text, "--seeds"):
        v = parse_value(s)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"--seeds: {s!r} is not an integer")
        out.append(v)
    return out


def find_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every run directory under ``root`` (a folder holding summary.json or config.toml: a run that
    has not written its summary yet counts too), with its setting, strategy and seed read from the
    grid layout ``<setting>/<strategy>/seed-<s>``; a run outside that layout takes its strategy from
    its summary and its setting from its parent folder. Hidden folders (a cell being deleted by
    ``compare --force``) are passed over."""
    root = Path(root)
    out = []
    found = {p.parent for name in ("summary.json", "config.toml") for p in root.rglob(name)}
    for d in sorted(found):
        rel = d.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        m = re.fullmatch(r"seed-(-?\d+)", d.name)
        if m and len(rel.parts) >= 2:
            setting = "/".join(rel.parts[:-2]) or "default"
            strategy, seed = rel.parts[-2], int(m.group(1))
        else:
            setting = "/".join(rel.parts[:-1]) or "default"
            strategy, seed = None, None
        out.append({"run_dir": d, "setting": setting, "strategy": strategy, "seed": seed})
    return out
