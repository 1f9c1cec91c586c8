"""A request still held when the shutdown's grace runs out is answered 503 (HTTP, with
``Retry-After``) or UNAVAILABLE (gRPC, with a ``retry-after`` trailer), saying why: the
server is going away, which is no fault of the request and no bug of the server. Uvicorn
cancels what it still holds when ``graceful_timeout_s`` is over, and a cancelled request
was answered 500 ``Internal Server Error`` (text, logged as "Exception in ASGI application");
gRPC's own stop answered ``UNAVAILABLE`` "Cancelling all calls", counted as a client gone.

Real servers (``python -m service`` and ``--workers 2``) on loopback, a real SIGTERM, a
grace of 1 s, and requests that cannot finish within it: 16 rows of a model whose rows never
converge, at ``max_iter`` 20000 (a minute or more of solving).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import numpy as np
import pytest
import torch
from service_support import (
    free_port,
    make_checkpoint,
    metric,
    metric_samples,
    start_subprocess_server,
    v2_body,
    wait_ready_url,
)

grpcclient = pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402  (after the skip: grpcio comes with tritonclient[grpc])
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

SLOW = {  # every row runs max_iter: no float32 iterate has a residual near tol 1e-9 (its true
    # residual, certified in float64, bottoms out near 4e-7; at tol 1e-6 rows stop at 16)
    "arch": "conv",
    "in_channels": 3,
    "image_size": 16,
    "channels": 16,
    "solver": {"tol": 1e-9, "max_iter": 500},
}
MESSAGE = (
    "the server is shutting down and its grace period (graceful_timeout_s, 1 s) ran out "
    "before this request was answered; send it again (another replica, or this server once "
    "it is back)"
)
ROWS, MAX_ITER = 16, 20000


def pixels(seed: int) -> torch.Tensor:
    return torch.rand(ROWS, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def grpc_request(seed: int) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="slow")
    req.inputs.add(name="input", datatype="FP32", shape=[ROWS, 3, 16, 16])
    req.raw_input_contents.append(pixels(seed).numpy().astype(np.float32).tobytes())
    req.parameters["max_iter"].int64_param = MAX_ITER
    return req


async def until_in_flight(url: str, n: int) -> None:
    """Until the server holds ``n`` requests (its ``mondeq_inflight_requests``)."""
    async with httpx.AsyncClient(base_url=url) as http:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            samples = metric_samples((await http.get("/metrics")).text)
            if metric(samples, "mondeq_inflight_requests") >= n:
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {n} requests in flight")


@pytest.mark.parametrize("workers", [1, 2])
def test_requests_past_the_grace_are_503_and_unavailable(tmp_path, workers):
    make_checkpoint(tmp_path / "slow/1/model.pt", SLOW)
    port, grpc_port = free_port(), free_port()
    url, target = f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    proc = start_subprocess_server(
        tmp_path,
        port,
        MONDEQ_GRPC_PORT=str(grpc_port),
        MONDEQ_WORKERS=str(workers),
        MONDEQ_TUNE_AT_LOAD="false",
        MONDEQ_GRACEFUL_TIMEOUT_S="1",
        MONDEQ_MAX_ITER_CAP=str(MAX_ITER),
        MONDEQ_MAX_ROW_ITERATIONS=str(ROWS * MAX_ITER),
        MONDEQ_MAX_REQUEST_BATCH=str(ROWS),
    )
    try:
        wait_ready_url(url, 120)

        async def scenario():
            limits = httpx.Limits(max_keepalive_connections=0)
            async with (
                httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http,
                grpc.aio.insecure_channel(target) as channel,
            ):
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                params = {"max_iter": MAX_ITER}
                held = [
                    # V2 (the hot path), V2 through FastAPI's route (versioned path), V1
                    http.post("/v2/models/slow/infer", json=v2_body(pixels(0), parameters=params)),
                    http.post(
                        "/v2/models/slow/versions/1/infer",
                        json=v2_body(pixels(1), parameters=params),
                    ),
                    http.post(
                        "/v1/models/slow:classify",
                        json={"inputs": pixels(2).tolist(), **params},
                    ),
                    stub.ModelInfer(grpc_request(3), timeout=300),
                    stub.ModelInfer(grpc_request(4), timeout=300),
                ]
                tasks = [asyncio.ensure_future(h) for h in held]
                await until_in_flight(url, len(tasks))
                os.kill(proc.pid, signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)

        answers = asyncio.run(scenario())
        for r in answers[:3]:
            assert isinstance(r, httpx.Response), r
            assert (r.status_code, r.json(), r.headers.get("retry-after")) == (
                503,
                {"error": MESSAGE},
                "1",
            ), r.text
        for e in answers[3:]:
            assert isinstance(e, grpc.aio.AioRpcError), e
            assert (e.code(), e.details()) == (grpc.StatusCode.UNAVAILABLE, MESSAGE)
            assert dict(e.trailing_metadata())["retry-after"] == "1"
        assert proc.wait(timeout=120) == 0
        out = proc.stdout.read()
        assert "Exception in ASGI application" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
