"""LitServe serving a monDEQ checkpoint, written the way LitServe's docs show: a
``litserve.LitAPI`` whose ``setup`` loads the model and whose ``predict`` takes a batch, with
dynamic batching (``max_batch_size`` 64) and LitServe's own HTTP process apart from the one
that solves.

The request body is the V2 JSON inference request the other servers get (LitServe has no V2
protocol of its own, so ``decode_request`` reads the input tensor out of it) and the answer is
``{"label": k}``. Each batch's size is added to ``--batch-stats`` (``rows batches``, rewritten at
most every 0.2 s) so the benchmark can report the mean batch.

Runs in the peers' virtual environment (``bench/.venv-peers``)::

    python bench/peers/litserve_server.py --checkpoint PATH --port 8000 [--device cpu]
        [--batch-timeout 0.01] [--batch-stats FILE]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import litserve as ls
import numpy as np
import torch
from served import served_model


class MonDEQAPI(ls.LitAPI):
    def __init__(self, checkpoint: Path, stats: Path | None, **kwargs):
        super().__init__(**kwargs)
        self.checkpoint, self.stats = checkpoint, stats
        self.rows = self.batches = 0
        self.written = 0.0

    def setup(self, device: str) -> None:
        self.device = device
        self.model = served_model(self.checkpoint, device)

    def decode_request(self, request: dict) -> torch.Tensor:
        inp = request["inputs"][0]
        data = np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"][1:])
        return torch.from_numpy(data)

    def predict(self, x: torch.Tensor) -> list[int]:
        # LitServe stacks the decoded (C, H, W) tensors into a (B, C, H, W) batch.
        x = x.to(self.device)
        labels = self.model.infer(self.model.input_spec.normalize(x)).labels
        self.count(x.shape[0])
        return labels.tolist()

    def encode_response(self, output: int) -> dict:
        return {"label": output}

    def count(self, rows: int) -> None:
        self.rows += rows
        self.batches += 1
        now = time.monotonic()
        if self.stats is not None and now - self.written > 0.2:
            tmp = self.stats.with_suffix(".tmp")
            tmp.write_text(f"{self.rows} {self.batches}\n")
            os.replace(tmp, self.stats)
            self.written = now


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--batch-timeout", type=float, default=0.01, help="seconds")
    p.add_argument("--batch-stats", type=Path)
    args = p.parse_args()
    api = MonDEQAPI(
        args.checkpoint,
        args.batch_stats,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
    )
    server = ls.LitServer(api, accelerator=args.device, devices=1, workers_per_device=1)
    server.run(port=args.port, generate_client_file=False)
