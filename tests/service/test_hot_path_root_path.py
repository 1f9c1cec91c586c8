"""Behind a proxy's prefix (uvicorn ``--root-path``), the request path's rules hold below it:
the hot path answers inference, the request metrics label the routes, and a scrape of
``/metrics`` is not counted among the requests in flight, as without a prefix."""

from __future__ import annotations

import torch
from service_support import LiveServer, metric, metric_samples, v2_body


def test_a_root_path_changes_nothing_below_it(model_repo):
    srv = LiveServer(model_dir=model_repo, retune_factor=0, max_delay_ms=1)
    srv.server.config.root_path = "/api"  # as `uvicorn --root-path /api`
    srv.start()
    try:
        with srv.client() as c:
            x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
            assert c.post("/v2/models/fc/infer", json=v2_body(x)).status_code == 200
            assert c.post("/v2/models/fc/versions/1/infer", json=v2_body(x)).status_code == 200
            missing = c.post("/api/v2/models/fc/infer", json=v2_body(x))  # the prefix twice
            assert missing.status_code == 404
            assert missing.json() == {"error": "no such path: /api/api/v2/models/fc/infer"}
            assert c.get("/docs").status_code == 200
            samples = metric_samples(c.get("/metrics").text)
        assert metric(samples, "mondeq_inflight_requests") == 0
        requests = {
            (labels["model"], labels["endpoint"], labels["code"]): value
            for (name, ls), value in samples.items()
            if name == "mondeq_requests_total" and (labels := dict(ls))["endpoint"] != "v2_ready"
        }
        assert requests == {
            ("fc", "v2_infer", "200"): 2.0,
            ("", "other", "404"): 1.0,
            ("", "docs", "200"): 1.0,
        }
    finally:
        srv.stop()
