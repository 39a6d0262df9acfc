"""Text examples for top-k: tokenised in the API with the tokenizer the index's model card names.

The tokenizer is the one the indexer used for the corpus (the model's word-level tokenizer or a
local Hugging Face directory, never downloaded), loaded once per open index version by
:meth:`indexer.index.AttributionIndex.tokenizer`. Token rows are padded the way the corpus was: to the corpus's sequence length for classification and
regression, to the longest text (at most the card's ``max_length``) for causal-LM, whose labels
are the tokens themselves with padding ignored.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from indexer.cards import pad_token_id, tokenizer_dir
from indexer.corpus import IGNORE_INDEX
from indexer.errors import IndexerError
from service.core.problems import Problem


class TextEncoder:
    """Texts → (token rows, labels) for one open index."""

    def __init__(self, index: Any) -> None:
        card = index.card
        self.index_name = index.name
        self.task: str = card.task
        self.pad_id = pad_token_id(card)  # as the corpus was padded (indexer.cards)
        self.directory = tokenizer_dir(card)
        self._index = weakref.ref(index)  # the encoder is cached per index: no strong cycle
        corpus = index.manifest["corpus"]
        self.reads_tokens = str(corpus["input_dtype"]).startswith("int")
        self.length: int | None = (int(np.prod(corpus["input_shape"]))
                                   if self.task != "causal-lm" else card.max_length)

    def check(self) -> None:
        """422 unless this index can read text (a token model whose card names a tokenizer)."""
        if not self.reads_tokens:
            raise Problem(422, "text-not-supported", f"index {self.index_name!r} reads numeric "
                          "features, not text; send the examples as 'x' rows")
        if self.directory is None:
            raise Problem(422, "text-not-supported", f"the model card of index "
                          f"{self.index_name!r} names no tokenizer, so text cannot be tokenised "
                          "here; send token ids as 'x' rows, or add 'tokenizer: <local Hugging "
                          "Face tokenizer dir>' to the card and rebuild the index")

    def tokenizer(self) -> Any:
        """The card's tokenizer (the index loads it once)."""
        self.check()
        index = self._index()
        assert index is not None, "callers hold the index they encode for"
        try:
            return index.tokenizer()
        except IndexerError as err:
            raise Problem(422, "text-not-supported", f"{err}; send token ids as 'x' rows"
                          ) from None

    def encode(self, texts: list[str], labels: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """Padded token rows and the labels the model needs (the tokens, for causal-LM)."""
        tokens = [np.asarray(t, dtype=np.int64) for t in self.tokenizer()(texts)]
        empty = [i for i, t in enumerate(tokens) if len(t) == 0]
        if empty:
            raise Problem(422, "invalid-examples", f"examples.text {empty[:5]} produce no tokens; "
                          "send non-empty texts")
        length = max(len(t) for t in tokens)
        if self.length is not None:
            length = self.length if self.task != "causal-lm" else min(length, self.length)
        x = np.full((len(tokens), length), self.pad_id, dtype=np.int64)
        for row, t in zip(x, tokens, strict=True):
            row[: min(len(t), length)] = t[:length]
        if self.task != "causal-lm":
            return x, labels
        if labels is not None:
            raise Problem(422, "invalid-examples", "a causal-LM text is its own label: omit "
                          "examples.y when sending text")
        y = x.copy()
        for row, t in zip(y, tokens, strict=True):
            row[len(t):] = IGNORE_INDEX
        return x, y


_encoders: weakref.WeakKeyDictionary[Any, TextEncoder] = weakref.WeakKeyDictionary()
_encoders_lock = threading.Lock()


def encoder_for(index: Any) -> TextEncoder:
    """The index's encoder (its tokenizer is cached with it, and dropped with the index)."""
    with _encoders_lock:
        encoder = _encoders.get(index)
        if encoder is None:
            encoder = _encoders[index] = TextEncoder(index)
        return encoder
