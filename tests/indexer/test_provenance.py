"""Provenance of LLM outputs: a tiny GPT-2 trained here memorises planted passages; the index
built from its text corpus finds them verbatim and ranks their documents first by attribution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from indexer.build import build_index
from indexer.cards import load_card
from indexer.cli import index_app
from indexer.demo_lm import PASSAGES, DemoLM, generate, write_demo_lm
from indexer.errors import IndexerError
from indexer.index import AttributionIndex
from indexer.provenance import (
    LM_METHOD,
    LM_METHOD_ARGS,
    ProvenanceError,
    ProvenanceOptions,
    read_takedown,
    trace,
)
from indexer.update import add_records
from indexer.verbatim import MAX_OUTPUT_TOKENS

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")
METHOD_ARGS = {"proj_dim": 1024, "gradient": "factored"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoLM:
    return write_demo_lm(tmp_path_factory.mktemp("demo-lm"))


@pytest.fixture(scope="module")
def index(demo: DemoLM) -> AttributionIndex:
    result = build_index(demo.card, demo.corpus, name="demo", root=demo.directory / "ix",
                         method="trak", method_args=METHOD_ARGS, dtype="float32",
                         show_progress=False, recall_queries=8, data_root=demo.directory)
    opened = AttributionIndex.open(result.path)
    yield opened
    opened.close()


def _documents(demo: DemoLM) -> dict[str, str]:
    lines = demo.corpus.read_text(encoding="utf-8").splitlines()
    return {(d := json.loads(line))["id"]: d["text"] for line in lines}


def _generated(demo: DemoLM, doc_id: str, passage: str) -> tuple[str, str]:
    """(prompt, the model's greedy continuation) for the document's text up to the passage's
    third word: what a user of the model would see it reproduce."""
    text = _documents(demo)[doc_id]
    prompt = text[: text.index(passage)] + " ".join(passage.split()[:3])
    return prompt, generate(demo.card, prompt, len(passage.split()) + 2)


def test_demo_model_is_trained_here_and_memorises(demo: DemoLM) -> None:
    assert demo.train_seconds < 60 and demo.num_documents == 51
    card = load_card(demo.card)
    assert card.task == "causal-lm" and Path(card.tokenizer, "vocab.json").is_file()
    for doc_id, passage, _ in PASSAGES:
        _, output = _generated(demo, doc_id, passage)
        assert output.startswith(" ".join(passage.split()[3:])), (doc_id, output)


def test_planted_passage_found_with_document_and_offsets(demo: DemoLM, index) -> None:
    entry = index.manifest["verbatim"]
    assert entry["tokenizer_source"] == "model" and entry["num_documents"] == demo.num_documents
    documents = _documents(demo)
    doc_id, passage, license_ = PASSAGES[1]
    output = f"As the story goes: {passage}"
    answer = trace(index, "Tell me about the vault.", output)
    best = answer["spans"][0]
    assert best["text"] == passage and output[best["start"]:best["end"]] == passage
    (doc,) = best["documents"]
    assert doc["id"] == doc_id and not doc["blocked"]
    assert documents[doc_id][doc["start"]:doc["end"]] == passage
    assert passage in doc["snippet"] and doc["metadata"]["license"] == license_
    merged = answer["documents"][0]
    assert merged["id"] == doc_id and merged["spans"][0]["document_start"] == doc["start"]
    assert merged["metadata"]["url"].endswith(doc_id)


@pytest.mark.parametrize(("doc_id", "passage"), [(d, p) for d, p, _ in PASSAGES])
def test_gradient_side_ranks_the_memorised_document_first(demo: DemoLM, index, doc_id: str,
                                                         passage: str) -> None:
    prompt, output = _generated(demo, doc_id, passage)
    answer = trace(index, prompt, output, ProvenanceOptions(k=demo.num_documents))
    ranked = [d["id"] for d in answer["attribution"]["documents"]]
    assert ranked[0] == doc_id, ranked[:5]
    scores = [d["score"] for d in answer["attribution"]["documents"]]
    assert scores[0] > 1.5 * scores[1]  # measured: 2.1-4.0x on this machine
    assert answer["attribution"]["output_tokens"] > 10 and answer["attribution"]["method"] == "trak"


def test_unicode_no_match_and_limits(index) -> None:
    doc_id, passage, _ = PASSAGES[0]
    output = f"Zürich — 東京, naïve café ☃: {passage} 🎉"
    answer = trace(index, "¿Qué?", output, ProvenanceOptions(k=3))
    span = answer["spans"][0]
    assert output[span["start"]:span["end"]] == passage
    assert span["documents"][0]["id"] == doc_id
    none = trace(index, "Quantum chromodynamics", "Gluons bind quarks inside protons.",
                 ProvenanceOptions(k=3))
    assert none["spans"] == [] and len(none["attribution"]["documents"]) == 3
    assert all(d["spans"] == [] for d in none["documents"])
    with pytest.raises(ProvenanceError, match="empty"):
        trace(index, "prompt", "   ")
    with pytest.raises(IndexerError, match="MAX_OUTPUT_TOKENS"):
        trace(index, "prompt", "word " * (MAX_OUTPUT_TOKENS + 1))
    long_prompt = trace(index, "the " * 500, passage, ProvenanceOptions(k=1))
    assert long_prompt["attribution"]["truncated"] is True


def test_takedown_blocks_documents(index, tmp_path: Path) -> None:
    doc_id, passage, _ = PASSAGES[2]
    listing = tmp_path / "takedown.txt"
    listing.write_text(f"# removed on request\n{doc_id}  # ticket 17\n\n")
    takedown = read_takedown([listing, tmp_path / "absent.txt"])
    assert takedown == {doc_id}
    answer = trace(index, "", passage, ProvenanceOptions(k=5), takedown)
    doc = answer["spans"][0]["documents"][0]
    assert doc["id"] == doc_id and doc["blocked"] is True and doc["snippet"] is None
    merged = next(d for d in answer["documents"] if d["id"] == doc_id)
    assert merged["blocked"] is True and merged["spans"][0]["snippet"] is None


def test_cli_build_of_a_text_corpus_includes_the_verbatim_index(demo: DemoLM, tmp_path: Path
                                                               ) -> None:
    result = CliRunner().invoke(index_app, [
        "build", "--model", str(demo.card), "--corpus", str(demo.corpus), "--name", "lm",
        "--method", "graddot", "--arg", "proj_dim=64", "--arg", "gradient=factored",
        "--root", str(tmp_path), "--no-self-influence", "--recall-queries", "4", "--json"])
    assert result.exit_code == 0, result.output
    built = AttributionIndex.open("lm", tmp_path)
    assert (built.path / "verbatim" / "table.0").is_file()
    assert built.verbatim().count(PASSAGES[0][1]) == 1
    built.close()


def test_deleted_documents_leave_the_answer(index) -> None:
    doc_id, passage, _ = PASSAGES[0]
    newer = index.delete([doc_id])
    try:
        assert (newer.path / "verbatim" / "table.0").is_file()
        answer = trace(newer, "", passage, ProvenanceOptions(k=60))
        assert all(d["id"] != doc_id for s in answer["spans"] for d in s["documents"])
        assert doc_id not in [d["id"] for d in answer["documents"]]
        assert trace(index, "", passage)["spans"][0]["documents"][0]["id"] == doc_id
    finally:
        newer.close()


def test_prompt_free_output_is_attributed_by_ekfac_influence(demo: DemoLM) -> None:
    """Without a prompt TRAK can rank a memorised document near last (benchmarks/RESULTS.md);
    EK-FAC influence over the early checkpoints ranks each first by a wide margin."""
    result = build_index(demo.card, demo.corpus, name="ekfac", root=demo.directory / "ix",
                         method=LM_METHOD, method_args={**LM_METHOD_ARGS, "checkpoints": [0, 1]},
                         dtype="float16", show_progress=False, recall_queries=4,
                         data_root=demo.directory, self_influence=False)
    ekfac = AttributionIndex.open(result.path)
    try:
        for doc_id, passage, _ in PASSAGES:
            answer = trace(ekfac, "", passage, ProvenanceOptions(k=2))
            first, second = answer["attribution"]["documents"]
            assert first["id"] == doc_id, (doc_id, first, second)
            assert first["score"] > 2 * max(second["score"], 0.0)  # measured 16-103x (3.1x or more on seeds 0-2)
            assert answer["attribution"]["prompt_tokens"] == 0
    finally:
        ekfac.close()


def test_added_document_gets_verbatim_spans(demo: DemoLM, index) -> None:
    passage = "Quartz otters juggle eleven moonlit pears beside the velvet canal of Brisk."
    doc = {"id": "added-otters", "text": f"Arlen is a town in Norland. {passage} Serve it warm.",
           "source": "archive", "url": "https://archive.example.org/added-otters",
           "license": "CC0-1.0"}
    added = demo.directory / "added.jsonl"
    added.write_text(json.dumps(doc) + "\n", encoding="utf-8")
    newer = add_records(index.path.parents[1], added, data_root=demo.directory,
                        show_progress=False)
    try:
        entry = newer.manifest["verbatim"]
        assert entry["num_documents"] == demo.num_documents + 1 and entry["shards"] == ["shard-1"]
        answer = trace(newer, "", f"It went: {passage}", attribution=False)
        best = answer["spans"][0]
        assert best["text"] == passage and best["count"] == 1
        (found,) = best["documents"]
        assert found["id"] == doc["id"] and found["metadata"]["license"] == "CC0-1.0"
        assert doc["text"][found["start"]:found["end"]] == passage
        old_id, old_passage, _ = PASSAGES[1]  # the built documents are still found
        assert trace(newer, "", old_passage, attribution=False)["spans"][0]["documents"][0][
            "id"] == old_id
        shard0 = "verbatim/table.0"  # hard-linked, and the older version does not see the add
        assert (newer.path / shard0).stat().st_ino == (index.path / shard0).stat().st_ino
        assert index.verbatim().count(passage) == 0
    finally:
        newer.close()
