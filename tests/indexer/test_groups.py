"""Group attribution on real indexes: pooled scores against the engine, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from indexer_fixtures import TRAK_ARGS, Setup, engine_task

from attribution import build_method
from attribution.methods.airrep import group_score
from indexer import groups
from indexer.build import build_index
from indexer.errors import IndexerError
from indexer.groups import GroupSpec
from indexer.index import AttributionIndex


@pytest.fixture(scope="module")
def trak(built_root) -> AttributionIndex:
    return AttributionIndex.open("digits", root=built_root)


@pytest.fixture(scope="module")
def airrep(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> AttributionIndex:
    """An AirRep index with its seeded (untrained) encoder: attention pooling by default."""
    root = tmp_path_factory.mktemp("airrep")
    build_index(setup.card, setup.corpus, name="air", root=root, method="airrep",
                shard_size=100, dtype="float32", show_progress=False, recall_queries=20)
    return AttributionIndex.open("air", root=root)


def test_label_groups_sum_to_the_engine_group_effect(trak: AttributionIndex, setup: Setup
                                                     ) -> None:
    engine = build_method("trak", engine_task(setup), storage_dtype="float32", **TRAK_ARGS)
    full = engine.fit(setup.train).score(setup.test)  # (n_test, n_train), train rows = index rows
    found = groups.resolve(trak, by="label")
    labels = setup.train.y.numpy()
    assert [g.name for g in found] == [str(c) for c in range(10)]
    assert sum(g.size for g in found) == trak.size
    result = groups.score(trak, trak.query_vectors(setup.test), found)
    assert result.pooling == "sum" == groups.default_pooling(trak)
    expected = np.stack([full[:, labels == c].sum(1) for c in range(10)], axis=1)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4, atol=1e-7)
    ranked = result.ranked(0)
    assert [r["rank"] for r in ranked] == list(range(1, 11))
    assert [r["name"] for r in ranked] == [str(c) for c in np.argsort(-expected[0])]


def test_attention_equals_airrep_group_score(airrep: AttributionIndex, setup: Setup) -> None:
    engine = build_method("airrep", engine_task(setup)).fit(setup.train)
    specs = [GroupSpec("first", ids=("d-0000", "d-0005", "d-0009")),
             GroupSpec("licensed", field="license", value="bsd-3"),
             GroupSpec("sevens", label=7)]
    result = groups.score(airrep, airrep.query_vectors(setup.test), groups.resolve(airrep, specs))
    assert result.pooling == "attention"
    members = [[0, 5, 9], np.arange(240), np.flatnonzero(setup.train.y.numpy() == 7)]
    for g, rows in enumerate(members):
        expected = engine.group_score(setup.test, np.asarray(rows))
        np.testing.assert_allclose(result.scores[:, g], expected, rtol=1e-5, atol=1e-6)
    one = groups.score(airrep, airrep.query_vectors(setup.test),
                       groups.resolve(airrep, [GroupSpec("a", ids=("d-0003",))]))
    np.testing.assert_allclose(one.scores[:, 0], group_score(
        torch.from_numpy(engine.query_vectors(setup.test)),
        torch.from_numpy(engine.train_vectors()[[3]])).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", groups.POOLINGS)
def test_a_one_member_group_scores_the_single_example(trak: AttributionIndex, setup: Setup,
                                                      pooling: str) -> None:
    queries = trak.query_vectors(setup.test)
    ids = ["d-0003", "d-0100"]
    found = groups.resolve(trak, [GroupSpec(i, ids=(i,)) for i in ids])
    result = groups.score(trak, queries, found, pooling)
    np.testing.assert_allclose(result.scores, trak.scores_for(queries, ids), rtol=1e-6, atol=1e-9)


def test_pooling_formulas_on_hand_made_scores() -> None:
    s = np.array([[1.0, -2.0, 0.5, 3.0]])
    sizes = [3, 1]
    a = np.exp(np.abs(s[0, :3])) / np.exp(np.abs(s[0, :3])).sum()
    np.testing.assert_allclose(groups.pool(s, sizes, "attention"), [[a @ s[0, :3], 3.0]])
    np.testing.assert_allclose(groups.pool(s, sizes, "sum"), [[-0.5, 3.0]])
    np.testing.assert_allclose(groups.pool(s, sizes, "mean"), [[-0.5 / 3, 3.0]])
    huge = np.array([[1000.0, -1001.0]])  # no overflow: the softmax is stabilised
    np.testing.assert_allclose(groups.pool(huge, [2], "attention"),
                               [[(1000 * np.exp(-1) - 1001) / (np.exp(-1) + 1)]])


def test_by_metadata_field_makes_one_group_per_value(trak: AttributionIndex) -> None:
    found = groups.resolve(trak, by="license")
    assert [(g.name, g.size, g.kind) for g in found] == [("bsd-3", 240, "field")]
    per_source = groups.resolve(trak, by="source")
    assert len(per_source) == 240 and {g.size for g in per_source} == {1}


@pytest.mark.parametrize(("specs", "by", "message"), [
    ([GroupSpec("e", ids=())], None, "is empty"),
    ([GroupSpec("u", ids=("d-0001", "nope-1"))], None, "not in the index"),
    ([GroupSpec("f", field="colour", value="red")], None, "unknown metadata field 'colour'"),
    ([GroupSpec("v", field="license", value="gpl")], None, "no live record has license"),
    ([GroupSpec("l", label=42)], None, "no live record has label = 42"),
    ([GroupSpec("x", ids=("d-0001",), label=3)], None, "exactly one of"),
    ([GroupSpec("d", ids=("d-0001",)), GroupSpec("d", label=1)], None, "unique"),
    ([], None, "empty"),
    (None, None, "either"),
    (None, "colour", "unknown metadata field"),
])
def test_bad_groups_are_clear_errors(trak: AttributionIndex, specs, by, message) -> None:
    with pytest.raises(IndexerError, match=message):
        groups.resolve(trak, specs, by)


def test_bad_pooling_and_query_dimension(trak: AttributionIndex) -> None:
    found = groups.resolve(trak, [GroupSpec("one", ids=("d-0001",))])
    with pytest.raises(IndexerError, match="pooling must be one of"):
        groups.score(trak, np.zeros((1, trak.dim)), found, "max")
    with pytest.raises(IndexerError, match="dim"):
        groups.score(trak, np.zeros((1, trak.dim + 1)), found)
