"""What a server says while its models load: progress in the log, readiness only once every
model's first load (α search included) is over, and a warning for each folder ignored for its
name. Real checkpoints, a real uvicorn server, the service's own log records."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import httpx
from service_support import ADMIN_TOKEN, FC_CONFIG, LiveServer, make_checkpoint, v2_body

LOGGER = "mondeq.service"


def models(c: httpx.Client) -> dict:
    return {m["name"]: m for m in c.get("/v1/models").json()["models"]}


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_loading_logs_each_step_with_its_time(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    root = tmp_path / "models"
    make_checkpoint(root / "tuned/1/model.pt", FC_CONFIG, seed=1, calibration=64)
    make_checkpoint(root / "plain/1/model.pt", FC_CONFIG, seed=2)  # no calibration batch
    srv = LiveServer(model_dir=root, retune_factor=0).start()
    try:
        with srv.client() as c:
            listed = models(c)
    finally:
        srv.stop()
    alpha = listed["tuned"]["alpha"]
    lines = [m for m in messages(caplog) if "/1" in m or "first load" in m]
    number = r"[0-9.]+"
    expected = [
        rf"plain/1: loading {re.escape(str(root / 'plain/1/model.pt'))}",
        r"plain/1: no calibration batch in the checkpoint; α is searched on its first 512 "
        r"samples of traffic",
        rf"plain/1 ready in {number} s: fc, 4,458 parameters, α 1\.0, on cpu",
        rf"tuned/1: loading {re.escape(str(root / 'tuned/1/model.pt'))}",
        r"tuned/1: α search \(load\) on 64 calibration samples: up to 13 α in \[0\.01, 100\], "
        r"peaceman_rachford from α 1\.0",
        rf"tuned/1: α search \(load\) done in {number} s: α 1\.0 → {re.escape(str(alpha))}, "
        rf"{number} mean iterations, \d+ α tried",
        rf"tuned/1 ready in {number} s: fc, 4,458 parameters, α {re.escape(str(alpha))}, "
        r"on cpu",
        rf"first load done in {number} s: 2 of 2 models can serve \(plain, tuned\); ready",
    ]
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)
    assert alpha != 1.0  # the search moved α, and the log says to what


def test_readiness_waits_for_every_first_load_alpha_search_included(tmp_path, caplog):
    """``/v2/health/ready`` is 503 while any model found at start is still loading, even when
    another serves already (``/v2/models/{name}/ready`` says that per model); then 200."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    root = tmp_path / "models"
    make_checkpoint(root / "a/1/model.pt", FC_CONFIG, seed=1)  # loads at once (no α search)
    make_checkpoint(root / "b/1/model.pt", FC_CONFIG, seed=2, calibration=64)  # seconds of search
    srv = LiveServer(model_dir=root, retune_factor=0).start(wait_ready=False)
    snapshots = []
    try:
        with srv.client() as c:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                a_ready = c.get("/v2/models/a/ready").status_code
                health = c.get("/v2/health/ready")
                b = models(c).get("b", {}).get("status")  # read last: a status b had meanwhile
                snapshots.append((a_ready, health.status_code, b, health.json()))
                if health.status_code == 200:
                    break
            # While b tunes, a answers, but the server as a whole is not ready.
            assert c.post("/v2/models/a/infer", json=v2_body(_pixels())).status_code == 200
    finally:
        srv.stop()
    waiting = [s for s in snapshots if s[:3] == (200, 503, "loading")]
    assert waiting, snapshots
    assert waiting[0][3] == {"error": "not ready: models are loading", "ready": False}
    assert snapshots[-1][:3] == (200, 200, "ready")
    assert all(s[2] == "ready" for s in snapshots if s[1] == 200)
    log = messages(caplog)
    search = next(i for i, m in enumerate(log) if m.startswith("b/1: α search (load) on"))
    done = next(i for i, m in enumerate(log) if m.startswith("first load done"))
    assert search < done


def _pixels():
    import torch

    return torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_folders_ignored_for_their_names_are_warned_about_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    root = tmp_path / "models"
    make_checkpoint(root / "fmnist-fc/1/model.pt", FC_CONFIG, seed=1)
    make_checkpoint(root / "fmnist-fc/latest/model.pt", FC_CONFIG, seed=2)  # not a version
    (root / "fmnist-fc/0").mkdir()  # versions start at 1
    make_checkpoint(root / "bad name/1/model.pt", FC_CONFIG, seed=3)  # not a model name
    make_checkpoint(root / "flat/model.pt", FC_CONFIG, seed=4)  # no version folder
    # Work in progress is skipped without a word (publishing writes under these names).
    for wip in ("fmnist-fc/.2.tmp", "fmnist-fc/3.part", ".hidden/1", "staging.tmp/1"):
        (root / wip).mkdir(parents=True)
    (root / "fmnist-fc/1/model.pt.tmp").write_bytes(b"partial")
    (root / "notes.txt").write_text("files beside the models are not folders")
    srv = LiveServer(model_dir=root, admin_token=ADMIN_TOKEN, retune_factor=0).start()
    try:
        with srv.client() as c:
            for _ in range(3):  # each reload rescans the folder
                r = c.post(
                    "/v1/models/fmnist-fc/reload",
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                )
                assert r.status_code == 200, r.text
            listed = models(c)
    finally:
        srv.stop()
    assert sorted(listed) == ["fmnist-fc"]
    assert [v["version"] for v in listed["fmnist-fc"]["versions"]] == ["1"]
    warnings = [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]
    assert sorted(warnings) == sorted(
        [
            f"{root / 'bad name'} ignored: not a model name (a letter or digit, then up to 127 "
            "letters, digits, '.', '_' or '-')",
            f"{root / 'flat/model.pt'} ignored: not in a version folder: move it to "
            f"{root / 'flat/1/model.pt'}",
            f"{root / 'fmnist-fc/0'} ignored: not a version number (versions are folders "
            "named 1, 2, 3, ...)",
            f"{root / 'fmnist-fc/latest'} ignored: not a version number (versions are folders "
            "named 1, 2, 3, ...)",
        ]
    )


def test_scan_reports_what_it_ignores(tmp_path):
    """The same rule without a server: ``scan`` lists each skipped path with the reason."""
    from service.repository import scan

    make_checkpoint(tmp_path / "m/2/model.pt", FC_CONFIG)
    make_checkpoint(tmp_path / "m/v2/model.pt", FC_CONFIG)
    ignored: list[tuple[Path, str]] = []
    found = scan(tmp_path, ignored)
    assert list(found) == ["m"] and list(found["m"]) == [2]
    assert [(p.relative_to(tmp_path).as_posix(), why.split(" (")[0]) for p, why in ignored] == [
        ("m/v2", "not a version number")
    ]
