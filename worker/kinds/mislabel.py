"""``mislabel``: self-influence ⟨query(i), train(i)⟩ per record, highest first.

A record that strongly supports its own (loss) prediction is one the model had to memorise —
the classic signature of a wrong label. From an index the values were stored at build time.
"""

from __future__ import annotations

import numpy as np

from worker.kinds.common import (
    SHARD_ROWS,
    build,
    fit_in_shards,
    load_model_and_corpus,
    open_index,
    ranked_table,
)
from worker.results import Result
from worker.runner import JobContext


def run(ctx: JobContext) -> Result:
    if ctx.params.get("index"):
        index = open_index(ctx)
        ctx.progress(0.5, "reading stored self-influence")
        scores, ids, source = index.self_influence(), index.ids, index
        method = index.manifest["method"]
    else:
        from attribution.applications import self_influence

        loaded = load_model_and_corpus(ctx)
        fitted = fit_in_shards(ctx, build(ctx, loaded.task), loaded.corpus, 0.05, 0.6)
        n = len(loaded.corpus)
        parts = []
        for a in range(0, n, SHARD_ROWS):
            b = min(a + SHARD_ROWS, n)
            ctx.progress(0.6 + 0.35 * a / n, f"self-influence of examples {a}-{b} of {n}")
            parts.append(self_influence(fitted.rows(a, b), loaded.corpus.examples(a, b)))
        scores, ids, source = np.concatenate(parts), loaded.corpus.ids, loaded.corpus
        method = fitted.arguments()
    table = ranked_table(source, ids, scores, "self_influence")
    summary = {"method": method, "records": int(len(scores)),
               "top_ids": table.column("id").to_pylist()[:10]}
    return Result(table, {"self_influence": scores}, summary)
