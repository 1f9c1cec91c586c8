"""KServe's ``ModelServer`` serving a monDEQ checkpoint over the V2 (Open Inference) protocol,
REST and gRPC, written the way KServe's custom-model docs show: a ``kserve.Model`` subclass
that loads in ``load()`` and answers ``InferRequest`` with ``InferResponse`` in ``predict()``.
KServe's model server batches nothing itself (batching is its agent's job in a cluster), so each
request is one solve.

Runs in the peers' virtual environment (``bench/.venv-peers``, built by
``bench/service_load.py``)::

    python bench/peers/kserve_server.py --model_name fmnist-fc --checkpoint PATH \\
        --http_port 8080 --grpc_port 8081 [--device cpu]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import kserve
import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse
from kserve.utils.utils import generate_uuid
from served import served_model


class MonDEQModel(kserve.Model):
    """One input ``input`` (FP32 pixels in [0, 1], ``(B, 1, 28, 28)``) → ``label`` (INT64
    ``(B,)``), solved by model_core at the checkpoint's settings."""

    def __init__(self, name: str, checkpoint: Path, device: str):
        super().__init__(name)
        self.checkpoint, self.device = checkpoint, device
        self.load()

    def load(self) -> bool:
        self.model = served_model(self.checkpoint, self.device)
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
        pixels = torch.from_numpy(payload.inputs[0].as_numpy()).to(self.device)
        labels = self.model.infer(self.model.input_spec.normalize(pixels)).labels
        out = InferOutput(name="label", shape=[labels.shape[0]], datatype="INT64")
        out.set_data_from_numpy(labels.cpu().numpy().astype(np.int64), binary_data=False)
        return InferResponse(
            model_name=self.name, infer_outputs=[out], response_id=payload.id or generate_uuid()
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args, _ = parser.parse_known_args()
    kserve.ModelServer().start([MonDEQModel(args.model_name, args.checkpoint, args.device)])
