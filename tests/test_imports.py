"""Every module of fedlora imports on its own, in a fresh interpreter.

A circle of imports (a imports b at the top, b imports a) can work when some third module happens to
be imported first and fail when one of the circle is imported alone; so each module is imported by
itself, in its own interpreter. The modules are found by walking the source folders with pkgutil
(nothing is imported to list them); ``fedlora.flower.*`` is left out when Flower is not installed.
"""

from __future__ import annotations

import importlib.util
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fedlora

ROOT = Path(fedlora.__file__).parent


def module_names() -> list[str]:
    """``fedlora`` and every module and package under it, from the files, without importing any."""
    names = ["fedlora"]

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)]):
            name = f"{prefix}.{info.name}"
            if info.name == "__main__":
                continue
            names.append(name)
            if info.ispkg:
                walk(path / info.name, name)

    walk(ROOT, "fedlora")
    if importlib.util.find_spec("flwr") is None:
        names = [n for n in names if n != "fedlora.flower" and not n.startswith("fedlora.flower.")]
    return sorted(names)


def import_alone(name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)


def test_module_list_covers_the_packages():
    names = module_names()
    for expected in ("fedlora", "fedlora.config", "fedlora.tasks", "fedlora.tasks.base", "fedlora.tasks.registry",
                     "fedlora.strategies.registry"):
        assert expected in names


def test_every_module_imports_alone():
    names = module_names()
    # one interpreter per module, at most two at a time (each one loads torch)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(names, pool.map(import_alone, names)))
    failed = {name: r.stderr.strip() for name, r in results.items() if r.returncode != 0}
    assert not failed, "modules that fail to import alone:\n\n" + "\n\n".join(
        f"{name}:\n{err}" for name, err in failed.items())


def test_the_scripts_import_only_names_that_exist():
    """benchmarks/ and docs/results/ scripts are run by hand, not by the suite: every ``from fedlora…
    import name`` (at any depth, lazy ones included) must still name a module or attribute, so a
    refactor cannot silently break them."""
    import ast
    import importlib

    repo = ROOT.parents[1]
    scripts = sorted(repo.glob("benchmarks/*.py")) + sorted(repo.glob("docs/results/**/*.py"))
    if not scripts:
        import pytest

        pytest.skip("no benchmarks/ or docs/results/ beside the package (an installed wheel)")
    missing = []
    for script in scripts:
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fedlora"):
                continue
            if node.module.startswith("fedlora.flower") and importlib.util.find_spec("flwr") is None:
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                    missing.append(f"{script.relative_to(repo)}:{node.lineno}: from {node.module} import {alias.name}")
    assert not missing, "scripts import names that no longer exist:\n" + "\n".join(missing)
