"""``evaluate``: LDS of each method against models retrained on random subsets.

LDS = mean over test examples of the Spearman correlation, across subsets S_k, between the
predicted effect Σ_{i∈S_k} score(test, i) and the output of a model retrained on S_k.
Retraining is one unit per subset, so progress (and cancellation) moves subset by subset.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from worker.kinds.common import build, fit_in_shards, inline_examples, load_model_and_corpus
from worker.results import Result
from worker.runner import JobContext


def run(ctx: JobContext) -> Result:
    from attribution import evaluate, models, training
    from indexer.errors import IndexerError

    p = ctx.params
    loaded = load_model_and_corpus(ctx)
    arch = loaded.card.architecture
    if not arch.builtin:
        raise IndexerError("evaluate retrains the model from scratch, which needs a built-in "
                           "architecture (mlp, logistic_regression, small_cnn, tiny_gpt2)")
    test = inline_examples(ctx, "test_path", loaded.card, loaded.corpus)
    train = loaded.corpus.examples()
    overrides = {"epochs": p["epochs"]} if p.get("epochs") else {}
    config = training.default_config(arch.builtin, **overrides)
    plan = evaluate.SubsetPlan(len(train), p.get("alpha", 0.5), p["num_subsets"], p.get("seed", 0))

    def make_model(seed: int):  # type: ignore[no-untyped-def]
        return models.build(arch.builtin, **{**arch.config, "seed": seed})

    outcomes = []
    for k in range(plan.n_subsets):
        ctx.progress(0.05 + 0.6 * k / plan.n_subsets, f"retraining on subset {k + 1}/{plan.n_subsets}")
        outcomes.append(evaluate.retrain_subset(plan, k, make_model, type(loaded.task), train,
                                                test, config))
    outputs = np.stack([o.outputs for o in outcomes])
    masks = plan.masks()
    rows = []
    for i, name in enumerate(p["methods"]):
        start = 0.65 + 0.35 * i / len(p["methods"])
        method = build(ctx, loaded.task, name, p.get("method_args", {}).get(name, {}))
        fitted = fit_in_shards(ctx, method, loaded.corpus, start, start + 0.3 / len(p["methods"]))
        scores = fitted.query_vectors(test) @ fitted.train_vectors().astype(np.float32).T
        result = evaluate.lds(scores, masks, outputs)
        rows.append({"method": name, "lds": float(result.mean),
                     "undefined": int(result.n_undefined), "arguments": str(method.arguments())})
    summary = {"plan": plan.to_dict(), "config": dataclasses.asdict(config),
               "lds": {r["method"]: r["lds"] for r in rows}}
    return Result(pa.Table.from_pylist(rows), {"masks": masks, "outputs": outputs}, summary)
