"""``provenance``: trace a batch of LLM outputs to their training documents (spans + attribution).

One result row per (output, document) of the merged answer: verbatim evidence first, then by
attribution score; spans and metadata are JSON text. The summary keeps, per output, its span
count and its top documents.
"""

from __future__ import annotations

import json

import pyarrow as pa

from worker.kinds.common import open_index
from worker.results import Result
from worker.runner import JobContext

SCHEMA = pa.schema([
    ("item", pa.int64()), ("position", pa.int64()), ("id", pa.string()), ("blocked", pa.bool_()),
    ("matched_tokens", pa.int64()), ("attribution_score", pa.float64()),
    ("attribution_rank", pa.int64()), ("spans", pa.string()), ("metadata", pa.string()),
])


def run(ctx: JobContext) -> Result:
    from indexer.provenance import ProvenanceOptions, read_takedown, takedown_files, trace

    index = open_index(ctx)
    options = ProvenanceOptions(**{f: ctx.params[f] for f in ProvenanceOptions.__dataclass_fields__
                                   if f in ctx.params})
    takedown = read_takedown(takedown_files(ctx.settings.data_dir,
                                            ctx.settings.tenant_dir(ctx.tenant)))
    items = ctx.params["items"]
    rows, outputs = [], []
    for i, item in enumerate(items):
        ctx.progress(0.05 + 0.9 * i / len(items), f"tracing output {i + 1} of {len(items)}")
        answer = trace(index, item["prompt"], item["output"], options, takedown)
        for position, doc in enumerate(answer["documents"], 1):
            rows.append({"item": i, "position": position, "id": doc["id"],
                         "blocked": doc["blocked"], "matched_tokens": doc["matched_tokens"],
                         "attribution_score": doc["attribution_score"],
                         "attribution_rank": doc["attribution_rank"],
                         "spans": json.dumps(doc["spans"], ensure_ascii=False),
                         "metadata": json.dumps(doc["metadata"], ensure_ascii=False, default=str)})
        outputs.append({"item": i, "spans": len(answer["spans"]),
                        "top_documents": [d["id"] for d in answer["documents"][:5]],
                        "truncated": answer["attribution"]["truncated"]})
    summary = {"index": index.name, "version": index.version,
               "method": index.manifest["method"]["name"], "items": len(items),
               "options": options.__dict__, "outputs": outputs}
    return Result(pa.Table.from_pylist(rows, schema=SCHEMA), {}, summary)
