"""Server settings: every field comes from a ``MONDEQ_<FIELD>`` environment variable and a
``mondeq serve --<field>`` flag (``service.cli`` generates the flags from these fields, their
help from each ``description``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """How ``mondeq serve`` runs. ``Settings()`` reads ``MONDEQ_*`` variables; keyword
    arguments (the CLI flags) win over them.

    Example: ``MONDEQ_MODEL_DIR=/models MONDEQ_MAX_BATCH_SIZE=32 MONDEQ_ADMIN_TOKEN=s3cret``.
    """

    model_config = SettingsConfigDict(
        env_prefix="MONDEQ_",
        extra="ignore",
        protected_namespaces=(),
        validate_default=True,
        allow_inf_nan=False,  # a delay, limit or timeout of inf or nan is a typo, not a wish
    )

    # ---- where and what ---------------------------------------------------------------
    model_dir: Path = Field(Path("models"), description="repository: <name>/<version>/model.pt")
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="TCP port of the Open Inference Protocol over gRPC, on the same host (0: off)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="least severity logged (info: model loads, α searches)"
    )
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="HTTP worker processes: 1 serves from one process; N > 1 parses requests "
        "in N processes that feed one solver process (docs/service.md, Workers)",
    )

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
    max_body_bytes: int = Field(
        8 << 20, ge=1024, description="request body limit in bytes (413 past it)"
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="largest uploaded image (width × height)"
    )
    graceful_timeout_s: float = Field(
        30.0, gt=0, description="SIGTERM: seconds to finish accepted work"
    )

    # ---- per-request solver bounds ----------------------------------------------------
    min_tol: float = Field(1e-6, gt=0, description="smallest tol a request may ask for")
    max_iter_cap: int = Field(1000, ge=1, description="largest max_iter a request may ask for")
    max_row_iterations: int = Field(
        100_000,
        ge=1,
        description="rows × max_iter one request may ask for (its worst-case solver work)",
    )
    stop: Literal["tol", "label", "logits"] = Field(
        "tol",
        description="stopping rule of requests that name none: tol (residual), label (the "
        "label is proven) or logits (every logit within logit_tol of the equilibrium's)",
    )
    logit_tol: float | None = Field(
        None,
        gt=0,
        description="logit accuracy of stop=logits for requests that name none (needed when "
        "stop is logits)",
    )

    # ---- model repository -------------------------------------------------------------
    poll_interval_s: float = Field(
        10.0, ge=0, description="seconds between rescans of model_dir (0: never)"
    )
    settle_s: float = Field(
        2.0,
        ge=0,
        description="seconds a checkpoint must stay unchanged (size and times) before it loads",
    )

    # ---- α tuning ------------------------------------------------------------------------
    tune_at_load: bool = Field(
        True, description="search α when a model loads (on a CPU, most of a first start)"
    )
    calibration_size: int = Field(
        64, ge=1, description="rows an α search runs on (calibration batch or recent inputs)"
    )
    recent_size: int = Field(256, ge=1, description="recent input rows kept for retuning")
    retune_factor: float = Field(
        1.5, ge=0, description="retune when mean iterations exceed baseline × this (0: never)"
    )
    retune_window: int = Field(512, ge=1, description="samples per drift check")
    retune_cooldown_s: float = Field(60.0, ge=0, description="least seconds between drift retunes")

    # ---- admin ---------------------------------------------------------------------------
    admin_token: SecretStr | None = Field(
        None, description="bearer token of the admin endpoints (unset: admin disabled)"
    )

    @field_validator("log_level", "device", "stop", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v

    @field_validator("logit_tol")
    @classmethod
    def _logit_tol_with_logits(cls, v, info: ValidationInfo):
        if v is None and info.data.get("stop") == "logits":
            raise ValueError("stop logits needs a logit_tol, the logit accuracy (--logit-tol)")
        return v

    def resolve_device(self) -> str:
        """``"cuda"`` or ``"cpu"``: ``auto`` picks CUDA when torch sees a GPU."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
