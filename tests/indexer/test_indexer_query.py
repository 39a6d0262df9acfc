"""Round trip build → open → query; exactness against brute force and against the engine."""

from __future__ import annotations

import numpy as np
import pytest
from indexer_fixtures import TRAK_ARGS, Setup, engine_task

from attribution import build_method, self_influence, value
from indexer.build import build_index
from indexer.index import AttributionIndex


@pytest.fixture(scope="module")
def index(built_root):
    return AttributionIndex.open("digits", root=built_root)


@pytest.fixture(scope="module")
def engine(setup: Setup):
    method = build_method("trak", engine_task(setup), storage_dtype="float32", **TRAK_ARGS)
    return method.fit(setup.train)


def test_round_trip_manifest(index: AttributionIndex, setup: Setup) -> None:
    m = index.manifest
    assert (index.name, index.version, index.size, index.dim) == ("digits", "v0001", 240, 128)
    assert m["method"]["name"] == "trak" and m["method"]["arguments"]["proj_dim"] == 64
    assert m["projection"]["dim"] == 64 and m["projection"]["seed"] == 0
    assert set(m["lambda"]) == {"0", "1"}
    assert m["faiss"]["kind"] == "flat" and m["faiss"]["recall"]["recall"] == 1.0
    assert len(m["shards"]) == 3 and m["counts"] == {"rows": 240, "live": 240, "deleted": 0, "added": 0}
    assert len(m["model"]["checkpoints"]) == 2 and all(len(c["sha256"]) == 64 for c in m["model"]["checkpoints"])
    assert m["corpus"]["num_records"] == 240 and m["corpus"]["metadata_columns"] == ["source", "license"]
    assert {"torch", "faiss", "numpy"} <= set(m["libraries"])
    assert index.ids[:2].tolist() == ["d-0000", "d-0001"]


def test_flat_topk_equals_brute_force(index: AttributionIndex, setup: Setup) -> None:
    queries = index.query_vectors(setup.test)
    vectors = index.store.gather(np.arange(240))
    scores = queries @ vectors.T
    for opponents in (False, True):
        top = index.topk(queries, k=7, opponents=opponents)
        order = np.argsort(scores if opponents else -scores, axis=1, kind="stable")[:, :7]
        assert top.rows.tolist() == order.tolist()
        assert top.ids == [index.row_ids[r].tolist() for r in order]
        np.testing.assert_allclose(top.scores, np.take_along_axis(scores, order, 1), rtol=1e-6, atol=1e-9)
        assert top.ranks[0].tolist() == list(range(1, 8))
    assert (index.topk(queries, k=3).scores[:, 0] > 0).all()
    assert (index.topk(queries, k=3, opponents=True).scores[:, 0] < 0).all()


def test_index_scores_equal_engine_scores(index: AttributionIndex, engine, setup: Setup) -> None:
    expected = engine.score(setup.test)
    queries = index.query_vectors(setup.test)
    np.testing.assert_array_equal(queries, engine.query_vectors(setup.test))
    np.testing.assert_allclose(index.scores_for(queries, index.ids), expected, rtol=1e-5, atol=1e-8)
    top = index.topk(queries, k=5)
    np.testing.assert_allclose(top.scores, np.take_along_axis(expected, top.rows, 1), rtol=1e-5, atol=1e-8)
    assert top.rows.tolist() == np.argsort(-expected, axis=1, kind="stable")[:, :5].tolist()


def test_self_influence_and_value_from_stored_vectors(index: AttributionIndex, engine, setup: Setup) -> None:
    np.testing.assert_allclose(index.self_influence(), self_influence(engine, setup.train), rtol=1e-5, atol=1e-10)
    validation = engine.query_vectors(setup.test, "loss")
    np.testing.assert_allclose(index.value(validation), value(engine, setup.test), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(index.value(validation.sum(0)), index.value(validation), rtol=1e-6)


def test_records_and_scores_for_by_id(index: AttributionIndex, setup: Setup) -> None:
    records = index.records(["d-0005", "d-0001"])
    assert records == [{"id": "d-0005", "source": "digits/d/5", "license": "bsd-3"},
                       {"id": "d-0001", "source": "digits/d/1", "license": "bsd-3"}]
    q = index.query_vectors(setup.test)[:2]
    chosen = index.scores_for(q, ["d-0005", "d-0001"])
    full = index.scores_for(q, index.ids)
    np.testing.assert_allclose(chosen, full[:, [5, 1]], rtol=1e-6)


def test_other_methods_match_engine(setup: Setup, tmp_path) -> None:
    """graddot (fp16 storage) and tracin: index scores equal the engine's within storage precision."""
    cases = (("graddot", "float16", {"proj_dim": 32}), ("tracin", "float32", {"proj_dim": 32}),
             ("trak", "float16", {"proj_dim": 32}))
    for method, dtype, args in cases:
        result = build_index(setup.card, setup.corpus, name=method, root=tmp_path, method=method,
                             method_args=args, shard_size=128, dtype=dtype, show_progress=False,
                             self_influence=False, recall_queries=20)
        index = AttributionIndex.open(result.path)
        engine = build_method(method, engine_task(setup), storage_dtype="float32", **args).fit(setup.train)
        expected = engine.score(setup.test)
        got = index.scores_for(index.query_vectors(setup.test), index.ids)
        tolerance = 2e-3 if dtype == "float16" else 1e-5
        np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())
        assert index.manifest["dtype"] == dtype and index.store.shards[0].dtype == np.dtype(dtype)
        if dtype == "float16":  # tiny TRAK vectors are scaled into fp16's normal range
            peak = np.abs(index.store.shards[0]).max()
            assert 16 <= peak < 32 and index.manifest["scale"] == index.store.scale


def test_rebuild_of_same_plan_is_reused(setup: Setup, fresh_root) -> None:
    again = build_index(setup.card, setup.corpus, name="digits", root=fresh_root,
                        method_args=TRAK_ARGS, shard_size=100, dtype="float32", show_progress=False,
                        recall_queries=50)
    assert again.reused and again.version == "v0001"


@pytest.mark.parametrize("solver", ["exact", "ekfac"])
def test_influence_train_side_is_indexed(setup: Setup, tmp_path, solver: str) -> None:
    """Influence with H⁻¹ (exact or EK-FAC) applied to the train side: the index restores the
    fitted state, featurizes queries like the engine and scores like it."""
    args = {"solver": solver, "checkpoints": [1], "proj_dim": 64}
    result = build_index(setup.card, setup.corpus, name="influence", root=tmp_path, method="influence",
                         method_args=args, shard_size=240, dtype="float32",
                         show_progress=False, self_influence=False, recall_queries=20)
    index = AttributionIndex.open(result.path)
    engine = build_method("influence", engine_task(setup), **args).fit(setup.train)
    queries = index.query_vectors(setup.test)
    np.testing.assert_allclose(queries, engine.query_vectors(setup.test), rtol=1e-5,
                               atol=1e-6 * np.abs(queries).max())
    expected = engine.score(setup.test)
    np.testing.assert_allclose(index.scores_for(queries, index.ids), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())
    assert index.manifest["lambda"] == engine.arguments()["dampings"]
