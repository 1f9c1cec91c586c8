"""The ``mondeq`` command line.

Subcommands are discovered from the ``mondeq.commands`` entry-point group, so ``training``
and ``service`` add theirs without ``model_core`` importing them. Each entry point is a
function ``register(subparsers)`` that adds its parser and sets ``handler`` to a function
``handler(args) -> int``; heavy imports belong inside the handler.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from . import __version__
from .runtime import tune_allocator


def _builtin_commands():
    from . import commands

    return {"import-locuslab": commands.import_locuslab, "bench": commands.bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mondeq",
        description="Monotone operator equilibrium networks: solve, train, serve.",
    )
    parser.add_argument("--version", action="version", version=f"mondeq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    registered = {ep.name: ep for ep in entry_points(group="mondeq.commands")}
    for name, register in _builtin_commands().items():
        if name not in registered:  # running from a source tree that is not installed
            register(sub)
    for name in sorted(registered):
        try:
            register = registered[name].load()
        except (ImportError, AttributeError) as e:  # a broken plug-in must not take the CLI down
            print(f"mondeq: command {name!r} unavailable: {e}", file=sys.stderr)
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    tune_allocator()  # long-running CPU work: keep the solver's buffers in the heap
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
