"""Job records in Redis: state, progress, timestamps, error, and a pointer to the result.

A job is one Redis hash ``{prefix}job:{id}``. Its id is its idempotency key: the API derives it
from (tenant, Idempotency-Key), and the worker's Celery task id is the same id, so every
(re)delivery of a job acts on one record. State changes that must happen once — creating the
job, starting an attempt, completing it — are Lua scripts, atomic on the server.

States: ``queued`` → ``running`` → ``succeeded`` | ``failed`` | ``cancelled``.
An ended job is listed in ``{prefix}finished`` (scored by when it ended); once older than the
result TTL it is expired (:meth:`JobStore.expire`): its record goes and a small tombstone
``{prefix}expired:{id}`` remembers its tenant, so the API can answer 410 Gone.
A running job holds a lease (``{prefix}job:{id}:lease``, renewed while it runs); a running job
whose lease expired lost its worker and is put back in the queue by a worker's reaper.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

TERMINAL = ("succeeded", "failed", "cancelled")
_NAMESPACE = uuid.UUID("6f1c2f8e-3d1a-4c55-9d55-7d6a3b0c9e21")


def connect(url: str) -> redis.Redis:
    """A Redis client for ``redis://``, ``rediss://`` or ``unix://`` URLs (strings decoded)."""
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


def job_id_for(tenant: str, idempotency_key: str | None) -> str:
    """The job id: derived from the idempotency key when given (so retries find the job)."""
    if idempotency_key is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(_NAMESPACE, f"{tenant}\x00{idempotency_key}"))


def request_hash(body: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a request (what "same body" means for idempotency)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Job:
    """A job record as the API shows it."""

    id: str
    tenant: str
    kind: str
    queue: str
    state: str
    params: dict[str, Any]
    created_at: float
    stage: str = "queued"
    fraction: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    attempts: int = 0
    completions: int = 0
    cancel_requested: bool = False
    request_hash: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _json(value: str | None) -> Any:
    return json.loads(value) if value not in (None, "") else None


# KEYS[1] job hash, KEYS[2] tenant index zset, KEYS[3] queued zset; ARGV[1] request hash,
# ARGV[2] score, ARGV[3] job id, ARGV[4..] field/value pairs. Returns nil when created, else
# the stored request hash.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HGET', KEYS[1], 'request_hash')
end
redis.call('HSET', KEYS[1], 'request_hash', ARGV[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
return false
"""

# KEYS[1] job, KEYS[2] lease, KEYS[3] running set, KEYS[4] queued zset; ARGV[1] worker,
# ARGV[2] lease ttl, ARGV[3] max deliveries, ARGV[4] now, ARGV[5] job id, ARGV[6] deadline.
_START = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 'done' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'busy' end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 'cancel' end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[3]) then return 'exhausted' end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[5])
redis.call('ZREM', KEYS[4], ARGV[5])
redis.call('HSET', KEYS[1], 'state', 'running', 'stage', 'starting', 'worker', ARGV[1],
           'attempt_started_at', ARGV[4], 'deadline', ARGV[6])
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[4])
end
return 'run'
"""

# KEYS[1] job, KEYS[2] lease, KEYS[3] running set, KEYS[4] queued zset, KEYS[5] finished zset,
# KEYS[6] totals hash; ARGV[1] state, ARGV[2] now, ARGV[3] job id, ARGV[4] ttl seconds, ARGV[5..]
# field/value pairs. Completes a job once: 1 if it did, 0 if the job had already ended.
_FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', ARGV[2], unpack(ARGV, 5))
if ARGV[1] == 'succeeded' then
  redis.call('HINCRBY', KEYS[1], 'completions', 1)
  redis.call('HSET', KEYS[1], 'fraction', '1', 'stage', 'done')
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[3])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[3])
redis.call('HINCRBY', KEYS[6], (redis.call('HGET', KEYS[1], 'kind') or '?') .. '|' .. ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS[1] job, KEYS[2] lease; ARGV[1] worker, ARGV[2] ttl, ARGV[3] fraction, ARGV[4] stage.
# Records progress and renews the lease only for the attempt that holds it; returns the
# cancel flag, or 'lost' when another attempt owns the job.
_PROGRESS = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 'lost' end
redis.call('EXPIRE', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'fraction', ARGV[3], 'stage', ARGV[4])
end
return redis.call('HGET', KEYS[1], 'cancel_requested') or '0'
"""

# KEYS[1] job, KEYS[2] lease, KEYS[3] running set, KEYS[4] queued zset; ARGV[1] job id,
# ARGV[2] now. Takes a running job whose lease expired back to 'queued' (once, whoever asks).
_REAP = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  redis.call('SREM', KEYS[3], ARGV[1]); return 'gone'
end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'alive' end
redis.call('SREM', KEYS[3], ARGV[1])
local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline') or '0')
if deadline > 0 and tonumber(ARGV[2]) > deadline then return 'late' end
redis.call('HSET', KEYS[1], 'state', 'queued', 'stage', 'requeued after its worker was lost')
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
return 'requeue'
"""

# KEYS[1] job, KEYS[2] queued zset, KEYS[3] finished zset, KEYS[4] totals hash; ARGV[1] now,
# ARGV[2] ttl, ARGV[3] job id. A queued job is
# cancelled at once; a running one is flagged and stops at its next progress report. Returns
# the resulting state.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' then
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'stage', 'cancelled', 'finished_at', ARGV[1],
             'cancel_requested', '1')
  redis.call('ZADD', KEYS[3], ARGV[1], ARGV[3])
  redis.call('HINCRBY', KEYS[4], (redis.call('HGET', KEYS[1], 'kind') or '?') .. '|cancelled', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 'cancelled'
end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'stage', 'cancelling')
end
return state
"""

# KEYS[1] job, KEYS[2] finished zset, KEYS[3] tenant index, KEYS[4] tombstone; ARGV[1] job id,
# ARGV[2] cutoff, ARGV[3] tombstone ttl. Removes an ended job that ended before the cutoff and
# returns its result pointer ('' without one); false (nothing changed) for any other job.
_EXPIRE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'succeeded' and state ~= 'failed' and state ~= 'cancelled' then
  if not state then redis.call('ZREM', KEYS[2], ARGV[1]) end
  return false
end
if tonumber(redis.call('HGET', KEYS[1], 'finished_at') or '0') > tonumber(ARGV[2]) then
  return false
end
local result = redis.call('HGET', KEYS[1], 'result') or ''
redis.call('SET', KEYS[4], redis.call('HGET', KEYS[1], 'tenant'), 'EX', ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return result
"""


class JobStore:
    """All reads and writes of job records go through here (API and workers alike)."""

    def __init__(self, client: redis.Redis, prefix: str = "tda:", ttl_seconds: float = 30 * 86400):
        self.redis = client
        self.prefix = prefix
        #: how long an ended job is kept; its Redis key lives twice as long, as a safety net for
        #: a system without a worker to run :meth:`expire` (which removes it on time)
        self.ttl = ttl_seconds
        self._key_ttl = max(2, math.ceil(2 * ttl_seconds))
        self._create = client.register_script(_CREATE)
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)
        self._progress = client.register_script(_PROGRESS)
        self._reap = client.register_script(_REAP)
        self._cancel = client.register_script(_CANCEL)
        self._expire = client.register_script(_EXPIRE)

    # --- keys -----------------------------------------------------------------------------
    def key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _lease(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:lease"

    def _tenant_index(self, tenant: str) -> str:
        return f"{self.prefix}jobs:{tenant}"

    @property
    def _running(self) -> str:
        return f"{self.prefix}running"

    @property
    def _queued(self) -> str:
        return f"{self.prefix}queued"

    @property
    def _finished(self) -> str:
        return f"{self.prefix}finished"

    @property
    def _totals(self) -> str:
        return f"{self.prefix}stats:ended"

    def _tombstone(self, job_id: str) -> str:
        return f"{self.prefix}expired:{job_id}"

    # --- API side -------------------------------------------------------------------------
    def create(
        self, job_id: str, tenant: str, kind: str, queue: str, params: dict[str, Any], body_hash: str
    ) -> tuple[bool, str | None]:
        """Create a queued job unless the id exists: ``(created, stored request hash)``."""
        now = time.time()
        fields = {
            "id": job_id,
            "tenant": tenant,
            "kind": kind,
            "queue": queue,
            "state": "queued",
            "stage": "queued",
            "fraction": "0",
            "params": json.dumps(params),
            "created_at": repr(now),
            "attempts": "0",
            "completions": "0",
            "cancel_requested": "0",
        }
        flat = [item for pair in fields.items() for item in pair]
        stored = self._create(
            keys=[self.key(job_id), self._tenant_index(tenant), self._queued],
            args=[body_hash, repr(now), job_id, *flat],
        )
        return stored is None, stored

    def get(self, job_id: str) -> Job | None:
        """The job, or None when unknown (or expired)."""
        raw = self.redis.hgetall(self.key(job_id))
        if not raw or "tenant" not in raw:
            return None
        known = {
            "id", "tenant", "kind", "queue", "state", "params", "created_at", "stage", "fraction",
            "started_at", "finished_at", "error", "result", "attempts", "completions",
            "cancel_requested", "request_hash",
        }  # fmt: skip
        return Job(
            id=raw["id"],
            tenant=raw["tenant"],
            kind=raw["kind"],
            queue=raw["queue"],
            state=raw["state"],
            params=_json(raw.get("params")) or {},
            created_at=float(raw["created_at"]),
            stage=raw.get("stage", ""),
            fraction=float(raw.get("fraction") or 0.0),
            started_at=_float(raw.get("started_at")),
            finished_at=_float(raw.get("finished_at")),
            error=_json(raw.get("error")),
            result=_json(raw.get("result")),
            attempts=int(raw.get("attempts") or 0),
            completions=int(raw.get("completions") or 0),
            cancel_requested=raw.get("cancel_requested") == "1",
            request_hash=raw.get("request_hash", ""),
            extra={k: v for k, v in raw.items() if k not in known},
        )

    def list(self, tenant: str, offset: int = 0, limit: int = 50) -> tuple[list[Job], int]:
        """A tenant's jobs, newest first, and how many there are."""
        index = self._tenant_index(tenant)
        ids = self.redis.zrevrange(index, offset, offset + limit - 1)
        jobs = [self.get(i) for i in ids]
        expired = [i for i, job in zip(ids, jobs, strict=True) if job is None]
        if expired:  # records past their TTL leave the listing too
            self.redis.zrem(index, *expired)
        return [j for j in jobs if j is not None], int(self.redis.zcard(index))

    def cancel(self, job_id: str) -> str:
        """Ask a job to stop; returns its state afterwards."""
        return self._cancel(keys=[self.key(job_id), self._queued, self._finished, self._totals],
                            args=[repr(time.time()), self._key_ttl, job_id])

    # --- worker side ----------------------------------------------------------------------
    def start(self, job_id: str, worker: str, lease_seconds: int, max_deliveries: int,
              time_limit: float) -> str:
        """Begin an attempt: 'run', or why not ('done', 'busy', 'cancel', 'exhausted', 'missing')."""
        now = time.time()
        return self._start(
            keys=[self.key(job_id), self._lease(job_id), self._running, self._queued],
            args=[worker, lease_seconds, max_deliveries, repr(now), job_id, repr(now + time_limit)],
        )

    def progress(self, job_id: str, worker: str, lease_seconds: int,
                 fraction: float | None = None, stage: str = "") -> str:
        """Publish progress and renew the lease: '0', '1' (cancel requested) or 'lost'."""
        value = "" if fraction is None else repr(round(min(max(fraction, 0.0), 1.0), 4))
        return self._progress(
            keys=[self.key(job_id), self._lease(job_id)],
            args=[worker, lease_seconds, value, stage],
        )

    def finish(self, job_id: str, state: str, *, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> bool:
        """End the job once (True if this call ended it)."""
        extra: list[str] = []
        if result is not None:
            extra += ["result", json.dumps(result)]
        if error is not None:
            extra += ["error", json.dumps(error)]
        if state == "cancelled":
            extra += ["stage", "cancelled"]
        ended = self._finish(
            keys=[self.key(job_id), self._lease(job_id), self._running, self._queued,
                  self._finished, self._totals],
            args=[state, repr(time.time()), job_id, self._key_ttl, *extra],
        )
        return bool(ended)

    def stale_queued(self, older_than: float) -> list[str]:
        """Jobs queued for more than ``older_than`` seconds (their message may be lost); each
        is returned once per ``older_than`` (its clock restarts)."""
        now = time.time()
        ids = self.redis.zrangebyscore(self._queued, 0, now - older_than)
        if ids:
            self.redis.zadd(self._queued, dict.fromkeys(ids, now), xx=True)
        return ids

    def running_ids(self) -> list[str]:
        """Jobs some worker started and has not finished."""
        return sorted(self.redis.smembers(self._running))

    def reap(self, job_id: str) -> str:
        """If a running job lost its worker: 'requeue' (once), 'late', 'alive' or 'gone'."""
        return self._reap(
            keys=[self.key(job_id), self._lease(job_id), self._running, self._queued],
            args=[job_id, repr(time.time())],
        )

    def ended_totals(self) -> dict[tuple[str, str], int]:
        """Jobs ended since the Redis was new, by (kind, final state), counted once each by
        whichever worker or API process ended them (for ``/metrics``)."""
        totals = self.redis.hgetall(self._totals)
        return {tuple(key.split("|", 1)): int(n) for key, n in totals.items()}  # type: ignore[misc]

    # --- expiry ----------------------------------------------------------------------------
    def ended_before(self, cutoff: float, limit: int = 1000) -> list[str]:
        """Ids of jobs that ended before ``cutoff`` (a Unix time), oldest first."""
        return self.redis.zrangebyscore(self._finished, 0, cutoff, start=0, num=limit)

    def expire(self, job_id: str, cutoff: float) -> tuple[str, dict[str, Any] | None] | None:
        """Remove an ended job that ended before ``cutoff``, leaving a tombstone for another
        TTL; ``(tenant, result pointer or None)``, or None when the job is not (or no longer)
        one to expire. Queued and running jobs are never touched."""
        tenant = self.redis.hget(self.key(job_id), "tenant")
        if tenant is None:
            self.redis.zrem(self._finished, job_id)
            return None
        result = self._expire(
            keys=[self.key(job_id), self._finished, self._tenant_index(tenant),
                  self._tombstone(job_id)],
            args=[job_id, repr(cutoff), max(1, math.ceil(self.ttl))],
        )
        if result is None:
            return None
        return tenant, (json.loads(result) if result else None)

    def expired_tenant(self, job_id: str) -> str | None:
        """The tenant of a job that expired recently (its tombstone), or None."""
        return self.redis.get(self._tombstone(job_id))

    # --- workers' liveness ----------------------------------------------------------------
    def heartbeat(self, worker: str, info: dict[str, Any], ttl: float) -> None:
        self.redis.set(f"{self.prefix}worker:{worker}", json.dumps(info), px=int(ttl * 1000))

    def workers(self) -> list[dict[str, Any]]:
        """Workers that reported recently."""
        keys = list(self.redis.scan_iter(match=f"{self.prefix}worker:*", count=100))
        values = self.redis.mget(keys) if keys else []
        return [json.loads(v) for v in values if v]
