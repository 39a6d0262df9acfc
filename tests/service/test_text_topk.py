"""Top-k by text: a tiny Hugging Face GPT-2 (causal-LM) and BERT classifier with a
word-level tokenizer built here, indexes built by the indexer, queries over HTTP. Text answers
equal the answers for the same token ids; without a tokenizer, text is a clear 422."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
import yaml
from service_helpers import PROBLEM, World
from typer.testing import CliRunner

from service.commands import register

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")
TENANT = "texts"
WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dog", "ran", "to", "red", "ball", "and",
         "bird", "sang", "over", "old", "green", "hills", "near", "blue", "water"]


def _texts() -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 8)))) for _ in range(16)]
    return texts, [int(i % 3) for i in range(16)]


def _tokenizer(directory: Path) -> None:
    """A word-level tokenizer over WORDS, saved as a PreTrainedTokenizerFast directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(sorted(set(WORDS)))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]"
                            ).save_pretrained(directory)


@pytest.fixture(scope="module")
def text_indexes(world: World) -> dict[str, str]:
    """Indexes ``lm`` (causal-LM + tokenizer), ``cls`` (classifier + tokenizer) and ``bare``
    (a token model whose card names no tokenizer) for tenant ``texts``; returns its key."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    from attribution.models import build
    from indexer.build import build_index

    settings = world.harness.settings
    files = settings.files_dir(TENANT)
    files.mkdir(parents=True, exist_ok=True)
    _tokenizer(files / "tok")
    texts, labels = _texts()
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(16)], "text": texts,
                             "label": labels}), files / "docs.parquet")
    config = dict(vocab_size=len(set(WORDS)) + 2, n_layer=1, n_head=2, n_embd=16,
                  n_positions=16, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**config)).save_pretrained(files / "lm", safe_serialization=True)
    # pad_token_id None: transformers' padding check is data-dependent and fails under vmap
    BertForSequenceClassification(BertConfig(
        vocab_size=config["vocab_size"], hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16, num_labels=3,
        pad_token_id=None)).save_pretrained(files / "cls", safe_serialization=True)
    tiny = {"vocab_size": config["vocab_size"], "n_layer": 1, "n_head": 2, "n_embd": 16,
            "n_positions": 16, "seed": 0}
    save_file({k: v.clone().contiguous() for k, v in build("tiny_gpt2", **tiny).state_dict().items()},
              str(files / "bare.safetensors"))
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(4)],
                             "input_ids": [[2, 3, 4], [5, 6], [7, 8, 9, 10], [3, 3]]}),
                   files / "tokens.parquet")
    cards = {
        "lm": ({"task": "causal-lm", "architecture": {"huggingface": "lm"}, "tokenizer": "tok"},
               "docs.parquet"),
        "cls": ({"task": "classification", "architecture": {"huggingface": "cls"},
                 "tokenizer": "tok"}, "docs.parquet"),
        "bare": ({"task": "causal-lm", "architecture": {"builtin": "tiny_gpt2", "config": tiny},
                  "checkpoints": [{"path": "bare.safetensors"}]}, "tokens.parquet"),
    }
    for name, (card, corpus) in cards.items():
        (files / f"{name}.yaml").write_text(yaml.safe_dump(card))
        build_index(files / f"{name}.yaml", files / corpus, name=name,
                    root=settings.index_root(TENANT), method="graddot",
                    method_args={"proj_dim": 16}, dtype="float32", show_progress=False,
                    recall_queries=4, data_root=files, self_influence=False)
    return {"key": world.harness.key(TENANT)}


def _ids(tokenizer_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _hits(result: dict) -> list[tuple[str, float]]:
    return [(h["id"], h["score"]) for h in result["proponents"]]


def _same(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> None:
    assert [i for i, _ in a] == [i for i, _ in b]
    np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-4, atol=1e-6)


def test_causal_lm_text_equals_token_ids(world: World, text_indexes: dict) -> None:
    texts, _ = _texts()
    queries = [texts[3], "the red bird sang over the blue water near the mat"]
    tok_dir = world.harness.settings.files_dir(TENANT) / "tok"
    with world.http(text_indexes["key"]) as http:
        by_text = http.post("/v1/indexes/lm/topk", json={"examples": {"text": queries}, "k": 5})
        assert by_text.status_code == 200, by_text.text
        results = by_text.json()["results"]
        assert results[0]["proponents"][0]["id"] == "doc-3"  # a corpus text finds itself
        with world.client(text_indexes["key"]) as tda:  # the Python client sends text too
            assert tda.topk("lm", text=queries, k=5)["results"] == results
        app = typer.Typer()
        register(app)
        cli = CliRunner().invoke(app, ["query", "lm", "-e", json.dumps({"text": queries}), "-k",
                                       "5", "--json"],
                                 env={"TDA_URL": world.url, "TDA_API_KEY": text_indexes["key"]})
        assert cli.exit_code == 0, cli.output
        assert json.loads(cli.output)["results"] == results  # and `tda query` does
        for query, result in zip(queries, results, strict=True):
            # each text alone as token ids (no padding), its tokens as its labels
            by_ids = http.post("/v1/indexes/lm/topk", json={
                "examples": {"x": [_ids(tok_dir, query)]}, "k": 5}).json()["results"][0]
            _same(_hits(result), _hits(by_ids))


def test_classification_text_with_labels_equals_token_ids(world: World, text_indexes: dict
                                                          ) -> None:
    texts, labels = _texts()
    tok_dir = world.harness.settings.files_dir(TENANT) / "tok"
    length = max(len(_ids(tok_dir, t)) for t in texts)  # the corpus's padded length
    queries, y = [texts[5], "a dog sang"], [labels[5], 2]
    rows = [(_ids(tok_dir, q) + [0] * length)[:length] for q in queries]
    with world.http(text_indexes["key"]) as http:
        by_text = http.post("/v1/indexes/cls/topk", json={
            "examples": {"text": queries, "y": y}, "k": 4, "opponents": True})
        by_ids = http.post("/v1/indexes/cls/topk", json={
            "examples": {"x": rows, "y": y}, "k": 4, "opponents": True})
    assert by_text.status_code == by_ids.status_code == 200, by_text.text
    for a, b in zip(by_text.json()["results"], by_ids.json()["results"], strict=True):
        _same(_hits(a), _hits(b))
        _same([(h["id"], h["score"]) for h in a["opponents"]],
              [(h["id"], h["score"]) for h in b["opponents"]])


@pytest.mark.parametrize(("index", "body", "words"), [
    ("bare", {"text": ["the cat"]}, "names no tokenizer"),
    ("cls", {"text": ["the cat"]}, "examples need labels"),
    ("cls", {"text": ["the cat", "a dog"], "y": [1]}, "2 texts but 1 labels"),
    ("lm", {"text": ["the cat"], "y": [1]}, "omit examples.y"),
    ("lm", {"text": [""]}, "produce no tokens"),
    ("lm", {"text": ["the cat"], "x": [[2, 3]]}, "exactly one of the two"),
])
def test_text_errors_are_422(world: World, text_indexes: dict, index: str, body: dict,
                             words: str) -> None:
    with world.http(text_indexes["key"]) as http:
        reply = http.post(f"/v1/indexes/{index}/topk", json={"examples": body})
    assert reply.status_code == 422 and reply.headers["content-type"] == PROBLEM
    assert words in reply.text


def test_text_on_a_features_index_is_422(world: World) -> None:
    with world.http(world.reader) as http:
        reply = http.post("/v1/indexes/digits/topk", json={"examples": {"text": ["hello"],
                                                                        "y": [1]}})
    assert reply.status_code == 422 and reply.headers["content-type"] == PROBLEM
    assert "reads numeric features, not text" in reply.json()["detail"]
