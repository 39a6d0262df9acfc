"""Result expiry: ended jobs older than ``TDA_RESULT_TTL_DAYS`` lose their record and files.

Run by every worker's reaper thread every ``TDA_RESULT_PURGE_SECONDS``. The decision to expire
a job is one atomic script (so several workers purging at once remove each job once, and a
queued or running job is never touched); its result directory is deleted afterwards. A
directory left behind (a purge interrupted between the two steps, a job whose record Redis
dropped, a staging folder of a crashed attempt) is removed once it is older than the TTL and no
live job owns it.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from worker.config import WorkerSettings
from worker.jobstore import JobStore

log = logging.getLogger(__name__)


@dataclass
class Purged:
    """What one pass removed."""

    jobs: list[str] = field(default_factory=list)
    directories: list[Path] = field(default_factory=list)


def purge(store: JobStore, settings: WorkerSettings, now: float | None = None) -> Purged:
    """Expire every job that ended more than the TTL before ``now``, then sweep orphans."""
    cutoff = (time.time() if now is None else now) - settings.result_ttl_seconds
    done = Purged()
    while ids := store.ended_before(cutoff):
        before = len(done.jobs)
        for job_id in ids:
            expired = store.expire(job_id, cutoff)
            if expired is None:
                continue
            done.jobs.append(job_id)
            tenant, _ = expired
            directory = settings.results_dir(tenant) / job_id  # never a path read from Redis
            if directory.exists():
                shutil.rmtree(directory, ignore_errors=True)
                done.directories.append(directory)
        if len(ids) < 1000 or len(done.jobs) == before:
            break
    done.directories += _orphans(store, settings, cutoff)
    if done.jobs or done.directories:
        log.info("expired %d job(s), removed %d result folder(s)", len(done.jobs),
                 len(done.directories))
    return done


def _orphans(store: JobStore, settings: WorkerSettings, cutoff: float) -> list[Path]:
    """Result folders older than the cutoff whose job no longer exists or has ended."""
    removed = []
    for results in sorted(settings.data_dir.glob("tenants/*/results")):
        for entry in results.iterdir():
            try:
                if not entry.is_dir() or entry.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:  # another worker removed it meanwhile
                continue
            staging = entry.name.startswith(".")
            job = store.get(entry.name[1:].split(".")[0] if staging else entry.name)
            if job is None or (staging and job.done):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed
