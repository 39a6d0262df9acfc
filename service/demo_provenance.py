"""The provenance part of ``tda demo``: a tiny GPT-2 reproduces a passage; where is it from?

Trains the demo causal LM (:mod:`indexer.demo_lm`) into the file area, registers it, builds an index
over its text corpus with the method recommended for causal-LM provenance
(:data:`indexer.provenance.LM_METHOD`: EK-FAC influence, which also ranks the memorised document
first when the output comes without its prompt; a build_index job, which also builds the
verbatim-span index), lets the model continue the opening words of a planted passage, and asks
``POST /v1/provenance`` where the continuation comes from, then where the bare passage comes from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def run_provenance_demo(tda: Any, files: Path, console: Console,
                        wait: Callable[[Any, str, Console], dict], k: int = 5) -> dict:
    """Train, index, generate and trace; prints each step and returns the provenance answer."""
    import contextlib
    import json

    from indexer.demo_lm import PASSAGES, generate, write_demo_lm
    from indexer.provenance import LM_METHOD, LM_METHOD_ARGS
    from service.client import APIError

    demo = write_demo_lm(files / "demo-lm")
    console.print(f"trained a {demo.vocab_size}-word tiny GPT-2 on {demo.num_documents} "
                  f"documents in {demo.train_seconds:.1f} s (final loss {demo.final_loss:.2f})")
    for kind, path in (("models", "demo-lm/model.yaml"), ("corpora", "demo-lm/corpus.jsonl")):
        with contextlib.suppress(APIError):  # not registered yet
            tda.request("DELETE", f"/v1/{kind}/demo-lm")
        tda.register(kind, "demo-lm", path)
    job = tda.submit("build_index", {"name": "demo-lm", "model": "demo-lm", "corpus": "demo-lm",
                                     "method": LM_METHOD,  # early checkpoints: see RESULTS.md
                                     "method_args": {**LM_METHOD_ARGS, "checkpoints": [0, 1]}})
    wait(tda, job["id"], console)
    texts = {(d := json.loads(line))["id"]: d["text"]
             for line in demo.corpus.read_text(encoding="utf-8").splitlines()}
    doc_id, passage, _ = PASSAGES[0]
    prompt = texts[doc_id][: texts[doc_id].index(passage)] + " ".join(passage.split()[:3])
    output = generate(demo.card, prompt, len(passage.split()))
    console.print(f"[bold]prompt[/]: {prompt}\n[bold]model output[/]: {output}")
    answer = tda.request("POST", "/v1/provenance", json={"index": "demo-lm", "prompt": prompt,
                                                         "output": output, "k": k})
    spans = Table("span in the output", "count", "document", "offsets", "license")
    for span in answer["spans"]:
        for doc in span["documents"]:
            spans.add_row(span["text"], str(span["count"]), doc["id"],
                          f"{doc['start']}–{doc['end']}", str(doc["metadata"].get("license")))
    console.print(spans)
    _ranked(console, answer, "with its prompt")
    top = answer["documents"][0]
    console.print(f"most likely source: [bold]{top['id']}[/] ({top['metadata'].get('url')}): "
                  f"{top['matched_tokens']} tokens copied verbatim, attribution rank "
                  f"{top['attribution_rank']}")
    bare = tda.request("POST", "/v1/provenance", json={"index": "demo-lm", "output": passage,
                                                       "k": k, "prompt": ""})
    _ranked(console, bare, "the passage alone, no prompt")
    return answer


def _ranked(console: Console, answer: dict, what: str) -> None:
    """The attribution ranking of one answer as a table."""
    ranked = Table("rank", f"document (by {answer['attribution']['method']}: {what})", "score",
                   "source")
    for doc in answer["attribution"]["documents"]:
        ranked.add_row(str(doc["rank"]), doc["id"], f"{doc['score']:.3g}",
                       str(doc["metadata"].get("source")))
    console.print(ranked)
