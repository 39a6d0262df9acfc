"""Label groups read the labels stored in the index, not the corpus files (which may move)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from indexer_fixtures import TRAK_ARGS, Setup

from indexer import groups
from indexer.build import build_index
from indexer.errors import IndexerError
from indexer.groups import GroupSpec
from indexer.index import AttributionIndex
from indexer.store import LABELS
from indexer.update import add_records, delete_records, rebuild_faiss


def label_rows(index: AttributionIndex) -> dict[str, list[str]]:
    """Label group name → member ids, resolved by the index."""
    return {g.name: sorted(index.row_ids[g.rows].tolist())
            for g in groups.resolve(index, by="label")}


def expected_rows(ids: list[str], labels: np.ndarray, gone: set[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for i, label in zip(ids, labels.tolist(), strict=True):
        if i not in gone:
            found.setdefault(str(label), []).append(i)
    return {k: sorted(v) for k, v in found.items()}


def test_label_groups_survive_moved_corpora_through_add_and_delete(setup: Setup,
                                                                   tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    corpus, extra = data / "train.parquet", data / "more.parquet"
    shutil.copy(setup.corpus, corpus)
    shutil.copy(setup.extra, extra)
    root = tmp_path / "indexes"
    build_index(setup.card, corpus, name="digits", root=root, method_args=TRAK_ARGS,
                shard_size=100, dtype="float32", show_progress=False, recall_queries=10)
    add_records("digits", extra, root=root, show_progress=False)
    delete_records("digits", ["d-0001", "extra-0002"], root=root)
    rebuild_faiss("digits", "flat", root=root)
    for file in (corpus, extra):  # the corpora move away after the build
        file.rename(tmp_path / f"moved-{file.name}")

    index = AttributionIndex.open("digits", root=root)
    assert (index.path / LABELS).is_file() and LABELS in index.manifest["files"]
    ids = [f"d-{i:04d}" for i in range(len(setup.train))]
    ids += [f"extra-{i:04d}" for i in range(len(setup.more))]
    labels = np.concatenate([setup.train.y.numpy(), setup.more.y.numpy()])
    expected = expected_rows(ids, labels, {"d-0001", "extra-0002"})
    assert label_rows(index) == expected
    sevens = groups.resolve(index, [GroupSpec("sevens", label=7)])
    queries = index.query_vectors(setup.test)
    result = groups.score(index, queries, sevens)
    np.testing.assert_allclose(result.scores[:, 0],
                               index.scores_for(queries, expected["7"]).sum(1), rtol=1e-5)


def test_versions_without_stored_labels_fall_back_to_the_corpus(fresh_root: Path) -> None:
    """An index written before labels.npy existed still groups by label from its corpus."""
    version = AttributionIndex.open("digits", root=fresh_root).path
    (version / LABELS).unlink()
    manifest = json.loads((version / "manifest.json").read_text())
    del manifest["files"][LABELS]
    (version / "manifest.json").write_text(json.dumps(manifest))
    index = AttributionIndex.open("digits", root=fresh_root)
    assert sum(g.size for g in groups.resolve(index, by="label")) == index.size

    manifest["corpus"]["path"] = str(fresh_root / "gone.parquet")
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexerError, match="missing or changed"):
        groups.resolve(AttributionIndex.open("digits", root=fresh_root), by="label")
