"""Provenance benchmark (issue 6): verbatim-span index build and lookup; gradient featurization.

Verbatim half — generated corpus: documents of Zipf-distributed words (vocabulary 30,000
synthetic words), 3-6 sentences of 8-20 words each. Queries: 500-token outputs made of random
sentences with two 60-token passages copied verbatim from random corpus documents.

Gradient half — the demo tiny GPT-2 (indexer/demo_lm.py) trained here on its corpus; train-side
features of the corpus (repeated to --grad-docs documents) with the engine's factored (LoGra)
projection, one CPU thread; throughput in corpus tokens (padding excluded) per second.

Ranking (``--ranking``) — which gradient method finds the memorised document: the demo LM is
trained with --seeds seeds; for each planted passage three queries (the document's text up to the
passage's third word as prompt with the model's greedy continuation as output; no prompt with the
passage as output; the passage's first three words as prompt with the rest as output) are scored
against the 51 documents by each engine configuration in ``RANKING_CONFIGS``; printed per query
kind: how often the memorised document is first, its worst rank, and the smallest margin (its
score over the best other document's score).

The final figures (quiet machine; the 10M-token run takes a few minutes):

    python benchmarks/provenance_bench.py --tokens 10000000 --queries 100 --write
    python benchmarks/provenance_bench.py --skip-verbatim                 # gradient part only
    python benchmarks/provenance_bench.py --tokens 1000000 --skip-gradient  # a quick check
    python benchmarks/provenance_bench.py --ranking --seeds 3              # method comparison
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.verbatim import VerbatimIndex, build_verbatim_index, bytes_per_token  # noqa: E402

VOCAB = 30_000


def make_words(rng: np.random.Generator) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = set()
    while len(words) < VOCAB:
        n = int(rng.integers(2, 10))
        words.add("".join(rng.choice(letters, n)))
    return np.array(sorted(words))


def sentences(rng: np.random.Generator, words: np.ndarray, probs: np.ndarray, k: int) -> list[str]:
    lens = rng.integers(8, 21, size=k)
    flat = words[rng.choice(len(words), size=int(lens.sum()), p=probs)]
    out, pos = [], 0
    for n in lens:
        out.append(" ".join(flat[pos : pos + n]).capitalize() + ".")
        pos += n
    return out


def make_corpus(tokens: int, seed: int = 0) -> tuple[list[dict], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    words = make_words(rng)
    ranks = np.arange(1, VOCAB + 1, dtype=np.float64)
    probs = 1.0 / ranks**1.07
    probs /= probs.sum()
    # ~15 tokens per sentence (words + final period), ~4.5 sentences per document
    n_sent = tokens // 15 + 1
    sents = sentences(rng, words, probs, n_sent)
    docs, pos, i = [], 0, 0
    while pos < len(sents):
        k = int(rng.integers(3, 7))
        docs.append({"id": f"doc-{i}", "text": " ".join(sents[pos : pos + k]), "metadata": {}})
        pos += k
        i += 1
    return docs, words, probs


def make_output(rng, docs, words, probs, idx: VerbatimIndex, n_tokens: int = 500) -> str:
    parts: list[str] = []
    for _ in range(2):
        text = docs[int(rng.integers(len(docs)))]["text"].split()
        start = int(rng.integers(0, max(1, len(text) - 60)))
        parts.append(" ".join(text[start : start + 60]))
    filler = sentences(rng, words, probs, 40)
    out = " ".join([*filler[:12], parts[0], *filler[12:24], parts[1], *filler[24:]])
    ids = idx.tokenizer.encode(out)
    while len(ids) > n_tokens:  # trim to n_tokens whole tokens
        out = out.rsplit(" ", 1)[0]
        ids = idx.tokenizer.encode(out)
    return out


def command() -> str:
    """The command line this run was started with (recorded next to its figures)."""
    return " ".join(["python benchmarks/provenance_bench.py", *sys.argv[1:]])


def gradient_throughput(docs: int, proj_dim: int, method: str) -> dict[str, float]:
    """Train-side featurization of the demo LM's corpus: tokens and documents per second."""
    import torch

    from attribution.methods import build_method
    from indexer.build import read_corpus
    from indexer.cards import load_card, load_task
    from indexer.demo_lm import write_demo_lm

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="tda-prov-grad-"))
    try:
        t0 = time.perf_counter()
        demo = write_demo_lm(work)
        train_s = time.perf_counter() - t0
        card = load_card(demo.card)
        corpus = read_corpus(demo.corpus, card, None)
        engine = build_method(method, load_task(card), proj_dim=proj_dim, gradient="factored")
        reps = -(-docs // len(corpus))
        examples = corpus.examples()
        x, y = examples.x.repeat(reps, 1)[:docs], examples.y.repeat(reps, 1)[:docs]
        from attribution.data import Examples

        batch = Examples(x, y)
        engine.featurize_train(Examples(x[:8], y[:8]))  # projections built, code paths warm
        t0 = time.perf_counter()
        raw = engine.featurize_train(batch)
        seconds = time.perf_counter() - t0
        tokens = int((y != -100).sum())
        return {"train_s": train_s, "docs": docs, "tokens": tokens, "seconds": seconds,
                "tokens_per_s": tokens / seconds, "docs_per_s": docs / seconds,
                "dim": int(np.asarray(raw).shape[1]), "checkpoints": len(card.checkpoints),
                "params": sum(p.numel() for p in engine.task.model.parameters())}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report_gradient(args: argparse.Namespace) -> None:
    g = gradient_throughput(args.grad_docs, args.proj_dim, args.method)
    print(f"gradient ({args.method}, factored proj_dim {args.proj_dim} -> {g['dim']} values over "
          f"{g['checkpoints']} checkpoints, {g['params']:,} parameters; demo LM trained in "
          f"{g['train_s']:.1f} s): {g['docs']} docs, {g['tokens']} tokens in "
          f"{g['seconds']:.2f} s = {g['tokens_per_s']:,.0f} tokens/s "
          f"({g['docs_per_s']:.0f} docs/s), 1 CPU thread")
    if args.write:
        section = f"""
## Provenance (issue 6): gradient featurization

Command: `{command()}` — {platform.machine()}, 1 torch thread, {datetime.date.today()}.

The demo tiny GPT-2 ({g['params']:,} parameters, {g['checkpoints']} checkpoints) trained here on
its synthetic corpus in {g['train_s']:.1f} s; train-side features of {g['docs']} documents with the
factored (LoGra) Kronecker projection, method `{args.method}`, proj_dim {args.proj_dim}.

| documents | tokens | seconds | tokens / s | documents / s |
|---:|---:|---:|---:|---:|
| {g['docs']} | {g['tokens']} | {g['seconds']:.2f} | {g['tokens_per_s']:,.0f} | {g['docs_per_s']:.0f} |
"""
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a") as f:
            f.write(section)


_FACTORED = {"gradient": "factored", "proj_dim": 1024}
#: (label, method, arguments) compared by ``--ranking``
RANKING_CONFIGS: list[tuple[str, str, dict]] = [
    ("TRAK, 8 checkpoints (previous default)", "trak", _FACTORED),
    ("TRAK, final checkpoint", "trak", {**_FACTORED, "checkpoints": [-1]}),
    ("TRAK, first 4 checkpoints", "trak", {**_FACTORED, "checkpoints": [0, 1, 2, 3]}),
    ("TRAK, lambda_scale 100", "trak", {**_FACTORED, "lambda_scale": 100.0}),
    ("TracIn, 8 checkpoints", "tracin", _FACTORED),
    ("TracIn, first 4 checkpoints", "tracin", {**_FACTORED, "checkpoints": [0, 1, 2, 3]}),
    ("Grad-Dot, final checkpoint", "graddot", _FACTORED),
    ("Grad-Cos, first 4 checkpoints", "gradcos", {**_FACTORED, "checkpoints": [0, 1, 2, 3]}),
    ("EK-FAC influence, dense proj 1024", "influence", {"solver": "ekfac", "proj_dim": 1024}),
    ("EK-FAC influence, 8 checkpoints", "influence", {"solver": "ekfac"}),
    ("EK-FAC influence, damping_scale 1", "influence", {"solver": "ekfac", "damping_scale": 1.0}),
    ("EK-FAC influence, checkpoints 0-1", "influence", {"solver": "ekfac", "checkpoints": [0, 1]}),
]
QUERY_KINDS = ("document prompt, generated", "no prompt", "3-word prompt")


def ranking_queries(demo) -> list[tuple[str, str, str, str]]:
    """(document id, query kind, prompt, output) for each planted passage and query kind."""
    import json

    from indexer.demo_lm import PASSAGES, generate

    lines = demo.corpus.read_text(encoding="utf-8").splitlines()
    texts = {(d := json.loads(line))["id"]: d["text"] for line in lines}
    queries = []
    for doc_id, passage, _ in PASSAGES:
        words, text = passage.split(), texts[doc_id]
        prompt = text[: text.index(passage)] + " ".join(words[:3])
        queries += [
            (doc_id, QUERY_KINDS[0], prompt, generate(demo.card, prompt, len(words) + 2)),
            (doc_id, QUERY_KINDS[1], "", passage),
            (doc_id, QUERY_KINDS[2], " ".join(words[:3]), " ".join(words[3:])),
        ]
    return queries


def rank_and_margin(scores: np.ndarray, i: int) -> tuple[int, float]:
    """Rank (1 = first) of row ``i`` and its score over the best other score (inf if ≤ 0)."""
    rank = int((scores > scores[i]).sum()) + 1
    other = float(np.max(np.delete(scores, i)))
    return rank, float(scores[i]) / other if other > 0 else float("inf")


def ranking(seeds: int) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """(rank, margin) of the memorised document per configuration and query kind."""
    import torch

    from attribution.lm import prompt_output_example
    from attribution.methods import build_method
    from indexer.build import read_corpus
    from indexer.cards import load_card, load_task
    from indexer.demo_lm import write_demo_lm
    from indexer.verbatim import text_tokenizer

    torch.set_num_threads(1)
    found: dict[str, dict[str, list[tuple[int, float]]]] = {
        label: {kind: [] for kind in QUERY_KINDS} for label, _, _ in RANKING_CONFIGS}
    for seed in range(seeds):
        work = Path(tempfile.mkdtemp(prefix="tda-prov-rank-"))
        try:
            demo = write_demo_lm(work, seed=seed)
            card = load_card(demo.card)
            corpus = read_corpus(demo.corpus, card, None)
            ids = [str(i) for i in corpus.ids]
            encode = text_tokenizer(card.tokenizer)
            queries = [(ids.index(doc_id), kind, prompt_output_example(
                encode([p])[0] if p else [], encode([o])[0], card.max_length))
                for doc_id, kind, p, o in ranking_queries(demo)]
            for label, method, arguments in RANKING_CONFIGS:
                engine = build_method(method, load_task(card), **arguments)
                engine.fit(corpus.examples())
                for row, kind, query in queries:
                    found[label][kind].append(rank_and_margin(engine.score(query.examples)[0], row))
                print(f"seed {seed}: {label} done", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return found


def report_ranking(args: argparse.Namespace) -> None:
    found = ranking(args.seeds)
    n = 3 * args.seeds
    header = " | ".join(f"{k}: first / worst rank / min margin" for k in QUERY_KINDS)
    lines = [f"| configuration | {header} |", "|---|" + "---:|" * len(QUERY_KINDS)]
    for label, kinds in found.items():
        cells = []
        for kind in QUERY_KINDS:
            ranks = [r for r, _ in kinds[kind]]
            margin = min(m for _, m in kinds[kind])
            cells.append(f"{ranks.count(1)}/{n} · {max(ranks)} · {margin:.2f}×")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a") as f:
            f.write(f"\n## Provenance (issue 6): which gradient method finds the memorised "
                    f"document\n\nCommand: `{command()}` — {datetime.date.today()}.\n\n"
                    f"{table}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=10_000_000, help="verbatim corpus size")
    ap.add_argument("--queries", type=int, default=100, help="500-token outputs looked up")
    ap.add_argument("--write", action="store_true", help="append sections to RESULTS.md")
    ap.add_argument("--skip-verbatim", action="store_true", help="only the gradient part")
    ap.add_argument("--skip-gradient", action="store_true", help="only the verbatim part")
    ap.add_argument("--grad-docs", type=int, default=1024, help="documents featurized")
    ap.add_argument("--proj-dim", type=int, default=1024, help="factored projection size")
    ap.add_argument("--method", default="trak", help="engine method (trak, tracin, graddot)")
    ap.add_argument("--ranking", action="store_true",
                    help="only the method comparison: rank of the memorised document")
    ap.add_argument("--seeds", type=int, default=3, help="demo LMs trained for --ranking")
    args = ap.parse_args()
    if args.ranking:
        report_ranking(args)
        return
    if not args.skip_gradient:
        report_gradient(args)
    if not args.skip_verbatim:
        report_verbatim(args)


def report_verbatim(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    docs, words, probs = make_corpus(args.tokens)
    gen_s = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="tda-prov-bench-"))
    try:
        t0 = time.perf_counter()
        build_verbatim_index(docs, work / "idx")
        build_s = time.perf_counter() - t0
        bpt = bytes_per_token(work / "idx")
        with VerbatimIndex.open(work / "idx") as idx:
            n_tok = idx.meta["num_tokens"]
            rng = np.random.default_rng(1)
            outputs = [make_output(rng, docs, words, probs, idx) for _ in range(args.queries)]
            out_tokens = int(np.mean([len(idx.tokenizer.encode(o)) for o in outputs]))
            idx.spans(outputs[0])  # warm the page cache
            lat, n_spans = [], []
            for o in outputs:
                t0 = time.perf_counter()
                spans = idx.spans(o, min_tokens=5)
                lat.append((time.perf_counter() - t0) * 1000)
                n_spans.append(len(spans))
        p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
        print(
            f"corpus: {len(docs)} docs, {n_tok} tokens (generated in {gen_s:.1f} s)\n"
            f"build: {build_s:.1f} s ({n_tok / build_s / 1e6:.2f} M tokens/s), "
            f"{bpt:.2f} bytes/token on disk\n"
            f"lookup ({args.queries} outputs of ~{out_tokens} tokens, min_tokens=5): "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {np.mean(n_spans):.1f} spans/output"
        )
        if args.write:
            section = f"""
## Provenance (issue 6): verbatim spans

Command: `{command()}` — {platform.machine()}, {os.cpu_count()} cores, infini-gram 2.6.0 (u16 suffix array), {datetime.date.today()}.

Generated corpus of Zipf-distributed words (vocabulary {VOCAB:,}); word-level tokenizer trained on
the corpus; queries are outputs of ~{out_tokens} tokens with two 60-word passages copied from
corpus documents; `VerbatimIndex.spans(output, min_tokens=5)`, up to 5 documents per span.

| corpus tokens | documents | build s (tokenize + write + build_sa) | bytes / token (whole index dir) | lookup p50 ms | lookup p99 ms | spans / output |
|---:|---:|---:|---:|---:|---:|---:|
| {n_tok:,} | {len(docs):,} | {build_s:.1f} | {bpt:.2f} | {p50:.1f} | {p99:.1f} | {np.mean(n_spans):.1f} |
"""
            results = Path(__file__).resolve().parent / "RESULTS.md"
            with open(results, "a") as f:
                f.write(section)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
