"""The ``mondeq`` command line.

Subcommands are discovered from the ``mondeq.commands`` entry-point group, so ``training``
and ``service`` add theirs without ``model_core`` importing them. Each entry point is a
function ``register(subparsers)`` that adds its parser and sets ``handler`` to a function
``handler(args) -> int``; heavy imports belong inside the handler.

Every command checks all of its inputs before it does any work and refuses a bad one with
one line on stderr and exit status 2; the argument types below give flags their ranges.
"""

from __future__ import annotations

import argparse
import math
import sys
from importlib.metadata import entry_points

from . import __version__
from .runtime import tune_allocator


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (``mondeq train: argument --epochs: ...``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _number(text: str, kind: type, what: str, ok) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer ``>= 1``."""
    return _number(text, int, "an integer >= 1", lambda v: v >= 1)


def positive_float(text: str) -> float:
    """argparse type: a finite number ``> 0``."""
    return _number(text, float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def tolerance(text: str) -> float:
    """argparse type: a solver tolerance, a finite number in ``(0, 1]``.

    ``tol`` bounds the *relative* fixed-point residual (:mod:`model_core.solvers`), so above
    1 every point, however far from the equilibrium, would count as converged (and be
    certified); the server caps request tolerances the same way.
    """
    return _number(text, float, "a number in (0, 1]", lambda v: math.isfinite(v) and 0 < v <= 1)


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number ``>= 0``."""
    return _number(text, float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)


def _builtin_commands():
    from . import commands

    return {"import-locuslab": commands.import_locuslab, "bench": commands.bench}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
