"""Celery tasks and worker signals. Each task is a few lines; the work is in ``worker.kinds``.

Nothing here imports torch: the worker's main process never initialises CUDA, only the forked
job processes do, when a job first needs the engine.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from celery import signals

from worker import reaper, runner
from worker.celery_app import app
from worker.config import get_worker_settings
from worker.jobstore import JobStore, connect

RUN_JOB = "tda.run_job"
QUERY_VECTORS = "tda.query_vectors"
SUBSET_CHUNK = "tda.subset_chunk"


@cache
def job_store() -> JobStore:
    """One store per process (redis-py reconnects by itself after a fork)."""
    settings = get_worker_settings()
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set; a worker needs the Redis the API uses")
    return JobStore(connect(settings.redis_url), settings.key_prefix,
                    settings.result_ttl_seconds)


@app.task(name=RUN_JOB, bind=True)
def run_job(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
    """Run (or, after a redelivery, skip or finish) the job ``job_id``."""
    return runner.run(job_id, job_store(), get_worker_settings(), self.request.hostname or "worker")


@app.task(name=QUERY_VECTORS, acks_late=False, ignore_result=True)
def query_vectors(index_dir: str, version: str, measurement: str, reply: str, ttl: int) -> None:
    """Featurize top-k queries for an API process (models too large to load there)."""
    import redis

    from worker import queries

    settings = get_worker_settings()
    client = redis.Redis.from_url(settings.redis_url)  # bytes in, bytes out
    queries.answer(client, Path(index_dir), version, measurement, reply, ttl)
    client.close()


@app.task(name=SUBSET_CHUNK, bind=True)
def subset_chunk(self, job_id: str, chunk: int) -> str:  # type: ignore[no-untyped-def]
    """Retrain one chunk of a ``subsets``/``evaluate`` job's subsets (sent as a group)."""
    from worker.kinds import subsets

    return subsets.run_chunk(job_store(), get_worker_settings(), job_id, chunk)


def enqueue(job_id: str, queue: str) -> None:
    """Send ``job_id`` to ``queue``; the Celery task id is the job id."""
    app.send_task(RUN_JOB, args=[job_id], task_id=job_id, queue=queue)


@signals.worker_ready.connect
def _start_reaper(sender=None, **_: object) -> None:  # type: ignore[no-untyped-def]
    hostname = getattr(sender, "hostname", "worker")
    queues = sorted(q.name for q in app.amqp.queues.consume_from.values()) if sender else []
    reaper.start(job_store(), get_worker_settings(), hostname, queues, enqueue)


@signals.worker_process_init.connect
def _job_process_init(**_: object) -> None:
    job_store.cache_clear()  # a fresh connection pool in each forked job process
