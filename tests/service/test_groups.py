"""POST /v1/indexes/{name}/groups over real HTTP: scores against a brute-force computation from
the engine, bad input as 4xx problem+json, the CLI and the async client."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from service_helpers import PROBLEM, snapshot
from typer.testing import CliRunner

from attribution.methods.airrep import group_score
from indexer.index import AttributionIndex
from service.client import AsyncClient
from service.commands import register

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def engine(world):
    """Brute force: the index's engine method (query side) against every stored train vector."""
    index = AttributionIndex.open(world.harness.settings.index_root("acme") / "digits")
    x, y = world.data.test_x[:4], world.data.test_y[:4].astype(np.int64)
    queries = index.method().query_vectors(index.examples(x, y))
    full = queries.astype(np.float64) @ index.store.gather(np.arange(index.size)).T.astype(np.float64)
    corpus = pq.read_table(world.harness.settings.files_dir("acme") / world.data.corpus)
    yield {"x": x, "y": y, "queries": queries, "full": full, "index": index,
           "ids": corpus.column("id").to_pylist(), "labels": np.asarray(corpus.column("label")),
           "flipped": np.asarray(corpus.column("flipped"))}
    index.close()


def test_group_scores_equal_brute_force(world, engine):
    labels, full = engine["labels"], engine["full"]
    with world.client(world.reader) as tda:
        by_label = tda.groups("digits", engine["x"], engine["y"], by="label")
        by_flipped = tda.groups("digits", engine["x"], engine["y"], by="flipped", pooling="mean")
        chosen = [{"name": "first-ten", "ids": engine["ids"][:10]},
                  {"name": "sevens", "label": 7},
                  {"name": "flipped", "field": "flipped", "value": True}]
        attention = tda.groups("digits", engine["x"], engine["y"], groups=chosen,
                               pooling="attention", k=2)
    assert by_label["pooling"] == "sum" and by_label["method"] == "trak"
    for j, result in enumerate(by_label["results"]):
        expected = {str(c): full[j, labels == c].sum() for c in np.unique(labels)}
        got = {g["name"]: g["score"] for g in result["groups"]}
        assert got.keys() == expected.keys()
        np.testing.assert_allclose([got[c] for c in expected], list(expected.values()),
                                   rtol=1e-5, atol=1e-9)
        assert [g["rank"] for g in result["groups"]] == list(range(1, len(expected) + 1))
        assert {g["name"]: g["size"] for g in result["groups"]} == \
            {str(c): int((labels == c).sum()) for c in np.unique(labels)}
    for j, result in enumerate(by_flipped["results"]):
        got = {g["name"]: g["score"] for g in result["groups"]}
        np.testing.assert_allclose([got["true"], got["false"]],
                                   [full[j, engine["flipped"]].mean(),
                                    full[j, ~engine["flipped"]].mean()], rtol=1e-5, atol=1e-9)
    members = [np.arange(10), np.flatnonzero(labels == 7), np.flatnonzero(engine["flipped"])]
    queries = torch.from_numpy(engine["queries"].astype(np.float64))
    vectors = torch.from_numpy(engine["index"].store.gather(np.arange(len(labels))).astype(np.float64))
    expected = np.stack([group_score(queries, vectors[m]).numpy() for m in members], axis=1)
    for j, result in enumerate(attention["results"]):
        assert len(result["groups"]) == 2 and result["groups"][0]["pooling"] == "attention"
        best = np.argsort(-expected[j])[:2]
        assert [g["name"] for g in result["groups"]] == [chosen[b]["name"] for b in best]
        np.testing.assert_allclose([g["score"] for g in result["groups"]], expected[j, best],
                                   rtol=1e-5, atol=1e-9)


def test_one_member_group_equals_the_single_example_score(world, engine):
    with world.client(world.reader) as tda:
        top = tda.topk("digits", engine["x"][:1], engine["y"][:1], k=3)["results"][0]
        hits = top["proponents"]
        for pooling in ("attention", "sum", "mean"):
            answer = tda.groups("digits", engine["x"][:1], engine["y"][:1], pooling=pooling,
                                groups=[{"name": h["id"], "ids": [h["id"]]} for h in hits])
            got = {g["name"]: g["score"] for g in answer["results"][0]["groups"]}
            np.testing.assert_allclose([got[h["id"]] for h in hits], [h["score"] for h in hits],
                                       rtol=1e-5, atol=1e-8)


BAD = [
    ({"groups": [{"name": "e", "ids": []}]}, 422, "is empty"),
    ({"groups": [{"name": "u", "ids": ["digit-00001", "not-a-record"]}]}, 422, "not in the index"),
    ({"groups": [{"name": "f", "field": "colour", "value": "red"}]}, 422,
     "unknown metadata field 'colour'"),
    ({"by": "colour"}, 422, "unknown metadata field"),
    ({"groups": [{"name": "v", "field": "source", "value": "nowhere"}]}, 422, "no live record"),
    ({"groups": [{"name": "two", "ids": ["digit-00001"], "label": 3}]}, 422, "exactly one"),
    ({"groups": [{"name": "d", "label": 1}, {"name": "d", "label": 2}]}, 422, "unique"),
    ({}, 422, "either 'groups' or 'by'"),
    ({"by": "label", "pooling": "max"}, 422, "pooling"),
]


@pytest.mark.parametrize(("extra", "status", "detail"), BAD)
def test_bad_groups_are_4xx_problems(world, engine, extra, status, detail):
    body = {"examples": {"x": engine["x"][:1].tolist(), "y": engine["y"][:1].tolist()}, **extra}
    before = snapshot(world)
    with world.http(world.reader) as http:
        response = http.post("/v1/indexes/digits/groups", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    assert detail in json.dumps(response.json())
    assert snapshot(world) == before


def test_other_tenants_and_unknown_indexes_are_404(world, engine):
    body = {"examples": {"x": engine["x"][:1].tolist(), "y": engine["y"][:1].tolist()},
            "by": "label"}
    with world.http(world.rival) as http:
        response = http.post("/v1/indexes/digits/groups", json=body)
        assert response.status_code == 404 and response.headers["content-type"].startswith(PROBLEM)
    with world.http(world.reader) as http:
        assert http.post("/v1/indexes/nope/groups", json=body).status_code == 404
    with world.http() as http:
        assert http.post("/v1/indexes/digits/groups", json=body).status_code == 401


def test_groups_cli_and_async_client(world, engine, tmp_path):
    examples = tmp_path / "examples.json"
    examples.write_text(json.dumps({"x": engine["x"][:2].tolist(), "y": engine["y"][:2].tolist()}))
    app = __import__("typer").Typer()
    register(app)
    env = {"TDA_URL": world.url, "TDA_API_KEY": world.reader}
    result = CliRunner().invoke(app, ["groups", "digits", "-e", f"@{examples}", "--by", "label",
                                      "-k", "3", "--json"], env=env)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert [len(r["groups"]) for r in printed["results"]] == [3, 3]
    table = CliRunner().invoke(app, ["groups", "digits", "-e", f"@{examples}", "--groups",
                                     '[{"name": "sevens", "label": 7}]'], env=env)
    assert table.exit_code == 0 and "sevens" in table.output and "pooling" in table.output
    bad = CliRunner().invoke(app, ["groups", "digits", "-e", f"@{examples}", "--by", "colour"],
                             env=env)
    assert bad.exit_code == 1 and "unknown metadata field" in bad.output

    async def ask() -> dict:
        async with AsyncClient(world.url, world.reader) as tda:
            return await tda.groups("digits", engine["x"][:2], engine["y"][:2], by="label", k=3)

    assert asyncio.run(ask()) == printed
