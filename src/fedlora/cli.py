"""The ``fedlora`` command line. Each subcommand lives beside the code it drives; this module only
dispatches, so ``fedlora --help`` stays fast (no torch import until a command runs)."""

from __future__ import annotations

import argparse
import importlib
import sys

from fedlora.errors import FedLoRAError

# subcommand modules; each defines ``register(subparsers)`` which adds its parsers and sets
# ``func`` on them (a callable taking the parsed args and returning an exit code).
COMMAND_MODULES = [
    "fedlora.experiments.demo",
    "fedlora.assets.cli",
    "fedlora.sim.cli",
    "fedlora.experiments.cli",
    "fedlora.flower.cli",
    "fedlora.export.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated fine-tuning with LoRA.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a subcommand module not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int((args.func(args, rest) if getattr(args, "passthrough", False) else args.func(args)) or 0)
    except FedLoRAError as e:
        print(f"fedlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
