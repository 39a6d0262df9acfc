"""Files of one index version besides FAISS: vector shards, row ids, tombstones, metadata.

* ``vectors/<shard>.npy`` — train-side vectors, rows in global order, memory-mapped on read;
* ``ids.parquet`` — the id of every row ever stored (row numbers never change);
* ``deleted.npy`` — tombstones, one bool per row;
* ``self_influence.npy`` — ⟨query(i), train(i)⟩ per row (float32), when computed;
* ``records.sqlite`` — metadata of live records, looked up by id;
* ``labels.npy`` — the class label / regression target of every row (one-number targets only),
  so label groups never need the corpus files again (older versions lack it).

Files are immutable once a version is published; a new version hard-links the ones it keeps.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attribution.storage import power_of_two_scale
from indexer.errors import IndexCorruptError, IndexerError


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write an array via a temporary file and an atomic rename (a crash leaves no half file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)


def load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """Read an ``.npy`` written by :func:`save_npy`; a clear error when missing or truncated."""
    if not path.is_file():
        raise IndexCorruptError(f"{path} is missing; the index version is incomplete — rebuild it")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise IndexCorruptError(f"{path} is corrupt ({err}); rebuild the index") from err


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link an immutable file into a new version (copy across filesystems)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def to_float32(array: np.ndarray) -> np.ndarray:
    """float32 copy of an array; fp16 goes through torch (numpy's cast is ~10× slower)."""
    if array.dtype != np.float16:
        return np.asarray(array, dtype=np.float32)
    import torch

    with warnings.catch_warnings():  # read-only memmaps: torch only reads them here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(array)).float().numpy()


def choose_scale(vectors: np.ndarray) -> float:
    """A power of two for float16 shards (see :func:`attribution.storage.power_of_two_scale`)."""
    return power_of_two_scale(vectors)


def quantize(vectors: np.ndarray, dtype: str, scale: float) -> np.ndarray:
    """Stored form of float32 vectors: ``vectors × scale`` in ``dtype``; refuses overflow."""
    if dtype == "float32":
        return np.asarray(vectors, dtype=np.float32)
    stored = (np.asarray(vectors, dtype=np.float32) * np.float32(scale)).astype(np.float16)
    if not np.isfinite(stored).all():
        raise IndexerError(
            f"train vectors exceed the float16 range at this index's scale {scale:g} (their "
            "magnitude grew by more than 2000×); rebuild the index, or use dtype='float32'"
        )
    return stored


class VectorStore:
    """Read-only view of the vector shards of a version, as one (rows × dim) matrix.

    Shards hold ``vector × scale`` (``scale`` is a power of two, 1 for float32); ``gather`` and
    ``blocks`` return true values unless ``raw`` (what FAISS indexes: rankings are unchanged).
    """

    def __init__(self, directory: Path, shards: Sequence[dict[str, Any]], dim: int, dtype: str,
                 scale: float = 1.0) -> None:
        self.scale = float(scale)
        self.shards = []
        self.offsets = []
        offset = 0
        for shard in shards:
            path = directory / shard["file"]
            array = load_npy(path)
            if array.ndim != 2 or array.shape != (shard["rows"], dim) or str(array.dtype) != dtype:
                raise IndexCorruptError(
                    f"{path} holds {array.shape} {array.dtype}, but the manifest says "
                    f"({shard['rows']}, {dim}) {dtype}; the files are inconsistent — rebuild the index"
                )
            self.shards.append(array)
            self.offsets.append(offset)
            offset += shard["rows"]
        self.rows = offset
        self.dim = dim
        self._ends = np.asarray([o + len(a) for o, a in zip(self.offsets, self.shards, strict=True)])

    def gather(self, rows: np.ndarray, raw: bool = False) -> np.ndarray:
        """float32 vectors of the given rows, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        which = np.searchsorted(self._ends, rows, side="right")
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.shards[s][rows[mask] - self.offsets[s]]
        if not raw and self.scale != 1.0:
            out /= np.float32(self.scale)
        return out

    def blocks(self, live: np.ndarray | None = None, block_rows: int = 65536, raw: bool = False
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, float32 vectors) blocks in row order, skipping rows where ``live`` is False."""
        for offset, shard in zip(self.offsets, self.shards, strict=True):
            for start in range(0, len(shard), block_rows):
                rows = np.arange(offset + start, offset + min(start + block_rows, len(shard)))
                block = shard[start : start + block_rows]
                if live is not None:
                    keep = live[rows]
                    if not keep.all():
                        rows, block = rows[keep], block[keep]
                if len(rows):
                    values = to_float32(block)
                    if not raw and self.scale != 1.0:
                        values = values / np.float32(self.scale)
                    yield rows, values


# --- labels / targets ---------------------------------------------------------------------------
LABELS = "labels.npy"


def save_labels(directory: Path, targets: np.ndarray, base: Path | None = None) -> None:
    """Write ``labels.npy`` (row order) for one-number targets; with ``base``, append ``targets``
    to the base version's labels, and write nothing when the base has none (an old index)."""
    targets = np.asarray(targets)
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.number):
        return  # causal-LM token labels: nothing to group by
    if base is not None:
        if not (base / LABELS).is_file():
            return
        targets = np.concatenate([np.asarray(load_npy(base / LABELS)), targets])
    save_npy(directory / LABELS, targets)


def load_labels(directory: Path) -> np.ndarray | None:
    """The stored label of every row, or None for versions built before labels were stored."""
    return np.asarray(load_npy(directory / LABELS)) if (directory / LABELS).is_file() else None


# --- ids ----------------------------------------------------------------------------------------
def save_ids(path: Path, ids: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.table({"id": pa.array(ids.tolist(), pa.string())}), tmp)
    os.replace(tmp, path)


def load_ids(path: Path) -> np.ndarray:
    if not path.is_file():
        raise IndexCorruptError(f"{path} is missing; the index version is incomplete — rebuild it")
    try:
        column = pq.read_table(path, columns=["id"]).column("id")
    except (pa.ArrowException, OSError, KeyError) as err:
        raise IndexCorruptError(f"{path} is corrupt ({err}); rebuild the index") from err
    return np.asarray(column.to_pylist(), dtype=object)


# --- metadata (SQLite) ---------------------------------------------------------------------------
def write_records(path: Path, rows: np.ndarray, ids: np.ndarray, metadata: pa.Table,
                  base: Path | None = None, drop_ids: Sequence[str] = ()) -> None:
    """Create ``path`` (optionally from a copy of ``base``) and insert the given records."""
    if base is not None:
        shutil.copyfile(base, path)
    connection = sqlite3.connect(path)
    try:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS records (id TEXT PRIMARY KEY, row INTEGER NOT NULL, "
            "metadata TEXT NOT NULL)"
        )
        if drop_ids:
            connection.executemany("DELETE FROM records WHERE id = ?", [(i,) for i in drop_ids])
        columns = metadata.column_names
        values = [metadata.column(c).to_pylist() for c in columns]
        connection.executemany(
            "INSERT INTO records (id, row, metadata) VALUES (?, ?, ?)",
            (
                (str(ids[j]), int(rows[j]),
                 json.dumps({c: values[k][j] for k, c in enumerate(columns)}, default=str))
                for j in range(len(ids))
            ),
        )
        connection.commit()
    finally:
        connection.close()


class RecordStore:
    """Read-only metadata lookup by id."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise IndexCorruptError(f"{path} is missing; the index version is incomplete — rebuild it")
        self.path = path
        self._connection: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            uri = f"file:{self.path}?mode=ro&immutable=1"
            self._connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
        return self._connection

    def get(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Metadata of the known ids (unknown ids are absent from the result)."""
        found: dict[str, dict[str, Any]] = {}
        ids = [str(i) for i in ids]
        try:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for rid, meta in self._db().execute(
                    f"SELECT id, metadata FROM records WHERE id IN ({marks})", chunk
                ):
                    found[rid] = json.loads(meta)
        except sqlite3.DatabaseError as err:
            raise IndexCorruptError(f"metadata store {self.path} is corrupt ({err}); rebuild the index") from err
        return found

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def check_ids_known(requested: Sequence[str], lookup: dict[str, int]) -> np.ndarray:
    """Rows of ``requested`` ids; raise naming the unknown ones."""
    missing = [i for i in requested if str(i) not in lookup]
    if missing:
        raise IndexerError(
            f"{len(missing)} id(s) are not in the index (or were deleted), e.g. {missing[:5]}"
        )
    return np.asarray([lookup[str(i)] for i in requested], dtype=np.int64)
