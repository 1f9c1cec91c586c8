"""service: the FastAPI inference server for monDEQ checkpoints.

Public API: :func:`create_app` (the ASGI app), :class:`Settings` (``MONDEQ_*``
environment). Run it with ``mondeq serve`` or ``python -m service``. Stands on
:mod:`model_core` only (never on :mod:`training`); nothing loads at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import create_app
    from .settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):
    # Lazy: `mondeq --help` imports service.cli; it must not pay for torch and FastAPI.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(name)
