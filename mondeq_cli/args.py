"""argparse pieces shared by every ``mondeq`` command: a parser whose usage errors fit one line,
and argument types that give flags their ranges.

Every command checks all of its inputs before it does any work and refuses a bad one with one
line on stderr and exit status 2 (``mondeq train: argument --epochs: must be an integer >= 1,
got '0' (see mondeq train --help)``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (``mondeq train: argument --epochs: ...``)."""

    def error(self, message: str):
        """Print ``PROG: MESSAGE (see PROG --help)`` on stderr and exit with status 2
        (``SystemExit``), as argparse does, without the multi-line usage block."""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _number(text: str, kind: type, what: str, ok: Callable[[float], bool]) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer ``>= 1``.

    Raises:
        argparse.ArgumentTypeError: anything else (argparse turns it into a usage error).
    """
    return _number(text, int, "an integer >= 1", lambda v: v >= 1)


def positive_float(text: str) -> float:
    """argparse type: a finite number ``> 0``.

    Raises:
        argparse.ArgumentTypeError: anything else, ``inf`` and ``nan`` included.
    """
    return _number(text, float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def tolerance(text: str) -> float:
    """argparse type: a solver tolerance, a finite number in ``(0, 1]``.

    ``tol`` bounds the *relative* fixed-point residual (:mod:`model_core.solvers`), so above
    1 every point, however far from the equilibrium, would count as converged (and be
    certified); the server caps request tolerances the same way.

    Raises:
        argparse.ArgumentTypeError: anything outside ``(0, 1]``.
    """
    return _number(text, float, "a number in (0, 1]", lambda v: math.isfinite(v) and 0 < v <= 1)


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number ``>= 0``.

    Raises:
        argparse.ArgumentTypeError: anything else, ``inf`` and ``nan`` included.
    """
    return _number(text, float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
