"""Provenance of an LLM output: verbatim spans and gradient attribution, merged per document.

For a (prompt, output) pair and a published causal-LM index:

* **spans** — maximal spans of the output found verbatim in the corpus (whole words, not
  crossing sentence ends, rarest first), each with up to N documents, offsets and a snippet
  (:meth:`indexer.verbatim.VerbatimIndex.spans`);
* **attribution** — the top-k training documents by ⟨query, train(i)⟩, where the query is the
  gradient of log p(output | prompt) (prompt tokens labelled −100, see
  :func:`attribution.lm.prompt_output_example`) featurized by the index's own method;
* **documents** — the union of both, each with its spans, attribution score and metadata:
  documents with verbatim evidence first (most matched tokens), then by attribution score.

Documents named by a takedown list come back with ``blocked: true`` and no snippet.

**Which gradient method.** With the prompt the model actually continued, TRAK, TracIn and EK-FAC
influence all rank a memorised document first. Without a prompt (or with only the passage's
first words) the output's early tokens are surprising, their gradients dominate the query, and
TRAK's whitened kernel can put the memorised document near *last*; TracIn and Grad-Cos are right
on some seeds only. EK-FAC influence (:data:`LM_METHOD`, :data:`LM_METHOD_ARGS`) ranked it first
for every passage, query kind and seed measured, by 3.9× or more without a prompt: the
memorised document's loss gradient is small where it is well fitted, and the inverse curvature
weights exactly those rarely exercised directions up. Its train vectors are unprojected
(per-layer gradients × checkpoints), so it suits small models; ``benchmarks/RESULTS.md``
(Provenance) has the numbers and ``python benchmarks/provenance_bench.py --ranking`` the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from indexer.errors import IndexerError

TAKEDOWN_FILE = "takedown.txt"
#: the engine method that ranks memorised documents first also for prompt-free outputs
LM_METHOD = "influence"
LM_METHOD_ARGS: dict[str, Any] = {"solver": "ekfac"}


class ProvenanceError(IndexerError):
    """A provenance request that cannot be answered as asked (e.g. an output without words)."""


@dataclass
class ProvenanceOptions:
    """How much to return; every field is echoed in the answer."""

    k: int = 10
    max_docs_per_span: int = 5
    min_span_tokens: int = 3
    max_span_count: int = 1000
    context_chars: int = 80


# --- the takedown list ------------------------------------------------------------------------
_takedown_cache: dict[Path, tuple[float, frozenset[str]]] = {}


def takedown_files(data_dir: Path, tenant_dir: Path) -> list[Path]:
    """Where takedown lists live: ``<data dir>/takedown.txt`` for every tenant, and
    ``<tenant dir>/takedown.txt`` for one tenant."""
    return [Path(data_dir) / TAKEDOWN_FILE, Path(tenant_dir) / TAKEDOWN_FILE]


def read_takedown(paths: Iterable[str | os.PathLike[str]]) -> frozenset[str]:
    """Document ids listed in the takedown files that exist (one id per line, ``#`` comments).

    Files are re-read only when their modification time changes.
    """
    found: set[str] = set()
    for raw in paths:
        path = Path(raw)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        cached = _takedown_cache.get(path)
        if cached is None or cached[0] != mtime:
            lines = path.read_text(encoding="utf-8").splitlines()
            ids = frozenset(s for line in lines if (s := line.split("#", 1)[0].strip()))
            cached = _takedown_cache[path] = (mtime, ids)
        found |= cached[1]
    return frozenset(found)


# --- the two halves ----------------------------------------------------------------------------
def _encoder(index: Any) -> Any:
    """The model's own tokenizer (from its card, cached by the index), as ``text -> ids``."""
    from indexer.cards import tokenizer_dir

    if tokenizer_dir(index.card) is None:
        raise ProvenanceError(
            f"index {index.name}'s model card names no tokenizer; provenance needs text inputs"
        )
    tokenize = index.tokenizer()
    return lambda text: tokenize([text])[0] if text else []


def query_example(index: Any, prompt: str, output: str) -> Any:
    """The engine example whose measurement is log p(output | prompt) under the index's model."""
    from attribution.errors import AttributionError
    from attribution.lm import prompt_output_example

    encode = _encoder(index)
    try:
        return prompt_output_example(encode(prompt), encode(output), _context_length(index))
    except AttributionError as err:
        raise ProvenanceError(str(err)) from err


def _context_length(index: Any) -> int:
    """Tokens the model reads at once: the card's max_length, else the model's positions."""
    if index.card.max_length:
        return int(index.card.max_length)
    config = getattr(index.method().task.model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(config, name, None), int):
            return int(getattr(config, name))
    return 1024


def attribution_hits(index: Any, prompt: str, output: str, k: int, takedown: frozenset[str]
                     ) -> dict[str, Any]:
    """Top-k documents by attribution to log p(output | prompt), with metadata."""
    query = query_example(index, prompt, output)
    vectors = index.query_vectors(query.examples, "output")
    top = index.topk(vectors, k=k)
    hits = top.hits(0)
    records = {r["id"]: r for r in index.records([h["id"] for h in hits])}
    documents = []
    for h in hits:
        metadata = {key: v for key, v in records[h["id"]].items() if key != "id"}
        documents.append({**h, "metadata": metadata, "blocked": h["id"] in takedown})
    return {"status": "done", "method": index.manifest["method"]["name"],
            "measurement": "log p(output | prompt)", "prompt_tokens": query.prompt_tokens,
            "output_tokens": query.output_tokens, "truncated": query.truncated,
            "documents": documents}


def verbatim_spans(index: Any, output: str, options: ProvenanceOptions,
                   takedown: frozenset[str]) -> list[dict[str, Any]]:
    """The output's verbatim spans; deleted documents left out, blocked ones without snippet."""
    spans = index.verbatim().spans(
        output, max_docs_per_span=options.max_docs_per_span, min_tokens=options.min_span_tokens,
        max_count=options.max_span_count, context_chars=options.context_chars)
    found = []
    for span in spans:
        item = asdict(span)
        docs = []
        for doc in item["documents"]:
            if not _live(index, doc["id"]):
                continue
            blocked = doc["id"] in takedown
            docs.append({**doc, "blocked": blocked, "snippet": None if blocked else doc["snippet"]})
        if not docs and span.count <= len(item["documents"]):
            continue  # every occurrence is in deleted documents
        item["documents"] = docs
        found.append(item)
    return found


def _live(index: Any, doc_id: str) -> bool:
    try:
        index.rows_of([doc_id])
    except IndexerError:
        return False
    return True


# --- merging -----------------------------------------------------------------------------------
def merge_documents(spans: list[dict[str, Any]], hits: list[dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    """One entry per document: its spans (output and document offsets), score, metadata."""
    merged: dict[str, dict[str, Any]] = {}

    def entry(doc_id: str, metadata: dict[str, Any], blocked: bool) -> dict[str, Any]:
        if doc_id not in merged:
            merged[doc_id] = {"id": doc_id, "metadata": metadata, "blocked": blocked,
                              "spans": [], "matched_tokens": 0, "attribution_score": None,
                              "attribution_rank": None}
        return merged[doc_id]

    for i, span in enumerate(spans):
        for doc in span["documents"]:
            e = entry(doc["id"], doc["metadata"], doc["blocked"])
            e["spans"].append({"span": i, "text": span["text"], "output_start": span["start"],
                               "output_end": span["end"], "document_start": doc["start"],
                               "document_end": doc["end"], "snippet": doc["snippet"]})
            e["matched_tokens"] += span["num_tokens"]
    for hit in hits:
        e = entry(hit["id"], hit["metadata"], hit["blocked"])
        e["attribution_score"], e["attribution_rank"] = hit["score"], hit["rank"]
    return sorted(merged.values(), key=lambda d: (
        -d["matched_tokens"],
        d["attribution_rank"] if d["attribution_rank"] is not None else float("inf"), d["id"]))


def trace(index: Any, prompt: str, output: str, options: ProvenanceOptions | None = None,
          takedown: frozenset[str] = frozenset(), attribution: bool = True) -> dict[str, Any]:
    """Spans, attribution (unless ``attribution`` is False) and the merged documents."""
    options = options or ProvenanceOptions()
    if not isinstance(output, str) or not isinstance(prompt, str):
        raise ProvenanceError("prompt and output must be strings")
    if not output.strip():
        raise ProvenanceError("the output is empty: there is nothing to trace")
    if options.k < 1:
        raise ProvenanceError(f"k must be at least 1, got {options.k}")
    spans = verbatim_spans(index, output, options, takedown)
    found = attribution_hits(index, prompt, output, options.k, takedown) if attribution else None
    return {
        "index": index.name, "version": index.version, "options": asdict(options),
        "spans": spans, "attribution": found,
        "documents": merge_documents(spans, found["documents"] if found else []),
    }
