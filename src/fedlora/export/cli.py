"""``fedlora export RUN_DIR --merged OUT | --adapter OUT [--client K]``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` to the ``fedlora`` command line."""
    p = sub.add_parser(
        "export", help="write a run's model as a Hugging Face model or PEFT adapter folder",
        description="Export a run: --merged OUT writes the base model with the global adapter merged in (a "
                    "standalone Hugging Face model folder with its tokenizer); --adapter OUT writes the global "
                    "adapter in PEFT format with a model card; --client K --adapter OUT writes client K's own "
                    "adapter (strategies with personal state: fedsa, sfed). OUT must not exist or be empty.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (it holds config.toml and adapter/)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--merged", metavar="OUT", help="write the merged standalone model to OUT")
    out.add_argument("--adapter", metavar="OUT", help="write the global (or, with --client, a client's) adapter to OUT")
    p.add_argument("--client", type=int, metavar="K", help="with --adapter: client K's own adapter")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from fedlora.errors import ConfigError
    from fedlora.export import export_adapter, export_client_adapter, export_merged

    if args.client is not None and not args.adapter:
        raise ConfigError("--client K needs --adapter OUT: a client's own model is exported as an adapter")
    if args.merged:
        export_merged(args.run_dir, args.merged)
    elif args.client is not None:
        export_client_adapter(args.run_dir, args.client, args.adapter)
    else:
        export_adapter(args.run_dir, args.adapter)
    return 0
