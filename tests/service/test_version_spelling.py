"""A model version has one spelling, through a real server: ``01`` is neither a folder
that serves nor a path that answers (it echoed ``"01"`` as version 1's name)."""

from __future__ import annotations

from service_support import (
    ADMIN_TOKEN,
    FC_CONFIG,
    LiveServer,
    make_checkpoint,
    metric,
    metric_samples,
)


def test_version_has_one_spelling(tmp_path, caplog):
    """``versions/01`` answered as version 1 with metadata ``"versions": ["01"]``, and a
    folder ``01`` beside ``1`` was the same version, one of them silently hidden."""
    import logging

    caplog.set_level(logging.WARNING, logger="mondeq.service")
    root = tmp_path / "models"
    make_checkpoint(root / "fc/1/model.pt", FC_CONFIG, seed=1)
    make_checkpoint(root / "fc/02/model.pt", FC_CONFIG, seed=2)
    srv = LiveServer(model_dir=root, admin_token=ADMIN_TOKEN, retune_factor=0).start()
    try:
        with srv.client() as c:
            r = c.get("/v2/models/fc/versions/1")
            assert r.status_code == 200, r.text
            assert r.json()["versions"] == ["1"]
            assert c.get("/v2/models/fc").json()["versions"] == ["1"]
            for spelling in ("01", "001", "02", "2"):
                for path in ("", "/ready", "/stats"):
                    r = c.get(f"/v2/models/fc/versions/{spelling}{path}")
                    assert r.status_code == 404, (spelling, path, r.text)
                    assert r.json() == {
                        "error": f"model 'fc' has no version {spelling!r}; versions: ['1']"
                    }
            r = c.post("/v2/models/fc/versions/01/infer", json={"inputs": []})
            assert r.status_code == 404, r.text
            samples = metric_samples(c.get("/metrics").text)
            assert metric(samples, "mondeq_requests_total", endpoint="v2_model", code="404") == 4
    finally:
        srv.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{root / 'fc/02'} ignored: not a version number (versions are folders named 1, 2, 3, ...)"
    ]
