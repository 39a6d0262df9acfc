"""What one API process holds open: Redis, the job store, keys, limits, open indexes."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from service.core.config import Settings
from service.core.limits import RateLimiter
from service.core.security import KeyStore, key_file
from service.indexes import IndexCache
from service.remote import RemoteQueries, model_parameters
from worker.jobstore import JobStore, connect


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    keys: KeyStore
    limiter: RateLimiter
    indexes: IndexCache

    @classmethod
    def open(cls, settings: Settings) -> Services:
        if not settings.redis_url:
            raise RuntimeError(
                "REDIS_URL is not set: run `tda serve` (which embeds Redis when it is unset) "
                "or point REDIS_URL at your Redis"
            )
        client = connect(settings.redis_url)
        binary = redis.Redis.from_url(settings.redis_url)

        def featurizer(index):  # type: ignore[no-untyped-def]
            if model_parameters(index.manifest) <= settings.api_query_max_parameters:
                return None
            return RemoteQueries(settings, binary, index, settings.query_timeout_seconds)

        return cls(
            settings=settings,
            redis=client,
            jobs=JobStore(client, settings.key_prefix, settings.result_ttl_seconds),
            keys=KeyStore(key_file(settings.data_dir)),
            limiter=RateLimiter(client, settings.key_prefix, settings.rate_limit_per_minute,
                                settings.rate_limit_burst),
            indexes=IndexCache(settings, settings.index_cache_size, featurizer),
        )

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting per queue (kombu keeps a Redis list per queue name)."""
        prefix = f"{self.settings.key_prefix}celery:"
        return {name: int(self.redis.llen(prefix + queue))
                for name, queue in self.settings.queues.items()}

    def close(self) -> None:
        self.indexes.close()
        self.redis.close()
