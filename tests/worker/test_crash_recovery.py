"""kill -9 of a worker mid-job: after a restart the job completes exactly once, with the result
an uninterrupted run gives; a job that keeps killing its worker is failed after the cap."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(300)


def _params(crash) -> dict:  # type: ignore[no-untyped-def]
    return {"model": "digits", "corpus": "digits", "method": "trak", "k": 5,
            "method_args": {"proj_dim": 128, "batch_size": 32},
            "examples": {"x": crash.data.test_x[:4].tolist(), "y": crash.data.test_y[:4].tolist()}}


def _wait_running(tda, job_id: str, attempt: int = 1, timeout: float = 60) -> dict:  # type: ignore[no-untyped-def]
    """Until attempt ``attempt`` of the job is featurizing (the middle of the work)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = tda.job(job_id)
        if (job["state"] == "running" and job["attempts"] == attempt
                and job["progress"]["stage"].startswith("featurizing")):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"attempt {attempt} of job {job_id} never started featurizing: {job}")


def test_kill_9_mid_job_completes_once_with_the_same_result(crash):
    with crash.client() as tda:
        started = time.monotonic()
        reference = tda.wait(tda.submit("attribution", _params(crash), "reference")["id"],
                             timeout=120)
        print(f"uninterrupted attribution job: {time.monotonic() - started:.1f} s")
        job = tda.submit("attribution", _params(crash), "interrupted")
        _wait_running(tda, job["id"])
        worker = crash.harness.system.worker
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its job process, no goodbye
        worker.wait()
        assert tda.job(job["id"])["state"] == "running"  # nobody has noticed yet
        crash.harness.restart_worker()
        done = tda.wait(job["id"], timeout=120)
        assert done["state"] == "succeeded" and done["attempts"] == 2
        record = crash.harness.store().get(job["id"])
        assert record.completions == 1
        np.testing.assert_array_equal(tda.result_array(job["id"], "scores"),
                                      tda.result_array(reference["id"], "scores"))
        assert tda.result(job["id"])["items"] == tda.result(reference["id"])["items"]
        # the broker's own copy of the killed delivery may come back later: it changes nothing
        from worker.tasks import RUN_JOB  # noqa: F401 - the task the message names
        assert crash.harness.store().start(job["id"], "late", 3, 3, 60) == "done"


def test_a_job_that_keeps_killing_its_worker_is_failed(crash):
    cap = crash.harness.settings.max_deliveries
    with crash.client() as tda:
        job = tda.submit("attribution", _params(crash), "crash-loop")
        for attempt in range(1, cap + 1):
            _wait_running(tda, job["id"], attempt, timeout=90)
            children = _children(crash.harness.system.worker.pid)
            for pid in children:  # the job process dies (as on OOM); the worker survives
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        done = tda.wait(job["id"], timeout=90, raise_on_failure=False)
    assert done["state"] == "failed"
    assert done["error"]["type"].endswith("worker-lost")
    assert f"started {cap} times" in done["error"]["detail"]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(p) for p in handle.read().split()]
