"""POST /v1/provenance and the ``provenance`` job over HTTP (real uvicorn, Celery worker, Redis).

The demo tiny GPT-2 is trained here on its synthetic corpus, registered, and indexed by a
build_index job (the text corpus also gets its verbatim-span index)."""

from __future__ import annotations

import json

import httpx
import pytest
from service_helpers import PROBLEM, TENANT, extra_api

from indexer.demo_lm import PASSAGES, write_demo_lm

pytestmark = [pytest.mark.timeout(240), pytest.mark.filterwarnings("ignore:There is a perf")]
URL = "/v1/provenance"


@pytest.fixture(scope="module")
def lm(world):  # type: ignore[no-untyped-def]
    files = world.harness.settings.files_dir(TENANT)
    demo = write_demo_lm(files / "demo-lm")
    with world.client() as tda:
        tda.register("models", "demo-lm", "demo-lm/model.yaml")
        tda.register("corpora", "demo-lm", "demo-lm/corpus.jsonl")
        job = tda.submit("build_index", {"name": "demo-lm", "model": "demo-lm",
                                         "corpus": "demo-lm", "method": "trak",
                                         "method_args": {"proj_dim": 1024,
                                                         "gradient": "factored"}})
        done = tda.wait(job["id"], timeout=180)
    assert done["state"] == "succeeded", done
    texts = {(d := json.loads(line))["id"]: d["text"]
             for line in demo.corpus.read_text(encoding="utf-8").splitlines()}
    return demo, texts


def _ask(world, key: str, **body):  # type: ignore[no-untyped-def]
    with world.http(key) as http:
        return http.post(URL, json={"index": "demo-lm", **body})


def test_planted_passage_and_memorised_document_over_http(world, lm) -> None:
    _, texts = lm
    doc_id, passage, license_ = PASSAGES[0]
    text = texts[doc_id]
    words = passage.split()
    prompt = text[: text.index(passage)] + " ".join(words[:3])
    output = " ".join(words[3:])
    reply = _ask(world, world.reader, prompt=prompt, output=output, k=5)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    span = body["spans"][0]
    assert span["text"] == output and span["start"] == 0 and span["count"] == 1
    (doc,) = span["documents"]
    assert doc["id"] == doc_id and text[doc["start"]:doc["end"]] == output
    assert doc["metadata"]["license"] == license_ and doc["blocked"] is False
    attribution = body["attribution"]
    assert attribution["status"] == "done" and attribution["method"] == "trak"
    assert attribution["documents"][0]["id"] == doc_id and len(attribution["documents"]) == 5
    first = body["documents"][0]
    assert first["id"] == doc_id and first["attribution_rank"] == 1 and first["spans"]


def test_bad_and_odd_inputs_get_clear_answers(world, lm) -> None:
    for body, status, words in [
        ({"prompt": "x", "output": ""}, 422, "output"),
        ({"prompt": "x", "output": "  \n "}, 422, "empty"),
        ({"prompt": "x", "output": "a" * 100_001}, 422, "output"),
        ({"prompt": "x", "output": "word " * 5000}, 422, "MAX_OUTPUT_TOKENS"),
        ({"prompt": "x", "output": "hi", "k": 0}, 422, "k"),
        ({"prompt": "x", "output": "hi", "index": "nope"}, 404, "nope"),
        ({"prompt": "x", "output": "hi", "index": "digits"}, 422, "verbatim"),
    ]:
        reply = _ask(world, world.reader, **body)
        assert reply.status_code == status, (body, reply.text)
        assert reply.headers["content-type"] == PROBLEM and words in reply.text
    unicode = _ask(world, world.reader, prompt="¿Qué? 東京", output=f"Zürich ☃ — {PASSAGES[1][1]} 🎉")
    assert unicode.status_code == 200, unicode.text
    assert unicode.json()["spans"][0]["documents"][0]["id"] == PASSAGES[1][0]
    nothing = _ask(world, world.reader, prompt="Quantum chromodynamics", output="Gluons bind quarks.")
    assert nothing.status_code == 200 and nothing.json()["spans"] == []
    assert len(nothing.json()["attribution"]["documents"]) == 10
    spans_only = _ask(world, world.reader, output=PASSAGES[0][1], attribution=False).json()
    assert spans_only["attribution"]["status"] == "skipped"
    assert [d["id"] for d in spans_only["documents"]] == [PASSAGES[0][0]]
    with world.http(world.rival) as http:  # another tenant cannot see the index
        assert http.post(URL, json={"index": "demo-lm", "output": "hi"}).status_code == 404


def test_takedown_list_blocks_documents(world, lm) -> None:
    doc_id, passage, _ = PASSAGES[2]
    listing = world.harness.settings.tenant_dir(TENANT) / "takedown.txt"
    listing.write_text(f"# legal request\n{doc_id}\n")
    try:
        body = _ask(world, world.reader, output=passage, k=3).json()
    finally:
        listing.unlink()
    doc = body["spans"][0]["documents"][0]
    assert doc["id"] == doc_id and doc["blocked"] is True and doc["snippet"] is None
    again = _ask(world, world.reader, output=passage, k=3).json()
    assert again["spans"][0]["documents"][0]["blocked"] is False


def test_provenance_job_for_a_batch(world, lm) -> None:
    items = [{"prompt": "", "output": p} for _, p, _ in PASSAGES[:2]]
    with world.client() as tda:
        job = tda.submit("provenance", {"index": "demo-lm", "items": items, "k": 3})
        done = tda.wait(job["id"], timeout=120)
        assert done["state"] == "succeeded", done
        rows = list(tda.result_rows(job["id"]))
    for i, (doc_id, _, _) in enumerate(PASSAGES[:2]):
        first = next(r for r in rows if r["item"] == i and r["position"] == 1)
        assert first["id"] == doc_id and json.loads(first["spans"])[0]["document_start"] >= 0
    assert done["result"]["summary"]["outputs"][1]["top_documents"][0] == PASSAGES[1][0]


@pytest.fixture(scope="module")
def large_model_api(world, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A second API on the same Redis and data that counts every model as large."""
    with extra_api(world, tmp_path_factory.mktemp("api-large"), preload_indexes=False,
                   api_query_max_parameters=0) as api:
        yield api


def test_large_model_answers_spans_now_and_queues_attribution(world, lm, large_model_api
                                                                ) -> None:
    doc_id, passage, _ = PASSAGES[1]
    body = {"index": "demo-lm", "prompt": "", "output": passage, "k": 3}
    with httpx.Client(base_url=large_model_api.url, timeout=60) as http:
        reader = http.post(URL, json=body, headers={"X-API-Key": world.reader})
        reply = http.post(URL, json=body, headers={"X-API-Key": world.admin})
    assert reader.status_code == 403 and "submit" in reader.text
    assert reply.status_code == 202, reply.text
    answer = reply.json()
    assert answer["spans"][0]["documents"][0]["id"] == doc_id
    assert answer["attribution"]["status"] == "queued"
    assert reply.headers["location"] == answer["attribution"]["location"]
    with world.client() as tda:
        done = tda.wait(answer["attribution"]["job_id"], timeout=120)
        assert done["state"] == "succeeded" and done["kind"] == "provenance"
        rows = list(tda.result_rows(done["id"]))
    assert rows[0]["id"] == doc_id


def test_provenance_job_refuses_blank_outputs_at_submission(world, lm) -> None:
    with world.http(world.admin) as http:
        reply = http.post("/v1/jobs", json={"kind": "provenance", "params": {
            "index": "demo-lm", "items": [{"output": "fine"}, {"output": " \t"}]}})
    assert reply.status_code == 422 and reply.headers["content-type"] == PROBLEM
    assert "empty" in reply.text


def test_topk_by_text_uses_the_models_word_level_tokenizer(world, lm) -> None:
    """Top-k accepts the memorised passage as text: the demo LM's word-level tokenizer reads it."""
    doc_id, passage, _ = PASSAGES[0]
    with world.http(world.reader) as http:
        reply = http.post("/v1/indexes/demo-lm/topk", json={"examples": {"text": [passage]}, "k": 3})
    assert reply.status_code == 200, reply.text
    assert reply.json()["results"][0]["proponents"][0]["id"] == doc_id


def test_preload_opens_the_verbatim_index(world, lm) -> None:  # type: ignore[no-untyped-def]
    """Preloading (for /readyz) opens an index's verbatim part too: the first provenance
    request does not pay for opening the suffix array."""
    import gc

    from service.indexes import IndexCache

    cache = IndexCache(world.harness.settings)
    try:
        cache.preload()
        index = cache.get(TENANT, "demo-lm")
        assert f"{TENANT}/demo-lm" not in cache.preload_errors
        assert index._verbatim is not None  # opened by preload, before any request
        assert index.verbatim().count(PASSAGES[0][1]) == 1
    finally:
        gc.unfreeze()  # preload freezes what lives in a serving process; not in this one
        cache.close()
