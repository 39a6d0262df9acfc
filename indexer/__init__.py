"""Offline builds of versioned attribution indexes, and read-only queries against them.

corpus + model card → train-side vectors (any engine method, in resumable shards) → a FAISS
index on disk, published atomically as ``<root>/<name>/versions/vNNNN`` with a ``current``
pointer. The service opens them with :class:`AttributionIndex`.
"""

from indexer.build import BuildResult, build_index
from indexer.cards import ModelCard, load_card, load_task, register_architecture
from indexer.corpus import Corpus, load_corpus
from indexer.errors import (
    CardError,
    CorpusError,
    IndexCorruptError,
    IndexerError,
    IndexMismatchError,
    IndexNotFoundError,
)
from indexer.index import AttributionIndex, TopK
from indexer.update import add_records, delete_records, prune_versions, rebuild_faiss, retune

__all__ = [
    "AttributionIndex",
    "BuildResult",
    "CardError",
    "Corpus",
    "CorpusError",
    "IndexCorruptError",
    "IndexMismatchError",
    "IndexNotFoundError",
    "IndexerError",
    "ModelCard",
    "TopK",
    "add_records",
    "build_index",
    "delete_records",
    "load_card",
    "load_corpus",
    "load_task",
    "prune_versions",
    "rebuild_faiss",
    "register_architecture",
    "retune",
]
