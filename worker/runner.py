"""One attempt at a job: take the lease, run the job's kind, publish the result, end the job once.

The lease is renewed by a background thread while the kind runs, so a worker that is killed
(kill -9, OOM, a crashed CUDA context) stops renewing it and the reaper requeues the job. Each
start counts as an attempt; past ``max_deliveries`` the job fails instead of crashing workers
forever.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker import results
from worker.config import WorkerSettings
from worker.errors import JobCancelled, JobLost, problem
from worker.jobstore import JobStore

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """What a job's code sees: its parameters, where its tenant's data is, and a progress hook."""

    job_id: str
    tenant: str
    kind: str
    params: dict[str, Any]
    settings: WorkerSettings
    report: Callable[[float | None, str], None]

    @property
    def data_root(self) -> Path:
        """Every path this job reads must resolve under here."""
        return self.settings.files_dir(self.tenant)

    @property
    def index_root(self) -> Path:
        return self.settings.index_root(self.tenant)

    def progress(self, fraction: float, stage: str) -> None:
        """Publish progress; raises :class:`JobCancelled` when a cancel was requested."""
        self.report(fraction, stage)


class _Lease(threading.Thread):
    """Renews the job's lease every third of its lifetime; notes cancel requests."""

    def __init__(self, store: JobStore, job_id: str, holder: str, seconds: int):
        super().__init__(daemon=True, name=f"lease-{job_id[:8]}")
        self.store, self.job_id, self.holder, self.seconds = store, job_id, holder, seconds
        self.stopped = threading.Event()
        self.cancel = False
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(self.seconds / 3):
            self.update(None, "")

    def update(self, fraction: float | None, stage: str) -> None:
        try:
            answer = self.store.progress(self.job_id, self.holder, self.seconds, fraction, stage)
        except Exception:  # a Redis hiccup must not kill the job; the next renewal retries
            log.warning("could not renew the lease of job %s", self.job_id, exc_info=True)
            return
        self.lost = self.lost or answer == "lost"
        self.cancel = self.cancel or answer == "1"

    def check(self, fraction: float | None, stage: str) -> None:
        self.update(fraction, stage)
        if self.lost:
            raise JobLost(self.job_id)
        if self.cancel:
            raise JobCancelled(self.job_id)


def run(job_id: str, store: JobStore, settings: WorkerSettings, worker: str = "worker") -> str:
    """Run one delivery of ``job_id``; returns what happened (for logs and tests)."""
    holder = f"{worker}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    status = store.start(
        job_id, holder, settings.lease_seconds, settings.max_deliveries, settings.job_time_limit
    )
    if status in ("done", "busy", "missing"):
        log.info("job %s: %s, nothing to do", job_id, status)
        return status
    if status == "cancel":
        store.finish(job_id, "cancelled")
        return "cancelled"
    if status == "exhausted":
        store.finish(job_id, "failed", error=problem(
            "worker-lost",
            "Job kept crashing its worker",
            f"the job was started {settings.max_deliveries} times and its worker died each "
            "time (killed, out of memory, or over the time limit); it will not be retried. "
            "Make it smaller (fewer examples, a smaller batch_size) and submit it again.",
        ))
        return "failed"
    job = store.get(job_id)
    assert job is not None
    lease = _Lease(store, job_id, holder, settings.lease_seconds)
    lease.start()
    ctx = JobContext(job_id, job.tenant, job.kind, job.params, settings, lease.check)
    try:
        from worker.kinds import KINDS  # lazy: torch (and CUDA) only ever load in a job

        result = KINDS[job.kind].run(ctx)
        directory = results.publish(settings.results_dir(job.tenant) / job_id, result, holder)
        lease.update(1.0, "stored")
        if lease.lost:  # do not complete a job another attempt owns now
            raise JobLost(job_id)
        store.finish(job_id, "succeeded", result=results.pointer(directory, result))
        return "succeeded"
    except JobCancelled:
        store.finish(job_id, "cancelled")
        return "cancelled"
    except JobLost:
        log.warning("job %s: lease lost to another attempt; stopping this one", job_id)
        return "lost"
    except Exception as err:  # every failure becomes a problem the API can show
        store.finish(job_id, "failed", error=describe_failure(err, settings))
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        return "failed"
    finally:
        lease.stopped.set()


def describe_failure(err: BaseException, settings: WorkerSettings) -> dict[str, str]:
    """Turn an exception into the job's problem: bad input says what to fix; bugs say so."""
    from celery.exceptions import SoftTimeLimitExceeded

    if isinstance(err, SoftTimeLimitExceeded):
        return problem(
            "time-limit", "Job exceeded its time limit",
            f"the job ran longer than TDA_JOB_SOFT_TIME_LIMIT={settings.job_soft_time_limit} s; "
            "split it into smaller jobs or ask the operator to raise the limit",
        )
    if _is_input_error(err):
        return problem("invalid-input", "Job input rejected", str(err))
    return problem(
        "job-error", "Job failed", f"{type(err).__name__}: {err}. This is a bug if the input "
        "was valid; the worker log has the traceback.",
    )


def _is_input_error(err: BaseException) -> bool:
    try:
        from attribution.errors import AttributionError
        from indexer.errors import IndexerError
    except ImportError:  # pragma: no cover - packages are part of the distribution
        return False
    return isinstance(err, AttributionError | IndexerError)
