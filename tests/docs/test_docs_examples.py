"""The request examples of docs/examples/ hold what they say, and the default models answer
them as the docs show: a real server on the shipped models, real Fashion-MNIST pixels."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from service_support import (
    ADMIN_TOKEN,
    LiveServer,
    free_port,
    outputs,
    start_subprocess_server,
    wait_ready_url,
)

from training.data import DEBIAN_FASHION_MNIST, FASHION_CLASSES, read_idx

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"


def _test_image(index: int) -> tuple[np.ndarray, int]:
    images = read_idx(DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    return images[index], int(labels[index])


def test_examples_are_fashion_mnist_test_image_0():
    image, label = _test_image(0)
    assert (label, FASHION_CLASSES[label]) == (9, "Ankle boot")
    body = json.loads((EXAMPLES / "fmnist-test-0.json").read_text())
    (tensor,) = body["inputs"]
    assert (tensor["shape"], tensor["datatype"]) == ([1, 1, 28, 28], "FP32")
    pixels = np.asarray(tensor["data"], dtype=np.float64).reshape(28, 28)
    np.testing.assert_allclose(pixels, image / 255.0, rtol=0, atol=5e-7)
    with Image.open(EXAMPLES / "fmnist-test-0.png") as png:
        assert (png.format, png.mode, png.size) == ("PNG", "L", (28, 28))
        assert np.array_equal(np.asarray(png), image)


def test_default_models_answer_the_examples_as_documented():
    """The curl lines of docs/examples/README.md, sent with httpx: label 9 from both models
    and both APIs, converged, with a certified radius."""
    body = (EXAMPLES / "fmnist-test-0.json").read_bytes()
    png = (EXAMPLES / "fmnist-test-0.png").read_bytes()
    srv = LiveServer(model_dir=ROOT / "models", tune_at_load=False).start()
    try:
        with srv.client() as c:
            for name in ("fmnist-fc", "fmnist-conv"):
                r = c.post(
                    f"/v2/models/{name}/infer",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                assert r.status_code == 200, r.text
                assert r.json()["id"] == "fmnist-test-0"
                out = outputs(r.json())
                assert out["label"].tolist() == [9]
                assert out["converged"].tolist() == [True]
                assert 0 <= float(out["residual"][0]) <= r.json()["parameters"]["tol"]
                assert float(out["certified_radius"][0]) > 0

                r = c.post(
                    f"/v1/models/{name}:classify",
                    files={"file": ("fmnist-test-0.png", png, "image/png")},
                    data={"top_k": "3"},
                )
                assert r.status_code == 200, r.text
                (pred,) = r.json()["predictions"]
                assert (pred["label"], pred["class_name"]) == (9, "Ankle boot")
                assert [k["label"] for k in pred["top_k"]] == [9, 7, 5]  # boot, sneaker, sandal
                assert pred["converged"] is True
    finally:
        srv.stop()


def test_service_md_python_examples_run_as_written():
    """Each Python block of docs/service.md (tritonclient over HTTP with binary tensors, over
    gRPC, the model repository extension with the admin token from the environment) runs
    unchanged against a real server on the shipped models, only its address swapped in.
    Each block runs in a process of its own: a client's copy of the gRPC protocol and the
    server's cannot share one (docs/service.md, gRPC)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/service.md").read_text(), re.S)
    assert len(blocks) == 3
    port, grpc_port = free_port(), free_port()
    env = {"MONDEQ_TUNE_AT_LOAD": "false", "MONDEQ_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = start_subprocess_server(ROOT / "models", port, MONDEQ_GRPC_PORT=str(grpc_port), **env)
    try:
        wait_ready_url(f"http://127.0.0.1:{port}", 120)
        for block in blocks:
            code = block.replace("localhost:8000", f"127.0.0.1:{port}")
            code = code.replace("localhost:8001", f"127.0.0.1:{grpc_port}")
            run = subprocess.run(
                [sys.executable, "-c", code],
                env={**os.environ, "MONDEQ_ADMIN_TOKEN": ADMIN_TOKEN},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert run.returncode == 0, (block, run.stderr[-2000:])
    finally:
        proc.terminate()
        proc.wait(timeout=60)
