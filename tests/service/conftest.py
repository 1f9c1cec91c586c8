"""The service tests' fixtures: a session-wide repository of tiny checkpoints, a live
uvicorn server on loopback and an httpx client (defined in ``tests/service_support.py``)."""

from service_support import client, model_repo, server

__all__ = ["client", "model_repo", "server"]
