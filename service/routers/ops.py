"""Operations: Prometheus ``/metrics`` (request counts per endpoint come from the
:class:`~service.middleware.Guard`, which also counts the docs pages as ``"docs"``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import RuntimeDep

router = APIRouter(tags=["ops"])


@router.get("/metrics", name="metrics", response_class=Response)
async def metrics(runtime: RuntimeDep):
    """Prometheus text exposition of this app's registry."""
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
