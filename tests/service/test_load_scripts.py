"""bench/service_load.py's wrk scripts send valid V2 requests: a second of real wrk with each
(JSON, binary tensors, and JSON with the slow-arrivals pause) against a real server on the
default fmnist-fc checkpoint, with real Fashion-MNIST test images, gets 2xx answers only, and
the server counts every request it answered as a 200."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest
from service_support import LiveServer, metric_samples

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import service_load as bench  # noqa: E402  (bench/ is a folder of scripts, not a package)


@pytest.fixture(scope="module")
def fmnist_fc(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    (repo / "fmnist-fc").symlink_to(ROOT / "models" / "fmnist-fc")
    srv = LiveServer(model_dir=repo).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def request_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("requests")
    bench.write_requests(folder, bench.test_images(8))
    return folder


@pytest.mark.parametrize(
    ("script", "delay_ms"), [("v2_json.lua", 0), ("v2_binary.lua", 0), ("v2_json.lua", 5)]
)
def test_wrk_scripts_send_valid_v2_requests(fmnist_fc, request_files, script, delay_ms):
    codes_before = answered(fmnist_fc.url)
    r = bench.wrk(script, fmnist_fc.url, "/v2/models/fmnist-fc/infer", request_files, 4, 1,
                  delay_ms)  # fmt: skip
    assert r["requests"] > 0
    assert r["non_2xx"] == 0, r
    assert (r["connect_errors"], r["read_errors"], r["write_errors"], r["timeouts"]) == (0,) * 4
    codes = answered(fmnist_fc.url)
    new = {c: codes.get(c, 0) - codes_before.get(c, 0) for c in codes}
    assert {c for c, n in new.items() if n} == {"200"}, new
    # wrk stops counting at its deadline; answers still in flight then reach the server's count.
    assert new["200"] >= r["requests"]


def test_the_request_files_are_the_images(request_files):
    images = bench.test_images(8)
    body = json.loads((request_files / "json-3.json").read_text())
    assert body["inputs"][0]["shape"] == [1, 1, 28, 28]
    assert body["inputs"][0]["data"] == images[3].ravel().tolist()
    header = json.loads((request_files / "header-3.json").read_text())
    assert header["inputs"][0]["parameters"] == {"binary_data_size": 3136}
    assert (request_files / "tensor-3.f32").read_bytes() == images[3].astype("<f4").tobytes()
    assert (request_files / "count.txt").read_text() == "8\n"


def answered(url: str) -> dict[str, float]:
    """Requests to fmnist-fc answered so far, by status code (any endpoint)."""
    out: dict[str, float] = {}
    for (name, labels), v in metric_samples(httpx.get(f"{url}/metrics", timeout=30).text).items():
        ls = dict(labels)
        if name == "mondeq_requests_total" and ls.get("model") == "fmnist-fc":
            out[ls["code"]] = out.get(ls["code"], 0) + v
    return out
