"""What the job kinds share: load the model, corpus and inline examples; fit in shards.

Fitting runs the engine's staged path (``prepare`` → per shard ``featurize_train`` and
``observe`` → ``finalize_state`` → ``transform_train``) so that progress is published and a
cancel request is honoured between shards, never in the middle of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from worker.runner import JobContext

SHARD_ROWS = 1024


@dataclass
class Loaded:
    """A model card, its engine task and the training corpus, as one job uses them."""

    card: Any
    task: Any
    corpus: Any


def load_model_and_corpus(ctx: JobContext) -> Loaded:
    """The job's model (card → task) and corpus, with paths confined to the tenant's files."""
    from indexer.build import check_examples, read_corpus
    from indexer.cards import load_card, load_task

    ctx.progress(0.0, "loading model and corpus")
    card = load_card(ctx.params["model_path"], ctx.data_root)
    corpus = read_corpus(ctx.params["corpus_path"], card, ctx.data_root)
    task = load_task(card)
    check_examples(task, corpus)
    return Loaded(card, task, corpus)


def stored_arrays(ctx: JobContext, key: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The inline examples the API stored for this job (``x`` and, if given, ``y``)."""
    with np.load(ctx.params[key], allow_pickle=False) as data:
        return data["x"], (data["y"] if "y" in data.files else None)


def examples_for_index(index: Any, x: np.ndarray, y: np.ndarray | None) -> Any:
    """Engine examples shaped for ``index``: its corpus's input dtype, its task's label type."""
    from indexer.errors import IndexerError

    task = index.manifest["model"]["task"]
    if index.manifest["corpus"]["input_dtype"].startswith("int"):
        if not np.array_equal(x, np.round(x)):
            raise IndexerError("this index reads token ids: the inputs x must be integers")
        x = x.astype(np.int64)
    if y is None:
        if task != "causal-lm":
            raise IndexerError(f"examples need labels y for a {task} model")
        y = x.astype(np.int64)
    elif task == "regression":
        y = y.astype(np.float32)
    elif not np.array_equal(y, np.round(y)):
        raise IndexerError(f"labels of a {task} model must be integers")
    else:
        y = y.astype(np.int64)
    return index.examples(x, y)


def open_index(ctx: JobContext) -> Any:
    """The index version the job was submitted against (pinned at submission)."""
    from indexer.index import AttributionIndex

    ctx.progress(0.0, "opening the index")
    return AttributionIndex.open(ctx.index_root / ctx.params["index"],
                                 version=ctx.params.get("index_version"))


def ranked_table(source: Any, ids: np.ndarray, values: np.ndarray, column: str) -> pa.Table:
    """Records sorted by ``values`` (highest first) with rank and metadata.

    ``source`` is the corpus (metadata in row order) or an index (metadata looked up by id).
    """
    order = np.argsort(-values, kind="stable")
    head = {"rank": np.arange(1, len(order) + 1), column: values[order].astype(np.float64)}
    if hasattr(source, "metadata"):
        return records_table(source, order, head)
    table = pa.table({"id": pa.array(ids[order].astype(str)),
                      **{k: pa.array(v) for k, v in head.items()}})
    records = source.records(table.column("id").to_pylist())
    columns = sorted({k for r in records for k in r if k != "id"})
    for name in columns:
        table = table.append_column(name, pa.array([r.get(name) for r in records]))
    return table


def inline_examples(ctx: JobContext, key: str, card: Any, like: Any) -> Any:
    """Examples the client sent (stored by the API as ``.npz``), shaped like the corpus."""
    import torch

    from attribution.data import Examples
    from indexer.errors import IndexerError

    x, y = stored_arrays(ctx, key)
    shape = list(like.x.shape[1:])
    if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
        raise IndexerError(
            f"examples have {int(np.prod(x.shape[1:]))} input values each, but the model reads "
            f"{int(np.prod(shape))} (input shape {shape}); send rows like the corpus's"
        )
    x = x.reshape(x.shape[0], *shape).astype(like.x.dtype, copy=False)
    if y is None:
        if card.task != "causal-lm":
            raise IndexerError("examples need labels 'y' for a classification or regression model")
        y = x.copy()
    y = y.astype(like.y.dtype, copy=False)
    return Examples(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))


class FittedMethod:
    """A method fitted shard by shard: the engine's query side plus the train vectors we hold.

    Duck-types the parts of ``Method`` that ``attribution.applications`` uses.
    """

    def __init__(self, method: Any, vectors: np.ndarray):
        self.method, self.vectors = method, vectors

    def train_vectors(self) -> np.ndarray:
        return self.vectors

    def query_vectors(self, data: Any, measurement: str = "output") -> np.ndarray:
        return self.method.query_vectors(data, measurement)

    def arguments(self) -> dict[str, Any]:
        return self.method.arguments()

    def rows(self, start: int, stop: int) -> FittedMethod:
        return FittedMethod(self.method, self.vectors[start:stop])


def fit_in_shards(ctx: JobContext, method: Any, corpus: Any, start: float, stop: float
                  ) -> FittedMethod:
    """Fit ``method`` on the corpus; progress runs from ``start`` to ``stop``."""
    n = len(corpus)
    bounds = [(a, min(a + SHARD_ROWS, n)) for a in range(0, n, SHARD_ROWS)]
    method.prepare(corpus.examples())
    raws = []
    for i, (a, b) in enumerate(bounds):
        ctx.progress(start + (stop - start) * 0.8 * i / len(bounds),
                     f"featurizing training examples {a}-{b} of {n}")
        raws.append(method.featurize_train(corpus.examples(a, b)))
        method.observe(raws[-1])
    method.finalize_state()
    ctx.progress(start + (stop - start) * 0.8, "transforming training vectors")
    vectors = np.concatenate([method.transform_train(raw) for raw in raws])
    return FittedMethod(method, vectors)


def build(ctx: JobContext, task: Any, name: str | None = None, arguments: dict | None = None
          ) -> Any:
    """The engine method the job asks for, with its typed arguments."""
    from attribution.methods import build_method

    return build_method(name or ctx.params["method"], task,
                        **(ctx.params.get("method_args", {}) if arguments is None else arguments))


def records_table(corpus: Any, order: np.ndarray, columns: dict[str, np.ndarray]) -> pa.Table:
    """Rows ``order`` of the corpus: id, the given columns, then the corpus metadata."""
    table = pa.table({"id": pa.array(corpus.ids[order].astype(str)),
                      **{k: pa.array(v) for k, v in columns.items()}})
    metadata = corpus.metadata.take(pa.array(order))
    for name in metadata.column_names:
        table = table.append_column(name, metadata.column(name))
    return table
