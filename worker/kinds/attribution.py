"""``attribution``: any method over the whole corpus for a batch of test examples.

Stores the full score matrix S = Q Tᵀ (``scores.npy``, n_test × n_train) and a table of the
top-k proponents per test example (what the result pages list).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from worker.kinds.common import build, fit_in_shards, inline_examples, load_model_and_corpus
from worker.results import Result
from worker.runner import JobContext


def run(ctx: JobContext) -> Result:
    loaded = load_model_and_corpus(ctx)
    test = inline_examples(ctx, "examples_path", loaded.card, loaded.corpus)
    method = build(ctx, loaded.task)
    fitted = fit_in_shards(ctx, method, loaded.corpus, 0.05, 0.9)
    ctx.progress(0.9, f"scoring {len(test)} test examples")
    queries = fitted.query_vectors(test, ctx.params.get("measurement", "output"))
    scores = queries @ fitted.train_vectors().astype(np.float32, copy=False).T
    k = min(int(ctx.params.get("k", 10)), scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    rows = np.repeat(np.arange(scores.shape[0]), k)
    table = pa.table({
        "test_index": pa.array(rows),
        "rank": pa.array(np.tile(np.arange(1, k + 1), scores.shape[0])),
        "id": pa.array(loaded.corpus.ids[order.ravel()].astype(str)),
        "score": pa.array(np.take_along_axis(scores, order, 1).ravel().astype(np.float64)),
    })
    summary = {"method": method.arguments(), "n_test": int(scores.shape[0]),
               "n_train": int(scores.shape[1]), "k": k,
               "measurement": ctx.params.get("measurement", "output")}
    return Result(table, {"scores": scores, "train_ids": loaded.corpus.ids.astype(str)}, summary)
