"""``evaluate``: LDS of each method against models retrained on random subsets.

LDS = mean over test examples of the Spearman correlation, across subsets S_k, between the
predicted effect Σ_{i∈S_k} score(test, i) and the output of a model retrained on S_k.
The retraining is the ``subsets`` job's: chunks of subsets shared with parallel chunk tasks,
resumable, with progress (and cancellation) chunk by chunk — or, with ``subsets_job``, the
result of a finished ``subsets`` job for the same model, corpus and test examples.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from worker.kinds.common import build, fit_in_shards
from worker.kinds.subsets import finished_results, retrain_in_chunks, retraining
from worker.results import Result
from worker.runner import JobContext


def run(ctx: JobContext) -> Result:
    from attribution import evaluate

    p = ctx.params
    setup = retraining(ctx)
    if p.get("subsets_job"):  # the ground truth a subsets job already retrained
        truth, how = finished_results(ctx, p["subsets_job"]), {"subsets_job": p["subsets_job"]}
    else:
        truth, how = retrain_in_chunks(ctx, setup, 0.05, 0.65)
    outputs, masks, test = truth.outputs, truth.masks, setup.test
    rows = []
    for i, name in enumerate(p["methods"]):
        start = 0.65 + 0.35 * i / len(p["methods"])
        method = build(ctx, setup.loaded.task, name, p.get("method_args", {}).get(name, {}))
        fitted = fit_in_shards(ctx, method, setup.loaded.corpus, start,
                               start + 0.3 / len(p["methods"]))
        scores = fitted.query_vectors(test) @ fitted.train_vectors().astype(np.float32).T
        result = evaluate.lds(scores, masks, outputs)
        rows.append({"method": name, "lds": float(result.mean),
                     "undefined": int(result.n_undefined), "arguments": str(method.arguments())})
    summary = {"plan": truth.meta.get("plan", setup.plan.to_dict()),
               "config": truth.meta.get("config", dataclasses.asdict(setup.config)),
               "lds": {r["method"]: r["lds"] for r in rows}, "retraining": how}
    return Result(pa.Table.from_pylist(rows), {"masks": masks, "outputs": outputs}, summary)
