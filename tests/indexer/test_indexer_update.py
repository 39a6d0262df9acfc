"""Add and delete without a rebuild: ids and scores of untouched records do not move."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from indexer_fixtures import TRAK_ARGS, Setup, corpus_table, engine_task

from attribution import build_method
from attribution.data import Examples
from indexer.build import build_index
from indexer.errors import IndexerError
from indexer.index import AttributionIndex
from indexer.update import add_records, delete_records, rebuild_faiss, retune


def scores_by_id(index: AttributionIndex, queries: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip(index.ids.tolist(), index.scores_for(queries, index.ids).T, strict=True))


def test_add_then_delete_keeps_untouched_records(setup: Setup, fresh_root: Path) -> None:
    base = AttributionIndex.open("digits", root=fresh_root)
    queries = base.query_vectors(setup.test)
    before = scores_by_id(base, queries)
    before_si = dict(zip(base.ids.tolist(), base.self_influence(), strict=True))

    added = add_records("digits", setup.extra, root=fresh_root, show_progress=False)
    assert added.version == "v0002" and added.size == 280
    assert added.row_ids[:240].tolist() == base.row_ids.tolist()  # rows and ids stable
    after = scores_by_id(added, queries)
    for rid, scores in before.items():
        np.testing.assert_array_equal(after[rid], scores)
    # the new records use the saved TRAK preconditioner: equal to transform(featurize) with it
    method = base.method()
    expected_new = method.transform_train(method.featurize_train(setup.more))
    np.testing.assert_allclose(added.store.gather(np.arange(240, 280)), expected_new, rtol=1e-6, atol=1e-9)
    assert added.records(["extra-0003"]) == [{"id": "extra-0003", "source": "digits/extra/3", "license": "bsd-3"}]
    assert added.manifest["counts"] == {"rows": 280, "live": 280, "deleted": 0, "added": 40}
    assert added.manifest["drift"]["added_since_fit"] == 40

    gone = ["d-0003", "extra-0001", "d-0100"]
    deleted = delete_records("digits", gone, root=fresh_root)
    assert deleted.version == "v0003" and deleted.size == 277
    after_delete = scores_by_id(deleted, queries)
    assert set(after_delete) == set(after) - set(gone)
    for rid, scores in after_delete.items():
        np.testing.assert_array_equal(scores, after[rid])
    si = dict(zip(deleted.ids.tolist(), deleted.self_influence(), strict=True))
    for rid, value in before_si.items():
        if rid not in gone:
            assert si[rid] == value
    top = deleted.topk(queries, k=deleted.size)
    assert not set(gone) & {i for row in top.ids for i in row}
    with pytest.raises(IndexerError, match="not in the index"):
        deleted.records(["d-0003"])
    with pytest.raises(IndexerError, match="not in the index"):
        delete_records("digits", ["d-0003"], root=fresh_root)

    # older versions keep answering with their own contents
    assert AttributionIndex.open("digits", root=fresh_root, version="v0001").size == 240
    assert AttributionIndex.open("digits", root=fresh_root).version == "v0003"
    # a deleted id may come back as a new row; live ids may not be added twice
    (setup.root / "readd.parquet").unlink(missing_ok=True)
    import pyarrow.parquet as pq

    table = corpus_table(Examples(setup.train.x[3:4], setup.train.y[3:4]), "d")
    table = table.set_column(0, "id", __import__("pyarrow").array(["d-0003"]))
    pq.write_table(table, setup.root / "readd.parquet")
    readded = add_records("digits", setup.root / "readd.parquet", root=fresh_root, show_progress=False)
    assert readded.rows_of(["d-0003"]).tolist() == [280]
    np.testing.assert_allclose(readded.scores_for(queries, ["d-0003"])[:, 0], before["d-0003"], rtol=1e-4, atol=1e-9)
    with pytest.raises(IndexerError, match="already in index"):
        add_records("digits", setup.extra, root=fresh_root, show_progress=False)


def test_drift_advises_rebuild(setup: Setup, fresh_root: Path) -> None:
    deleted = delete_records("digits", [f"d-{i:04d}" for i in range(60)], root=fresh_root)
    assert deleted.info()["rebuild_advised"] and "rebuild" in deleted.manifest["drift"]["reason"]


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw", "ivf_pq"])
def test_approximate_kinds_add_delete(setup: Setup, tmp_path: Path, kind: str) -> None:
    params = {"nlist": 4} if kind.startswith("ivf") else {}
    if kind == "ivf_pq":
        params.update(m=16, nbits=4)
    result = build_index(setup.card, setup.corpus, name="approx", root=tmp_path, method_args=TRAK_ARGS,
                         shard_size=240, dtype="float16", index_kind=kind, index_params=params,
                         show_progress=False, self_influence=False, recall_queries=40)
    index = AttributionIndex.open(result.path)
    recall = index.manifest["faiss"]["recall"]
    assert index.manifest["faiss"]["kind"] == kind and recall["recall"] >= (0.95 if kind != "ivf_pq" else 0.0)
    assert recall["sweep_proponents"] and recall["sweep_opponents"]
    knob = "ef_search" if kind == "hnsw" else "nprobe"
    assert index.spec.params[knob] and index.spec.params[f"{knob}_opponents"]
    queries = index.query_vectors(setup.test)
    exact = index.scores_for(queries, index.ids)
    top = index.topk(queries, k=5)
    np.testing.assert_allclose(top.scores, np.take_along_axis(exact, top.rows, 1), rtol=1e-5)
    added = add_records(index.path.parent.parent, setup.extra, show_progress=False)
    deleted = delete_records(added.path.parent.parent, ["d-0000", "extra-0000"])
    assert deleted.size == 278 and deleted.searchers()[1].ntotal == 278
    found = {i for row in deleted.topk(queries, k=50).ids for i in row}
    assert "d-0000" not in found and "extra-0000" not in found
    assert deleted.manifest["faiss"]["recall"]["queries"] == 40


def test_engine_refit_agrees_after_add(setup: Setup, fresh_root: Path) -> None:
    """Added rows use the old preconditioner; the rest of the index is bit-identical."""
    added = add_records("digits", setup.extra, root=fresh_root, show_progress=False)
    engine = build_method("trak", engine_task(setup), storage_dtype="float32", **TRAK_ARGS).fit(setup.train)
    queries = added.query_vectors(setup.test)
    expected = engine.score(setup.test)
    np.testing.assert_allclose(added.scores_for(queries, added.ids[:240]), expected,
                               rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_rebuild_faiss_only(setup: Setup, fresh_root: Path) -> None:
    base = AttributionIndex.open("digits", root=fresh_root)
    hnsw = rebuild_faiss("digits", "hnsw", {"M": 8}, root=fresh_root)
    assert hnsw.version == "v0002" and hnsw.spec.kind == "hnsw" and hnsw.spec.params["M"] == 8
    assert hnsw.manifest["faiss"]["recall"]["recall"] >= 0.95
    # vectors are shared with the base version (hard links), not recomputed
    shard = "vectors/00000.npy"
    assert (hnsw.path / shard).stat().st_ino == (base.path / shard).stat().st_ino
    queries = base.query_vectors(setup.test)
    np.testing.assert_array_equal(hnsw.scores_for(queries, base.ids), base.scores_for(queries, base.ids))
    assert hnsw.manifest["history"][-1]["op"] == "reindex"
    with pytest.raises(IndexerError, match="unknown parameters"):
        rebuild_faiss("digits", "flat", {"nlist": 2}, root=fresh_root)
    # re-tuning keeps the graph and only re-chooses ef_search
    tuned = retune("digits", 0.999, root=fresh_root)
    assert tuned.version == "v0003" and tuned.spec.params["M"] == 8
    assert tuned.manifest["faiss"]["recall"]["target"] == 0.999
    assert tuned.spec.params["ef_search"] >= hnsw.spec.params["ef_search"]
    assert (hnsw.path / "index.faiss").stat().st_ino != (tuned.path / "index.faiss").stat().st_ino
