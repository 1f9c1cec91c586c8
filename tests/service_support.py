"""Fixtures and helpers of the service tests: tiny real checkpoints, real uvicorn servers.

Its fixtures are taken in by ``tests/service/conftest.py``. Servers run ``uvicorn.Server`` in a
thread on a loopback socket bound here (port 0, so no port race); the SIGTERM tests start
``python -m service`` in a subprocess instead.
"""

from __future__ import annotations

import copy
import gzip
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from model_core import build_model, load_checkpoint, save_checkpoint

# httpcore tries `import sniffio` on every request; without sniffio installed each failed
# import scans sys.path. Marking it absent skips the search (the result is the same).
sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]

ADMIN_TOKEN = "test-token"
FC_CONFIG = {
    "arch": "fc",
    "in_channels": 1,
    "image_size": 8,
    "hidden": 32,
    "solver": {"alpha": 1.0, "tol": 1e-4, "max_iter": 200},
}
CONV_CONFIG = {
    "arch": "conv",
    "in_channels": 3,
    "image_size": 8,
    "channels": 4,
    "solver": {"alpha": 1.0, "tol": 1e-4, "max_iter": 200},
}


FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def fashion_images(n: int) -> torch.Tensor:
    """The first ``n`` Fashion-MNIST test images, ``(n, 1, 28, 28)`` in [0, 1]."""
    with gzip.open(FASHION_TEST, "rb") as f:
        raw = f.read(16 + n * 784)
    pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, 28, 28)
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


def make_checkpoint(
    path: Path,
    config: dict,
    *,
    seed: int = 0,
    mean: float = 0.3,
    std: float = 0.5,
    calibration: int = 0,
    card: dict | None = None,
    **metadata,
) -> Path:
    """A real checkpoint of a tiny model at ``path`` (plus ``card.json`` when given)."""
    torch.manual_seed(seed)
    model = build_model(config)
    c = config["in_channels"]
    model.input_spec = {
        "shape": [c, config["image_size"], config["image_size"]],
        "mean": [mean] * c,
        "std": [std] * c,
        "class_names": [f"class-{i}" for i in range(10)],
    }
    if calibration:
        g = torch.Generator().manual_seed(seed + 1)
        shape = (calibration, c, config["image_size"], config["image_size"])
        metadata["calibration"] = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    save_checkpoint(model, path, **metadata)
    if card is not None:
        (path.parent / "card.json").write_text(json.dumps(card))
    return path


def local_model(path: Path):
    """The same checkpoint loaded in-process (what served answers are compared with)."""
    return load_checkpoint(path)


def float64_model(model):
    """A float64 copy of ``model`` (its per-weights caches dropped: they hold float32)."""
    m64 = copy.deepcopy(model).double()
    m64.op.clear_cache()
    return m64


@torch.no_grad()
def float64_reference(model, x: torch.Tensor, *, tol: float = 1e-10, max_iter: int = 2000):
    """The exact equilibrium's answer for ``x``, ``(B, C, H, W)`` as the model sees it
    (normalised, in the model's dtype): ``infer`` on a float64 copy of ``model`` at ``tol``.

    A float32 solve cannot stand in for it: float32 certifies no residual below its rounding
    floor, ``ρ/‖z‖`` = 1.5e-4..5.8e-4 on fmnist-fc and 7.8e-5..1.1e-4 on fmnist-conv
    (docs/math.md §2, "Rounding"), while float64's is about 1e-12, so ``tol`` 1e-10 is met
    (in about 60 PR iterations on the default models). Asserts that every sample converged.
    Returns the float64 model's ``InferenceResult`` (float64 logits, bounds and radii). A
    model already in float64 (:func:`float64_model`) is used as it is.
    """
    if next(model.parameters()).dtype != torch.float64:
        model = float64_model(model)
    result = model.infer(x.double(), tol=tol, max_iter=max_iter)
    assert result.stats.converged.all(), "the float64 reference did not converge"
    return result


def normalise(model, pixels: torch.Tensor) -> torch.Tensor:
    """The server's normalisation of ``(B, C, H, W)`` pixels in [0, 1]."""
    c = pixels.shape[1]
    mean = torch.tensor(model.input_spec["mean"], dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(model.input_spec["std"], dtype=torch.float32).view(1, c, 1, 1)
    return (pixels.float() - mean) / std


def v2_body(pixels: torch.Tensor, **extra) -> dict:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": list(pixels.shape),
                "datatype": "FP32",
                "data": pixels.flatten().tolist(),
            }
        ],
        **extra,
    }


def outputs(response_json: dict) -> dict:
    """V2 response outputs by name, as tensors of their declared shapes (``null``, an
    FP32 value withheld such as an unconverged sample's radius, becomes NaN)."""
    out = {}
    for o in response_json["outputs"]:
        dtype = {"FP32": torch.float32, "INT64": torch.int64, "INT32": torch.int32}.get(
            o["datatype"], torch.bool
        )
        data = o["data"]
        if o["datatype"] == "FP32":
            data = [float("nan") if v is None else v for v in data]
        out[o["name"]] = torch.tensor(data, dtype=dtype).reshape(o["shape"])
    return out


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with free_socket() as s:
        return s.getsockname()[1]


class LiveServer:
    """``create_app(settings)`` served by a real uvicorn in a background thread."""

    def __init__(self, *, hot_path: bool = True, **settings):
        import uvicorn

        from service import Settings, create_app

        # gRPC off unless asked for: the default port is fixed (8001), and the server's
        # generated messages would share this process with the clients' (tests/service/test_grpc.py)
        self.settings = Settings(
            **{"poll_interval_s": 0, "settle_s": 0, "grpc_port": 0, **settings}
        )
        self.app = create_app(self.settings, hot_path=hot_path)
        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        if wait_ready:
            wait_ready_url(self.url, deadline - time.monotonic())
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)


def wait_ready_url(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout:.0f} s")
        time.sleep(0.05)


def start_subprocess_server(model_dir: Path, port: int, **env) -> subprocess.Popen:
    """``python -m service`` in its own process (for SIGTERM and the CLI)."""
    import os

    full_env = {
        **os.environ,
        "MONDEQ_POLL_INTERVAL_S": "0",
        "MONDEQ_SETTLE_S": "0",
        "MONDEQ_GRPC_PORT": "0",  # off unless asked for: its default port is fixed
        **env,
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--model-dir",
            str(model_dir),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """``{(sample name, frozenset(labels.items())): value}`` from the exposition text."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples: dict, name: str, **labels) -> float:
    """Sum of ``name`` over the samples whose labels include ``labels`` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory) -> Path:
    """models/: fc (v1 with calibration and card), conv (3 channels, no calibration),
    broken (garbage bytes), evolving (v1; the reload tests add versions)."""
    root = tmp_path_factory.mktemp("models")
    make_checkpoint(
        root / "fc/1/model.pt",
        FC_CONFIG,
        calibration=24,
        card={"test_accuracy": 0.875},
        dataset="toy",
        metrics={"test_accuracy": 0.5},
    )
    make_checkpoint(
        root / "conv/1/model.pt",
        CONV_CONFIG,
        seed=1,
        mean=0.5,
        std=0.25,
        metrics={"test_accuracy": 0.625},
    )
    (root / "broken/1").mkdir(parents=True)
    (root / "broken/1/model.pt").write_bytes(b"this is not a checkpoint")
    make_checkpoint(root / "evolving/1/model.pt", FC_CONFIG, seed=10)
    return root


@pytest.fixture(scope="session")
def server(model_repo) -> LiveServer:
    """The main server: admin token set, 256 KiB body limit, polling every 0.3 s,
    no drift retunes (answers stay comparable)."""
    srv = LiveServer(
        model_dir=model_repo,
        admin_token=ADMIN_TOKEN,
        max_body_bytes=256 * 1024,
        poll_interval_s=0.3,
        retune_factor=0,
        max_delay_ms=5,
        max_iter_cap=500,
    ).start()
    yield srv
    srv.stop()


@pytest.fixture()
def client(server) -> httpx.Client:
    with server.client() as c:
        yield c
