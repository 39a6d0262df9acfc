"""Build a versioned attribution index: corpus + model card → train vectors → FAISS, on disk.

The staged path of every engine method, run shard by shard so that a killed build resumes:

1. ``prepare(all examples)`` — whole-train-set state (e.g. a Hessian);
2. per shard ``featurize_train`` → ``staging/<plan>/raw/<shard>.npy`` (kept: the resume point);
3. per shard ``observe(raw)``, then ``finalize_state()`` (e.g. TRAK's (ΦᵀΦ + λI)⁻¹);
4. per shard ``transform_train(raw)`` → ``vectors/<shard>.npy`` and self-influence
   ⟨query(i), train(i)⟩ (loss measurement, as :func:`attribution.self_influence`);
5. method state, ids, metadata, FAISS index (recall measured on real queries), manifest;
6. an atomic rename publishes ``versions/vNNNN`` and ``current`` is replaced atomically.

Each shard file appears by atomic rename, so after ``kill -9`` the rerun skips the shards that
exist and writes the same files an uninterrupted build would.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from indexer import faiss_index
from indexer.cards import (
    ModelCard,
    load_card,
    load_task,
    model_fingerprint,
    pad_token_id,
    tokenizer_dir,
)
from indexer.corpus import Corpus, load_corpus
from indexer.errors import CorpusError, IndexerError
from indexer.layout import (
    FORMAT,
    MANIFEST,
    check_name,
    index_dir,
    locked,
    publish,
    read_current,
    read_manifest,
    versions,
    write_current,
    write_manifest,
)
from indexer.methods import METHOD_NAMES, check_index_dim, describe_method, make_method
from indexer.paths import atomic_write_text, sha256_file
from indexer.probe import PROBE, PROBE_RECORDS, make_probe, probe_fingerprint, write_probe
from indexer.store import (
    LABELS,
    VectorStore,
    choose_scale,
    load_npy,
    quantize,
    save_ids,
    save_labels,
    save_npy,
    to_float32,
    write_records,
)
from indexer.verbatim import build_corpus_verbatim, text_tokenizer

Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``; may raise to cancel (the build stays resumable)."""

DTYPES = ("float16", "float32")
DEFAULT_SHARD_SIZE = 4096
REBUILD_ADVISED_FRACTION = 0.2  # adds + deletes beyond this share of the fitted rows


@dataclass
class BuildResult:
    """What a build published."""

    path: Path
    version: str
    manifest: dict[str, Any]
    resumed_shards: int = 0
    reused: bool = False


def build_index(
    card_path: str | Path,
    corpus_path: str | Path,
    *,
    name: str,
    root: str | Path,
    method: str = "trak",
    method_args: dict[str, Any] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    dtype: str = "float16",
    index_kind: str = "auto",
    index_params: dict[str, Any] | None = None,
    data_root: str | Path | None = None,
    device: str | None = None,
    self_influence: bool = True,
    recall_target: float = 0.95,
    recall_queries: int = 200,
    flat_threshold: int = faiss_index.FLAT_THRESHOLD,
    force: bool = False,
    show_progress: bool = True,
    progress: Progress | None = None,
) -> BuildResult:
    """Build and publish a new version of index ``name`` under ``root``.

    ``method_args`` are the method's typed arguments (e.g. ``{"proj_dim": 512}``); ``dtype`` is
    how train vectors are stored. A rerun with the same inputs resumes an interrupted build, or
    returns the already published version unless ``force``. Paths are confined to
    ``data_root`` when it is given.
    """
    started = time.time()
    check_name(name)
    if method not in METHOD_NAMES:
        raise IndexerError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
    if dtype not in DTYPES:
        raise IndexerError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    if shard_size < 1:
        raise IndexerError(f"shard_size must be at least 1, got {shard_size}")
    if not 0 < recall_target <= 1:
        raise IndexerError(f"recall_target must lie in (0, 1], got {recall_target}")
    data_root = Path(data_root) if data_root is not None else None

    card = load_card(card_path, data_root)
    fingerprint = model_fingerprint(card)
    corpus = read_corpus(corpus_path, card, data_root)
    task = load_task(card)
    # the method hands over float32; the index stores ``dtype`` itself (scaled, see store.py)
    arguments = {**(method_args or {}), "storage_dtype": "float32"}
    engine = make_method(method, task, arguments, device, data_root)
    check_index_dim(engine, index_dir(Path(root), name))
    check_examples(task, corpus)
    faiss_index.check_kind(index_kind, index_params)
    picks = np.random.default_rng(1).choice(len(corpus), min(PROBE_RECORDS, len(corpus)), replace=False)
    probe_examples = corpus.examples().subset(np.sort(picks))
    fingerprint_now = featurization_fingerprint(engine, probe_examples)

    plan = {
        "format": FORMAT, "name": name, "method": method, "arguments": engine.arguments(),
        "model_sha256": fingerprint["sha256"], "corpus_sha256": corpus.fingerprint,
        "shard_size": shard_size, "dtype": dtype, "index_kind": index_kind,
        "index_params": index_params or {}, "self_influence": self_influence,
        "recall_target": recall_target, "recall_queries": recall_queries,
        "flat_threshold": flat_threshold,
        **({"verbatim": True} if "texts" in corpus.extra else {}),  # text corpora: spans too
        # how the engine featurizes today: a changed engine must not resume or reuse old shards
        "featurization": fingerprint_now,
    }
    key = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:24]
    directory = index_dir(Path(root), name)
    if not force and (found := _published_plan(directory, key)) is not None:
        return found
    staging = directory / "staging" / key
    with _staging_lock(staging):
        (staging / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True, default=str))
        out = staging / "version"
        bounds = shard_bounds(len(corpus), shard_size)
        engine.prepare(corpus.examples())
        t0 = time.time()
        resumed = featurize_shards(engine, corpus, bounds, staging / "raw", show_progress, progress)
        featurize_seconds = time.time() - t0
        for i in range(len(bounds)):
            engine.observe(np.asarray(load_npy(_raw(staging, i))))
        engine.finalize_state()
        shards, scale = transform_shards(engine, corpus, bounds, staging / "raw", out, 0, dtype,
                                         self_influence, show_progress, progress)
        write_state(out, engine.state_dict())
        save_ids(out / "ids.parquet", corpus.ids)
        save_labels(out, corpus.y)
        save_npy(out / "deleted.npy", np.zeros(len(corpus), bool))
        _write_records_fresh(out / "records.sqlite", np.arange(len(corpus)), corpus)
        dim = shards[0]["dim"]
        store = VectorStore(out, shards, dim, dtype, scale)
        queries = sample_queries(engine, corpus, recall_queries)
        save_npy(out / "recall_queries.npy", queries)
        write_probe(out / PROBE, make_probe(engine, probe_examples))  # with the fitted state
        verbatim = build_verbatim(out, corpus, card)
        if progress:
            progress("index", 0, 1)
        faiss_info = build_faiss(out, store, np.ones(store.rows, bool), queries, index_kind,
                                 index_params, recall_target, flat_threshold)
        if progress:
            progress("index", 1, 1)
        finished = time.time()
        timing = {"started": _iso(started), "finished": _iso(finished),
                  "seconds": round(finished - started, 3),
                  "featurize_seconds": round(featurize_seconds, 3),
                  "examples_per_second": round(len(corpus) / max(finished - started, 1e-9), 2),
                  "resumed_shards": resumed, "device": str(engine.device), "host": platform.node()}
        manifest = new_manifest(name, key, method, engine, card, card_path, fingerprint, corpus,
                                dtype, scale, shards, shard_size, faiss_info, self_influence, timing)
        manifest["files"] = file_digests(out, self_influence)
        if verbatim is not None:
            manifest["verbatim"] = verbatim
        write_manifest(out, manifest)
        with locked(directory):
            version = publish(directory, out)
            write_current(directory, version)
        shutil.rmtree(staging, ignore_errors=True)
    _remove_if_empty(directory / "staging")
    path = directory / "versions" / version
    return BuildResult(path, version, read_manifest(path), resumed)


def featurization_fingerprint(engine: Any, examples: Any) -> str | None:
    """How the engine featurizes queries today (see :mod:`indexer.probe`); None for methods whose
    query side needs the fitted state (AirRep's encoder, CG/LiSSA)."""
    from attribution.errors import AttributionError

    try:
        return probe_fingerprint(make_probe(engine, examples))
    except AttributionError:
        return None


def new_manifest(name: str, key: str, method: str, engine: Any, card: ModelCard,
                 card_path: str | Path, fingerprint: dict[str, Any], corpus: Corpus, dtype: str,
                 scale: float, shards: list[dict[str, Any]], shard_size: int,
                 faiss_info: dict[str, Any], self_influence: bool, timing: dict[str, Any]
                 ) -> dict[str, Any]:
    """Everything a version records about how it was made (``version`` is set on publish)."""
    return {
        "format": FORMAT, "name": name, "version": None, "plan": key, "created": _now(),
        "method": {"name": method, "arguments": engine.arguments(),
                   "query_needs_state": bool(getattr(engine, "query_needs_state", False))},
        **describe_method(engine),
        "model": {"sha256": fingerprint["sha256"], "task": card.task,
                  "card": card.model_dump(mode="json"), "checkpoints": fingerprint["checkpoints"],
                  "huggingface_files": fingerprint["huggingface_files"], "source": str(card_path)},
        "corpus": corpus.describe(),
        "dtype": dtype, "scale": scale, "dim": shards[0]["dim"], "shard_size": shard_size,
        "shards": [{k: s[k] for k in ("file", "rows", "sha256")} for s in shards],
        "counts": {"rows": len(corpus), "live": len(corpus), "deleted": 0, "added": 0},
        "faiss": faiss_info,
        "self_influence": self_influence,
        "build": timing,
        "libraries": library_versions(),
        "history": [{"op": "build", "at": timing["finished"], "corpus_sha256": corpus.fingerprint,
                     "rows": len(corpus)}],
        "drift": drift(len(corpus), 0, 0),
    }


# --- inputs ---------------------------------------------------------------------------------------
def read_corpus(corpus_path: str | Path, card: ModelCard, data_root: Path | None) -> Corpus:
    """Load a corpus the way the card's model reads it (input shape, tokenizer)."""
    directory = tokenizer_dir(card)

    seen: list[str] = []

    def tokenize(texts: list[str]) -> list[list[int]]:
        if directory is None:
            raise CorpusError("text inputs need a tokenizer: add 'tokenizer: <dir>' to the model card")
        seen[:] = texts  # kept for the verbatim index of causal-LM text corpora
        return text_tokenizer(directory)(texts)

    corpus = load_corpus(corpus_path, card.task, data_root=data_root, input_shape=card.input_shape,
                         tokenizer=tokenize, max_length=card.max_length,
                         pad_id=pad_token_id(card))
    if seen:
        corpus.extra["texts"] = seen
    return corpus


def build_verbatim(out: Path, corpus: Corpus, card: ModelCard) -> dict[str, Any] | None:
    """The verbatim-span index (provenance) of a causal-LM text corpus; None for other corpora."""
    if card.task != "causal-lm" or "texts" not in corpus.extra:
        return None
    return build_corpus_verbatim(out / "verbatim", corpus.ids.tolist(), corpus.extra["texts"],
                                 corpus.metadata.to_pylist(), card.tokenizer)


def check_examples(task: Any, corpus: Corpus) -> None:
    """Let the task reject the whole corpus before any work (label range, input shape)."""
    from attribution.errors import AttributionError

    try:
        task.check_targets(corpus.examples())
    except AttributionError as err:
        raise CorpusError(f"corpus {corpus.path} does not suit the model: {err}") from err


def shard_bounds(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


# --- the shard pipeline (shared with adds) ----------------------------------------------------
def _raw(staging: Path, i: int) -> Path:
    return staging / "raw" / f"{i:05d}.npy"


def featurize_shards(engine: Any, corpus: Corpus, bounds: list[tuple[int, int]], raw_dir: Path,
                     show_progress: bool, progress: Progress | None) -> int:
    """Featurize every shard that has no finished raw file yet; returns how many were reused."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    reused = 0
    with tqdm(total=len(corpus), desc="featurize", unit="ex",
              disable=not show_progress, dynamic_ncols=True) as bar:
        for i, (start, stop) in enumerate(bounds):
            path = raw_dir / f"{i:05d}.npy"
            if _complete(path, stop - start):
                reused += 1
            else:
                save_npy(path, np.asarray(engine.featurize_train(corpus.examples(start, stop))))
            bar.update(stop - start)
            if progress:
                progress("featurize", stop, len(corpus))
    return reused


def _complete(path: Path, rows: int) -> bool:
    if not path.is_file():
        return False
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).shape[0] == rows
    except (ValueError, OSError, EOFError):
        return False


def transform_shards(engine: Any, corpus: Corpus, bounds: list[tuple[int, int]], raw_dir: Path,
                     out: Path, first: int, dtype: str, self_influence: bool, show_progress: bool,
                     progress: Progress | None, scale: float | None = None
                     ) -> tuple[list[dict[str, Any]], float]:
    """Write train vectors (and self-influence) per shard; returns shard descriptions and scale.

    float16 shards hold ``vector × scale`` (see :func:`indexer.store.choose_scale`); the scale
    comes from the first shard unless given (adds reuse the index's) and is kept in
    ``scale.json`` so that a resumed build uses the same one. Shard files are numbered from
    ``first`` (adds continue the numbering of their base). Self-influence is computed from the
    stored values, as every later score is.
    """
    (out / "vectors").mkdir(parents=True, exist_ok=True)
    (out / "self_influence").mkdir(parents=True, exist_ok=True)
    scale_file = out / "scale.json"
    if scale is None and scale_file.is_file():
        scale = float(json.loads(scale_file.read_text())["scale"])
    shards = []
    with tqdm(total=len(corpus), desc="transform", unit="ex",
              disable=not show_progress, dynamic_ncols=True) as bar:
        for i, (start, stop) in enumerate(bounds):
            name = f"{first + i:05d}.npy"
            vec_path, si_path = out / "vectors" / name, out / "self_influence" / name
            done = _complete(vec_path, stop - start) and (not self_influence or _complete(si_path, stop - start))
            if not done:
                raw = np.asarray(load_npy(raw_dir / f"{i:05d}.npy"))
                vectors = np.asarray(engine.transform_train(raw), dtype=np.float32)
                if scale is None:
                    scale = choose_scale(vectors) if dtype == "float16" else 1.0
                    atomic_write_text(scale_file, json.dumps({"scale": scale}))
                stored = quantize(vectors, dtype, scale)
                if self_influence:
                    queries = engine.query_vectors(corpus.examples(start, stop), "loss")
                    values = to_float32(stored) / np.float32(scale)
                    save_npy(si_path, np.einsum("ij,ij->i", queries, values))
                save_npy(vec_path, stored)
            header = np.load(vec_path, mmap_mode="r")
            shards.append({"file": f"vectors/{name}", "rows": stop - start, "dim": header.shape[1],
                           "sha256": sha256_file(vec_path)})
            bar.update(stop - start)
            if progress:
                progress("transform", stop, len(corpus))
    return shards, float(scale if scale is not None else 1.0)


def write_state(out: Path, state: dict[str, np.ndarray]) -> None:
    """Save the fitted method state as safetensors (never pickle)."""
    from safetensors.numpy import save_file

    tensors = {k: np.asarray(v).copy(order="C") for k, v in state.items()}  # keeps 0-d shapes
    tmp = out / ".state.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / "state.safetensors")


def _write_records_fresh(path: Path, rows: np.ndarray, corpus: Corpus) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    write_records(tmp, rows, corpus.ids, corpus.metadata)
    os.replace(tmp, path)


def sample_queries(engine: Any, corpus: Corpus, count: int) -> np.ndarray:
    """Query vectors (output measurement) of a seeded sample of records: the recall queries."""
    count = min(count, len(corpus))
    if count == 0:
        return np.zeros((0, 0), np.float32)
    picks = np.sort(np.random.default_rng(0).choice(len(corpus), count, replace=False))
    return engine.query_vectors(corpus.examples().subset(picks), "output").astype(np.float32)


# --- FAISS ------------------------------------------------------------------------------------
def build_faiss(out: Path, store: VectorStore, live: np.ndarray, queries: np.ndarray, kind: str,
                params: dict[str, Any] | None, recall_target: float, flat_threshold: int
                ) -> dict[str, Any]:
    """Build, tune and save the FAISS index over the live rows; returns its manifest entry."""
    n_live = int(live.sum())
    spec = faiss_index.choose_spec(n_live, store.dim, kind, params, flat_threshold,
                                   str(store.shards[0].dtype) if store.shards else "float32")
    sample = None
    if spec.kind in ("ivf_flat", "ivf_pq"):
        live_rows = np.flatnonzero(live)
        picks = np.sort(np.random.default_rng(0).choice(len(live_rows), min(spec.params["train_size"], len(live_rows)), replace=False))
        sample = store.gather(live_rows[picks], raw=True)
    started = time.time()
    index, labels = faiss_index.build(spec, store.dim, lambda: store.blocks(live, raw=True), sample)
    seconds = time.time() - started
    return finish_faiss(out, index, labels, spec, store, live, queries, recall_target, seconds,
                        params or {})


def finish_faiss(out: Path, index: Any, labels: np.ndarray | None, spec: faiss_index.IndexSpec,
                 store: VectorStore, live: np.ndarray, queries: np.ndarray, recall_target: float,
                 seconds: float, user_params: dict[str, Any]) -> dict[str, Any]:
    """Measure recall@10 against exact search, save the index and its label map."""
    k = min(10, int(live.sum()))
    recall: dict[str, Any] = {"k": k, "recall": 1.0, "queries": 0}
    if spec.kind == "flat":  # exhaustive over the stored values: exact by construction
        recall.update(recall_proponents=1.0, recall_opponents=1.0, exact=True)
    elif len(queries) and k:
        truth_pro = faiss_index.exact_topk(queries, store.blocks(live, raw=True), k)
        truth_opp = faiss_index.exact_topk(-queries, store.blocks(live, raw=True), k)
        recall = faiss_index.tune(index, spec, queries, labels, truth_pro, truth_opp,
                                  recall_target, user_params, rescore=_rescorer(store))
    faiss_index.save(index, out / "index.faiss")
    if labels is not None:
        save_npy(out / "faiss_labels.npy", labels)
    else:
        (out / "faiss_labels.npy").unlink(missing_ok=True)
    return {**spec.to_dict(), "user_params": user_params, "ntotal": int(index.ntotal),
            "labels": labels is not None, "recall": recall, "recall_target": recall_target, "build_seconds": round(seconds, 3), "gpu": faiss_index.gpu_available(),
            "metric": "inner_product"}


def _rescorer(store: VectorStore) -> Any:
    """Exact re-ranking of FAISS candidates from the stored vectors (what queries do)."""

    def rescore(queries: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
        valid = rows >= 0
        vectors = store.gather(np.where(valid, rows, 0).ravel(), raw=True).reshape(*rows.shape, store.dim)
        scores = np.where(valid, np.einsum("qd,qkd->qk", queries, vectors), -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(np.where(valid, rows, -1), order, 1)

    return rescore


# --- manifest helpers ---------------------------------------------------------------------------
def file_digests(out: Path, self_influence: bool) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the version's files other than vector shards (checked on open)."""
    names = ["state.safetensors", "ids.parquet", "deleted.npy", "records.sqlite", "index.faiss",
             "recall_queries.npy"]
    names += [n for n in ("scale.json", PROBE, "faiss_labels.npy", LABELS) if (out / n).is_file()]
    names += sorted(f"self_influence/{p.name}" for p in (out / "self_influence").glob("*.npy")) if self_influence else []
    return {n: {"bytes": (out / n).stat().st_size, "sha256": sha256_file(out / n)} for n in names}


def drift(rows_at_fit: int, added: int, deleted: int) -> dict[str, Any]:
    """How far the index moved from the state it was fitted on, and whether to rebuild."""
    fraction = (added + deleted) / max(rows_at_fit, 1)
    advised = fraction > REBUILD_ADVISED_FRACTION
    return {
        "rows_at_fit": rows_at_fit, "added_since_fit": added, "deleted_since_fit": deleted,
        "fraction": round(fraction, 6), "rebuild_advised": advised,
        "reason": (f"{added} added and {deleted} deleted records are {fraction:.0%} of the "
                   f"{rows_at_fit} the method state (e.g. TRAK's preconditioner) and the FAISS "
                   "partition were fitted on; rebuild the index") if advised else None,
    }


def library_versions() -> dict[str, str]:
    import faiss
    import torch

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    from attribution.version import FEATURIZER_VERSION

    return {"python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "faiss": faiss.__version__,
            "pyarrow": version("pyarrow"), "tdaserve": version("tdaserve"),
            "featurizer": str(FEATURIZER_VERSION)}


def _now() -> str:
    return _iso(time.time())


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _published_plan(directory: Path, key: str) -> BuildResult | None:
    """A published version built from the same plan (re-pointing ``current`` if needed)."""
    for version in reversed(versions(directory)):
        path = directory / "versions" / version
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if manifest.get("plan") == key and len(manifest.get("history", [])) == 1:
            with locked(directory):
                if read_current(directory) != version:
                    write_current(directory, version)
            shutil.rmtree(directory / "staging" / key, ignore_errors=True)
            return BuildResult(path, version, read_manifest(path), 0, reused=True)
    return None


def _remove_if_empty(path: Path) -> None:
    with suppress(OSError):
        path.rmdir()


@contextmanager
def _staging_lock(staging: Path) -> Iterator[None]:
    staging.mkdir(parents=True, exist_ok=True)
    with open(staging / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexerError(
                f"another process is building the same index plan in {staging}; wait for it"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
