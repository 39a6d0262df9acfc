"""Verbatim-span provenance (issue 6): a real infini-gram suffix array over a generated corpus."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from indexer.errors import CorpusError, IndexerError, IndexNotFoundError
from indexer.verbatim import (
    MAX_OUTPUT_CHARS,
    MAX_OUTPUT_TOKENS,
    VerbatimError,
    VerbatimIndex,
    WordTokenizer,
    add_verbatim_shard,
    build_verbatim_index,
)

WORDS = [
    "the",
    "a",
    "river",
    "stone",
    "light",
    "market",
    "garden",
    "window",
    "quiet",
    "old",
    "bright",
    "small",
    "city",
    "road",
    "walks",
    "sings",
    "builds",
    "finds",
    "carries",
    "over",
    "under",
    "near",
    "through",
    "with",
    "and",
    "but",
    "slowly",
]
PLANTED = "Zephyrine quartz lanterns hum beneath the cobalt orchard of Velmora"
UNICODE = "Über café naïve façade — 東京の夜は静かです"


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
    return " ".join(words).capitalize() + "."


def _corpus() -> list[dict]:
    rng = random.Random(0)
    docs = []
    for i in range(300):
        text = " ".join(_sentence(rng) for _ in range(rng.randint(2, 5)))
        docs.append({"id": f"doc-{i}", "text": text, "metadata": {"source": "gen", "n": i}})
    # planted passage, in the middle of document 137
    docs[137]["text"] = f"{_sentence(rng)} {PLANTED}. {_sentence(rng)}"
    docs[42]["text"] = f"{_sentence(rng)} Zitat: {UNICODE}! {_sentence(rng)}"
    return docs


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return _corpus()


@pytest.fixture(scope="module")
def index(corpus: list[dict], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("verbatim")
    directory = build_verbatim_index(corpus, root / "idx")
    with VerbatimIndex.open(directory) as idx:
        yield idx


def test_planted_passage_found_with_id_and_offsets(index: VerbatimIndex, corpus: list[dict]):
    output = f"The model wrote: {PLANTED}. Then it stopped."
    spans = index.spans(output, min_tokens=4)
    planted = [s for s in spans if "Velmora" in s.text]
    assert planted, spans
    span = planted[0]
    assert span.text == PLANTED + "."  # the sentence end belongs to the sentence
    assert output[span.start : span.end] == span.text
    assert span.count == 1
    assert [d.id for d in span.documents] == ["doc-137"]
    doc = span.documents[0]
    text = corpus[137]["text"]
    assert text[doc.start : doc.end] == span.text
    assert doc.start == text.index(PLANTED)
    assert PLANTED in doc.snippet
    assert doc.metadata == {"source": "gen", "n": 137}
    # the rare planted passage is ranked first
    assert spans[0] is span


def test_spans_do_not_cross_sentence_ends(index: VerbatimIndex):
    # "...of Velmora" ends a sentence in the corpus, the output continues after the period
    spans = index.spans(f"{PLANTED}. Zephyrine quartz lanterns", min_tokens=2)
    for s in spans:
        assert "." not in s.text[:-1]


def test_common_span_lists_several_documents(index: VerbatimIndex):
    common = [s for s in index.spans("the river and the", min_tokens=1, max_docs_per_span=3)]
    assert all(len(s.documents) <= 3 for s in common)
    assert any(s.count >= 1 for s in common)


def test_unicode_offsets_are_character_offsets(index: VerbatimIndex, corpus: list[dict]):
    output = f"ça dit: {UNICODE}"
    spans = index.spans(output, min_tokens=3)
    best = [s for s in spans if "東京の夜は静かです" in s.text]
    assert best, spans
    span = best[0]
    assert output[span.start : span.end] == span.text
    doc = span.documents[0]
    assert doc.id == "doc-42"
    assert corpus[42]["text"][doc.start : doc.end] == span.text


def test_empty_and_no_match_outputs(index: VerbatimIndex):
    assert index.spans("") == []
    assert index.spans("   \n ") == []
    assert index.spans("Xylophones juggle quasars tonight.") == []


def test_over_long_output_names_the_limit(index: VerbatimIndex):
    with pytest.raises(VerbatimError, match="MAX_OUTPUT_TOKENS"):
        index.spans("word " * (MAX_OUTPUT_TOKENS + 1))
    with pytest.raises(VerbatimError, match="MAX_OUTPUT_CHARS"):
        index.spans("x" * (MAX_OUTPUT_CHARS + 1))


def test_build_errors(tmp_path: Path):
    with pytest.raises(CorpusError, match="empty"):
        build_verbatim_index([], tmp_path / "a")
    dup = [{"id": "x", "text": "one"}, {"id": "x", "text": "two"}]
    with pytest.raises(CorpusError, match="duplicate"):
        build_verbatim_index(dup, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    with pytest.raises(IndexNotFoundError):
        VerbatimIndex.open(tmp_path / "nope")
    build_verbatim_index([{"id": "x", "text": "one two three"}], tmp_path / "c")
    with pytest.raises(IndexerError, match="already exists"):
        build_verbatim_index([{"id": "x", "text": "one"}], tmp_path / "c")
    build_verbatim_index([{"id": "y", "text": "four five six"}], tmp_path / "c", overwrite=True)
    with VerbatimIndex.open(tmp_path / "c", load_to_ram=False) as idx:
        assert idx.num_documents == 1
        assert idx.spans("four five six")[0].documents[0].id == "y"
        assert idx.count("one two") == 0
    # only the index remains, no temporary directories
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_tokenizer_ids_over_u16_are_remapped(tmp_path: Path):
    docs = [
        {"id": "a", "text": "alpha beta gamma delta."},
        {"id": "b", "text": "beta gamma epsilon."},
    ]
    tok = WordTokenizer.train(d["text"] for d in docs)
    for i in range(70_000):  # pad the vocabulary past the u16 limit
        tok.vocab[f"filler{i}"] = tok.vocab_size
    tok.vocab["omega"] = tok.vocab_size  # a word whose id is above 65,535
    docs.append({"id": "c", "text": "omega alpha beta gamma."})
    build_verbatim_index(docs, tmp_path / "u32", tokenizer=tok)
    with VerbatimIndex.open(tmp_path / "u32") as idx:
        assert idx.token_dtype == "u16"  # only the ids the corpus uses are indexed
        spans = idx.spans("so omega alpha beta", min_tokens=2)
        assert [(s.text, [d.id for d in s.documents]) for s in spans] == [
            ("omega alpha beta", ["c"])
        ]


def test_added_shard_is_searched_with_the_built_one(corpus: list[dict], tmp_path: Path):
    directory = build_verbatim_index(corpus, tmp_path / "idx")
    before = {p.name: p.stat().st_ino for p in directory.iterdir() if p.is_file()}
    # new words ("Quillon", "obsidian", ...) and words of the built corpus, a sentence of both
    added = [{"id": "new-1", "text": f"Intro. {PLANTED}. Near the Quillon obsidian gate.",
              "metadata": {"source": "added"}},
             {"id": "new-2", "text": "The Quillon obsidian gate opens slowly."}]
    meta = add_verbatim_shard(directory, added)
    assert meta["shards"] == ["shard-1"] and meta["num_documents"] == len(corpus) + 2
    for name in ("tokenized.0", "table.0", "offset.0", "docs.jsonl", "docs.idx"):
        assert (directory / name).stat().st_ino == before[name]  # shard 0 untouched
    for name in ("vocab.json", "idmap.npy", "unigram.npy", "meta.json"):
        assert (directory / name).stat().st_ino != before[name]  # replaced, not written through
    with VerbatimIndex.open(directory) as idx:
        assert idx.count(PLANTED) == 2 and idx.count("Quillon obsidian gate") == 2
        output = f"It said {PLANTED}. Then: the Quillon obsidian gate opens slowly!"
        spans = idx.spans(output, min_tokens=4, max_docs_per_span=5)
        by_text = {s.text: s for s in spans}
        planted = by_text[PLANTED + "."]
        assert sorted(d.id for d in planted.documents) == ["doc-137", "new-1"]
        new = next(d for d in planted.documents if d.id == "new-1")
        assert added[0]["text"][new.start:new.end] == PLANTED + "." and new.metadata == {
            "source": "added"}
        gate = by_text["Quillon obsidian gate opens slowly"]
        assert [d.id for d in gate.documents] == ["new-2"]
        assert added[1]["text"][gate.documents[0].start:gate.documents[0].end] == gate.text
    # a record deleted and added again with new text: its old text's spans are gone
    replaced = {"id": "doc-137", "text": "Quillon obsidian gate again. Brand new words here."}
    meta = add_verbatim_shard(directory, [replaced])
    assert meta["superseded"] == [[0, 137]]
    with VerbatimIndex.open(directory) as idx:
        assert idx.num_documents == len(corpus) + 3
        planted = idx.spans(f"{PLANTED}.", min_tokens=4)[0]
        assert [d.id for d in planted.documents] == ["new-1"] and planted.count == 1
        gate = idx.spans("Quillon obsidian gate again.", min_tokens=4)[0]
        assert gate.text == "Quillon obsidian gate again." and gate.count == 1
        assert [(d.id, d.start) for d in gate.documents] == [("doc-137", 0)]
    assert sorted(p.name for p in directory.iterdir() if p.is_dir()) == ["shard-1", "shard-2"]
