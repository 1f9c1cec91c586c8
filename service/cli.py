"""``mondeq serve`` (entry point ``serve = "service.cli:serve"``) and ``python -m service``."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The serve flags. Unset flags fall back to ``MONDEQ_*`` variables, then defaults."""
    p.add_argument("--model-dir", default=None, help="model repository (default: models)")
    p.add_argument("--host", default=None, help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default: 8000)")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=None,
        help="where models run (default: auto, CUDA when present)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="rows per batched solve; 1 turns batching off (default: 64)",
    )
    p.add_argument(
        "--max-delay-ms",
        type=float,
        default=None,
        help="longest a request waits for others to share its batch (default: 50)",
    )
    p.add_argument(
        "--max-gap-ms",
        type=float,
        default=None,
        help="a filling batch stops waiting after this long without arrivals (default: 2)",
    )
    p.add_argument(
        "--poll-interval",
        dest="poll_interval_s",
        type=float,
        default=None,
        help="seconds between model-folder scans; 0 never (default: 10)",
    )
    p.add_argument(
        "--log-level", default=None, choices=["critical", "error", "warning", "info", "debug"]
    )


def serve(sub) -> None:
    """Register ``mondeq serve`` on the ``mondeq`` subparsers."""
    p = sub.add_parser(
        "serve",
        help="serve the model repository over HTTP (KServe V2 + friendly API + metrics)",
        description="Serve models/<name>/<version>/model.pt over HTTP. Every setting also "
        "comes from MONDEQ_* environment variables (e.g. MONDEQ_ADMIN_TOKEN, "
        "MONDEQ_MAX_QUEUE); flags win over them.",
    )
    add_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Build the settings from the environment and ``args``, then run uvicorn until
    SIGTERM/SIGINT; exits 0 after a graceful shutdown."""
    from pydantic import ValidationError

    from .settings import Settings

    fields = (
        "model_dir",
        "host",
        "port",
        "device",
        "max_batch_size",
        "max_delay_ms",
        "max_gap_ms",
        "poll_interval_s",
        "log_level",
    )
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        print(f"mondeq serve: {_one_line(e, overrides)}", file=sys.stderr)
        return 2
    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("mondeq serve: --device cuda, but torch sees no CUDA device", file=sys.stderr)
            return 2
    if not settings.model_dir.is_dir():
        print(
            f"mondeq serve: warning: {settings.model_dir} is not a folder (yet); serving "
            "nothing until models appear there",
            file=sys.stderr,
        )

    import uvicorn

    from .app import create_app

    _log_to_stderr(settings.log_level)

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
    return 0


def _one_line(error, flags: dict) -> str:
    """A settings ValidationError as one line naming each flag or ``MONDEQ_*`` variable."""
    parts = []
    for err in error.errors():
        name = ".".join(map(str, err["loc"]))
        where = "--" + name.replace("_", "-") if name in flags else f"MONDEQ_{name.upper()}"
        if name == "poll_interval_s" and name in flags:
            where = "--poll-interval"
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

        self.server = Server(config)

    def run(self) -> None:
        self.server.run()
