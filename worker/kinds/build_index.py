"""``build_index``: featurize the corpus and publish a new index version (``indexer``).

The indexer builds in shards and resumes from finished shards, so a redelivered build picks up
where the killed one stopped; its progress callback is where a cancel request lands.
"""

from __future__ import annotations

import pyarrow as pa

from worker.results import Result
from worker.runner import JobContext

#: share of the job's progress bar for each stage the indexer reports
_STAGES = {"featurize": (0.05, 0.65), "transform": (0.65, 0.9), "index": (0.9, 1.0)}


def run(ctx: JobContext) -> Result:
    from indexer.build import build_index

    p = ctx.params

    def progress(stage: str, done: int, total: int) -> None:
        low, high = _STAGES.get(stage, (0.0, 0.05))
        ctx.progress(low + (high - low) * done / max(total, 1), f"{stage} {done}/{total}")

    ctx.progress(0.0, "loading model and corpus")
    built = build_index(p["model_path"], p["corpus_path"], name=p["name"], root=ctx.index_root,
                        method=p["method"], method_args=p.get("method_args") or {},
                        index_kind=p.get("index_kind", "auto"), data_root=ctx.data_root,
                        show_progress=False, progress=progress)
    m = built.manifest
    row = {"name": p["name"], "version": built.version, "method": m["method"]["name"],
           "records": m["counts"]["live"], "dim": m["dim"], "index_kind": m["faiss"]["kind"],
           "recall": str(m["faiss"].get("recall")), "build_seconds": m["build"]["seconds"],
           "reused": built.reused}
    return Result(pa.Table.from_pylist([row]), {}, row)
