"""Open a published index version and answer queries from it (read-only).

Every answer is an inner product with the stored train vectors: top-k proponents (highest
scores) and opponents (most negative, found by searching with the negated query), scores of
chosen records, self-influence ⟨query(i), train(i)⟩ and data value ⟨Σ_j query(v_j), train(i)⟩.
Candidates from FAISS are re-scored exactly from the stored vectors, so top-k scores equal
:meth:`AttributionIndex.scores_for` and the engine's ``score`` for the same data.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer import faiss_index
from indexer.cards import ModelCard, load_task, model_fingerprint
from indexer.errors import IndexCorruptError, IndexerError, IndexMismatchError
from indexer.layout import read_manifest, resolve_version
from indexer.paths import sha256_file
from indexer.probe import PROBE, check_probe
from indexer.store import RecordStore, VectorStore, check_ids_known, load_ids, load_npy


@dataclass
class TopK:
    """Top-k of a batch of queries: row ``j`` answers query ``j``; ranks start at 1.

    For opponents the scores are the actual (most negative) scores, most negative first.
    When fewer than ``k`` records are live, rows end with ``-1`` / NaN and shorter id lists.
    """

    ids: list[list[str]]
    scores: np.ndarray  # (q, k) float32
    ranks: np.ndarray  # (q, k) int32
    rows: np.ndarray  # (q, k) int64

    def hits(self, query: int) -> list[dict[str, Any]]:
        """The answer to one query as ``[{"id", "score", "rank"}, ...]``."""
        return [{"id": i, "score": float(s), "rank": int(r)}
                for i, s, r in zip(self.ids[query], self.scores[query], self.ranks[query], strict=False)]


class AttributionIndex:
    """A published index version: manifest, vectors, FAISS index, ids and metadata."""

    def __init__(self, directory: Path, manifest: dict[str, Any], lazy: bool = False) -> None:
        self.path = directory
        self.manifest = manifest
        self.name: str = manifest["name"]
        self.version: str = manifest["version"]
        self.dim: int = int(manifest["dim"])
        self.dtype: str = manifest["dtype"]
        self._check_files()
        self.store = VectorStore(directory, manifest["shards"], self.dim, self.dtype,
                                 float(manifest.get("scale", 1.0)))
        self.row_ids = load_ids(directory / "ids.parquet")
        self.deleted = np.asarray(load_npy(directory / "deleted.npy", mmap=False), dtype=bool)
        rows = manifest["counts"]["rows"]
        if len(self.row_ids) != rows or len(self.deleted) != rows or self.store.rows != rows:
            raise IndexCorruptError(
                f"{directory}: {len(self.row_ids)} ids, {len(self.deleted)} tombstones and "
                f"{self.store.rows} vectors, but the manifest counts {rows} rows — rebuild the index"
            )
        self.live = ~self.deleted
        self.spec = faiss_index.IndexSpec(manifest["faiss"]["kind"], dict(manifest["faiss"]["params"]))
        self._labels = (np.asarray(load_npy(directory / "faiss_labels.npy", mmap=False))
                        if manifest["faiss"].get("labels") else None)
        self._searchers: tuple[Any, Any] | None = None
        self._records = RecordStore(directory / "records.sqlite")
        self._lookup: dict[str, int] | None = None
        self._method: Any = None
        self._verbatim: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        # CPU FAISS searches are thread-safe; GPU resources are not
        self._search_lock = threading.Lock() if faiss_index.gpu_available() else nullcontext()
        if not lazy:
            self.searchers()

    def searchers(self) -> tuple[Any, Any]:
        """(search index — on the GPU when usable —, its CPU form); read on first use."""
        if self._searchers is None:
            with self._lock:
                if self._searchers is None:
                    cpu = faiss_index.load(self.path / "index.faiss", self.spec, self.dim, self.size)
                    device = faiss_index.for_search(cpu)
                    faiss_index.configure(device, self.spec)
                    self._searchers = (device, cpu)
        return self._searchers

    # --- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, path_or_name: str | Path, root: str | Path | None = None, *,
             version: str | None = None, expect_model_sha256: str | None = None,
             lazy: bool = False) -> AttributionIndex:
        """Open the current (or a given) version by index path, version path or name + root.

        The FAISS index is read (and checked) now, or on the first search when ``lazy``.
        Raises :class:`IndexNotFoundError`, :class:`IndexCorruptError` for missing or damaged
        files, and :class:`IndexMismatchError` when ``expect_model_sha256`` names another model.
        """
        directory = resolve_version(path_or_name, Path(root) if root is not None else None, version)
        manifest = read_manifest(directory)
        if expect_model_sha256 is not None and manifest["model"]["sha256"] != expect_model_sha256:
            raise IndexMismatchError(
                f"index {manifest['name']}@{manifest['version']} was built for model "
                f"{manifest['model']['sha256'][:12]}…, not {expect_model_sha256[:12]}…; "
                "rebuild the index for this model or query the model it was built for"
            )
        return cls(directory, manifest, lazy)

    def _check_files(self) -> None:
        for name, expected in self.manifest.get("files", {}).items():
            path = self.path / name
            if not path.is_file():
                raise IndexCorruptError(f"{path} is missing; the index version is incomplete — rebuild it")
            if path.stat().st_size != expected["bytes"]:
                raise IndexCorruptError(
                    f"{path} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}; "
                    "the file is truncated or replaced — rebuild the index"
                )

    def verify(self) -> None:
        """Check every file's sha256 against the manifest (reads all vectors)."""
        entries = dict(self.manifest.get("files", {}))
        entries.update({s["file"]: s for s in self.manifest["shards"]})
        for name, expected in entries.items():
            if sha256_file(self.path / name) != expected["sha256"]:
                raise IndexCorruptError(f"{self.path / name} does not match its sha256 in the manifest; rebuild the index")

    @property
    def labels(self) -> np.ndarray | None:
        """FAISS label → row (flat and HNSW; None for IVF, whose labels are rows)."""
        return self._labels

    # --- ids ---------------------------------------------------------------------------------
    @property
    def ids(self) -> np.ndarray:
        """Ids of the live records in row order (what self_influence and value align with)."""
        return self.row_ids[self.live]

    @property
    def size(self) -> int:
        return int(self.live.sum())

    def rows_of(self, ids: list[str] | np.ndarray) -> np.ndarray:
        """Row numbers of live ids; raises naming unknown or deleted ids."""
        if self._lookup is None:
            live_rows = np.flatnonzero(self.live)
            self._lookup = dict(zip(self.row_ids[live_rows].tolist(), live_rows.tolist(), strict=True))
        return check_ids_known([str(i) for i in ids], self._lookup)

    # --- queries ---------------------------------------------------------------------------------
    def _queries(self, query_vectors: np.ndarray) -> np.ndarray:
        q = np.asarray(query_vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexMismatchError(
                f"query vectors have shape {tuple(np.shape(query_vectors))}, but index "
                f"{self.name}@{self.version} holds vectors of dim {self.dim} "
                f"(method {self.manifest['method']['name']}); compute them with this index's "
                "query_vectors() or the same method arguments"
            )
        if not np.isfinite(q).all():
            raise IndexerError("query vectors contain NaN or infinite values")
        return np.ascontiguousarray(q)

    def topk(self, query_vectors: np.ndarray, k: int = 10, opponents: bool = False) -> TopK:
        """Top-``k`` proponents (or opponents: most negative scores) of each query vector."""
        q = self._queries(query_vectors)
        if k < 1:
            raise IndexerError(f"k must be at least 1, got {k}")
        k = min(k, self.size)
        refine = int(self.spec.params.get("refine", 1)) if self.spec.kind == "ivf_pq" else 1
        sign = -1.0 if opponents else 1.0
        fetch = k * refine
        device, cpu = self.searchers()
        searcher = device if fetch <= faiss_index.GPU_MAX_K else cpu
        if not k:
            found = np.zeros((len(q), 0), np.int64)
        else:
            with self._search_lock:
                found = faiss_index.search(searcher, sign * q, fetch, self._labels,
                                           faiss_index.search_knob(self.spec, opponents))
        valid = found >= 0
        valid[valid] &= self.live[found[valid]]
        vectors = self.store.gather(np.where(valid, found, 0).ravel()).reshape(*found.shape, self.dim)
        exact = np.einsum("qd,qkd->qk", q, vectors)
        keyed = np.where(valid, sign * exact, -np.inf)
        order = np.lexsort((np.where(valid, found, np.iinfo(np.int64).max), -keyed), axis=1)[:, :k] if k else found
        rows = np.take_along_axis(np.where(valid, found, -1), order, 1)
        scores = np.take_along_axis(np.where(valid, exact, np.nan), order, 1).astype(np.float32)
        ranks = np.where(rows >= 0, np.arange(1, rows.shape[1] + 1), 0).astype(np.int32)
        ids = [self.row_ids[r[r >= 0]].tolist() for r in rows]
        return TopK(ids, scores, ranks, rows)

    def scores_for(self, query_vectors: np.ndarray, ids: list[str] | np.ndarray) -> np.ndarray:
        """Exact scores (n_queries, len(ids)) of the given records."""
        q = self._queries(query_vectors)
        return np.einsum("qd,nd->qn", q, self.store.gather(self.rows_of(ids)))

    def self_influence(self) -> np.ndarray:
        """⟨query(i), train(i)⟩ (loss measurement) per live record, aligned with :attr:`ids`."""
        if not self.manifest.get("self_influence"):
            raise IndexerError(
                f"index {self.name} was built without self-influence; rebuild with self_influence=True"
            )
        parts = [np.asarray(load_npy(self.path / "self_influence" / Path(s["file"]).name))
                 for s in self.manifest["shards"]]
        return np.concatenate(parts)[self.live]

    def value(self, query_vectors: np.ndarray) -> np.ndarray:
        """Data value ⟨Σ_j query(v_j), train(i)⟩ per live record, aligned with :attr:`ids`.

        Pass the loss-measurement query vectors of a validation set (or their sum).
        """
        total = self._queries(query_vectors).sum(axis=0)
        return np.concatenate([block @ total for _, block in self.store.blocks(self.live)])

    def records(self, ids: list[str] | np.ndarray) -> list[dict[str, Any]]:
        """Metadata of live records, ``{"id": ..., **columns}``, in the order asked."""
        self.rows_of(ids)  # unknown or deleted ids raise
        with self._lock:
            found = self._records.get([str(i) for i in ids])
        return [{"id": str(i), **found.get(str(i), {})} for i in ids]

    # --- the query side ---------------------------------------------------------------------------
    @property
    def card(self) -> ModelCard:
        return ModelCard.model_validate(self.manifest["model"]["card"])

    def method(self) -> Any:
        """The engine method with its fitted state restored (no refit); built once."""
        with self._lock:
            if self._method is None:
                self._method = self._load_method()
            return self._method

    def _load_method(self) -> Any:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from indexer.methods import make_method

        card = self.card
        self.check_model(card)
        self.check_featurizer()
        task = load_task(card)
        entry = self.manifest["method"]
        method = make_method(entry["name"], task, entry["arguments"])
        try:
            state = load_file(str(self.path / "state.safetensors"))
        except (SafetensorError, OSError) as err:
            raise IndexCorruptError(f"{self.path / 'state.safetensors'} is unreadable ({err}); rebuild the index") from err
        from attribution.methods.base import Method

        if state and type(method).load_state_dict is Method.load_state_dict:
            raise IndexerError(
                f"method {entry['name']!r} cannot restore its fitted state yet "
                f"({type(method).__name__}.load_state_dict is missing in attribution), so index "
                f"{self.name} cannot featurize queries or new records; query it with vectors "
                "computed elsewhere, or use TRAK / TracIn / Grad-Dot"
            )
        method.load_state_dict(state)
        check_probe(self.path / PROBE, method, f"index {self.name}@{self.version}")
        return method

    def check_featurizer(self) -> None:
        """Raise :class:`IndexMismatchError` when another featurizer version built the index."""
        from attribution.version import FEATURIZER_VERSION

        built = self.manifest.get("libraries", {}).get("featurizer")
        if built is not None and built != str(FEATURIZER_VERSION):
            raise IndexMismatchError(
                f"index {self.name}@{self.version} was featurized by featurizer version {built}, "
                f"this engine is version {FEATURIZER_VERSION}: queries would not match the stored "
                "vectors. Rebuild the index with this version"
            )

    def check_model(self, card: ModelCard) -> None:
        """Raise :class:`IndexMismatchError` unless ``card``'s weights are the ones indexed."""
        for i, spec in enumerate(card.checkpoints):
            if not Path(spec.path).is_file():
                raise IndexMismatchError(
                    f"checkpoint {i} ({spec.path}) of index {self.name} no longer exists; restore "
                    "it or rebuild the index"
                )
        fingerprint = model_fingerprint(card)
        if fingerprint["sha256"] != self.manifest["model"]["sha256"]:
            changed = [
                c["path"] for c, m in zip(fingerprint["checkpoints"], self.manifest["model"]["checkpoints"], strict=False)
                if c["sha256"] != m["sha256"]
            ]
            raise IndexMismatchError(
                f"the model differs from the one index {self.name}@{self.version} was built for "
                f"(changed checkpoints: {changed or 'architecture/config'}); rebuild the index"
            )

    def examples(self, inputs: Any, targets: Any) -> Any:
        """Engine ``Examples`` from raw inputs/targets, shaped as the corpus was."""
        import torch

        from attribution.data import Examples

        card, corpus = self.card, self.manifest["corpus"]
        x = np.asarray(inputs)
        if corpus["input_dtype"].startswith("float"):
            x = x.astype(np.float32)
        shape = tuple(corpus["input_shape"])
        if card.task != "causal-lm":
            if x.ndim == len(shape):
                x = x[None]
            if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
                raise IndexMismatchError(
                    f"each example needs {int(np.prod(shape))} input values (shape {list(shape)}) "
                    f"for index {self.name}, got shape {list(x.shape[1:])}"
                )
            x = x.reshape(len(x), *shape)
        y = np.asarray(targets)
        if y.ndim == 0:
            y = y[None]
        return Examples(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))

    def query_vectors(self, examples: Any, measurement: str = "output") -> np.ndarray:
        """Query-side vectors of ``examples`` ((X, y) or Examples) with the indexed method."""
        from attribution.errors import AttributionError

        method = self.method()
        try:  # thread-safe: the engine serialises the checkpoint swaps of its model
            return method.query_vectors(examples, measurement)  # type: ignore[arg-type]
        except AttributionError as err:
            raise IndexerError(f"cannot featurize the query for index {self.name}: {err}") from err

    def tokenizer(self) -> Any:
        """The model's tokenizer as ``texts -> token id lists`` (loaded once per open version);
        raises :class:`IndexerError` when the card names none or it cannot be loaded."""
        from indexer.cards import tokenizer_dir
        from indexer.verbatim import text_tokenizer

        directory = tokenizer_dir(self.card)
        if directory is None:
            raise IndexerError(f"the model card of index {self.name} names no tokenizer")
        with self._lock:
            if self._tokenizer is None:
                try:
                    self._tokenizer = text_tokenizer(directory)
                except (OSError, ValueError) as err:
                    raise IndexerError(f"the tokenizer of index {self.name} ({directory}) cannot "
                                       f"be loaded: {err}") from err
            return self._tokenizer

    # --- provenance: the verbatim-span index of a causal-LM text corpus ---------------------------
    def verbatim(self) -> Any:
        """The version's :class:`~indexer.verbatim.VerbatimIndex` (opened once); raises
        :class:`IndexerError` when the index was not built from a causal-LM text corpus."""
        from indexer.verbatim import VerbatimIndex

        entry = self.manifest.get("verbatim")
        if entry is None:
            raise IndexerError(
                f"index {self.name}@{self.version} has no verbatim-span index: it is built for "
                "causal-LM models from corpora with a 'text' column; rebuild it from one"
            )
        with self._lock:
            if self._verbatim is None:
                directory = self.path / entry["path"]
                if not directory.is_dir():
                    raise IndexCorruptError(
                        f"{directory} is missing although the manifest lists it; rebuild the index"
                    )
                self._verbatim = VerbatimIndex.open(directory)
            return self._verbatim

    # --- updates (each publishes a new version; this object keeps serving its own) ----------------
    def add(self, corpus_path: str | Path, **options: Any) -> AttributionIndex:
        """Add records from a corpus file; returns the new version (see :func:`indexer.update.add_records`)."""
        from indexer.update import add_records

        return add_records(self.path.parent.parent, corpus_path, **options)

    def delete(self, ids: list[str], **options: Any) -> AttributionIndex:
        """Delete records by id; returns the new version (see :func:`indexer.update.delete_records`)."""
        from indexer.update import delete_records

        return delete_records(self.path.parent.parent, ids, **options)

    # --- summary --------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What ``tda index info`` prints: method, counts, sizes, recall, drift and advice."""
        m = self.manifest
        size = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return {
            "name": self.name, "version": self.version, "path": str(self.path),
            "method": m["method"]["name"], "arguments": m["method"]["arguments"],
            "projection": m.get("projection"), "lambda": m.get("lambda"),
            "model_sha256": m["model"]["sha256"], "task": m["model"]["task"],
            "corpus_sha256": m["corpus"]["sha256"], "counts": m["counts"], "dim": self.dim,
            "dtype": self.dtype, "bytes_on_disk": size,
            "bytes_per_vector": round(size / max(m["counts"]["rows"], 1), 1),
            "faiss": {k: m["faiss"][k] for k in ("kind", "params", "recall", "ntotal")},
            "drift": m["drift"], "rebuild_advised": m["drift"]["rebuild_advised"],
            "recall_target_reached": m["faiss"]["recall"].get("target_reached", True),
            "built": m["build"]["finished"], "build_seconds": m["build"]["seconds"],
            "history": m["history"], "libraries": m["libraries"],
            "verbatim": m.get("verbatim"),
        }

    def close(self) -> None:
        self._records.close()
        if self._verbatim is not None:
            self._verbatim.close()
