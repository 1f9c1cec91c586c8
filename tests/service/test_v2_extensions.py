"""The statistics and model-repository extensions of the V2 protocol (docs/service.md),
driven by tritonclient's HTTP client against a real server on tiny real checkpoints: server
and model metadata, readiness, per-version statistics counted exactly, and the repository's
index, load and unload behind the admin token."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from service_support import ADMIN_TOKEN, FC_CONFIG, LiveServer, make_checkpoint

triton = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PHASES = ("compute_input", "compute_infer", "compute_output")
POLL_S = 0.2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """fc (v1, v2), broken (garbage bytes): polled every 0.2 s, at most 1,000
    row-iterations a request (8 rows at max_iter 200 are refused)."""
    root = tmp_path_factory.mktemp("extensions")
    make_checkpoint(root / "fc/1/model.pt", FC_CONFIG, seed=3)
    make_checkpoint(root / "fc/2/model.pt", FC_CONFIG, seed=4)
    (root / "broken/1").mkdir(parents=True)
    (root / "broken/1/model.pt").write_bytes(b"not a checkpoint")
    srv = LiveServer(
        model_dir=root,
        admin_token=ADMIN_TOKEN,
        poll_interval_s=POLL_S,
        tune_at_load=False,
        retune_factor=0,
        max_delay_ms=1,
        max_row_iterations=1000,
    ).start()
    yield srv
    srv.stop()


@pytest.fixture()
def client(served):
    c = triton.InferenceServerClient(served.url.removeprefix("http://"))
    yield c
    c.close()


def infer(client, rows: int, version: str = "", **parameters):
    x = np.random.default_rng(rows).random((rows, 1, 8, 8), dtype=np.float32)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    return client.infer("fc", [inp], model_version=version, parameters=parameters or None)


def test_tritonclient_reads_metadata_and_readiness(client):
    meta = client.get_server_metadata()
    assert meta == {
        "name": "mondeq",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "statistics", "model_repository"],
    }
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fc") and client.is_model_ready("fc", "1")
    assert not client.is_model_ready("broken")
    model = client.get_model_metadata("fc", "2")
    assert model["versions"] == ["2"]
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]


def test_statistics_count_samples_solves_and_failures_exactly(served, client):
    """Version 1 of fc: three answered requests of 2 rows (6 samples, 3 solves of 2), one
    refused for too much work (8 rows × 200 iterations > 1,000); version 2 untouched."""
    t0 = time.time_ns() // 1_000_000
    for _ in range(3):
        infer(client, 2, "1", max_iter=20)
    with pytest.raises(InferenceServerException, match="exceeds the server's limit"):
        infer(client, 8, "1")
    t1 = time.time_ns() // 1_000_000
    stats = client.get_inference_statistics("fc", "1")
    assert [s["version"] for s in stats["model_stats"]] == ["1"]
    s = stats["model_stats"][0]
    assert (s["name"], s["inference_count"], s["execution_count"]) == ("fc", 6, 3)
    assert t0 <= s["last_inference"] <= t1
    inference = s["inference_stats"]
    counts = {k: v["count"] for k, v in inference.items()}
    assert counts == {
        "success": 3,
        "fail": 1,
        "queue": 3,
        **dict.fromkeys(PHASES, 3),
        "cache_hit": 0,
        "cache_miss": 0,
    }
    assert all(inference[k]["ns"] > 0 for k in ("success", "fail", "queue", *PHASES))
    assert [b["batch_size"] for b in s["batch_stats"]] == [2]
    assert all(s["batch_stats"][0][p]["count"] == 3 for p in PHASES)
    # A request's compute times are its batch's: alone in its batch, they add up the same.
    assert all(s["batch_stats"][0][p]["ns"] == inference[p]["ns"] for p in PHASES)
    assert (s["response_stats"], s["memory_usage"]) == ({}, [])

    # Every version of fc, every model, and the same over plain HTTP.
    by_model = client.get_inference_statistics("fc")["model_stats"]
    assert [(m["version"], m["inference_count"]) for m in by_model] == [("1", 6), ("2", 0)]
    every = client.get_inference_statistics()["model_stats"]
    assert [(m["name"], m["version"]) for m in every] == [("broken", "1"), ("fc", "1"), ("fc", "2")]
    assert httpx.get(f"{served.url}/v2/models/fc/versions/1/stats").json() == stats


def test_statistics_of_unknown_models_and_versions_are_404(served, client):
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_inference_statistics("nope")
    r = httpx.get(f"{served.url}/v2/models/fc/versions/9/stats")
    assert r.status_code == 404
    assert r.json() == {"error": "model 'fc' has no version '9'; versions: ['1', '2']"}


def test_repository_index_load_and_unload(served, client):
    """Index lists each version with its state; unload takes fc down for good (the poller
    leaves it alone) and its requests are 404; load brings it back with fresh statistics;
    a model whose file does not load is 422; all of it only with the admin token."""
    with pytest.raises(InferenceServerException, match="missing or wrong bearer token"):
        client.get_model_repository_index()
    index = client.get_model_repository_index(headers=AUTH)
    assert [(m["name"], m["version"], m["state"]) for m in index] == [
        ("broken", "1", "UNAVAILABLE"),
        ("fc", "1", "READY"),
        ("fc", "2", "READY"),
    ]
    assert index[0]["reason"].startswith(f"{served.settings.model_dir}/broken/1/model.pt: ")
    assert index[1]["reason"] == ""
    ready = httpx.post(f"{served.url}/v2/repository/index", json={"ready": True}, headers=AUTH)
    assert [m["name"] for m in ready.json()] == ["fc", "fc"]

    infer(client, 1, max_iter=20)
    client.unload_model("fc", headers=AUTH)
    time.sleep(3 * POLL_S)  # the poller has rescanned the folder since
    assert not client.is_model_ready("fc")
    with pytest.raises(InferenceServerException, match="model 'fc' is unloaded"):
        infer(client, 1, max_iter=20)
    index = client.get_model_repository_index(headers=AUTH)
    assert [(m["name"], m["state"], m["reason"]) for m in index if m["name"] == "fc"] == [
        ("fc", "UNAVAILABLE", "unloaded"),
        ("fc", "UNAVAILABLE", "unloaded"),
    ]
    client.unload_model("fc", headers=AUTH)  # again: nothing to do
    assert not client.is_server_ready()  # no model can serve: fc is unloaded, broken failed

    client.load_model("fc", headers=AUTH)
    assert client.is_model_ready("fc", "1") and client.is_model_ready("fc", "2")
    assert infer(client, 1, max_iter=20).as_numpy("label").shape == (1,)
    stats = client.get_inference_statistics("fc")["model_stats"]
    assert [m["inference_count"] for m in stats] == [0, 1]  # reloaded: counted afresh

    with pytest.raises(InferenceServerException, match="model 'broken' did not load: broken/1"):
        client.load_model("broken", headers=AUTH)
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.load_model("nope", headers=AUTH)
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.unload_model("nope", headers=AUTH)
    with pytest.raises(InferenceServerException, match=r"load parameters are not supported"):
        client.load_model("fc", headers=AUTH, config='{"backend": "onnx"}')
    r = httpx.post(
        f"{served.url}/v2/repository/models/fc/unload",
        json={"parameters": {"unload_dependents": "yes"}},
        headers=AUTH,
    )
    assert (r.status_code, r.json()) == (
        422,
        {"error": "unsupported unload parameters: ['unload_dependents (true or false)']"},
    )
    assert client.is_model_ready("fc")
