"""End to end over HTTP against a real uvicorn, Celery worker and Redis (see conftest)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from service_helpers import PROBLEM, wait_idle

from indexer.index import AttributionIndex
from service.client import APIError, AsyncClient

pytestmark = pytest.mark.timeout(240)


def test_health_ready_metrics_docs(world):
    with world.http() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        checks = ready.json()["checks"]
        assert checks["redis"] == "ok" and checks["workers"]["alive"] >= 1
        assert http.get("/docs").status_code == 200
        assert "tda_http_requests_total" in http.get("/metrics").text
        assert http.get("/openapi.json").json()["info"]["title"] == "tdaserve"


def test_index_built_by_job_is_listed(world):
    job = world.index_job
    assert job["state"] == "succeeded" and job["attempts"] == 1
    assert job["result"]["summary"]["records"] == 300
    with world.http(world.reader) as http:
        listed = http.get("/v1/indexes").json()
        assert [i["name"] for i in listed] == ["digits"]
        info = http.get("/v1/indexes/digits").json()
        assert info["records"] == 300 and info["method"] == "trak"
        assert info["manifest"]["model"]["task"] == "classification"


def test_topk_equals_engine_scores(world):
    x, y = world.data.test_x[:3], world.data.test_y[:3]
    with world.client(world.reader) as tda:
        answer = tda.topk("digits", x, y, k=5, opponents=True)
    index = AttributionIndex.open(world.harness.settings.index_root("acme") / "digits")
    queries = index.query_vectors(index.examples(x, y.astype(np.int64)))
    full = index.scores_for(queries, index.ids)
    for j, result in enumerate(answer["results"]):
        pro, opp = result["proponents"], result["opponents"]
        assert [h["rank"] for h in pro] == [1, 2, 3, 4, 5]
        expected = np.sort(full[j])[::-1][:5]
        np.testing.assert_allclose([h["score"] for h in pro], expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose([h["score"] for h in opp], np.sort(full[j])[:5],
                                   rtol=1e-4, atol=1e-6)
        assert {"source", "flipped", "image"} <= set(pro[0]["metadata"])
    index.close()


def test_jobs_mislabel_valuation_attribution(world):
    with world.client() as tda:
        mislabel = tda.submit("mislabel", {"index": "digits"})
        valuation = tda.submit("valuation", {"index": "digits", "validation": {
            "x": world.data.test_x[:10].tolist(), "y": world.data.test_y[:10].tolist()}})
        attribution = tda.submit("attribution", {
            "model": "digits", "corpus": "digits", "method": "graddot", "k": 4,
            "examples": {"x": world.data.test_x[:2].tolist(), "y": world.data.test_y[:2].tolist()}})
        influence = tda.submit("attribution", {
            "model": "digits", "corpus": "digits", "method": "influence", "k": 3,
            "method_args": {"solver": "cg", "cg_iterations": 5},
            "examples": {"x": world.data.test_x[:1].tolist(), "y": world.data.test_y[:1].tolist()}})
        assert mislabel["queue"].endswith("cpu") and attribution["queue"].endswith("gpu")
        for job in (mislabel, valuation, attribution, influence):
            done = tda.wait(job["id"], timeout=120)
            assert done["state"] == "succeeded" and done["progress"]["fraction"] == 1.0
            assert done["started_at"] and done["finished_at"]

        page = tda.result(mislabel["id"], offset=0, limit=50)
        assert page["page"]["total"] == 300 and page["page"]["next"]
        rows = list(tda.result_rows(mislabel["id"], page_size=128))
        assert len({r["id"] for r in rows}) == 300 and [r["rank"] for r in rows] == list(range(1, 301))
        values = [r["self_influence"] for r in rows]
        assert values == sorted(values, reverse=True)
        flipped_top = sum(r["flipped"] for r in rows[:30])
        assert flipped_top >= 10  # 10% flipped: far above chance (3) in the top 30

        valued = tda.result(valuation["id"], limit=5)
        assert valued["items"][0]["rank"] == 1 and "value" in valued["items"][0]

        assert tda.result_array(influence["id"], "scores").shape == (1, 300)
        scores = tda.result_array(attribution["id"], "scores")
        assert scores.shape == (2, 300)
        top = tda.result(attribution["id"], limit=8)["items"]
        ids = tda.result_array(attribution["id"], "train_ids")
        assert [r["id"] for r in top[:4]] == list(ids[np.argsort(-scores[0], kind="stable")[:4]])


def test_async_client(world):
    async def go() -> tuple[dict, dict]:
        async with AsyncClient(world.url, world.admin) as tda:
            answer = await tda.topk("digits", world.data.test_x[:1], world.data.test_y[:1], k=2)
            job = await tda.submit("mislabel", {"index": "digits"})
            done = await tda.wait(job["id"], timeout=60, interval=0.2)
            rows = [r async for r in tda.result_rows(job["id"], page_size=100)]
            assert len(rows) == 300
            return answer, done

    answer, done = asyncio.run(go())
    assert len(answer["results"][0]["proponents"]) == 2
    assert done["state"] == "succeeded"


def test_idempotency_key(world):
    body = {"index": "digits"}
    with world.http(world.admin) as http:
        first = http.post("/v1/jobs", json={"kind": "mislabel", "params": body},
                          headers={"Idempotency-Key": "same-key-1"})
        again = http.post("/v1/jobs", json={"kind": "mislabel", "params": body},
                          headers={"Idempotency-Key": "same-key-1"})
        assert first.status_code == again.status_code == 202
        assert first.headers["Location"] == again.headers["Location"] == f"/v1/jobs/{first.json()['id']}"
        assert again.headers.get("Idempotent-Replayed") == "true"
        total = http.get("/v1/jobs").json()["page"]["total"]
        other = http.post("/v1/jobs", json={"kind": "valuation", "params": {
            "index": "digits", "validation": {"x": [[0.0] * 64], "y": [1]}}},
            headers={"Idempotency-Key": "same-key-1"})
        assert other.status_code == 422 and other.headers["content-type"] == PROBLEM
        assert "Idempotency-Key" in other.json()["detail"]
        assert http.get("/v1/jobs").json()["page"]["total"] == total
        # another tenant using the same key gets its own job, not ours
        rival = http.post("/v1/jobs", json={"kind": "mislabel", "params": body},
                          headers={"Idempotency-Key": "same-key-1",
                                   "Authorization": f"Bearer {world.rival}"})
        assert rival.status_code == 404  # rival has no index "digits"
    with world.client() as tda:
        tda.wait(first.json()["id"], timeout=60)


def test_cancel_running_and_queued_jobs(world):
    wait_idle(world)
    params = {"model": "digits", "corpus": "digits", "methods": ["trak"], "num_subsets": 200,
              "epochs": 50, "test": {"x": world.data.test_x[:3].tolist(),
                                     "y": world.data.test_y[:3].tolist()}}
    with world.client() as tda:
        running = tda.submit("evaluate", params)
        queued = tda.submit("evaluate", {**params, "seed": 1})
        for _ in range(600):
            if tda.job(running["id"])["state"] == "running":
                break
            time.sleep(0.05)
        assert tda.cancel(queued["id"])["state"] == "cancelled"  # never started
        after = tda.cancel(running["id"])
        assert after["cancel_requested"] is True
        done = tda.wait(running["id"], timeout=60, raise_on_failure=False)
        assert done["state"] == "cancelled"
        with pytest.raises(APIError) as err:
            tda.cancel(running["id"])
        assert err.value.status == 409
        assert tda.job(queued["id"])["attempts"] == 0


def test_concurrent_topk_requests_are_batched_without_mixing_answers(world):
    """16 requests at once (mixed k, opponents, one with a bad label): each gets its own answer."""
    from concurrent.futures import ThreadPoolExecutor

    x, y = world.data.test_x, world.data.test_y
    bodies = [{"examples": {"x": x[i:i + 2].tolist(), "y": y[i:i + 2].tolist()},
               "k": 1 + i % 4, "opponents": bool(i % 2)} for i in range(15)]
    bodies.insert(7, {"examples": {"x": x[:1].tolist(), "y": [42]}, "k": 3})
    with world.http(world.reader) as http:
        alone = [http.post("/v1/indexes/digits/topk", json=b) for b in bodies]

        def post(body):  # type: ignore[no-untyped-def]
            return http.post("/v1/indexes/digits/topk", json=body)

        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(post, bodies))
    assert [r.status_code for r in together] == [r.status_code for r in alone]
    assert together[7].status_code == 422 and "label" in together[7].json()["detail"]
    for a, b in zip(alone, together, strict=True):
        if a.status_code != 200:
            continue
        for ra, rb in zip(a.json()["results"], b.json()["results"], strict=True):
            for side in ("proponents", "opponents"):
                hits_a, hits_b = ra[side] or [], rb[side] or []
                assert [(h["id"], h["rank"]) for h in hits_a] == [(h["id"], h["rank"]) for h in hits_b]
                # batched featurization may round differently in the last float32 bits
                np.testing.assert_allclose([h["score"] for h in hits_a],
                                           [h["score"] for h in hits_b], rtol=1e-4, atol=1e-7)


def test_evaluate_job_reports_lds(world):
    with world.client() as tda:
        job = tda.submit("evaluate", {
            "model": "digits", "corpus": "digits", "methods": ["trak", "graddot"],
            "method_args": {"trak": {"proj_dim": 64}}, "num_subsets": 4, "epochs": 20,
            "test": {"x": world.data.test_x[:8].tolist(), "y": world.data.test_y[:8].tolist()}})
        done = tda.wait(job["id"], timeout=180)
    lds = done["result"]["summary"]["lds"]
    assert set(lds) == {"trak", "graddot"} and all(-1 <= v <= 1 for v in lds.values())
