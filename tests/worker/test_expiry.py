"""Result expiry: ended jobs older than the TTL lose their record and files; live jobs never.

One test drives ``worker.expiry.purge`` against a real Redis with chosen clocks; the other runs
the whole system with a TTL of a few seconds and watches the worker's reaper expire a real job
(GET then answers 410 problem+json to its tenant, 404 to another).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pytest

from service.demo import prepare_digits
from service.harness import Harness
from worker import expiry, results
from worker.config import WorkerSettings
from worker.jobstore import JobStore

PROBLEM = "application/problem+json"


def _job(store: JobStore, settings: WorkerSettings, name: str, end: str | None) -> str:
    """A job of tenant ``t`` left queued (end None), running, or ended with a result folder."""
    store.create(name, "t", "mislabel", "cpu", {}, "h")
    if end is None:
        return name
    store.start(name, "w", 60, 3, 600)
    if end == "succeeded":
        folder = results.publish(settings.results_dir("t") / name,
                                 results.Result(pa.table({"id": ["a"]})), "tok")
        store.finish(name, end, result=results.pointer(folder, results.Result(pa.table({}))))
    elif end != "running":
        store.finish(name, end)
    return name


def test_purge_expires_ended_jobs_only(store: JobStore, tmp_path: Path) -> None:
    settings = WorkerSettings(data_dir=tmp_path, result_ttl_days=10 / 86400)  # 10 s
    store.ttl = settings.result_ttl_seconds
    jobs = {state: _job(store, settings, f"job-{state}", None if state == "queued" else state)
            for state in ("queued", "running", "succeeded", "failed", "cancelled")}
    results_dir = settings.results_dir("t")
    orphan = results_dir / "job-from-a-lost-record"  # its record is gone: nobody owns it
    staging = results_dir / ".job-running.tok.1.tmp"  # a running job's half-written result
    for folder in (orphan, staging):
        folder.mkdir(parents=True)
        os.utime(folder, (time.time() - 3600, time.time() - 3600))

    assert store.ended_totals() == {("mislabel", s): 1 for s in ("succeeded", "failed",
                                                                 "cancelled")}
    assert expiry.purge(store, settings).jobs == []  # nothing is 10 s old yet
    assert (results_dir / jobs["succeeded"]).is_dir()
    done = expiry.purge(store, settings, now=time.time() + 11)
    assert sorted(done.jobs) == sorted(jobs[s] for s in ("succeeded", "failed", "cancelled"))
    assert not (results_dir / jobs["succeeded"]).exists() and not orphan.exists()
    assert staging.is_dir()  # its job is running
    for state in ("succeeded", "failed", "cancelled"):
        assert store.get(jobs[state]) is None
        assert store.expired_tenant(jobs[state]) == "t"
    assert store.get(jobs["queued"]).state == "queued"
    assert store.get(jobs["running"]).state == "running"
    assert store.expired_tenant(jobs["running"]) is None
    assert store.list("t") == ([store.get(jobs["running"]), store.get(jobs["queued"])], 2)
    assert expiry.purge(store, settings, now=time.time() + 11).jobs == []  # once only


@pytest.mark.timeout(120)
def test_worker_expires_a_finished_job_over_http(tmp_path: Path) -> None:
    harness = Harness(tmp_path / "data", result_ttl_days=6 / 86400, result_purge_seconds=0.5)
    data = prepare_digits(harness.settings.files_dir("ops"), n_train=120, n_test=4,
                          checkpoints=1, epochs=10, hidden=16)
    with harness:
        key, rival = harness.key("ops"), harness.key("rival")
        with httpx.Client(base_url=harness.url, timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as http:
            for kind, path in (("models", data.card), ("corpora", data.corpus)):
                http.post(f"/v1/{kind}", json={"name": "digits", "path": str(path)})
            job = http.post("/v1/jobs", json={"kind": "build_index", "params": {
                "name": "digits", "model": "digits", "corpus": "digits",
                "method_args": {"proj_dim": 16}}}).json()
            while (state := http.get(f"/v1/jobs/{job['id']}").json())["state"] != "succeeded":
                assert state["state"] in ("queued", "running"), state
                time.sleep(0.1)
            folder = harness.settings.results_dir("ops") / job["id"]
            ended = 'tda_jobs_ended_total{kind="build_index",state="succeeded"} 1.0'
            assert ended in http.get("/metrics").text  # counted once, by the worker, in Redis
            assert http.get(f"/v1/jobs/{job['id']}/result").status_code == 200
            assert folder.is_dir()
            deadline = time.monotonic() + 30
            while (reply := http.get(f"/v1/jobs/{job['id']}")).status_code == 200:
                assert time.monotonic() < deadline, "the job never expired"
                time.sleep(0.25)
            assert reply.status_code == 410 and reply.headers["content-type"] == PROBLEM
            assert "TDA_RESULT_TTL_DAYS" in reply.json()["detail"]
            assert http.get(f"/v1/jobs/{job['id']}/result").status_code == 410
            assert not folder.exists()
            assert job["id"] not in [j["id"] for j in http.get("/v1/jobs").json()["items"]]
            # the index the job built is not a result: it stays
            assert http.get("/v1/indexes/digits").status_code == 200
            other = http.get(f"/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {rival}"})
            assert other.status_code == 404
