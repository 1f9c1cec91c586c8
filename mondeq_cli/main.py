"""The ``mondeq`` command line.

Subcommands are discovered from the ``mondeq.commands`` entry-point group, so ``training``
and ``service`` add theirs without this package importing them. Each entry point is a
function ``register(subparsers)`` that adds its parser and sets ``handler`` to a function
``handler(args) -> int``; heavy imports belong inside the handler.

``model_core`` and this package need torch alone; ``training`` and ``service`` need the
``training`` and ``serving`` extras (pyproject.toml). A command whose extra is not installed
is refused with one line naming it (``mondeq train needs the training extra: pip install
'mondeq[training]' (missing: tqdm, ...)``) and exit status 2, whether its module fails to
import or its handler does.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import warnings
from importlib.metadata import PackageNotFoundError, distribution, entry_points

# torch warns at import when numpy is missing, as it is with torch alone (numpy comes with the
# training and serving extras); no torch-only command converts tensors to numpy. Set before
# the first torch import, and only in the command line: the library leaves warnings alone.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

from .args import Parser  # noqa: E402

DISTRIBUTION = "mondeq"

# The extra that a command package's third-party imports come from (pyproject.toml's
# optional-dependencies); a package not named here needs nothing beyond torch.
EXTRA_OF_PACKAGE = {"training": "training", "service": "serving"}

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")


def _extra_requirements(extra: str) -> list[str]:
    """Distribution names that ``mondeq[extra]`` requires (its ``Requires-Dist`` lines)."""
    try:
        lines = distribution(DISTRIBUTION).requires or []
    except PackageNotFoundError:  # a source tree that is not installed: nothing to say
        return []
    names = []
    for line in lines:
        name, _, marker = line.partition(";")
        found = _EXTRA.search(marker)
        if found and found.group(1) == extra and (m := _NAME.match(name)):
            names.append(m.group(1))
    return names


def _installed(name: str) -> bool:
    try:
        distribution(name)
    except PackageNotFoundError:
        return False
    return True


def missing_extra(command: str, module: str) -> str | None:
    """The one-line refusal for ``mondeq COMMAND`` whose code lives in ``module``.

    Returns ``None`` when the module's package needs no extra or every distribution of its
    extra is installed: a missing module is then a bug to report, not a set-up step.
    """
    extra = EXTRA_OF_PACKAGE.get(module.partition(".")[0])
    if extra is None:
        return None
    missing = [name for name in _extra_requirements(extra) if not _installed(name)]
    if not missing:
        return None
    return (
        f"mondeq {command} needs the {extra} extra: pip install '{DISTRIBUTION}[{extra}]' "
        f"(missing: {', '.join(missing)})"
    )


class CommandLine(Parser):
    """The top-level ``mondeq`` parser; ``unavailable`` maps a command that could not be
    registered to the line that refuses it."""

    unavailable: dict[str, str]


def _builtin_commands():
    from . import commands

    return {"import-locuslab": commands.import_locuslab, "bench": commands.bench}


def build_parser() -> CommandLine:
    """``mondeq`` with every command the installed entry points offer."""
    from model_core import __version__

    parser = CommandLine(
        prog="mondeq",
        description="Monotone operator equilibrium networks: solve, train, serve.",
    )
    parser.unavailable = {}
    parser.add_argument("--version", action="version", version=f"mondeq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    registered = {ep.name: ep for ep in entry_points(group="mondeq.commands")}
    for name, register in _builtin_commands().items():
        if name not in registered:  # running from a source tree that is not installed
            register(sub)
    for name in sorted(registered):
        ep = registered[name]
        try:
            ep.load()(sub)
        except (ImportError, AttributeError) as e:  # a broken plug-in must not take the CLI down
            hint = isinstance(e, ModuleNotFoundError) and missing_extra(name, ep.module)
            parser.unavailable[name] = hint or f"mondeq: command {name!r} unavailable: {e}"
            if name not in sub.choices:
                sub.add_parser(name, help=f"unavailable: {parser.unavailable[name]}")
    return parser


def _command_word(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Run ``mondeq ARGV``; returns the exit status (0 done, 2 refused, 130 interrupted, 141
    when the reader of its output went away, as ``mondeq eval … | head`` does).

    Torch and the commands are imported in here, not at module level, so that a Ctrl-C
    during that second of imports is "interrupted" and 130, not a traceback from inside
    torch's import machinery.

    Raises:
        ModuleNotFoundError: a missing module that no extra provides (a bug, not set-up).
        SystemExit: from ``--help``, ``--version`` or a usage error (status 2), as argparse.
    """
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The pipe's reader closed; Python would report the flush at exit as a second error.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


@contextlib.contextmanager
def _ctrl_c_deferred():
    """A Ctrl-C (SIGINT) inside is held until the block ends, then raised as
    ``KeyboardInterrupt``: raised inside a library's import it could be swallowed by the
    library (an ``except BaseException``, a finalizer) and leave a half-imported module,
    so that the command trained on and failed later with an unrelated error. Outside the
    main thread, where no handler can be set, signals are left alone."""
    held: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with _ctrl_c_deferred():  # torch and the commands import here
        from model_core.runtime import tune_allocator

        parser = build_parser()
    if (word := _command_word(argv)) in parser.unavailable:
        print(parser.unavailable[word], file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    tune_allocator()  # long-running CPU work: keep the solver's buffers in the heap
    try:
        return int(args.handler(args) or 0)
    except ModuleNotFoundError:
        hint = missing_extra(args.command, getattr(args.handler, "__module__", ""))
        if hint is None:
            raise
        print(hint, file=sys.stderr)
        return 2
