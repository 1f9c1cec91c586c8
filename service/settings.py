"""Server settings: every field also comes from a ``MONDEQ_<FIELD>`` environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """How ``mondeq serve`` runs. ``Settings()`` reads ``MONDEQ_*`` variables; keyword
    arguments (the CLI flags) win over them.

    Example: ``MONDEQ_MODEL_DIR=/models MONDEQ_MAX_BATCH_SIZE=32 MONDEQ_ADMIN_TOKEN=s3cret``.
    """

    model_config = SettingsConfigDict(
        env_prefix="MONDEQ_", extra="ignore", protected_namespaces=(), validate_default=True
    )

    # ---- where and what ---------------------------------------------------------------
    model_dir: Path = Field(Path("models"), description="repository: <name>/<version>/model.pt")
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # ---- batching and admission --------------------------------------------------------
    max_batch_size: int = Field(64, ge=1, description="rows per solve (1 turns batching off)")
    max_delay_ms: float = Field(
        50.0, ge=0, description="longest a request waits for others to share its batch"
    )
    max_gap_ms: float = Field(
        2.0, ge=0, description="a filling batch stops waiting after this long without arrivals"
    )
    max_queue: int = Field(256, ge=1, description="rows waiting per model before 429")
    max_request_batch: int = Field(256, ge=1, description="rows one request may carry")
    max_solving_rows: int = Field(
        512,
        ge=1,
        description="rows in solves at once per model (started, computing or paused); "
        "a batch past it waits for a solve to end",
    )
    max_body_bytes: int = Field(8 << 20, ge=1024, description="request body limit (413 past it)")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="largest uploaded image (width × height)"
    )
    graceful_timeout_s: float = Field(30.0, gt=0, description="SIGTERM: time to finish work")

    # ---- per-request solver bounds ----------------------------------------------------
    min_tol: float = Field(1e-6, gt=0, description="smallest tol a request may ask for")
    max_iter_cap: int = Field(1000, ge=1, description="largest max_iter a request may ask for")
    max_row_iterations: int = Field(
        100_000,
        ge=1,
        description="rows × max_iter one request may ask for (its worst-case solver work)",
    )

    # ---- model repository -------------------------------------------------------------
    poll_interval_s: float = Field(10.0, ge=0, description="rescan model_dir (0: never)")
    settle_s: float = Field(
        2.0,
        ge=0,
        description="a checkpoint loads once its size and times have not changed for this long",
    )

    # ---- α tuning ------------------------------------------------------------------------
    tune_at_load: bool = Field(True, description="tune α when a model loads")
    calibration_size: int = Field(64, ge=1, description="rows of the tuning batch")
    recent_size: int = Field(256, ge=1, description="recent inputs kept for retuning")
    retune_factor: float = Field(
        1.5, ge=0, description="retune when mean iterations exceed baseline × this (0: never)"
    )
    retune_window: int = Field(512, ge=1, description="samples per drift check")
    retune_cooldown_s: float = Field(60.0, ge=0, description="least time between drift retunes")

    # ---- admin ---------------------------------------------------------------------------
    admin_token: SecretStr | None = Field(
        None, description="bearer token of the admin endpoints (unset: admin disabled)"
    )

    @field_validator("log_level", "device", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v

    def resolve_device(self) -> str:
        """``"cuda"`` or ``"cpu"``: ``auto`` picks CUDA when torch sees a GPU."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
