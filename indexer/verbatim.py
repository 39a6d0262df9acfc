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

    tokenized.0 offset.0 table.0   infini-gram files of the built corpus (shard 0)
    docs.jsonl docs.idx            one {"id","text","metadata"} per line; uint64 line offsets
    shard-N/                       documents added later (N = 1, 2, ...): the same five files
    vocab.json                     the tokenizer (words first seen in an added shard appended)
    idmap.npy                      tokenizer id of each index id − 2 (sorted for the built corpus,
                                   ids first used by an added shard appended)
    unigram.npy                    int64 count of each index id in the corpus
    meta.json                      format, counts, token dtype, added shards

Adding documents (:func:`add_verbatim_shard`) writes a new ``shard-N`` with its own suffix array
(infini-gram queries all shards of an index together) and replaces only the small shared files,
so the files of earlier shards can stay hard-linked between index versions.
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

from attribution.files import atomic_write
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
        """Write the vocabulary as JSON, atomically (the file is replaced, never written into)."""
        data = json.dumps({"type": WORD_LEVEL, "vocab": self.vocab}, ensure_ascii=False)
        atomic_write(path, lambda handle: handle.write(data.encode("utf-8")))

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


def _write_shard(tmp: Path, documents: Sequence[dict[str, Any]], index_ids: list[np.ndarray],
                 vocab_size: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Write one shard's token and document files into ``tmp`` and build its suffix array;
    returns the unigram counts of its index ids and its number of tokens."""
    sep = b"\xff" * dtype.itemsize
    counts = np.zeros(vocab_size, dtype=np.int64)
    offsets = np.zeros(len(documents), dtype="<u8")
    line_offsets = np.zeros(len(documents), dtype="<u8")
    pos = line_pos = num_tokens = 0
    with open(tmp / "tokenized.0", "wb") as ds, open(tmp / "docs.jsonl", "wb") as dj:
        for i, doc in enumerate(documents):
            ids = index_ids[i]
            index_ids[i] = None  # type: ignore[call-overload]  # free as we go
            counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
            num_tokens += len(ids)
            payload = sep + ids.astype(dtype).tobytes()
            offsets[i] = pos
            ds.write(payload)
            pos += len(payload)
            rec = {"id": str(doc["id"]), "text": doc["text"], "metadata": doc.get("metadata") or {}}
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
            line_offsets[i] = line_pos
            dj.write(line)
            line_pos += len(line)
    offsets.tofile(tmp / "offset.0")
    line_offsets.tofile(tmp / "docs.idx")
    _run_build_sa(tmp, dtype.itemsize)
    return counts, num_tokens


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
    index_ids = [np.searchsorted(used, r) + FIRST_WORD_ID for r in raw]
    del raw

    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        np.save(tmp / "idmap.npy", used)
        dtype = np.dtype("<u2") if u16 else np.dtype("<u4")
        counts, num_tokens = _write_shard(tmp, documents, index_ids, vocab_size, dtype)
        np.save(tmp / "unigram.npy", counts)
        tokenizer.save(tmp / "vocab.json")
        meta = {
            "format": FORMAT,
            "num_documents": len(documents),
            "num_tokens": int(num_tokens),
            "vocab_size": vocab_size,
            "token_dtype": "u16" if u16 else "u32",
            "tokenizer": "word-level/1",
            "shards": [],
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


def add_verbatim_shard(directory: str | os.PathLike[str], documents: Sequence[dict[str, Any]]
                       ) -> dict[str, Any]:
    """Add ``documents`` to the built index at ``directory`` as a new shard; returns the new meta.

    The shard (``shard-N``) is written under a temporary name and renamed; ``vocab.json``,
    ``idmap.npy``, ``unigram.npy`` and ``meta.json`` are replaced, not written through, so an
    earlier index version that hard-links them keeps its own. Words the index has not seen get
    new tokenizer and index ids; a u16 index whose ids would reach 65,535 must be rebuilt.
    """
    _validate(documents)
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    tokenizer = WordTokenizer.load(directory / "vocab.json")
    next_id = max([FIRST_WORD_ID - 1, *tokenizer.vocab.values()]) + 1
    for doc in documents:  # words first seen here get new tokenizer ids
        for tok, _, _ in tokenize_with_offsets(doc["text"]):
            if tok not in tokenizer.vocab:
                tokenizer.vocab[tok], next_id = next_id, next_id + 1
    raw = [np.asarray(tokenizer.encode(d["text"]), dtype=np.int64) for d in documents]
    idmap = np.load(directory / "idmap.npy")
    used = np.unique(np.concatenate(raw)) if raw else np.zeros(0, dtype=np.int64)
    idmap = np.concatenate([idmap, np.setdiff1d(used, idmap)])
    vocab_size = FIRST_WORD_ID + len(idmap)
    if meta["token_dtype"] == "u16" and vocab_size >= U16_LIMIT:
        raise IndexerError(
            f"the verbatim index would need {vocab_size} token ids, over the u16 layout's "
            f"{U16_LIMIT - 1}: rebuild the index instead of adding to it"
        )
    order = np.argsort(idmap, kind="stable")
    index_ids = [order[np.searchsorted(idmap[order], r)] + FIRST_WORD_ID for r in raw]
    del raw
    meta["superseded"] = _superseded(directory, meta, {str(d["id"]) for d in documents})
    name = f"shard-{len(meta.get('shards', [])) + 1}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=directory))
    try:
        dtype = np.dtype("<u2") if meta["token_dtype"] == "u16" else np.dtype("<u4")
        counts, num_tokens = _write_shard(tmp, documents, index_ids, vocab_size, dtype)
        old = np.load(directory / "unigram.npy")
        counts[: len(old)] += old
        os.replace(tmp, directory / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta.update(num_documents=meta["num_documents"] + len(documents),
                num_tokens=meta["num_tokens"] + int(num_tokens), vocab_size=vocab_size,
                shards=[*meta.get("shards", []), name])
    # replaced whole, never written through: earlier versions hard-link these files
    atomic_write(directory / "idmap.npy", lambda h: np.save(h, idmap, allow_pickle=False))
    atomic_write(directory / "unigram.npy", lambda h: np.save(h, counts, allow_pickle=False))
    tokenizer.save(directory / "vocab.json")
    atomic_write(directory / "meta.json", lambda h: h.write(json.dumps(meta, indent=2).encode()))
    return meta


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
            "bytes": index_bytes(directory)}


def _superseded(directory: Path, meta: dict[str, Any], new_ids: set[str]) -> list[list[int]]:
    """(shard, document) pairs hidden from now on: earlier documents with an id added again (a
    record deleted and re-added with new text must not show its old text's spans)."""
    hidden = [list(pair) for pair in meta.get("superseded", [])]
    for shard, path in enumerate([directory, *(directory / n for n in meta.get("shards", []))]):
        with open(path / "docs.jsonl", "rb") as lines:
            hidden += [[shard, i] for i, line in enumerate(lines)
                       if json.loads(line)["id"] in new_ids]
    return hidden


def add_corpus_verbatim(directory: Path, ids: Sequence[str], texts: Sequence[str],
                        metadata: Sequence[dict[str, Any]], entry: dict[str, Any]
                        ) -> dict[str, Any]:
    """Add a text corpus's documents to the verbatim index of an index version as a new shard
    (:func:`add_verbatim_shard`); returns the updated manifest ``entry``."""
    documents = [{"id": str(i), "text": t, "metadata": m}
                 for i, t, m in zip(ids, texts, metadata, strict=True)]
    meta = add_verbatim_shard(directory, documents)
    return {**entry, **meta, "bytes": index_bytes(directory)}


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
        self.shard_dirs = [directory, *(directory / name for name in meta.get("shards", []))]
        self._doc_offsets = [np.fromfile(d / "offset.0", dtype="<u8").astype(np.int64)
                             for d in self.shard_dirs]
        self._line_offsets = [np.fromfile(d / "docs.idx", dtype="<u8") for d in self.shard_dirs]
        counts = np.load(directory / "unigram.npy")
        total = max(int(counts.sum()), 1)
        # add-one smoothing so that no token has probability 0
        self._logprob = np.log((counts + 1.0) / (total + len(counts)))
        # one handle per shard, living with self; seek + readline share them under the lock
        self._docs_files = [open(d / "docs.jsonl", "rb") for d in self.shard_dirs]  # noqa: SIM115
        self._docs_lock = threading.Lock()
        vocab_size = U16_LIMIT if self.token_dtype == "u16" else max(meta["vocab_size"], 2)
        if load_to_ram is None:
            size = sum((d / f).stat().st_size for d in self.shard_dirs
                       for f in ("tokenized.0", "table.0"))
            load_to_ram = size <= LOAD_TO_RAM_MAX_BYTES
        self.load_to_ram = load_to_ram
        # Prefetch depth 0: infini-gram's prefetching is meant for huge disk-resident indexes;
        # here it made each count ~10x slower (measured on 2 shared cores).
        self.engine = InfiniGramEngine(  # its shard s = position in this list
            index_dir=[str(d) for d in self.shard_dirs],
            eos_token_id=EOS_ID,
            vocab_size=vocab_size,
            token_dtype=self.token_dtype,
            load_to_ram=load_to_ram,
            ds_prefetch_depth=0,
            sa_prefetch_depth=0,
            od_prefetch_depth=0,
        )
        idmap = np.load(directory / "idmap.npy")
        self._superseded = {(int(a), int(b)) for a, b in meta.get("superseded", [])}
        self._idmap_order = np.argsort(idmap, kind="stable")  # identity unless shards were added
        self._idmap = idmap[self._idmap_order]
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
        index_ids = self._idmap_order[pos] + FIRST_WORD_ID
        return np.where(self._idmap[pos] == arr, index_ids, UNK_ID).tolist()

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
        shard_files = ["tokenized.0", "offset.0", "table.0", "docs.jsonl", "docs.idx"]
        missing = [n for n in needed if not (directory / n).exists()] + [
            f"{d}/{n}" for d in meta.get("shards", []) for n in shard_files
            if not (directory / d / n).exists()]
        if missing:
            raise IndexCorruptError(f"verbatim index {directory} is missing {', '.join(missing)}")
        return cls(directory, meta, load_to_ram=load_to_ram)

    def close(self) -> None:
        for file in self._docs_files:
            file.close()

    def __enter__(self) -> VerbatimIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def num_documents(self) -> int:
        return int(self.meta["num_documents"])

    def document(self, doc_ix: int, shard: int = 0) -> dict[str, Any]:
        """The ``doc_ix``-th document of a shard: {"id", "text", "metadata"}."""
        with self._docs_lock:
            self._docs_files[shard].seek(int(self._line_offsets[shard][doc_ix]))
            line = self._docs_files[shard].readline()
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
            live = sp["docs"]
            if self._superseded:  # only after a document was re-added with new text
                live = [d for d in live
                        if (d["s"], self._doc_ix(d["s"], d["ptr"])) not in self._superseded]
                if not live:
                    continue  # found only in documents replaced by a later shard
            docs = [self._doc_match(d["s"], d["ptr"], b - a, context_chars)
                    for d in live[:max_docs_per_span]]
            start, end = char_spans[a][0], char_spans[b - 1][1]
            found.append(
                VerbatimSpan(
                    start=start,
                    end=end,
                    text=output_text[start:end],
                    num_tokens=b - a,
                    count=int(sp["count"]) - (len(sp["docs"]) - len(live)),
                    unigram_logprob=float(self._logprob[ids[a:b]].sum()),
                    documents=docs,
                )
            )
        found.sort(key=lambda s: (s.unigram_logprob, s.start))
        return found

    def _doc_ix(self, shard: int, ptr: int) -> int:
        """The shard's document holding byte ``ptr`` of its token file."""
        return int(np.searchsorted(self._doc_offsets[shard], ptr, side="right")) - 1

    def _doc_match(self, shard: int, ptr: int, length: int, context_chars: int) -> SpanDocument:
        doc_ix = self._doc_ix(shard, ptr)
        tok_pos = (ptr - int(self._doc_offsets[shard][doc_ix])) // self._width - 1  # separator
        doc = self.document(doc_ix, shard)
        _, char_spans = self.tokenizer.encode_with_offsets(doc["text"])
        start, end = char_spans[tok_pos][0], char_spans[tok_pos + length - 1][1]
        text = doc["text"]
        lo, hi = max(0, start - context_chars), min(len(text), end + context_chars)
        snippet = ("…" if lo > 0 else "") + text[lo:hi] + ("…" if hi < len(text) else "")
        return SpanDocument(
            id=doc["id"], start=start, end=end, snippet=snippet, metadata=doc.get("metadata") or {}
        )


def index_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes of every file of the index, added shards included."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def bytes_per_token(directory: str | os.PathLike[str]) -> float:
    """Size on disk of the whole index directory divided by the corpus token count."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    size = index_bytes(directory)
    return size / max(meta["num_tokens"], 1) if meta["num_tokens"] else math.inf
