"""The job store's atomic transitions against a real Redis: a job completes exactly once."""

from __future__ import annotations

import time

from worker.jobstore import job_id_for, request_hash


def test_job_id_is_the_idempotency_key():
    assert job_id_for("a", "k") == job_id_for("a", "k") != job_id_for("b", "k")
    assert job_id_for("a", None) != job_id_for("a", None)
    assert request_hash({"a": 1, "b": [1, 2]}) == request_hash({"b": [1, 2], "a": 1})


def test_create_start_finish_exactly_once(store):
    job = job_id_for("t", "key-1")
    assert store.create(job, "t", "mislabel", "cpu", {"index": "x"}, "h1") == (True, None)
    assert store.create(job, "t", "mislabel", "cpu", {"index": "y"}, "h2") == (False, "h1")
    assert store.start(job, "w1", 5, 3, 60) == "run"
    assert store.start(job, "w2", 5, 3, 60) == "busy"  # a duplicate delivery while it runs
    assert store.progress(job, "w1", 5, 0.5, "half") == "0"
    assert store.progress(job, "w2", 5, 0.6, "impostor") == "lost"
    assert store.finish(job, "succeeded", result={"rows": 1}) is True
    assert store.finish(job, "succeeded", result={"rows": 2}) is False
    assert store.start(job, "w3", 5, 3, 60) == "done"
    record = store.get(job)
    assert (record.state, record.completions, record.attempts) == ("succeeded", 1, 1)
    assert record.result == {"rows": 1} and record.fraction == 1.0


def test_reaper_requeues_a_dead_workers_job_once(store):
    job = job_id_for("t", "key-2")
    store.create(job, "t", "attribution", "gpu", {}, "h")
    assert store.start(job, "w1", 1, 3, 60) == "run"
    assert store.reap(job) == "alive"
    time.sleep(1.2)  # the lease (1 s) expires: its worker is gone
    assert store.reap(job) == "requeue"
    assert store.reap(job) == "gone"
    assert store.get(job).state == "queued" and store.running_ids() == []
    assert store.start(job, "w2", 5, 3, 60) == "run"
    assert store.get(job).attempts == 2


def test_redeliveries_are_capped(store):
    job = job_id_for("t", "key-3")
    store.create(job, "t", "attribution", "gpu", {}, "h")
    for attempt in range(2):
        assert store.start(job, f"w{attempt}", 1, 2, 60) == "run"
        store.redis.delete(store.key(job) + ":lease")  # the worker died
        assert store.reap(job) == "requeue"
    assert store.start(job, "w9", 1, 2, 60) == "exhausted"


def test_cancel_queued_and_running(store):
    queued, running = job_id_for("t", "q"), job_id_for("t", "r")
    for job in (queued, running):
        store.create(job, "t", "evaluate", "gpu", {}, "h")
    assert store.cancel(queued) == "cancelled"
    assert store.start(queued, "w", 5, 3, 60) == "done"
    store.start(running, "w", 5, 3, 60)
    assert store.cancel(running) == "running"
    assert store.progress(running, "w", 5, 0.2, "batch 2") == "1"


def test_jobs_waiting_too_long_are_resent_once_per_period(store):
    job = job_id_for("t", "slow-queue")
    store.create(job, "t", "mislabel", "cpu", {}, "h")
    time.sleep(0.05)
    assert store.stale_queued(0.01) == [job]
    assert store.stale_queued(10.0) == []  # its clock restarted
    store.start(job, "w", 5, 3, 60)
    time.sleep(0.05)
    assert store.stale_queued(0.01) == []  # started jobs are the reaper's other half
