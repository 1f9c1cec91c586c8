"""What every route shares (:class:`Runtime`), and one request's solve (:func:`solve`).

The routes reach the models only through these two: the repository's own errors and the
batcher's become HTTP statuses here, once.
"""

from __future__ import annotations

import torch

from .batcher import Answer, Closed, QueueFull, SolveFailed
from .engine import ServedModel, SolveKey, TooMuchWork
from .errors import SHUTDOWN_RETRY_AFTER, ApiError
from .metrics import Metrics
from .repository import NotFound, NotReady, Repository
from .settings import Settings


class Runtime:
    """The app's settings, metrics and (once the lifespan started) its model repository.

    One per app, on ``app.state.runtime``; the routes take it through
    :data:`service.deps.RuntimeDep`.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.repo: Repository | None = None

    def repository(self) -> Repository:
        """The repository.

        Raises:
            ApiError: 503 before the lifespan has created it.
        """
        if self.repo is None:
            raise ApiError(503, "the server is starting")
        return self.repo

    def names(self) -> list[str]:
        """The model names the repository knows (none before it exists)."""
        return self.repo.names() if self.repo is not None else []

    def served(self, name: str, version: str | None) -> ServedModel:
        """The model version a request names (``version`` ``None``: the default version).

        Raises:
            ApiError: 404 for an unknown model or version, 503 when it cannot serve (not
                loaded yet, failed to load, or the server is starting).
        """
        try:
            return self.repository().served(name, version)
        except NotFound as e:
            raise ApiError(404, str(e)) from None
        except NotReady as e:
            raise ApiError(503, str(e)) from None


async def solve(served: ServedModel, x: torch.Tensor, key: SolveKey) -> Answer:
    """Queue ``x`` (``(B, C, H, W)`` pixels in [0, 1]) for a batched solve with ``key``.

    Raises:
        ApiError: 422 when the request asks for more solver work than the server allows
            (rows × max_iter), 429 with ``Retry-After`` (seconds) when the queue is full,
            503 with ``Retry-After`` while the model is shutting down or being replaced
            (or, behind ``--workers``, the solver process is gone), 500 when the solve
            itself failed.
    """
    try:
        return await served.infer(x, key)
    except TooMuchWork as e:
        raise ApiError(422, str(e)) from None
    except QueueFull as e:
        raise ApiError(429, str(e), {"Retry-After": str(e.retry_after)}) from None
    except Closed as e:
        raise ApiError(503, str(e), {"Retry-After": SHUTDOWN_RETRY_AFTER}) from None
    except SolveFailed as e:
        raise ApiError(500, str(e)) from None
