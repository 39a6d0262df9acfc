"""Add and delete records without a full rebuild; each update publishes a new version.

* **add**: the new records are featurized with the saved method state (TRAK keeps its
  preconditioner, fitted on the original rows), appended as new shards with new row numbers,
  and added to the FAISS index (IVF keeps its trained partition).
* **delete**: rows get tombstones; IVF removes them in place, flat and HNSW are rebuilt from the
  live vectors. Row numbers and ids of untouched records never change.

Unchanged files are hard-linked from the previous version, which keeps serving until ``current``
moves. The drift from the fitted state is recorded and ``info`` advises a rebuild past 20 %.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from indexer import faiss_index
from indexer.build import (
    Progress,
    _iso,
    _remove_if_empty,
    check_examples,
    drift,
    featurize_shards,
    file_digests,
    finish_faiss,
    read_corpus,
    shard_bounds,
    transform_shards,
)
from indexer.errors import IndexerError
from indexer.index import AttributionIndex
from indexer.layout import index_dir, locked, publish, write_current, write_manifest
from indexer.store import (
    LABELS,
    VectorStore,
    link_or_copy,
    load_npy,
    save_ids,
    save_labels,
    save_npy,
    write_records,
)
from indexer.verbatim import add_corpus_verbatim


def _index_root(index: str | Path, root: str | Path | None) -> Path:
    candidate = Path(index)
    if (candidate / "versions").is_dir() or (candidate / "current").exists():
        return candidate
    if root is None:
        raise IndexerError(f"no index at {index}; give the index directory, or a name and root")
    return index_dir(Path(root), str(index))


def _start_version(base: AttributionIndex, out: Path) -> None:
    """Hard-link the immutable files an update keeps into a fresh version directory."""
    if out.exists():
        shutil.rmtree(out)
    (out / "vectors").mkdir(parents=True)
    (out / "self_influence").mkdir()
    for shard in base.manifest["shards"]:
        link_or_copy(base.path / shard["file"], out / shard["file"])
        si = base.path / "self_influence" / Path(shard["file"]).name
        if si.is_file():
            link_or_copy(si, out / "self_influence" / si.name)
    for name in ("state.safetensors", "recall_queries.npy", "scale.json", "probe.npz", LABELS):
        if (base.path / name).is_file():
            link_or_copy(base.path / name, out / name)
    if (base.path / "verbatim").is_dir():  # provenance spans; deleted ids are filtered on query
        for file in (base.path / "verbatim").rglob("*"):  # added shards are subdirectories
            if file.is_file():
                target = out / "verbatim" / file.relative_to(base.path / "verbatim")
                target.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(file, target)


def add_records(
    index: str | Path,
    corpus_path: str | Path,
    *,
    root: str | Path | None = None,
    data_root: str | Path | None = None,
    shard_size: int | None = None,
    show_progress: bool = True,
    progress: Progress | None = None,
) -> AttributionIndex:
    """Featurize the records of ``corpus_path`` with the saved state and publish them.

    Ids already live in the index are refused (delete them first to replace them); the
    corpus must fit the model the index was built for.
    """
    directory = _index_root(index, root)
    with locked(directory):
        base = AttributionIndex.open(directory, lazy=True)
        manifest = json.loads(json.dumps(base.manifest))
        corpus = read_corpus(corpus_path, base.card, Path(data_root) if data_root else None)
        clash = sorted(set(corpus.ids.tolist()) & set(base.ids.tolist()))
        if clash:
            raise IndexerError(
                f"{len(clash)} id(s) of {corpus_path} are already in index {base.name}, e.g. "
                f"{clash[:5]}; ids are stable — delete those records first to replace them"
            )
        method = base.method()
        check_examples(method.task, corpus)
        key = hashlib.sha256(f"add:{base.version}:{corpus.fingerprint}".encode()).hexdigest()[:24]
        staging = directory / "staging" / f"add-{key}"
        out = staging / "version"
        bounds = shard_bounds(len(corpus), shard_size or manifest["shard_size"])
        started = time.time()
        featurize_shards(method, corpus, bounds, staging / "raw", show_progress, progress)
        _start_version(base, out)
        first = len(manifest["shards"])
        shards, _ = transform_shards(method, corpus, bounds, staging / "raw", out, first, base.dtype,
                                     manifest["self_influence"], show_progress, progress,
                                     scale=base.store.scale)
        if shards and shards[0]["dim"] != base.dim:
            raise IndexerError(f"new vectors have dim {shards[0]['dim']}, the index {base.dim}")
        n0, m = manifest["counts"]["rows"], len(corpus)
        new_rows = np.arange(n0, n0 + m)
        save_ids(out / "ids.parquet", np.concatenate([base.row_ids, corpus.ids]))
        save_labels(out, corpus.y, base=base.path)
        deleted = np.concatenate([base.deleted, np.zeros(m, bool)])
        save_npy(out / "deleted.npy", deleted)
        write_records(out / "records.sqlite", new_rows, corpus.ids, corpus.metadata,
                      base=base.path / "records.sqlite")
        manifest["shards"] += [{k: s[k] for k in ("file", "rows", "sha256")} for s in shards]
        if manifest.get("verbatim") and "texts" in corpus.extra:  # spans for the new documents
            manifest["verbatim"] = add_corpus_verbatim(
                out / "verbatim", corpus.ids.tolist(), corpus.extra["texts"],
                corpus.metadata.to_pylist(), manifest["verbatim"])
        store = VectorStore(out, manifest["shards"], base.dim, base.dtype, base.store.scale)
        spec = faiss_index.IndexSpec(base.spec.kind, dict(base.spec.params))
        cpu_index = faiss_index.load(base.path / "index.faiss", spec, base.dim, base.size)
        added = store.blocks(np.isin(np.arange(n0 + m), new_rows), raw=True)
        t0 = time.time()
        cpu_index, labels = faiss_index.add(cpu_index, spec, added, base.labels)
        manifest["counts"].update(rows=n0 + m, live=int((~deleted).sum()),
                                  added=manifest["counts"]["added"] + m)
        history = {"op": "add", "rows": m, "corpus_sha256": corpus.fingerprint,
                   "corpus": str(corpus.path), "seconds": round(time.time() - started, 3)}
        return _finish(directory, base, manifest, out, staging, store, ~deleted, cpu_index, labels,
                       spec, history, time.time() - t0, added=m, deleted=0)


def delete_records(
    index: str | Path,
    ids: list[str],
    *,
    root: str | Path | None = None,
) -> AttributionIndex:
    """Tombstone the records with ``ids`` and publish the new version.

    Unknown or already deleted ids raise :class:`IndexerError` and change nothing.
    """
    directory = _index_root(index, root)
    if not ids:
        raise IndexerError("give at least one id to delete")
    with locked(directory):
        base = AttributionIndex.open(directory, lazy=True)
        manifest = json.loads(json.dumps(base.manifest))
        rows = np.unique(base.rows_of(list(dict.fromkeys(str(i) for i in ids))))
        key = hashlib.sha256(f"delete:{base.version}:{rows.tobytes().hex()}".encode()).hexdigest()[:24]
        staging = directory / "staging" / f"delete-{key}"
        out = staging / "version"
        _start_version(base, out)
        link_or_copy(base.path / "ids.parquet", out / "ids.parquet")
        deleted = base.deleted.copy()
        deleted[rows] = True
        save_npy(out / "deleted.npy", deleted)
        write_records(out / "records.sqlite", np.zeros(0, np.int64), np.zeros(0, object),
                      _empty_table(), base=base.path / "records.sqlite",
                      drop_ids=base.row_ids[rows].tolist())
        store = VectorStore(out, manifest["shards"], base.dim, base.dtype, base.store.scale)
        spec = faiss_index.IndexSpec(base.spec.kind, dict(base.spec.params))
        cpu_index = faiss_index.load(base.path / "index.faiss", spec, base.dim, base.size)
        t0 = time.time()
        cpu_index, labels = faiss_index.remove(cpu_index, spec, rows, lambda: store.blocks(~deleted, raw=True), base.dim)
        manifest["counts"].update(live=int((~deleted).sum()),
                                  deleted=manifest["counts"]["deleted"] + len(rows))
        history = {"op": "delete", "rows": int(len(rows)), "ids": base.row_ids[rows][:20].tolist()}
        return _finish(directory, base, manifest, out, staging, store, ~deleted, cpu_index, labels,
                       spec, history, time.time() - t0, added=0, deleted=len(rows))


def rebuild_faiss(
    index: str | Path,
    kind: str = "auto",
    params: dict[str, Any] | None = None,
    *,
    root: str | Path | None = None,
    recall_target: float | None = None,
    flat_threshold: int = faiss_index.FLAT_THRESHOLD,
) -> AttributionIndex:
    """Rebuild only the FAISS part (another kind or parameters, or a fresh IVF partition after
    many adds) over the stored vectors; publishes a new version with the same vectors."""
    from indexer.build import build_faiss

    directory = _index_root(index, root)
    faiss_index.check_kind(kind, params)
    with locked(directory):
        base = AttributionIndex.open(directory, lazy=True)
        manifest = json.loads(json.dumps(base.manifest))
        key = hashlib.sha256(f"faiss:{base.version}:{kind}:{params}".encode()).hexdigest()[:24]
        staging = directory / "staging" / f"faiss-{key}"
        out = staging / "version"
        _start_version(base, out)
        for name in ("ids.parquet", "deleted.npy", "records.sqlite"):
            link_or_copy(base.path / name, out / name)
        store = VectorStore(out, manifest["shards"], base.dim, base.dtype, base.store.scale)
        target = recall_target or manifest["faiss"].get("recall_target", 0.95)
        queries = np.asarray(load_npy(out / "recall_queries.npy"))
        manifest["faiss"] = build_faiss(out, store, base.live, queries, kind, params, target, flat_threshold)
        manifest["history"].append({"op": "reindex", "at": _iso(time.time()), "base": base.version,
                                    "kind": manifest["faiss"]["kind"], "params": manifest["faiss"]["params"]})
        return _publish(directory, base, manifest, out, staging)


def retune(
    index: str | Path,
    recall_target: float | None = None,
    *,
    root: str | Path | None = None,
) -> AttributionIndex:
    """Re-measure recall and re-choose nprobe / efSearch of the current FAISS index (no
    rebuild), e.g. for another recall target; publishes a new version."""
    directory = _index_root(index, root)
    with locked(directory):
        base = AttributionIndex.open(directory, lazy=True)
        manifest = json.loads(json.dumps(base.manifest))
        target = recall_target or manifest["faiss"].get("recall_target", 0.95)
        if not 0 < target <= 1:
            raise IndexerError(f"recall_target must lie in (0, 1], got {target}")
        key = hashlib.sha256(f"tune:{base.version}:{target}".encode()).hexdigest()[:24]
        staging = directory / "staging" / f"tune-{key}"
        out = staging / "version"
        _start_version(base, out)
        for name in ("ids.parquet", "deleted.npy", "records.sqlite"):
            link_or_copy(base.path / name, out / name)
        store = VectorStore(out, manifest["shards"], base.dim, base.dtype, base.store.scale)
        spec = faiss_index.IndexSpec(base.spec.kind, dict(base.spec.params))
        cpu_index = faiss_index.load(base.path / "index.faiss", spec, base.dim, base.size)
        seconds = manifest["faiss"].get("build_seconds", 0.0)
        history = {"op": "retune", "recall_target": target}
        return _finish(directory, base, manifest, out, staging, store, base.live, cpu_index,
                       base.labels, spec, history, seconds, added=0, deleted=0, recall_target=target)


def prune_versions(index: str | Path, keep: int = 3, *, root: str | Path | None = None) -> list[str]:
    """Delete all but the newest ``keep`` versions (never the current one); returns the removed.

    Shared vector files survive through their hard links in the kept versions; a process still
    serving a removed version keeps its open files until it reopens.
    """
    from indexer.layout import read_current, versions

    if keep < 1:
        raise IndexerError(f"keep must be at least 1, got {keep}")
    directory = _index_root(index, root)
    with locked(directory):
        current = read_current(directory)
        published = versions(directory)
        removed = [v for v in published[:-keep] if v != current]
        for version in removed:
            shutil.rmtree(directory / "versions" / version)
        return removed


def _empty_table() -> Any:
    import pyarrow as pa

    return pa.table({})


def _finish(directory: Path, base: AttributionIndex, manifest: dict[str, Any], out: Path,
            staging: Path, store: VectorStore, live: np.ndarray, cpu_index: Any,
            labels: np.ndarray | None, spec: faiss_index.IndexSpec, history: dict[str, Any],
            seconds: float, added: int, deleted: int, recall_target: float | None = None
            ) -> AttributionIndex:
    """Re-measure recall, write the manifest, publish and point ``current`` at the new version."""
    faiss_entry = manifest["faiss"]
    queries = np.asarray(load_npy(out / "recall_queries.npy"))
    manifest["faiss"] = finish_faiss(out, cpu_index, labels, spec, store, live, queries,
                                     recall_target or faiss_entry.get("recall_target", 0.95),
                                     seconds, faiss_entry.get("user_params", {}))
    old = manifest["drift"]
    manifest["drift"] = drift(old["rows_at_fit"], old["added_since_fit"] + added,
                              old["deleted_since_fit"] + deleted)
    manifest["history"].append({**history, "at": _iso(time.time()), "base": base.version})
    return _publish(directory, base, manifest, out, staging)


def _publish(directory: Path, base: AttributionIndex, manifest: dict[str, Any], out: Path,
             staging: Path) -> AttributionIndex:
    """Write the manifest into ``out``, publish it as the next version, make it current."""
    manifest["version"] = None
    manifest["files"] = file_digests(out, manifest["self_influence"])
    write_manifest(out, manifest)
    version = publish(directory, out)
    write_current(directory, version)
    shutil.rmtree(staging, ignore_errors=True)
    _remove_if_empty(staging.parent)
    base.close()
    return AttributionIndex.open(directory / "versions" / version)
