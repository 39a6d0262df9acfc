"""API settings from the environment (pydantic-settings): the workers' settings plus the web's.

Every variable is prefixed ``TDA_`` (``REDIS_URL`` excepted); see ``WorkerSettings`` for the
shared ones and the README's table for all of them.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from worker.config import WorkerSettings


class Settings(WorkerSettings):
    """Everything the API process reads from its environment."""

    host: str = Field(default="127.0.0.1", description="Address uvicorn binds.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port uvicorn binds.")
    max_body_bytes: int = Field(
        default=4 << 20, ge=1024, description="Largest JSON request body, in bytes (413 above)."
    )
    max_upload_bytes: int = Field(
        default=512 << 20, ge=1024, description="Largest file upload (PUT /v1/files/...), bytes."
    )
    rate_limit_per_minute: int = Field(
        default=600, ge=0, description="Requests per minute per API key; 0 turns the limit off."
    )
    rate_limit_burst: int = Field(
        default=100, ge=1, description="Requests a key may make at once before the rate applies."
    )
    max_topk_k: int = Field(default=1000, ge=1, description="Largest k a top-k query may ask.")
    max_topk_examples: int = Field(
        default=256, ge=1, description="Most examples in one top-k request."
    )
    max_job_examples: int = Field(
        default=10000, ge=1, description="Most inline examples in one job request."
    )
    preload_indexes: bool = Field(
        default=True, description="Open every published index at startup (/readyz waits for it)."
    )
    index_cache_size: int = Field(default=16, ge=1, description="Indexes kept open per process.")
    topk_batch_rows: int = Field(
        default=64, ge=1, description="Most examples of concurrent top-k requests answered together."
    )
    topk_batch_wait_ms: float = Field(
        default=4.0, ge=0, description="Under concurrent load, how long a top-k batch waits for "
        "as many requests as the previous batch had (never when requests come one at a time).",
    )
    api_query_max_parameters: int = Field(
        default=50_000_000,
        ge=0,
        description="Models above this many parameters compute top-k queries on a gpu worker.",
    )
    query_timeout_seconds: float = Field(
        default=60.0, gt=0, description="How long a top-k request waits for a worker's query."
    )
    torch_threads: int = Field(default=1, ge=1, description="Torch threads per API process.")
    api_workers: int = Field(
        default=1, ge=1, description="uvicorn worker processes `tda serve` starts; above 1, "
        "/metrics sums all of them through PROMETHEUS_MULTIPROC_DIR (default {data_dir}/metrics).",
    )


@lru_cache
def get_settings() -> Settings:
    """Settings read once per process (tests build their own and override the dependency)."""
    return Settings()
