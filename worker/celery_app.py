"""The Celery application: Redis broker, queues ``gpu`` and ``cpu``, settings for long jobs.

Messages carry only a job id; the job's parameters, state and result pointer live in the job
store (``worker.jobstore``). Results are files, so Celery's own result backend is not used.

Run a worker with ``tda worker`` or ``celery -A worker.celery_app worker -Q gpu,cpu``.
"""

from __future__ import annotations

from celery import Celery

from worker.config import WorkerSettings, get_worker_settings


def broker_url(redis_url: str) -> str:
    """kombu spells Unix-socket Redis ``redis+socket://``; redis-py spells it ``unix://``."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url[len("unix://"):]
    return redis_url


def create_celery(settings: WorkerSettings) -> Celery:
    """A Celery app configured from ``settings`` (also used by the API to submit)."""
    app = Celery("tdaserve")
    queues = settings.queues
    app.conf.update(
        broker_url=broker_url(settings.redis_url or "redis://127.0.0.1:6379/0"),
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # longer than the hard time limit, or Redis would hand a running job to a 2nd worker
            "visibility_timeout": settings.visibility_timeout,
            "global_keyprefix": f"{settings.key_prefix}celery:",
        },
        task_ignore_result=True,
        task_acks_late=True,  # a job is acknowledged when it ends, not when it starts
        task_reject_on_worker_lost=True,  # a killed worker's job goes back to the queue
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,  # one job at a time per process: no hoarding
        task_soft_time_limit=settings.job_soft_time_limit,
        task_time_limit=settings.job_time_limit,
        task_default_queue=queues["cpu"],
        task_create_missing_queues=True,
        task_serializer="json",
        accept_content=["json"],
        worker_concurrency=settings.worker_concurrency,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # for flower
        task_send_sent_event=True,
        include=["worker.tasks"],
    )
    return app


app = create_celery(get_worker_settings())
