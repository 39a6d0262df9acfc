"""Worker liveness and orphan recovery, run as a thread in each worker's main process.

Every ``heartbeat_seconds`` the thread (1) reports the worker alive (``/readyz`` counts these)
and (2) looks at running jobs whose lease expired: their worker died mid-job. Such a job is put
back to ``queued`` and re-sent under its own id, exactly once (an atomic script decides who
requeues), or failed if it already ran past its hard time limit. The broker's own copy of the
message comes back after the visibility timeout and finds the job done: nothing runs twice.
Every ``result_purge_seconds`` it also expires old jobs and their results (``worker.expiry``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from worker import expiry
from worker.config import WorkerSettings
from worker.errors import problem
from worker.jobstore import JobStore

log = logging.getLogger(__name__)


def sweep(store: JobStore, settings: WorkerSettings, enqueue: Callable[[str, str], None]) -> list[str]:
    """Requeue (or fail) running jobs that lost their worker, and re-send jobs queued longer
    than the visibility timeout (their message may have been lost between the API's record and
    its send). Duplicate messages are harmless: a job starts once. Returns the requeued ids."""
    requeued = []
    for job_id in store.stale_queued(float(settings.visibility_timeout or 0)):
        job = store.get(job_id)
        if job is not None and job.state == "queued":
            enqueue(job_id, job.queue)
            requeued.append(job_id)
    for job_id in store.running_ids():
        verdict = store.reap(job_id)
        if verdict == "requeue":
            job = store.get(job_id)
            if job is not None:
                enqueue(job_id, job.queue)
                requeued.append(job_id)
                log.warning("job %s lost its worker; requeued", job_id)
        elif verdict == "late":
            store.finish(job_id, "failed", error=problem(
                "time-limit", "Job exceeded its time limit",
                f"the job's worker was stopped after TDA_JOB_TIME_LIMIT={settings.job_time_limit} "
                "s; split it into smaller jobs or ask the operator to raise the limit",
            ))
    return requeued


def start(store: JobStore, settings: WorkerSettings, hostname: str, queues: list[str],
          enqueue: Callable[[str, str], None]) -> threading.Thread:
    """Start the heartbeat/reaper thread (daemon: it dies with the worker)."""
    info = {"hostname": hostname, "pid": os.getpid(), "queues": queues, "started_at": time.time()}

    def loop() -> None:
        purged_at = 0.0
        while True:
            try:
                store.heartbeat(hostname, {**info, "seen_at": time.time()},
                                ttl=3 * settings.heartbeat_seconds)
                sweep(store, settings, enqueue)
                if time.monotonic() - purged_at >= settings.result_purge_seconds:
                    purged_at = time.monotonic()
                    expiry.purge(store, settings)
            except Exception:  # keep beating through Redis hiccups
                log.warning("heartbeat/reaper pass failed", exc_info=True)
            time.sleep(min(settings.heartbeat_seconds, settings.result_purge_seconds))

    thread = threading.Thread(target=loop, daemon=True, name="tda-reaper")
    thread.start()
    return thread
