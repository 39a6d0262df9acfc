"""Verbatim-span index for provenance of LLM outputs (issue 6, verbatim half).

A suffix array over the tokenised corpus, built and queried with the ``infini-gram`` package
(2.6.0), the engine behind OLMoTrace. We write the token ids ourselves in its on-disk layout
(``tokenized.0``: each document prefixed by the all-ones separator, little-endian u16 ids, u32
when the vocabulary has 65,535 ids or more; ``offset.0``: uint64 byte offset of each document),
build the suffix array with its ``build_sa`` step in a subprocess (that step changes the working
directory) and query it with its ``attribute`` (maximal spans) engine call. Its byte-level (u8)
engine and its own tokenising step (which fetches tokenizers by hub name) are not used.

Tokenizer: :class:`WordTokenizer`, a deterministic word-level tokenizer (Unicode words via
``\\w+``, every other non-space character is its own token) whose vocabulary is built from the
corpus and saved next to the index as ``vocab.json``. Every token is a whole word or a
punctuation mark, so every matched span starts and ends on word boundaries; whitespace is not a
token, so spans match across differences in spacing. Nothing is downloaded.

Layout of an index directory::

    tokenized.0 offset.0 table.0   infini-gram files
    vocab.json                     the tokenizer
    idmap.npy                      sorted tokenizer ids used by the corpus; index id = rank + 2
    unigram.npy                    int64 count of each index id in the corpus
    docs.jsonl docs.idx            one {"id","text","metadata"} per line; uint64 line offsets
    meta.json                      format, counts, token dtype
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import CorpusError, IndexCorruptError, IndexerError, IndexNotFoundError

FORMAT = "tdaserve-verbatim/1"
EOS_ID = 0  # reserved, never written to the corpus
UNK_ID = 1  # words not in the corpus vocabulary; never in the corpus, so never matched
FIRST_WORD_ID = 2
U16_LIMIT = 0xFFFF  # 0xFFFF is the u16 document separator: ids must stay below it
SENTENCE_ENDS = frozenset(".!?。！？…")
MAX_OUTPUT_CHARS = 100_000
MAX_OUTPUT_TOKENS = 4_096
BUILD_TIMEOUT_S = 3_600
LOAD_TO_RAM_MAX_BYTES = 2 * 1024**3
WORD_LEVEL = "word-level/1"
TOKENIZER_DIR_FILE = "vocab.json"  # a model's word-level tokenizer directory holds this file

_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class VerbatimError(IndexerError):
    """A verbatim-index request that cannot be answered (bad output, limit exceeded)."""


def tokenize_with_offsets(text: str) -> list[tuple[str, int, int]]:
    """Whole words and punctuation marks of ``text`` with their character offsets."""
    return [(m.group(), m.start(), m.end()) for m in _TOKEN_RE.finditer(text)]


class WordTokenizer:
    """Deterministic word-level tokenizer; ids 0 (eos) and 1 (unknown) are reserved."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    @classmethod
    def train(cls, texts: Iterable[str]) -> WordTokenizer:
        vocab: dict[str, int] = {}
        for text in texts:
            for tok, _, _ in tokenize_with_offsets(text):
                if tok not in vocab:
                    vocab[tok] = FIRST_WORD_ID + len(vocab)
        return cls(vocab)

    @property
    def vocab_size(self) -> int:
        return FIRST_WORD_ID + len(self.vocab)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        toks = tokenize_with_offsets(text)
        ids = [self.vocab.get(t, UNK_ID) for t, _, _ in toks]
        return ids, [(s, e) for _, s, e in toks]

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids: words separated by spaces, no space before punctuation marks
        (whitespace is not tokenised, so this is the text up to spacing); unknown ids → ``?``."""
        words = {i: w for w, i in self.vocab.items()}
        out = ""
        for i in ids:
            token = words.get(int(i), "?")
            glue = not out or (len(token) == 1 and not token.isalnum())
            out += token if glue else " " + token
        return out

    def __call__(self, texts: list[str]) -> list[list[int]]:
        """Batch encoding, the shape of the corpus loader's tokenizer callable."""
        return [self.encode(t) for t in texts]

    def save(self, path: Path) -> None:
        path.write_text(
            json.dumps({"type": WORD_LEVEL, "vocab": self.vocab}, ensure_ascii=False)
        )

    @classmethod
    def load(cls, path: Path) -> WordTokenizer:
        return cls(json.loads(path.read_text())["vocab"])


def load_word_tokenizer(directory: str | os.PathLike[str]) -> WordTokenizer | None:
    """The word-level tokenizer saved in a model's tokenizer directory, or None if it holds
    another kind (e.g. a Hugging Face tokenizer)."""
    path = Path(directory) / TOKENIZER_DIR_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("type") != WORD_LEVEL:
        return None
    return WordTokenizer(data["vocab"])


def text_tokenizer(directory: str | os.PathLike[str]) -> Any:
    """A model's tokenizer directory as ``texts -> token id lists``: the word-level tokenizer
    when it holds one, else a local Hugging Face tokenizer (never downloaded)."""
    word = load_word_tokenizer(directory)
    if word is not None:
        return word
    from indexer.corpus import hf_tokenizer

    return hf_tokenizer(str(directory))


@dataclass
class SpanDocument:
    id: str
    start: int  # character offsets of the match in the document's text
    end: int
    snippet: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class VerbatimSpan:
    start: int  # character offsets of the span in the output text
    end: int
    text: str
    num_tokens: int
    count: int  # occurrences in the corpus
    unigram_logprob: float  # sum of the span's token log-probabilities (lower = rarer)
    documents: list[SpanDocument]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _validate(documents: Sequence[dict[str, Any]]) -> None:
    if not documents:
        raise CorpusError("cannot build a verbatim index over an empty corpus: pass documents")
    seen: set[str] = set()
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict) or "id" not in doc or "text" not in doc:
            raise CorpusError(f"document #{i} needs 'id' and 'text' fields")
        if not isinstance(doc["text"], str):
            raise CorpusError(f"document {doc['id']!r}: 'text' must be a string")
        doc_id = str(doc["id"])
        if doc_id in seen:
            raise CorpusError(
                f"duplicate document id {doc_id!r} (document #{i}): ids must be unique"
            )
        seen.add(doc_id)


def _run_build_sa(directory: Path, token_width: int) -> None:
    code = (
        "import argparse\n"
        "from infini_gram import indexing\n"
        f"d = {str(directory)!r}\n"
        "indexing.build_sa(argparse.Namespace(save_dir=d, temp_dir=d, worker_id=0, shards=1,"
        f" workers=1, mem=1, cpus=1, token_width={token_width}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    if proc.returncode != 0 or not (directory / "table.0").exists():
        raise IndexerError(
            f"infini-gram build_sa failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
            f"{proc.stdout[-1000:]}"
        )


def build_verbatim_index(
    documents: Sequence[dict[str, Any]],
    directory: str | os.PathLike[str],
    tokenizer: WordTokenizer | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Build the index atomically (temporary sibling directory, then ``os.replace``).

    ``tokenizer`` defaults to a :class:`WordTokenizer` trained on the documents themselves.
    """
    _validate(documents)
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise IndexerError(f"{directory} already exists; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = WordTokenizer.train(d["text"] for d in documents)
    # Tokenizer ids are remapped to compact index ids (rank among the ids the corpus uses,
    # plus FIRST_WORD_ID), so a model tokenizer with a vocabulary over 65,535 still gets the
    # u16 layout unless the corpus itself uses that many distinct tokens. (infini-gram 2.6.0's
    # u32 build asks for a 32 GiB allocation in make-part, so u32 needs a big machine.)
    raw = [np.asarray(tokenizer.encode(d["text"]), dtype=np.int64) for d in documents]
    used = np.unique(np.concatenate(raw)) if raw else np.zeros(0, dtype=np.int64)
    vocab_size = FIRST_WORD_ID + len(used)
    u16 = vocab_size < U16_LIMIT
    dtype, width = (np.dtype("<u2"), 2) if u16 else (np.dtype("<u4"), 4)
    sep = b"\xff" * width

    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        np.save(tmp / "idmap.npy", used)
        counts = np.zeros(vocab_size, dtype=np.int64)
        offsets = np.zeros(len(documents), dtype="<u8")
        line_offsets = np.zeros(len(documents), dtype="<u8")
        pos = line_pos = 0
        num_tokens = 0
        with (
            open(tmp / "tokenized.0", "wb") as ds,
            open(tmp / "docs.jsonl", "wb") as dj,
        ):
            for i, doc in enumerate(documents):
                ids = np.searchsorted(used, raw[i]) + FIRST_WORD_ID
                raw[i] = None  # type: ignore[call-overload]  # free as we go
                counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
                num_tokens += len(ids)
                payload = sep + ids.astype(dtype).tobytes()
                offsets[i] = pos
                ds.write(payload)
                pos += len(payload)
                rec = {
                    "id": str(doc["id"]),
                    "text": doc["text"],
                    "metadata": doc.get("metadata") or {},
                }
                line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
                line_offsets[i] = line_pos
                dj.write(line)
                line_pos += len(line)
        offsets.tofile(tmp / "offset.0")
        line_offsets.tofile(tmp / "docs.idx")
        np.save(tmp / "unigram.npy", counts)
        tokenizer.save(tmp / "vocab.json")
        _run_build_sa(tmp, width)
        meta = {
            "format": FORMAT,
            "num_documents": len(documents),
            "num_tokens": int(num_tokens),
            "vocab_size": vocab_size,
            "token_dtype": "u16" if u16 else "u32",
            "tokenizer": "word-level/1",
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def build_corpus_verbatim(
    directory: Path,
    ids: Sequence[str],
    texts: Sequence[str],
    metadata: Sequence[dict[str, Any]],
    tokenizer_dir: str | None,
) -> dict[str, Any]:
    """The verbatim index of a text corpus inside an index version (``<version>/verbatim``).

    Tokenised with the model's own word-level tokenizer when its card names one, else with a
    word-level tokenizer built from the corpus (a Hugging Face tokenizer's sub-word pieces would
    let spans start mid-word). Returns the manifest entry. A resumed build keeps a finished one.
    """
    tokenizer = load_word_tokenizer(tokenizer_dir) if tokenizer_dir else None
    if not (directory / "meta.json").is_file():
        documents = [{"id": str(i), "text": t, "metadata": m}
                     for i, t, m in zip(ids, texts, metadata, strict=True)]
        build_verbatim_index(documents, directory, tokenizer, overwrite=True)
    meta = json.loads((directory / "meta.json").read_text())
    return {**meta, "path": directory.name,
            "tokenizer_source": "model" if tokenizer is not None else "corpus",
            "bytes": sum(p.stat().st_size for p in directory.iterdir() if p.is_file())}


class VerbatimIndex:
    """A built verbatim index; :meth:`spans` finds the output's spans that occur in the corpus."""

    def __init__(
        self, directory: Path, meta: dict[str, Any], load_to_ram: bool | None = None
    ) -> None:
        from infini_gram.engine import InfiniGramEngine

        self.directory = directory
        self.meta = meta
        self.tokenizer = WordTokenizer.load(directory / "vocab.json")
        self.token_dtype: str = meta["token_dtype"]
        self._width = 2 if self.token_dtype == "u16" else 4
        self._doc_offsets = np.fromfile(directory / "offset.0", dtype="<u8").astype(np.int64)
        self._line_offsets = np.fromfile(directory / "docs.idx", dtype="<u8")
        counts = np.load(directory / "unigram.npy")
        total = max(int(counts.sum()), 1)
        # add-one smoothing so that no token has probability 0
        self._logprob = np.log((counts + 1.0) / (total + len(counts)))
        self._docs_file = open(directory / "docs.jsonl", "rb")  # noqa: SIM115 (lives with self)
        self._docs_lock = threading.Lock()  # seek + readline on one shared handle
        vocab_size = U16_LIMIT if self.token_dtype == "u16" else max(meta["vocab_size"], 2)
        if load_to_ram is None:
            size = sum((directory / f).stat().st_size for f in ("tokenized.0", "table.0"))
            load_to_ram = size <= LOAD_TO_RAM_MAX_BYTES
        self.load_to_ram = load_to_ram
        # Prefetch depth 0: infini-gram's prefetching is meant for huge disk-resident indexes;
        # here it made each count ~10x slower (measured on 2 shared cores).
        self.engine = InfiniGramEngine(
            index_dir=str(directory),
            eos_token_id=EOS_ID,
            vocab_size=vocab_size,
            token_dtype=self.token_dtype,
            load_to_ram=load_to_ram,
            ds_prefetch_depth=0,
            sa_prefetch_depth=0,
            od_prefetch_depth=0,
        )
        self._idmap = np.load(directory / "idmap.npy")
        self._sentence_end_ids = {
            self._to_index_ids([self.tokenizer.vocab[t]])[0]
            for t in SENTENCE_ENDS
            if t in self.tokenizer.vocab
        } - {UNK_ID}

    def _to_index_ids(self, raw: list[int]) -> list[int]:
        """Tokenizer ids to index ids; ids the corpus never uses become UNK_ID."""
        if not raw or len(self._idmap) == 0:
            return [UNK_ID] * len(raw)
        arr = np.asarray(raw, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._idmap, arr), len(self._idmap) - 1)
        return np.where(self._idmap[pos] == arr, pos + FIRST_WORD_ID, UNK_ID).tolist()

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        raw, offsets = self.tokenizer.encode_with_offsets(text)
        return self._to_index_ids(raw), offsets

    @classmethod
    def open(
        cls, directory: str | os.PathLike[str], load_to_ram: bool | None = None
    ) -> VerbatimIndex:
        """Open a built index; ``load_to_ram`` defaults to True for indexes up to 2 GiB."""
        directory = Path(directory)
        if not (directory / "meta.json").exists():
            raise IndexNotFoundError(f"no verbatim index at {directory} (meta.json missing)")
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise IndexCorruptError(
                f"{directory}: format {meta.get('format')!r}, expected {FORMAT}"
            )
        needed = [
            "idmap.npy",
            "tokenized.0",
            "offset.0",
            "table.0",
            "vocab.json",
            "unigram.npy",
            "docs.jsonl",
            "docs.idx",
        ]
        missing = [n for n in needed if not (directory / n).exists()]
        if missing:
            raise IndexCorruptError(f"verbatim index {directory} is missing {', '.join(missing)}")
        return cls(directory, meta, load_to_ram=load_to_ram)

    def close(self) -> None:
        self._docs_file.close()

    def __enter__(self) -> VerbatimIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def num_documents(self) -> int:
        return int(self.meta["num_documents"])

    def document(self, doc_ix: int) -> dict[str, Any]:
        with self._docs_lock:
            self._docs_file.seek(int(self._line_offsets[doc_ix]))
            line = self._docs_file.readline()
        return json.loads(line)

    def count(self, text: str) -> int:
        """Occurrences of ``text`` (as a token sequence) in the corpus."""
        ids = self._encode(text)[0]
        if not ids or UNK_ID in ids:
            return 0
        return int(self.engine.count(ids)["count"])

    def spans(
        self,
        output_text: str,
        max_docs_per_span: int = 5,
        min_tokens: int = 3,
        max_count: int = 1_000,
        context_chars: int = 80,
    ) -> list[VerbatimSpan]:
        """Maximal spans of ``output_text`` found verbatim in the corpus, rarest first.

        Spans are whole words, never cross a sentence end (``.``, ``!``, ``?``, ...), have at
        least ``min_tokens`` tokens and at most ``max_count`` corpus occurrences (more frequent
        spans are common phrases, not provenance evidence, and infini-gram returns every
        occurrence of a span, so this also bounds the work); each lists up to
        ``max_docs_per_span`` documents with character offsets of the match and a snippet.
        """
        if not isinstance(output_text, str):
            raise VerbatimError("output_text must be a string")
        if len(output_text) > MAX_OUTPUT_CHARS:
            raise VerbatimError(
                f"output is {len(output_text)} characters; the limit is MAX_OUTPUT_CHARS="
                f"{MAX_OUTPUT_CHARS}"
            )
        if min_tokens < 1 or max_docs_per_span < 0 or max_count < 1:
            raise VerbatimError("min_tokens and max_count must be >= 1, max_docs_per_span >= 0")
        ids, char_spans = self._encode(output_text)
        if len(ids) > MAX_OUTPUT_TOKENS:
            raise VerbatimError(
                f"output is {len(ids)} tokens; the limit is MAX_OUTPUT_TOKENS={MAX_OUTPUT_TOKENS}"
            )
        if len(ids) < min_tokens:
            return []
        # One engine call for the whole output: the sentence ends are infini-gram's delimiters,
        # so no span continues past one (the same spans as one call per sentence, measured
        # 2x faster at the median and 4x at p99: each call has a fixed cost of a few ms).
        res = self.engine.attribute(
            input_ids=ids,
            delim_ids=sorted(self._sentence_end_ids),
            min_len=min_tokens,
            max_cnt=max_count,
            enforce_bow=False,
        )
        if "error" in res:
            raise IndexerError(f"infini-gram attribute failed: {res['error']}")
        found: list[VerbatimSpan] = []
        for sp in res["spans"]:
            a, b = sp["l"], sp["r"]
            if b - a < min_tokens or UNK_ID in ids[a:b]:
                continue
            docs = [
                self._doc_match(d["ptr"], b - a, context_chars)
                for d in sp["docs"][:max_docs_per_span]
            ]
            start, end = char_spans[a][0], char_spans[b - 1][1]
            found.append(
                VerbatimSpan(
                    start=start,
                    end=end,
                    text=output_text[start:end],
                    num_tokens=b - a,
                    count=int(sp["count"]),
                    unigram_logprob=float(self._logprob[ids[a:b]].sum()),
                    documents=docs,
                )
            )
        found.sort(key=lambda s: (s.unigram_logprob, s.start))
        return found

    def _doc_match(self, ptr: int, length: int, context_chars: int) -> SpanDocument:
        doc_ix = int(np.searchsorted(self._doc_offsets, ptr, side="right")) - 1
        tok_pos = (ptr - int(self._doc_offsets[doc_ix])) // self._width - 1  # minus the separator
        doc = self.document(doc_ix)
        _, char_spans = self.tokenizer.encode_with_offsets(doc["text"])
        start, end = char_spans[tok_pos][0], char_spans[tok_pos + length - 1][1]
        text = doc["text"]
        lo, hi = max(0, start - context_chars), min(len(text), end + context_chars)
        snippet = ("…" if lo > 0 else "") + text[lo:hi] + ("…" if hi < len(text) else "")
        return SpanDocument(
            id=doc["id"], start=start, end=end, snippet=snippet, metadata=doc.get("metadata") or {}
        )


def bytes_per_token(directory: str | os.PathLike[str]) -> float:
    """Size on disk of the whole index directory divided by the corpus token count."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    return size / max(meta["num_tokens"], 1) if meta["num_tokens"] else math.inf
