"""Group attribution: score named groups of training records for each query ("which source
contributed most?").

A group is an explicit id list, every record with a given class label, or every record whose
metadata field has a given value; ``by=<field>`` makes one group per distinct value (``by="label"``
one per class). With sᵢ = ⟨query, train(i)⟩ over the group's members, a group scores

* ``sum``       Σᵢ sᵢ — the group effect: every method's linear prediction of removing the group;
* ``mean``      Σᵢ sᵢ / |group|;
* ``attention`` Σᵢ aᵢ sᵢ with a = softmax(|s|) — AirRep's pooling
  (:func:`attribution.methods.airrep.group_score`), the default for AirRep indexes.

A one-member group scores sᵢ under every pooling. Members come from the index's live records;
their vectors are the stored train vectors, so the scores equal those of ``scores_for``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import weakref
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import IndexerError
from indexer.store import load_labels

POOLINGS = ("attention", "sum", "mean")
LABEL = "label"  # the pseudo-field naming class labels (stored with the index: labels.npy)
_BLOCK_ROWS = 16384


@dataclass(frozen=True)
class GroupSpec:
    """One group as asked for: ``ids``, or ``label``, or ``field`` = ``value`` (exactly one)."""

    name: str
    ids: tuple[str, ...] | None = None
    label: Any = None
    field: str | None = None
    value: Any = None


@dataclass
class Group:
    """A resolved group: its name, how it was selected, and its members' rows in the index."""

    name: str
    kind: str  # "ids", "label" or "field"
    rows: np.ndarray  # int64, unique, ascending
    value: Any = None

    @property
    def size(self) -> int:
        return int(len(self.rows))


@dataclass
class GroupScores:
    """``scores[j, g]``: group g's pooled score for query j."""

    groups: list[Group]
    scores: np.ndarray  # (n_queries, n_groups) float64
    pooling: str

    def ranked(self, query: int, k: int | None = None) -> list[dict[str, Any]]:
        """Query ``query``'s groups, highest score first (ties by name): name, score, rank, size."""
        row = self.scores[query]
        order = sorted(range(len(self.groups)), key=lambda g: (-row[g], self.groups[g].name))
        return [{"name": self.groups[g].name, "score": float(row[g]), "rank": r + 1,
                 "size": self.groups[g].size, "pooling": self.pooling}
                for r, g in enumerate(order[:k])]


def default_pooling(index: Any) -> str:
    """``attention`` for AirRep indexes (the pooling it is trained with), ``sum`` otherwise."""
    return "attention" if index.manifest["method"]["name"] == "airrep" else "sum"


# --- resolving groups ----------------------------------------------------------------------------
def resolve(index: Any, specs: list[GroupSpec] | None = None, by: str | None = None
            ) -> list[Group]:
    """Groups of live rows from explicit specs, or one group per distinct value of ``by``.

    Raises :class:`IndexerError` for: neither or both of specs/``by``, duplicate names, an empty
    group, ids not in the index, an unknown metadata field, or a value no record has.
    """
    if (specs is None) == (by is None):
        raise IndexerError("give either a list of groups or 'by' (a metadata field or 'label')")
    catalog = _catalog(index)
    if by is not None:
        kind = "label" if by == LABEL else "field"
        pairs = [(json.loads(key), rows) for key, rows in catalog.values(by).items()]
        return sorted((Group(_name(v), kind, rows, v) for v, rows in pairs), key=lambda g: g.name)
    if not specs:
        raise IndexerError("the list of groups is empty: name at least one group")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise IndexerError(f"group names must be unique; repeated: {dupes[:5]}")
    return [_resolve_one(index, catalog, spec) for spec in specs]


def _resolve_one(index: Any, catalog: _Catalog, spec: GroupSpec) -> Group:
    chosen = [spec.ids is not None, spec.label is not None, spec.field is not None]
    if sum(chosen) != 1:
        raise IndexerError(f"group {spec.name!r}: give exactly one of 'ids', 'label' or "
                           "'field' (with 'value')")
    if spec.ids is not None:
        if not spec.ids:
            raise IndexerError(f"group {spec.name!r} is empty: list at least one record id")
        try:
            rows = index.rows_of(list(spec.ids))
        except IndexerError as err:
            raise IndexerError(f"group {spec.name!r}: {err}") from None
        return Group(spec.name, "ids", np.unique(rows))
    field, value = (LABEL, spec.label) if spec.label is not None else (spec.field, spec.value)
    rows = catalog.values(field).get(_key(value))
    if rows is None:
        raise IndexerError(f"group {spec.name!r} is empty: no live record has {field} = "
                           f"{json.dumps(value)} in index {index.name}")
    return Group(spec.name, "label" if field == LABEL else "field", rows, value)


def _key(value: Any) -> str:
    """A canonical JSON key: 3 and 3.0 match, as they do in the corpus's JSON metadata."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True)


def _name(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class _Catalog:
    """Per open index: field → {value key → live rows}, built on first use of each field."""

    def __init__(self, index: Any) -> None:
        self.index = weakref.proxy(index)
        self._fields: dict[str, dict[str, np.ndarray]] = {}
        self._metadata: dict[str, dict[str, list[int]]] | None = None
        self._lock = threading.Lock()

    def values(self, field: str) -> dict[str, np.ndarray]:
        with self._lock:
            if field not in self._fields:
                self._fields[field] = self._labels() if field == LABEL else self._field(field)
            return self._fields[field]

    def _field(self, field: str) -> dict[str, np.ndarray]:
        if self._metadata is None:
            self._metadata = _read_metadata(self.index.path / "records.sqlite", self.index.live)
        if field not in self._metadata:
            known = sorted(self._metadata) + [LABEL]
            raise IndexerError(f"unknown metadata field {field!r} in index {self.index.name}; "
                               f"the records have {known}")
        return {k: np.asarray(sorted(v), np.int64) for k, v in self._metadata[field].items()}

    def _labels(self) -> dict[str, np.ndarray]:
        _check_classification(self.index)
        stored = load_labels(self.index.path)
        if stored is not None and len(stored) == len(self.index.row_ids):
            rows = np.flatnonzero(self.index.live)
            values = stored[rows].tolist()
        else:  # a version built before labels were stored: read them from the corpus files
            labels = record_labels(self.index)
            rows, values = self.index.rows_of(list(labels)), list(labels.values())
        found: dict[str, list[int]] = defaultdict(list)
        for row, label in zip(rows.tolist(), values, strict=True):
            found[_key(label)].append(row)
        return {k: np.asarray(sorted(v), np.int64) for k, v in found.items()}


_CATALOGS: weakref.WeakKeyDictionary[Any, _Catalog] = weakref.WeakKeyDictionary()
_CATALOGS_LOCK = threading.Lock()


def _catalog(index: Any) -> _Catalog:
    with _CATALOGS_LOCK:
        if index not in _CATALOGS:
            _CATALOGS[index] = _Catalog(index)
        return _CATALOGS[index]


def _read_metadata(path: Path, live: np.ndarray) -> dict[str, dict[str, list[int]]]:
    """field → value key → rows, over every live record's metadata."""
    from indexer.errors import IndexCorruptError

    fields: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        try:
            for row, meta in connection.execute("SELECT row, metadata FROM records"):
                if row < len(live) and live[row]:
                    for field, value in json.loads(meta).items():
                        fields[field][_key(value)].append(int(row))
        finally:
            connection.close()
    except sqlite3.DatabaseError as err:
        raise IndexCorruptError(f"metadata store {path} is unreadable ({err}); rebuild the index"
                                ) from err
    return fields


def _check_classification(index: Any) -> None:
    if index.manifest["model"]["task"] != "classification":
        raise IndexerError(f"label groups need a classification index; {index.name} is "
                           f"{index.manifest['model']['task']}: group by a metadata field")


def record_labels(index: Any) -> dict[str, Any]:
    """id → class label of every live record, for versions without ``labels.npy``: read from
    the corpora the index was built and extended from; each file must still match its sha256."""
    from indexer.corpus import FORMATS, _read_jsonl, _read_npz, _read_parquet
    from indexer.paths import sha256_file

    _check_classification(index)
    sources = [(index.manifest["corpus"]["path"], index.manifest["corpus"]["sha256"])]
    sources += [(h["corpus"], h["corpus_sha256"]) for h in index.manifest.get("history", [])
                if h.get("op") == "add" and h.get("corpus")]
    readers = {"parquet": _read_parquet, "jsonl": _read_jsonl, "npz": _read_npz}
    labels: dict[str, Any] = {}
    for path, digest in sources:
        file = Path(path)
        if not file.is_file() or sha256_file(file) != digest:
            raise IndexerError(f"label groups read labels from the corpus {path} the index was "
                               "built from, but it is missing or changed; restore it, or group "
                               "by a metadata field or an id list")
        table = readers[FORMATS[file.suffix.lower()]](file)
        labels.update(zip((str(i) for i in table.column("id").to_pylist()),
                          table.column(LABEL).to_pylist(), strict=True))
    live = set(index.ids.tolist())
    return {i: v for i, v in labels.items() if i in live}


# --- scoring -------------------------------------------------------------------------------------
def score(index: Any, queries: np.ndarray, groups: list[Group], pooling: str | None = None
          ) -> GroupScores:
    """Pooled score of every group for every query vector (see the module docstring)."""
    pooling = pooling or default_pooling(index)
    if pooling not in POOLINGS:
        raise IndexerError(f"pooling must be one of {list(POOLINGS)}, not {pooling!r}")
    if not groups:
        raise IndexerError("no groups to score")
    q = index._queries(queries).astype(np.float64)
    members = np.concatenate([g.rows for g in groups])
    unique, inverse = np.unique(members, return_inverse=True)
    s = np.empty((len(q), len(unique)))
    for start in range(0, len(unique), _BLOCK_ROWS):
        block = unique[start:start + _BLOCK_ROWS]
        s[:, start:start + len(block)] = q @ index.store.gather(block).astype(np.float64).T
    return GroupScores(groups, pool(s[:, inverse], [g.size for g in groups], pooling), pooling)


def pool(s: np.ndarray, sizes: list[int], pooling: str) -> np.ndarray:
    """Reduce member scores ``s`` (q, Σ sizes), laid out group after group, to (q, n_groups)."""
    sizes_ = np.asarray(sizes, np.int64)
    if (sizes_ < 1).any():
        raise IndexerError("every group needs at least one member")
    starts = np.concatenate([[0], np.cumsum(sizes_)[:-1]])
    if pooling == "sum":
        return np.add.reduceat(s, starts, axis=1)
    if pooling == "mean":
        return np.add.reduceat(s, starts, axis=1) / sizes_
    magnitude = np.abs(s)  # attention: softmax over the group of |s|, stabilised by its maximum
    peak = np.repeat(np.maximum.reduceat(magnitude, starts, axis=1), sizes_, axis=1)
    weights = np.exp(magnitude - peak)
    return np.add.reduceat(weights * s, starts, axis=1) / np.add.reduceat(weights, starts, axis=1)
