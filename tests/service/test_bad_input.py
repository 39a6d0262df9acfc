"""Bad input answers 4xx problem+json — never 500 — and changes nothing stored."""

from __future__ import annotations

import os

import httpx
import pytest
from service_helpers import PROBLEM, snapshot, wait_idle

pytestmark = pytest.mark.timeout(240)


def _row(value: float = 0.0, width: int = 64) -> list[float]:
    return [value] * width


def _topk(x, y=(1,), **extra):  # type: ignore[no-untyped-def]
    body = {"examples": {"x": x} | ({"y": list(y)} if y is not None else {})}
    return {**body, **extra}


def _job(kind: str, **params):  # type: ignore[no-untyped-def]
    return {"kind": kind, "params": params}


def bad_requests(world) -> list[tuple[str, str, dict, int]]:  # type: ignore[no-untyped-def]
    """(method, path, httpx kwargs, expected status); the admin key unless headers say else."""
    big = b'{"examples": {"x": [[' + b"0.0," * (1_300_000) + b'0.0]], "y": [1]}}'
    test = {"x": [_row()], "y": [1]}
    none = {"anonymous": True}
    return [
        # shapes and values
        ("POST", "/v1/indexes/digits/topk", {"json": _topk([_row(width=10)])}, 422),
        ("POST", "/v1/indexes/digits/topk", {"json": _topk([_row(), _row(width=63)], (1, 2))}, 422),
        ("POST", "/v1/indexes/digits/topk", {"json": _topk([_row()], y=None)}, 422),
        ("POST", "/v1/indexes/digits/topk", {"json": _topk([_row()], (42,))}, 422),
        ("POST", "/v1/indexes/digits/topk", {"json": _topk([_row()], (1.5,))}, 422),
        ("POST", "/v1/indexes/digits/topk", {"json": _topk([_row()], (1, 2))}, 422),
        ("POST", "/v1/indexes/digits/topk", {"json": _topk([], ())}, 422),
        ("POST", "/v1/indexes/digits/topk", {"json": _topk([_row()], k=0)}, 422),
        ("POST", "/v1/indexes/digits/topk", {"json": _topk([_row()], k=10**6)}, 422),
        ("POST", "/v1/indexes/digits/topk", {"json": {**_topk([_row()]), "extra": 1}}, 422),
        ("POST", "/v1/indexes/digits/topk", {"content": b'{"examples": {"x": [[NaN]], "y": [1]}}',
                                             "headers": {"Content-Type": "application/json"}}, 422),
        ("POST", "/v1/indexes/digits/topk", {"content": b'{"examples": ',
                                             "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "/v1/jobs", {"content": b"not json at all",
                              "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "/v1/jobs", {"content": b"{bad"}, 400),
        ("POST", "/v1/jobs", {"json": [1, 2]}, 400),
        ("POST", "/v1/indexes/digits/topk", {"content": big,
                                             "headers": {"Content-Type": "application/json"}}, 413),
        ("POST", "/v1/indexes/digits/topk", {"content": iter([big[:1 << 20]] * 5),
                                             "headers": {"Content-Type": "application/json"}}, 413),
        # unknown things
        ("POST", "/v1/indexes/nope/topk", {"json": _topk([_row()])}, 404),
        ("POST", "/v1/indexes/..%2F..%2Facme/topk", {"json": _topk([_row()])}, 404),
        ("GET", "/v1/indexes/nope", {}, 404),
        ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000", {}, 404),
        ("GET", "/v1/jobs/" + "x" * 500, {}, 404),
        ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000/result", {}, 404),
        ("DELETE", "/v1/jobs/00000000-0000-0000-0000-000000000000", {}, 404),
        ("GET", "/v1/models/nope", {}, 404),
        ("DELETE", "/v1/corpora/nope", {}, 404),
        ("GET", "/v1/nothing-here", {}, 404),
        ("PATCH", "/v1/jobs", {}, 405),
        # paths outside the data root
        ("POST", "/v1/models", {"json": {"name": "evil", "path": "../../../../../etc/passwd"}}, 403),
        ("POST", "/v1/corpora", {"json": {"name": "evil", "path": "/etc/hosts"}}, 403),
        ("POST", "/v1/corpora", {"json": {"name": "evil", "path": "escape/hosts.parquet"}}, 403),
        ("POST", "/v1/models", {"json": {"name": "evil", "path": "../../rival/files/x.yaml"}}, 403),
        ("POST", "/v1/indexes", {"json": {"name": "evil", "path": "/tmp"}}, 403),
        ("PUT", "/v1/files/..%2F..%2Fevil.txt", {"content": b"x"}, 403),
        ("DELETE", "/v1/files/..%2F..%2F..%2Fkeys.json", {}, 403),
        # wrong files and names
        ("POST", "/v1/corpora", {"json": {"name": "c2", "path": "digits/model.yaml"}}, 422),
        ("POST", "/v1/models", {"json": {"name": "m2", "path": "digits/train.parquet"}}, 422),
        ("POST", "/v1/models", {"json": {"name": "m3", "path": "digits/missing.yaml"}}, 422),
        ("POST", "/v1/models", {"json": {"name": "../x", "path": "digits/model.yaml"}}, 422),
        ("POST", "/v1/models", {"json": {"name": "digits", "path": "digits/model.yaml"}}, 409),
        # jobs
        ("POST", "/v1/jobs", {"json": _job("nonsense")}, 422),
        ("POST", "/v1/jobs", {"json": _job("mislabel")}, 422),
        ("POST", "/v1/jobs", {"json": _job("mislabel", index="digits", model="digits",
                                           corpus="digits")}, 422),
        ("POST", "/v1/jobs", {"json": _job("mislabel", index="nope")}, 404),
        ("POST", "/v1/jobs", {"json": _job("evaluate", model="digits", corpus="digits",
                                           test={"x": [_row()], "y": [1]}, num_subsets=2)}, 422),
        ("POST", "/v1/jobs", {"json": _job("attribution", model="nope", corpus="digits",
                                           examples=test)}, 404),
        ("POST", "/v1/jobs", {"json": _job("attribution", model="digits", corpus="digits",
                                           examples={"x": [_row(width=3)], "y": [1]})}, 422),
        ("POST", "/v1/jobs", {"json": _job("attribution", model="digits", corpus="digits",
                                           method="magic", examples=test)}, 422),
        ("POST", "/v1/jobs", {"json": _job("build_index", name="../../x", model="digits",
                                           corpus="digits")}, 422),
        ("POST", "/v1/jobs", {"json": _job("valuation", index="digits",
                                           validation={"x": [[1.0] * 64], "y": [1, 2]})}, 422),
        # keys and tenants
        ("GET", "/v1/indexes", none, 401),
        ("GET", "/v1/indexes", {"headers": {"Authorization": "Bearer tda_wrong"}}, 401),
        ("GET", "/v1/indexes", {"headers": {"X-API-Key": "tda_wrong"}, "anonymous": True}, 401),
        ("POST", "/v1/jobs", {"json": _job("mislabel", index="digits"),
                              "headers": {"Authorization": f"Bearer {world.reader}"}}, 403),
        ("POST", "/v1/models", {"json": {"name": "m4", "path": "digits/model.yaml"},
                                "headers": {"Authorization": f"Bearer {world.reader}"}}, 403),
        ("PUT", "/v1/files/x.txt", {"content": b"x",
                                    "headers": {"Authorization": f"Bearer {world.reader}"}}, 403),
        ("POST", "/v1/indexes/digits/topk", {"json": _topk([_row()]),
                                             "headers": {"Authorization": f"Bearer {world.rival}"}},
         404),
        ("GET", "/v1/models/digits", {"headers": {"Authorization": f"Bearer {world.rival}"}}, 404),
        ("DELETE", "/v1/indexes/digits", {"headers": {"Authorization": f"Bearer {world.rival}"}},
         404),
        ("POST", "/v1/jobs", {"json": _job("attribution", model="digits", corpus="digits",
                                           examples=test),
                              "headers": {"Authorization": f"Bearer {world.rival}"}}, 404),
    ]


def test_bad_input_is_4xx_problem_and_stores_nothing(world):
    files = world.harness.settings.files_dir("acme")
    escape = files / "escape"
    if not escape.exists():
        os.symlink("/etc", escape)  # a symlink out of the data root must not be followed
    wait_idle(world)
    before = snapshot(world)
    failures = []
    with world.http(world.admin) as http:
        for method, path, kwargs, expected in bad_requests(world):
            if kwargs.pop("anonymous", False):
                response = httpx.request(method, world.url + path, **kwargs)
            else:
                response = http.request(method, path, **kwargs)
            body = response.json() if response.headers.get("content-type") == PROBLEM else None
            if (response.status_code != expected or body is None
                    or body.get("status") != expected or not body.get("detail")):
                failures.append(f"{method} {path[:60]} -> {response.status_code} "
                                f"{response.headers.get('content-type')} {response.text[:200]}")
    assert not failures, "\n".join(failures)
    assert snapshot(world) == before


def test_other_tenants_jobs_are_invisible(world):
    job_id = world.index_job["id"]
    with world.http(world.rival) as http:
        for method, path in (("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/result"),
                             ("GET", f"/v1/jobs/{job_id}/result/arrays/scores"),
                             ("DELETE", f"/v1/jobs/{job_id}")):
            response = http.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.headers["content-type"] == PROBLEM
        assert http.get("/v1/jobs").json()["page"]["total"] == 0
        assert http.get("/v1/indexes").json() == []
        assert http.get("/v1/models").json() == []
        assert http.get("/v1/files").json() == []
    with world.http(world.admin) as http:
        assert http.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"


def test_missing_key_says_how_to_authenticate(world):
    with world.http() as http:
        response = http.get("/v1/jobs")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in response.json()["detail"]
