"""``evaluate`` with ``subsets_job``: a bad id is refused at submission (problem+json, 4xx),
not by failing the job on the worker, and nothing is stored for a refused request."""

from __future__ import annotations

import shutil

import pytest
from service_helpers import PROBLEM, RIVAL, TENANT, World, snapshot, wait_idle

pytestmark = pytest.mark.timeout(300)


def _retraining(world: World, rows: slice, **extra: object) -> dict:
    data = world.data
    return {"model": "digits", "corpus": "digits", "alpha": 0.5, "num_subsets": 3, "epochs": 3,
            "seed": 5, "test": {"x": data.test_x[rows].tolist(), "y": data.test_y[rows].tolist()},
            **extra}


def _refused(world: World, key: str, params: dict, status: int, slug: str, says: str) -> None:
    with world.http(key) as http:
        response = http.post("/v1/jobs", json={"kind": "evaluate", "params": params})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"].endswith(slug) and says in problem["detail"], problem


def test_evaluate_checks_its_subsets_job_at_submission(world: World) -> None:
    with world.client() as tda:
        reference = tda.wait(tda.submit("subsets", {**_retraining(world, slice(0, 4)),
                                                    "chunk_size": 1})["id"], timeout=120)
        evaluate = {**_retraining(world, slice(0, 4)), "methods": ["graddot"],
                    "subsets_job": reference["id"]}

        _refused(world, world.admin, {**evaluate, "subsets_job": "no-such-job"}, 404,
                 "not-found", "no subsets job 'no-such-job'")
        _refused(world, world.admin, {**evaluate, "subsets_job": world.index_job["id"]}, 422,
                 "invalid-subsets-job", "'build_index' job")
        wait_idle(world)
        before = snapshot(world)
        _refused(world, world.admin, {**evaluate, **_retraining(world, slice(4, 8))}, 422,
                 "subsets-job-mismatch", "another test")
        assert snapshot(world) == before  # the new test examples were not even written

        # a subsets job that has not finished (then a cancelled one) is refused too
        slow = tda.submit("subsets", {**_retraining(world, slice(0, 4)), "num_subsets": 200,
                                      "epochs": 400, "chunk_size": 1, "seed": 6})
        _refused(world, world.admin, {**evaluate, "subsets_job": slow["id"]}, 422,
                 "subsets-job-not-finished", f"subsets job {slow['id']} is ")
        tda.cancel(slow["id"])
        assert tda.wait(slow["id"], timeout=120, raise_on_failure=False)["state"] == "cancelled"
        _refused(world, world.admin, {**evaluate, "subsets_job": slow["id"]}, 422,
                 "subsets-job-not-finished", "is cancelled")

        reused = tda.wait(tda.submit("evaluate", evaluate)["id"], timeout=120)
    assert reused["result"]["summary"]["retraining"] == {"subsets_job": reference["id"]}

    # another tenant with its own copy of model and corpus cannot name this tenant's job
    files = world.harness.settings.files_dir
    shutil.copytree(files(TENANT) / "digits", files(RIVAL) / "sv-digits", dirs_exist_ok=True)
    with world.client(world.rival) as rival:
        rival.register("models", "sv-digits", "sv-digits/model.yaml")
        rival.register("corpora", "sv-digits", "sv-digits/train.parquet")
    _refused(world, world.rival, {**evaluate, "model": "sv-digits", "corpus": "sv-digits"}, 404,
             "not-found", f"no subsets job {reference['id']!r}")
