"""Damaged files, a manifest from another index or model, wrong dimensions: clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from indexer_fixtures import Setup
from safetensors.torch import load_file, save_file

from indexer.build import build_index
from indexer.errors import (
    IndexCorruptError,
    IndexerError,
    IndexMismatchError,
    IndexNotFoundError,
)
from indexer.index import AttributionIndex


def version_dir(root: Path) -> Path:
    return root / "digits" / "versions" / "v0001"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "index.faiss").write_bytes(b"garbage"), "index.faiss"),
        (lambda d: (d / "ids.parquet").unlink(), "ids.parquet is missing"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda d: (d / "vectors" / "00001.npy").write_bytes(b"\x93NUMPY trunc"), "00001.npy"),
        (lambda d: (d / "vectors" / "00002.npy").unlink(), "00002.npy is missing"),
        (lambda d: (d / "records.sqlite").unlink(), "records.sqlite is missing"),
        (lambda d: (d / "deleted.npy").write_bytes(b"\x00" * 3), "deleted.npy"),
    ],
    ids=["faiss", "ids", "manifest-json", "manifest-missing", "shard-truncated", "shard-missing",
         "records", "tombstones"],
)
def test_corrupt_or_missing_files(fresh_root: Path, damage, message: str) -> None:
    damage(version_dir(fresh_root))
    with pytest.raises(IndexCorruptError, match=message) as info:
        AttributionIndex.open("digits", root=fresh_root)
    assert "rebuild" in str(info.value) or "incomplete" in str(info.value)


def test_verify_detects_a_changed_vector(fresh_root: Path) -> None:
    path = version_dir(fresh_root) / "vectors" / "00000.npy"
    array = np.load(path)
    array[0, 0] += 1.0
    np.save(path, array)  # same size: only the checksum tells
    index = AttributionIndex.open("digits", root=fresh_root)
    with pytest.raises(IndexCorruptError, match="sha256"):
        index.verify()


def test_corrupt_state_file(fresh_root: Path, setup: Setup) -> None:
    path = version_dir(fresh_root) / "state.safetensors"
    size = path.stat().st_size
    path.write_bytes(b"x" * size)  # same size, unreadable
    index = AttributionIndex.open("digits", root=fresh_root)
    with pytest.raises(IndexCorruptError, match="state.safetensors"):
        index.query_vectors(setup.test)


def test_manifest_copied_from_another_index(fresh_root: Path, setup: Setup, tmp_path: Path) -> None:
    other = build_index(setup.card, setup.corpus, name="other", root=fresh_root, method="graddot",
                        method_args={"proj_dim": 16}, shard_size=240, dtype="float32",
                        show_progress=False, self_influence=False, recall_queries=20)
    shutil.copy(other.path / "manifest.json", version_dir(fresh_root) / "manifest.json")
    with pytest.raises(IndexMismatchError, match="belongs to index 'other'"):
        AttributionIndex.open("digits", root=fresh_root)


def test_manifest_from_another_version(fresh_root: Path) -> None:
    path = version_dir(fresh_root) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["version"] = "v0007"
    path.write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="copied from another index version"):
        AttributionIndex.open("digits", root=fresh_root)


def test_index_for_another_model(fresh_root: Path, setup: Setup, tmp_path: Path) -> None:
    index = AttributionIndex.open("digits", root=fresh_root)
    with pytest.raises(IndexMismatchError, match="built for model"):
        AttributionIndex.open("digits", root=fresh_root, expect_model_sha256="0" * 64)
    # the checkpoint on disk changes after the build: queries refuse to use it
    card = index.card
    path = Path(card.checkpoints[1].path)
    backup = tmp_path / "backup.safetensors"
    shutil.copy(path, backup)
    try:
        state = load_file(str(path))
        state = {k: v * 1.01 for k, v in state.items()}
        save_file(state, str(path))
        with pytest.raises(IndexMismatchError, match="ckpt-1.safetensors"):
            AttributionIndex.open("digits", root=fresh_root).query_vectors(setup.test)
    finally:
        shutil.copy(backup, path)


def test_dimension_mismatch(fresh_root: Path) -> None:
    index = AttributionIndex.open("digits", root=fresh_root)
    with pytest.raises(IndexMismatchError, match="dim 128"):
        index.topk(np.ones((2, 64), np.float32), k=3)
    with pytest.raises(IndexMismatchError, match="dim 128"):
        index.scores_for(np.ones(127, np.float32), ["d-0000"])
    with pytest.raises(IndexerError, match="NaN"):
        index.topk(np.full(128, np.nan, np.float32))
    with pytest.raises(IndexMismatchError, match="64 input values"):
        index.examples(np.ones((1, 10)), [1])


def test_faiss_file_from_another_build(fresh_root: Path, setup: Setup) -> None:
    other = build_index(setup.card, setup.corpus, name="other", root=fresh_root, method="graddot",
                        method_args={"proj_dim": 16}, shard_size=240, dtype="float32",
                        show_progress=False, self_influence=False, recall_queries=20)
    target = version_dir(fresh_root) / "index.faiss"
    shutil.copy(other.path / "index.faiss", target)
    manifest = json.loads((version_dir(fresh_root) / "manifest.json").read_text())
    manifest["files"]["index.faiss"]["bytes"] = target.stat().st_size  # hide the size change
    (version_dir(fresh_root) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match="dim 16"):
        AttributionIndex.open("digits", root=fresh_root)


def test_not_found(fresh_root: Path) -> None:
    with pytest.raises(IndexNotFoundError, match="no index named 'nope'"):
        AttributionIndex.open("nope", root=fresh_root)
    with pytest.raises(IndexNotFoundError, match="no version v0009"):
        AttributionIndex.open("digits", root=fresh_root, version="v0009")
    with pytest.raises(IndexerError, match="not allowed"):
        AttributionIndex.open("../digits", root=fresh_root)
    (fresh_root / "digits" / "current").unlink()
    with pytest.raises(IndexNotFoundError, match="no published version"):
        AttributionIndex.open("digits", root=fresh_root)


def test_bad_build_requests(setup: Setup, tmp_path: Path) -> None:
    common = {"name": "x", "root": tmp_path, "show_progress": False}
    with pytest.raises(IndexerError, match="cannot be indexed"):
        build_index(setup.card, setup.corpus, method="influence", method_args={"solver": "cg"}, **common)
    with pytest.raises(IndexerError, match="unknown method"):
        build_index(setup.card, setup.corpus, method="shapley", **common)
    with pytest.raises(IndexerError, match="proj_dim"):
        build_index(setup.card, setup.corpus, method_args={"proj_dim": -3}, **common)
    with pytest.raises(IndexerError, match="dtype"):
        build_index(setup.card, setup.corpus, dtype="int8", **common)
    with pytest.raises(IndexerError, match="unknown parameters"):
        build_index(setup.card, setup.corpus, index_kind="hnsw", index_params={"nlist": 3}, **common)
    with pytest.raises(IndexerError, match="outside the data root"):
        build_index(setup.card, setup.corpus, data_root=tmp_path, **common)
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").rglob("*.npy"))


def test_engine_featurizing_differently_is_caught(fresh_root: Path, setup: Setup, monkeypatch) -> None:
    """Another projection (e.g. a changed attribution version) must not score silently."""
    import attribution.methods.base as base

    original = base.derive_seed
    monkeypatch.setattr(base, "derive_seed", lambda seed, *parts: original(seed + 1, *parts))
    with pytest.raises(IndexMismatchError, match="featurizes queries differently"):
        AttributionIndex.open("digits", root=fresh_root).query_vectors(setup.test)
    # the same build request no longer matches the published plan: it builds anew
    rebuilt = build_index(setup.card, setup.corpus, name="digits", root=fresh_root,
                          method_args={"proj_dim": 64}, shard_size=100, dtype="float32",
                          show_progress=False, recall_queries=50)
    assert not rebuilt.reused and rebuilt.version == "v0002"
    monkeypatch.setattr(base, "derive_seed", original)
    old = AttributionIndex.open("digits", root=fresh_root, version="v0001")
    assert old.query_vectors(setup.test).shape == (20, 128)
    with pytest.raises(IndexMismatchError, match="featurizes queries differently"):
        AttributionIndex.open("digits", root=fresh_root).query_vectors(setup.test)
