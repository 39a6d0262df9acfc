"""``valuation``: value_i = ⟨Σ_j query(v_j), train(i)⟩ over a validation set — one mat-vec.

Negative values mark records whose training raised the validation loss.
"""

from __future__ import annotations

from worker.kinds.common import (
    build,
    examples_for_index,
    fit_in_shards,
    inline_examples,
    load_model_and_corpus,
    open_index,
    ranked_table,
    stored_arrays,
)
from worker.results import Result
from worker.runner import JobContext


def run(ctx: JobContext) -> Result:
    if ctx.params.get("index"):
        index = open_index(ctx)
        ctx.progress(0.3, "featurizing the validation set")
        validation = examples_for_index(index, *stored_arrays(ctx, "validation_path"))
        queries = index.query_vectors(validation, "loss")
        ctx.progress(0.7, "valuing records")
        values, ids, source = index.value(queries), index.ids, index
        method = index.manifest["method"]
    else:
        from attribution.applications import value

        loaded = load_model_and_corpus(ctx)
        validation = inline_examples(ctx, "validation_path", loaded.card, loaded.corpus)
        fitted = fit_in_shards(ctx, build(ctx, loaded.task), loaded.corpus, 0.05, 0.9)
        ctx.progress(0.9, "valuing records")
        values, ids, source = value(fitted, validation), loaded.corpus.ids, loaded.corpus
        method = fitted.arguments()
    table = ranked_table(source, ids, values, "value")
    summary = {"method": method, "records": int(len(values)),
               "total_value": float(values.sum()), "negative": int((values < 0).sum())}
    return Result(table, {"values": values}, summary)

