"""Start ``python -m service`` for a benchmark and wait until it is ready (shared by the
service benchmarks; run them as ``python bench/<name>.py``, which puts this folder on the path).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(
    model_dir: Path, *flags: str, env: dict | None = None, ready_timeout_s: float = 300.0
) -> tuple[subprocess.Popen, str]:
    """``python -m service --model-dir DIR --port P --log-level warning FLAGS`` with the
    repository never rescanned (``MONDEQ_POLL_INTERVAL_S=0``) plus ``env``; returns the
    process and its base URL once ``/v2/health/ready`` answers 200.

    Raises:
        SystemExit: the server exited, or was not ready within ``ready_timeout_s`` seconds
            (it is killed then).
    """
    port = free_port()
    args = ["--model-dir", str(model_dir), "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", *args, *flags],
        cwd=ROOT,
        env={**os.environ, "MONDEQ_POLL_INTERVAL_S": "0", **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server on {model_dir} exited with {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server on {model_dir} not ready after {ready_timeout_s:.0f} s")
