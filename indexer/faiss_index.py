"""The FAISS part of an index: maximum-inner-product search over the stored train vectors.

Kinds: ``flat`` (exact, IndexFlatIP), ``ivf_flat``, ``ivf_pq`` and ``hnsw`` (approximate). FAISS
labels are row numbers of the index (IVF stores them natively; flat and HNSW keep a label → row
array), so records can be added and deleted without renumbering. Approximate kinds are tuned at
build time (nprobe / efSearch) to reach a target recall@k against exact search on real queries.
GPU FAISS is used when present; the files on disk are the same either way.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.errors import IndexCorruptError, IndexerError

KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw")
# auto: exact search while n·d ≤ this (100k × 512 answers in ~10 ms per query on one core)
FLAT_THRESHOLD = 64_000_000
HNSW_MAX_BYTES = 16 << 30  # above this much vector memory, compress with IVF-PQ
Blocks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # yields (rows, float32 vectors)


@dataclass
class IndexSpec:
    """Which FAISS index and its parameters (recorded in the manifest)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": dict(self.params)}


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def default_codec(dtype: str) -> str:
    """How flat/IVF-Flat/HNSW hold vectors: fp16 for fp16 storage (lossless, half the memory
    and about 4× faster single-query scans on CPU than fp32), fp32 otherwise and on GPUs."""
    return "fp16" if dtype == "float16" and not gpu_available() else "fp32"


def choose_spec(n: int, d: int, kind: str = "auto", params: dict[str, Any] | None = None,
                flat_threshold: int = FLAT_THRESHOLD, dtype: str = "float32") -> IndexSpec:
    """Pick the index kind for ``n`` vectors of dimension ``d`` and fill in default parameters.

    ``auto``: exact flat search while n·d ≤ ``flat_threshold``; HNSW above it; IVF-PQ when the
    vectors would take more than 16 GiB of memory. HNSW, not IVF, because attribution vectors
    make a hard *maximum inner product* problem: their norms vary by orders of magnitude and IVF
    partitions by direction, so on TRAK vectors of digits IVF-Flat needed a quarter of the
    lists for recall@10 = 0.89, where HNSW reached 0.95 in 0.3 ms. ``params`` override the
    defaults (codec, nlist, nprobe, m, nbits, refine, M, ef_construction, ef_search).
    """
    codec = (params or {}).get("codec", default_codec(dtype))
    if codec not in ("fp16", "fp32"):
        raise IndexerError(f"codec must be 'fp16' or 'fp32', not {codec!r}")
    if kind == "auto":
        if n * d <= flat_threshold:
            kind = "flat"
        else:
            width = 2 if codec == "fp16" else 4
            kind = "hnsw" if n * d * width <= HNSW_MAX_BYTES else "ivf_pq"
    if kind not in KINDS:
        raise IndexerError(f"index kind must be 'auto' or one of {KINDS}, not {kind!r}")
    defaults: dict[str, Any] = {"codec": codec}
    if kind in ("ivf_flat", "ivf_pq"):
        # about √n lists (a power of two), at least 39 training points per list
        nlist = 1 << max(4, round(math.log2(max(math.sqrt(n), 1))))
        defaults.update(nlist=max(1, min(nlist, n // 39)), nprobe=None, nprobe_opponents=None,
                        train_size=None)
        if kind == "ivf_pq":
            del defaults["codec"]
            defaults.update(m=_pq_m(d), nbits=8, refine=10)
    elif kind == "hnsw":
        defaults.update(M=32, ef_construction=80, ef_search=None, ef_search_opponents=None)
    unknown = set(params or {}) - set(defaults)
    if unknown:
        raise IndexerError(f"unknown parameters {sorted(unknown)} for a {kind} index; known: {sorted(defaults)}")
    spec = IndexSpec(kind, {**defaults, **(params or {})})
    if kind in ("ivf_flat", "ivf_pq"):
        spec.params["nlist"] = max(1, min(int(spec.params["nlist"]), n))
        if spec.params["train_size"] is None:  # k-means cost grows with it; 64 per list suffice
            spec.params["train_size"] = int(min(n, max(64 * spec.params["nlist"], 10_000)))
    if kind == "ivf_pq" and d % spec.params["m"]:
        raise IndexerError(f"ivf_pq needs m dividing the dimension {d}; got m={spec.params['m']}")
    return spec


def check_kind(kind: str, params: dict[str, Any] | None) -> None:
    """Reject an unknown kind or parameter names before any work starts."""
    if kind == "auto":
        if params:
            raise IndexerError("index parameters need an explicit index kind (flat, ivf_flat, ivf_pq, hnsw)")
        return
    spec = choose_spec(1 << 20, 256, kind)
    unknown = set(params or {}) - set(spec.params)
    if unknown:
        raise IndexerError(f"unknown parameters {sorted(unknown)} for a {kind} index; known: {sorted(spec.params)}")


def _pq_m(d: int) -> int:
    """Sub-quantizers: 4 dimensions each (d/4 bytes per vector) where that divides d."""
    for m in (d // 4, d // 8, d // 16, 64, 32, 16, 8, 4, 2, 1):
        if m >= 1 and d % m == 0 and m <= 256:
            return m
    return 1


# --- building -----------------------------------------------------------------------------
def build(spec: IndexSpec, d: int, blocks: Blocks, train_sample: np.ndarray | None = None
          ) -> tuple[faiss.Index, np.ndarray | None]:
    """Build the index from ``blocks`` of (rows, vectors); returns (index, label→row or None)."""
    kind, p = spec.kind, spec.params
    ip, fp16 = faiss.METRIC_INNER_PRODUCT, p.get("codec") == "fp16"
    qt = faiss.ScalarQuantizer.QT_fp16
    if kind == "flat":
        index = faiss.IndexScalarQuantizer(d, qt, ip) if fp16 else faiss.IndexFlatIP(d)
        index.train(np.zeros((1, d), np.float32))  # nothing to learn for fp16 / fp32
    elif kind == "hnsw":
        index = faiss.IndexHNSWSQ(d, qt, int(p["M"]), ip) if fp16 else faiss.IndexHNSWFlat(d, int(p["M"]), ip)
        index.hnsw.efConstruction = int(p["ef_construction"])
        index.train(np.zeros((1, d), np.float32))
    else:
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf_flat" and fp16:
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, int(p["nlist"]), qt, ip)
        elif kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, d, int(p["nlist"]), faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, int(p["nlist"]), int(p["m"]), int(p["nbits"]),
                                     faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()
        if train_sample is None or len(train_sample) == 0:
            raise IndexerError(f"{kind} needs training vectors")
        index = _to_gpu(index)
        index.train(np.ascontiguousarray(train_sample, dtype=np.float32))
    return add(index, spec, blocks(), None)


def add(index: faiss.Index, spec: IndexSpec, blocks: Iterable[tuple[np.ndarray, np.ndarray]],
        labels: np.ndarray | None) -> tuple[faiss.Index, np.ndarray | None]:
    """Add (rows, vectors) blocks; returns the CPU index and its label → row array (None: IVF)."""
    index = _to_gpu(index)
    parts = [] if labels is None else [labels]
    for rows, vectors in blocks:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if spec.kind in ("ivf_flat", "ivf_pq"):
            index.add_with_ids(vectors, rows.astype(np.int64))
        else:
            index.add(vectors)
            parts.append(rows.astype(np.int64))
    index = to_cpu(index)
    if spec.kind in ("ivf_flat", "ivf_pq"):
        return index, None
    return index, (np.concatenate(parts) if parts else np.zeros(0, np.int64))


def remove(index: faiss.Index, spec: IndexSpec, rows: np.ndarray, blocks: Blocks, d: int
           ) -> tuple[faiss.Index, np.ndarray | None]:
    """Drop ``rows``: IVF removes them in place; flat and HNSW are rebuilt from live vectors."""
    if spec.kind in ("ivf_flat", "ivf_pq"):
        index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(rows, dtype=np.int64)))
        return index, None
    return build(spec, d, blocks)


# --- searching ----------------------------------------------------------------------------
def search_knob(spec: IndexSpec, opponents: bool = False) -> tuple[str, int | None]:
    """The tuned search parameter for one direction: (name, value), value None when untuned.

    Proponents (highest scores) and opponents (most negative) are tuned separately: on
    attribution vectors the two directions need different efforts for the same recall.
    """
    name = {"hnsw": "ef_search", "ivf_flat": "nprobe", "ivf_pq": "nprobe"}.get(spec.kind)
    if name is None:
        return "", None
    value = spec.params.get(f"{name}_opponents") if opponents else None
    value = value or spec.params.get(name)
    return name, int(value) if value else None


def configure(index: faiss.Index, spec: IndexSpec) -> None:
    """Make the proponent setting (nprobe / efSearch) the index's default."""
    name, value = search_knob(spec)
    if not value:
        return
    if name == "nprobe":
        try:
            faiss.extract_index_ivf(index).nprobe = value
        except RuntimeError:  # a GPU IVF index carries nprobe itself
            index.nprobe = value
    else:
        index.hnsw.efSearch = value


def _search_parameters(index: faiss.Index, name: str, value: int | None) -> Any:
    """Per-call FAISS search parameters (thread-safe, unlike changing the index)."""
    if not value or is_gpu(index):
        return None
    if name == "ef_search":
        return faiss.SearchParametersHNSW(efSearch=value)
    return faiss.SearchParametersIVF(nprobe=value)


def search_threads() -> int:
    """OpenMP threads per search: ``$TDA_FAISS_THREADS``, default 1.

    One thread per query is the fast choice when a server answers concurrent requests, and on
    small shared machines: with more threads than free cores OpenMP's spin-waits multiply the
    latency (measured 12 ms → 88 ms for flat 100k × 512 on 2 busy cores).
    """
    return max(1, int(os.environ.get("TDA_FAISS_THREADS", "1")))


# batches of ≥ 16 queries use BLAS (FAISS's default threshold, 128000 queries, never does)
faiss.cvar.distance_compute_blas_threshold = 16


def search(index: faiss.Index, queries: np.ndarray, k: int, labels: np.ndarray | None,
           knob: tuple[str, int | None] = ("", None)) -> np.ndarray:
    """Row numbers of the (up to) ``k`` highest inner products per query; −1 pads.

    ``knob`` = (name, value) from :func:`search_knob` overrides nprobe / efSearch for this call.
    """
    k = max(1, min(k, index.ntotal))
    params = _search_parameters(index, *knob)
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(search_threads())  # per calling thread (OpenMP ICV)
    try:
        x = np.ascontiguousarray(queries, dtype=np.float32)
        _, found = index.search(x, k, params=params) if params is not None else index.search(x, k)
    finally:
        faiss.omp_set_num_threads(previous)
    if labels is None:
        return found
    rows = np.where(found >= 0, labels[np.clip(found, 0, None)], -1) if len(labels) else found
    return rows


def exact_topk(queries: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int
               ) -> np.ndarray:
    """Brute-force top-k rows by inner product (the ground truth for recall)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_r = np.zeros((len(queries), 0), np.int64)
    q = queries.astype(np.float32)
    for rows, vectors in blocks:
        s = q @ vectors.astype(np.float32).T
        best_s = np.concatenate([best_s, s], 1)
        best_r = np.concatenate([best_r, np.broadcast_to(rows, s.shape)], 1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s = np.take_along_axis(best_s, keep, 1)
            best_r = np.take_along_axis(best_r, keep, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_r, order, 1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k rows that were found."""
    k = truth.shape[1]
    hits = [len(set(f[:k].tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / k) if hits else 1.0


def tune(index: faiss.Index, spec: IndexSpec, queries: np.ndarray, labels: np.ndarray | None,
         truth_pro: np.ndarray, truth_opp: np.ndarray, target: float,
         fixed: dict[str, Any] | None = None,
         rescore: Callable[[np.ndarray, np.ndarray, int], np.ndarray] | None = None) -> dict[str, Any]:
    """Choose, per direction, the smallest nprobe / efSearch whose recall@k ≥ ``target``.

    Proponents search with ``queries``, opponents with ``-queries``; each gets its own value
    (``ef_search`` / ``ef_search_opponents``, ``nprobe`` / ``nprobe_opponents``). A value the
    user fixed in ``fixed`` is measured, not tuned; when the target is out of reach the
    cheapest value within 0.005 of the best recall is kept. ``rescore(queries, rows, k)``
    re-ranks ``refine``·k candidates exactly, as queries do for IVF-PQ. Returns what was
    measured: the chosen values, their recall, and the sweeps.
    """
    k = truth_pro.shape[1]
    refine = int(spec.params.get("refine", 1)) if spec.kind == "ivf_pq" else 1

    def measure(q: np.ndarray, truth: np.ndarray, knob: tuple[str, int | None]) -> tuple[float, float]:
        started = time.perf_counter()
        found = search(index, q, k * refine, labels, knob)
        if rescore is not None and refine > 1:
            found = rescore(q, found, k)
        return recall_at_k(found, truth), (time.perf_counter() - started) / len(q)

    queries = queries.astype(np.float32)
    if spec.kind == "flat":
        pro, _ = measure(queries, truth_pro, ("", None))
        opp, _ = measure(-queries, truth_opp, ("", None))
        return {"k": k, "recall": min(pro, opp), "recall_proponents": pro,
                "recall_opponents": opp, "queries": len(queries), "sweep": []}
    if spec.kind == "hnsw":
        name, values = "ef_search", [v for v in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if v >= k]
    else:
        nlist = int(spec.params["nlist"])
        name, values = "nprobe", sorted({min(v, nlist) for v in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)})
    result: dict[str, Any] = {"k": k, "target": target, "queries": len(queries)}
    for direction, q, truth, key in (("proponents", queries, truth_pro, name),
                                     ("opponents", -queries, truth_opp, f"{name}_opponents")):
        candidates = [int(fixed[key])] if (fixed or {}).get(key) else values
        sweep, measured = [], []
        for value in candidates:
            recall, seconds = measure(q, truth, (name, value))
            sweep.append({name: value, "recall": recall, "ms_per_query": round(seconds * 1e3, 3)})
            measured.append((value, recall))
            if recall >= target:
                break
        reached = measured[-1][1] >= target
        if not reached:
            best = max(r for _, r in measured)
            measured = [next(m for m in measured if m[1] >= best - 0.005)]
        spec.params[key], result[f"recall_{direction}"] = measured[-1]
        result[f"target_reached_{direction}"] = reached
        result[f"sweep_{direction}"] = sweep
    configure(index, spec)
    result["recall"] = min(result["recall_proponents"], result["recall_opponents"])
    result["target_reached"] = result["target_reached_proponents"] and result["target_reached_opponents"]
    return result


def save(index: faiss.Index, path: Path) -> None:
    """Write the (CPU) index to ``path``."""
    faiss.write_index(index, str(path))


def load(path: Path, spec: IndexSpec, d: int, ntotal: int) -> faiss.Index:
    """Read an index file and check it matches what the manifest says."""
    if not path.is_file():
        raise IndexCorruptError(f"FAISS index file {path} is missing; rebuild the index")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        raise IndexCorruptError(f"FAISS index file {path} is unreadable ({err}); rebuild the index") from err
    if index.d != d or index.ntotal != ntotal:
        raise IndexCorruptError(
            f"FAISS index {path} holds {index.ntotal} vectors of dim {index.d}, but the manifest "
            f"says {ntotal} of dim {d}; the files are from different builds — rebuild the index"
        )
    configure(index, spec)
    return index


# --- GPU --------------------------------------------------------------------------------------
_GPU_RESOURCES: Any = None


GPU_MAX_K = 2048  # FAISS GPU search returns at most this many neighbours


def is_gpu(index: faiss.Index) -> bool:
    return "Gpu" in type(index).__name__


def _to_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy of a flat/IVF index when a GPU is usable, else the index itself."""
    global _GPU_RESOURCES
    if not gpu_available() or isinstance(index, faiss.IndexHNSW) or is_gpu(index):
        return index
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)
    except RuntimeError:  # a kind without a GPU implementation stays on the CPU
        return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """The CPU form of an index (what is written to disk)."""
    if is_gpu(index):
        return faiss.index_gpu_to_cpu(index)
    return index


def for_search(index: faiss.Index) -> faiss.Index:
    """The index to search with: moved to the GPU when one is usable."""
    return _to_gpu(index)
