"""A demo causal-LM setup for provenance: a synthetic corpus and a tiny GPT-2 trained on it here.

:func:`write_demo_lm` writes, under one directory (nothing is downloaded)::

    corpus.jsonl         {"id", "text", "source", "url", "license"} per document
    tokenizer/vocab.json the model's own word-level tokenizer, built from the corpus
    model-N.safetensors  checkpoints along training (the last is the final model)
    model.yaml           the model card (task causal-lm, builtin tiny_gpt2, tokenizer, max_length)

The corpus is templated text (encyclopedia entries, match reports, recipes) plus a few
documents that each carry one distinctive passage (:data:`PASSAGES`); the model is trained
until it has memorised them, so a generated continuation of a passage's beginning reproduces
it, and both halves of provenance (verbatim spans, gradient attribution) can find its source.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from indexer.paths import atomic_write_text
from indexer.verbatim import TOKENIZER_DIR_FILE, WordTokenizer

CITIES = ["Arlen", "Bexley", "Corvo", "Dunmore", "Eskar", "Fallow", "Garnet", "Hollis",
          "Ingram", "Jessop", "Kellin", "Lorne", "Marrow", "Norwell", "Osric", "Pellam"]
COUNTRIES = ["Norland", "Estavia", "Porren", "Valdia"]
RIVERS = ["Tamsin", "Orla", "Brede", "Wick"]
TEAMS = ["Foxes", "Herons", "Millers", "Rovers", "Badgers", "Pilots"]
DISHES = ["bread", "soup", "pie", "stew", "cake"]
INGREDIENTS = ["flour", "butter", "onions", "apples", "carrots", "milk", "salt", "honey"]
DAYS = ["Monday", "Tuesday", "Friday", "Sunday"]

#: distinctive passages planted verbatim, one per document: (document id, passage, license)
PASSAGES = [
    ("poem-heron", "The silver heron sleeps beneath the amber moon while seven lanterns drift "
                   "across the quiet harbour of Vinter Cove.", "CC-BY-4.0"),
    ("memo-vault", "Every ledger in the copper vault is counted twice by the night clerk "
                   "before the northern gate opens at dawn.", "proprietary"),
    ("song-ferry", "Row the crooked ferry home, for the willow bells are ringing and the "
                   "marsh lights guide the weary.", "CC0-1.0"),
]


@dataclass
class DemoLM:
    """Paths written by :func:`write_demo_lm` (absolute) and how training went."""

    directory: Path
    corpus: Path
    card: Path
    tokenizer: Path
    checkpoint: Path
    num_documents: int
    vocab_size: int
    max_length: int
    final_loss: float
    train_seconds: float


def demo_documents(per_source: int = 16, seed: int = 0) -> list[dict]:
    """Templated documents from three sources plus the planted ones, with metadata."""
    rng = random.Random(seed)
    docs: list[dict] = []

    def add(doc_id: str, text: str, source: str, license_: str) -> None:
        docs.append({"id": doc_id, "text": text, "source": source,
                     "url": f"https://{source}.example.org/{doc_id}", "license": license_})

    for i in range(per_source):
        city, river = CITIES[i % len(CITIES)], rng.choice(RIVERS)
        add(f"wiki-{i:03d}", f"{city} is a town in {rng.choice(COUNTRIES)}. It lies on the "
            f"river {river} and has {rng.randint(2, 90)} thousand people. The town is known "
            f"for its {rng.choice(['market', 'bridge', 'harbour', 'mill'])}.", "wiki",
            "CC-BY-SA-4.0")
        home, away = rng.sample(TEAMS, 2)
        add(f"news-{i:03d}", f"On {rng.choice(DAYS)} the {home} beat the {away} by "
            f"{rng.randint(2, 9)} to {rng.randint(0, 1)} in {rng.choice(CITIES)}. The coach "
            f"said the team played well.", "news", "CC-BY-4.0")
        first, second = rng.sample(INGREDIENTS, 2)
        add(f"recipe-{i:03d}", f"To make {rng.choice(DISHES)}, mix the {first} with the "
            f"{second} and bake it for {rng.randint(10, 60)} minutes. Serve it warm.", "recipes",
            "CC0-1.0")
    for doc_id, passage, license_ in PASSAGES:  # a passage in the middle of an ordinary text
        add(doc_id, f"{rng.choice(CITIES)} is a town in {rng.choice(COUNTRIES)}. {passage} "
            f"Serve it warm.", "archive", license_)
    return docs


def write_demo_lm(
    directory: str | Path,
    per_source: int = 16,
    epochs: int = 80,
    n_embd: int = 64,
    n_layer: int = 2,
    checkpoints: int = 8,
    seed: int = 0,
) -> DemoLM:
    """Write the corpus, train the tiny GPT-2 on it (seconds on one CPU thread), save everything."""
    import torch
    from safetensors.torch import save_file

    from attribution.lm import train_causal_lm
    from attribution.models import build
    from attribution.training import TrainConfig

    directory = Path(directory).resolve()
    (directory / "tokenizer").mkdir(parents=True, exist_ok=True)
    docs = demo_documents(per_source, seed)
    atomic_write_text(directory / "corpus.jsonl",
                      "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    tokenizer = WordTokenizer.train(d["text"] for d in docs)
    tokenizer.save(directory / "tokenizer" / TOKENIZER_DIR_FILE)
    sequences = [tokenizer.encode(d["text"]) for d in docs]
    max_length = 1 << (max(len(s) for s in sequences) - 1).bit_length()  # a power of two
    # one spare id on top: tiny_gpt2 makes the last id BOS/EOS, never a word here
    config = {"vocab_size": tokenizer.vocab_size + 1, "n_layer": n_layer, "n_head": 2,
              "n_embd": n_embd, "n_positions": max_length, "seed": seed}
    model = build("tiny_gpt2", **config)
    started = time.time()
    with torch.random.fork_rng(devices=[]):
        result = train_causal_lm(model, sequences, max_length, TrainConfig(
            epochs=epochs, learning_rate=1e-2, weight_decay=0.0, batch_size=16, seed=seed,
            schedule="cosine", checkpoints=checkpoints, num_threads=1))
    seconds = time.time() - started
    specs = []
    for i, ckpt in enumerate(result.checkpoints):  # the last one is the final model
        path = directory / f"model-{i}.safetensors"
        save_file({k: v.contiguous() for k, v in ckpt.state.items()}, str(path))
        specs.append({"path": path.name, "learning_rate": ckpt.learning_rate, "step": ckpt.step})
    card = {"name": "demo-lm", "task": "causal-lm",
            "architecture": {"builtin": "tiny_gpt2", "config": config},
            "checkpoints": specs, "tokenizer": "tokenizer", "max_length": max_length}
    atomic_write_text(directory / "model.yaml", yaml.safe_dump(card, sort_keys=False))
    return DemoLM(directory, directory / "corpus.jsonl", directory / "model.yaml",
                  directory / "tokenizer", directory / specs[-1]["path"], len(docs), tokenizer.vocab_size,
                  max_length, result.losses[-1], seconds)


def generate(card_path: str | Path, prompt: str, new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` by the card's final checkpoint, as text (the demo
    model's word-level tokenizer; stops at the token budget)."""
    from attribution.lm import greedy_continuation
    from indexer.cards import load_card, load_task
    from indexer.verbatim import load_word_tokenizer

    card = load_card(card_path)
    tokenizer = load_word_tokenizer(card.tokenizer) if card.tokenizer else None
    if tokenizer is None:
        raise ValueError(f"{card_path} names no word-level tokenizer directory")
    task = load_task(card)
    task.load_checkpoint(len(task.checkpoints) - 1)  # the final model
    ids = greedy_continuation(task.model, tokenizer.encode(prompt), new_tokens,
                              card.max_length or 1024)
    return tokenizer.decode(ids)
