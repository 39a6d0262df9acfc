"""Settings shared by the API and the workers, read from the environment (pydantic-settings).

Every variable is prefixed ``TDA_`` except ``REDIS_URL``. The service's settings extend these
(``service.core.config.Settings``), so one environment configures the whole system.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
    """Where data and Redis live, and how long jobs may run."""

    model_config = SettingsConfigDict(env_prefix="TDA_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "TDA_REDIS_URL"),
        description="Redis for broker, job state and rate limits; unset: `tda serve` embeds one.",
    )
    data_dir: Path = Field(
        default=Path(".tda"),
        description="Data root: tenants' files, registries, indexes, results, embedded Redis.",
    )
    key_prefix: str = Field(default="tda:", description="Prefix of every Redis key tdaserve writes.")
    queue_prefix: str = Field(default="", description="Prefix of the Celery queue names gpu/cpu.")
    job_soft_time_limit: int = Field(
        default=3000, ge=1, description="Seconds before a job is asked to stop (it fails cleanly)."
    )
    job_time_limit: int = Field(
        default=3600, ge=1, description="Seconds before a job's worker process is killed."
    )
    visibility_timeout: int | None = Field(
        default=None,
        description="Seconds before Redis redelivers an unacknowledged job; must exceed "
        "job_time_limit (default: job_time_limit × 1.1 + 60).",
    )
    max_deliveries: int = Field(
        default=3, ge=1, description="A job that crashed its worker this many times is failed."
    )
    lease_seconds: int = Field(
        default=30, ge=2, description="A running job's lease; renewed while it runs."
    )
    heartbeat_seconds: float = Field(
        default=5.0, gt=0, description="How often workers report liveness and reap orphaned jobs."
    )
    worker_concurrency: int = Field(default=1, ge=1, description="Processes per worker.")
    result_ttl_days: float = Field(
        default=30, gt=0, description="Days an ended job's record and result files are kept; "
        "then both are deleted (GET /v1/jobs/{id} answers 410 Gone for another TTL).",
    )
    result_purge_seconds: float = Field(
        default=600, gt=0, description="How often each worker deletes expired jobs and results."
    )

    @model_validator(mode="after")
    def _limits(self) -> WorkerSettings:
        if self.job_soft_time_limit >= self.job_time_limit:
            raise ValueError("TDA_JOB_SOFT_TIME_LIMIT must be below TDA_JOB_TIME_LIMIT")
        if self.visibility_timeout is None:
            self.visibility_timeout = int(self.job_time_limit * 1.1) + 60
        if self.visibility_timeout <= self.job_time_limit:
            raise ValueError(
                "TDA_VISIBILITY_TIMEOUT must exceed TDA_JOB_TIME_LIMIT, or Redis would hand a "
                "running job to a second worker"
            )
        self.data_dir = self.data_dir.expanduser().resolve()
        return self

    @property
    def result_ttl_seconds(self) -> float:
        return self.result_ttl_days * 86400

    @property
    def queues(self) -> dict[str, str]:
        """Logical queue name → broker queue name."""
        return {q: f"{self.queue_prefix}{q}" for q in ("gpu", "cpu")}

    def tenant_dir(self, tenant: str) -> Path:
        """Everything one tenant owns lives below this directory."""
        return self.data_dir / "tenants" / tenant

    def files_dir(self, tenant: str) -> Path:
        """The tenant's file area: uploads land here and server-side paths must resolve here."""
        return self.tenant_dir(tenant) / "files"

    def index_root(self, tenant: str) -> Path:
        """Root directory of the tenant's indexes (one folder per index name)."""
        return self.tenant_dir(tenant) / "indexes"

    def results_dir(self, tenant: str) -> Path:
        """Root of the tenant's job results (one folder per job)."""
        return self.tenant_dir(tenant) / "results"


@lru_cache
def get_worker_settings() -> WorkerSettings:
    """Settings read once per process."""
    return WorkerSettings()
