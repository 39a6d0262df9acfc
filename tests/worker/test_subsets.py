"""The ``subsets`` job on a real Celery worker: chunks retrained in parallel tasks (a group),
the result bitwise equal to ``retrain_on_subsets`` in-process, and unchanged when the worker is
killed mid-job or a chunk task is delivered again."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import typer
from typer.testing import CliRunner

from attribution import models, training
from attribution.data import Examples
from attribution.evaluate import SubsetPlan, SubsetResults, lds, retrain_on_subsets
from attribution.tasks import ClassificationTask
from service.client import APIError, Client
from service.commands import register
from service.demo import prepare_digits
from service.harness import Harness
from worker.kinds import subsets

pytestmark = pytest.mark.timeout(300)
ARRAYS = ("masks", "outputs", "losses", "subset_ids")


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory):
    """Two worker processes, so the job and its chunk tasks run side by side."""
    root = tmp_path_factory.mktemp("subsets")
    harness = Harness(root / "data", worker_concurrency=2)
    data = prepare_digits(harness.settings.files_dir("lab"), n_train=120, n_test=10,
                          checkpoints=1, epochs=30, hidden=16)
    with harness:
        with Client(harness.url, harness.key("lab")) as tda:
            tda.register("models", "digits", data.card)
            tda.register("corpora", "digits", data.corpus)
        yield harness, data


def _params(data, **extra) -> dict:  # type: ignore[no-untyped-def]
    return {"model": "digits", "corpus": "digits", "num_subsets": 12, "alpha": 0.5, "seed": 3,
            "epochs": 60, "chunk_size": 2,
            "test": {"x": data.test_x.tolist(), "y": data.test_y.tolist()}, **extra}


def _client(harness: Harness) -> Client:
    return Client(harness.url, harness.key("lab"))


def _in_process(harness: Harness, data) -> SubsetResults:  # type: ignore[no-untyped-def]
    corpus = pq.read_table(harness.settings.files_dir("lab") / data.corpus)
    x = np.stack(corpus.column("features").to_numpy(zero_copy_only=False)).astype(np.float32)
    train = Examples(torch.from_numpy(x), torch.from_numpy(corpus.column("label").to_numpy().copy()))
    test = Examples(torch.from_numpy(data.test_x.astype(np.float32)),
                    torch.from_numpy(data.test_y.astype(np.int64)))
    return retrain_on_subsets(SubsetPlan(len(x), 0.5, 12, seed=3),
                              lambda seed: models.build("mlp", hidden=16, seed=seed),
                              ClassificationTask, train, test,
                              training.default_config("mlp", epochs=60), progress=False)


def _assert_same(a: SubsetResults, b: SubsetResults) -> None:
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_subsets_job_equals_in_process_retraining(system):
    harness, data = system
    with _client(harness) as tda:
        started = time.monotonic()
        job = tda.submit("subsets", _params(data), "reference")
        fractions = set()
        done = tda.wait(job["id"], timeout=240, interval=0.1,
                        on_progress=lambda j: fractions.add(j["progress"]["fraction"]))
        print(f"subsets job, 12 subsets in 6 chunks: {time.monotonic() - started:.1f} s, "
              f"computed by {done['result']['summary']['computed_by']}")
        got = tda.subset_results(job["id"])
        rows = list(tda.result_rows(job["id"]))
    summary = done["result"]["summary"]
    assert done["state"] == "succeeded" and done["attempts"] == 1
    assert summary["chunks"] == 6 and summary["resumed_chunks"] == 0
    assert sum(summary["computed_by"].values()) == 6
    assert len(fractions - {0.0, 1.0}) >= 1  # progress moved chunk by chunk
    expected = _in_process(harness, data)
    _assert_same(got, expected)
    assert got.meta == expected.meta
    assert [r["subset"] for r in rows] == list(range(12)) and rows[0]["size"] == 60
    path = harness.settings.data_dir / "subsets.npz"  # the file `tda eval lds` / AirRep read
    app = typer.Typer()
    register(app)
    env = {"TDA_URL": harness.url, "TDA_API_KEY": harness.key("lab")}
    saved = CliRunner().invoke(app, ["jobs", "subsets", job["id"], "--out", str(path)], env=env)
    assert saved.exit_code == 0, saved.output
    again = SubsetResults.load(path)
    _assert_same(again, expected)
    scores = np.random.default_rng(0).normal(size=(10, 120))
    assert np.isfinite(lds(scores, again.masks, again.outputs).mean)
    assert not subsets.work_dir(harness.settings, "lab", job["id"]).exists()  # cleaned up


def test_kill_9_mid_job_resumes_finished_chunks_with_the_same_result(system):
    harness, data = system
    with _client(harness) as tda:
        reference = tda.wait(tda.submit("subsets", _params(data), "reference")["id"])
        job = tda.submit("subsets", _params(data), "interrupted")
        work = subsets.work_dir(harness.settings, "lab", job["id"])
        deadline = time.monotonic() + 120
        while not list(work.glob("chunk-*.npz")):  # at least one chunk finished
            assert time.monotonic() < deadline, tda.job(job["id"])
            time.sleep(0.02)
        worker = harness.system.worker
        os.killpg(worker.pid, signal.SIGKILL)  # the worker, the job and its chunk tasks
        worker.wait()
        finished = len(list(work.glob("chunk-*.npz")))
        harness.restart_worker()
        done = tda.wait(job["id"], timeout=240)
        assert done["state"] == "succeeded" and done["attempts"] == 2
        print(f"killed with {finished}/6 chunks stored; attempt 2: {done['result']['summary']}")
        assert done["result"]["summary"]["resumed_chunks"] >= min(finished, 1)
        assert harness.store().get(job["id"]).completions == 1
        for name in ARRAYS:
            np.testing.assert_array_equal(tda.result_array(job["id"], name),
                                          tda.result_array(reference["id"], name), err_msg=name)


def test_a_redelivered_chunk_changes_nothing(system):
    harness, data = system
    from worker.tasks import SUBSET_CHUNK, app

    with _client(harness) as tda:
        job = tda.submit("subsets", _params(data, seed=4, num_subsets=8), "redelivered")
        work = subsets.work_dir(harness.settings, "lab", job["id"])
        deadline = time.monotonic() + 120
        while not work.is_dir():
            assert time.monotonic() < deadline, tda.job(job["id"])
            time.sleep(0.02)
        # this process acts as one more worker: it computes a chunk unless it is claimed or done
        first = subsets.run_chunk(harness.store(), harness.settings, job["id"], 3)
        again = subsets.run_chunk(harness.store(), harness.settings, job["id"], 3)
        assert first in ("computed", "done", "busy", "skipped") and again in ("done", "skipped")
        done = tda.wait(job["id"], timeout=240)
        result = tda.subset_results(job["id"])
        for chunk in range(4):  # late deliveries of every chunk's message: all skipped
            app.send_task(SUBSET_CHUNK, args=[job["id"], chunk],
                          queue=harness.settings.queues["gpu"])
        assert subsets.run_chunk(harness.store(), harness.settings, job["id"], 0) == "skipped"
        time.sleep(1.0)
        assert not work.exists()
        assert tda.job(job["id"])["finished_at"] == done["finished_at"]
        _assert_same(tda.subset_results(job["id"]), result)
    print(f"chunk 3 from this process: {first}")


def test_evaluate_reuses_a_subsets_job(system):
    harness, data = system
    params = _params(data)
    evaluate = {k: params[k] for k in ("model", "corpus", "test", "num_subsets", "alpha", "seed",
                                       "epochs")}
    evaluate.update(methods=["graddot"])
    with _client(harness) as tda:
        reference = tda.wait(tda.submit("subsets", params, "reference")["id"])
        retrained = tda.wait(tda.submit("evaluate", evaluate)["id"], timeout=240)
        reused = tda.wait(tda.submit("evaluate", {**evaluate, "subsets_job": reference["id"]})
                          ["id"], timeout=120)
        other_test = {**evaluate, "subsets_job": reference["id"],
                      "test": {"x": data.test_x[:5].tolist(), "y": data.test_y[:5].tolist()}}
        bad = []  # refused at submission (tests/service/test_subsets_validation.py has the rest)
        for body in (other_test, {**evaluate, "subsets_job": "no-such-job"}):
            with pytest.raises(APIError) as refused:
                tda.submit("evaluate", body)
            bad.append(refused.value)
    assert retrained["result"]["summary"]["retraining"]["chunks"] == 3
    assert reused["result"]["summary"]["retraining"] == {"subsets_job": reference["id"]}
    assert reused["result"]["summary"]["lds"] == retrained["result"]["summary"]["lds"]
    assert [b.status for b in bad] == [422, 404]
    assert "another test" in bad[0].detail
    assert "no subsets job" in bad[1].detail
