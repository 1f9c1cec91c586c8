"""``mondeq serve`` (entry point ``serve = "service.cli:serve"``) and ``python -m service``."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import types
import typing
from pathlib import Path

# Spellings that predate the generated flags and keep working beside them.
ALIASES = {"poll_interval_s": ("--poll-interval",)}
# A token on the command line is visible to every user of the machine (``ps``, /proc), so
# its flag names a file that holds it; MONDEQ_ADMIN_TOKEN is the other way in.
FILE_FLAGS = {"admin_token": "--admin-token-file"}
# Where a spelled flag is recorded, for error messages that name what the user typed.
_SPELLED = "_serve_flags_spelled"


def flag(name: str) -> str:
    """The flag of setting ``name``: ``max_batch_size`` → ``--max-batch-size``."""
    return FILE_FLAGS.get(name, "--" + name.replace("_", "-"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`~service.settings.Settings` field, generated from the fields.

    ``--<field-with-dashes>``; a bool field is ``--x/--no-x``, a ``Literal`` field takes its
    choices; the help is the field's description, its default and its ``MONDEQ_*``
    variable. Unset flags fall back to ``MONDEQ_*`` variables, then to the defaults, so a
    flag is in the parsed namespace only when given. Values are parsed here (a bad number or
    choice is argparse's usage error, exit 2); ranges are checked when the settings are
    built (:func:`settings_from_args`).
    """
    from .settings import Settings

    for name, field in Settings.model_fields.items():
        kind = _unwrap(field.annotation)
        names = (flag(name), *ALIASES.get(name, ()))
        env = f"MONDEQ_{name.upper()}"
        default = "unset" if field.default is None else _shown(field.default)
        help_ = f"{field.description or name.replace('_', ' ')} (default: {default}; {env})"
        common = {"dest": name, "default": argparse.SUPPRESS}
        if name in FILE_FLAGS:
            p.add_argument(
                *names,
                type=_secret_file,
                metavar="FILE",
                help=f"file holding the {field.description}; or {env}. Not the token "
                "itself: a command line is visible to every user of the machine (ps)",
                **common,
            )
        elif kind is bool:
            p.add_argument(*names, action=_SpelledBool, help=help_, **common)
        elif typing.get_origin(kind) is typing.Literal:
            choices = [str(c) for c in typing.get_args(kind)]
            p.add_argument(
                *names, type=str.lower, choices=choices, action=_Spelled, help=help_, **common
            )
        else:
            parse = {int: int, float: float}.get(kind, str)
            metavar = {int: "N", float: "X", Path: "DIR"}.get(kind, name.split("_")[-1].upper())
            p.add_argument(
                *names, type=parse, metavar=metavar, action=_Spelled, help=help_, **common
            )


def _unwrap(annotation):
    """``X | None`` → ``X`` (a flag is always optional: unset, the variable or the default
    applies)."""
    args = typing.get_args(annotation)
    if type(None) in args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return inner
    return annotation


def _shown(value) -> str:
    """A default as a user would type it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _secret_file(path: str) -> str:
    """argparse type: the token held in ``path`` (surrounding whitespace stripped)."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(
            f"cannot read {path}: {getattr(e, 'strerror', None) or e}"
        ) from None
    if not token:
        raise argparse.ArgumentTypeError(f"{path} holds no token (it is empty)")
    return token


def _record(namespace: argparse.Namespace, dest: str, option_string: str | None) -> None:
    spelled = dict(getattr(namespace, _SPELLED, {}))
    spelled[dest] = option_string
    setattr(namespace, _SPELLED, spelled)


class _Spelled(argparse.Action):
    """Store the value and remember which spelling of the flag set it."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _record(namespace, self.dest, option_string)


class _SpelledBool(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _record(namespace, self.dest, option_string)


def settings_from_args(args: argparse.Namespace):
    """:class:`~service.settings.Settings` from the flags in ``args`` over the ``MONDEQ_*``
    environment. Raises ``pydantic.ValidationError`` (a value out of range)."""
    from .settings import Settings

    return Settings(**_overrides(args))


def _overrides(args: argparse.Namespace) -> dict:
    from .settings import Settings

    return {k: getattr(args, k) for k in Settings.model_fields if hasattr(args, k)}


def serve(sub) -> None:
    """Register ``mondeq serve`` on the ``mondeq`` subparsers."""
    p = sub.add_parser(
        "serve",
        help="serve the model repository over HTTP (KServe V2 + friendly API + metrics) and "
        "gRPC (KServe V2)",
        description="Serve models/<name>/<version>/model.pt over HTTP, and over gRPC on "
        "--grpc-port (0: off). Every setting also "
        "comes from MONDEQ_* environment variables (e.g. MONDEQ_ADMIN_TOKEN, "
        "MONDEQ_MAX_QUEUE); flags win over them.",
    )
    add_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Build the settings from the environment and ``args``, then run uvicorn until
    SIGTERM/SIGINT; exits 0 after a graceful shutdown."""
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        print(f"mondeq serve: {_one_line(e, getattr(args, _SPELLED, {}))}", file=sys.stderr)
        return 2
    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("mondeq serve: --device cuda, but torch sees no CUDA device", file=sys.stderr)
            return 2
    if settings.model_dir.exists() and not settings.model_dir.is_dir():
        # A missing folder may still appear (a volume mounted late); a file never serves.
        print(
            f"mondeq serve: --model-dir {settings.model_dir}: a file, not a folder of models "
            "(<name>/<version>/model.pt)",
            file=sys.stderr,
        )
        return 2
    if not settings.model_dir.is_dir():
        print(
            f"mondeq serve: warning: {settings.model_dir} is not a folder (yet); serving "
            "nothing until models appear there",
            file=sys.stderr,
        )

    _log_to_stderr(settings.log_level)
    if settings.workers > 1:
        from .frontend import serve_workers

        return _exit(serve_workers(settings))

    import uvicorn

    from .app import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=settings.graceful_timeout_s,
    )
    _Server(config).run()
    return _exit(0)


def _exit(code: int) -> int:
    """``code``, or the process ends here with it when an α search is still running
    (a SIGTERM during a load's search, an admin or drift search): the search cannot be
    interrupted, and finalizing the interpreter under it aborts the process (SIGABRT)."""
    from .alpha import search_running

    if search_running():
        import logging
        import os

        logging.getLogger("mondeq.service").info("stopped during an α search: not waiting for it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _one_line(error, spelled: dict) -> str:
    """A settings ValidationError as one line naming each flag as typed (``spelled``:
    setting → the flag's spelling) or else its ``MONDEQ_*`` variable."""
    parts = []
    for err in error.errors():
        name = ".".join(map(str, err["loc"]))
        where = spelled.get(name) or f"MONDEQ_{name.upper()}"
        parts.append(f"{where}: {err['msg'][0].lower()}{err['msg'][1:]}, got {err['input']!r}")
    return "; ".join(parts)


def _log_to_stderr(level: str) -> None:
    """The service's own log lines (loads, α searches), formatted like uvicorn's."""
    import logging

    logger = logging.getLogger("mondeq")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


class _Server:
    """``uvicorn.Server`` whose SIGTERM ends in exit code 0.

    Uvicorn stops accepting on SIGTERM, lets the requests in flight finish, runs the
    lifespan shutdown (our queues drain there), then re-raises the signal, which would end
    the process with -15. Here a SIGTERM (or SIGINT) is a normal, graceful stop.
    """

    def __init__(self, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                sigs = (signal.SIGINT, signal.SIGTERM)
                old = {s: signal.signal(s, self.handle_exit) for s in sigs}
                try:
                    yield
                finally:
                    for s, h in old.items():
                        signal.signal(s, h)

            async def shutdown(self, sockets=None):
                # gRPC stops taking calls when HTTP does; the lifespan waits for its drain.
                grpc_front = getattr(self.config.app.state, "grpc", None)
                if grpc_front is not None:
                    grpc_front.drain()
                await super().shutdown(sockets=sockets)

        self.server = Server(config)

    def run(self) -> None:
        self.server.run()
